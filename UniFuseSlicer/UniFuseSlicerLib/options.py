"""Choices offered by the module GUI (degradation, device, overlay), as plain data with labels.

Values are exactly the strings the core (``unifuse.fuse``) and its CLI accept; labels are what the GUI
shows. Nothing here imports Qt; :func:`device_choices` imports torch only when it is installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

from unifuse.config import DEGRADATION_CLASSES

__all__ = [
    "Choice",
    "DEGRADATION_CHOICES",
    "OVERLAY_CHOICES",
    "degradation_values",
    "device_choices",
    "torch_cuda_devices",
]


@dataclass(frozen=True)
class Choice:
    """One entry of a combo box: ``value`` is passed to the core, ``label`` is shown."""

    value: str
    label: str


#: Degradation of the moving volume; "auto" lets the network's classifier decide.
DEGRADATION_CHOICES: Tuple[Choice, ...] = (
    Choice("auto", "Automatic (detect)"),
    Choice("none", "None (clean moving volume)"),
    Choice("motion", "MRI motion artifacts"),
    Choice("metal", "CT metal artifacts + noise"),
    Choice("lowdose", "Low-dose PET noise"),
)

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
    values = [c.value for c in DEGRADATION_CHOICES]
    if values[1:] != list(DEGRADATION_CLASSES):
        raise RuntimeError(f"degradation choices {values} are out of sync with unifuse.config {DEGRADATION_CLASSES}")
    return values



def torch_cuda_devices() -> List[Tuple[int, str, float]]:
    """CUDA GPUs visible to PyTorch as (index, name, memory in GiB); empty without torch or without CUDA."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    devices = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        devices.append((index, str(props.name), props.total_memory / 2**30))
    return devices


def device_choices() -> List[Choice]:
    """Device combo entries: automatic, CPU, and the first CUDA GPU with its name and memory when present.

    The core and the CLI accept ``auto``, ``cpu`` and ``cuda`` (= the first GPU); further GPUs are listed in
    the GPU entry's label so users know which one is used.
    """
    gpus = torch_cuda_devices()
    choices = [Choice("auto", "Automatic (GPU if available)" if gpus else "Automatic (CPU: no CUDA GPU found)"),
               Choice("cpu", "CPU")]
    if gpus:
        index, name, memory = gpus[0]
        label = f"GPU {index}: {name} ({memory:.1f} GiB)"
        if len(gpus) > 1:
            label += f" (+{len(gpus) - 1} more; select with CUDA_VISIBLE_DEVICES)"
        choices.append(Choice("cuda", label))
    return choices
