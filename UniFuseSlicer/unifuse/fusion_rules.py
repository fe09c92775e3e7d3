"""Classical pixel-level fusion rules for two aligned volumes (the baselines of DESIGN §8).

Inputs are two volumes on one grid, ordered (z, y, x), intensities normalised to [0, 1] (any finite range
works); outputs are float32 volumes of the same shape. No registration is done here: align first.

* :func:`fuse_average` — ``(a + b) / 2``.
* :func:`fuse_max` — voxel-wise maximum.
* :func:`fuse_laplacian_pyramid` — Burt & Adelson's Laplacian pyramid ("The Laplacian pyramid as a compact
  image code", IEEE Trans. Commun. 1983) in 3D, fused with the choose-max-absolute rule on the band-pass
  levels and the average on the low-pass base (Burt & Kolczynski 1993; the standard "LP" fusion baseline).
"""

from __future__ import annotations

from typing import Any, List, Tuple

import numpy as np
from scipy import ndimage

from .errors import InputImageError

__all__ = [
    "PYRAMID_SIGMA",
    "fuse_average",
    "fuse_max",
    "laplacian_pyramid",
    "reconstruct_laplacian_pyramid",
    "fuse_laplacian_pyramid",
]

#: σ (voxels, at each level's own resolution) of the Gaussian low-pass applied before every decimation.
PYRAMID_SIGMA: float = 1.0


def _volume(x: Any, name: str) -> np.ndarray:
    """Validate one finite, non-empty 3D volume; returns a float64 array."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 3 or arr.size == 0:
        raise InputImageError(f"{name} must be a non-empty 3D volume ordered (z, y, x); got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise InputImageError(f"{name} contains NaN or infinite values; fix them before fusing")
    return arr


def _pair(a: Any, b: Any) -> Tuple[np.ndarray, np.ndarray]:
    """Validate two finite 3D volumes of one shape; returns float64 arrays."""
    x = _volume(a, "a")
    y = _volume(b, "b")
    if x.shape != y.shape:
        raise InputImageError(f"a {x.shape} and b {y.shape} are on different grids; resample b onto a's grid (align) first")
    return x, y


def fuse_average(a: Any, b: Any) -> np.ndarray:
    """Average rule ``F = (a + b) / 2`` of two aligned (z, y, x) volumes; float32."""
    x, y = _pair(a, b)
    return (0.5 * (x + y)).astype(np.float32)


def fuse_max(a: Any, b: Any) -> np.ndarray:
    """Maximum rule ``F = max(a, b)`` voxel-wise of two aligned (z, y, x) volumes; float32."""
    x, y = _pair(a, b)
    return np.maximum(x, y).astype(np.float32)


def _reduce(x: np.ndarray) -> np.ndarray:
    """Gaussian low-pass (σ = :data:`PYRAMID_SIGMA`, reflect boundary) and decimation by 2: sample 2j -> j."""
    return ndimage.gaussian_filter(x, sigma=PYRAMID_SIGMA, mode="reflect")[::2, ::2, ::2]


def _expand(x: np.ndarray, shape: Tuple[int, ...]) -> np.ndarray:
    """Separable linear interpolation of a coarse level onto the finer ``shape``.

    Coarse sample j sits at fine index 2j (the decimation of :func:`_reduce`), so fine index i reads the
    coarse position i / 2; positions past the last coarse sample take its value.
    """
    out = x
    for axis, n_fine in enumerate(shape):
        n_coarse = out.shape[axis]
        pos = np.arange(n_fine, dtype=np.float64) / 2.0
        lo = np.minimum(np.floor(pos).astype(np.int64), n_coarse - 1)
        hi = np.minimum(lo + 1, n_coarse - 1)
        w = np.clip(pos - lo, 0.0, 1.0)
        bshape = [1, 1, 1]
        bshape[axis] = n_fine
        w = w.reshape(bshape)
        out = np.take(out, lo, axis=axis) * (1.0 - w) + np.take(out, hi, axis=axis) * w
    return out


def laplacian_pyramid(x: Any, levels: int = 3) -> List[np.ndarray]:
    """3D Laplacian pyramid of a (z, y, x) volume.

    ``G_0 = x``, ``G_{k+1} = reduce(G_k)`` (Gaussian σ = 1 voxel, decimate by 2 per axis);
    band-pass levels ``L_k = G_k − expand(G_{k+1})`` for k < ``levels``, and the base ``G_levels``.

    Args:
        x: (z, y, x) volume, every edge ≥ 2^levels voxels.
        levels: number of band-pass levels (≥ 1).

    Returns:
        ``[L_0, …, L_{levels-1}, G_levels]`` as float64 arrays, finest first (``levels + 1`` arrays).
    """
    if isinstance(levels, bool) or not isinstance(levels, (int, np.integer)) or levels < 1:
        raise ValueError(f"levels must be an integer ≥ 1; got {levels!r}")
    g = _volume(x, "x")
    if min(g.shape) < 2 ** levels:
        raise InputImageError(
            f"a {levels}-level pyramid needs at least {2 ** levels} voxels along every axis; got shape {g.shape}. "
            "Use fewer levels."
        )
    pyramid = []
    for _ in range(levels):
        coarse = _reduce(g)
        pyramid.append(g - _expand(coarse, g.shape))
        g = coarse
    pyramid.append(g)
    return pyramid


def reconstruct_laplacian_pyramid(pyramid: List[np.ndarray]) -> np.ndarray:
    """Invert :func:`laplacian_pyramid`: ``G_k = L_k + expand(G_{k+1})`` from the base up; float64."""
    if len(pyramid) < 2:
        raise ValueError("a Laplacian pyramid has at least one band-pass level and a base")
    g = np.asarray(pyramid[-1], dtype=np.float64)
    for band in reversed(pyramid[:-1]):
        g = np.asarray(band, dtype=np.float64) + _expand(g, band.shape)
    return g


def fuse_laplacian_pyramid(a: Any, b: Any, levels: int = 3) -> np.ndarray:
    """Laplacian-pyramid fusion of two aligned (z, y, x) volumes.

    Band-pass levels take, voxel by voxel, the coefficient of larger magnitude (ties: ``a``); the base is
    averaged; the fused pyramid is reconstructed and clipped to the joint intensity range
    ``[min(a, b), max(a, b)]`` (reconstruction can overshoot at edges). Identical inputs are returned unchanged
    (up to float32 rounding).

    Args:
        a, b: volumes of one shape, every edge ≥ 2^levels voxels.
        levels: number of band-pass levels.

    Returns:
        float32 fused volume, same shape.
    """
    x, y = _pair(a, b)
    pa = laplacian_pyramid(x, levels)
    pb = laplacian_pyramid(y, levels)
    fused = [np.where(np.abs(la) >= np.abs(lb), la, lb) for la, lb in zip(pa[:-1], pb[:-1])]
    fused.append(0.5 * (pa[-1] + pb[-1]))
    out = reconstruct_laplacian_pyramid(fused)
    lo = min(x.min(), y.min())
    hi = max(x.max(), y.max())
    return np.clip(out, lo, hi).astype(np.float32)
