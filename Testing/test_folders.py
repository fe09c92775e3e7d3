"""Dataset folder loaders (unifuse.data.folders) on tiny fake trees of each accepted layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from unifuse.data.folders import LAYOUTS, FolderPairs, discover_cases, split_of
from unifuse.errors import DatasetError, UniFuseError

SHAPE = (10, 14, 16)  # (z, y, x) of the fake volumes
S = 16


def _write(path: Path, array: np.ndarray, spacing=(1.5, 1.5, 2.5)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    img.SetOrigin((-12.0, -10.0, 4.0))
    sitk.WriteImage(img, str(path))


def _head() -> np.ndarray:
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in SHAPE), indexing="ij")
    return (x**2 + y**2 + z**2) < 0.7


def _left_bright(value: float) -> np.ndarray:
    """Head with its x < centre half brighter: pairs are told apart by which half is bright."""
    head = _head()
    img = np.where(head, value * 0.5, 0.0)
    img[:, :, : SHAPE[2] // 2][head[:, :, : SHAPE[2] // 2]] = value
    return img.astype(np.float32)


def _right_bright(value: float) -> np.ndarray:
    return _left_bright(value)[:, :, ::-1].copy()


@pytest.fixture()
def brats(tmp_path: Path) -> Path:
    root = tmp_path / "MICCAI_BraTS2020_TrainingData"
    for i in (1, 2, 3):
        name = f"BraTS20_Training_{i:03d}"
        _write(root / name / f"{name}_t1.nii.gz", _left_bright(800.0))
        _write(root / name / f"{name}_t2.nii.gz", _right_bright(500.0).astype(np.int16))
        _write(root / name / f"{name}_flair.nii.gz", _left_bright(300.0))
        seg = np.zeros(SHAPE, np.uint8)
        seg[4:6, 6:8, 6:9] = 2
        _write(root / name / f"{name}_seg.nii.gz", seg)
    incomplete = root / "BraTS20_Training_004"
    _write(incomplete / "BraTS20_Training_004_t1.nii.gz", _left_bright(800.0))
    (root / "README.txt").write_text("not a case", encoding="utf-8")
    return tmp_path


@pytest.fixture()
def synthrad(tmp_path: Path) -> Path:
    root = tmp_path / "Task1"
    head = _head()
    for region, letter in (("brain", "B"), ("pelvis", "P")):
        for i in (1, 2):
            case = root / region / f"1{letter}A{i:03d}"
            _write(case / "mr.nii.gz", _left_bright(400.0))
            ct = np.where(head, 40, -1000).astype(np.int16)
            _write(case / "ct.nii.gz", ct)
            _write(case / "mask.nii.gz", head.astype(np.uint8))
    (root / "brain" / "overview").mkdir(parents=True)
    return tmp_path


@pytest.fixture()
def fdg(tmp_path: Path) -> Path:
    root = tmp_path / "FDG-PET-CT-Lesions"
    head = _head()
    ct = np.where(head, 30, -1000).astype(np.int16)
    studies = {"PETCT_0011f3deaf": ["03-23-2003-NA-PET-CT Ganzkoerper  primaer mit KM-10445"],
               "PETCT_01140d52d8": ["08-13-2005-NA-PET-CT Ganzkoerper  primaer mit KM-56839",
                                    "10-01-2006-NA-PET-CT Ganzkoerper  primaer mit KM-11111"]}
    for patient, dates in studies.items():
        for date in dates:
            d = root / patient / date
            _write(d / "CTres.nii.gz", ct)
            _write(d / "SUV.nii.gz", _right_bright(8.0))
            _write(d / "PET.nii.gz", _left_bright(8000.0))  # a different image: SUV must win
            _write(d / "SEG.nii.gz", np.zeros(SHAPE, np.uint8))
    only_pet = root / "PETCT_0223010e46" / "11-11-2001-NA-PET-CT"
    _write(only_pet / "CTres.nii.gz", ct)
    _write(only_pet / "PET.nii.gz", _right_bright(8000.0))
    return tmp_path


def _bright_side(volume: torch.Tensor) -> str:
    v = volume[0].numpy()
    half = v.shape[2] // 2
    return "low_x" if v[:, :, :half].sum() > v[:, :, half:].sum() else "high_x"


def _static(**kw):
    """Options that switch off misalignment and degradation, so pairing can be checked on the images."""
    return dict(degradation="none", max_rot_deg=0.0, max_trans_mm=0.0, nonrigid_mm=0.0, split="all", **kw)


def test_brats_discovery_pairing_and_sample(brats: Path):
    cases, problems = discover_cases(brats, "brats2020")
    assert [c.case_id for c in cases] == [f"BraTS20_Training_{i:03d}" for i in (1, 2, 3)]
    assert cases[0].files["reference"].name.endswith("_t1.nii.gz")
    assert cases[0].files["moving"].name.endswith("_t2.nii.gz")
    assert cases[0].files["labels"].name.endswith("_seg.nii.gz")
    assert len(problems) == 1 and "BraTS20_Training_004" in problems[0]
    ds = FolderPairs(brats, "brats2020", size=S, **_static())
    item = ds[0]
    assert item["reference"].shape == (1, S, S, S) and item["field"].shape == (3, S, S, S)
    assert _bright_side(item["reference"]) != _bright_side(item["moving"])  # t1 and t2 were not swapped
    assert torch.equal(item["field"], torch.zeros_like(item["field"]))
    assert set(torch.unique(item["labels_reference"]).tolist()) == {0, 2}  # the seg, nearest-resampled
    flair = FolderPairs(brats, "brats2020", size=S, moving="flair", **_static())
    assert _bright_side(flair[0]["moving"]) == _bright_side(flair[0]["reference"])


def test_brats_default_degradation_is_motion_and_misalignment_is_applied(brats: Path):
    ds = FolderPairs(brats, "brats2020", size=S, split="all", none_fraction=0.0, seed=4)
    arrays = ds.sample_arrays(1)
    assert arrays.degradation == "motion" and arrays.reference_modality == "mr"
    assert np.abs(arrays.misalignment.forward).max() > 0.1
    assert not np.array_equal(arrays.moving, arrays.moving_clean)
    again = FolderPairs(brats, "brats2020", size=S, split="all", none_fraction=0.0, seed=4).sample_arrays(1)
    assert np.array_equal(arrays.moving, again.moving)  # deterministic


def test_synthrad_regions_and_metal_in_hounsfield_units(synthrad: Path):
    cases, _ = discover_cases(synthrad, "synthrad2023")
    assert [c.case_id for c in cases] == ["1BA001", "1BA002", "1PA001", "1PA002"]
    brain, _ = discover_cases(synthrad / "Task1", "synthrad2023", region="brain")
    assert [c.case_id for c in brain] == ["1BA001", "1BA002"]
    ds = FolderPairs(synthrad, "synthrad2023", size=S, split="all", degradation="metal", nonrigid_mm=0.0,
                     max_rot_deg=0.0, max_trans_mm=0.0, region="pelvis")
    arrays = ds.sample_arrays(0)
    assert arrays.moving_modality == "ct"
    assert arrays.moving_clean_aligned.min() <= -999.0  # HU kept (air), normalisation comes later
    assert arrays.moving.max() >= 3071.0  # metal inserted
    item = ds[0]
    assert float(item["moving"].max()) == 1.0 and float(item["moving_clean"].min()) == 0.0  # HU window
    with pytest.raises(DatasetError, match="region"):
        discover_cases(synthrad, "synthrad2023", region="thorax")


def test_fdg_studies_are_cases_and_suv_is_preferred(fdg: Path):
    cases, _ = discover_cases(fdg, "fdg-petct")
    ids = [c.case_id for c in cases]
    assert len(ids) == 4 and ids[0].startswith("PETCT_0011f3deaf/")
    assert sum(i.startswith("PETCT_01140d52d8/") for i in ids) == 2
    with_suv = cases[0]
    assert with_suv.files["moving"].name == "SUV.nii.gz" and with_suv.files["reference"].name == "CTres.nii.gz"
    only_pet = [c for c in cases if c.case_id.startswith("PETCT_0223010e46")][0]
    assert only_pet.files["moving"].name == "PET.nii.gz" and "labels" not in only_pet.files
    ds = FolderPairs(fdg, "fdg-petct", size=S, **_static())
    item = ds[0]
    assert _bright_side(item["moving"]) == "high_x"  # SUV (right-bright), not PET (left-bright)
    assert ds.layout.degradation == "lowdose"
    no_seg = FolderPairs(fdg, "fdg-petct", size=S, **_static())[ids.index(only_pet.case_id)]
    assert int(no_seg["labels_reference"].max()) == 1  # foreground mask stands in for a missing SEG


def test_errors_name_the_problem(tmp_path: Path):
    with pytest.raises(DatasetError, match="does not exist"):
        FolderPairs(tmp_path / "nowhere", "brats2020")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no brats2020 case found"):
        FolderPairs(tmp_path / "empty", "brats2020")
    with pytest.raises(DatasetError, match="unknown dataset layout"):
        discover_cases(tmp_path, "adni")
    broken = tmp_path / "broken" / "1BA001"
    _write(broken / "mr.nii.gz", _left_bright(1.0))
    with pytest.raises(DatasetError, match="missing ct.nii.gz") as info:
        discover_cases(tmp_path / "broken", "synthrad2023")
    assert isinstance(info.value, UniFuseError)
    assert all(layout in LAYOUTS for layout in ("brats2020", "synthrad2023", "fdg-petct"))


def test_split_assignment_is_stable_disjoint_and_follows_fractions(brats: Path):
    ids = [f"case{i:04d}" for i in range(2000)]
    splits = [split_of(i) for i in ids]
    counts = {s: splits.count(s) / len(ids) for s in ("train", "val", "test")}
    assert abs(counts["train"] - 0.7) < 0.04 and abs(counts["val"] - 0.1) < 0.03 and abs(counts["test"] - 0.2) < 0.03
    assert splits == [split_of(i) for i in ids]
    assert [split_of(i, seed=1) for i in ids] != splits
    all_ids = {c.case_id for c in FolderPairs(brats, "brats2020", size=S, split="all").cases}
    parts = []
    for split in ("train", "val", "test"):
        try:
            parts.append({c.case_id for c in FolderPairs(brats, "brats2020", size=S, split=split,
                                                         fractions=(1, 1, 1)).cases})
        except DatasetError as exc:  # a split of three cases may be empty: that is reported, not silent
            assert "split" in str(exc)
            parts.append(set())
    assert set().union(*parts) == all_ids and sum(len(p) for p in parts) == len(all_ids)


def test_repeats_give_new_draws_of_the_same_case(brats: Path):
    ds = FolderPairs(brats, "brats2020", size=S, split="all", repeats=2, seed=0)
    assert len(ds) == 6
    a, b = ds.sample_arrays(0), ds.sample_arrays(3)
    assert np.array_equal(a.reference, b.reference)  # same case
    assert not np.array_equal(a.misalignment.forward, b.misalignment.forward)  # different draw
