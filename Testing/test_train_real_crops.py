"""Training crops of the real-anatomy cache (unifuse.train.real_crops), on a small fake cache."""

import numpy as np
import pytest
import torch

from test_real_data import SMALL, _fake_sources
from unifuse.config import DEGRADATION_CLASSES
from unifuse.data import real
from unifuse.spatial import warp
from unifuse.train.real_crops import RealCrops, load_volumes


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    artefacts, subjects, cache = _fake_sources(tmp_path_factory.mktemp("real"))
    real.prepare_real_data(cache, seed=1, cases_per_subject=2, offline=True, log=lambda _: None, settings=SMALL,
                           subjects=subjects, artefacts=artefacts)
    return cache


def test_crops_carry_the_field_that_aligns_them(cache):
    ds = RealCrops(cache, "train", size=16, length=8, seed=3, spacing_mm=(5.0, 6.0), working_mm=5.0,
                   max_trans_mm=8.0, nonrigid_mm=6.0, none_fraction=0.5)
    assert {c.case_id.split("/")[0] for c in ds.cases} == {"t-mr", "t-chest"}  # the training subjects only
    gains = []
    for i in range(len(ds)):
        s = ds[i]
        assert s["reference"].shape == s["moving"].shape == (1, 16, 16, 16) and s["field"].shape == (3, 16, 16, 16)
        assert DEGRADATION_CLASSES[int(s["degradation"])] in DEGRADATION_CLASSES
        assert 0.0 <= float(s["reference"].min()) and float(s["reference"].max()) <= 1.0 + 1e-6
        inner = (slice(None), slice(3, -3), slice(3, -3), slice(3, -3))
        label = s["moving_clean_aligned"][inner]
        before = (s["moving_clean"][inner] - label).abs().mean()
        after = (warp(s["moving_clean"][None], s["field"][None])[0][inner] - label).abs().mean()
        gains.append(float(after / max(float(before), 1e-6)))
    # the field u = v^-1 undoes the residual misalignment: the warped clean input matches the aligned label
    assert np.median(gains) < 0.6


def test_samples_are_a_function_of_seed_and_index(cache):
    a = RealCrops(cache, "train", size=16, length=4, seed=3, spacing_mm=(5.0, 6.0))
    b = RealCrops(cache, "train", size=16, length=4, seed=3, spacing_mm=(5.0, 6.0))
    c = RealCrops(cache, "train", size=16, length=4, seed=4, spacing_mm=(5.0, 6.0))
    assert all(x is y for x, y in zip(a.volumes, b.volumes))  # loaded once per process
    for key in ("reference", "moving", "field"):
        assert torch.equal(a[2][key], b[2][key])
    assert not torch.equal(a[2]["field"], c[2]["field"])
    assert len(load_volumes(cache, "train", 2)[0].movings) >= 2  # own degraded acquisition + clean ("none")
