"""SimpleITK side of the geometry: working grid, voxel <-> mm, LPS <-> RAS, fields and the one resampling.

Conventions (proved by ``Testing/test_geometry.py``; the maths is in ``docs/geometry.md``):

* Physical points and vectors are **LPS millimetres**, as in SimpleITK/ITK. For an image with origin
  ``o``, spacing ``s`` and direction cosines ``D`` (3x3, columns = image axes in LPS), the voxel with
  continuous index ``(i, j, k)`` sits at ``p = o + D @ diag(s) @ (i, j, k)``.
* numpy arrays of images are ordered **(z, y, x) = (k, j, i)** (``sitk.GetArrayFromImage``); displacement
  arrays in voxels are (3, D, H, W) with channels **(x, y, z) = (i, j, k)**, as in :mod:`unifuse.spatial`.
* Displacement fields are **pull-back** fields on the fixed grid: ``aligned(p) = moving(p + u(p))``.
  In voxel units of a grid, ``u_mm = D @ diag(s) @ u_vox`` (a vector, so the origin does not enter).
* Slicer (MRML) uses RAS: ``p_ras = diag(-1, -1, 1) @ p_lps`` for points *and* vectors.
* A transform given to :func:`resample` / :func:`warp_image` maps **fixed (reference) physical points to
  moving physical points** (ITK's resampling convention), so ``out(x) = moving(T(x))``.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import SimpleITK as sitk

from .errors import GeometryError
from .intensity import foreground_mask

__all__ = [
    "LPS_TO_RAS",
    "lps_to_ras",
    "ras_to_lps",
    "ijk_to_lps_matrix",
    "lps_to_ijk_matrix",
    "ijk_to_ras_matrix",
    "index_to_physical_matrix",
    "physical_center",
    "working_grid",
    "on_same_grid",
    "overlap_fraction",
    "check_overlap",
    "initial_transform",
    "resample",
    "field_voxels_to_image",
    "field_image_to_voxels",
    "compose_transform",
    "transform_to_displacement",
    "warp_image",
]

#: Linear map from LPS to RAS coordinates (and back: it is its own inverse). Applies to points and vectors.
LPS_TO_RAS: np.ndarray = np.diag([-1.0, -1.0, 1.0])

_INTERPOLATORS = {
    "linear": sitk.sitkLinear,
    "nearest": sitk.sitkNearestNeighbor,
    "bspline": sitk.sitkBSpline,
}


# --------------------------------------------------------------------------------------------------------
# LPS <-> RAS and index <-> physical matrices


def lps_to_ras(points_or_vectors: np.ndarray) -> np.ndarray:
    """Flip LPS coordinates to RAS (negate the first two components).

    Args:
        points_or_vectors: array of shape (..., 3), LPS mm (points or displacement vectors alike).

    Returns:
        float64 array of the same shape in RAS mm.
    """
    a = np.asarray(points_or_vectors, dtype=np.float64)
    if a.shape[-1:] != (3,):
        raise ValueError(f"expected an array of shape (..., 3); got {a.shape}")
    return a @ LPS_TO_RAS.T


def ras_to_lps(points_or_vectors: np.ndarray) -> np.ndarray:
    """Inverse of :func:`lps_to_ras` (the same flip): (..., 3) RAS mm -> (..., 3) LPS mm."""
    return lps_to_ras(points_or_vectors)


def index_to_physical_matrix(image: sitk.Image) -> np.ndarray:
    """The 3x3 matrix ``D @ diag(spacing)`` mapping index steps (i, j, k) to LPS mm vectors."""
    _require_3d(image, "image")
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    return direction @ np.diag(np.asarray(image.GetSpacing(), dtype=np.float64))


def ijk_to_lps_matrix(image: sitk.Image) -> np.ndarray:
    """4x4 homogeneous matrix mapping continuous voxel indices (i, j, k, 1) to LPS mm points.

    ``[[D @ diag(spacing), origin], [0, 0, 0, 1]]``; (i, j, k) are ITK index order (x fastest), i.e. the
    reversed numpy array axes.
    """
    m = np.eye(4)
    m[:3, :3] = index_to_physical_matrix(image)
    m[:3, 3] = np.asarray(image.GetOrigin(), dtype=np.float64)
    return m


def lps_to_ijk_matrix(image: sitk.Image) -> np.ndarray:
    """4x4 inverse of :func:`ijk_to_lps_matrix`: LPS mm points -> continuous voxel indices (i, j, k)."""
    return np.linalg.inv(ijk_to_lps_matrix(image))


def ijk_to_ras_matrix(image: sitk.Image) -> np.ndarray:
    """4x4 IJK -> RAS matrix, i.e. what Slicer's ``GetIJKToRASMatrix`` returns for a volume node loaded
    from the same file: ``diag(-1, -1, 1, 1) @ ijk_to_lps_matrix(image)``."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    return flip @ ijk_to_lps_matrix(image)


def physical_center(image: sitk.Image) -> np.ndarray:
    """LPS mm centre of the image's voxel-extent box (= the point at continuous index (size - 1) / 2)."""
    half = (np.asarray(image.GetSize(), dtype=np.float64) - 1.0) / 2.0
    return np.asarray(image.GetOrigin(), dtype=np.float64) + index_to_physical_matrix(image) @ half


def _require_3d(image: sitk.Image, role: str) -> None:
    if image.GetDimension() != 3:
        raise GeometryError(f"the {role} image is {image.GetDimension()}D; geometry functions need a 3D volume")


# --------------------------------------------------------------------------------------------------------
# working grid and overlap


def working_grid(reference: sitk.Image, size: int) -> sitk.Image:
    """The isotropic S³ grid the network runs on, covering the whole reference field of view.

    * direction cosines: the reference's (so the grid axes are the reference's axes);
    * spacing: isotropic, ``h = max_a(size_a * spacing_a) / S`` mm — the largest physical extent of the
      reference's voxel-extent box divided by S, so along that axis the S voxel cells tile the reference's
      box exactly and along shorter axes the grid extends past the reference (padding, never cropping);
    * origin: chosen so that the grid's centre (continuous index (S - 1) / 2) coincides with the
      reference's physical centre, ``origin = c_ref - D @ (h (S - 1) / 2) (1, 1, 1)``.

    Args:
        reference: 3D reference volume (its pixels are not used).
        size: S, voxels per edge (> 1).

    Returns:
        An all-zero float32 image of size (S, S, S) with that geometry.
    """
    _require_3d(reference, "reference")
    s = int(size)
    if s < 2:
        raise GeometryError(f"working grid size must be at least 2 voxels per edge; got {size}")
    extent = np.asarray(reference.GetSize(), dtype=np.float64) * np.asarray(reference.GetSpacing(), dtype=np.float64)
    h = float(extent.max() / s)
    direction = np.asarray(reference.GetDirection(), dtype=np.float64).reshape(3, 3)
    origin = physical_center(reference) - direction @ np.full(3, h * (s - 1) / 2.0)
    grid = sitk.Image([s, s, s], sitk.sitkFloat32)
    grid.SetSpacing([h, h, h])
    grid.SetDirection(direction.ravel().tolist())
    grid.SetOrigin(origin.tolist())
    return grid


def _sample_lattice(image: sitk.Image, points_per_axis: int) -> sitk.Image:
    """A coarse grid whose points span the voxel centres of ``image`` (first to last) along every axis."""
    size = np.asarray(image.GetSize(), dtype=np.float64)
    n = np.minimum(size, points_per_axis).astype(int)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    spacing = np.where(n > 1, spacing * (size - 1) / np.maximum(n - 1, 1), spacing)
    lattice = sitk.Image([int(v) for v in n], sitk.sitkUInt8)
    lattice.SetSpacing(spacing.tolist())
    lattice.SetOrigin(image.GetOrigin())
    lattice.SetDirection(image.GetDirection())
    return lattice


def overlap_fraction(
    reference: sitk.Image,
    moving: sitk.Image,
    transform: Optional[sitk.Transform] = None,
    points_per_axis: int = 24,
) -> float:
    """Fraction of the reference's field of view whose mapped point ``T(x)`` falls inside the moving volume.

    Evaluated on a lattice of ``points_per_axis``³ points spanning the reference's voxel centres; ``T`` maps
    reference LPS points to moving LPS points (identity when None: header geometry only). Returns a value
    in [0, 1].
    """
    _require_3d(reference, "reference")
    _require_3d(moving, "moving")
    inside = sitk.Image(moving.GetSize(), sitk.sitkUInt8) + 1
    inside.CopyInformation(moving)
    lattice = _sample_lattice(reference, points_per_axis)
    t = transform if transform is not None else sitk.Transform(3, sitk.sitkIdentity)
    hit = sitk.Resample(inside, lattice, t, sitk.sitkNearestNeighbor, 0.0, sitk.sitkUInt8)
    return float(sitk.GetArrayViewFromImage(hit).mean())


def check_overlap(
    reference: sitk.Image,
    moving: sitk.Image,
    transform: Optional[sitk.Transform] = None,
    min_fraction: float = 1e-3,
) -> float:
    """Raise :class:`GeometryError` when the moving volume does not cover the reference's field of view.

    Args:
        reference, moving: 3D volumes in LPS physical space.
        transform: reference -> moving point map (None: header geometry, identity).
        min_fraction: smallest acceptable :func:`overlap_fraction`.

    Returns:
        The overlap fraction in [0, 1] (for reports).
    """
    frac = overlap_fraction(reference, moving, transform)
    if frac < min_fraction:
        gap = float(np.linalg.norm(physical_center(reference) - physical_center(moving)))
        raise GeometryError(
            f"the moving volume covers {100 * frac:.2f}% of the reference's field of view in physical space "
            f"(their centres are {gap:.1f} mm apart): the two headers do not place them over the same anatomy. "
            "Use the centre-of-mass pre-alignment (init='moments', CLI --init moments), or fix the origin/"
            "direction of one file so both are in the same scanner coordinates"
        )
    return frac


# --------------------------------------------------------------------------------------------------------
# pre-alignment


def initial_transform(reference: sitk.Image, moving: sitk.Image, mode: str = "geometry") -> sitk.Transform:
    """Pre-alignment ``T_init`` mapping reference (fixed) LPS points to moving LPS points.

    Args:
        reference, moving: 3D volumes (any pixel type; intensities are only used by ``"moments"``).
        mode: ``"geometry"``: identity — the headers already place both volumes in one physical (scanner)
            space. ``"moments"``: a translation that superimposes the centres of mass of the two volumes'
            foreground masks (Otsu threshold, see :func:`unifuse.intensity.foreground_mask`); masks rather
            than intensities keep it modality independent (CT air at -1000 HU would otherwise get a negative
            weight). Computed with ``sitk.CenteredTransformInitializer(..., MOMENTS)``, translation only.

    Returns:
        ``sitk.Transform`` (identity) or ``sitk.TranslationTransform`` with offset ``com_moving - com_ref`` mm.
    """
    _require_3d(reference, "reference")
    _require_3d(moving, "moving")
    if mode == "geometry":
        return sitk.Transform(3, sitk.sitkIdentity)
    if mode == "moments":
        fixed_mask = sitk.Cast(foreground_mask(reference), sitk.sitkFloat32)
        moving_mask = sitk.Cast(foreground_mask(moving), sitk.sitkFloat32)
        euler = sitk.CenteredTransformInitializer(
            fixed_mask,
            moving_mask,
            sitk.Euler3DTransform(),
            sitk.CenteredTransformInitializerFilter.MOMENTS,
        )
        offset = sitk.Euler3DTransform(euler).GetTranslation()
        return sitk.TranslationTransform(3, offset)
    raise ValueError(f"unknown pre-alignment mode {mode!r}; use 'geometry' or 'moments'")


# --------------------------------------------------------------------------------------------------------
# resampling


def resample(
    image: sitk.Image,
    reference_grid: sitk.Image,
    transform: Optional[sitk.Transform] = None,
    interpolator: str = "linear",
    default: float = 0.0,
) -> sitk.Image:
    """Resample a scalar ``image`` onto ``reference_grid``: ``out(x) = image(T(x))`` for grid points x.

    Args:
        image: scalar volume (any pixel type).
        reference_grid: image whose size/spacing/origin/direction define the output grid (pixels unused).
        transform: maps grid (fixed) LPS points to ``image`` LPS points; None = identity.
        interpolator: ``"linear"``, ``"nearest"`` or ``"bspline"`` (cubic).
        default: value where ``T(x)`` falls outside ``image``.

    Returns:
        float32 image on ``reference_grid``.
    """
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("resample() handles scalar images; use transform_to_displacement() for fields")
    try:
        interp = _INTERPOLATORS[interpolator]
    except KeyError:
        raise ValueError(f"unknown interpolator {interpolator!r}; use one of {sorted(_INTERPOLATORS)}") from None
    t = transform if transform is not None else sitk.Transform(image.GetDimension(), sitk.sitkIdentity)
    return sitk.Resample(image, reference_grid, t, interp, float(default), sitk.sitkFloat32)


def warp_image(
    moving: sitk.Image,
    transform: sitk.Transform,
    reference: sitk.Image,
    interpolator: str = "linear",
    default: float = 0.0,
) -> sitk.Image:
    """THE one resampling of the original moving data onto the reference grid.

    ``aligned(x) = moving(T(x))`` for every reference voxel centre x, with ``T`` typically the composed
    transform of :func:`compose_transform` (``T(x) = T_init(x + u(x))``). Returns float32 on ``reference``'s
    grid; the moving data are interpolated exactly once, whatever the number of transforms composed.
    """
    return resample(moving, reference, transform, interpolator, default)


# --------------------------------------------------------------------------------------------------------
# displacement fields


def on_same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    """Whether two images share one voxel grid up to what image files preserve (NIfTI keeps its geometry in
    float32): equal sizes; spacings within 1e-4 mm, origins within 1e-3 mm, direction cosines within 1e-5
    (absolute, on top of numpy's default relative 1e-5)."""
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-4)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-5))


def _check_same_grid(field: sitk.Image, grid: sitk.Image, tol: float = 1e-5) -> None:
    same = (
        field.GetSize() == grid.GetSize()
        and np.allclose(field.GetSpacing(), grid.GetSpacing(), rtol=tol, atol=tol)
        and np.allclose(field.GetOrigin(), grid.GetOrigin(), rtol=tol, atol=tol)
        and np.allclose(field.GetDirection(), grid.GetDirection(), rtol=tol, atol=tol)
    )
    if not same:
        raise GeometryError(
            f"the displacement field (size {field.GetSize()}, spacing {field.GetSpacing()}) is not on the given "
            f"grid (size {grid.GetSize()}, spacing {grid.GetSpacing()}); resample it with "
            "transform_to_displacement() first"
        )


def field_voxels_to_image(u: np.ndarray, grid: sitk.Image) -> sitk.Image:
    """Turn a voxel displacement array into an ITK displacement field in LPS mm on ``grid``.

    Args:
        u: (3, D, H, W) pull-back displacement in voxels of ``grid``, channels (x, y, z) = (i, j, k), with
            (D, H, W) = reversed ``grid.GetSize()``.
        grid: the grid ``u`` lives on (e.g. :func:`working_grid`).

    Returns:
        3-component ``sitkVectorFloat64`` image with ``grid``'s size/origin/spacing/direction whose pixel at
        index p is ``u_mm(p) = D @ diag(spacing) @ u(p)`` (LPS mm).
    """
    _require_3d(grid, "grid")
    arr = np.asarray(u, dtype=np.float64)
    expected = (3,) + tuple(reversed(grid.GetSize()))
    if arr.shape != expected:
        raise ValueError(f"u must have shape (3, D, H, W) = {expected} for this grid; got {arr.shape}")
    m = index_to_physical_matrix(grid)
    u_mm = np.einsum("ck,kzyx->zyxc", m, arr)
    field = sitk.GetImageFromArray(u_mm, isVector=True)
    field.CopyInformation(grid)
    return field


def field_image_to_voxels(field: sitk.Image, grid: sitk.Image) -> np.ndarray:
    """Inverse of :func:`field_voxels_to_image`.

    Args:
        field: 3-component displacement field in LPS mm, on exactly ``grid``'s geometry.
        grid: the grid whose voxel units are wanted.

    Returns:
        float32 array (3, D, H, W), channels (x, y, z), in voxels of ``grid``:
        ``u_vox = (D @ diag(spacing))^-1 @ u_mm``.
    """
    _require_3d(grid, "grid")
    if field.GetNumberOfComponentsPerPixel() != 3:
        raise ValueError(f"expected a 3-component displacement field; got {field.GetNumberOfComponentsPerPixel()}")
    _check_same_grid(field, grid)
    u_mm = sitk.GetArrayFromImage(field).astype(np.float64)  # (z, y, x, 3)
    m_inv = np.linalg.inv(index_to_physical_matrix(grid))
    return np.einsum("kc,zyxc->kzyx", m_inv, u_mm).astype(np.float32)


def compose_transform(initial: sitk.Transform, field_mm: sitk.Image) -> sitk.Transform:
    """The composed fixed -> moving point map ``T(x) = T_init(x + u(x))``.

    The displacement field is applied first, then ``initial`` (ITK's ``CompositeTransform`` applies its
    transforms last-added first, so the list is ``[initial, field]``). Outside the field's grid ``u = 0``.

    Args:
        initial: pre-alignment, reference LPS -> moving LPS (e.g. :func:`initial_transform`).
        field_mm: pull-back displacement field, LPS mm (e.g. :func:`field_voxels_to_image`); not modified.

    Returns:
        ``sitk.CompositeTransform`` usable in :func:`warp_image` / :func:`transform_to_displacement`.
    """
    if field_mm.GetNumberOfComponentsPerPixel() != 3 or field_mm.GetDimension() != 3:
        raise ValueError("field_mm must be a 3D, 3-component displacement field (LPS mm)")
    # DisplacementFieldTransform takes the buffer of the image it is given: hand it a private copy.
    if field_mm.GetPixelID() == sitk.sitkVectorFloat64:
        field_copy = sitk.Image(field_mm)
    else:
        field_copy = sitk.Cast(field_mm, sitk.sitkVectorFloat64)
    displacement = sitk.DisplacementFieldTransform(field_copy)
    return sitk.CompositeTransform([initial, displacement])


def transform_to_displacement(transform: sitk.Transform, reference: sitk.Image) -> sitk.Image:
    """Express any fixed -> moving point map as one displacement field on ``reference``'s grid.

    ``U(x) = T(x) - x`` (LPS mm) at every reference voxel centre, so ``aligned(x) = moving(x + U(x))``.

    Returns:
        ``sitkVectorFloat64`` image with ``reference``'s size/origin/spacing/direction.
    """
    _require_3d(reference, "reference")
    return sitk.TransformToDisplacementField(
        transform,
        sitk.sitkVectorFloat64,
        reference.GetSize(),
        reference.GetOrigin(),
        reference.GetSpacing(),
        reference.GetDirection(),
    )
