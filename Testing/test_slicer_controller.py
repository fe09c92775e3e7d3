"""The run controller behind the module's Apply/Cancel button (UniFuseSlicerLib.controller) on Slicer's real
MRML (slicer-core) with the real core and the real CLI in a child process: success, failure with the child's
own error message, cancel, rerun, "update the previous result" (constant node count), the moving volume under
the transform only on request, slice views rotated to and fitted on an oblique reference.

The widget in UniFuseSlicer.py only forwards buttons and a timer to this controller, so these are the GUI's
run/cancel/poll/error paths.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

from UniFuseSlicerLib import background, display, logic, selftest, volumes  # noqa: E402
from UniFuseSlicerLib.controller import RunController, RunRequest, RunView  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_slicer_logic import FakeDicomDatabase, as_dicom_loaded, input_state, assert_unchanged, synthetic_pair  # noqa: E402

FAST = dict(device="cpu", config="tiny", spacing_mm=4.0, affine="none", refine="none")


class RecordingView(RunView):
    """Records what the controller reports, like the widget shows it."""

    def __init__(self):
        self.events = []
        self.progress_values = []
        self.lines = []
        self.outcomes = []
        self.on_progress = None

    def run_started(self, request):
        self.events.append("started")

    def progress(self, fraction, message):
        self.progress_values.append((fraction, message))
        if self.on_progress is not None:
            self.on_progress(fraction, message)

    def log(self, text):
        self.lines.append(text)

    def run_ended(self, outcome):
        self.events.append(outcome.status)
        self.outcomes.append(outcome)


def new_scene():
    """A scene like Slicer's: three slice views (slice + composite nodes); ``slicer.mrmlScene`` points at it."""
    scene = slicer.vtkMRMLScene()
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    for name, orientation in (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal")):
        slice_node = scene.AddNewNodeByClass("vtkMRMLSliceNode")
        slice_node.SetLayoutName(name)
        slice_node.SetOrientation(orientation)
        slice_node.SetDimensions(400, 300, 1)
        composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
        composite.SetLayoutName(name)
    slicer.mrmlScene = scene
    return scene


def new_pair(scene):
    reference_image, moving_image = synthetic_pair()
    return (volumes.image_to_volume_node(reference_image, scene, "T1 reference"),
            volumes.image_to_volume_node(moving_image, scene, "T2 moving"))


def node_ids(scene):
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


def sh_items(scene):
    return slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene).GetNumberOfItems()


def poll_to_end(controller, timeout=240.0):
    """Drive the controller like the widget's 200 ms timer (faster here); each poll must return at once."""
    deadline = time.monotonic() + timeout
    slowest = 0.0
    while True:
        t = time.monotonic()
        running = controller.poll()
        slowest = max(slowest, time.monotonic() - t)
        if not running:
            return slowest
        assert time.monotonic() < deadline, "the run did not end"
        time.sleep(0.05)


@pytest.fixture
def scene_pair():
    scene = new_scene()
    reference, moving = new_pair(scene)
    return scene, reference, moving


# ---------------------------------------------------------------------------------------------------------
# success, rerun, update the previous result


def test_background_success_then_rerun_updating_the_previous_result(scene_pair):
    scene, reference, moving = scene_pair
    as_dicom_loaded(moving)  # its DICOM database is closed until the third run
    database = FakeDicomDatabase({"1.2.840.1": "MR"}, is_open=False)
    states = {"reference": input_state(reference), "moving": input_state(moving)}
    view = RecordingView()
    controller = RunController(logic.FusionLogic(scene, dicom_database=database), view)
    before = len(node_ids(scene))

    assert controller.start(RunRequest(reference, moving, options=FAST))
    assert controller.running and controller.state == "running" and view.events == ["started"]
    poll_to_end(controller)
    assert view.events == ["started", "succeeded"] and not controller.running
    first = view.outcomes[-1].nodes
    assert first is controller.last_nodes and first.fused.GetImageData() is not None
    assert len(node_ids(scene)) - before >= 6
    assert view.progress_values[-1][0] == 1.0
    assert any("running UniFuse" in message for _, message in view.progress_values)  # the CLI's own stages
    # views: reference under fused, rotated to the oblique (12 degrees) reference, fitted to it
    for composite in display.slice_composite_nodes(scene):
        assert composite.GetBackgroundVolumeID() == reference.GetID()
        assert composite.GetForegroundVolumeID() == first.fused.GetID()
    ijk_to_ras = volumes.volume_node_ijk_to_ras(reference)[:3, :3]
    voxel_axes = ijk_to_ras / np.linalg.norm(ijk_to_ras, axis=0)
    for slice_node in display.slice_nodes(scene):
        slice_axes = np.array([[slice_node.GetSliceToRAS().GetElement(r, c) for c in range(3)] for r in range(3)])
        # every view axis runs along a voxel axis of the oblique reference (a permutation, up to sign)
        np.testing.assert_allclose(np.sort(np.abs(slice_axes.T @ voxel_axes), axis=1)[:, -1], 1.0, atol=1e-9)
    red = next(n for n in display.slice_nodes(scene) if n.GetLayoutName() == "Red")
    bounds = [0.0] * 6
    reference.GetRASBounds(bounds)
    center = [red.GetSliceToRAS().GetElement(r, 3) for r in range(3)]
    np.testing.assert_allclose(center, [(bounds[2 * i] + bounds[2 * i + 1]) / 2 for i in range(3)], atol=1.0)
    assert moving.GetParentTransformNode() is None  # not asked for
    # no DICOM modality (closed database): the core measured the modality, the summary says so
    assert first.report["degradation"]["moving_modality"]["source"] == "measured (HU scale: CT or not)"
    assert "Moving modality: MRI or PET (measured by the HU scale)" in first.summary().splitlines()
    assert not any("--moving-modality" in line for line in view.lines)

    # rerun, "update the previous result": the same nodes are overwritten, nothing is added; the moving
    # modality chosen in the GUI reaches the CLI
    ids, items = node_ids(scene), sh_items(scene)
    assert controller.start(RunRequest(reference, moving, options={**FAST, "degradation": "motion",
                                                                   "moving_modality": "mr"},
                                       output_mode="update"))
    assert controller.background_run.options.moving_modality == "mr"
    poll_to_end(controller)
    second = view.outcomes[-1].nodes
    assert view.outcomes[-1].succeeded
    assert node_ids(scene) == ids and sh_items(scene) == items
    assert all(second.node(role) is first.node(role) for role in logic.ROLES)
    assert second.degradation == "motion" and second.folder_item == first.folder_item
    assert second.report["degradation"]["moving_modality"] == {"requested": "mr", "stated": "mr", "source": "user",
                                                               "used": "mr"}
    assert "Moving modality: MRI (set by the user)" in second.summary().splitlines()
    # a third run with new nodes adds a second set; "auto" now finds the moving volume's DICOM modality
    database.isOpen = True
    view.lines.clear()
    assert controller.start(RunRequest(reference, moving, options={**FAST, "moving_modality": "auto"},
                                       output_mode="new"))
    poll_to_end(controller)
    third = view.outcomes[-1].nodes
    assert len(node_ids(scene)) > len(ids) and third.fused is not first.fused
    running = [line for line in view.lines if line.startswith("Running: ")]
    assert len(running) == 1 and " --moving-modality mr " in running[0]
    assert any("DICOM Modality MR from the DICOM database" in line for line in view.lines)
    assert third.report["degradation"]["moving_modality"]["used"] == "mr"
    assert "Moving modality: MRI (from the DICOM database: Modality MR)" in third.summary().splitlines()
    assert_unchanged(reference, states["reference"])
    assert_unchanged(moving, states["moving"])


def test_in_process_run_update_mode_and_moving_under_the_transform(scene_pair):
    scene, reference, moving = scene_pair
    view = RecordingView()
    events = []
    view.process_events = lambda: events.append("events")
    controller = RunController(logic.FusionLogic(scene), view)
    assert controller.start(RunRequest(reference, moving, options=FAST, background=False,
                                       place_moving_under_transform=True))
    assert not controller.running and view.events == ["started", "succeeded"]
    assert events, "an in-process run must let the GUI process events at every progress step"
    nodes = view.outcomes[-1].nodes
    assert moving.GetParentTransformNode() is nodes.displacement  # asked for explicitly
    assert any("is now under" in line for line in view.lines)

    # rerun from the moving volume itself (not through the earlier result), updating the same nodes
    ids = node_ids(scene)
    assert controller.start(RunRequest(reference, moving, options=FAST, background=False, output_mode="update",
                                       place_moving_under_transform=True))
    again = view.outcomes[-1].nodes
    assert view.outcomes[-1].succeeded and node_ids(scene) == ids
    np.testing.assert_allclose(slicer.util.arrayFromVolume(again.aligned), slicer.util.arrayFromVolume(nodes.aligned),
                               atol=1e-5)
    assert moving.GetParentTransformNode() is again.displacement is nodes.displacement


def test_placing_under_the_transform_refuses_to_replace_a_users_transform(scene_pair):
    scene, reference, moving = scene_pair
    user_transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "user pre-alignment")
    moving.SetAndObserveTransformNodeID(user_transform.GetID())
    view = RecordingView()
    controller = RunController(logic.FusionLogic(scene), view)
    assert controller.start(RunRequest(reference, moving, options=FAST, background=False,
                                       place_moving_under_transform=True))
    outcome = view.outcomes[-1]
    assert outcome.succeeded and moving.GetParentTransformNode() is user_transform
    assert outcome.warnings and "user pre-alignment" in outcome.warnings[0]
    assert any(line.startswith("Warning:") for line in view.lines)


def test_update_never_overwrites_this_runs_inputs(scene_pair):
    """An earlier fused volume picked as the next moving volume gets a new fused node, not itself."""
    scene, reference, moving = scene_pair
    view = RecordingView()
    controller = RunController(logic.FusionLogic(scene), view)
    controller.start(RunRequest(reference, moving, options=FAST, background=False))
    first = view.outcomes[-1].nodes
    outputs = controller.outputs_for(RunRequest(reference, first.fused, output_mode="update"))
    assert outputs.fused is None and outputs.aligned is first.aligned and outputs.count() == 5
    explicit = logic.OutputNodes(aligned=first.error_map)
    outputs = controller.outputs_for(RunRequest(reference, moving, output_mode="update", outputs=explicit))
    assert outputs.aligned is first.error_map and outputs.error_map is None  # an explicit pick wins, once
    assert controller.outputs_for(RunRequest(reference, moving, output_mode="new")).count() == 0
    scene.RemoveNode(first.jacobian)
    assert controller.outputs_for(RunRequest(reference, moving, output_mode="update")).jacobian is None


# ---------------------------------------------------------------------------------------------------------
# failure, cancel


def test_failure_shows_the_childs_error_and_a_rerun_works(scene_pair, tmp_path):
    scene, reference, moving = scene_pair
    view = RecordingView()
    controller = RunController(logic.FusionLogic(scene), view)
    before = node_ids(scene)
    assert controller.start(RunRequest(reference, moving, options={"device": "cpu", "weights": str(tmp_path / "none.pt")}))
    poll_to_end(controller)
    outcome = view.outcomes[-1]
    assert outcome.status == "failed" and not controller.running
    assert "none.pt" in outcome.message  # the CLI's own one-line reason
    assert "UniFuse process output (stderr)" in outcome.details and "none.pt" in outcome.details
    assert node_ids(scene) == before
    # options the core refuses fail before anything starts, with the core's message
    assert not controller.start(RunRequest(reference, moving, options={"degradation": "blur"}))
    assert view.outcomes[-1].status == "failed" and "degradation" in view.outcomes[-1].message
    assert view.outcomes[-1].message.startswith("Failed to start UniFuse")
    assert not controller.running and node_ids(scene) == before
    # and the next run works
    assert controller.start(RunRequest(reference, moving, options=FAST, background=False))
    assert view.outcomes[-1].succeeded


@pytest.mark.skipif(sys.platform == "win32", reason="process liveness via /proc")
def test_cancel_returns_at_once_and_leaves_no_process_and_no_node(scene_pair):
    scene, reference, moving = scene_pair
    view = RecordingView()
    controller = RunController(logic.FusionLogic(scene), view)
    before = node_ids(scene)
    assert controller.start(RunRequest(reference, moving, options=FAST))
    run = controller.background_run
    deadline = time.monotonic() + 120
    while not any(f > 0.02 for f, _ in view.progress_values):  # the child is up and computing
        assert controller.poll() and time.monotonic() < deadline
        time.sleep(0.05)
    t = time.monotonic()
    controller.cancel()
    assert time.monotonic() - t < 0.2 and controller.state == "cancelling"
    assert view.progress_values[-1][1] == "cancelling"
    slowest = poll_to_end(controller, timeout=30)
    assert slowest < 0.5
    assert view.events == ["started", "cancelled"] and not controller.running
    assert node_ids(scene) == before
    assert not run.work_dir.exists()
    deadline = time.monotonic() + 10
    while background.pid_alive(run.process.pid):
        assert time.monotonic() < deadline, "the cancelled process is still alive"
        time.sleep(0.05)


def test_in_process_cancel_stops_between_stages(scene_pair):
    scene, reference, moving = scene_pair
    view = RecordingView()
    controller = RunController(logic.FusionLogic(scene), view)
    view.on_progress = lambda fraction, message: controller.cancel() if fraction > 0 else None  # the Cancel button
    before = node_ids(scene)
    assert controller.start(RunRequest(reference, moving, options=FAST, background=False))
    assert view.events == ["started", "cancelled"] and not controller.running
    assert node_ids(scene) == before and controller.last_nodes is None


def test_one_run_at_a_time_and_prepare_can_decline(scene_pair):
    scene, reference, moving = scene_pair
    view = RecordingView()
    asked = []
    controller = RunController(logic.FusionLogic(scene), view, prepare=lambda request: asked.append(request) or False)
    assert not controller.start(RunRequest(reference, moving, options=FAST))
    assert len(asked) == 1 and view.events == [] and not controller.running  # e.g. the user declined installing
    controller.prepare = None
    assert controller.start(RunRequest(reference, moving, options=FAST))
    assert not controller.start(RunRequest(reference, moving, options=FAST))  # refused while running
    assert any("in progress" in line for line in view.lines)
    controller.shutdown(timeout=5)  # module cleanup: stops the run and removes its folder
    assert not controller.running
    controller.cancel()  # nothing running: no-op
    assert controller.poll() is False


# ---------------------------------------------------------------------------------------------------------
# the self-test's scene side (what ctest runs on Slicer without PyTorch)


def test_scene_side_of_the_self_test_passes_on_slicer_core(scene_pair):
    scene, reference, moving = scene_pair
    lines = []
    selftest.check_scene_side(scene, reference, moving, log=lines.append)
    assert lines[-1] == "Scene side passed"
    assert moving.GetParentTransformNode() is None


def test_synthetic_result_is_made_without_torch():
    import subprocess

    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'torch': raise ImportError('torch blocked')\n"
            "sys.meta_path.insert(0, Block())\n"
            f"sys.path.insert(0, {str(Path(__file__).parents[1] / 'UniFuseSlicer')!r})\n"
            "import SimpleITK as sitk, numpy as np\n"
            "from UniFuseSlicerLib.selftest import synthetic_result\n"
            "img = sitk.GetImageFromArray(np.random.rand(8, 9, 10).astype(np.float32))\n"
            "r = synthetic_result(img, img)\n"
            "assert r.displacement.GetNumberOfComponentsPerPixel() == 3\n"
            "assert 'torch' not in sys.modules\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
