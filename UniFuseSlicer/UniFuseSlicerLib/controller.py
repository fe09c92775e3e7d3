"""Run, poll, cancel and finish one UniFuse computation for the module GUI, without Qt.

The widget (``UniFuseSlicer.py``) only wires its buttons and a timer to a :class:`RunController` and shows
what the controller reports through a :class:`RunView`; everything that decides what happens - which output
nodes a run overwrites, when a run counts as cancelled, what a failure message says, what happens to the
moving volume and the slice views after a run - lives here and is tested with ``slicer-core``
(``Testing/test_slicer_controller.py``).

Life cycle::

    controller = RunController(FusionLogic(scene), view)
    controller.start(RunRequest(reference, moving, options={"device": "auto"}))   # Apply
    while controller.poll():       # a 200 ms GUI timer in the widget
        ...
    controller.cancel()            # Cancel: returns at once; the next polls report the end

A background run (the default) keeps Slicer responsive: the child process tree, reading its output files
and the cancellation all proceed without blocking the caller. An in-process run (``background=False``)
blocks until it ends but calls :meth:`RunView.process_events` at every progress step, so the Cancel button
still works between stages.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from unifuse.errors import CancelledError, UniFuseError

from .logic import BackgroundFusion, FusionLogic, FusionNodes, OutputNodes

__all__ = ["OUTPUT_MODES", "RunController", "RunOutcome", "RunRequest", "RunView"]

#: ``new``: every run creates new output nodes; ``update``: a run overwrites the previous run's nodes.
OUTPUT_MODES = ("new", "update")
CANCELLED_MESSAGE = "Cancelled; the scene is unchanged."


@dataclass
class RunRequest:
    """Everything one press of Apply asks for.

    Attributes:
        reference, moving: the input volume nodes (never modified, unless ``place_moving_under_transform``).
        options: :class:`unifuse.options.FuseOptions` fields (``degradation``, ``device``, ``weights``,
            ``spacing_mm``, ``config``, ...).
        background: run the CLI in a child process (default) or in Slicer's process.
        output_mode: ``"new"`` (new nodes every run) or ``"update"`` (overwrite the previous result's nodes,
            so reruns keep the node count constant).
        outputs: nodes picked explicitly per role; they win over ``update``.
        previous: the result ``update`` overwrites; default: the controller's last result.
        place_moving_under_transform: afterwards put the moving volume under the computed transform (it is
            then shown aligned); never done unless asked.
        fit_views: afterwards rotate the slice views to the reference's planes and fit them to it.
        keep_temporary_files: developer switch: keep the background run's temporary folder.
        python: interpreter of the background process (default: ``PythonSlicer``).
    """

    reference: Any
    moving: Any
    options: Dict[str, Any] = field(default_factory=dict)
    background: bool = True
    output_mode: str = "new"
    outputs: Optional[OutputNodes] = None
    previous: Optional[FusionNodes] = None
    place_moving_under_transform: bool = False
    fit_views: bool = True
    keep_temporary_files: bool = False
    python: Optional[str] = None


@dataclass
class RunOutcome:
    """How a run ended: ``status`` is ``succeeded``, ``failed`` or ``cancelled``.

    ``message`` is the one-line reason of a failure (the child's own last error line for background runs);
    ``details`` the traceback and the child's last stderr lines; ``warnings`` what went wrong after a
    successful run (e.g. the moving volume could not be placed under the transform).
    """

    status: str
    nodes: Optional[FusionNodes] = None
    message: str = ""
    details: str = ""
    warnings: List[str] = field(default_factory=list)

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"


class RunView:
    """What the controller reports to the GUI. The widget overrides these methods; the defaults do nothing."""

    def run_started(self, request: RunRequest) -> None:
        """A run started (Apply becomes Cancel)."""

    def progress(self, fraction: float, message: str) -> None:
        """Progress in [0, 1] with the stage the core reports."""

    def log(self, text: str) -> None:
        """A line for the module's log (the child's output, notes)."""

    def run_ended(self, outcome: RunOutcome) -> None:
        """The run ended (Cancel becomes Apply); show the result, the error or the cancellation."""

    def process_events(self) -> None:
        """In-process runs: let the GUI repaint and the Cancel button set the cancel flag."""


class RunController:
    """One run at a time: start, poll, cancel, finish (see the module docstring).

    Args:
        logic: the :class:`FusionLogic` of the scene (or a callable returning it, called at each start).
        view: where progress, log lines and the outcome go.
        prepare: called with the request before a run starts; returning False aborts the start (the widget
            installs missing Python packages here, after asking once).
    """

    def __init__(
        self,
        logic: Any,
        view: Optional[RunView] = None,
        prepare: Optional[Callable[[RunRequest], bool]] = None,
    ) -> None:
        self._logic = logic
        self.view = view or RunView()
        self.prepare = prepare
        self.last_nodes: Optional[FusionNodes] = None
        self._request: Optional[RunRequest] = None
        self._run: Optional[BackgroundFusion] = None
        self._in_process = False
        self._cancel_requested = False
        self._fraction = 0.0

    # -- state -------------------------------------------------------------------------------------------

    @property
    def logic(self) -> FusionLogic:
        return self._logic() if callable(self._logic) else self._logic

    @property
    def running(self) -> bool:
        return self._run is not None or self._in_process

    @property
    def state(self) -> str:
        """``idle``, ``running`` or ``cancelling``."""
        if not self.running:
            return "idle"
        return "cancelling" if self._cancel_requested else "running"

    @property
    def background_run(self) -> Optional[BackgroundFusion]:
        return self._run

    def outputs_for(self, request: RunRequest) -> OutputNodes:
        """The output nodes a run overwrites: explicit picks, plus (``update``) the previous result's nodes.

        Previous nodes that were deleted, or that are this run's inputs (an earlier output picked as the next
        moving volume), are not reused; a new node is made for those roles.
        """
        if request.output_mode not in OUTPUT_MODES:
            raise UniFuseError(f"unknown output mode {request.output_mode!r}; use one of {', '.join(OUTPUT_MODES)}")
        explicit = request.outputs or OutputNodes()
        if request.output_mode != "update":
            return explicit
        previous = request.previous if request.previous is not None else self.last_nodes
        taken = tuple(explicit.get(role) for role in ("fused", "aligned", "displacement", "error_map",
                                                      "error_map_before", "jacobian") if explicit.get(role) is not None)
        return explicit.merged(OutputNodes.from_nodes(previous, exclude=(request.reference, request.moving, *taken)))

    # -- actions -----------------------------------------------------------------------------------------

    def start(self, request: RunRequest) -> bool:
        """Start a run; False when one is running already, ``prepare`` declined, or it could not start (the
        outcome then says why). In-process runs return only when they ended."""
        if self.running:
            self.view.log("A UniFuse run is in progress; cancel it first.")
            return False
        if self.prepare is not None and not self.prepare(request):
            return False
        self._request = request
        self._cancel_requested = False
        self._fraction = 0.0
        try:
            outputs = self.outputs_for(request)
        except Exception as error:  # noqa: BLE001 - reported to the user
            self._finish(self._failure(error))
            return False
        self.view.run_started(request)
        if request.background:
            return self._start_background(request, outputs)
        self._run_in_process(request, outputs)
        return True

    def poll(self) -> bool:
        """Advance a background run; True while it is still running (keep polling), False once it ended."""
        run = self._run
        if run is None:
            return False
        try:
            nodes = run.poll()
        except CancelledError:
            self._run = None
            self._finish(RunOutcome("cancelled", message=CANCELLED_MESSAGE))
            return False
        except Exception as error:  # noqa: BLE001 - reported to the user
            self._run = None
            self._finish(self._failure(error, run))
            return False
        if nodes is None:
            return True
        self._run = None
        self._finish(self._success(nodes))
        return False

    def cancel(self) -> None:
        """Stop the running computation and return at once (the child process tree is signalled; an
        in-process run stops at the next stage). The end is reported by the following :meth:`poll` calls."""
        if not self.running or self._cancel_requested:
            return
        self._cancel_requested = True
        self.view.progress(self._fraction, "cancelling")
        if self._run is not None:
            self._run.cancel()

    def shutdown(self, timeout: float = 2.0) -> None:
        """Stop any run for good (module cleanup, application exit): cancel, then poll for at most
        ``timeout`` seconds so the temporary folder is removed; the view is not told anything more."""
        import time

        run = self._run
        if run is None:
            return
        self.view = RunView()
        self.cancel()
        deadline = time.monotonic() + timeout
        while self._run is not None and time.monotonic() < deadline:
            self.poll()
            time.sleep(0.05)
        if self._run is not None and run.process is not None and run.process.pid is not None:
            from .background import kill_process_tree

            kill_process_tree(run.process.pid, hard=True)
            run._end()
            self._run = None

    # -- internals ---------------------------------------------------------------------------------------

    def _progress(self, fraction: float, message: str) -> None:
        self._fraction = fraction
        self.view.progress(fraction, message)

    def _start_background(self, request: RunRequest, outputs: OutputNodes) -> bool:
        try:
            self._run = self.logic.start_background(
                request.reference, request.moving, on_progress=self._progress, on_log=self.view.log,
                outputs=outputs, python=request.python, keep_temporary_files=request.keep_temporary_files,
                **request.options,
            )
        except Exception as error:  # noqa: BLE001 - reported to the user
            self._run = None
            self._finish(self._failure(error, prefix="Failed to start UniFuse: "))
            return False
        return True

    def _run_in_process(self, request: RunRequest, outputs: OutputNodes) -> None:
        self._in_process = True

        def progress(fraction: float, message: str) -> None:
            self._progress(fraction, message)
            self.view.process_events()

        try:
            nodes = self.logic.process(
                request.reference, request.moving, progress=progress, outputs=outputs,
                cancel=lambda: self._cancel_requested, show=False, **request.options,
            )
        except CancelledError:
            outcome = RunOutcome("cancelled", message=CANCELLED_MESSAGE)
        except Exception as error:  # noqa: BLE001 - reported to the user
            outcome = self._failure(error)
        else:
            outcome = self._success(nodes)
        finally:
            self._in_process = False
        self._finish(outcome)

    def _success(self, nodes: FusionNodes) -> RunOutcome:
        request = self._request
        outcome = RunOutcome("succeeded", nodes=nodes)
        self.last_nodes = nodes
        if request is not None and request.place_moving_under_transform:
            try:
                self.logic.place_under_transform(nodes)
                self.view.log(f"'{nodes.moving.GetName()}' is now under '{nodes.displacement.GetName()}' "
                              f"(shown aligned; its voxels are unchanged).")
            except UniFuseError as error:
                outcome.warnings.append(str(error))
        try:
            self.logic.show_result(nodes, fit=bool(request is not None and request.fit_views))
        except Exception as error:  # noqa: BLE001 - the outputs are in the scene; only the views were not set
            outcome.warnings.append(f"the slice views were not updated: {error}")
        return outcome

    def _failure(self, error: BaseException, run: Optional[BackgroundFusion] = None, prefix: str = "") -> RunOutcome:
        details = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        if run is not None and run.process is not None and run.process.stderr_tail():
            details += "\nUniFuse process output (stderr):\n" + "\n".join(run.process.stderr_tail())
        return RunOutcome("failed", message=prefix + str(error), details=details)

    def _finish(self, outcome: RunOutcome) -> None:
        self._cancel_requested = False
        for warning in outcome.warnings:
            self.view.log("Warning: " + warning)
        self.view.run_ended(outcome)
