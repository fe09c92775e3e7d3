"""The scene side of the module's self-test: everything between a result and the MRML scene, without the
network (so it runs on any Slicer, also without PyTorch, e.g. in the build machines' ctest).

:func:`synthetic_result` makes a ``FusionResult`` with SimpleITK alone (a known translation as displacement
field, the moving volume resampled through it, simple fused and error maps); :func:`check_scene_side` adds
it to a scene the way a real run does and checks the MRML contract: outputs on the reference grid,
untouched inputs, one subject-hierarchy folder, "update the previous result" keeping the node count
constant, "put the moving volume under the transform" being explicit and undone by a rerun's input
handling, and the slice views showing reference + fused, rotated to and fitted on the reference.

Used by ``UniFuseSlicerTest.test_SceneSide`` in ``UniFuseSlicer.py`` and by ``Testing/test_slicer_controller.py``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from . import display, hierarchy
from .logic import ROLES, VOLUME_ROLES, FusionLogic, OutputNodes, input_image
from .volumes import volume_node_ijk_to_ras

__all__ = ["SHIFT_MM", "synthetic_result", "check_scene_side"]

#: The synthetic result's displacement: a constant shift (LPS mm).
SHIFT_MM = (1.5, -1.0, 0.5)


def _normalise(image: sitk.Image) -> np.ndarray:
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    low, high = np.percentile(array, (1, 99))
    return np.clip((array - low) / max(high - low, 1e-6), 0.0, 1.0)


def synthetic_result(reference: sitk.Image, moving: sitk.Image, shift_mm: Tuple[float, float, float] = SHIFT_MM) -> Any:
    """A ``unifuse.FusionResult`` on ``reference``'s grid made without the network (SimpleITK + numpy only)."""
    from unifuse.pipeline import FusionResult

    field_array = np.broadcast_to(np.asarray(shift_mm, dtype=np.float64),
                                  (*reversed(reference.GetSize()), 3)).copy()
    displacement = sitk.GetImageFromArray(field_array, isVector=True)
    displacement.CopyInformation(reference)
    aligned = sitk.Resample(moving, reference, sitk.TranslationTransform(3, shift_mm), sitk.sitkLinear, 0.0,
                            sitk.sitkFloat32)
    ref_n, mov_n = _normalise(reference), _normalise(aligned)

    def on_grid(array: np.ndarray) -> sitk.Image:
        image = sitk.GetImageFromArray(array.astype(np.float32))
        image.CopyInformation(reference)
        return image

    before = sitk.Resample(moving, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return FusionResult(
        fused=on_grid(0.5 * (ref_n + mov_n) * float(np.percentile(sitk.GetArrayViewFromImage(reference), 99))),
        aligned=aligned,
        displacement=displacement,
        jacobian=on_grid(np.ones_like(ref_n)),
        error_map=on_grid(np.abs(ref_n - mov_n)),
        error_map_before=on_grid(np.abs(ref_n - _normalise(before))),
        degradation="none",
        probabilities={"none": 1.0, "motion": 0.0, "metal": 0.0, "lowdose": 0.0},
        report={"model": {"id": "self-test (no network)", "trained": False}, "device": "none",
                "degradation": {"used": "none", "requested": "auto"}},
    )


def _node_count(scene: Any) -> int:
    return scene.GetNumberOfNodes()


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def check_scene_side(
    scene: Any,
    reference_node: Any,
    moving_node: Any,
    log: Optional[Callable[[str], None]] = None,
    slice_logics: Optional[Callable[[], list]] = None,
) -> None:
    """Add a synthetic result to ``scene`` twice (new nodes, then "update the previous result") and check the
    MRML contract; raises AssertionError naming the first broken promise."""
    say = log or (lambda text: None)
    logic = FusionLogic(scene, slice_logics=slice_logics)
    reference_array = np.array(sitk.GetArrayFromImage(input_image(reference_node, "reference")))
    moving_before = sitk.GetArrayFromImage(input_image(moving_node, "moving"))
    moving_matrix = volume_node_ijk_to_ras(moving_node, world=False)
    result = synthetic_result(input_image(reference_node, "reference"), input_image(moving_node, "moving"))

    say("Scene side: adding a synthetic result as new nodes")
    nodes_before = _node_count(scene)
    first = logic.add_result(result, reference_node, moving_node, {"mode": "self-test"})
    added = _node_count(scene) - nodes_before
    _check(added >= len(ROLES), f"a run added {added} nodes, fewer than its {len(ROLES)} outputs")
    reference_matrix = volume_node_ijk_to_ras(reference_node, world=False)
    for role in VOLUME_ROLES:
        node = first.node(role)
        _check(node is not reference_node and node is not moving_node, f"the {role} output is an input node")
        _check(node.GetImageData().GetDimensions() == reference_node.GetImageData().GetDimensions(),
               f"the {role} output is not on the reference grid")
        _check(np.allclose(volume_node_ijk_to_ras(node, world=False), reference_matrix, atol=1e-6),
               f"the {role} output's geometry differs from the reference's")
    _check(first.displacement.IsA("vtkMRMLGridTransformNode"), "the displacement is not a grid transform node")
    _check(moving_node.GetParentTransformNode() is None, "the moving volume was put under a transform unasked")

    say("Scene side: updating the previous result in place")
    count = _node_count(scene)
    second = logic.add_result(result, reference_node, moving_node, {"mode": "self-test"},
                              outputs=OutputNodes.from_nodes(first, exclude=(reference_node, moving_node)))
    _check(_node_count(scene) == count, f"'update the previous result' changed the node count "
                                        f"{count} -> {_node_count(scene)}")
    _check(all(second.node(r) is first.node(r) for r in ROLES), "'update' did not reuse every output node")
    _check(second.folder_item == first.folder_item, "'update' created a new subject-hierarchy folder")
    _check(hierarchy.reusable_output_folder([second.node(r) for r in ROLES]) == second.folder_item,
           "the outputs are not together in their run folder")

    say("Scene side: moving volume under the transform (explicit), slice views fitted to the reference")
    logic.place_under_transform(second)
    _check(moving_node.GetParentTransformNode() is second.displacement, "the moving volume is not under the transform")
    again = sitk.GetArrayFromImage(input_image(moving_node, "moving"))
    _check(np.array_equal(again, moving_before), "a rerun would not start from the moving volume itself")
    logic.show_result(second, fit=True)
    for composite in display.slice_composite_nodes(scene):
        _check(composite.GetBackgroundVolumeID() == reference_node.GetID(), "the reference is not the background")
        _check(composite.GetForegroundVolumeID() == second.fused.GetID(), "the fused volume is not the foreground")
    moving_node.SetAndObserveTransformNodeID(None)
    _check(np.array_equal(sitk.GetArrayFromImage(input_image(reference_node, "reference")), reference_array),
           "the reference volume's voxels changed")
    _check(np.array_equal(volume_node_ijk_to_ras(moving_node, world=False), moving_matrix),
           "the moving volume's geometry changed")
    say("Scene side passed")
