"""Displacement fields (SimpleITK, LPS mm) <-> Slicer grid transform nodes (RAS mm).

The core returns ``U``: a 3-component ITK displacement field on the reference grid, LPS millimetres, with
pull-back semantics ``aligned(x) = moving(x + U(x))`` for physical points ``x`` of the reference grid.

Slicer convention (checked by ``Testing/test_slicer_transforms.py`` with Slicer's own resampler):
a volume node placed under a transform node ``T`` is resampled into world (parent) space by evaluating,
for every world point ``x``, the volume at ``T.TransformFromParent(x)``. So the pull-back map
``x -> x + U(x)`` is exactly the *from-parent* transform of the node, and the node is built with
``SetAndObserveTransformFromParent(vtkOrientedGridTransform)``. Putting the moving volume under that node
shows it aligned to the reference; Slicer computes the to-parent direction (used for points, models and
markups) by iterative inversion on demand.

LPS -> RAS: with ``F = diag(-1, -1, 1)``, ``x_ras = F x_lps``; the RAS field is
``U_ras(x_ras) = F U_lps(F x_ras)``. The grid keeps its voxel array order; its origin and direction cosines
are flipped by ``F`` (points), every displacement vector is flipped by ``F`` (vectors), spacing is unchanged.
In VTK terms: the displacement ``vtkImageData`` holds origin ``F o``, spacing ``s`` and identity direction,
and the grid's direction cosines ``F D`` go into ``vtkOrientedGridTransform.SetGridDirectionMatrix``.
Interpolation is linear, like the SimpleITK ``DisplacementFieldTransform`` the core uses.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import SimpleITK as sitk
import vtk
from vtkmodules.util import numpy_support

import slicer
from unifuse.errors import GeometryError, InputImageError
from unifuse.geometry import LPS_TO_RAS

from .volumes import array_from_vtk_matrix, vtk_matrix_from_array

__all__ = [
    "displacement_to_grid_transform",
    "grid_transform_to_displacement",
    "displacement_to_grid_transform_node",
    "grid_transform_node_to_displacement",
]


_LPS_TO_RAS_DIAGONAL = np.diag(LPS_TO_RAS).copy()
if not np.array_equal(np.diag(_LPS_TO_RAS_DIAGONAL), LPS_TO_RAS):
    raise ImportError("transforms.py expects LPS_TO_RAS to be diagonal")


def _field_array(field: sitk.Image) -> np.ndarray:
    """Validated (z, y, x, 3) float64 copy of an LPS displacement field (vector channels x, y, z)."""
    if field.GetDimension() != 3 or field.GetNumberOfComponentsPerPixel() != 3:
        raise InputImageError(
            f"a displacement field must be a 3-D image with 3 components per voxel; got a "
            f"{field.GetDimension()}-D image with {field.GetNumberOfComponentsPerPixel()} component(s)"
        )
    array = sitk.GetArrayViewFromImage(field).astype(np.float64)  # one copy, whatever the pixel type
    if not np.all(np.isfinite(array)):
        raise InputImageError("the displacement field contains NaN or infinite vectors; it cannot be used as a transform")
    return array


def displacement_to_grid_transform(field: sitk.Image) -> "slicer.vtkOrientedGridTransform":
    """Build the RAS ``vtkOrientedGridTransform`` equal to ``x -> x + U(x)`` of an LPS displacement field.

    Args:
        field: ITK displacement field, 3-D, 3 components (x, y, z) in LPS mm, on any (oblique, anisotropic)
            grid.

    Returns:
        A grid transform mapping RAS points ``x`` to ``x + F U(F x)`` (``F = diag(-1, -1, 1)``), with linear
        interpolation; use it as a node's *from-parent* transform.
    """
    array = _field_array(field)  # (z, y, x, 3), LPS; a private float64 copy
    nz, ny, nx, _ = array.shape
    # LPS -> RAS of every vector: F is diagonal, so an in-place sign flip (a (N, 3) @ (3, 3) product of a
    # 256^3 field costs seconds and another copy)
    vectors_ras = array.reshape(-1, 3)
    vectors_ras *= _LPS_TO_RAS_DIAGONAL
    grid = vtk.vtkImageData()
    grid.SetDimensions(nx, ny, nz)
    grid.SetSpacing(*field.GetSpacing())
    grid.SetOrigin(*(LPS_TO_RAS @ np.asarray(field.GetOrigin(), dtype=np.float64)).tolist())
    displacements = numpy_support.numpy_to_vtk(np.ascontiguousarray(vectors_ras), deep=True)
    displacements.SetName("DisplacementField")
    grid.GetPointData().SetScalars(displacements)

    direction_ras = LPS_TO_RAS @ np.asarray(field.GetDirection(), dtype=np.float64).reshape(3, 3)
    transform = slicer.vtkOrientedGridTransform()
    transform.SetDisplacementGridData(grid)
    transform.SetGridDirectionMatrix(vtk_matrix_from_array(direction_ras))
    transform.SetInterpolationModeToLinear()
    transform.SetDisplacementScale(1.0)
    transform.SetDisplacementShift(0.0)
    return transform


def grid_transform_to_displacement(transform: "slicer.vtkOrientedGridTransform") -> sitk.Image:
    """Inverse of :func:`displacement_to_grid_transform`: the LPS ITK displacement field of a RAS grid.

    Displacement scale and shift of the transform are applied, so the result is the true displacement.
    """
    grid = transform.GetDisplacementGrid()
    if grid is None or grid.GetPointData().GetScalars() is None:
        raise InputImageError("the grid transform has no displacement grid")
    scalars = grid.GetPointData().GetScalars()
    if scalars.GetNumberOfComponents() != 3:
        raise InputImageError(f"the displacement grid has {scalars.GetNumberOfComponents()} components; expected 3")
    nx, ny, nz = grid.GetDimensions()
    vectors_ras = numpy_support.vtk_to_numpy(scalars).astype(np.float64).reshape(-1, 3)
    vectors_ras = vectors_ras * transform.GetDisplacementScale() + transform.GetDisplacementShift()
    vectors_lps = (vectors_ras @ LPS_TO_RAS.T).reshape(nz, ny, nx, 3)

    direction_matrix = transform.GetGridDirectionMatrix()
    direction_ras = np.eye(3) if direction_matrix is None else array_from_vtk_matrix(direction_matrix)[:3, :3]
    field = sitk.GetImageFromArray(vectors_lps, isVector=True)
    field.SetOrigin((LPS_TO_RAS @ np.asarray(grid.GetOrigin(), dtype=np.float64)).tolist())
    field.SetSpacing(grid.GetSpacing())
    field.SetDirection((LPS_TO_RAS @ direction_ras).reshape(-1).tolist())
    return field


def displacement_to_grid_transform_node(
    field: Optional[sitk.Image],
    scene: "slicer.vtkMRMLScene",
    name: str,
    node: Optional["slicer.vtkMRMLGridTransformNode"] = None,
    transform: Optional["slicer.vtkOrientedGridTransform"] = None,
) -> "slicer.vtkMRMLGridTransformNode":
    """Put an LPS pull-back displacement field into ``scene`` as a grid transform node (RAS, from-parent).

    Args:
        field: ITK displacement field (LPS mm) with ``aligned(x) = moving(x + U(x))``.
        scene: the MRML scene.
        name: name of a new node (made unique); ignored when ``node`` is given.
        node: an existing ``vtkMRMLGridTransformNode`` to overwrite; None creates one.
        transform: the grid transform already built from ``field`` by :func:`displacement_to_grid_transform`
            (then ``field`` may be None); lets callers validate everything before touching the scene.

    Returns:
        The node; placing the moving volume under it displays the moving volume aligned to the reference.
    """
    if transform is None:
        transform = displacement_to_grid_transform(field)  # validate before touching the scene
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", scene.GenerateUniqueName(name))
    elif not node.IsA("vtkMRMLGridTransformNode"):
        raise InputImageError(f"output transform '{node.GetName()}' is a {node.GetClassName()}; select a grid transform node")
    node.SetAndObserveTransformFromParent(transform)
    return node


def grid_transform_node_to_displacement(node: "slicer.vtkMRMLTransformNode") -> sitk.Image:
    """The LPS ITK displacement field stored in a grid transform node's from-parent transform.

    Raises:
        GeometryError: the node does not hold a grid transform in the from-parent direction (e.g. it was
            loaded as a to-parent field or composed with other transforms); export it with Slicer's
            Transforms module instead.
    """
    from_parent = node.GetTransformFromParent()
    if isinstance(from_parent, slicer.vtkOrientedGridTransform):
        return grid_transform_to_displacement(from_parent)
    raise GeometryError(
        f"transform '{node.GetName()}' does not store a displacement grid in its from-parent direction "
        f"({from_parent.GetClassName() if from_parent is not None else 'no transform'}); only fields created by "
        f"UniFuse (or loaded from ITK displacement-field files) can be converted"
    )
