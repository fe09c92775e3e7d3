"""Linux ``/proc`` ``key: value`` files (meminfo, cpuinfo, self/status), read in one place.

psutil would do this but is not a dependency; the memory check, the benchmark's machine description and
peak-RSS measurement, and the training reports need no more than these lines. Nothing here raises: where
``/proc`` is missing (macOS, Windows) or lacks the key, the readers return None and callers fall back.
"""

from __future__ import annotations

import platform
from typing import Optional

__all__ = ["proc_value", "proc_bytes", "cpu_model"]


def proc_value(path: str, key: str) -> Optional[str]:
    """Text after ``key:`` on the first line of ``path`` whose name is ``key`` (stripped); None if absent."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                name, colon, value = line.partition(":")
                if colon and name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return None


def proc_bytes(path: str, key: str) -> Optional[int]:
    """A ``kB`` field such as ``MemAvailable`` (``/proc/meminfo``) or ``VmHWM`` (``/proc/self/status``) in bytes."""
    try:
        return int((proc_value(path, key) or "").split()[0]) * 1024
    except (IndexError, ValueError):
        return None


def cpu_model() -> str:
    """CPU model string for reports: ``model name`` of ``/proc/cpuinfo``, else what ``platform`` knows."""
    return proc_value("/proc/cpuinfo", "model name") or platform.processor() or platform.machine() or "unknown CPU"
