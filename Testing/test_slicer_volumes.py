"""SimpleITK image <-> MRML scalar volume node (UniFuseSlicerLib.volumes), on Slicer's real MRML (slicer-core).

The IJKToRAS check is independent of the code under test: Slicer's matrix applied to a voxel index must give
the RAS flip of SimpleITK's own ``TransformIndexToPhysicalPoint`` for that index.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")
import vtk  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

from unifuse.errors import GeometryError, InputImageError  # noqa: E402
from UniFuseSlicerLib import volumes  # noqa: E402
from geometry_helpers import FLIP, rotation  # noqa: E402


def oblique_image(array: np.ndarray, spacing=(0.7, 1.3, 2.1), origin=(12.5, -30.25, 7.0),
                  direction=None) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection((rotation(10, -25, 33) if direction is None else direction).reshape(-1).tolist())
    return image


def ijk_to_ras(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16, np.uint8])
def test_round_trip_is_exact_for_oblique_anisotropic_volumes(scene, dtype):
    rng = np.random.default_rng(1)
    array = (rng.random((7, 9, 11)) * 200 - (0 if dtype == np.uint8 else 50)).astype(dtype)
    image = oblique_image(array)
    node = volumes.image_to_volume_node(image, scene, "vol")
    back = volumes.volume_node_to_image(node)

    assert np.array_equal(sitk.GetArrayFromImage(back), array)
    assert sitk.GetArrayFromImage(back).dtype == array.dtype
    assert back.GetOrigin() == image.GetOrigin()
    assert back.GetSpacing() == image.GetSpacing()
    assert back.GetDirection() == image.GetDirection()
    assert node.GetImageData().GetDimensions() == (11, 9, 7)  # VTK (x, y, z) of a (z, y, x) array


def test_ijk_to_ras_matches_simpleitk_physical_points(scene):
    image = oblique_image(np.zeros((5, 6, 8), np.float32))
    node = volumes.image_to_volume_node(image, scene, "vol")
    matrix = ijk_to_ras(node)
    for index in [(0, 0, 0), (7, 0, 0), (0, 5, 0), (0, 0, 4), (7, 5, 4), (3, 2, 1)]:
        lps = np.array(image.TransformIndexToPhysicalPoint(index))
        ras = matrix @ np.array([*index, 1.0])
        np.testing.assert_allclose(ras[:3], FLIP @ lps, atol=1e-12)
    np.testing.assert_allclose(matrix, volumes.volume_node_ijk_to_ras(node), atol=0)


@settings(max_examples=20, deadline=None)
@given(
    angles=st.tuples(*[st.floats(-180, 180)] * 3),
    spacing=st.tuples(*[st.floats(0.1, 5.0)] * 3),
    origin=st.tuples(*[st.floats(-500, 500)] * 3),
)
def test_round_trip_geometry_property(angles, spacing, origin):
    """Any orientation/spacing/origin survives the round trip. MRML itself flushes direction cosines below
    ~1e-10 and origin components below ~1e-20 mm to zero, hence the absolute tolerance (exactness for
    ordinary values is asserted above)."""
    scene = slicer.vtkMRMLScene()
    image = oblique_image(np.arange(60, dtype=np.float32).reshape(3, 4, 5), spacing, origin, rotation(*angles))
    back = volumes.volume_node_to_image(volumes.image_to_volume_node(image, scene, "v"))
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), rtol=0, atol=1e-12)
    assert back.GetSpacing() == image.GetSpacing()
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), rtol=0, atol=1e-9)


def test_new_nodes_get_unique_names_and_a_display_node(scene):
    image = oblique_image(np.ones((3, 3, 3), np.float32))
    a = volumes.image_to_volume_node(image, scene, "fused")
    b = volumes.image_to_volume_node(image, scene, "fused")
    assert a.GetID() != b.GetID() and a.GetName() != b.GetName()
    assert a.GetDisplayNode() is not None and a.GetDisplayNode().IsA("vtkMRMLScalarVolumeDisplayNode")


def test_update_existing_node_keeps_identity_display_and_attributes(scene):
    first = oblique_image(np.zeros((3, 4, 5), np.float32))
    node = volumes.image_to_volume_node(first, scene, "out")
    node.SetAttribute("keep", "me")
    display_id = node.GetDisplayNodeID()
    second = oblique_image(np.full((6, 5, 4), 7, np.int16), spacing=(1.0, 2.0, 3.0), origin=(1, 2, 3),
                           direction=rotation(0, 0, 90))
    returned = volumes.image_to_volume_node(second, scene, "ignored", node=node)
    assert returned is node
    assert node.GetDisplayNodeID() == display_id and node.GetAttribute("keep") == "me"
    back = volumes.volume_node_to_image(node)
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(second))
    assert back.GetSpacing() == second.GetSpacing() and back.GetOrigin() == second.GetOrigin()


def test_linear_parent_transform_is_part_of_the_world_geometry(scene):
    image = oblique_image(np.zeros((4, 4, 4), np.float32))
    node = volumes.image_to_volume_node(image, scene, "vol")
    to_parent = np.eye(4)
    to_parent[:3, :3] = rotation(0, 0, 30)
    to_parent[:3, 3] = (5.0, -2.0, 11.0)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    transform.SetMatrixTransformToParent(volumes.vtk_matrix_from_array(to_parent))
    node.SetAndObserveTransformNodeID(transform.GetID())

    world = volumes.volume_node_to_image(node, world=True)
    local = volumes.volume_node_to_image(node, world=False)
    assert local.GetOrigin() == image.GetOrigin() and local.GetDirection() == image.GetDirection()
    for index in [(0, 0, 0), (3, 1, 2)]:
        ras_local = FLIP @ np.array(image.TransformIndexToPhysicalPoint(index))
        ras_world = to_parent[:3, :3] @ ras_local + to_parent[:3, 3]
        np.testing.assert_allclose(FLIP @ np.array(world.TransformIndexToPhysicalPoint(index)), ras_world, atol=1e-9)


def test_non_linear_parent_transform_is_refused(scene):
    node = volumes.image_to_volume_node(oblique_image(np.zeros((4, 4, 4), np.float32)), scene, "vol")
    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode")
    node.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(GeometryError, match="Harden transform"):
        volumes.volume_node_to_image(node)
    volumes.volume_node_to_image(node, world=False)  # the stored grid itself is still readable


def test_bad_inputs_raise_specific_errors_and_leave_the_scene_alone(scene):
    before = scene.GetNumberOfNodes()
    vector = sitk.Image([4, 4, 4], sitk.sitkVectorFloat32, 3)
    with pytest.raises(InputImageError, match="components"):
        volumes.image_to_volume_node(vector, scene, "v")
    flat = sitk.Image([4, 4], sitk.sitkFloat32)
    with pytest.raises(InputImageError, match="3-D"):
        volumes.image_to_volume_node(flat, scene, "v")
    assert scene.GetNumberOfNodes() == before

    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(InputImageError, match="no voxel data"):
        volumes.volume_node_to_image(empty)
    model = scene.AddNewNodeByClass("vtkMRMLModelNode", "model")
    with pytest.raises(InputImageError, match="scalar volume"):
        volumes.volume_node_to_image(model)
    with pytest.raises(InputImageError, match="nothing"):
        volumes.volume_node_to_image(None)
