"""Random misalignments with an exact ground-truth field, smooth random fields, and field inversion.

Conventions (those of :mod:`unifuse.spatial`):

* Volumes are numpy arrays ordered (z, y, x) = (D, H, W).
* Displacement fields are float32 arrays (3, D, H, W) in **voxels of their grid**, channels (x, y, z),
  and are **pull-back** fields: ``warp(image, u)(p) = image(p + u(p))`` for every voxel index p
  (trilinear, ``align_corners=True``: voxel centres are the sample points).

How a misaligned pair and its ground truth are made (see ``docs/data.md``):

1. :func:`random_misalignment` draws a point map ``T(p) = A(p + n(p))``: a smooth non-rigid displacement
   ``n`` followed by a rigid map ``A`` (rotation about the grid centre, then translation), both in the
   physical frame of the grid (voxel axes scaled by the spacing).
2. Its **forward** field ``v(p) = T(p) - p`` *produces* the misaligned moving volume from the aligned one:
   ``moving(p) = aligned(p + v(p))``.
3. The field that **aligns** the moving volume back, ``u`` with ``moving(p + u(p)) = aligned(p)``, must
   satisfy ``p + u(p) = T^-1(p)``, i.e. ``u(p) = -v(p + u(p))``: it is the *inverse* of ``v``, not ``-v``.
   This ``u`` is the network's target ``u_gt``. Because ``T^-1 = (id + n)^-1 o A^-1`` with ``A^-1`` known in
   closed form, only the smooth non-rigid part is inverted numerically (fixed point at arbitrary points,
   converged to 1e-4 voxel), so ``u_gt`` is exact up to that tolerance and to the trilinear definition of
   ``n`` between grid points.

:func:`invert_field` is the generic numerical inverse of any field on its grid (fixed-point iteration
``u <- -v(p + u)``) for fields without a known rigid part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Tuple, Union

import numpy as np
import torch
from scipy import ndimage
from scipy.spatial.transform import Rotation

from .. import spatial
from ..errors import InputImageError

__all__ = [
    "Misalignment",
    "smooth_noise",
    "rotation_matrix",
    "rigid_displacement",
    "warp_rigid",
    "random_smooth_displacement",
    "random_misalignment",
    "invert_field",
    "warp_array",
    "min_jacobian",
]

SpacingLike = Union[float, Sequence[float]]

#: A smooth field whose smallest Jacobian determinant is below this is shrunk (diffeomorphic in practice).
MIN_JACOBIAN: float = 0.2


def _spacing_xyz(spacing_mm: SpacingLike) -> np.ndarray:
    """Spacing as a float64 array (x, y, z) in mm; a scalar means isotropic."""
    s = np.atleast_1d(np.asarray(spacing_mm, dtype=np.float64))
    if s.size == 1:
        s = np.repeat(s, 3)
    if s.shape != (3,) or not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ValueError(f"spacing_mm must be a positive scalar or (x, y, z) triple; got {spacing_mm!r}")
    return s


def _check_shape(shape: Sequence[int]) -> Tuple[int, int, int]:
    if len(shape) != 3 or any(int(n) < 2 for n in shape):
        raise ValueError(f"shape must be (D, H, W) with every edge >= 2 voxels; got {tuple(shape)}")
    return tuple(int(n) for n in shape)  # type: ignore[return-value]


def _check_field(field: np.ndarray, name: str = "field") -> np.ndarray:
    f = np.asarray(field)
    if f.ndim != 4 or f.shape[0] != 3:
        raise ValueError(f"{name} must be a (3, D, H, W) displacement array (channels x, y, z); got {f.shape}")
    if not np.all(np.isfinite(f)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return f.astype(np.float32, copy=False)


def _to_torch(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


@dataclass(frozen=True, eq=False)
class Misalignment:
    """A random misalignment and its exact inverse on a (D, H, W) grid.

    Attributes:
        forward: v, (3, D, H, W) float32, voxels, channels (x, y, z). Makes the misaligned volume:
            ``moving = warp(aligned, v)``, i.e. ``moving(p) = aligned(p + v(p))``.
        inverse: u_gt, (3, D, H, W) float32, voxels, channels (x, y, z). Aligns it back:
            ``warp(moving, u_gt) ≈ aligned`` (``u_gt(p) = -v(p + u_gt(p))``).
        rotation_deg: (3,) rotation angles about the x, y, z axes (degrees), ``R = Rz @ Ry @ Rx``.
        translation_mm: (3,) translation (x, y, z) in mm.
        nonrigid: (3, D, H, W) float32 voxels, the smooth non-rigid part ``n`` (``T(p) = A(p + n(p))``).
        spacing_mm: (3,) voxel spacing (x, y, z) used to express rotation/translation physically.
    """

    forward: np.ndarray
    inverse: np.ndarray
    rotation_deg: np.ndarray
    translation_mm: np.ndarray
    nonrigid: np.ndarray
    spacing_mm: np.ndarray


# --------------------------------------------------------------------------------------------------------
# smooth random fields


def smooth_noise(
    shape: Sequence[int],
    rng: np.random.Generator,
    control_points: int = 5,
    channels: int = 1,
    smoothing: float = 0.5,
) -> np.ndarray:
    """A smooth zero-mean random field on a (D, H, W) grid.

    i.i.d. N(0, 1) values on a ``control_points``³ lattice spanning the grid (corners on corner voxels) are
    trilinearly up-sampled to an intermediate lattice of 4 points per control interval, Gaussian-smoothed
    there with sigma = ``smoothing`` × control spacing (removing the lattice kinks), and trilinearly
    up-sampled to the grid. Features have a size of about ``edge / (control_points - 1)``.

    Args:
        shape: (D, H, W).
        rng: numpy random generator (the only source of randomness).
        control_points: lattice points per edge (>= 2); more points = finer structure.
        channels: number of independent fields.
        smoothing: Gaussian sigma as a fraction of the lattice spacing.

    Returns:
        float32 (channels, D, H, W), scaled so that the largest absolute value over all channels is 1
        (all zeros only if the lattice draw is constant, which has probability 0).

    Kept rather than a SimpleITK B-spline field: the same seed must keep drawing the same training and
    benchmark cases (the shipped weights and ``docs/benchmark.md`` were made with these), and a cubic
    B-spline of the lattice draw is a different distribution (smoother, no Gaussian step).
    """
    shape = _check_shape(shape)
    c = int(control_points)
    if c < 2:
        raise ValueError(f"control_points must be >= 2; got {control_points}")
    lattice = rng.standard_normal((int(channels), c, c, c)).astype(np.float32)
    # smooth on an intermediate lattice of ~4 points per control interval (cheap), then up-sample: the
    # field is already smooth at that scale, so the final trilinear step adds no visible kinks
    mid = tuple(min(n, 4 * (c - 1) + 1) for n in shape)
    up = torch.nn.functional.interpolate(_to_torch(lattice)[None], size=mid, mode="trilinear", align_corners=True)
    sigma = [0.0] + [float(smoothing) * (n - 1) / (c - 1) for n in mid]
    field = ndimage.gaussian_filter(up[0].numpy(), sigma=sigma, mode="nearest")
    if mid != shape:
        field = torch.nn.functional.interpolate(_to_torch(field)[None], size=shape, mode="trilinear",
                                                align_corners=True)[0].numpy()
    peak = float(np.abs(field).max())
    return (field / peak if peak > 0 else field).astype(np.float32)


def min_jacobian(field: np.ndarray) -> float:
    """Smallest determinant of the Jacobian of ``p -> p + field(p)`` (voxel field (3, D, H, W)); <= 0 = folding."""
    f = _check_field(field)
    return float(spatial.jacobian_determinant(_to_torch(f)[None]).min())


def random_smooth_displacement(
    shape: Sequence[int],
    rng: np.random.Generator,
    max_mm: float,
    spacing_mm: SpacingLike = 1.0,
    control_points: int = 5,
) -> np.ndarray:
    """A smooth, non-folding random displacement whose largest vector length is ``max_mm``.

    :func:`smooth_noise` with 3 channels, scaled so that ``max_p ||n(p)||`` (in mm) equals ``max_mm``, then
    converted to voxels per axis. If the map ``p -> p + n(p)`` would fold (smallest Jacobian determinant
    below :data:`MIN_JACOBIAN`), the field is shrunk by 1/2 until it does not.

    Returns:
        float32 (3, D, H, W) in voxels, channels (x, y, z). Zero when ``max_mm == 0``.
    """
    shape = _check_shape(shape)
    if max_mm < 0 or not math.isfinite(max_mm):
        raise ValueError(f"max_mm must be a finite non-negative number of mm; got {max_mm}")
    spacing = _spacing_xyz(spacing_mm)
    noise = smooth_noise(shape, rng, control_points=control_points, channels=3)
    if max_mm == 0:
        return np.zeros((3, *shape), dtype=np.float32)
    norm = float(np.sqrt((noise.astype(np.float64) ** 2).sum(axis=0)).max())
    field_mm = noise * (max_mm / norm if norm > 0 else 0.0)
    field = (field_mm / spacing[:, None, None, None]).astype(np.float32)
    for _ in range(10):
        if min_jacobian(field) >= MIN_JACOBIAN:
            break
        field *= 0.5
    return field


# --------------------------------------------------------------------------------------------------------
# rigid part


def rotation_matrix(rotation_deg: Sequence[float]) -> np.ndarray:
    """3x3 rotation ``R = Rz @ Ry @ Rx`` for angles (about x, about y, about z) in degrees (right-handed):
    scipy's extrinsic ``"xyz"`` Euler convention."""
    return Rotation.from_euler("xyz", [float(a) for a in rotation_deg], degrees=True).as_matrix()


def _affine_voxel(shape: Sequence[int], rotation_deg: Sequence[float], translation_mm: Sequence[float],
                  spacing: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel-space form ``A(p) = c + M (p - c) + t_vox`` of the rigid map (x, y, z order); returns (M, c, t_vox)."""
    d, h, w = shape
    centre = np.array([(w - 1) / 2.0, (h - 1) / 2.0, (d - 1) / 2.0])
    m = np.diag(1.0 / spacing) @ rotation_matrix(rotation_deg) @ np.diag(spacing)
    t_vox = np.asarray(translation_mm, dtype=np.float64) / spacing
    return m, centre, t_vox


def _voxel_coordinates(shape: Sequence[int]) -> np.ndarray:
    """(3, D, H, W) float64 voxel coordinates, channels (x, y, z)."""
    d, h, w = shape
    zz, yy, xx = np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij")
    return np.stack((xx, yy, zz)).astype(np.float64)


def _apply_affine(m: np.ndarray, centre: np.ndarray, t_vox: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``c + M (points - c) + t`` for points (3, ...) in voxel (x, y, z) coordinates."""
    rel = points - centre.reshape(3, *([1] * (points.ndim - 1)))
    out = np.einsum("ij,j...->i...", m, rel)
    return out + (centre + t_vox).reshape(3, *([1] * (points.ndim - 1)))


def rigid_displacement(
    shape: Sequence[int],
    rotation_deg: Sequence[float] = (0.0, 0.0, 0.0),
    translation_mm: Sequence[float] = (0.0, 0.0, 0.0),
    spacing_mm: SpacingLike = 1.0,
) -> np.ndarray:
    """Pull-back field ``v(p) = A(p) - p`` of a rigid map about the grid centre.

    In physical coordinates of the grid (voxel axes times spacing, origin at the grid centre ``c``):
    ``A(x) = R x + t``, with ``R = Rz @ Ry @ Rx`` (:func:`rotation_matrix`) and ``t`` in mm. Warping an image
    with ``v`` samples it at ``A(p)``, so the content appears moved by ``A^-1``.

    Args:
        shape: (D, H, W).
        rotation_deg: angles (about x, about y, about z) in degrees.
        translation_mm: (x, y, z) in mm.
        spacing_mm: voxel spacing, scalar or (x, y, z).

    Returns:
        float32 (3, D, H, W) in voxels, channels (x, y, z).

    Equals ``sitk.TransformToDisplacementField`` of the matching ``Euler3DTransform`` (the test's oracle);
    kept because :func:`random_misalignment` needs the same map at off-grid points, which ITK does one point
    per call.
    """
    shape = _check_shape(shape)
    m, centre, t_vox = _affine_voxel(shape, rotation_deg, translation_mm, _spacing_xyz(spacing_mm))
    p = _voxel_coordinates(shape)
    return (_apply_affine(m, centre, t_vox, p) - p).astype(np.float32)


def warp_rigid(
    volume: np.ndarray,
    rotation_deg: Sequence[float] = (0.0, 0.0, 0.0),
    translation_mm: Sequence[float] = (0.0, 0.0, 0.0),
    spacing_mm: SpacingLike = 1.0,
    background: float = 0.0,
) -> np.ndarray:
    """``warp_array(volume, rigid_displacement(...))`` without building the dense field (fast path).

    Samples ``volume`` (z, y, x) trilinearly at ``A(p)`` (see :func:`rigid_displacement`) through
    :func:`torch.nn.functional.affine_grid` (align_corners=True); outside: ``background``. Returns float32.
    """
    vol = np.asarray(volume)
    shape = _check_shape(vol.shape)
    m, centre, t_vox = _affine_voxel(shape, rotation_deg, translation_mm, _spacing_xyz(spacing_mm))
    half = np.maximum(centre, 0.5)  # (x, y, z) half extents: normalised = (p - c) / half
    theta = np.zeros((1, 3, 4))
    theta[0, :, :3] = np.diag(1.0 / half) @ m @ np.diag(half)
    theta[0, :, 3] = t_vox / half
    grid = torch.nn.functional.affine_grid(torch.from_numpy(theta).float(), [1, 1, *shape], align_corners=True)
    x = _to_torch(vol.astype(np.float32) - np.float32(background))[None, None]
    out = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return (out[0, 0].numpy() + np.float32(background)).astype(np.float32)


# --------------------------------------------------------------------------------------------------------
# sampling and inversion


def _sample_at(field: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Trilinear samples of ``field`` (1, C, D, H, W) at voxel points (1, 3, D, H, W) (x, y, z), border-clamped."""
    if points.shape[2:] != field.shape[2:]:
        raise ValueError(f"points lattice {tuple(points.shape[2:])} must match the field grid {tuple(field.shape[2:])}")
    base = spatial.identity_grid(points.shape[2:], dtype=points.dtype)
    return spatial.warp(field, points - base, padding_mode="border")


def _invert_at_points(n: torch.Tensor, y: torch.Tensor, iterations: int, tolerance: float) -> torch.Tensor:
    """Solve ``m = -n(y + m)`` at points y (fixed point); returns m (1, 3, ...) in voxels."""
    m = -_sample_at(n, y)
    for _ in range(int(iterations)):
        m_next = -_sample_at(n, y + m)
        change = float((m_next - m).abs().max())
        m = m_next
        if change < tolerance:
            break
    return m


def invert_field(v: np.ndarray, iterations: int = 50, tolerance: float = 1e-4) -> np.ndarray:
    """Numerical inverse of a pull-back field on its own grid.

    Finds ``u`` with ``u(p) = -v(p + u(p))`` (so that ``warp(warp(img, v), u) ≈ img``) by the fixed-point
    iteration ``u_{k+1}(p) = -v(p + u_k(p))`` from ``u_0 = -v``; it converges when the map is a contraction,
    i.e. the spatial derivatives of ``v`` are well below 1 (rotations up to ~30°, smooth non-folding warps).
    ``v`` is sampled trilinearly and clamped at the border, so where ``p + u(p)`` leaves the grid the result
    is an extrapolation.

    Args:
        v: (3, D, H, W) voxels, channels (x, y, z).
        iterations: maximum number of iterations.
        tolerance: stop when no vector changes by more than this (voxels).

    Returns:
        float32 (3, D, H, W) inverse field.

    Kept rather than SimpleITK's inverters, measured on 48³ smooth and rigid + smooth fields (largest residual
    ``|u(p) + v(p + u(p))|`` where ``p + u(p)`` is inside the grid, time): this 1e-5–3e-5 voxel in 0.1 s;
    ``sitk.IterativeInverseDisplacementField`` 0.3–0.6 voxel in 1.1 s; ``sitk.InvertDisplacementField``
    1.7–8.7 voxels in 0.5–0.8 s.
    """
    vt = _to_torch(_check_field(v, "v"))[None]
    base = spatial.identity_grid(vt.shape[2:])
    return _invert_at_points(vt, base, iterations, tolerance)[0].numpy().astype(np.float32)


def warp_array(
    volume: np.ndarray,
    field: np.ndarray,
    mode: str = "bilinear",
    background: float = 0.0,
) -> np.ndarray:
    """numpy front end of :func:`unifuse.spatial.warp`: ``out(p) = volume(p + field(p))``.

    Args:
        volume: (D, H, W) or (C, D, H, W) array (any real dtype).
        field: (3, D, H, W) voxels, channels (x, y, z).
        mode: ``"bilinear"`` (trilinear) or ``"nearest"`` (for label maps).
        background: value of samples outside the volume (e.g. -1000 for CT in HU, 0 for MR/PET).

    Returns:
        float32 array of ``volume``'s shape. ``volume`` is not modified.
    """
    vol = np.asarray(volume)
    if vol.ndim not in (3, 4):
        raise InputImageError(f"warp_array expects a (D, H, W) or (C, D, H, W) volume; got shape {vol.shape}")
    f = _check_field(field)
    if f.shape[1:] != vol.shape[-3:]:
        raise ValueError(f"field grid {f.shape[1:]} differs from volume grid {vol.shape[-3:]}")
    x = _to_torch(vol.astype(np.float32) - np.float32(background))
    x = x[None, None] if vol.ndim == 3 else x[None]
    out = spatial.warp(x, _to_torch(f)[None], mode=mode, padding_mode="zeros")[0].numpy() + np.float32(background)
    return (out[0] if vol.ndim == 3 else out).astype(np.float32)


# --------------------------------------------------------------------------------------------------------
# random misalignment


def random_misalignment(
    shape: Sequence[int],
    rng: np.random.Generator,
    max_rot_deg: float = 10.0,
    max_trans_mm: float = 10.0,
    spacing_mm: SpacingLike = 1.0,
    nonrigid_mm: float = 4.0,
    control_points: int = 5,
    inverse_tolerance: float = 1e-4,
) -> Misalignment:
    """Draw a random rigid + smooth non-rigid misalignment and compute its exact inverse.

    Parameters are drawn uniformly: each rotation angle (about x, y, z) in ``[-max_rot_deg, max_rot_deg]``
    degrees about the grid centre, each translation component in ``[-max_trans_mm, max_trans_mm]`` mm, and a
    smooth non-rigid displacement (:func:`random_smooth_displacement`) whose largest vector length is drawn in
    ``[0.5, 1] * nonrigid_mm`` mm (non-folding, checked with the Jacobian determinant).

    The point map is ``T(p) = A(p + n(p))`` (non-rigid first, then rigid). ``forward = T - id`` produces the
    misaligned volume; ``inverse = T^-1 - id`` aligns it back (see the module docstring), computed as
    ``T^-1(q) = y + m(y)`` with ``y = A^-1(q)`` in closed form and ``m(y) = -n(y + m(y))`` solved by fixed-point
    iteration at the (off-grid) points y to ``inverse_tolerance`` voxels.

    Args:
        shape: (D, H, W) of the grid.
        rng: numpy random generator (the only source of randomness: same state, same result).
        max_rot_deg: bound of each rotation angle (degrees).
        max_trans_mm: bound of each translation component (mm).
        spacing_mm: voxel spacing, scalar or (x, y, z) mm.
        nonrigid_mm: bound of the non-rigid displacement length (mm); 0 = rigid only.
        control_points: lattice points per edge of the non-rigid field (feature size ~ edge / (points - 1)).
        inverse_tolerance: convergence tolerance of the non-rigid inversion (voxels).

    Returns:
        :class:`Misalignment` with ``forward`` and ``inverse`` fields (3, D, H, W), voxels, (x, y, z).
    """
    shape = _check_shape(shape)
    for name, value in (("max_rot_deg", max_rot_deg), ("max_trans_mm", max_trans_mm), ("nonrigid_mm", nonrigid_mm)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite non-negative number; got {value}")
    spacing = _spacing_xyz(spacing_mm)
    rotation = rng.uniform(-max_rot_deg, max_rot_deg, size=3)
    translation = rng.uniform(-max_trans_mm, max_trans_mm, size=3)
    amplitude = float(rng.uniform(0.5, 1.0)) * float(nonrigid_mm)
    n = random_smooth_displacement(shape, rng, amplitude, spacing, control_points)

    m, centre, t_vox = _affine_voxel(shape, rotation, translation, spacing)
    p = _voxel_coordinates(shape)
    forward = _apply_affine(m, centre, t_vox, p + n) - p

    # inverse: T^-1(q) = y + m(y), y = A^-1(q) = c + M^-1 (q - c - t)
    y = _apply_affine(np.linalg.inv(m), centre, np.zeros(3), p - t_vox.reshape(3, 1, 1, 1))
    if nonrigid_mm > 0:
        y_t = torch.from_numpy(y.astype(np.float32))[None]
        m_y = _invert_at_points(_to_torch(n)[None], y_t, iterations=100, tolerance=inverse_tolerance)
        inverse = y + m_y[0].numpy().astype(np.float64) - p
    else:
        inverse = y - p
    return Misalignment(
        forward=forward.astype(np.float32),
        inverse=inverse.astype(np.float32),
        rotation_deg=rotation,
        translation_mm=translation,
        nonrigid=n,
        spacing_mm=spacing,
    )
