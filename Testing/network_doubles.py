"""Test doubles with the interface the pipeline uses of :class:`unifuse.model.UniFuse`.

``analyse`` -> ``resolve_degradation`` -> ``predict_field`` -> ``token_maps`` -> (native fusion)
``fusion_guidance`` / ``fuse_patch``; fields are pull-back, working-grid voxels, channels (x, y, z), shape
(1, 3, D, H, W).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable, Optional

import torch


FieldFn = Callable[[torch.Tensor], torch.Tensor]


def zero_field(fixed: torch.Tensor) -> torch.Tensor:
    return torch.zeros(1, 3, *fixed.shape[2:])


class FieldNet(torch.nn.Module):
    """Returns ``field_fn(fixed)`` as its field, averages reference and aligned moving as its fusion, and records
    what it saw (``seen``: inputs, degradation; ``grids``: every working-grid shape it ran on).

    Args:
        field_fn: the field for a given fixed volume (default: zero).
        probs: the classifier's probabilities.
        oom_above: raise ``torch.cuda.OutOfMemoryError`` for grids of more voxels than this (None: never).
    """

    def __init__(self, field_fn: Optional[FieldFn] = None, probs=(0.1, 0.7, 0.1, 0.1), oom_above: Optional[int] = None):
        super().__init__()
        self.field_fn = field_fn or zero_field
        self.register_buffer("p", torch.tensor([probs]))
        self.oom_above = oom_above
        self.seen: dict = {}
        self.grids: list = []
        self.fused_with: Optional[torch.Tensor] = None

    def analyse(self, reference: torch.Tensor, moving: torch.Tensor) -> SimpleNamespace:
        shape = tuple(reference.shape[2:])
        self.grids.append(shape)
        if self.oom_above is not None and reference.numel() > self.oom_above:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {reference.numel() * 4096} bytes")
        self.seen = {"reference": reference.clone(), "moving": moving.clone()}
        return SimpleNamespace(reference=reference, moving=moving, dapl=SimpleNamespace(probs=self.p.clone(), prompt=None))

    def resolve_degradation(self, degradation, probs):
        self.seen["degradation"] = degradation
        if degradation is None or degradation.is_floating_point():
            return probs if degradation is None else degradation.to(probs.dtype)
        return torch.nn.functional.one_hot(degradation, probs.shape[1]).to(probs.dtype)

    def predict_field(self, a: SimpleNamespace, p: torch.Tensor) -> torch.Tensor:
        return self.field_fn(a.reference).to(a.reference)

    fusion_multiple = 1

    def token_maps(self, a: SimpleNamespace, u: torch.Tensor) -> torch.Tensor:
        self.fused_with = u.clone()
        return torch.zeros(1, 1, 1, 1, 1, device=u.device)

    def fusion_guidance(self, prompt, p: torch.Tensor) -> torch.Tensor:
        return p

    def fuse_patch(self, reference, aligned, tokens, guidance, p) -> torch.Tensor:
        return (reference + aligned) / 2
