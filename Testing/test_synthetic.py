"""Synthetic pairs (unifuse.data.synthetic): shapes, determinism, split independence, exact ground truth."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from unifuse import geometry, spatial
from unifuse.config import DEGRADATION_CLASSES
from unifuse.data.synthetic import TASKS, SyntheticPairs, make_demo_case

S = 32
VOLUME_KEYS = ("reference", "moving", "moving_clean", "moving_clean_aligned", "reference_moved")


@pytest.fixture(scope="module")
def train():
    return SyntheticPairs("train", size=S, length=12, seed=0)


@pytest.fixture(scope="module")
def item(train):
    return train[1]


def test_item_keys_shapes_and_ranges(item):
    for k in VOLUME_KEYS:
        v = item[k]
        assert v.shape == (1, S, S, S) and v.dtype == torch.float32, k
        assert float(v.min()) >= 0.0 and float(v.max()) <= 1.0, k
        assert float(v.max()) > 0.2, k  # not empty
    assert item["field"].shape == (3, S, S, S) and item["field"].dtype == torch.float32
    for k in ("labels", "labels_reference"):
        assert item[k].shape == (S, S, S) and item[k].dtype == torch.long
    assert item["degradation"].dtype == torch.long and item["degradation"].shape == ()
    assert 0 <= int(item["degradation"]) < len(DEGRADATION_CLASSES)
    assert 0 <= int(item["task"]) < len(TASKS)
    assert np.isclose(float(item["spacing"]), 233.0 / S)


def test_deterministic_per_split_index_and_seed(train, item):
    again = SyntheticPairs("train", size=S, length=12, seed=0)[1]
    for k in item:
        assert torch.equal(item[k], again[k]), k
    other_seed = SyntheticPairs("train", size=S, length=12, seed=1)[1]
    assert not torch.equal(item["field"], other_seed["field"])


def test_splits_draw_different_anatomy_and_misalignment():
    kwargs = dict(size=S, length=3, seed=0, tasks=["t1-t2-motion"])
    items = {split: SyntheticPairs(split, **kwargs)[0] for split in ("train", "val", "test")}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not torch.equal(items[a]["labels_reference"], items[b]["labels_reference"])
        assert not torch.equal(items[a]["field"], items[b]["field"])


def test_held_out_splits_use_brain_anatomy_only():
    val = SyntheticPairs("val", size=S, length=4, seed=0, label_map_fraction=1.0)
    assert val.label_map_fraction == 0.0 and val.random_contrast_fraction == 0.0
    assert val.subject(0).parcels is None  # a deformed template, not a random label map
    train = SyntheticPairs("train", size=S, length=4, seed=0, label_map_fraction=1.0)
    assert train.subject(0).parcels is not None


def _decorrelation(a: torch.Tensor, b: torch.Tensor) -> float:
    """1 - Pearson correlation of two volumes (0 = identical up to an affine intensity map)."""
    return 1.0 - float(np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1])


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_field_aligns_the_clean_moving_volume_and_its_labels(train, index):
    item = train[index]
    u = item["field"][None]
    # the ground-truth field brings the moving pose back onto the reference pose ...
    aligned = spatial.warp(item["moving_clean"][None], u)[0]
    target = item["moving_clean_aligned"]
    assert _decorrelation(aligned, target) < 0.06
    assert _decorrelation(aligned, target) < 0.5 * _decorrelation(item["moving_clean"], target)
    head = item["labels_reference"][None] > 0
    assert float((aligned - target).abs()[head].mean()) < 0.1  # resampling blur of noisy 7 mm voxels
    # ... for the reference seen in the moving pose (I'_R) too
    ref_back = spatial.warp(item["reference_moved"][None], u)[0]
    before = _decorrelation(item["reference_moved"], item["reference"])
    assert _decorrelation(ref_back, item["reference"]) < 0.5 * before
    # ... and for the tissue labels (nearest-neighbour)
    labels = item["labels"].float()[None, None]
    warped = spatial.warp(labels, u, mode="nearest")[0, 0].round().long()
    agree_after = float((warped == item["labels_reference"]).float().mean())
    agree_before = float((item["labels"] == item["labels_reference"]).float().mean())
    assert agree_after > 0.9 and agree_after > agree_before


def test_task_mix_and_none_fraction():
    ds = SyntheticPairs("train", size=16, length=6, seed=3, tasks=["ct-pet-lowdose"], none_fraction=0.0)
    lowdose = DEGRADATION_CLASSES.index("lowdose")
    for i in range(3):
        arrays = ds.sample_arrays(i)
        assert arrays.task == "ct-pet-lowdose" and arrays.degradation == "lowdose"
        assert int(ds[i]["degradation"]) == lowdose
    clean = SyntheticPairs("train", size=16, length=2, seed=3, tasks={"mr-ct-metal": 1.0}, none_fraction=1.0)
    arrays = clean.sample_arrays(0)
    assert arrays.degradation == "none" and np.array_equal(arrays.moving, arrays.moving_clean)
    assert arrays.reference_modality == "t1" and arrays.moving_modality == "ct"


def test_degradation_changes_the_moving_volume():
    ds = SyntheticPairs("test", size=S, length=2, seed=0, tasks=["t1-t2-motion"], none_fraction=0.0)
    arrays = ds.sample_arrays(0)
    diff = np.abs(arrays.moving - arrays.moving_clean).mean() / np.abs(arrays.moving_clean).mean()
    assert diff > 0.01


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        SyntheticPairs("holdout")
    with pytest.raises(ValueError, match="task"):
        SyntheticPairs("train", tasks=["us-mr-speckle"])
    with pytest.raises(ValueError):
        SyntheticPairs("train", none_fraction=1.5)
    with pytest.raises(IndexError):
        SyntheticPairs("train", size=16, length=2)[5]


# ---------------------------------------------------------------------------------------------- demo case


@pytest.mark.parametrize("task", list(TASKS))
def test_demo_case_has_real_geometry_and_exact_truth(task):
    case = make_demo_case(size=S, task=task, seed=0)
    ref, mov = case.reference, case.moving
    assert ref.GetSize() == (S, S, S) and np.allclose(ref.GetSpacing(), [233.0 / S] * 3)
    assert mov.GetSize() != ref.GetSize()
    assert not np.allclose(mov.GetSpacing(), ref.GetSpacing())  # anisotropic second scan
    assert not np.allclose(mov.GetOrigin(), ref.GetOrigin())
    for img, modality in ((ref, TASKS[task].reference), (mov, TASKS[task].moving)):
        expected = sitk.sitkInt16 if modality == "ct" else sitk.sitkFloat32
        assert img.GetPixelID() == expected
    field = case.displacement_gt
    assert field.GetNumberOfComponentsPerPixel() == 3 and field.GetSize() == ref.GetSize()
    assert np.allclose(field.GetOrigin(), ref.GetOrigin()) and np.allclose(field.GetDirection(), ref.GetDirection())
    assert case.degradation == TASKS[task].degradation
    # truth: moving(x + U(x)) = clean aligned moving(x); compare with header-only resampling
    background = -1000.0 if TASKS[task].moving == "ct" else 0.0
    transform = sitk.DisplacementFieldTransform(sitk.Image(field))
    by_truth = sitk.GetArrayFromImage(geometry.resample(case.moving_undegraded, ref, transform, default=background))
    by_header = sitk.GetArrayFromImage(geometry.resample(case.moving_undegraded, ref, default=background))
    label = sitk.GetArrayFromImage(case.moving_clean).astype(np.float32)
    head = sitk.GetArrayFromImage(case.labels) > 0
    err_truth = np.abs(by_truth - label)[head].mean()
    err_header = np.abs(by_header - label)[head].mean()
    assert err_truth < 0.35 * err_header


def test_demo_case_is_reproducible_and_can_be_left_undegraded():
    a = make_demo_case(size=16, task="ct-pet-lowdose", seed=2, degradation="none")
    b = make_demo_case(size=16, task="ct-pet-lowdose", seed=2, degradation="none")
    assert a.degradation == "none"
    assert np.array_equal(sitk.GetArrayFromImage(a.moving), sitk.GetArrayFromImage(b.moving))
    assert np.array_equal(sitk.GetArrayFromImage(a.moving), sitk.GetArrayFromImage(a.moving_undegraded))
    with pytest.raises(ValueError, match="unknown demo task"):
        make_demo_case(size=16, task="t1-flair")
