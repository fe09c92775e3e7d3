"""UFR&F at the reference's own resolution: the fusion U-Net run in overlapping patches with Gaussian blending.

The network's analysis (shared encoder, DAPL, OUFR) and its field run on the working grid (millimetres,
:mod:`unifuse.working_grid`); everything the fusion needs from there is small: the prompt P̂, the class
weights p and the unified token maps (2M channels at working spacing × Q). The fusion itself is fully
convolutional, so it runs on the reference grid (or a coarser cap), fed by

* the reference, normalised to [0, 1];
* the moving volume warped **once** through the final composed transform onto that grid (the ``aligned``
  output), normalised with the moving volume's own normalisation;
* the token maps sampled at the centres of the U-Net's bottleneck voxels of each patch (trilinear, in
  physical space: reference index -> LPS mm -> working index -> token index).

Patches of at most ``patch`` voxels per edge (a multiple of the U-Net's 2^(K-1); :func:`tiling`) overlap by
at least ``overlap`` voxels and are blended with a Gaussian importance map (σ = 0.125 × edge, as MONAI's ``sliding_window_inference`` with
``mode="gaussian"``; written here because MONAI is not a runtime dependency of the Slicer extension: a
45-line loop does not justify one), so memory is bounded by the patch, not the volume.

Array order is (z, y, x); index vectors and the affine maps below are (x, y, z), as SimpleITK's.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .geometry import index_to_physical_matrix

__all__ = ["fast_precision", "index_to_index_affine", "tiling", "gaussian_importance", "fuse_native", "fusion_grid"]


#: A patch whose normalised reference and aligned moving values are all at or below this is background in
#: both; it is filled with the network's output on an empty patch instead of being computed.
BACKGROUND = 0.02


def fast_precision(device: torch.device) -> Optional[torch.dtype]:
    """The reduced precision the fusion runs in on ``device``, or None (float32).

    bfloat16 where the hardware computes it natively (CUDA with bf16, x86 CPUs with AVX512-BF16): measured on
    this project's 2-core AMD EPYC, a 96³ UFR&F patch took 1.09 s in bf16 against 2.30 s in float32, and the
    fused head of the real-anatomy validation changed by at most a few 1e-3 of the intensity range
    (docs/benchmark.md). Elsewhere bf16 is emulated and slower, so float32.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    supported = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    return torch.bfloat16 if device.type == "cpu" and supported() else None


def index_to_index_affine(source: sitk.Image, target: sitk.Image) -> np.ndarray:
    """The 3×4 affine (x, y, z) mapping continuous indices of ``source`` to continuous indices of ``target``
    through physical (LPS mm) space: ``i_t = A[:, :3] @ i_s + A[:, 3]``."""
    m_s, o_s = index_to_physical_matrix(source), np.asarray(source.GetOrigin(), dtype=np.float64)
    m_t, o_t = index_to_physical_matrix(target), np.asarray(target.GetOrigin(), dtype=np.float64)
    m_t_inv = np.linalg.inv(m_t)
    return np.concatenate([m_t_inv @ m_s, (m_t_inv @ (o_s - o_t))[:, None]], axis=1)


def tiling(size: int, max_edge: int, overlap: int, multiple: int) -> Tuple[int, List[int]]:
    """Tiles covering ``0..size-1``: the fewest tiles of edge <= ``max_edge`` (a multiple of ``multiple``)
    whose neighbours share at least ``overlap`` voxels, evenly spaced; returns (edge, starts).

    The edge is as small as that count allows, so a 160-voxel axis with ``max_edge`` 128 and ``overlap`` 32
    is two tiles of 96 (192 voxels computed, 1.2×), not 128-voxel tiles stepping by 96 (256, 1.6×). An axis
    shorter than one tile is one tile of ``size`` rounded up to ``multiple`` (the caller pads).
    """
    round_up = lambda n: -(-int(n) // multiple) * multiple  # noqa: E731
    max_edge = max(multiple, max_edge // multiple * multiple)
    if size <= max_edge:
        return round_up(size), [0]
    overlap = min(overlap, max_edge - multiple)
    count = math.ceil((size - overlap) / (max_edge - overlap))
    edge = min(max_edge, round_up(math.ceil((size + (count - 1) * overlap) / count)))
    return edge, [round(i * (size - edge) / (count - 1)) for i in range(count)]


def gaussian_importance(shape: Sequence[int], sigma_scale: float = 0.125, device=None) -> torch.Tensor:
    """(D, H, W) separable Gaussian weights centred on the patch, σ = ``sigma_scale`` × edge, peak 1, floored
    at 1e-3 (so patch borders still count where no other patch reaches)."""
    axes = []
    for n in shape:
        x = torch.arange(n, dtype=torch.float32, device=device) - (n - 1) / 2.0
        axes.append(torch.exp(-0.5 * (x / max(sigma_scale * n, 1e-6)) ** 2))
    w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return (w / w.max()).clamp_min(1e-3)


def fusion_grid(reference: sitk.Image, cap_mm: float) -> sitk.Image:
    """The grid the fusion runs on: the reference grid, or — when ``cap_mm`` > 0 and the reference is finer —
    the same box (origin corner, direction, extent) at no finer than ``cap_mm`` per axis."""
    spacing = np.asarray(reference.GetSpacing(), dtype=np.float64)
    if cap_mm <= 0 or np.all(spacing >= cap_mm - 1e-9):
        return reference
    new_spacing = np.maximum(spacing, cap_mm)
    extent = spacing * np.asarray(reference.GetSize())
    size = np.maximum(1, np.floor(extent / new_spacing + 1e-6)).astype(int)  # spacing never finer than the cap
    new_spacing = extent / size
    d = np.asarray(reference.GetDirection()).reshape(3, 3)
    corner = np.asarray(reference.GetOrigin()) - d @ (spacing / 2.0)  # outer corner of voxel 0
    grid = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    grid.SetSpacing([float(s) for s in new_spacing])
    grid.SetDirection(reference.GetDirection())
    grid.SetOrigin([float(v) for v in corner + d @ (new_spacing / 2.0)])
    return grid


def _windows(shape: Sequence[int], max_edge: int, overlap: int, multiple: int
             ) -> Tuple[List[int], List[Tuple[slice, slice, slice]]]:
    tiles = [tiling(n, max_edge, overlap, multiple) for n in shape]
    edges = [edge for edge, _ in tiles]
    windows = [tuple(slice(s, s + e) for s, e in zip(starts, edges))
               for starts in itertools.product(*(starts for _, starts in tiles))]
    return edges, windows  # type: ignore[return-value]


def fuse_native(
    model: torch.nn.Module,
    reference_u: np.ndarray,
    aligned_u: np.ndarray,
    token_maps: torch.Tensor,
    native_to_token: np.ndarray,
    prompt: torch.Tensor,
    p: torch.Tensor,
    *,
    patch: int = 128,
    overlap: int = 32,
    device: Optional[torch.device] = None,
    precision: Optional[torch.dtype] = None,
    cancel: Optional[Callable[[], None]] = None,
) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Run :meth:`~unifuse.model.UniFuse.fuse_patch` of ``model`` over a whole volume in patches.

    Args:
        reference_u: (D, H, W) reference on the fusion grid, normalised to [0, 1].
        aligned_u: (D, H, W) moving volume aligned onto the same grid, normalised to [0, 1] (0 outside its
            field of view).
        token_maps: (1, 2M, T_z, T_y, T_x) :meth:`UniFuse.token_maps` on the working grid's token lattice.
        native_to_token: 3×4 affine (x, y, z) from fusion-grid continuous index to token continuous index
            (:func:`index_to_index_affine` to the working grid, then ``t = (w - (Q-1)/2) / Q``).
        prompt: (1, Ñ, L, M) P̂ of the working-grid analysis; p: (1, Ñ) class weights.
        patch: largest patch edge in voxels (:func:`tiling` picks the edges; rounded to the U-Net's multiple).
        overlap: voxels shared by neighbouring patches (at least), blended by the Gaussian weights.
        precision: autocast dtype of the patch computations (:func:`fast_precision`), or None for float32.
        cancel: called between patches (raises to abort).

    Returns:
        ``(fused, restored)``: (D, H, W) float32 volumes in [0, 1] on the fusion grid; ``restored`` (the
        restored aligned moving volume) is None when the network has no restoration output.
    """
    device = device or token_maps.device
    factor = model.fusion_multiple
    shape = reference_u.shape
    edge, windows = _windows(shape, patch, overlap, factor)
    padded = [max(n, max(w[k].stop for w in windows)) for k, n in enumerate(shape)]
    pad = [(0, a - n) for a, n in zip(padded, shape)]
    ref = torch.from_numpy(np.pad(reference_u.astype(np.float32), pad))
    mov = torch.from_numpy(np.pad(aligned_u.astype(np.float32), pad))
    out: Optional[torch.Tensor] = None  # (C, *padded), C = the network's output channels
    weight = torch.zeros(padded, dtype=torch.float32)
    importance = gaussian_importance(edge)
    a = torch.as_tensor(native_to_token, dtype=torch.float32, device=device)
    t_size = torch.tensor(token_maps.shape[2:][::-1], dtype=torch.float32, device=device)  # (x, y, z)
    guidance = model.fusion_guidance(prompt, p)

    def run(r: torch.Tensor, m: torch.Tensor, start: Sequence[int]) -> torch.Tensor:
        centres = [torch.arange(n // factor, dtype=torch.float32, device=device) * factor + (factor - 1) / 2.0
                   for n in r.shape[2:]]
        bz, by, bx = torch.meshgrid(*centres, indexing="ij")
        b_idx = torch.stack([bx, by, bz], dim=-1)  # bottleneck voxel centres, patch index (x, y, z)
        t = (b_idx + torch.tensor(start, dtype=torch.float32, device=device)) @ a[:, :3].T + a[:, 3]
        g = torch.where(t_size > 1, 2.0 * t / (t_size - 1).clamp_min(1) - 1.0, torch.zeros_like(t))
        tokens = F.grid_sample(token_maps, g[None], mode="bilinear", padding_mode="border", align_corners=True)
        return model.fuse_patch(r.to(device), m.to(device), tokens, guidance, p)[0].float().cpu()

    background: Optional[torch.Tensor] = None
    autocast = torch.autocast(torch.device(device).type, dtype=precision, enabled=precision is not None)
    with torch.inference_mode(), autocast:
        for zs, ys, xs in windows:
            if cancel is not None:
                cancel()
            r, m = ref[zs, ys, xs][None, None], mov[zs, ys, xs][None, None]
            start = [xs.start, ys.start, zs.start]
            if float(r.max()) <= BACKGROUND and float(m.max()) <= BACKGROUND:
                # nothing but background in both: the network's (constant) output on it, computed once
                if background is None:
                    zero = torch.zeros((1, 1, factor * 8, factor * 8, factor * 8))
                    background = run(zero, zero, start)[:, factor * 4, factor * 4, factor * 4]
                fused = background[:, None, None, None].expand(-1, *edge)
            else:
                fused = run(r, m, start)
            if out is None:
                out = torch.zeros((fused.shape[0], *padded), dtype=torch.float32)
            out[:, zs, ys, xs] += fused * importance
            weight[zs, ys, xs] += importance
    result = (out / weight)[:, : shape[0], : shape[1], : shape[2]].numpy()
    return result[0], (result[1] if result.shape[0] > 1 else None)
