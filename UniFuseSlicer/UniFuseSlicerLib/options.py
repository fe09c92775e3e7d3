"""Choices offered by the module GUI (degradation, moving modality, device, overlay, outputs), as plain data
with labels.

Values are exactly the strings the core (``unifuse.fuse``) and its CLI accept; labels are what the GUI
shows (the widget shows its own translated labels for the same values). Nothing here imports Qt, and
nothing here imports torch: the device list is ``auto``/``cpu``/``cuda`` from the start, and the GPU's name
and memory are filled in by :class:`DeviceProbe`, which asks PyTorch in a *child* process, so opening the
module never loads torch into Slicer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

from unifuse.config import (DEGRADATION_CLASSES, DEGRADATION_LABELS, MOVING_MODALITIES, MOVING_MODALITY_LABELS,
                            modality_from_dicom)  # re-exported: the DICOM mapping is the core's own

__all__ = [
    "Choice",
    "DEGRADATION_CHOICES",
    "DEVICE_VALUES",
    "DICOM_MODALITY_TAG",
    "MOVING_MODALITY_CHOICES",
    "OUTPUT_MODE_CHOICES",
    "OVERLAY_CHOICES",
    "DeviceProbe",
    "GpuInfo",
    "degradation_values",
    "device_choices",
    "modality_from_dicom",
    "moving_modality_values",
    "parse_probe_output",
    "PROBE_SCRIPT",
]


@dataclass(frozen=True)
class Choice:
    """One entry of a combo box: ``value`` is passed to the core, ``label`` is shown."""

    value: str
    label: str


#: Degradation of the moving volume; "auto" lets the network's classifier decide. Values and labels come from
#: ``unifuse.config`` (the widget shows its own translated labels for the same values).
DEGRADATION_CHOICES: Tuple[Choice, ...] = (
    Choice("auto", "Automatic (detect)"), *(Choice(c, DEGRADATION_LABELS[c]) for c in DEGRADATION_CLASSES))

#: What the slice views show on top of the reference after a run (roles of ``logic.FusionNodes``).
OVERLAY_CHOICES: Tuple[Choice, ...] = (
    Choice("fused", "Fused volume"),
    Choice("aligned", "Aligned moving volume"),
    Choice("error_map", "Alignment error (after)"),
    Choice("error_map_before", "Alignment error (before)"),
    Choice("jacobian", "Jacobian determinant"),
)


def degradation_values() -> List[str]:
    """Values of :data:`DEGRADATION_CHOICES`: ``"auto"`` followed by the core's degradation classes."""
    return [c.value for c in DEGRADATION_CHOICES]


#: Modality of the moving volume, told to the degradation detection (``FuseOptions.moving_modality``): a known
#: modality rules out the degradations it cannot have (motion = MRI, low dose = PET, metal = CT). ``auto``: the
#: DICOM Modality of a volume loaded from Slicer's DICOM database (see ``logic.resolve_moving_modality``), else
#: the core tells only CT (HU scale) from not CT. Values and labels come from ``unifuse.config``.
MOVING_MODALITY_CHOICES: Tuple[Choice, ...] = tuple(Choice(m, MOVING_MODALITY_LABELS[m]) for m in MOVING_MODALITIES)


def moving_modality_values() -> List[str]:
    """Values of :data:`MOVING_MODALITY_CHOICES`: ``auto``, ``ct``, ``mr``, ``pet``."""
    return [c.value for c in MOVING_MODALITY_CHOICES]


#: The DICOM Modality attribute as ``ctkDICOMDatabase.fileValue`` names it.
DICOM_MODALITY_TAG = "0008,0060"


#: What a run does with the output nodes of the previous run ("new": new nodes every run; "update": overwrite
#: the previous run's nodes, so reruns keep the number of nodes in the scene constant).
OUTPUT_MODE_CHOICES: Tuple[Choice, ...] = (
    Choice("new", "Create new nodes"),
    Choice("update", "Update the previous result"),
)

#: Devices the core and the CLI accept (``cuda`` = the first visible GPU).
DEVICE_VALUES: Tuple[str, ...] = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class GpuInfo:
    """One CUDA GPU as PyTorch sees it."""

    index: int
    name: str
    memory_gib: float


def device_choices(gpus: Optional[Sequence[GpuInfo]] = None) -> List[Choice]:
    """Device combo entries: ``auto``, ``cpu``, ``cuda``, always in that order.

    Args:
        gpus: what :class:`DeviceProbe` found; None = not probed yet (generic labels, torch not imported).
            With GPUs the ``cuda`` entry names the first one with its memory (further GPUs are counted: pick
            one with ``CUDA_VISIBLE_DEVICES``); with an empty list the labels say no CUDA GPU was found.
    """
    if gpus is None:
        return [Choice("auto", "Automatic (GPU if available)"), Choice("cpu", "CPU"), Choice("cuda", "GPU (CUDA)")]
    if not gpus:
        return [Choice("auto", "Automatic (CPU: no CUDA GPU found)"), Choice("cpu", "CPU"),
                Choice("cuda", "GPU (CUDA): none found")]
    first = gpus[0]
    label = f"GPU {first.index}: {first.name} ({first.memory_gib:.1f} GiB)"
    if len(gpus) > 1:
        label += f" (+{len(gpus) - 1} more; select with CUDA_VISIBLE_DEVICES)"
    return [Choice("auto", "Automatic (GPU if available)"), Choice("cpu", "CPU"), Choice("cuda", label)]


#: Run by :class:`DeviceProbe` in a child Python: prints one JSON line, a list of GPUs or null (no torch).
PROBE_SCRIPT = (
    "import json\n"
    "try:\n"
    "    import torch\n"
    "except Exception:\n"
    "    print('UNIFUSE_GPUS null', flush=True)\n"
    "else:\n"
    "    gpus = []\n"
    "    if torch.cuda.is_available():\n"
    "        for i in range(torch.cuda.device_count()):\n"
    "            p = torch.cuda.get_device_properties(i)\n"
    "            gpus.append([i, str(p.name), p.total_memory / 2**30])\n"
    "    print('UNIFUSE_GPUS ' + json.dumps(gpus), flush=True)\n"
)
_PROBE_PREFIX = "UNIFUSE_GPUS "


def parse_probe_output(lines: Sequence[str]) -> Optional[List[GpuInfo]]:
    """GPUs from the probe's output lines; None when torch is missing there or the output is unusable."""
    for line in reversed(list(lines)):
        if line.startswith(_PROBE_PREFIX):
            try:
                data = json.loads(line[len(_PROBE_PREFIX):])
            except ValueError:
                return None
            if data is None:
                return None
            try:
                return [GpuInfo(int(i), str(name), float(mem)) for i, name, mem in data]
            except (TypeError, ValueError):
                return None
    return None


class DeviceProbe:
    """Ask PyTorch for the CUDA GPUs in a child process, without blocking and without importing torch here.

    Start it once (e.g. when the module is first entered), call :meth:`poll` from a GUI timer until it
    returns True, then read :attr:`gpus` (None when torch is not installed or the probe failed).

    Args:
        python: interpreter of the child (default: ``logic.python_executable()``, i.e. ``PythonSlicer``).
        on_done: called with :attr:`gpus` once the probe ended.
    """

    def __init__(self, python: Optional[str] = None, on_done: Optional[Callable[[Optional[List[GpuInfo]]], None]] = None,
                 env: Optional[dict] = None) -> None:
        self.python = python
        self.on_done = on_done
        self.env = env
        self.gpus: Optional[List[GpuInfo]] = None
        self.done = False
        self._lines: List[str] = []
        self._process = None

    def start(self) -> "DeviceProbe":
        from .background import CliProcess

        python = self.python
        if python is None:
            from .logic import python_executable

            python = python_executable()
        self._process = CliProcess([python, "-c", PROBE_SCRIPT], env=self.env, on_log=self._lines.append)
        try:
            self._process.start()
        except OSError:
            self._finish()
        return self

    def poll(self) -> bool:
        """True once the probe ended (results in :attr:`gpus`); never blocks."""
        if self.done:
            return True
        if self._process is None or self._process.poll() is None:
            return self._process is None
        self._finish()
        return True

    def cancel(self) -> None:
        if self._process is not None and not self.done:
            self._process.cancel(grace_s=0)

    def _finish(self) -> None:
        self.gpus = parse_probe_output(self._lines)
        self.done = True
        if self.on_done is not None:
            self.on_done(self.gpus)
