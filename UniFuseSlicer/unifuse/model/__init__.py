"""The UniFuse 3D network (paper §3; our reading in ``docs/network.md``).

``build_model(cfg)`` builds :class:`UniFuse`; calling it on a (reference, moving) pair of (B, 1, S, S, S)
volumes returns a :class:`UniFuseOutput`. Submodules: :mod:`.mamba` (S6 selective scan), :mod:`.dapl`,
:mod:`.oufr`, :mod:`.alignment` (RegBLK / FA), :mod:`.fusion` (ALSN / UFR&F), :mod:`.complexity`.
"""

from __future__ import annotations

from .mamba import MambaBlock, selective_scan
from .unifuse import UniFuse, UniFuseOutput, build_model

__all__ = ["UniFuse", "UniFuseOutput", "build_model", "MambaBlock", "selective_scan"]
