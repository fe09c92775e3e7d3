"""Model complexity: parameter counts per module and forward FLOPs (paper §9 / Fig. 13 reports both).

FLOP convention: 1 multiply-accumulate = 2 FLOPs (``torch.utils.flop_counter``'s convention). The forward
pass is traced on the ``meta`` device (shapes only, nothing is allocated or computed), so even the paper
config at 256³ is counted in seconds. ``FlopCounterMode`` counts matrix products and convolutions; the
selective scan's element-wise recurrence is added analytically (:func:`unifuse.model.mamba.count_scan_flops`).
Other element-wise work (activations, normalisations, grid sampling, softmax) is not counted, as in the usual
FLOP tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..config import ModelConfig
from .mamba import count_scan_flops
from .unifuse import UniFuse, build_model

__all__ = ["MODULES", "FlopReport", "parameter_counts", "forward_flops", "flop_report", "format_info"]

#: Top-level submodules of :class:`UniFuse`, in data-flow order.
MODULES = ("encoder", "dapl", "oufr", "fa", "ufrf")


def parameter_counts(model: UniFuse) -> Dict[str, int]:
    """Number of parameters per top-level module (``encoder``, ``dapl``, ``oufr``, ``fa``, ``ufrf``) and ``total``."""
    counts = {name: sum(p.numel() for p in getattr(model, name).parameters()) for name in MODULES}
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


@dataclass(frozen=True)
class FlopReport:
    """Forward FLOPs of one (1, 1, S, S, S) pair.

    Attributes:
        size: S.
        total: all counted FLOPs (= ``counted`` + ``scan``).
        counted: matrix products and convolutions seen by ``FlopCounterMode``.
        scan: analytic element-wise work of the selective scans.
        per_module: ``counted`` split by top-level module (scan work included in its module).
    """

    size: int
    total: int
    counted: int
    scan: int
    per_module: Dict[str, int]


def flop_report(cfg: ModelConfig, size: int) -> FlopReport:
    """Count the forward FLOPs of ``cfg`` at an S = ``size`` working grid (batch 1) on the meta device."""
    if size % cfg.size_multiple:
        raise ValueError(f"size {size} is not a multiple of {cfg.size_multiple} (config {cfg.name!r})")
    with torch.device("meta"):
        model = build_model(cfg)
        reference = torch.empty(1, 1, size, size, size)
        moving = torch.empty(1, 1, size, size, size)
    model.eval()
    scan_by_module: Dict[str, int] = {name: 0 for name in MODULES}
    counter = FlopCounterMode(display=False)
    with count_scan_flops() as scan_box:
        starts: Dict[str, int] = {}

        def hooks(name: str):
            def pre(_module, _inputs):
                starts[name] = scan_box[0]

            def post(_module, _inputs, _output):
                scan_by_module[name] += scan_box[0] - starts[name]

            return pre, post

        handles = []
        for name in MODULES:
            pre, post = hooks(name)
            module = getattr(model, name)
            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        try:
            with torch.no_grad(), counter:
                model(reference, moving)
        finally:
            for handle in handles:
                handle.remove()
        scan = scan_box[0]
    by_module = counter.get_flop_counts()
    per_module = {}
    for name in MODULES:
        key = f"UniFuse.{name}"
        per_module[name] = int(sum(by_module.get(key, {}).values())) + scan_by_module.get(name, 0)
    counted = int(counter.get_total_flops())
    return FlopReport(size=size, total=counted + scan, counted=counted, scan=scan, per_module=per_module)


def forward_flops(cfg: ModelConfig, size: int) -> int:
    """Total forward FLOPs (2 × MACs, scans included) of ``cfg`` on one (1, 1, S, S, S) pair, S = ``size``."""
    return flop_report(cfg, size).total


def format_info(cfg: ModelConfig, sizes: Optional[Sequence[int]] = None) -> str:
    """Human-readable summary for ``unifuse info``: parameters per module and forward GFLOPs.

    ``sizes`` defaults to the config's working size, 160 (the paper's grid) and 256 (the paper's FLOP
    figure); a size that is not a multiple of ``cfg.size_multiple`` is rounded up to one.
    """
    if sizes is None:
        sizes = sorted({cfg.working_size, 160, 256})
    with torch.device("meta"):
        model = build_model(cfg)
    params = parameter_counts(model)
    lines = [
        f"model config {cfg.name!r}: working grid {cfg.working_size}³, C={cfg.enc_channels}, Q={cfg.patch_size}, "
        f"M={cfg.embed_dim}, d_state={cfg.d_state}, J={cfg.num_regblks}, U-Net {tuple(cfg.unet_channels)}",
        f"  parameters: {params['total']:,} total",
    ]
    lines += [f"    {name:<8} {params[name]:>12,}" for name in MODULES]
    for size in sizes:
        s = size if size % cfg.size_multiple == 0 else (size // cfg.size_multiple + 1) * cfg.size_multiple
        report = flop_report(cfg, s)
        parts = ", ".join(f"{name} {report.per_module[name] / 1e9:.1f}" for name in MODULES)
        lines.append(
            f"  forward at {s}³: {report.total / 1e9:,.1f} GFLOPs (2×MACs; selective scans {report.scan / 1e9:.1f}) "
            f"[{parts}]"
        )
    return "\n".join(lines)
