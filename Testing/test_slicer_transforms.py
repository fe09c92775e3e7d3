"""Displacement field (LPS, pull-back) <-> vtkMRMLGridTransformNode (RAS, from-parent), proved with Slicer's
own resampler.

The equivalence test is the point of this file: the moving volume is resampled onto the reference grid

* by the core (``unifuse.geometry.warp_image`` = SimpleITK, ``aligned(x) = moving(x + U(x))``), and
* by Slicer (``vtkSlicerVolumesLogic.ResampleVolumeToReferenceVolume``) with the moving volume node placed
  under the grid transform node built by ``UniFuseSlicerLib.transforms``,

for a rotation + smooth non-rigid field on oblique, anisotropic, mutually different grids; both must agree
to interpolation round-off. The same field stored in the to-parent direction is shown to disagree, so the
test can tell the two conventions apart.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")
from vtkmodules.util import numpy_support  # noqa: E402

from unifuse import geometry  # noqa: E402
from unifuse.errors import GeometryError, InputImageError  # noqa: E402
from UniFuseSlicerLib import transforms, volumes  # noqa: E402
from geometry_helpers import FLIP, rotation  # noqa: E402


def grid_image(size_xyz, spacing, origin, direction, array=None) -> sitk.Image:
    nx, ny, nz = size_xyz
    image = sitk.GetImageFromArray(np.zeros((nz, ny, nx), np.float32) if array is None else array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction.reshape(-1).tolist())
    return image


def physical_points(image: sitk.Image) -> np.ndarray:
    """(z, y, x, 3) LPS points of every voxel centre."""
    nx, ny, nz = image.GetSize()
    k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    index = np.stack([i, j, k], axis=-1).reshape(-1, 3).astype(float)
    a = geometry.ijk_to_lps_matrix(image)
    return (index @ a[:3, :3].T + a[:3, 3]).reshape(nz, ny, nx, 3)


@pytest.fixture(scope="module")
def case():
    """Moving volume, reference grid and a rotation + smooth-bump pull-back field (LPS mm)."""
    moving_shape = (26, 28, 30)  # (z, y, x)
    z, y, x = np.mgrid[: moving_shape[0], : moving_shape[1], : moving_shape[2]].astype(float)
    moving_array = (np.sin(x / 3.1) + np.cos(y / 4.3) * np.sin(z / 5.2) + 0.4 * np.cos((x + y) / 6.0)).astype(np.float32)
    moving = grid_image((30, 28, 26), (1.3, 1.1, 1.7), (-17.0, -14.0, -21.0), rotation(10, 0, 20), moving_array)
    reference = grid_image((24, 22, 20), (1.5, 1.2, 1.9), (-15.0, -11.0, -17.0), rotation(0, 15, -10))

    points = physical_points(reference)
    centre = points.reshape(-1, 3).mean(axis=0)
    rot = rotation(4, 0, 6)
    field = (points - centre) @ rot.T + centre - points  # rigid rotation about the centre
    bump = np.exp(-np.sum((points - centre - np.array([3.0, 0.0, 0.0])) ** 2, axis=-1) / (2 * 6.0**2))
    field += 2.0 * bump[..., None] * np.array([1.0, -0.5, 0.7])
    displacement = sitk.GetImageFromArray(field, isVector=True)
    displacement.CopyInformation(reference)
    return moving, reference, displacement


def test_field_round_trip_is_exact(case):
    _, _, displacement = case
    scene = slicer.vtkMRMLScene()
    node = transforms.displacement_to_grid_transform_node(displacement, scene, "U")
    back = transforms.grid_transform_node_to_displacement(node)
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(displacement))
    assert back.GetOrigin() == displacement.GetOrigin()
    assert back.GetSpacing() == displacement.GetSpacing()
    assert back.GetDirection() == displacement.GetDirection()
    assert node.IsA("vtkMRMLGridTransformNode")
    assert isinstance(node.GetTransformFromParent(), slicer.vtkOrientedGridTransform)


def test_from_parent_transform_maps_x_to_x_plus_u(case):
    """At grid points, the node's from-parent transform is x_ras -> x_ras + F U(F x_ras)."""
    _, reference, displacement = case
    scene = slicer.vtkMRMLScene()
    node = transforms.displacement_to_grid_transform_node(displacement, scene, "U")
    from_parent = node.GetTransformFromParent()
    points = physical_points(reference)
    field = sitk.GetArrayFromImage(displacement)
    for kji in [(0, 0, 0), (10, 11, 12), (19, 21, 23), (5, 17, 2)]:
        x_ras = FLIP @ points[kji]
        expected = x_ras + FLIP @ field[kji]
        np.testing.assert_allclose(from_parent.TransformPoint(*x_ras), expected, atol=1e-9)


def test_to_parent_is_the_inverse(case):
    """Slicer inverts the grid for the to-parent direction: to_parent(from_parent(x)) = x."""
    _, reference, displacement = case
    scene = slicer.vtkMRMLScene()
    node = transforms.displacement_to_grid_transform_node(displacement, scene, "U")
    from_parent, to_parent = node.GetTransformFromParent(), node.GetTransformToParent()
    points = physical_points(reference)
    for kji in [(10, 11, 12), (6, 8, 15)]:
        x_ras = FLIP @ points[kji]
        np.testing.assert_allclose(to_parent.TransformPoint(*from_parent.TransformPoint(*x_ras)), x_ras, atol=1e-2)


def _resample_in_slicer(moving: sitk.Image, reference: sitk.Image, displacement: sitk.Image, direction: str):
    scene = slicer.vtkMRMLScene()
    moving_node = volumes.image_to_volume_node(moving, scene, "moving")
    reference_node = volumes.image_to_volume_node(reference, scene, "reference")
    if direction == "from_parent":
        transform_node = transforms.displacement_to_grid_transform_node(displacement, scene, "U")
    else:  # the wrong convention, as a negative control
        transform_node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode")
        transform_node.SetAndObserveTransformToParent(transforms.displacement_to_grid_transform(displacement))
    moving_node.SetAndObserveTransformNodeID(transform_node.GetID())
    # Slicer's resampler evaluates, for every reference voxel, the moving volume at the point given by the
    # moving node's transform-from-world (vtkSlicerVolumesLogic.cxx). Its output node is a clone of the moving
    # node and so stays under the same transform node; its voxels are already on the reference grid, hence
    # world=False when reading the output's own IJKToRAS below.
    output = slicer.vtkSlicerVolumesLogic.ResampleVolumeToReferenceVolume(moving_node, reference_node)
    nx, ny, nz = output.GetImageData().GetDimensions()
    array = numpy_support.vtk_to_numpy(output.GetImageData().GetPointData().GetScalars()).reshape(nz, ny, nx)
    return array, volumes.volume_node_ijk_to_ras(output, world=False), volumes.volume_node_ijk_to_ras(reference_node)


def test_slicer_resampling_through_the_node_equals_the_core_warp(case):
    moving, reference, displacement = case
    core = sitk.GetArrayFromImage(
        geometry.warp_image(moving, sitk.DisplacementFieldTransform(sitk.Image(displacement)), reference)
    )
    slicer_array, output_matrix, reference_matrix = _resample_in_slicer(moving, reference, displacement, "from_parent")

    np.testing.assert_allclose(output_matrix, reference_matrix, atol=1e-9)  # Slicer resampled onto the reference grid
    inside = (core != 0) & (slicer_array != 0)  # both resamplers pad outside the moving volume with 0
    assert inside.mean() > 0.4, "the test field must keep a large part of the reference inside the moving volume"
    value_range = float(np.ptp(sitk.GetArrayFromImage(moving)))
    error = np.abs(core - slicer_array)[inside]
    assert error.max() < 1e-3 * value_range, f"max difference {error.max():.3g} (range {value_range:.3g})"

    # Negative control: the same grid as to-parent transform resamples differently (so the test can fail).
    wrong, _, _ = _resample_in_slicer(moving, reference, displacement, "to_parent")
    both = (core != 0) & (wrong != 0)
    assert np.abs(core - wrong)[both].max() > 0.2 * value_range


def test_grid_direction_and_origin_are_flipped_to_ras(case):
    _, reference, displacement = case
    transform = transforms.displacement_to_grid_transform(displacement)
    grid = transform.GetDisplacementGrid()
    np.testing.assert_array_equal(grid.GetOrigin(), FLIP @ np.array(reference.GetOrigin()))
    np.testing.assert_array_equal(grid.GetSpacing(), reference.GetSpacing())
    direction = volumes.array_from_vtk_matrix(transform.GetGridDirectionMatrix())[:3, :3]
    np.testing.assert_allclose(direction, FLIP @ np.array(reference.GetDirection()).reshape(3, 3), atol=0)
    assert transform.GetInterpolationModeAsString() == "Linear"


def test_bad_fields_and_nodes_raise_specific_errors():
    scene = slicer.vtkMRMLScene()
    scalar = sitk.Image([4, 4, 4], sitk.sitkFloat32)
    with pytest.raises(InputImageError, match="3 components"):
        transforms.displacement_to_grid_transform_node(scalar, scene, "U")
    nan_field = sitk.GetImageFromArray(np.full((4, 4, 4, 3), np.nan), isVector=True)
    with pytest.raises(InputImageError, match="NaN"):
        transforms.displacement_to_grid_transform_node(nan_field, scene, "U")
    assert scene.GetNumberOfNodesByClass("vtkMRMLGridTransformNode") == 0

    linear = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "rigid")
    with pytest.raises(GeometryError, match="rigid"):
        transforms.grid_transform_node_to_displacement(linear)
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    field = sitk.GetImageFromArray(np.zeros((4, 4, 4, 3)), isVector=True)
    with pytest.raises(InputImageError, match="grid transform"):
        transforms.displacement_to_grid_transform_node(field, scene, "U", node=volume)
