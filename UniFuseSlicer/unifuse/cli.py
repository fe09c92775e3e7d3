"""The ``unifuse`` command line.

``unifuse fuse``   align, restore and fuse two volumes (any format SimpleITK reads, or DICOM folders)
``unifuse demo``   build the synthetic sample pair with known truth, fuse it, print metrics, write PNGs
``unifuse info``   parameter counts per module and FLOPs of the network configs
``unifuse train``  train on synthetic pairs (resumable); ``unifuse evaluate`` held-out metrics + model card
``unifuse bench``  UniFuse against multi-stage baselines (metrics, time, memory); ``--real`` on real anatomy
``unifuse data real``  fetch and build the real-anatomy cases (local cache; never at run time of ``fuse``)
``unifuse fuse-batch``  a cohort from a CSV manifest: resumable, per-case failures, summary.csv, ``--shard``

The tool commands (train/evaluate, bench, data, fuse-batch) are registered only where their modules are
installed: the Slicer extension ships the inference code alone.

Exit codes: 0 success; 1 a user-facing error (one line on stderr: what is wrong and how to fix it);
2 bad command-line usage; 130 cancelled (Ctrl-C) — in every failure case no partial outputs are left.

The handlers import what they run when they run: the demo and the model's FLOP count are not shipped with
the Slicer extension, and the pipeline, the demo and the model (scipy, torch) take ``import unifuse.cli`` from
~0.3 s to ~2 s.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from tqdm import tqdm

from . import __version__
from .config import CONFIGS, get_config
from .errors import CancelledError, UniFuseError
from .options import FuseOptions, add_cli_arguments
from .outputs import claim_output_dir, interrupt_summary, release_all
from .weights import load_checkpoint

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CANCELLED = 0, 1, 2, 130


def _progress_printer(machine: bool, quiet: bool) -> Callable[[float, str], None]:
    """Progress on stderr: a tqdm bar for people, ``PROGRESS <fraction> <message>`` lines for programs."""
    if machine:
        def machine_progress(fraction: float, message: str) -> None:
            print(f"PROGRESS {fraction:.3f} {message}", file=sys.stderr, flush=True)

        return machine_progress
    if quiet:
        return lambda fraction, message: None

    bar = tqdm(total=100, file=sys.stderr, bar_format="{l_bar}{bar}| {elapsed}", leave=True)

    def human_progress(fraction: float, message: str) -> None:
        bar.set_description_str(message[:40].ljust(40))
        bar.update(max(0, round(fraction * 100) - bar.n))
        if fraction >= 1.0:
            bar.close()

    return human_progress


def _add_run_options(p: argparse.ArgumentParser) -> None:
    add_cli_arguments(p)
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--machine-progress", action="store_true", help="print 'PROGRESS <fraction> <message>' lines on stderr")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unifuse",
        description="UniFuse 3D: align, restore and fuse a degraded, misaligned volume onto a reference volume.",
    )
    parser.add_argument("--version", action="version", version=f"unifuse {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fuse", help="fuse a moving volume onto a reference volume")
    p.add_argument("--reference", required=True, type=Path, help="reference volume (file or DICOM folder)")
    p.add_argument("--moving", required=True, type=Path, help="moving volume (file or DICOM folder)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    _add_run_options(p)

    p = sub.add_parser("demo", help="run the pipeline on the synthetic sample pair and print metrics against the truth")
    p.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder (default: demo_output)")
    p.add_argument("--task", default="t1-t2-motion", help="sample task (default: t1-t2-motion)")
    p.add_argument("--size", type=int, default=None, help="edge of the synthetic volumes in voxels")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic case")
    _add_run_options(p)

    p = sub.add_parser("info", help="parameter counts per module and FLOPs at 160³ and 256³")
    p.add_argument("--config", choices=sorted(CONFIGS), default=None, help="only this config (default: all)")
    p.add_argument("--weights", type=Path, default=None, help="describe this checkpoint's config")

    for module, add_parser, _handlers in _available_tool_commands():
        getattr(importlib.import_module(module, __package__), add_parser)(sub)
    return parser


#: Sub-commands whose code is not part of inference: (module, parser builder, {command: handler}). The Slicer
#: extension ships inference only, so these are registered only where their module is installed.
_TOOL_COMMANDS = (
    (".train.cli_train", "add_train_parser", {"train": "run_train", "evaluate": "run_evaluate"}),
    (".bench", "add_bench_parser", {"bench": "run_bench"}),
    (".data.cli_data", "add_data_parser", {"data": "run_data"}),
    (".batch", "add_batch_parser", {"fuse-batch": "run_fuse_batch"}),
)


def _available_tool_commands() -> List[tuple]:
    """The :data:`_TOOL_COMMANDS` whose module exists in this installation (found without importing it)."""
    found = []
    for entry in _TOOL_COMMANDS:
        try:
            if importlib.util.find_spec(entry[0], __package__) is not None:
                found.append(entry)
        except ModuleNotFoundError:  # a parent package (e.g. unifuse.train) is not shipped
            continue
    return found


def _run_fuse(args: argparse.Namespace) -> int:
    from .pipeline import OUTPUT_FILES, REPORT_FILE, fuse

    # check and lock --out before spending minutes on the network (released by _main; result.save joins it)
    claim = claim_output_dir(args.out, [*OUTPUT_FILES.values(), REPORT_FILE], args.overwrite,
                             inputs=(args.reference, args.moving))
    for note in claim.notes:
        print(f"unifuse: note: {note}", file=sys.stderr)

    options = FuseOptions.from_namespace(args)
    result = fuse(args.reference, args.moving, options, progress=_progress_printer(args.machine_progress, args.quiet))
    result.save(args.out, overwrite=args.overwrite)
    _print_summary(result.report, args.out)
    return EXIT_OK


def _print_summary(report: dict, out: Path) -> None:
    deg = report["degradation"]
    probs = ", ".join(f"{k} {v:.2f}" for k, v in deg["probabilities"].items())
    print(f"model      {report['model']['id']} ({'trained' if report['model']['trained'] else 'UNTRAINED'})")
    print(f"device     {report['device']}")
    modality = deg.get("moving_modality", {})
    print(f"degradation used: {deg['used']} (calibrated probabilities: {probs}; moving modality "
          f"{modality.get('used', '?')}, {modality.get('source', '?')})")
    for stage in report["stages"]:
        verdict = "" if stage.get("kept") is None else ("  kept" if stage["kept"] else "  REJECTED (made it no better)")
        score = f"  score {stage['previous_score']:.4f} -> {stage['score']:.4f}" if "score" in stage else ""
        print(f"stage      {stage['name']:<12} {stage['seconds']:7.2f} s{score}{verdict}")
    print(f"alignment  final stage: {report['alignment']['final_stage']}")
    print(f"folding    {report['folding_percent']['reference_grid']:.3f} % of voxels")
    print(f"error map  mean {report['error_map_mean']['before']:.4f} before -> {report['error_map_mean']['after']:.4f} after")
    print(f"time       {report['timings_s']['total']:.2f} s " + json.dumps(report["timings_s"]))
    print(f"outputs    {out}")
    for note in report.get("notes", []):
        print(f"note       {note}")
    for warning in report.get("warnings", []):
        print(f"WARNING    {warning}")


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(
        out_dir=args.out, task=args.task, size=args.size, seed=args.seed, options=FuseOptions.from_namespace(args),
        overwrite=args.overwrite, progress=_progress_printer(args.machine_progress, args.quiet),
    )
    return EXIT_OK


def _run_info(args: argparse.Namespace) -> int:
    from .model.complexity import format_info

    if args.weights is not None:
        ckpt = load_checkpoint(args.weights)
        print(f"checkpoint {args.weights} ({ckpt.model_id})")
        print(json.dumps(ckpt.metadata, indent=2, default=str))
        configs = [ckpt.config]
    else:
        configs = [get_config(args.config)] if args.config else [get_config(n) for n in CONFIGS]
    for cfg in configs:
        print(format_info(cfg))
        print()
    return EXIT_OK


def _sigterm_as_ctrl_c(signum: int, frame: object) -> None:
    """SIGINT/SIGTERM (``kill``, a job scheduler, a GUI's Cancel) take the Ctrl-C path: exit 130 (in-process)."""
    raise KeyboardInterrupt


def _cancelled_line() -> str:
    return f"unifuse: cancelled (Ctrl-C); {interrupt_summary()}"


def _exit_now(signum: int, frame: object) -> None:
    """SIGINT/SIGTERM of the ``unifuse`` process: unless outputs are being staged (then the writer rolls back
    on KeyboardInterrupt), say what was written, release the output folders and exit 130 at once — also in
    the middle of importing torch/scipy, where an exception would leave half-initialised modules behind."""
    outputs = sys.modules.get(f"{__package__}.outputs")  # claims exist only once it is fully imported
    claims = list(getattr(outputs, "_ACTIVE", ()))
    if any(c.state == "writing" for c in claims):
        raise KeyboardInterrupt
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the clean-up
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    line = _cancelled_line() if claims else "unifuse: cancelled (Ctrl-C); no outputs were written"
    if claims:
        outputs.release_all()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a stream interrupted mid-write: nothing more to save
            pass
    os.write(2, (line + "\n").encode("utf-8", "replace"))
    os._exit(EXIT_CANCELLED)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``unifuse`` console script and ``python -m unifuse``; returns the exit code.

    Ctrl-C and SIGTERM are handled from here on: run as the command (``argv`` None) they end the process at
    once with exit code 130 (:func:`_exit_now`); called in-process with ``argv`` they raise KeyboardInterrupt,
    which :func:`_main` turns into exit code 130. Either way the message says what was written. SIGXFSZ is
    ignored, so a write beyond ``ulimit -f`` fails (and is reported) instead of killing the process.
    """
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread only
        return _main(argv)
    handler = _exit_now if argv is None else _sigterm_as_ctrl_c
    wanted = {signal.SIGINT: handler, signal.SIGTERM: handler}
    if hasattr(signal, "SIGXFSZ"):
        wanted[signal.SIGXFSZ] = signal.SIG_IGN
    previous = {sig: signal.signal(sig, h) for sig, h in wanted.items()}
    try:
        return _main(argv)
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h if h is not None else signal.SIG_DFL)


def _empty_path_option(argv: Sequence[str]) -> str:
    """The first path option given an empty value (``--out ""`` would otherwise mean the current folder)."""
    options = ("--out", "--reference", "--moving", "--weights", "--pairs")
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name in options and ((eq and not value.strip()) or (not eq and i + 1 < len(argv) and not argv[i + 1].strip())):
            return name
    return ""


def _main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        empty = _empty_path_option(sys.argv[1:] if argv is None else list(argv))
        if empty:
            raise UniFuseError(f"{empty} is an empty string; give a path (for the current folder write '.')")
        parser = build_parser()
        args = parser.parse_args(argv)
        handlers = {"fuse": _run_fuse, "demo": _run_demo, "info": _run_info}
        if args.command not in handlers:
            module, _, names = next(entry for entry in _TOOL_COMMANDS if args.command in entry[2])
            return getattr(importlib.import_module(module, __package__), names[args.command])(args)
        return handlers[args.command](args)
    except KeyboardInterrupt:
        print(_cancelled_line(), file=sys.stderr)
        return EXIT_CANCELLED
    except CancelledError as exc:
        print(f"unifuse: {exc}", file=sys.stderr)
        return EXIT_CANCELLED
    except UniFuseError as exc:
        print(f"unifuse: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        release_all()


if __name__ == "__main__":  # pragma: no cover - `python -m unifuse.cli`
    sys.exit(main())
