"""MNI tissue anatomy (unifuse.data.anatomy) and modality synthesis (unifuse.data.modalities)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from unifuse.data.anatomy import (
    LABELS,
    TISSUES,
    as_image,
    deform_anatomy,
    load_mni_tissues,
    random_label_map,
    random_subject,
    template_grid,
)
from unifuse.data.modalities import (
    ct_like,
    mr_contrast,
    mr_tissue_signals,
    pet_like,
    random_contrast,
    synthesize,
)
from unifuse.errors import InputImageError

S = 32


@pytest.fixture(scope="module")
def tissues():
    return load_mni_tissues(S)


def _voxel_ml(t) -> float:
    return t.spacing_mm**3 / 1000.0


def test_tissue_maps_are_a_partition_on_the_template_grid(tissues):
    stack = tissues.stack()
    assert stack.shape == (len(TISSUES), S, S, S) and stack.dtype == np.float32
    assert stack.min() >= 0 and stack.max() <= 1 + 1e-6
    assert np.allclose(stack.sum(axis=0), 1.0, atol=1e-4)
    grid = tissues.grid
    assert grid.GetSize() == (S, S, S)
    assert np.allclose(grid.GetSpacing(), [233.0 / S] * 3)  # template's largest extent (233 mm) / S
    assert np.allclose(np.reshape(grid.GetDirection(), (3, 3)), np.diag([-1.0, -1.0, 1.0]))  # RAS axes in LPS
    assert load_mni_tissues(S) is tissues  # cached
    with pytest.raises(ValueError):
        tissues.gm[0, 0, 0] = 1.0  # shared cache is read-only


def test_tissue_volumes_are_anatomically_plausible(tissues):
    ml = {name: float(getattr(tissues, name).sum()) * _voxel_ml(tissues) for name in TISSUES}
    intracranial = ml["csf"] + ml["gm"] + ml["wm"]
    assert 1200 < intracranial < 2300  # adult intracranial volume ~1.4-1.8 L
    assert ml["gm"] > ml["wm"] > 0.3 * ml["gm"]
    assert ml["bone"] > 200 and ml["scalp"] > 200


def test_brain_sits_where_mni_puts_it(tissues):
    """Centre of mass of the brain in RAS mm: symmetric in x, behind and above the anterior commissure."""
    img = tissues.as_image(tissues.gm + tissues.wm)
    arr = sitk.GetArrayFromImage(img).astype(np.float64)
    k, j, i = np.meshgrid(*(np.arange(S),) * 3, indexing="ij")
    com_index = [float((arr * a).sum() / arr.sum()) for a in (i, j, k)]
    lps = np.asarray(img.TransformContinuousIndexToPhysicalPoint(com_index))
    ras = lps * np.array([-1.0, -1.0, 1.0])
    assert abs(ras[0]) < 4.0
    assert -35.0 < ras[1] < 0.0
    assert 0.0 < ras[2] < 35.0


def test_shells_are_ordered_from_air_to_brain(tissues):
    labels = tissues.labels()
    z, y = S // 2 + 2, S // 2
    row = labels[z, y, : S // 2]  # from the right edge of the array (x = 0) towards the centre
    firsts = [int(np.argmax(row == LABELS[name])) if (row == LABELS[name]).any() else 10**6
              for name in ("background", "scalp", "bone")]
    brain_first = int(np.argmax(np.isin(row, [LABELS["csf"], LABELS["gm"], LABELS["wm"]])))
    assert firsts[0] < firsts[1] < firsts[2] < brain_first


def test_as_image_uses_the_grid_geometry(tissues):
    img = as_image(np.zeros((S, S, S), np.float32))
    ref = template_grid(S)
    assert img.GetOrigin() == ref.GetOrigin() and img.GetSpacing() == ref.GetSpacing()
    assert img.GetDirection() == ref.GetDirection()
    with pytest.raises(InputImageError):
        as_image(np.zeros((S, S, S + 1)))
    with pytest.raises(InputImageError):
        tissues.as_image(np.zeros((S, S)))


def test_deformed_subjects_are_new_reproducible_partitions(tissues):
    a = deform_anatomy(tissues, np.random.default_rng(1))
    b = deform_anatomy(tissues, np.random.default_rng(1))
    c = deform_anatomy(tissues, np.random.default_rng(2))
    assert np.array_equal(a.stack(), b.stack())
    assert np.allclose(a.stack().sum(axis=0), 1.0, atol=1e-4)
    disagree = float((a.labels() != c.labels()).mean())
    assert disagree > 0.01  # different seeds give different anatomy
    vol_t = float(tissues.brain.sum())
    assert 0.7 < float(a.brain.sum()) / vol_t < 1.3


def test_random_label_map_is_a_blobby_partition():
    labels = random_label_map(np.random.default_rng(0), 24, num_labels=10)
    assert labels.shape == (24, 24, 24) and np.issubdtype(labels.dtype, np.integer)
    assert set(np.unique(labels)) == set(range(10))
    assert np.array_equal(labels, random_label_map(np.random.default_rng(0), 24, num_labels=10))
    changes = float((np.diff(labels, axis=2) != 0).mean())
    assert changes < 0.3  # smooth regions, not salt-and-pepper


def test_random_subject_has_head_shells_and_brain_parcels():
    t = random_subject(np.random.default_rng(3), S)
    assert np.allclose(t.stack().sum(axis=0), 1.0, atol=1e-4)
    labels = t.labels()
    for name in ("background", "bone", "scalp", "gm", "wm"):
        assert (labels == LABELS[name]).any(), name
    assert t.parcels is not None and t.parcels.shape == (S, S, S) and t.parcels.max() >= 5
    assert np.all(t.parcels[labels == LABELS["background"]] == 0)


# ------------------------------------------------------------------------------------------ modalities


def _tissue_means(image, t):
    lab = t.labels()
    return {name: float(image[lab == LABELS[name]].mean()) for name in ("csf", "gm", "wm", "bone")}


def test_mr_signal_tables_follow_the_known_contrasts():
    ok = 0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        t1, t2, fl = (mr_tissue_signals(k, rng) for k in ("t1", "t2", "flair"))
        ok += (t1["wm"] > t1["gm"] > t1["csf"]) and (t2["csf"] > t2["gm"] > t2["wm"]) and (fl["gm"] > fl["csf"])
        assert max(t["bone"] for t in (t1, t2, fl)) < 0.2 * max(t2.values())  # bone is dark in MR
    assert ok >= 19
    with pytest.raises(ValueError, match="unknown MR contrast"):
        mr_tissue_signals("dwi", np.random.default_rng(0))


@pytest.mark.parametrize("kind", ["t1", "t2", "pd", "flair"])
def test_mr_images_have_the_contrast_of_their_kind(tissues, kind):
    img = mr_contrast(tissues, kind, np.random.default_rng(0))
    assert img.shape == (S, S, S) and img.dtype == np.float32 and img.min() >= 0
    m = _tissue_means(img, tissues)
    if kind == "t1":
        assert m["wm"] > m["gm"] > m["csf"]
    elif kind == "t2":
        assert m["csf"] > m["gm"] > m["wm"]
    elif kind == "flair":
        assert m["gm"] > m["csf"]
    assert np.array_equal(img, mr_contrast(tissues, kind, np.random.default_rng(0)))


def test_ct_is_in_hounsfield_units(tissues):
    ct = ct_like(tissues, np.random.default_rng(0))
    lab = tissues.labels()
    air = ct[lab == LABELS["background"]]
    assert abs(float(np.median(air)) + 1000) < 30
    assert float(np.median(ct[lab == LABELS["bone"]])) > 300
    for name, (low, high) in {"wm": (10, 40), "gm": (25, 55), "csf": (-10, 60)}.items():
        pure = getattr(tissues, name) > 0.6
        assert pure.sum() > 10 and low < float(np.median(ct[pure])) < high, name
    assert ct.min() >= -1024 and ct.max() <= 3071


def test_pet_uptake_ratios_and_counts(tissues):
    pet = pet_like(tissues, np.random.default_rng(0))
    assert pet.min() >= 0
    pure_gm, pure_wm = tissues.gm > 0.8, tissues.wm > 0.8
    ratio = float(pet[pure_gm].mean() / pet[pure_wm].mean())
    assert 1.5 < ratio < 4.5  # 4:1 uptake, reduced by the 4-6 mm PSF at this voxel size
    assert float(pet[tissues.background > 0.99].mean()) < 0.1 * float(pet[pure_gm].mean())


def test_random_contrast_gives_piecewise_random_intensities():
    labels = random_label_map(np.random.default_rng(0), 16, num_labels=6)
    a = random_contrast(labels, np.random.default_rng(1))
    b = random_contrast(labels, np.random.default_rng(2))
    assert a.shape == labels.shape and a.dtype == np.float32 and a.min() >= 0
    means_a = [a[labels == k].mean() for k in range(1, 6)]
    means_b = [b[labels == k].mean() for k in range(1, 6)]
    assert np.std(means_a) > 0.05 and not np.allclose(means_a, means_b, atol=0.05)
    assert float(a[labels == 0].mean()) < 0.2  # label 0 (air) kept dark
    with pytest.raises(ValueError):
        random_contrast(labels.astype(np.float32), np.random.default_rng(0))


def test_synthesize_dispatches_and_rejects_unknown(tissues):
    direct = ct_like(tissues, np.random.default_rng(4))
    assert np.array_equal(synthesize(tissues, "ct", np.random.default_rng(4)), direct)
    with pytest.raises(ValueError, match="unknown modality"):
        synthesize(tissues, "ultrasound", np.random.default_rng(0))
    with pytest.raises(TypeError):
        ct_like(tissues, 0)
