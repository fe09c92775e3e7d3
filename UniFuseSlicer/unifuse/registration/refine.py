"""Instance optimisation: refine a deformable field on the working grid with MIND-SSC and Adam.

Method (after ConvexAdam / Learn2Reg instance optimisation, written for this project):

* **Field.** The refinement is a stationary velocity field ``v`` (mm) on a control grid, made a diffeomorphic
  displacement ``exp(v)`` by scaling and squaring; two levels, control spacing 12 mm then 6 mm (the coarse
  velocity, upsampled, starts the fine level). Adam, diffusion regulariser (mean squared gradient of ``v``).
* **Result.** ``total(p) = inc(p) + initial(p + inc(p))`` with ``inc = exp(v)`` (:func:`unifuse.spatial.compose`,
  increment applied first), i.e. ``warp(moving, total) = warp(warp(moving, initial), inc)``: the previous
  stage's field is kept and refined; a non-folding ``initial`` composed with a diffeomorphism does not fold.
* **Similarity.** Mean squared difference of MIND-SSC descriptors (:mod:`.mind`) on a feature grid of
  ``feature_mm``, at a random subset of the masked voxels, each sampled at a point **jittered uniformly inside
  its voxel, afresh every iteration** (on the grid both images share, noisy descriptors prefer sub-voxel
  shifts that blur; this mattered more than any other setting). Samples whose moving position is not
  surrounded by valid moving data (``moving_valid`` eroded by the descriptor reach) get zero weight, so
  zero-padded bands and constant corners do not pull the field.
* **Re-warping.** Every ``rewarp_every`` iterations the moving volume is warped through the current total
  field and its descriptors are recomputed; in between they are sampled at ``p + (v - v_ref)(p)``, the
  first-order change of ``exp(v)`` (so no scaling and squaring in the inner loop). Only warping the
  descriptors compares locally rotated ones (the test phantom's true field rotates by up to 14 degrees): a run
  started at the true field then drifted 1.7 mm away from it, 0.3 mm with re-warping. The returned field
  is ``exp(v)`` exactly.

All fields are pull-back fields in voxels of the working grid, channels (x, y, z), shape (B, 3, D, H, W).

Threads: with other processes on the machine, 2 OpenMP threads ran many times slower until the environment
variable ``OMP_WAIT_POLICY=PASSIVE`` was set (before Python starts; this module never sets it).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..errors import CancelledError
from ..spatial import compose, identity_grid, resize_field, warp
from .mind import _erode, alignment_score, descriptor_reach, evaluation_mask, mind_ssc

__all__ = ["RefineSettings", "LevelInfo", "RefineResult", "refine_settings", "refine_field", "PRESETS"]

CANCEL_MESSAGE = "cancelled by the user; nothing was written and the inputs are unchanged"


@dataclass(frozen=True)
class RefineSettings:
    """Refinement parameters; one entry per level (coarse to fine) in the tuples."""

    control_mm: Tuple[float, ...] = (12.0, 6.0)  # velocity control-grid spacing per level (mm)
    feature_mm: Tuple[float, ...] = (3.0, 3.0)  # MIND feature-grid spacing per level (mm; >= working spacing)
    iterations: Tuple[int, ...] = (15, 30)
    learning_rate_mm: float = 0.25  # Adam step on the velocity (mm)
    smoothness: float = 0.5  # weight of the diffusion regulariser
    points: int = 8192  # similarity samples per iteration
    squaring_steps: int = 3  # at least; raised so that the first step moves <= 0.5 voxel
    mind_radius: int = 1
    mind_dilation: int = 2
    rewarp_every: int = 10  # iterations between re-warping the moving image and recomputing its descriptors
    cancel_every: int = 5


PRESETS = {
    "fast": RefineSettings(),
    "full": RefineSettings(iterations=(40, 60), points=16384),
}


def refine_settings(name: str) -> RefineSettings:
    """The preset ``"fast"`` or ``"full"`` (``"none"`` — no refinement — is the caller's business)."""
    if name not in PRESETS:
        raise ValueError(f"unknown refinement preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]


@dataclass
class LevelInfo:
    """What one pyramid level did."""

    control_shape: Tuple[int, int, int]  # (D, H, W) of the velocity control grid
    feature_shape: Tuple[int, int, int]  # (D, H, W) of the MIND feature grid
    iterations: int
    seconds: float
    loss_first: float
    loss_last: float


@dataclass
class RefineResult:
    """Output of :func:`refine_field`."""

    field: torch.Tensor  # (B, 3, D, H, W) total pull-back field, working-grid voxels, channels (x, y, z)
    score_before: float  # alignment_score with the initial field (lower is better)
    score_after: float  # alignment_score with the returned field, same mask
    iterations: int
    seconds: float
    levels: List[LevelInfo] = field(default_factory=list)


def _grid_shape(shape: Sequence[int], spacing_zyx: Sequence[float], target_mm: float) -> Tuple[int, int, int]:
    """A grid over the same extent (align_corners) with spacing ~``target_mm``, never finer than ``shape``."""
    return tuple(
        n if s >= target_mm else max(3, int(round((n - 1) * s / target_mm)) + 1) for n, s in zip(shape, spacing_zyx)
    )


def _resample(volume: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Trilinear resize over the same extent; a 3x3x3 box blur first when shrinking (anti-aliasing)."""
    if tuple(volume.shape[2:]) == tuple(shape):
        return volume
    blurred = F.avg_pool3d(F.pad(volume, (1,) * 6, mode="replicate"), 3, stride=1)
    return F.interpolate(blurred, size=tuple(shape), mode="trilinear", align_corners=True)


def _sample(table: torch.Tensor, shape: Sequence[int], pts: torch.Tensor) -> torch.Tensor:
    """Trilinear samples of a channels-last map at voxel points, border-clamped.

    Args:
        table: (B, D*H*W, C) map, row = flat index z*H*W + y*W + x.
        pts: (B or 1, N, 3) voxel coordinates (x, y, z); differentiable (the table is constant data).

    Returns:
        (B, N, C). Faster than ``grid_sample`` on the CPU for many channels at scattered points.
    """
    d, h, w = (int(s) for s in shape)
    hi = torch.tensor([w - 1, h - 1, d - 1], dtype=pts.dtype, device=pts.device)
    p = torch.minimum(pts.clamp(min=0), hi)
    p0 = torch.minimum(p.detach().floor(), (hi - 1).clamp(min=0))
    frac = p - p0
    i0 = p0.long()
    base = i0[..., 2] * (h * w) + i0[..., 1] * w + i0[..., 0]
    base = base + torch.arange(table.shape[0], device=pts.device).unsqueeze(1) * table.shape[1]
    flat = table.reshape(-1, table.shape[2])
    out = 0.0
    for dz in (0, 1):
        wz = frac[..., 2:3] if dz else 1 - frac[..., 2:3]
        for dy in (0, 1):
            wzy = wz * (frac[..., 1:2] if dy else 1 - frac[..., 1:2])
            for dx in (0, 1):
                wgt = wzy * (frac[..., 0:1] if dx else 1 - frac[..., 0:1])
                rows = flat.index_select(0, (base + (dz * h * w + dy * w + dx)).reshape(-1))
                out = out + wgt * rows.view(*base.shape, -1)
    return out


def _table(volume: torch.Tensor) -> torch.Tensor:
    """(B, C, D, H, W) -> channels-last (B, D*H*W, C) for :func:`_sample`."""
    return volume.flatten(2).transpose(1, 2).contiguous()


def _exp(v_vox: torch.Tensor, steps: int) -> torch.Tensor:
    """Scaling and squaring: displacement (voxels) of the unit-time flow of the stationary velocity ``v_vox``.

    ``u = v / 2^K``, then ``K`` times ``u <- u + u(p + u(p))``; ``K`` is raised above ``steps`` when needed
    so that the first step moves at most half a voxel.
    """
    largest = float(v_vox.detach().abs().max())
    steps = max(int(steps), int(math.ceil(math.log2(max(largest / 0.5, 1.0)))))
    u = v_vox / (2**steps)
    for _ in range(steps):
        u = compose(u, u)
    return u


def _diffusion(v_mm: torch.Tensor, spacing_zyx: Sequence[float]) -> torch.Tensor:
    """Mean over the grid of the squared forward differences of ``v`` (mm) per mm, summed over axes."""
    total = v_mm.new_zeros(())
    for axis, s in zip((2, 3, 4), spacing_zyx):
        total = total + (torch.diff(v_mm, dim=axis) / s).square().mean()
    return total


def _adam(param: torch.Tensor, grad: torch.Tensor, moments: List[torch.Tensor], step: int, lr: float) -> None:
    """One Adam step (betas 0.9, 0.999) in place. Written out because constructing ``torch.optim.Adam`` the
    first time in a process imports ``torch._dynamo``, which costs over a second."""
    m, v = moments
    m.mul_(0.9).add_(grad, alpha=0.1)
    v.mul_(0.999).addcmul_(grad, grad, value=0.001)
    denom = (v / (1 - 0.999**step)).sqrt_().add_(1e-8)
    param.addcdiv_(m, denom, value=-lr / (1 - 0.9**step))


def _xyz(values_zyx: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """Per-channel (x, y, z) factors from per-axis (z, y, x) values, shape (1, 3, 1, 1, 1)."""
    return torch.tensor(list(values_zyx)[::-1], dtype=like.dtype, device=like.device).view(1, 3, 1, 1, 1)


@dataclass
class _Level:
    """Constants of one pyramid level: feature grid, control grid, tables and sample voxels."""

    fshape: Tuple[int, int, int]  # feature grid (D, H, W)
    cshape: Tuple[int, int, int]  # velocity control grid (D, H, W)
    cspacing: List[float]  # control-grid spacing (z, y, x) in mm
    fixed: torch.Tensor  # (B, V, 12) channels-last MIND-SSC of fixed on the feature grid
    moving: torch.Tensor  # (B, 2, D, H, W) moving and its eroded valid-data mask on the feature grid
    initial: torch.Tensor  # (B, 3, D, H, W) initial field in feature voxels
    centres: torch.Tensor  # (1, N, 3) voxel coordinates (x, y, z) of the masked voxels (union over the batch)
    weight: torch.Tensor  # (B, N, 1) 1 where the voxel is in that batch item's mask


def _level(fixed, moving, initial, valid, mask, shape, spacing_zyx, control_mm, feature_mm, radius, dilation) -> _Level:
    fshape = _grid_shape(shape, spacing_zyx, feature_mm)
    cshape = _grid_shape(shape, spacing_zyx, control_mm)
    extent = [(n - 1) * s for n, s in zip(shape, spacing_zyx)]
    with torch.no_grad():
        mov_valid = _erode((_resample(valid, fshape) > 0.999).float(), descriptor_reach(radius, dilation))
        in_mask = (_resample(mask.float(), fshape) >= 0.5).float().flatten(2).transpose(1, 2)  # (B, V, 1)
        index = in_mask.amax(0)[:, 0].nonzero().squeeze(1)
        if index.numel() == 0:
            raise ValueError("the refinement mask is empty")
        return _Level(
            fshape=fshape,
            cshape=cshape,
            cspacing=[e / (n - 1) for n, e in zip(cshape, extent)],
            fixed=_table(mind_ssc(_resample(fixed, fshape), radius, dilation)),
            moving=torch.cat([_resample(moving, fshape), mov_valid.expand(moving.shape[0], -1, -1, -1, -1)], 1),
            initial=resize_field(initial, fshape),
            centres=identity_grid(fshape, device=fixed.device).flatten(2).transpose(1, 2)[:, index],
            weight=in_mask[:, index],
        )


def _at(u: torch.Tensor, pts: torch.Tensor, lv: _Level) -> torch.Tensor:
    """Control-grid field ``u`` (B, 3, *cshape), control voxels, at feature-voxel points (1, N, 3).

    Returns (B, N, 3) in feature voxels.
    """
    scale = torch.tensor([2.0 / (n - 1) for n in lv.fshape][::-1], dtype=pts.dtype, device=pts.device)
    grid = (pts * scale - 1.0).view(1, -1, 1, 1, 3).expand(u.shape[0], -1, -1, -1, -1)
    to_feat = torch.tensor([(f - 1) / (c - 1) for f, c in zip(lv.fshape, lv.cshape)][::-1], dtype=pts.dtype,
                           device=pts.device)
    return F.grid_sample(u, grid, align_corners=True, padding_mode="border").flatten(2).transpose(1, 2) * to_feat


def _rewarp(lv: _Level, v_mm: torch.Tensor, steps: int, radius: int, dilation: int) -> torch.Tensor:
    """(B, V, 13) table: MIND-SSC of ``warp(moving, compose(initial, exp(v)))`` and the warped valid-data mask."""
    with torch.no_grad():
        inc = resize_field(_exp(v_mm / _xyz(lv.cspacing, v_mm), steps), lv.fshape)
        warped = warp(lv.moving, compose(lv.initial, inc))
        return _table(torch.cat([mind_ssc(warped[:, :1], radius, dilation), warped[:, 1:]], 1))


def refine_field(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    initial: Optional[torch.Tensor] = None,
    *,
    spacing_mm: Sequence[float],
    mask: Optional[torch.Tensor] = None,
    moving_valid: Optional[torch.Tensor] = None,
    settings: RefineSettings,
    cancel: Optional[Callable[[], bool]] = None,
    generator: Optional[torch.Generator] = None,
) -> RefineResult:
    """Refine the alignment of ``moving`` onto ``fixed`` by instance optimisation (module docstring).

    Args:
        fixed, moving: (B, 1, D, H, W) volumes on the working grid (moving already through the global
            transform), any intensities/modalities.
        initial: (B or 1, 3, D, H, W) previous deformable field, working-grid voxels; None = zero.
        spacing_mm: working-grid spacing (sx, sy, sz) in mm.
        mask: (B or 1, 1, D, H, W) voxels where the similarity counts and the scores are measured; None =
            :func:`evaluation_mask` of fixed, moving and ``moving_valid``.
        moving_valid: (B or 1, 1, D, H, W) 1 where the resampled moving volume has data; None = everywhere.
        settings: :func:`refine_settings` preset or a custom :class:`RefineSettings`.
        cancel: polled every ``settings.cancel_every`` iterations; True raises :class:`CancelledError`.
        generator: random source for the sampling (default: a fixed seed, so runs are reproducible).

    Returns:
        :class:`RefineResult`; its field is the total field (initial composed with the increment).
    """
    start = time.perf_counter()
    if fixed.dim() != 5 or fixed.shape[1] != 1 or moving.shape != fixed.shape:
        raise ValueError(f"need fixed, moving (B, 1, D, H, W) alike; got {tuple(fixed.shape)}, {tuple(moving.shape)}")
    levels = len(settings.iterations)
    if not levels or not len(settings.control_mm) == len(settings.feature_mm) == levels or len(spacing_mm) != 3:
        raise ValueError("need spacing (sx, sy, sz) and one control_mm, feature_mm, iterations entry per level")
    batch, device, shape = fixed.shape[0], fixed.device, tuple(fixed.shape[2:])
    fixed, moving = fixed.float(), moving.float()
    initial = torch.zeros((1, 3) + shape, device=device) if initial is None else initial.float()
    if initial.shape[1:] != (3,) + shape or initial.shape[0] not in (1, batch):
        raise ValueError(f"initial must be (B, 3, {shape}); got {tuple(initial.shape)}")
    initial = initial.expand(batch, -1, -1, -1, -1)
    valid = torch.ones_like(fixed) if moving_valid is None else (moving_valid > 0.5).float().expand_as(fixed)
    radius, dilation, steps = settings.mind_radius, settings.mind_dilation, settings.squaring_steps
    mask = evaluation_mask(fixed, moving, valid, radius=radius, dilation=dilation) if mask is None else mask > 0.5
    if generator is None:
        generator = torch.Generator(device="cpu").manual_seed(0)

    def check_cancel() -> None:
        if cancel is not None and cancel():
            raise CancelledError(CANCEL_MESSAGE)

    check_cancel()
    score_before = alignment_score(fixed, warp(moving, initial), mask, radius, dilation)
    spacing_zyx = [float(s) for s in spacing_mm][::-1]
    v_mm: Optional[torch.Tensor] = None
    infos: List[LevelInfo] = []
    for level in range(levels):
        t0 = time.perf_counter()
        lv = _level(fixed, moving, initial, valid, mask, shape, spacing_zyx, settings.control_mm[level],
                    settings.feature_mm[level], radius, dilation)
        if v_mm is None:
            v_mm = torch.zeros((batch, 3) + lv.cshape, device=device)
        else:
            v_mm = F.interpolate(v_mm.detach(), size=lv.cshape, mode="trilinear", align_corners=True)
        v_mm.requires_grad_(True)
        moments = [torch.zeros_like(v_mm), torch.zeros_like(v_mm)]
        losses: List[float] = []
        count = lv.centres.shape[1]
        for it in range(settings.iterations[level]):
            if it % settings.cancel_every == 0:
                check_cancel()
            if it % settings.rewarp_every == 0:
                v_ref = v_mm.detach().clone()
                table = _rewarp(lv, v_ref, steps, radius, dilation)
            n = min(settings.points, count)
            pick = torch.randint(count, (n,), generator=generator, device=generator.device).sort().values.to(device)
            jitter = (torch.rand((1, n, 3), generator=generator, device=generator.device) - 0.5).to(device)
            p = lv.centres[:, pick]  # (1, n, 3) feature voxels (x, y, z)
            change = _at((v_mm - v_ref) / _xyz(lv.cspacing, v_mm), p, lv)  # ~ exp(v) - exp(v_ref)
            with torch.no_grad():
                f_val = _sample(lv.fixed, lv.fshape, p + jitter)
            m_val = _sample(table, lv.fshape, p + jitter + change)
            w = lv.weight[:, pick] * (m_val[..., -1:].detach() > 0.999)  # mask and all 8 moving corners valid
            sim = ((f_val - m_val[..., :-1]).square().mean(-1, keepdim=True) * w).sum() / w.sum().clamp(min=1.0)
            loss = sim + settings.smoothness * _diffusion(v_mm, lv.cspacing)
            (grad,) = torch.autograd.grad(loss, v_mm)
            with torch.no_grad():
                _adam(v_mm, grad, moments, it + 1, settings.learning_rate_mm)
            losses.append(float(loss.detach()))
        first, last = (losses[0], losses[-1]) if losses else (0.0, 0.0)
        infos.append(LevelInfo(lv.cshape, lv.fshape, len(losses), time.perf_counter() - t0, first, last))
    check_cancel()
    with torch.no_grad():
        v_vox = resize_field(v_mm.detach() / _xyz(lv.cspacing, v_mm), shape)  # control voxels -> working voxels
        total = compose(initial, _exp(v_vox, steps))
        score_after = alignment_score(fixed, warp(moving, total), mask, radius, dilation)
    return RefineResult(total, score_before, score_after, sum(i.iterations for i in infos),
                        time.perf_counter() - start, infos)
