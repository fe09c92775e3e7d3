"""Tests of :mod:`unifuse.evaluation`, the one evaluation behind the demo, the model card and the benchmark:
hand-computed endpoint errors, masks, Dice, folding and reductions on tiny synthetic grids (numpy + SimpleITK
only, well under a second each)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from unifuse import evaluation as ev
from unifuse.errors import GeometryError, InputImageError
from unifuse.metrics import fusion_metrics


def _grid(shape=(12, 12, 12), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), values=None) -> sitk.Image:
    """A float32 image of (z, y, x) ``shape``; ``values`` or zeros."""
    arr = np.zeros(shape, np.float32) if values is None else np.asarray(values, np.float32)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    return img


def _constant_field(grid: sitk.Image, vector) -> sitk.Image:
    arr = np.broadcast_to(np.asarray(vector, np.float64), tuple(reversed(grid.GetSize())) + (3,)).copy()
    field = sitk.GetImageFromArray(arr, isVector=True)
    field.CopyInformation(grid)
    return field


def _ball(shape=(16, 16, 16), radius=5.0, hole=2.0) -> np.ndarray:
    """A bright ball (1.0) with a dark inner ball (0.0, like a ventricle) on a 0 background."""
    z, y, x = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij")
    r = np.sqrt(x * x + y * y + z * z)
    return np.where((r < radius) & (r >= hole), 1.0, 0.0).astype(np.float32)


# ------------------------------------------------------------------------------------------------ endpoint error


def test_constant_translation_vs_zero_truth_has_exactly_that_endpoint_error() -> None:
    grid = _grid()
    zero = ev.zero_displacement(grid)
    for vector, expected in (((2.0, 0.0, 0.0), 2.0), ((0.0, 3.0, 4.0), 5.0)):
        stats = ev.endpoint_error(_constant_field(grid, vector), zero)
        assert (stats.mean_mm, stats.median_mm, stats.p95_mm, stats.max_mm) == (expected,) * 4
        assert stats.voxels == 12 ** 3
    assert ev.endpoint_error(zero, zero).max_mm == 0.0


def test_endpoint_error_statistics_over_a_mask() -> None:
    grid = _grid((1, 1, 4))
    truth = ev.zero_displacement(grid)
    u = np.zeros((1, 1, 4, 3))
    u[0, 0, :, 0] = [1.0, 2.0, 3.0, 10.0]  # EPE per voxel 1, 2, 3, 10 mm
    stats = ev.endpoint_error(u, truth)
    assert stats.mean_mm == pytest.approx(4.0) and stats.median_mm == pytest.approx(2.5)
    assert stats.max_mm == 10.0 and stats.p95_mm == pytest.approx(3.0 + 0.85 * 7.0)  # numpy's linear percentile
    mask = np.array([[[True, True, True, False]]])
    assert ev.endpoint_error(u, truth, mask).to_dict() == {"mean_mm": 2.0, "median_mm": 2.0,
                                                            "p95_mm": pytest.approx(2.9), "max_mm": 3.0, "voxels": 3}
    with pytest.raises(InputImageError, match="no voxel"):
        ev.endpoint_error(u, truth, np.zeros((1, 1, 4), bool))
    with pytest.raises(GeometryError, match="not on the reference grid"):
        ev.endpoint_error(ev.zero_displacement(_grid((1, 1, 5))), truth)


# ---------------------------------------------------------------------------------------------------------- mask


def test_evaluation_mask_is_the_filled_foreground_inside_the_moving_view() -> None:
    ball = _ball()
    reference = _grid(ball.shape, values=ball)
    mask = ev.evaluation_mask(reference)
    assert mask[8, 8, 8]  # the dark centre (a "ventricle") is inside the object: holes are filled
    assert not mask[0, 0, 0] and not mask[8, 8, 0]  # background is not
    z, y, x = np.meshgrid(*[np.arange(16) - 7.5] * 3, indexing="ij")
    assert mask.sum() == pytest.approx(((x * x + y * y + z * z) < 25).sum(), rel=0.25)

    # a moving scan covering x = 0..7 mm only, and a true field shifting by +2 mm in x: reference voxels with
    # x + 2 <= 7.5 (the moving scan's last voxel centre + half a voxel) are seen, i.e. x <= 5
    moving = _grid((16, 16, 8))
    truth = _constant_field(reference, (2.0, 0.0, 0.0))
    fov = ev.moving_fov_mask(truth, moving, reference)
    assert fov[:, :, :6].all() and not fov[:, :, 6:].any()
    both = ev.evaluation_mask(reference, moving, truth)
    assert np.array_equal(both, mask & fov) and both.sum() < mask.sum()

    with pytest.raises(InputImageError, match="evaluation mask is empty"):
        ev.evaluation_mask(reference, moving, _constant_field(reference, (40.0, 0.0, 0.0)))


# ---------------------------------------------------------------------------------------------------------- Dice


def _labels(arr: np.ndarray, like: sitk.Image) -> sitk.Image:
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.CopyInformation(like)
    return img


def test_dice_of_identical_disjoint_and_half_overlapping_labels() -> None:
    grid = _grid((4, 4, 12))
    ref = np.zeros((4, 4, 12), np.uint8)
    ref[:, :, 0:4] = 1
    ref[:, :, 6:10] = 2
    zero = ev.zero_displacement(grid)
    same = ev.label_dice(_labels(ref, grid), _labels(ref, grid), zero)
    assert same == {"mean": 1.0, "per_label": {1: 1.0, 2: 1.0}}

    disjoint = np.zeros_like(ref)
    disjoint[:, :, 4:6] = 1
    disjoint[:, :, 10:12] = 2
    assert ev.label_dice(_labels(disjoint, grid), _labels(ref, grid), zero)["mean"] == 0.0

    # moving labels = the reference labels shifted by +2 voxels (mm) in x; a field of +1 mm recovers half of it:
    # each 4-voxel box overlaps its reference box on 3 of 4 voxels -> Dice 2*3/(4+4) = 0.75; +2 mm recovers all
    moving = np.zeros_like(ref)
    moving[:, :, 2:6] = 1
    moving[:, :, 8:12] = 2
    assert ev.label_dice(_labels(moving, grid), _labels(ref, grid), zero)["mean"] == pytest.approx(0.5)
    half = ev.label_dice(_labels(moving, grid), _labels(ref, grid), _constant_field(grid, (1.0, 0.0, 0.0)))
    assert half == {"mean": 0.75, "per_label": {1: 0.75, 2: 0.75}}
    full = ev.label_dice(_labels(moving, grid), _labels(ref, grid), _constant_field(grid, (2.0, 0.0, 0.0)))
    assert full["mean"] == 1.0

    # only the reference's labels inside the region count: label 2 outside the region is not evaluated
    region = np.zeros(ref.shape, bool)
    region[:, :, :5] = True
    assert ev.label_dice(_labels(ref, grid), _labels(ref, grid), zero, region)["per_label"] == {1: 1.0}


# ------------------------------------------------------------------------------------------------------- folding


def test_folding_percent_of_hand_made_fields() -> None:
    grid = _grid((8, 8, 8))
    assert ev.folding_percent(ev.zero_displacement(grid)) == 0.0
    assert ev.folding_percent(_constant_field(grid, (5.0, -3.0, 1.0))) == 0.0  # a translation never folds
    x = np.arange(8, dtype=np.float64)
    u = np.zeros((8, 8, 8, 3))
    u[..., 0] = -2.0 * x  # x -> x - 2x = -x: a mirror, det J = -1 everywhere
    assert ev.folding_percent(u, grid) == 100.0
    u[4:, ..., 0] = 0.0  # mirror only in the slices z < 4: det J = 1 + dUx/dx = -1 there, 1 elsewhere
    assert ev.folding_percent(u, grid) == 50.0
    u[...] = 0.0
    u[..., 0] = -0.5 * x  # a compression (det 0.5) does not fold
    assert ev.folding_percent(u, grid) == 0.0


def test_reduction_percent() -> None:
    assert ev.reduction_percent(10.0, 2.5) == 75.0
    assert ev.reduction_percent(4.0, 6.0) == -50.0
    assert math.isnan(ev.reduction_percent(0.0, 1.0))


# -------------------------------------------------------------------------------------------- whole-case entries


@pytest.fixture()
def shifted_case() -> ev.EvaluationCase:
    """A ball with a ventricle and two tissue labels; the moving scan is the reference content shifted by 4 mm
    (two voxels) in x, so the true field is a constant +4 mm."""
    ball = _ball((16, 16, 16))
    ramp = 60.0 + 4.0 * np.arange(16, dtype=np.float32)  # some contrast inside the ball (along x)
    reference = _grid(ball.shape, spacing=(2.0, 2.0, 2.0), values=ball * ramp)
    truth = _constant_field(reference, (4.0, 0.0, 0.0))
    moving_grid = _grid((16, 16, 16), spacing=(2.0, 2.0, 2.0))
    # moving(y) = reference(y - 4 mm): resampling the reference at y - 4
    moving = sitk.Resample(reference, moving_grid, sitk.TranslationTransform(3, (-4.0, 0.0, 0.0)), sitk.sitkLinear, 0.0)
    labels = np.where(ball > 0, 1, 0).astype(np.uint8)
    labels[:, :, 8:] *= 2
    ref_labels = _labels(labels, reference)
    return ev.EvaluationCase(reference, moving, truth_displacement=truth, truth_aligned=reference,
                             reference_labels=ref_labels, name="shifted")


def test_evaluate_alignment_of_the_truth_and_of_no_registration(shifted_case: ev.EvaluationCase) -> None:
    case = shifted_case
    assert case.moving_labels is not None  # derived from the reference labels and the true field
    oracle = ev.evaluate_alignment(case, None, case.truth_displacement)
    assert oracle["epe_mm"] == 0.0 and oracle["epe_max_mm"] == 0.0
    assert oracle["dice"] == 1.0 and oracle["folding_percent"] == 0.0
    assert oracle["mse"] == 0.0 and oracle["cc"] == pytest.approx(1.0) and oracle["ssim"] == pytest.approx(1.0)

    none = ev.evaluate_alignment(case, None, ev.zero_displacement(case.reference), mind=True)
    for key in ("epe_mm", "epe_median_mm", "epe_p95_mm", "epe_max_mm"):
        assert none[key] == pytest.approx(4.0)  # |0 - 4 mm| everywhere in the mask
    assert none["dice"] < 0.95 and none["mse"] > 0.0 and 0.0 < none["mind"] <= 1.0
    assert set(none["dice_per_label"]) == {1, 2}
    assert ev.reduction_percent(none["epe_mm"], oracle["epe_mm"]) == 100.0


def test_evaluate_fusion_uses_the_shared_metrics(shifted_case: ev.EvaluationCase) -> None:
    case = shifted_case
    ref_u = case.reference_u
    assert ref_u.max() == 1.0 and ref_u.min() == 0.0
    # fusing the reference with itself as label: F = R reproduces both sources, Q_mse 0
    values = ev.evaluate_fusion(case, ref_u)
    expected = fusion_metrics(ref_u, case.label_u, ref_u)
    assert values.keys() == expected.keys() and values["q_mse"] == 0.0 and values["q_ssim"] == 2.0
    assert all(values[k] == expected[k] or (math.isnan(values[k]) and math.isnan(expected[k])) for k in values)
    # a fused volume in reference units is mapped with the reference's own rule
    fused = sitk.GetArrayFromImage(case.reference) * 0.5
    assert np.allclose(ev.fused_to_unit(case, fused, reference_units=True), case.reference_norm.apply(fused))
    no_label = ev.EvaluationCase(case.reference, case.moving)
    with pytest.raises(InputImageError, match="clean aligned label"):
        ev.evaluate_fusion(no_label, ref_u)


def test_working_grid_case_converts_voxels_to_mm() -> None:
    ball = _ball((16, 16, 16))
    truth = np.zeros((3, 16, 16, 16), np.float32)
    truth[0] = 1.0  # one voxel in x at 2.5 mm spacing
    case = ev.EvaluationCase.from_working_grid(ball, ball, 2.5, truth_voxels=truth,
                                               reference_labels=(ball > 0).astype(np.int64),
                                               moving_labels=(ball > 0).astype(np.int64))
    values = ev.evaluate_alignment(case, None, ev.zero_displacement(case.reference))
    assert values["epe_mm"] == pytest.approx(2.5) and values["folding_percent"] == 0.0
    assert case.moving_norm.apply(np.array([0.25, 2.0])).tolist() == [0.25, 1.0]  # already [0, 1]: unchanged


def test_restoration_and_sharpness_against_the_clean_truth():
    from scipy import ndimage

    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[:32, :32, :32]
    ball = (((z - 16) ** 2 + (y - 16) ** 2 + (x - 16) ** 2) < 100).astype(np.float32)
    label = (0.3 + 0.5 * ball * (1 + np.sin(x / 2.0)) / 2).astype(np.float32) * (ball > 0)
    case = ev.EvaluationCase.from_working_grid(ball, label, 2.0, truth_voxels=np.zeros((3, 32, 32, 32), np.float32),
                                               truth_aligned=label)
    noisy = np.clip(label + rng.normal(0, 0.1, label.shape), 0, 1).astype(np.float32)
    r = ev.evaluate_restoration(case, label.copy(), noisy)
    assert r["psnr_restored"] > 60 and r["ssim_restored"] == pytest.approx(1.0, abs=1e-6)
    assert r["psnr_aligned"] < 25 and r["ssim_aligned"] < 0.9
    blurred = ndimage.gaussian_filter(label, 1.5)
    sharp = ev.evaluate_output_sharpness(case, label, (label,))
    soft = ev.evaluate_output_sharpness(case, blurred, (label,))
    assert sharp["gradient_ratio"] == pytest.approx(1.0) and soft["gradient_ratio"] < 0.8
    assert soft["ssim_truth"] < sharp["ssim_truth"] == pytest.approx(1.0, abs=1e-6)
    no_label = ev.EvaluationCase(case.reference, case.moving)
    with pytest.raises(InputImageError, match="clean aligned label"):
        ev.evaluate_restoration(no_label, label, noisy)
