"""Offscreen snapshots (UniFuseSlicerLib.rendering) drawn by Slicer's own displayable managers via trame-slicer.

The outputs are synthetic and known (no network): a structured reference, a different fused volume, an
error map that is 1 on the patient-right half and 0 elsewhere, and a displacement that is a smooth bump in
one corner and exactly zero elsewhere. Each test checks what must be on screen, pixel by pixel.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")
pytest.importorskip("trame_slicer")
import vtk  # noqa: E402
from vtkmodules.util import numpy_support  # noqa: E402

import unifuse  # noqa: E402
from UniFuseSlicerLib import display, logic, rendering, transforms, volumes  # noqa: E402

FLIP = np.diag([-1.0, -1.0, 1.0])
SIZE = (256, 256)
BUMP_CENTRE_LPS = np.array([16.0, 16.0, 7.5])
BUMP_SIGMA, BUMP_AMPLITUDE = 3.0, 3.0


def bump_field(points_lps: np.ndarray) -> np.ndarray:
    """(..., 3) LPS displacement (mm) of the test field at (..., 3) LPS points: a Gaussian bump in-plane."""
    r2 = np.sum((points_lps - BUMP_CENTRE_LPS) ** 2, axis=-1)
    g = BUMP_AMPLITUDE * np.exp(-r2 / (2 * BUMP_SIGMA**2))
    g[r2 > (4 * BUMP_SIGMA) ** 2] = 0.0  # exactly zero beyond 4 sigma
    return g[..., None] * np.array([1.0, 0.6, 0.0])


def make_result(zero_field: bool = False) -> "unifuse.FusionResult":
    nz, ny, nx = 16, 64, 64
    z, y, x = np.mgrid[:nz, :ny, :nx].astype(np.float32)
    reference = sitk.GetImageFromArray((60 + 50 * np.sin(x / 4.0) * np.cos(y / 5.0)).astype(np.float32))
    fused = sitk.GetImageFromArray((200.0 * (((x - 40) ** 2 + (y - 40) ** 2) < 12**2)).astype(np.float32))
    error = sitk.GetImageFromArray((x < nx / 2).astype(np.float32))  # LPS x small = patient right
    jacobian = sitk.GetImageFromArray(np.ones((nz, ny, nx), np.float32))
    for image in (fused, error, jacobian):
        image.CopyInformation(reference)
    points = np.stack([x, y, z], axis=-1).astype(np.float64)  # identity geometry: index = LPS mm
    field = np.zeros(points.shape) if zero_field else bump_field(points)
    displacement = sitk.GetImageFromArray(field, isVector=True)
    displacement.CopyInformation(reference)
    return unifuse.FusionResult(fused=fused, aligned=reference, displacement=displacement, jacobian=jacobian,
                                error_map=error, error_map_before=error, degradation="none",
                                probabilities={"none": 1.0}, report={})


@pytest.fixture(scope="module")
def scene_and_nodes():
    scene = slicer.vtkMRMLScene()
    result = make_result()
    reference = volumes.image_to_volume_node(result.aligned, scene, "reference")
    moving = volumes.image_to_volume_node(result.aligned, scene, "moving")
    nodes = logic.FusionLogic(scene).add_result(result, reference, moving)
    zero = transforms.displacement_to_grid_transform_node(make_result(zero_field=True).displacement, scene, "zero")
    return scene, nodes, zero


@pytest.fixture(scope="module")
def view(scene_and_nodes, offscreen_rendering):
    scene, nodes, _ = scene_and_nodes
    v = rendering.OffscreenSliceView(scene, orientation="Axial", size=SIZE)
    v.show(nodes.reference)
    first = v.capture()
    assert first.shape == (SIZE[1], SIZE[0], 3)
    yield v
    v.close()


def pixels_near(view, lps_point, radius_mm: float) -> np.ndarray:
    """Mask of pixels whose in-plane RAS position lies within ``radius_mm`` of an LPS point."""
    ras = view.pixel_to_ras()
    target = FLIP @ np.asarray(lps_point, dtype=float)
    return np.linalg.norm((ras - target)[..., :2], axis=-1) < radius_mm


def test_overlay_is_real_content_and_follows_the_opacity(scene_and_nodes, view):
    scene, nodes, _ = scene_and_nodes
    view.show(nodes.reference, None)
    reference_only = view.capture().astype(float)
    assert reference_only.std() > 20, "the reference slice must show its structure"

    view.show(nodes.reference, nodes.fused, 0.0)
    transparent = view.capture().astype(float)
    view.set_foreground_opacity(1.0)
    opaque = view.capture().astype(float)
    view.set_foreground_opacity(0.5)
    half = view.capture().astype(float)

    assert np.abs(transparent - reference_only).max() <= 2
    assert np.abs(opaque - reference_only).mean() > 20
    np.testing.assert_allclose(half, (transparent + opaque) / 2, atol=4)  # linear blending of the two layers
    disc = pixels_near(view, (40.0, 40.0, 7.5), 8.0)
    assert opaque[disc].mean() > 200 and opaque[~pixels_near(view, (40.0, 40.0, 7.5), 14.0)].mean() < 30


def test_grid_lines_bend_only_where_the_field_is_non_zero(scene_and_nodes, view):
    scene, nodes, zero = scene_and_nodes
    view.show(nodes.reference, None)
    plain = view.capture().astype(int)
    display.show_deformation_grid(zero, nodes.reference, visible=True, spacing_mm=4.0)
    straight = view.capture().astype(int)
    display.show_deformation_grid(zero, nodes.reference, visible=False)
    display.show_deformation_grid(nodes.displacement, nodes.reference, visible=True, spacing_mm=4.0)
    bent = view.capture().astype(int)
    display.show_deformation_grid(nodes.displacement, nodes.reference, visible=False)

    grid_pixels = np.abs(straight - plain).sum(-1) > 30
    assert grid_pixels.mean() > 0.05, "grid lines must be drawn over the whole reference"
    changed = np.abs(bent - straight).sum(-1) > 30
    influence = pixels_near(view, BUMP_CENTRE_LPS, 4 * BUMP_SIGMA + BUMP_AMPLITUDE + 1.0)
    assert changed[influence].sum() > 100, "lines must move where the field is non-zero"
    assert changed[~influence].sum() <= 0.01 * changed.sum(), "lines must not move where the field is zero"


def test_error_map_colours_transparency_and_legend(scene_and_nodes, view):
    scene, nodes, _ = scene_and_nodes
    view.show(nodes.reference, None)
    reference_only = view.capture().astype(float)
    display.set_legend_visible(nodes.error_map, False)
    view.show(nodes.reference, nodes.error_map, 1.0)
    without_legend = view.capture().astype(float)
    display.set_legend_visible(nodes.error_map, True)
    with_legend = view.capture().astype(float)

    ras = view.pixel_to_ras()
    right_half = (ras[..., 0] > -28.0) & (ras[..., 0] < -4.0) & (ras[..., 1] < -8.0) & (ras[..., 1] > -56.0)
    left_half = (ras[..., 0] < -36.0) & (ras[..., 0] > -60.0) & (ras[..., 1] < -8.0) & (ras[..., 1] > -56.0)
    high = without_legend[right_half]  # error 1: the table's last colour, opaque
    top = [0.0] * 4
    nodes.error_map.GetDisplayNode().GetColorNode().GetColor(255, top)
    np.testing.assert_allclose(high.mean(axis=0), 255 * np.array(top[:3]), atol=6)
    # error 0: fully transparent, the reference shows through unchanged
    assert np.abs(without_legend[left_half] - reference_only[left_half]).max() <= 2

    legend = np.abs(with_legend - without_legend).sum(-1) > 30
    assert legend.sum() > 200, "the colour legend must be drawn"
    columns = np.nonzero(legend.any(axis=0))[0]
    assert columns.min() > 0.3 * SIZE[0], "title, labels and colour bar sit in the right part of the view"
    assert legend[:, int(0.9 * SIZE[0]):].sum() > 50, "the colour bar is at the right edge"

    view.show(nodes.reference, None)  # the error map leaves the view: so does its legend
    assert np.abs(view.capture().astype(float) - reference_only).max() <= 2


def test_snapshot_fusion_writes_three_distinct_pngs_and_restores_the_scene(scene_and_nodes, tmp_path, offscreen_rendering):
    scene, nodes, _ = scene_and_nodes
    slice_nodes_before = scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")
    composites_before = scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")
    paths = rendering.snapshot_fusion(nodes, tmp_path, size=(200, 160))
    assert set(paths) == {"overlay", "grid", "error_map"}
    images = {}
    for name, path in paths.items():
        reader = vtk.vtkPNGReader()
        reader.SetFileName(str(path))
        reader.Update()
        data = reader.GetOutput()
        assert data.GetDimensions()[:2] == (200, 160)
        images[name] = numpy_support.vtk_to_numpy(data.GetPointData().GetScalars()).astype(float)
        assert images[name].std() > 10, f"{name}.png is blank"
    assert np.abs(images["overlay"] - images["grid"]).mean() > 5
    assert np.abs(images["overlay"] - images["error_map"]).mean() > 5
    assert scene.GetNumberOfNodesByClass("vtkMRMLSliceNode") == slice_nodes_before
    assert scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode") == composites_before
    assert not nodes.displacement.GetDisplayNode().GetVisibility2D()


def test_write_png_round_trip(tmp_path):
    rgb = np.zeros((5, 7, 3), np.uint8)
    rgb[0, :, 0] = 255  # top row red
    path = rendering.write_png(rgb, tmp_path / "x.png")
    reader = vtk.vtkPNGReader()
    reader.SetFileName(str(path))
    reader.Update()
    back = numpy_support.vtk_to_numpy(reader.GetOutput().GetPointData().GetScalars()).reshape(5, 7, 3)[::-1]
    assert np.array_equal(back, rgb)
    with pytest.raises(ValueError, match="uint8"):
        rendering.write_png(rgb.astype(float), tmp_path / "y.png")
