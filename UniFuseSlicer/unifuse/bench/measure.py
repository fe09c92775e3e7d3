"""Wall time and peak memory of one benchmark step, measured inside the running process.

Memory method (Linux): before the step, memory that earlier steps freed but the C allocator kept is handed
back to the kernel (glibc ``malloc_trim(0)``; otherwise a step reusing that memory would look free), and
the kernel's resident-set high-water mark of this process is reset to the current RSS (``echo 5 > /proc/self/clear_refs``, Linux ≥ 4.0); after the step ``VmHWM`` from
``/proc/self/status`` is the **peak RSS while the step ran** (all threads, C/C++ toolkits included, sampled
by the kernel, so short peaks are not missed). :attr:`Measurement.rss_increase_mb` = that peak − the RSS at
the start: the memory the step needed on top of what the process already held (libraries, the loaded
network, the cached input volumes). Where ``clear_refs`` cannot be written (other OS, restricted container)
both values are ``nan`` and :func:`memory_method` says so. On a CUDA device the peak of
``torch.cuda.max_memory_allocated`` during the step is reported as well.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

from ..procfs import proc_bytes

__all__ = ["Measurement", "measure", "memory_method"]

_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass
class Measurement:
    """Result of :func:`measure` (filled in when the ``with`` block ends).

    Attributes:
        seconds: wall-clock time of the block (``time.perf_counter``).
        peak_rss_mb: peak resident set size of the process during the block, MiB (``nan`` if unmeasurable).
        rss_increase_mb: ``peak_rss_mb`` − RSS at the start of the block, MiB (``nan`` if unmeasurable).
        cuda_peak_mb: peak CUDA memory allocated by PyTorch during the block, MiB (None off CUDA).
    """

    seconds: float = math.nan
    peak_rss_mb: float = math.nan
    rss_increase_mb: float = math.nan
    cuda_peak_mb: Optional[float] = None

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _status_mb(key: str) -> float:
    """A ``kB`` field of ``/proc/self/status`` (e.g. ``VmRSS``, ``VmHWM``) in MiB, ``nan`` if unavailable."""
    value = proc_bytes("/proc/self/status", key)
    return math.nan if value is None else value / 2**20


def _trim_heap() -> bool:
    """Return freed heap pages to the kernel (glibc ``malloc_trim(0)``); False where there is no glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def _reset_peak() -> bool:
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_method() -> str:
    """One sentence describing how peak memory is measured on this machine (for reports)."""
    if _reset_peak() and not math.isnan(_status_mb("VmHWM")):
        return ("peak RSS of the benchmark process while the method ran, in the same process (Linux VmHWM, reset "
                "before each method via /proc/self/clear_refs after glibc malloc_trim), reported as the increase over "
                "the RSS at the method's start")
    return "not measured: resetting the peak RSS needs Linux /proc/self/clear_refs, which is not writable here"


@contextmanager
def measure(cuda_device: Optional[Any] = None) -> Iterator[Measurement]:
    """Time a block and measure its peak memory (see the module docstring).

    Args:
        cuda_device: a ``torch.device`` of type ``cuda`` to also track PyTorch's CUDA peak; None otherwise.

    Yields:
        a :class:`Measurement` whose fields are set when the block exits (also when it raises).
    """
    m = Measurement()
    use_cuda = cuda_device is not None and getattr(cuda_device, "type", "") == "cuda"
    if use_cuda:
        import torch  # lazy: the baseline child processes measure with this module, ANTs's without torch

        torch.cuda.synchronize(cuda_device)
        torch.cuda.reset_peak_memory_stats(cuda_device)
    _trim_heap()
    can_reset = _reset_peak()
    start_rss = _status_mb("VmRSS")
    t0 = time.perf_counter()
    try:
        yield m
    finally:
        if use_cuda:
            torch.cuda.synchronize(cuda_device)
            m.cuda_peak_mb = torch.cuda.max_memory_allocated(cuda_device) / 2**20
        m.seconds = time.perf_counter() - t0
        if can_reset:
            m.peak_rss_mb = _status_mb("VmHWM")
            m.rss_increase_mb = max(0.0, m.peak_rss_mb - start_rss)
