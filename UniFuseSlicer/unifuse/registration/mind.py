"""MIND-SSC descriptors and a ground-truth-free alignment score, in PyTorch (CPU or CUDA).

MIND-SSC (Heinrich et al., MICCAI 2013, "Towards realtime multimodal fusion for image-guided interventions
using self-similarities") describes each voxel by how similar the patches around its six face neighbours
are to one another. With ``d`` = ``dilation`` and the six unit offsets ``n in {±e_x, ±e_y, ±e_z}``, the 12
*self-similarity context* pairs are the unordered pairs ``(a, b)`` of orthogonal offsets (``a · b = 0``,
the 12 edges of an octahedron). For an image ``I`` (replicate-padded by ``r + d`` at the volume border):

    D_ab(p)  = box_r[ (I(q + d a) - I(q + d b))^2 ](p)           mean over the (2r+1)^3 patch of q
                                                                  around p
    D'_ab(p) = D_ab(p) - min_ab D_ab(p)
    V(p)     = clamp(mean_ab D'_ab(p), 1e-3 m, 1e3 m),          m = mean_p mean_ab D'_ab (per volume)
    MIND_ab(p) = exp(-D'_ab(p) / V(p))                           in [0, 1], largest channel = 1

A constant offset leaves every ``D_ab`` unchanged and a global scale is divided out by ``V``, so the
descriptor depends on *where* intensity changes rather than on its values (inverted or remapped contrast
gives nearly the same descriptor). The centre voxel itself is never compared, which makes it robust to noise.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["mind_ssc", "alignment_score", "evaluation_mask", "descriptor_reach"]

Offset = Tuple[int, int, int]


def _ssc_pairs() -> List[Tuple[Offset, Offset]]:
    """The 12 pairs of orthogonal unit offsets (z, y, x) of the six-neighbourhood."""
    units = [tuple(s * int(i == a) for i in range(3)) for a in range(3) for s in (1, -1)]
    return [(a, b) for k, a in enumerate(units) for b in units[k + 1 :] if sum(x * y for x, y in zip(a, b)) == 0]


_PAIRS = _ssc_pairs()


def descriptor_reach(radius: int = 1, dilation: int = 2) -> int:
    """How far (voxels, along each axis) a MIND-SSC descriptor looks from its voxel: ``radius + dilation``."""
    return int(radius) + int(dilation)


def _box_valid(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over the (2r+1)^3 boxes that lie inside ``x`` (B, C, z, y, x): each axis shrinks by 2r.

    Separable running sums of shifted slices (much faster on the CPU than ``avg_pool3d`` with stride 1).
    """
    k = 2 * radius + 1
    for axis in (2, 3, 4):
        n = x.shape[axis] - 2 * radius
        total = x.narrow(axis, 0, n).clone()
        for j in range(1, k):
            total += x.narrow(axis, j, n)
        x = total
    return x / float(k**3)


def _slab_planes(shape: torch.Size, channels: int = 12) -> int:
    """z-planes per slab so that one slab (all batch items, ``channels`` float32 maps) is ~2 MiB."""
    b, _, _, h, w = (int(s) for s in shape)
    return max(1, (2 << 20) // (4 * channels * b * h * w))


def mind_ssc(image: torch.Tensor, radius: int = 1, dilation: int = 2) -> torch.Tensor:
    """MIND-SSC descriptors (module docstring) of ``image`` (B, 1, D, H, W) -> (B, 12, D, H, W) in [0, 1].

    ``radius`` is the patch half-width and ``dilation`` the neighbour distance, both in voxels of the
    image's grid. Edges: the image is replicate-padded by ``radius + dilation`` voxels, so border patches
    compare replicated values. Computed in float32 (half inputs are promoted), in z-slabs that stay in the
    CPU cache (large temporaries, not arithmetic, dominate the cost of the 12-channel maps).
    """
    if image.dim() != 5 or image.shape[1] != 1:
        raise ValueError(f"mind_ssc expects (B, 1, D, H, W); got {tuple(image.shape)}")
    if radius < 0 or dilation < 1:
        raise ValueError(f"need radius >= 0 and dilation >= 1; got {radius}, {dilation}")
    r, d = int(radius), int(dilation)
    e = r + d
    padded = F.pad(image.float(), (e,) * 6, mode="replicate")
    b, _, depth, height, width = image.shape
    out = torch.empty((b, len(_PAIRS), depth, height, width), device=image.device)
    var = torch.empty((b, 1, depth, height, width), device=image.device)
    step = _slab_planes(out.shape)
    for z0 in range(0, depth, step):
        z1 = min(z0 + step, depth)
        # rows of the r-extended output domain for planes z0..z1, then neighbours at +-d around them
        n = (z1 - z0 + 2 * r, height + 2 * r, width + 2 * r)

        def shifted(o: Offset) -> torch.Tensor:  # I(p + d o) on the r-extended slab
            z, y, x = (d + d * c for c in o)
            return padded[:, :, z0 + z : z0 + z + n[0], y : y + n[1], x : x + n[2]]

        diff = torch.empty((b, len(_PAIRS)) + n, device=image.device)
        for c, (a, b_) in enumerate(_PAIRS):
            torch.sub(shifted(a), shifted(b_), out=diff[:, c : c + 1])
        dist = _box_valid(diff.square_(), r)
        dist -= dist.amin(dim=1, keepdim=True)
        out[:, :, z0:z1] = dist
        var[:, :, z0:z1] = dist.mean(dim=1, keepdim=True)
    m = var.mean(dim=(1, 2, 3, 4), keepdim=True)
    var = torch.maximum(torch.minimum(var, 1e3 * m), 1e-3 * m).clamp_(min=1e-30)
    return out.div_(var).neg_().exp_()


def alignment_score(
    fixed: torch.Tensor,
    warped: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    radius: int = 1,
    dilation: int = 2,
) -> float:
    """Ground-truth-free misalignment: mean |MIND-SSC(fixed) - MIND-SSC(warped)| over ``mask`` (lower is better).

    Args:
        fixed, warped: (B, 1, D, H, W) volumes on the same grid (any intensities, any modality).
        mask: (B or 1, 1, D, H, W) voxels to count (bool or {0, 1}); None = all. Compare stages only with
            the same mask (see :func:`evaluation_mask`).

    Returns:
        The mean over masked voxels and the 12 channels, in [0, 1]; deterministic for given inputs.
    """
    if fixed.shape != warped.shape:
        raise ValueError(f"fixed {tuple(fixed.shape)} and warped {tuple(warped.shape)} differ")
    with torch.no_grad():
        diff = mind_ssc(fixed, radius, dilation).sub_(mind_ssc(warped, radius, dilation))
        diff = diff.abs_().mean(1, keepdim=True)
        if mask is None:
            return float(diff.mean())
        weight = (mask > 0.5).to(diff.dtype).expand_as(diff)
        count = float(weight.sum())
        if count == 0:
            raise ValueError("the evaluation mask is empty")
        return float((diff * weight).sum()) / count


def _robust_threshold(image: torch.Tensor, fraction: float) -> torch.Tensor:
    """Per batch item ``q01 + fraction * (q99 - q01)`` (percentiles of a strided subsample), (B, 1, 1, 1, 1)."""
    flat = image.reshape(image.shape[0], -1).float()
    flat = flat[:, :: max(1, flat.shape[1] // (1 << 18))]
    n = flat.shape[1]
    low = flat.kthvalue(max(1, round(0.01 * n)), dim=1).values
    high = flat.kthvalue(max(1, round(0.99 * n)), dim=1).values
    return (low + fraction * (high - low)).view(-1, 1, 1, 1, 1)


def _dilate(mask: torch.Tensor, reach: int, outside: float = 0.0) -> torch.Tensor:
    """Max over (2 reach + 1)^3 boxes of a float mask (separable); voxels beyond the volume read ``outside``."""
    x = F.pad(mask, (reach,) * 6, value=outside)
    for axis in (2, 3, 4):
        n = x.shape[axis] - 2 * reach
        total = x.narrow(axis, 0, n).clone()
        for j in range(1, 2 * reach + 1):
            torch.maximum(total, x.narrow(axis, j, n), out=total)
        x = total
    return x


def _erode(mask: torch.Tensor, reach: int) -> torch.Tensor:
    """Erode a {0, 1} float mask by a (2 reach + 1)^3 box; outside the volume counts as 0."""
    return 1.0 - _dilate(1.0 - mask, reach, outside=1.0)


def evaluation_mask(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    moving_valid: Optional[torch.Tensor] = None,
    *,
    radius: int = 1,
    dilation: int = 2,
    fraction: float = 0.05,
) -> torch.Tensor:
    """Voxels where comparing MIND-SSC descriptors of ``fixed`` and ``moving`` is meaningful (B, 1, D, H, W) bool.

    The mask is ``overlap AND foreground``:

    * overlap: ``moving_valid`` (B or 1, 1, D, H, W; 1 where the moving volume, resampled onto this grid, has
      data; None = everywhere), eroded by the descriptor reach ``radius + dilation`` voxels, with the outside
      of the grid counted as invalid — so zero-padded bands, their edges and the volume border, where
      descriptors see replicated or padded values, are excluded;
    * foreground: either volume above ``q01 + fraction * (q99 - q01)`` of its own intensities, dilated by the
      reach (the object's outer edge carries the strongest structure); constant background corners drop out.
    """
    if fixed.shape != moving.shape or fixed.dim() != 5 or fixed.shape[1] != 1:
        raise ValueError(f"need fixed, moving (B, 1, D, H, W) alike; got {tuple(fixed.shape)}, {tuple(moving.shape)}")
    reach = descriptor_reach(radius, dilation)
    with torch.no_grad():
        valid = torch.ones_like(fixed[:1], dtype=torch.float32) if moving_valid is None else moving_valid > 0.5
        overlap = _erode(valid.float(), reach)
        fg = ((fixed > _robust_threshold(fixed, fraction)) | (moving > _robust_threshold(moving, fraction))).float()
        fg = _dilate(fg, reach)
        return (overlap * fg) > 0.5
