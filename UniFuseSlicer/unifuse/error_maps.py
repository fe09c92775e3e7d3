"""Alignment-error maps that need no ground truth: Jacobian determinant and local dissimilarity.

* :func:`jacobian_determinant_image` — ``det(∂(x + U(x))/∂x)`` of an ITK displacement field in physical
  (LPS mm) coordinates, honouring spacing *and* direction cosines. (SimpleITK's
  ``DisplacementFieldJacobianDeterminant`` ignores the direction cosines — it gives 1.298 instead of 1.331
  for a 1.1× scaling on an oblique grid — and uses zero-flux borders, so it is not used here.)
* :func:`folding_fraction` — the **fraction** (in [0, 1], not %) of voxels with ``det <= 0``.
* :func:`local_dissimilarity` — a modality-independent map in [0, 1] comparing local structure (MIND
  self-similarity descriptors) of two volumes; see its docstring for the formula.
* :func:`alignment_error_maps` — that map before and after alignment, with one shared mask.

Arrays are numpy (z, y, x); displacement vectors are LPS mm with components (x, y, z).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .geometry import index_to_physical_matrix, resample
from .intensity import foreground_mask

__all__ = [
    "jacobian_determinant_image",
    "folding_fraction",
    "local_dissimilarity",
    "alignment_error_maps",
]

_SLAB = 16  # z-planes per block in the Jacobian computation (bounds memory on large reference grids)


def jacobian_determinant_image(displacement: sitk.Image) -> sitk.Image:
    """Determinant of the Jacobian of ``x -> x + U(x)`` for an ITK displacement field.

    ``J = I + (∂U/∂idx) @ (D diag(s))^-1`` where ``∂U/∂idx`` are finite differences along the index axes
    (central inside, one-sided at the borders, ``np.gradient``), D the direction cosines and s the spacing.
    Values: 1 = volume preserved, > 1 expansion, < 1 compression, <= 0 folding.

    Args:
        displacement: 3D, 3-component displacement field (LPS mm), at least 2 voxels along every axis.

    Returns:
        float32 scalar image on the field's grid.
    """
    if displacement.GetDimension() != 3 or displacement.GetNumberOfComponentsPerPixel() != 3:
        raise ValueError("expected a 3D displacement field with 3 components (LPS mm)")
    if min(displacement.GetSize()) < 2:
        raise ValueError(f"the displacement field needs >= 2 voxels per axis; size is {displacement.GetSize()}")
    u = sitk.GetArrayViewFromImage(displacement)  # (z, y, x, 3)
    m_inv = np.linalg.inv(index_to_physical_matrix(displacement))
    depth = u.shape[0]
    det = np.empty(u.shape[:3], dtype=np.float32)
    for z0 in range(0, depth, _SLAB):
        z1 = min(z0 + _SLAB, depth)
        lo, hi = max(z0 - 1, 0), min(z1 + 1, depth)
        block = np.asarray(u[lo:hi], dtype=np.float64)
        keep = slice(z0 - lo, z0 - lo + (z1 - z0))
        grad = []  # grad[c][a] = dU_c / d idx_a, a in (i, j, k), on the slab's own planes
        for c in range(3):
            d_k, d_j, d_i = np.gradient(block[..., c], axis=(0, 1, 2))
            grad.append((d_i[keep], d_j[keep], d_k[keep]))
        # J = I + grad @ m_inv entry by entry, then the 3x3 determinant by cofactors: the same float64 values
        # as np.linalg.det on stacked matrices, several times faster (no per-voxel LU)
        j = [[(1.0 if c == b else 0.0) + sum(grad[c][a] * m_inv[a, b] for a in range(3)) for b in range(3)]
             for c in range(3)]
        det[z0:z1] = (j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
                      - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
                      + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0]))
    out = sitk.GetImageFromArray(det)
    out.CopyInformation(displacement)
    return out


def folding_fraction(jacobian: sitk.Image, mask: Optional[sitk.Image] = None) -> float:
    """Fraction in [0, 1] of voxels (inside ``mask`` when given) where the Jacobian determinant is <= 0."""
    jac = sitk.GetArrayViewFromImage(jacobian)
    if mask is not None:
        keep = sitk.GetArrayViewFromImage(mask) > 0
        if not keep.any():
            return 0.0
        jac = jac[keep]
    if jac.size == 0:
        return 0.0
    return float(np.count_nonzero(jac <= 0)) / float(jac.size)


def _on_grid(image: sitk.Image, grid: sitk.Image) -> sitk.Image:
    """``image`` as float32 on ``grid`` (resampled by header geometry only when the grids differ)."""
    same = (
        image.GetSize() == grid.GetSize()
        and np.allclose(image.GetSpacing(), grid.GetSpacing(), atol=1e-6)
        and np.allclose(image.GetOrigin(), grid.GetOrigin(), atol=1e-5)
        and np.allclose(image.GetDirection(), grid.GetDirection(), atol=1e-6)
    )
    if same:
        out = sitk.Cast(image, sitk.sitkFloat32)
        out.CopyInformation(grid)
        return out
    return resample(image, grid)


def _voxels(image: sitk.Image, mm: float) -> Tuple[float, float, float]:
    """A length in mm as (possibly fractional) voxels per array axis (z, y, x)."""
    sx, sy, sz = image.GetSpacing()
    return (mm / sz, mm / sy, mm / sx)


#: Positive unit steps along the array axes (z, y, x); with their negatives, the six face neighbours r.
_AXIS_STEPS = ((1, 0, 0), (0, 1, 0), (0, 0, 1))


def _shifted(arr: np.ndarray, offset: Tuple[int, int, int]) -> np.ndarray:
    """``out[p] = arr[p + offset]`` for unit offsets, with edge replication."""
    padded = np.pad(arr, 1, mode="edge")
    z, y, x = arr.shape
    dz, dy, dx = offset
    return padded[1 + dz : 1 + dz + z, 1 + dy : 1 + dy + y, 1 + dx : 1 + dx + x]


def _patch_distance(arr: np.ndarray, step: Tuple[int, int, int]) -> np.ndarray:
    """D_r(x): mean squared difference between the 3x3x3 patches around x and x + r (float32)."""
    diff = arr - _shifted(arr, step)
    return ndimage.uniform_filter(diff * diff, size=3, mode="nearest")


def _mind_descriptor(arr: np.ndarray) -> np.ndarray:
    """MIND descriptor (6, z, y, x) float16 of a (z, y, x) float32 volume.

    ``MIND_r(x) = exp(-(D_r(x) - min_r' D_r'(x)) / V(x))`` for the six face neighbours r — the usual
    ``exp(-D_r / V)`` normalised so its largest channel is 1 — with ``V(x)`` the mean of the six patch
    distances, floored at 1e-3 of its image mean so perfectly flat regions stay defined. Only three patch
    distances are filtered: ``D_{-r}(x) = D_r(x - r)``. Peak memory ~ 40 bytes per voxel.
    """
    plus = [_patch_distance(arr, step) for step in _AXIS_STEPS]

    def distances():
        for step, d in zip(_AXIS_STEPS, plus):
            yield d
            yield _shifted(d, (-step[0], -step[1], -step[2]))

    total = np.zeros(arr.shape, np.float32)
    lowest = np.full(arr.shape, np.inf, np.float32)
    for d in distances():
        total += d
        np.minimum(lowest, d, out=lowest)
    variance = total / 6.0
    np.maximum(variance, 1e-3 * float(variance.mean()) + 1e-12, out=variance)
    descriptor = np.empty((6,) + arr.shape, np.float16)
    for c, d in enumerate(distances()):
        descriptor[c] = np.exp(-(d - lowest) / variance)
    return descriptor


def _prepared_descriptor(image: sitk.Image, sigma_mm: float) -> np.ndarray:
    arr = sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkFloat32))
    # MIND does not depend on the intensity scale, but float32 patch distances do: squared differences of
    # intensities around 1e20 overflow (NaN maps) and of intensities around 1e-20 underflow. Scale to a
    # largest magnitude of 1 first (in place, no extra copy).
    scale = float(np.max(np.abs(arr))) if arr.size else 0.0
    if 0.0 < scale < np.inf:
        np.divide(arr, np.float32(scale), out=arr)
    if sigma_mm > 0:
        arr = ndimage.gaussian_filter(arr, _voxels(image, sigma_mm), mode="nearest")
    return _mind_descriptor(arr)


def _descriptor_dissimilarity(
    mind_a: np.ndarray, mind_b: np.ndarray, keep: np.ndarray, grid: sitk.Image, radius_mm: float
) -> sitk.Image:
    difference = np.zeros(keep.shape, np.float32)
    for c in range(mind_a.shape[0]):
        difference += np.abs(mind_a[c].astype(np.float32) - mind_b[c].astype(np.float32))
    difference /= mind_a.shape[0]
    size = tuple(max(3, 2 * int(round(v)) + 1) for v in _voxels(grid, radius_mm))
    local = ndimage.uniform_filter(difference, size=size, mode="reflect")
    local[~keep] = 0.0
    out = sitk.GetImageFromArray(np.clip(local, 0.0, 1.0).astype(np.float32))
    out.CopyInformation(grid)
    return out


def _default_sigma(grid: sitk.Image, sigma_mm: Optional[float]) -> float:
    return float(sigma_mm) if sigma_mm is not None else 0.5 * float(max(grid.GetSpacing()))


def local_dissimilarity(
    a: sitk.Image,
    b: sitk.Image,
    radius_mm: float = 5.0,
    sigma_mm: Optional[float] = None,
    mask: Optional[sitk.Image] = None,
) -> sitk.Image:
    """Modality-independent local dissimilarity of ``b`` with respect to ``a``, on ``a``'s grid.

    Uses MIND, the modality independent neighbourhood descriptor (Heinrich et al., Med. Image Anal. 2012):
    at every voxel, the patch distances ``D_r`` (mean squared difference of 3x3x3 patches) to the six face
    neighbours r, turned into ``MIND_r = exp(-D_r / V)`` with V the local mean patch distance and
    normalised to a largest channel of 1. The descriptor depends on *where* intensity changes, not on the
    intensity values: an inverted contrast gives identical D_r, and a monotone remap changes them mostly
    through a local scale that V divides out. Then

        ``dissimilarity(x) = box-mean over a window of half-width radius_mm of (1/6) sum_r |MIND_r^a - MIND_r^b|``

    which lies in [0, 1]: 0 for identical local structure, larger where edges do not coincide. Both
    volumes are first smoothed with a Gaussian of ``sigma_mm`` (default half the largest voxel spacing) to
    keep voxel noise out of the descriptor. Voxels outside ``mask`` (default: the joint foreground,
    :func:`unifuse.intensity.foreground_mask` of both volumes dilated by ``radius_mm``) are 0.

    Args:
        a: reference volume (defines the output grid).
        b: other volume; resampled onto ``a``'s grid by header geometry if it lives elsewhere.
        radius_mm: window half-width, mm (converted to voxels per axis, at least 1).
        sigma_mm: pre-smoothing, mm.
        mask: optional binary image on ``a``'s grid.

    Returns:
        float32 image on ``a``'s grid, values in [0, 1].
    """
    if radius_mm <= 0:
        raise ValueError(f"radius_mm must be positive; got {radius_mm}")
    a32 = sitk.Cast(a, sitk.sitkFloat32)
    b32 = _on_grid(b, a32)
    sigma = _default_sigma(a32, sigma_mm)
    if mask is None:
        dilate = float(radius_mm)
        mask = sitk.And(foreground_mask(a32, dilate), foreground_mask(b32, dilate))
    keep = sitk.GetArrayViewFromImage(mask) > 0
    return _descriptor_dissimilarity(
        _prepared_descriptor(a32, sigma), _prepared_descriptor(b32, sigma), keep, a32, radius_mm
    )


def alignment_error_maps(
    reference: sitk.Image,
    moving_before: sitk.Image,
    aligned: sitk.Image,
    radius_mm: float = 5.0,
) -> Tuple[sitk.Image, sitk.Image]:
    """Local dissimilarity of the moving volume to the reference before and after alignment.

    Both maps are on the reference grid and use the same mask — the reference foreground intersected with
    the union of the two moving foregrounds (all dilated by ``radius_mm``) — so their means compare fairly.

    Args:
        reference: the fixed volume.
        moving_before: the moving volume before the network's alignment (e.g. header pre-aligned); on the
            reference grid or anywhere in the same physical space (then resampled by header geometry).
        aligned: the moving volume after alignment (normally already on the reference grid).
        radius_mm: window half-width of :func:`local_dissimilarity`.

    Returns:
        (before, after): float32 images in [0, 1] on the reference grid.
    """
    ref32 = sitk.Cast(reference, sitk.sitkFloat32)
    before = _on_grid(moving_before, ref32)
    after = _on_grid(aligned, ref32)
    dilate = float(radius_mm)
    moving_fg = sitk.Or(foreground_mask(before, dilate), foreground_mask(after, dilate))
    mask = sitk.And(foreground_mask(ref32, dilate), moving_fg)
    keep = sitk.GetArrayViewFromImage(mask) > 0
    sigma = _default_sigma(ref32, None)
    mind_ref = _prepared_descriptor(ref32, sigma)  # computed once, used for both maps
    return (
        _descriptor_dissimilarity(mind_ref, _prepared_descriptor(before, sigma), keep, ref32, radius_mm),
        _descriptor_dissimilarity(mind_ref, _prepared_descriptor(after, sigma), keep, ref32, radius_mm),
    )
