"""Memory budget of a UniFuse run: how much memory is free, how much each stage needs, what to do if short.

The pipeline (:func:`unifuse.pipeline.fuse`) works in two places with very different memory needs:

* **the network** (and the refinement) run on the working grid (spacing in mm over the overlap of both
  volumes, :mod:`unifuse.working_grid`); its peak memory grows with the number of working voxels and the
  widths of the network (:func:`estimate_network_bytes`, evaluated at the cube of equal voxel count). When
  the requested spacing does not fit the budget (:func:`network_budget_bytes`: free RAM on the CPU, free GPU
  memory on CUDA), the spacing is coarsened until it does. The grid still covers the whole overlap (only
  its voxels get coarser), and the final warp is at full reference resolution, so no anatomy is cropped.
* **the reference grid** (warp, displacement field, Jacobian, error maps, outputs) grows with the number of
  reference voxels, not with S (:func:`estimate_reference_stage_bytes`). The alignment-error maps, the
  most memory-hungry step (MIND descriptors), are computed on a coarser grid covering the same field of
  view when the reference has more than :func:`error_map_voxel_limit` voxels (:func:`coarser_grid`).

Calibration (``python -m unifuse.resources CONFIG SIZE...`` re-measures; numbers in
``docs/troubleshooting.md``): peak resident memory of one ``torch.inference_mode`` forward pass in a fresh
process on the CPU (2 threads, torch 2.13), minus the resident memory before the call:

=========  =====  =====  =====  =====  ======  ======
config     16³    32³    48³    64³    96³     128³
=========  =====  =====  =====  =====  ======  ======
tiny       37     128    191    176    --      1062   MiB
default    37     117    190    181    532     1197   MiB
paper      --     102    254    535    --      --     MiB
=========  =====  =====  =====  =====  ======  ======

The growth per working voxel (slope between the two largest sizes) is 506 B (tiny), 576–590 B (default)
and 1950 B (paper), i.e. ~63–73 B per voxel per channel of the widest full-resolution layer
(``max(enc_channels, unet_channels[0])``: 8, 8, 32). Below ~64³ a fixed ~100–200 MiB (thread pools,
oneDNN scratch space) dominates. The model is therefore ``NETWORK_FIXED_BYTES +
NETWORK_BYTES_PER_VOXEL_CHANNEL * width * S³`` with the largest measured per-channel slope, so it never
underestimates these measurements. On CUDA the same tensors are allocated (convolutions need less
scratch than CPU im2col), so the CPU model is a conservative estimate there; a CUDA out-of-memory that still
happens is caught by the pipeline and retried at coarser spacings (:func:`unifuse.pipeline.network_attempts`,
:func:`is_out_of_memory`).

torch (and the model) are imported inside the CUDA branches: the Slicer module reaches this module through
:mod:`unifuse.io` and must open without torch. psutil is optional.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import subprocess
import sys
from typing import Any, List, Optional, Union

import numpy as np
import SimpleITK as sitk

from .config import ModelConfig, get_config
from .procfs import proc_bytes

__all__ = [
    "GiB",
    "MiB",
    "NETWORK_FIXED_BYTES",
    "NETWORK_BYTES_PER_VOXEL_CHANNEL",
    "NETWORK_BUDGET_FRACTION",
    "REFERENCE_BYTES_PER_VOXEL",
    "MOVING_BYTES_PER_VOXEL",
    "ERROR_MAP_BYTES_PER_VOXEL",
    "ERROR_MAP_MAX_VOXELS",
    "available_memory_bytes",
    "network_budget_bytes",
    "estimate_network_bytes",
    "estimate_reference_stage_bytes",
    "is_out_of_memory",
    "error_map_voxel_limit",
    "coarser_grid",
    "format_bytes",
    "measure_network_peak_bytes",
]

MiB = 1 << 20
GiB = 1 << 30

#: Size-independent part of the network's inference memory (measured 100–200 MiB, rounded up).
NETWORK_FIXED_BYTES: int = 256 * MiB
#: Bytes per working-grid voxel per channel of the widest full-resolution layer (largest measured slope:
#: 590 B / 8 channels for the ``default`` network = 73.8, rounded up).
NETWORK_BYTES_PER_VOXEL_CHANNEL: float = 74.0
#: Share of the free memory the network may plan to use (the rest is head room for the allocator and
#: for everything else running on the machine).
NETWORK_BUDGET_FRACTION: float = 0.8

#: Peak bytes per *reference* voxel of the reference-grid stages of :func:`unifuse.pipeline.fuse` and of
#: :meth:`~unifuse.pipeline.FusionResult.save`, error maps aside: the float32 working copy (4), the outputs —
#: fused, aligned, Jacobian, two error maps (4 each) and the float32 displacement field (12) — and transients
#: (Jacobian slabs, resampling, the NIfTI writer's copy). Measured on a 512x512x600 int16 CT (157M voxels):
#: 41 B/voxel in ``fuse``, 47 B/voxel while saving; see docs/troubleshooting.md. The fusion at the reference
#: resolution (the normalised reference and aligned copies, the blended sums and the restored output) raised
#: the peak: 5.46 GiB measured in ``fuse`` on a 512x512x300 CT (78.6M voxels, PET at half resolution), where
#: 48 B/voxel estimated 5.25 GiB; hence 52.
REFERENCE_BYTES_PER_VOXEL: float = 52.0
#: Peak bytes per *moving* voxel: the float32 working copy plus the original as read from disk (<= 8).
MOVING_BYTES_PER_VOXEL: float = 12.0
#: Peak bytes per voxel of :func:`unifuse.error_maps.alignment_error_maps` on its grid (three float32
#: inputs, two float16 six-channel MIND descriptors and their float32 construction temporaries, masks, two
#: float32 maps): measured 83 B/voxel at 160³ and 88 B/voxel at 256³, rounded up.
ERROR_MAP_BYTES_PER_VOXEL: float = 96.0
#: Error maps are computed at full reference resolution up to this many voxels (256³); beyond, on a
#: coarser grid over the same field of view, then resampled to the reference grid.
ERROR_MAP_MAX_VOXELS: int = 256**3


def format_bytes(n: float) -> str:
    """``1.5 GiB`` / ``320 MiB`` style text for messages."""
    return f"{n / GiB:.1f} GiB" if abs(n) >= GiB else f"{n / MiB:.0f} MiB"


# --------------------------------------------------------------------------------------------------------
# free memory


def _windows_mem_available() -> Optional[int]:
    class MemoryStatusEx(ctypes.Structure):
        _fields_ = [
            ("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong),
            ("ullTotalPhys", ctypes.c_ulonglong), ("ullAvailPhys", ctypes.c_ulonglong),
            ("ullTotalPageFile", ctypes.c_ulonglong), ("ullAvailPageFile", ctypes.c_ulonglong),
            ("ullTotalVirtual", ctypes.c_ulonglong), ("ullAvailVirtual", ctypes.c_ulonglong),
            ("sullAvailExtendedVirtual", ctypes.c_ulonglong),
        ]

    status = MemoryStatusEx()
    status.dwLength = ctypes.sizeof(MemoryStatusEx)
    if not ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):  # type: ignore[attr-defined]
        return None
    return int(status.ullAvailPhys)


def _ram_available() -> int:
    try:
        import psutil  # optional; the most portable answer when installed

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    value = proc_bytes("/proc/meminfo", "MemAvailable")
    if value is None and sys.platform == "win32":
        value = _windows_mem_available()
    if value is None:  # e.g. macOS without psutil: assume half of the physical memory is usable
        try:
            value = int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")) // 2
        except (ValueError, OSError, AttributeError):
            value = 4 * GiB
    return value


def available_memory_bytes(device: Union[str, Any] = "cpu") -> int:
    """Memory that a new allocation on ``device`` can use now, in bytes.

    * CPU: ``MemAvailable`` of ``/proc/meminfo`` (free + reclaimable page cache) on Linux, or
      ``psutil.virtual_memory().available`` when psutil is installed, ``GlobalMemoryStatusEx`` on Windows;
      half the physical memory as a last resort.
    * CUDA: free device memory from ``torch.cuda.mem_get_info`` plus what PyTorch's caching allocator holds
      reserved but unused (it is reused before new device memory is requested).

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device``.
    """
    dev = str(device)
    if dev.startswith("cuda"):
        import torch

        index = torch.device(dev).index
        index = torch.cuda.current_device() if index is None else index
        free, _total = torch.cuda.mem_get_info(index)
        cached = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
        return int(free + max(cached, 0))
    return _ram_available()


def network_budget_bytes(device: Union[str, Any] = "cpu") -> int:
    """The memory the network stage may plan for: ``NETWORK_BUDGET_FRACTION`` of the free memory."""
    return int(NETWORK_BUDGET_FRACTION * available_memory_bytes(device))


# --------------------------------------------------------------------------------------------------------
# estimates


def _widest_full_resolution_channels(cfg: ModelConfig) -> int:
    return int(max(cfg.enc_channels, cfg.unet_channels[0]))


def estimate_network_bytes(cfg: ModelConfig, size: int) -> int:
    """Estimated peak memory (bytes) of one inference pass of the ``cfg`` network on an S³ grid.

    ``NETWORK_FIXED_BYTES + NETWORK_BYTES_PER_VOXEL_CHANNEL * max(enc_channels, unet_channels[0]) * S³``
    (calibration in the module docstring). Batch size 1, float32, no gradients.
    """
    voxels = float(size) ** 3
    return int(NETWORK_FIXED_BYTES + NETWORK_BYTES_PER_VOXEL_CHANNEL * _widest_full_resolution_channels(cfg) * voxels)


def estimate_reference_stage_bytes(reference_voxels: int, moving_voxels: int) -> int:
    """Estimated peak memory (bytes) of the pipeline outside the network (and of saving its outputs).

    ``REFERENCE_BYTES_PER_VOXEL * N_ref + MOVING_BYTES_PER_VOXEL * N_mov + ERROR_MAP_BYTES_PER_VOXEL *
    min(N_ref, ERROR_MAP_MAX_VOXELS)`` — the error maps never use more than ``ERROR_MAP_MAX_VOXELS`` voxels.
    Checked against measurements (int16 CT reference, moving at half resolution): 2.83 GB estimated vs
    2.58 GB measured in ``fuse`` for a 320x320x240 reference; 9.4 GB vs 7.4 GB (peak while saving) for
    512x512x600.
    """
    maps = ERROR_MAP_BYTES_PER_VOXEL * min(int(reference_voxels), ERROR_MAP_MAX_VOXELS)
    return int(REFERENCE_BYTES_PER_VOXEL * reference_voxels + MOVING_BYTES_PER_VOXEL * moving_voxels + maps)


_OOM_PATTERN = re.compile(r"out of memory|can't allocate memory|not enough memory|cannot allocate memory", re.I)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` means that an allocation failed: ``torch.OutOfMemoryError`` (CUDA, also named
    ``torch.cuda.OutOfMemoryError``), ``MemoryError``, or a ``RuntimeError`` from PyTorch's CPU allocator
    ("DefaultCPUAllocator: can't allocate memory", "not enough memory")."""
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):
        pass
    return isinstance(exc, RuntimeError) and bool(_OOM_PATTERN.search(str(exc)))


# --------------------------------------------------------------------------------------------------------
# error-map grid


def error_map_voxel_limit(budget_bytes: Optional[int] = None) -> int:
    """Largest grid (voxels) the error maps are computed on: ``ERROR_MAP_MAX_VOXELS``, or fewer when
    ``budget_bytes / ERROR_MAP_BYTES_PER_VOXEL`` is smaller (the budget never takes it below 64³)."""
    limit = ERROR_MAP_MAX_VOXELS
    if budget_bytes is not None:
        limit = min(limit, max(int(budget_bytes / ERROR_MAP_BYTES_PER_VOXEL), 64**3))
    return int(limit)


def coarser_grid(image: sitk.Image, max_voxels: int) -> Optional[sitk.Image]:
    """A grid over exactly the same field of view as ``image`` with at most ``max_voxels`` voxels.

    Same direction cosines; every axis keeps its voxel-extent box ``[origin - s/2, origin + (n - 1/2) s]``
    (in index directions), with ``n' = max(floor(n / f), 1)`` voxels, ``f = (N / max_voxels)^(1/3)``, and spacing
    ``s' = s n / n'``. Returns None when ``image`` already has at most ``max_voxels`` voxels.

    Returns:
        An all-zero uint8 image with that geometry (its pixels are not meant to be used), or None.
    """
    size = np.asarray(image.GetSize(), dtype=np.float64)
    total = float(np.prod(size))
    if total <= max_voxels:
        return None
    factor = (total / float(max_voxels)) ** (1.0 / 3.0)
    new_size = np.maximum(np.floor(size / factor), 1.0)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    new_spacing = spacing * size / new_size
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    origin = np.asarray(image.GetOrigin(), dtype=np.float64) + direction @ ((new_spacing - spacing) / 2.0)
    grid = sitk.Image([int(v) for v in new_size], sitk.sitkUInt8)
    grid.SetSpacing(new_spacing.tolist())
    grid.SetOrigin(origin.tolist())
    grid.SetDirection(direction.ravel().tolist())
    return grid


# --------------------------------------------------------------------------------------------------------
# calibration


_MEASURE_SCRIPT = r"""
import json, sys, torch
from unifuse.config import ModelConfig
from unifuse.model import build_model
from unifuse.procfs import proc_bytes
cfg = ModelConfig.from_dict(json.loads(sys.argv[1])); s = int(sys.argv[2]); torch.set_num_threads(int(sys.argv[3]))
model = build_model(cfg).eval()
x, y = torch.rand(1, 1, s, s, s), torch.rand(1, 1, s, s, s)
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
before = proc_bytes("/proc/self/status", "VmRSS")
with torch.inference_mode():
    model(x, y)
print(proc_bytes("/proc/self/status", "VmHWM") - before)
"""


def measure_network_peak_bytes(cfg: ModelConfig, size: int, device: str = "cpu", threads: int = 2) -> int:
    """Measure the peak memory of one inference pass (bytes) — the numbers behind the estimate.

    CPU: runs the pass in a fresh Python process and reads the peak resident set size (``VmHWM`` after a
    reset, Linux only) minus the resident size just before the pass. CUDA: ``torch.cuda.max_memory_allocated``
    around the pass in this process.
    """
    if str(device).startswith("cuda"):
        import torch

        from .model import build_model

        dev = torch.device(device)
        model = build_model(cfg).to(dev).eval()
        x = torch.rand(1, 1, size, size, size, device=dev)
        y = torch.rand(1, 1, size, size, size, device=dev)
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        with torch.inference_mode():
            model(x, y)
        torch.cuda.synchronize(dev)
        return int(torch.cuda.max_memory_allocated(dev) - base)
    if not sys.platform.startswith("linux"):
        raise NotImplementedError("CPU peak-memory measurement reads /proc and works on Linux only")

    out = subprocess.run(
        [sys.executable, "-c", _MEASURE_SCRIPT, json.dumps(cfg.to_dict()), str(int(size)), str(int(threads))],
        check=True, capture_output=True, text=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


def _main(argv: Optional[List[str]] = None) -> int:
    """``python -m unifuse.resources CONFIG SIZE [SIZE ...] [--device cuda]``: measured vs estimated."""
    parser = argparse.ArgumentParser(prog="python -m unifuse.resources", description=_main.__doc__)
    parser.add_argument("config")
    parser.add_argument("sizes", type=int, nargs="+")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    cfg = get_config(args.config)
    print(f"{'size':>6} {'measured':>12} {'estimated':>12} {'B/voxel':>9}")
    for s in args.sizes:
        peak = measure_network_peak_bytes(cfg, s, args.device)
        estimate = estimate_network_bytes(cfg, s)
        print(f"{s:>5}³ {format_bytes(peak):>12} {format_bytes(estimate):>12} {peak / s**3:>9.0f}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(_main())
