"""The working grid of the deformable stages: isotropic, spacing in millimetres, over the overlap.

The network and the refinement run on one grid whose axes are the reference's axes (its direction cosines),
whose spacing is a physical size in mm (default 3 mm, see :mod:`unifuse.options`) and whose extent is the
part of the reference's field of view that the moving volume covers under the global (header/affine)
transform, plus a margin. Edges are whole multiples of the network's ``size_multiple`` (patching and U-Net
pooling), so the grid extends a little past that box, never less. Outside the grid the deformable field is
zero (the global transform alone applies).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from .errors import GeometryError
from .geometry import index_to_physical_matrix

__all__ = ["GridChoice", "overlap_index_box", "grid_over_box", "choose_working_grid"]


def _lattice(image: sitk.Image, n: int) -> Tuple[sitk.Image, np.ndarray]:
    """An n³ lattice grid spanning ``image``'s voxel cells, and its points' continuous indices in ``image``
    as a (P, 3) array (i, j, k) in the lattice's array order (z, y, x flattened)."""
    size = np.asarray(image.GetSize(), dtype=np.float64)
    step = size / max(n - 1, 1)
    lattice = sitk.Image([n, n, n], sitk.sitkUInt8)
    lattice.SetDirection(image.GetDirection())
    lattice.SetSpacing((step * np.asarray(image.GetSpacing())).tolist())
    lattice.SetOrigin((np.asarray(image.GetOrigin()) + index_to_physical_matrix(image) @ np.full(3, -0.5)).tolist())
    k, j, i = np.meshgrid(*(np.arange(n),) * 3, indexing="ij")
    idx = np.stack([i, j, k], axis=-1).reshape(-1, 3) * step - 0.5
    return lattice, idx


def overlap_index_box(
    reference: sitk.Image, moving: sitk.Image, transforms: Sequence[sitk.Transform], points_per_axis: int = 40
) -> Tuple[np.ndarray, np.ndarray]:
    """Bounding box, in the reference's continuous index (i, j, k), of the reference points whose image
    ``T(x)`` lands inside the moving volume for any of ``transforms`` (reference LPS -> moving LPS).

    Returns:
        (lo, hi) float arrays of shape (3,), voxel-cell bounds (-0.5 .. size - 0.5).

    Raises:
        GeometryError: no reference point lands inside the moving volume.
    """
    lattice, idx = _lattice(reference, points_per_axis)
    # map the lattice with numpy (ITK's resampling inverts direction matrices and fails silently on
    # denormal entries): points p = o + M idx, mapped T(p) = p + (T(p) - p), moving index = M_m^-1 (T(p) - o_m)
    points = np.asarray(reference.GetOrigin()) + idx @ index_to_physical_matrix(reference).T
    to_moving_index = np.linalg.inv(index_to_physical_matrix(moving))
    size_m = np.asarray(moving.GetSize(), dtype=np.float64)
    inside = np.zeros(len(idx), dtype=bool)
    for t in transforms:
        shift = sitk.GetArrayFromImage(sitk.TransformToDisplacementField(
            t, sitk.sitkVectorFloat64, lattice.GetSize(), lattice.GetOrigin(), lattice.GetSpacing(),
            lattice.GetDirection())).reshape(-1, 3)
        m_idx = (points + shift - np.asarray(moving.GetOrigin())) @ to_moving_index.T
        inside |= np.all((m_idx >= -0.5) & (m_idx <= size_m - 0.5), axis=1)
    if not inside.any():
        raise GeometryError(
            "the moving volume does not overlap the reference's field of view under the pre-alignment; fix the "
            "headers (origin/direction) or use --init moments"
        )
    return idx[inside].min(axis=0), idx[inside].max(axis=0)


def grid_over_box(
    reference: sitk.Image, lo: np.ndarray, hi: np.ndarray, spacing_mm: float, multiple: int, margin_mm: float = 6.0
) -> sitk.Image:
    """An isotropic grid (reference axes) covering the index box [lo, hi] of ``reference`` plus ``margin_mm``,
    clipped to the reference's field of view, each edge a multiple of ``multiple`` (at least 2 × multiple).

    Returns:
        An all-zero float32 image; its centre is the box's centre.
    """
    spacing = np.asarray(reference.GetSpacing(), dtype=np.float64)
    size = np.asarray(reference.GetSize(), dtype=np.float64)
    margin_vox = margin_mm / spacing
    lo = np.maximum(np.asarray(lo) - margin_vox, -0.5)
    hi = np.minimum(np.asarray(hi) + margin_vox, size - 0.5)
    extent_mm = (hi - lo) * spacing
    h = float(spacing_mm)
    n = [max(2 * multiple, int(math.ceil(e / h / multiple - 1e-6)) * multiple) for e in extent_mm]
    centre_idx = (lo + hi) / 2.0
    direction = np.asarray(reference.GetDirection(), dtype=np.float64).reshape(3, 3)
    centre = np.asarray(reference.GetOrigin()) + index_to_physical_matrix(reference) @ centre_idx
    origin = centre - direction @ (h * (np.asarray(n, dtype=np.float64) - 1) / 2.0)
    grid = sitk.Image([int(v) for v in n], sitk.sitkFloat32)
    grid.SetSpacing([h, h, h])
    grid.SetDirection(direction.ravel().tolist())
    grid.SetOrigin(origin.tolist())
    return grid


@dataclass(frozen=True)
class GridChoice:
    """The working grid chosen for a run and why.

    Attributes:
        grid: the grid (pixels unused).
        requested_spacing_mm: what the options asked for.
        spacing_mm: what is used (raised to the reference's finest spacing, or for memory).
        notes: one sentence per change, for the report.
    """

    grid: sitk.Image
    requested_spacing_mm: float
    spacing_mm: float
    notes: Tuple[str, ...]

    @property
    def size(self) -> List[int]:
        return [int(v) for v in self.grid.GetSize()]

    def to_dict(self) -> dict:
        return {
            "size": self.size, "spacing_mm": [self.spacing_mm] * 3,
            "requested_spacing_mm": self.requested_spacing_mm,
            "origin_lps_mm": list(self.grid.GetOrigin()), "direction": list(self.grid.GetDirection()),
        }


def choose_working_grid(
    reference: sitk.Image,
    box: Tuple[np.ndarray, np.ndarray],
    requested_spacing_mm: float,
    multiple: int,
    bytes_for_voxels,
    budget_bytes: int,
) -> GridChoice:
    """The working grid over ``box`` at the requested spacing, bounded by the data and the memory budget.

    * never finer than the reference's finest spacing (finer than the data adds cost, not detail);
    * coarsened by factors of 1.25 while ``bytes_for_voxels(voxels)`` exceeds ``budget_bytes``.
    """
    notes: List[str] = []
    finest = float(min(reference.GetSpacing()))
    spacing = float(requested_spacing_mm)
    if spacing < finest:
        notes.append(f"working-grid spacing raised from {spacing:g} mm to the reference's own {finest:.3g} mm")
        spacing = finest
    grid = grid_over_box(reference, box[0], box[1], spacing, multiple)
    while bytes_for_voxels(grid.GetNumberOfPixels()) > budget_bytes and spacing < 64:
        spacing *= 1.25
        grid = grid_over_box(reference, box[0], box[1], spacing, multiple)
    if spacing > max(finest, float(requested_spacing_mm)) + 1e-9:
        notes.append(f"working-grid spacing coarsened from {requested_spacing_mm:g} mm to {spacing:.3g} mm to fit "
                     f"the memory budget (the result is still warped at full resolution)")
    return GridChoice(grid, float(requested_spacing_mm), spacing, tuple(notes))
