"""FusionLogic (UniFuseSlicerLib.logic) on Slicer's real MRML (slicer-core) with the real core.

The network is the ``tiny`` config (random, seeded initialisation) on a 16³ working grid, so runs take a few
seconds on CPU; what is tested is the MRML side: new output nodes with the reference geometry, untouched
inputs, colour tables, legends, slice layers, subject hierarchy, attributes, the background-process path
(the real ``python -m unifuse.cli``), cancellation and failure leaving the scene unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

MODULE_DIR = Path(__file__).resolve().parents[1] / "UniFuseSlicer"

slicer = pytest.importorskip("slicer")

import unifuse  # noqa: E402
from unifuse.config import DEGRADATION_CLASSES, MOVING_MODALITIES, tiny  # noqa: E402
from unifuse.errors import CancelledError, GeometryError, InputImageError, UniFuseError  # noqa: E402
from unifuse.options import FuseOptions  # noqa: E402
from UniFuseSlicerLib import background, dependencies, display, hierarchy, logic, options, sampledata  # noqa: E402
from UniFuseSlicerLib import transforms, volumes  # noqa: E402

RUN_OPTIONS = dict(device="cpu", config="tiny", spacing_mm=4.0, affine="none", refine="none")


def rotation_z(degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    return np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])


def synthetic_pair():
    """Reference (28x26x24, oblique, anisotropic) and moving (26x24x22, other obliquity, shifted blob)."""
    z, y, x = np.mgrid[:24, :26, :28].astype(np.float32)
    blob = np.exp(-((x - 14) ** 2 + (y - 13) ** 2 + (z - 12) ** 2) / 40.0)
    reference = sitk.GetImageFromArray((100 * blob + x).astype(np.float32))
    reference.SetSpacing((1.2, 1.0, 1.5))
    reference.SetOrigin((-16.0, -13.0, -18.0))
    reference.SetDirection(rotation_z(12).reshape(-1).tolist())
    zm, ym, xm = np.mgrid[:22, :24, :26].astype(np.float32)
    moving_blob = np.exp(-((xm - 12) ** 2 + (ym - 12) ** 2 + (zm - 11) ** 2) / 50.0)
    moving = sitk.GetImageFromArray((80 * moving_blob).astype(np.float32))
    moving.SetSpacing((1.1, 1.1, 1.4))
    moving.SetOrigin((-14.0, -13.5, -15.0))
    moving.SetDirection(rotation_z(-8).reshape(-1).tolist())
    return reference, moving


def new_scene():
    """A scene like Slicer's: three slice views' composite nodes; ``slicer.mrmlScene`` points at it."""
    scene = slicer.vtkMRMLScene()
    for name in ("Red", "Yellow", "Green"):
        composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
        composite.SetLayoutName(name)
    slicer.mrmlScene = scene
    return scene


def ijk_to_ras(node) -> np.ndarray:
    return volumes.volume_node_ijk_to_ras(node, world=False)


def node_ids(scene) -> list:
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


def input_state(node) -> dict:
    return {
        "array": slicer.util.arrayFromVolume(node).copy(),
        "matrix": ijk_to_ras(node),
        "name": node.GetName(),
        "parent": node.GetTransformNodeID(),
        "display": node.GetDisplayNodeID(),
        "attributes": {a: node.GetAttribute(a) for a in node.GetAttributeNames()},
    }


def assert_unchanged(node, state) -> None:
    after = input_state(node)
    assert np.array_equal(after["array"], state["array"])
    assert np.array_equal(after["matrix"], state["matrix"])
    for key in ("name", "parent", "display", "attributes"):
        assert after[key] == state[key], key


class FakeDicomDatabase:
    """The part of ``ctkDICOMDatabase`` the module uses: instance UID -> file -> Modality (0008,0060)."""

    def __init__(self, modalities, is_open=True, fail=False):
        self.modalities = dict(modalities)  # instance UID -> Modality value
        self.isOpen = is_open
        self.fail = fail
        self.asked = []

    def fileForInstance(self, uid):
        self.asked.append(uid)
        if self.fail:
            raise RuntimeError("database is locked")
        return f"/dicom/{uid}.dcm" if uid in self.modalities else ""

    def fileValue(self, path, tag):
        assert tag == "0008,0060"
        return self.modalities[Path(path).stem]


def as_dicom_loaded(node, uids="1.2.840.1 1.2.840.2"):
    """Mark ``node`` the way Slicer's DICOM scalar-volume loader does."""
    node.SetAttribute("DICOM.instanceUIDs", uids)
    return node


@pytest.fixture(scope="module")
def run():
    """One in-process run on a fresh scene: (scene, reference node, moving node, input states, FusionNodes)."""
    scene = new_scene()
    reference_image, moving_image = synthetic_pair()
    reference = volumes.image_to_volume_node(reference_image, scene, "T1 reference")
    moving = volumes.image_to_volume_node(moving_image, scene, "T2 moving")
    states = {"reference": input_state(reference), "moving": input_state(moving)}
    ids_before = set(node_ids(scene))
    fractions = []
    nodes = logic.FusionLogic(scene).process(reference, moving, progress=lambda f, m: fractions.append(f), **RUN_OPTIONS)
    return scene, reference, moving, states, ids_before, fractions, nodes


# ---------------------------------------------------------------------------------------------------------
# in-process run


def test_outputs_are_new_nodes_on_the_reference_grid(run):
    scene, reference, moving, states, ids_before, fractions, nodes = run
    reference_matrix = ijk_to_ras(reference)
    for role in logic.VOLUME_ROLES:
        node = nodes.node(role)
        assert node.GetID() not in ids_before, role
        assert node.IsA("vtkMRMLScalarVolumeNode")
        assert node.GetImageData().GetDimensions() == reference.GetImageData().GetDimensions()
        np.testing.assert_allclose(ijk_to_ras(node), reference_matrix, rtol=0, atol=1e-12)
        assert np.isfinite(slicer.util.arrayFromVolume(node)).all()
    assert nodes.displacement.IsA("vtkMRMLGridTransformNode") and nodes.displacement.GetID() not in ids_before
    assert fractions[0] == 0.0 and fractions[-1] == 1.0 and fractions == sorted(fractions)


def test_inputs_are_unchanged(run):
    scene, reference, moving, states, *_ = run
    assert_unchanged(reference, states["reference"])
    assert_unchanged(moving, states["moving"])
    assert moving.GetParentTransformNode() is None


def test_nodes_hold_exactly_the_core_outputs(run):
    """Same inputs, same seeded tiny network: the nodes carry the core's images, field included."""
    scene, reference, moving, states, ids_before, fractions, nodes = run
    result = unifuse.fuse(volumes.volume_node_to_image(reference), volumes.volume_node_to_image(moving), **RUN_OPTIONS)
    for role in logic.VOLUME_ROLES:
        np.testing.assert_allclose(slicer.util.arrayFromVolume(nodes.node(role)),
                                   sitk.GetArrayFromImage(getattr(result, role)), rtol=0, atol=1e-6)
    field = transforms.grid_transform_node_to_displacement(nodes.displacement)
    np.testing.assert_allclose(sitk.GetArrayFromImage(field), sitk.GetArrayFromImage(result.displacement), atol=1e-9)
    assert field.GetOrigin() == result.displacement.GetOrigin()
    assert nodes.degradation == result.degradation
    assert nodes.degradation in DEGRADATION_CLASSES
    assert abs(sum(nodes.probabilities.values()) - 1.0) < 1e-5


def test_colour_tables_windows_and_legends(run):
    scene, reference, moving, states, ids_before, fractions, nodes = run
    expected = {"error_map": ("error", display.ERROR_MAP_RANGE), "error_map_before": ("error", display.ERROR_MAP_RANGE),
                "jacobian": ("jacobian", display.JACOBIAN_RANGE)}
    for role, (kind, (low, high)) in expected.items():
        volume_display = nodes.node(role).GetDisplayNode()
        table = volume_display.GetColorNode()
        assert table.GetAttribute(display.COLOR_TABLE_ATTRIBUTE) == kind
        assert table.GetNumberOfColors() == 256
        assert not volume_display.GetAutoWindowLevel()
        assert (volume_display.GetWindowLevelMin(), volume_display.GetWindowLevelMax()) == pytest.approx((low, high))
        legends = [nodes.node(role).GetNthDisplayNode(i) for i in range(nodes.node(role).GetNumberOfDisplayNodes())]
        legends = [d for d in legends if d.IsA("vtkMRMLColorLegendDisplayNode")]
        assert len(legends) == 1 and legends[0].GetTitleText()
    jacobian_table = nodes.jacobian.GetDisplayNode().GetColorNode()
    rgba = [0.0] * 4
    jacobian_table.GetColor(0, rgba)
    assert rgba == [1.0, 0.0, 0.0, 1.0]  # folding (det <= 0) is red
    # one table per kind, shared by both error maps
    assert nodes.error_map.GetDisplayNode().GetColorNodeID() == nodes.error_map_before.GetDisplayNode().GetColorNodeID()
    for role in ("fused", "aligned"):
        assert nodes.node(role).GetDisplayNode().GetColorNodeID() == "vtkMRMLColorTableNodeGrey"


def test_slice_views_show_reference_under_fused(run):
    scene, reference, moving, states, ids_before, fractions, nodes = run
    composites = display.slice_composite_nodes(scene)
    assert len(composites) == 3
    for composite in composites:
        assert composite.GetBackgroundVolumeID() == reference.GetID()
        assert composite.GetForegroundVolumeID() == nodes.fused.GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(0.5)


def test_subject_hierarchy_folder_and_provenance_attributes(run):
    scene, reference, moving, states, ids_before, fractions, nodes = run
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    assert sh.GetItemName(nodes.folder_item) == "UniFuse: T2 moving -> T1 reference"
    children = {sh.GetItemDataNode(item).GetID() for item in logic._item_children(sh, nodes.folder_item)}
    assert children == {n.GetID() for n in nodes.output_nodes().values()}
    assert sh.GetItemAttribute(nodes.folder_item, "UniFuse.Reference") == "T1 reference"
    report = json.loads(sh.GetItemAttribute(nodes.folder_item, "UniFuse.Report"))
    assert report["model"]["config"] == "tiny"
    for role, node in nodes.output_nodes().items():
        assert node.GetAttribute(hierarchy.ROLE_ATTRIBUTE) == role
        assert node.GetAttribute("UniFuse.ReferenceID") == reference.GetID()
        assert node.GetAttribute("UniFuse.MovingID") == moving.GetID()
        assert node.GetAttribute("UniFuse.Moving") == "T2 moving"
        assert node.GetAttribute("UniFuse.ModelTrained") == "false"
        assert "tiny" in node.GetAttribute("UniFuse.ModelID")
        assert node.GetAttribute("UniFuse.Version") == unifuse.__version__
        recorded = json.loads(node.GetAttribute("UniFuse.Options"))
        assert recorded == {**FuseOptions(**RUN_OPTIONS).to_dict(), "mode": "in-process"}
        assert recorded["spacing_mm"] == 4.0 and recorded["config"] == "tiny" and recorded["refine"] == "none"
        assert json.loads(node.GetAttribute("UniFuse.Probabilities")) == pytest.approx(nodes.probabilities)


def test_display_switches_overlay_legend_and_grid(run):
    scene, reference, moving, states, ids_before, fractions, nodes = run
    fusion = logic.FusionLogic(scene)

    def legend_visible(node):
        return [node.GetNthDisplayNode(i).GetVisibility() for i in range(node.GetNumberOfDisplayNodes())
                if node.GetNthDisplayNode(i).IsA("vtkMRMLColorLegendDisplayNode")][0]

    fusion.show_result(nodes, overlay="jacobian", opacity=0.8, show_grid=True)
    for composite in display.slice_composite_nodes(scene):
        assert composite.GetForegroundVolumeID() == nodes.jacobian.GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(0.8)
    assert legend_visible(nodes.jacobian) and not legend_visible(nodes.error_map)
    grid = nodes.displacement.GetDisplayNode()
    assert grid.GetVisualizationMode() == slicer.vtkMRMLTransformDisplayNode.VIS_MODE_GRID
    assert grid.GetVisibility() and grid.GetVisibility2D() and not grid.GetVisibility3D()
    assert grid.GetRegionNode() is reference
    assert grid.GetGridSpacingMm() == pytest.approx(display.default_grid_spacing_mm(reference))

    fusion.show_result(nodes, overlay="error_map", opacity=0.3, show_grid=False)
    assert legend_visible(nodes.error_map) and not legend_visible(nodes.jacobian)
    assert not grid.GetVisibility2D()
    fusion.show_result(nodes)  # back to the default view
    with pytest.raises(ValueError, match="overlay"):
        fusion.show_result(nodes, overlay="displacement")
    with pytest.raises(ValueError, match="opacity"):
        fusion.show_result(nodes, opacity=1.5)


def test_nodes_from_output_rebuilds_the_run(run):
    scene, reference, moving, states, ids_before, fractions, nodes = run
    rebuilt = logic.FusionLogic(scene).nodes_from_output(nodes.error_map_before)
    assert rebuilt is not None
    assert rebuilt.output_nodes() == nodes.output_nodes()
    assert rebuilt.reference is reference and rebuilt.moving is moving
    assert rebuilt.degradation == nodes.degradation and rebuilt.report["model"] == nodes.report["model"]
    assert logic.FusionLogic(scene).nodes_from_output(reference) is None


def test_summary_lists_diagnosis_timings_device_and_model(run):
    *_, nodes = run
    text = nodes.summary()
    assert text.startswith("Degradation used:")
    for label in ("no degradation", "MRI motion artifacts", "CT metal artifacts + noise", "low-dose PET noise"):
        assert label in text
    assert "Time:" in text and "network" in text and "Device: cpu" in text
    assert "UNTRAINED" in text and "WARNING" in text
    # the synthetic moving volume is not in HU and not from DICOM: the core only measured "not CT"
    assert nodes.report["degradation"]["moving_modality"]["used"] == "mr_or_pet"
    assert "Moving modality: MRI or PET (measured by the HU scale)" in text.splitlines()


def test_summary_shows_the_core_notes():
    report = {**_report(), "notes": ["the restored output (restored.nii.gz) is ... not verified"]}
    lines = logic.format_summary("motion", {"motion": 1.0}, report).splitlines()
    assert lines[-1] == "Note: the restored output (restored.nii.gz) is ... not verified"
    assert not [l for l in logic.format_summary("none", {"none": 1.0}, _report()).splitlines() if l.startswith("Note:")]


def _report(modality=None, slicer_note=None):
    report = {"degradation": {"requested": "auto", "predicted": "none", "used": "none"}, "device": "cpu"}
    if modality is not None:
        report["degradation"]["moving_modality"] = modality
    if slicer_note is not None:
        report["slicer"] = {"moving_modality": slicer_note}
    return report


def test_summary_names_the_moving_modality_and_where_it_came_from():
    def line(report):
        found = [l for l in logic.format_summary("none", {"none": 1.0}, report).splitlines()
                 if l.startswith("Moving modality")]
        assert len(found) <= 1
        return found[0] if found else None

    user = {"requested": "mr", "stated": "mr", "source": "user", "used": "mr"}
    assert line(_report(user)) == "Moving modality: MRI (set by the user)"
    assert line(_report({"requested": "auto", "stated": "pet", "source": "DICOM header", "used": "pet"})) == \
        "Moving modality: PET (from the DICOM header)"
    assert line(_report({"requested": "auto", "stated": "auto", "source": "measured (HU scale: CT or not)",
                         "used": "ct"})) == "Moving modality: CT (measured by the HU scale)"
    # resolved by the module from Slicer's DICOM database: the core saw a stated modality ("user")
    from_database = {"requested": "auto", "stated": "mr", "source": "DICOM database", "dicom_modality": "MR"}
    assert line(_report(user, from_database)) == "Moving modality: MRI (from the DICOM database: Modality MR)"
    # the user chose it: the note of the module does not override the core's source
    assert line(_report(user, {"requested": "mr", "stated": "mr", "source": "user", "dicom_modality": None})) == \
        "Moving modality: MRI (set by the user)"
    contradicted = {"requested": "auto", "stated": "auto", "source": "DICOM database contradicted (not in HU)",
                    "dicom_modality": "CT"}
    measured = {"requested": "auto", "stated": "auto", "source": "measured (HU scale: CT or not)", "used": "mr_or_pet"}
    assert line(_report(measured, contradicted)) == ("Moving modality: MRI or PET (measured by the HU scale; the DICOM "
                                                     "database says Modality CT, but the voxels are not in Hounsfield units)")
    # reports of core versions without the moving modality: no line, no error
    assert line(_report()) is None
    assert line({"degradation": "none"}) is None and line({}) is None


def test_modality_from_dicom_maps_ct_mr_pt_like_the_core():
    assert options.modality_from_dicom("CT") == "ct"
    assert options.modality_from_dicom("MR") == "mr"
    assert options.modality_from_dicom("PT") == "pet"
    assert options.modality_from_dicom(" mr ") == "mr"
    for value in ("", "PET", "US", "OT", "SEG", "RTDOSE", None, 3):
        assert options.modality_from_dicom(value) is None, value
    # the same mapping as the core's for DICOM inputs
    from unifuse.io import DICOM_MODALITY_TAG, header_modality

    for value in ("CT", "MR", "PT", "pt", "US", "PET", "NM"):
        image = sitk.Image([2, 2, 2], sitk.sitkFloat32)
        image.SetMetaData(DICOM_MODALITY_TAG, value)
        assert options.modality_from_dicom(value) == header_modality(image), value


def test_dicom_modality_lookup_guards(monkeypatch):
    scene = new_scene()
    reference_image, moving_image = synthetic_pair()
    plain = volumes.image_to_volume_node(moving_image, scene, "not from DICOM")
    database = FakeDicomDatabase({"1.2.840.1": "MR", "1.2.840.2": "MR"})
    assert logic.dicom_modality(plain, database) is None  # no DICOM.instanceUIDs attribute
    assert database.asked == []
    assert logic.dicom_modality(None, database) is None
    loaded = as_dicom_loaded(volumes.image_to_volume_node(moving_image, scene, "from DICOM"))
    assert logic.dicom_modality(loaded, database) == "MR"
    monkeypatch.delattr(slicer, "dicomDatabase", raising=False)  # no DICOM module (slicer-core has none)
    assert logic.dicom_modality(loaded) is None
    monkeypatch.setattr(slicer, "dicomDatabase", database, raising=False)  # Slicer's application database
    assert logic.dicom_modality(loaded) == "MR"
    monkeypatch.setattr(slicer, "dicomDatabase", None, raising=False)
    assert logic.dicom_modality(loaded) is None
    assert logic.dicom_modality(loaded, FakeDicomDatabase({"1.2.840.1": "MR"}, is_open=False)) is None
    assert logic.dicom_modality(loaded, FakeDicomDatabase({})) is None  # files no longer in the database
    assert logic.dicom_modality(loaded, FakeDicomDatabase({"1.2.840.2": "PT"})) == "PT"  # first UID known
    assert logic.dicom_modality(loaded, FakeDicomDatabase({"1.2.840.1": " "})) is None
    assert logic.dicom_modality(loaded, FakeDicomDatabase({"1.2.840.1": "MR"}, fail=True)) is None


def test_auto_is_resolved_from_the_dicom_database():
    scene = new_scene()
    _, moving_image = synthetic_pair()  # float, no air: not in HU
    moving = as_dicom_loaded(volumes.image_to_volume_node(moving_image, scene, "moving"))
    resolve = logic.resolve_moving_modality
    mr = FakeDicomDatabase({"1.2.840.1": "MR"})
    assert resolve("auto", moving, mr) == logic.ModalityResolution("auto", "mr", "DICOM database", "MR")
    assert resolve("auto", moving, FakeDicomDatabase({"1.2.840.1": "PT"})).stated == "pet"
    # the user's choice wins; the database is not asked
    asked = FakeDicomDatabase({"1.2.840.1": "MR"})
    assert resolve("pet", moving, asked) == logic.ModalityResolution("pet", "pet", "user")
    assert asked.asked == []
    # no usable modality: left to the core
    assert resolve("auto", moving, FakeDicomDatabase({"1.2.840.1": "US"})).stated == "auto"
    assert resolve("auto", moving, None).source == "detected by the core"
    # CT in the database but not in HU: not stated (the core would refuse "ct"), the core measures it
    ct = FakeDicomDatabase({"1.2.840.1": "CT"})
    assert resolve("auto", moving, ct) == logic.ModalityResolution(
        "auto", "auto", "DICOM database contradicted (not in HU)", "CT")
    # a CT in HU (int16, air at -1000) is stated
    hu = np.full((20, 24, 24), -1000, dtype=np.int16)
    hu[4:16, 4:20, 4:20] = 40
    ct_image = sitk.GetImageFromArray(hu)
    ct_node = as_dicom_loaded(volumes.image_to_volume_node(ct_image, scene, "CT"))
    assert resolve("auto", ct_node, ct) == logic.ModalityResolution("auto", "ct", "DICOM database", "CT")


def test_in_process_run_states_the_dicom_modality_and_says_so():
    scene = new_scene()
    reference_image, moving_image = synthetic_pair()
    reference = volumes.image_to_volume_node(reference_image, scene, "reference")
    moving = as_dicom_loaded(volumes.image_to_volume_node(moving_image, scene, "moving"))
    fusion = logic.FusionLogic(scene, dicom_database=FakeDicomDatabase({"1.2.840.1": "MR"}))
    nodes = fusion.process(reference, moving, show=False, **RUN_OPTIONS)
    assert nodes.report["degradation"]["moving_modality"] == {"requested": "mr", "stated": "mr", "source": "user",
                                                              "used": "mr"}
    assert nodes.report["slicer"]["moving_modality"]["source"] == "DICOM database"
    assert "Moving modality: MRI (from the DICOM database: Modality MR)" in nodes.summary().splitlines()
    assert json.loads(nodes.fused.GetAttribute("UniFuse.Options"))["moving_modality"] == "mr"
    # the note is kept with the run's report: a run found again from its nodes says the same
    rebuilt = fusion.nodes_from_output(nodes.jacobian)
    assert "Moving modality: MRI (from the DICOM database: Modality MR)" in rebuilt.summary().splitlines()
    # the user's choice is passed as it is
    chosen = fusion.process(reference, moving, show=False, moving_modality="pet", **RUN_OPTIONS)
    assert chosen.report["degradation"]["moving_modality"]["used"] == "pet"
    assert "Moving modality: PET (set by the user)" in chosen.summary().splitlines()


def test_a_second_run_creates_new_nodes_or_overwrites_selected_ones(run):
    scene, reference, moving, states, ids_before, fractions, nodes = run
    existing_fused = nodes.fused
    second = logic.FusionLogic(scene).process(
        reference, moving, outputs=logic.OutputNodes(fused=existing_fused), show=False, **RUN_OPTIONS)
    assert second.fused is existing_fused
    assert second.aligned is not nodes.aligned and second.folder_item != nodes.folder_item
    with pytest.raises(InputImageError, match="input volume"):
        logic.FusionLogic(scene).process(reference, moving, outputs=logic.OutputNodes(aligned=moving), **RUN_OPTIONS)


# ---------------------------------------------------------------------------------------------------------
# failures and cancellation leave the scene unchanged


def test_cancelled_and_failed_runs_leave_the_scene_unchanged():
    scene = new_scene()
    reference_image, moving_image = synthetic_pair()
    reference = volumes.image_to_volume_node(reference_image, scene, "reference")
    moving = volumes.image_to_volume_node(moving_image, scene, "moving")
    fusion = logic.FusionLogic(scene)
    before = node_ids(scene)
    with pytest.raises(CancelledError):
        fusion.process(reference, moving, cancel=lambda: True, **RUN_OPTIONS)
    assert node_ids(scene) == before
    with pytest.raises(UniFuseError, match="degradation"):
        fusion.process(reference, moving, degradation="blur", **RUN_OPTIONS)
    assert node_ids(scene) == before
    with pytest.raises(InputImageError, match="same volume"):
        fusion.process(reference, reference, **RUN_OPTIONS)
    with pytest.raises(InputImageError, match="no moving volume"):
        fusion.process(reference, None, **RUN_OPTIONS)
    assert node_ids(scene) == before


def test_adding_a_broken_result_rolls_back_every_created_node():
    scene = new_scene()
    reference_image, moving_image = synthetic_pair()
    reference = volumes.image_to_volume_node(reference_image, scene, "reference")
    moving = volumes.image_to_volume_node(moving_image, scene, "moving")
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    items_before = sh.GetNumberOfItems()
    before = node_ids(scene)
    good = reference_image
    field = sitk.Image(list(good.GetSize()), sitk.sitkVectorFloat64, 3)
    field.CopyInformation(good)
    # a complex error map passes the up-front shape checks and is refused only when its node is made, after
    # the fused and aligned nodes were created: those must be removed again
    complex_map = sitk.RealAndImaginaryToComplex(good, good)
    broken = unifuse.FusionResult(fused=good, aligned=good, displacement=field, jacobian=good, error_map=complex_map,
                                  error_map_before=good, degradation="none", probabilities={"none": 1.0})
    with pytest.raises(InputImageError, match="complex"):
        logic.FusionLogic(scene).add_result(broken, reference, moving)
    assert node_ids(scene) == before
    assert sh.GetNumberOfItems() == items_before

    two_components = sitk.Image(list(good.GetSize()), sitk.sitkVectorFloat64, 2)  # refused before any node is made
    broken.error_map, broken.displacement = good, two_components
    with pytest.raises(InputImageError, match="3 components"):
        logic.FusionLogic(scene).add_result(broken, reference, moving)
    assert node_ids(scene) == before


# ---------------------------------------------------------------------------------------------------------
# background process (real CLI)


def test_cli_command_and_environment(tmp_path):
    options = FuseOptions(degradation="metal", moving_modality="ct", device="cuda", weights="w.pt", spacing_mm=2.5,
                          config="tiny", refine="full", network=False, fusion_spacing_mm=1.0)
    command = logic.build_cli_command("r.nrrd", "m.nrrd", tmp_path, options, overwrite=True, python="py")
    assert command == ["py", "-m", "unifuse.cli", "fuse", "--reference", "r.nrrd", "--moving", "m.nrrd",
                       "--out", str(tmp_path), "--degradation", "metal", "--moving-modality", "ct",
                       "--device", "cuda", "--weights", "w.pt",
                       "--config", "tiny", "--spacing", "2.5", "--no-network", "--refine", "full",
                       "--fusion-spacing", "1.0", "--overwrite",
                       "--machine-progress"]
    # the CLI reads back exactly these options
    from unifuse.cli import build_parser

    parsed = build_parser().parse_args(command[3:-2])
    assert FuseOptions.from_namespace(parsed) == options
    assert logic.build_cli_command("r", "m", "o")[-1] == "--machine-progress"
    with pytest.raises(UniFuseError, match="degradation"):
        FuseOptions(degradation="blur")
    with pytest.raises(UniFuseError, match="device"):
        FuseOptions(device="tpu")
    with pytest.raises(UniFuseError, match="moving modality"):
        FuseOptions(moving_modality="PT")
    env = logic.cli_environment({"PYTHONPATH": "/elsewhere"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(logic.core_package_parent()), "/elsewhere"]
    assert (logic.core_package_parent() / "unifuse" / "cli.py").is_file()


def test_exported_inputs_keep_exact_geometry(tmp_path):
    scene = new_scene()
    reference_image, moving_image = synthetic_pair()
    reference = volumes.image_to_volume_node(reference_image, scene, "reference")
    moving = volumes.image_to_volume_node(moving_image, scene, "moving")
    paths = logic.FusionLogic(scene).export_inputs(reference, moving, tmp_path)
    for path, image in zip(paths, (reference_image, moving_image)):
        written = sitk.ReadImage(str(path))
        assert written.GetOrigin() == image.GetOrigin() and written.GetDirection() == image.GetDirection()
        assert np.array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(image))


def test_background_run_equals_in_process_run(run):
    scene, reference, moving, states, ids_before, fractions, nodes = run
    progress, log = [], []
    job = logic.FusionLogic(scene).start_background(
        reference, moving, **RUN_OPTIONS,
        on_progress=lambda f, m: progress.append((f, m)), on_log=log.append)
    result = job.wait(timeout=180)
    assert not job.work_dir.exists()  # temporary inputs/outputs removed
    for role in logic.VOLUME_ROLES:
        np.testing.assert_allclose(slicer.util.arrayFromVolume(result.node(role)),
                                   slicer.util.arrayFromVolume(nodes.node(role)), rtol=0, atol=1e-5)
        np.testing.assert_array_equal(ijk_to_ras(result.node(role)), ijk_to_ras(reference))  # snapped exactly
    np.testing.assert_allclose(sitk.GetArrayFromImage(transforms.grid_transform_node_to_displacement(result.displacement)),
                               sitk.GetArrayFromImage(transforms.grid_transform_node_to_displacement(nodes.displacement)),
                               atol=1e-6)
    fractions_seen = [f for f, _ in progress]
    assert fractions_seen == sorted(fractions_seen) and fractions_seen[-1] == 1.0
    assert any("running UniFuse" in m for _, m in progress)  # the CLI's own stage messages came through
    assert json.loads(result.fused.GetAttribute("UniFuse.Options"))["mode"] == "background process"
    assert_unchanged(reference, states["reference"])
    assert_unchanged(moving, states["moving"])


def test_background_run_cancelled_at_once_adds_nothing():
    scene = new_scene()
    reference_image, moving_image = synthetic_pair()
    reference = volumes.image_to_volume_node(reference_image, scene, "reference")
    moving = volumes.image_to_volume_node(moving_image, scene, "moving")
    before = node_ids(scene)
    job = logic.FusionLogic(scene).start_background(reference, moving, **RUN_OPTIONS)
    job.cancel()
    with pytest.raises(CancelledError):
        while job.poll() is None:
            pass
    assert node_ids(scene) == before
    assert not job.work_dir.exists()


def test_failed_background_run_reports_the_cli_reason(tmp_path):
    scene = new_scene()
    reference_image, moving_image = synthetic_pair()
    reference = volumes.image_to_volume_node(reference_image, scene, "reference")
    moving = volumes.image_to_volume_node(moving_image, scene, "moving")
    before = node_ids(scene)
    job = logic.FusionLogic(scene).start_background(reference, moving, device="cpu", weights=tmp_path / "none.pt")
    with pytest.raises(UniFuseError, match="none.pt"):
        job.wait(timeout=120)
    assert node_ids(scene) == before


def test_load_cli_outputs_refuses_foreign_or_incomplete_folders(tmp_path, run):
    scene, reference, moving, *_ = run
    before = node_ids(scene)
    fusion = logic.FusionLogic(scene)
    with pytest.raises(InputImageError, match="did not write"):
        fusion.load_cli_outputs(tmp_path, reference, moving)
    other_image, _ = synthetic_pair()
    other_image.SetOrigin((-13.0, -13.0, -18.0))  # same size, 3 mm away: outputs of another reference
    result = unifuse.fuse(other_image, volumes.volume_node_to_image(moving), **RUN_OPTIONS)
    result.save(tmp_path)
    with pytest.raises(GeometryError, match="origin"):
        fusion.load_cli_outputs(tmp_path, reference, moving)
    assert node_ids(scene) == before


# ---------------------------------------------------------------------------------------------------------
# child-process runner, options, dependencies, sample data


def test_progress_line_parsing():
    assert background.parse_progress_line("PROGRESS 0.350 running UniFuse on cpu\n") == (0.35, "running UniFuse on cpu")
    assert background.parse_progress_line("PROGRESS 1.7 done") == (1.0, "done")
    assert background.parse_progress_line("PROGRESS -1 x") == (0.0, "x")
    assert background.parse_progress_line("PROGRESS 0.5") == (0.5, "")
    assert background.parse_progress_line("PROGRESS nan x") is None
    assert background.parse_progress_line("PROGRESS abc x") is None
    assert background.parse_progress_line("unifuse: error: bad") is None


def test_cli_process_delivers_progress_log_and_error_in_order():
    script = ("import sys\n"
              "print('PROGRESS 0.25 first', file=sys.stderr, flush=True)\n"
              "print('a log line', flush=True)\n"
              "print('PROGRESS 0.75 second', file=sys.stderr, flush=True)\n"
              "print('unifuse: error: the reason', file=sys.stderr, flush=True)\n"
              "sys.exit(3)\n")
    progress, log = [], []
    process = background.CliProcess([sys.executable, "-c", script], on_progress=lambda f, m: progress.append((f, m)),
                                    on_log=log.append)
    process.start()
    assert process.wait(timeout=60) == 3
    assert progress == [(0.25, "first"), (0.75, "second")]
    assert "a log line" in log and "unifuse: error: the reason" in log
    assert process.error_message() == "unifuse: error: the reason"
    with pytest.raises(RuntimeError, match="already started"):
        process.start()


def test_cli_process_cancel_stops_a_running_child():
    process = background.CliProcess([sys.executable, "-c", "import time; print('PROGRESS 0.1 started', "
                                     "file=__import__('sys').stderr, flush=True); time.sleep(60)"])
    process.start()
    process.cancel(grace_s=10)  # returns at once; SIGTERM ends this child within the grace period
    assert process.wait(timeout=10) != 0
    assert process.cancelled and process.error_message() == "cancelled by the user"


def test_options_match_the_core():
    assert options.degradation_values() == ["auto", *DEGRADATION_CLASSES]
    assert options.moving_modality_values() == list(MOVING_MODALITIES) == ["auto", "ct", "mr", "pet"]
    assert [c.label for c in options.MOVING_MODALITY_CHOICES][1:] == ["CT", "MRI", "PET"]
    from unifuse.cli import build_parser

    for value in options.moving_modality_values():  # every value reaches the CLI as the core reads it back
        command = logic.build_cli_command("r", "m", "o", FuseOptions(moving_modality=value))
        parsed = FuseOptions.from_namespace(build_parser().parse_args(command[3:-1]))
        assert parsed.moving_modality == value
        assert ("--moving-modality" in command) == (value != "auto")
    assert [c.value for c in options.OVERLAY_CHOICES] == list(logic.VOLUME_ROLES)
    # the device list needs no torch: auto/cpu/cuda from the start, labels refined by the probe's GPUs
    assert [c.value for c in options.device_choices()] == list(options.DEVICE_VALUES) == ["auto", "cpu", "cuda"]
    assert [c.value for c in options.device_choices([])] == ["auto", "cpu", "cuda"]
    assert "no CUDA GPU" in options.device_choices([])[0].label
    two = [options.GpuInfo(0, "NVIDIA H200", 139.8), options.GpuInfo(1, "NVIDIA H200", 139.8)]
    assert options.device_choices(two)[2].label == "GPU 0: NVIDIA H200 (139.8 GiB) (+1 more; select with CUDA_VISIBLE_DEVICES)"
    from unifuse.options import FuseOptions as _FuseOptions

    for value in options.DEVICE_VALUES:
        _FuseOptions(device=value)  # every value is one the core accepts
    assert [c.value for c in options.OUTPUT_MODE_CHOICES] == ["new", "update"]


def test_dependency_plan_and_constraints(tmp_path):
    plan = dependencies.installation_plan()
    assert plan.torch_ok and plan.ready and plan.pip_requirements == []  # this venv has everything
    assert "nibabel>=4" in dependencies.PIP_REQUIREMENTS.values()  # the CLI verifies its NIfTI outputs with it
    assert dependencies.missing_pip_requirements({"unifuse_no_such_module": "nosuch>=1.0", "numpy": "numpy>=1.24"}) \
        == ["nosuch>=1.0"]
    text = dependencies.constraints_text()
    assert f"numpy=={np.__version__}" in text.splitlines()
    assert f"SimpleITK=={dependencies.installed_version('SimpleITK')}" in text.splitlines()
    path = dependencies.write_constraints_file(tmp_path)
    assert path.read_text(encoding="utf-8") == text
    assert dependencies.pip_install_arguments(["scipy>=1.10"], path) == ["scipy>=1.10", "--constraint", str(path)]
    assert dependencies.version_at_least("2.13.0+cpu", "2.1") and not dependencies.version_at_least("2.0.1", "2.1")
    missing = dependencies.InstallationPlan(torch_ok=False, torch_version="2.0.1", pip_requirements=["scipy>=1.10"])
    assert not missing.ready and "PyTorch >= 2.1 (found torch 2.0.1)" in missing.describe()


class _RecordingSampleDataLogic:
    """Stands in for SampleData.SampleDataLogic: records what would be registered."""

    calls: list = []

    @classmethod
    def registerCustomSampleDataSource(cls, **kwargs):
        cls.calls.append(kwargs)


def test_sample_data_registration(tmp_path):
    module_dir = tmp_path / "UniFuseSlicer"
    data_dir = sampledata.sample_data_directory(module_dir)
    data_dir.mkdir(parents=True)
    (module_dir / "Resources" / "Icons").mkdir(parents=True)
    (module_dir / "Resources" / "Icons" / "UniFuseSlicer.png").write_bytes(b"png")
    (data_dir / "reference.nii.gz").write_bytes(b"reference bytes")

    registrations, missing = sampledata.sample_sources(module_dir)
    assert registrations == [] and missing == [data_dir / "moving.nii.gz"]

    (data_dir / "moving.nii.gz").write_bytes(b"moving bytes")
    _RecordingSampleDataLogic.calls = []
    assert sampledata.register_sample_data(_RecordingSampleDataLogic, module_dir) == []
    (call,) = _RecordingSampleDataLogic.calls
    assert call["category"] == "UniFuse" and call["sampleName"] == "UniFuseSample"
    assert call["fileNames"] == ["reference.nii.gz", "moving.nii.gz"]
    assert call["uris"] == [(data_dir / n).resolve().as_uri() for n in call["fileNames"]]
    assert call["checksums"][1] == "SHA256:" + hashlib.sha256(b"moving bytes").hexdigest()
    assert call["thumbnailFileName"].endswith("UniFuseSlicer.png")
