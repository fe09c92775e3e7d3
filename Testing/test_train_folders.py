"""``unifuse train --data DIR --layout ...``: training on dataset folders (tiny fake trees of each layout).

The fake trees follow ``Testing/test_folders.py``: 10×14×16 volumes with a bright half, so every case reads
in milliseconds. Subjects are chosen so that a 50/50 train/val split (``folder_options.fractions``) has both
splits non-empty. The builders are imported by ``test_distributed.py``.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from test_folders import SHAPE, _head, _write  # the same fake trees as the loader tests
from unifuse.data.folders import LAYOUTS, FolderPairs, split_of, subject_of
from unifuse.errors import DatasetError, UniFuseError
from unifuse.train.configs import DATA_LAYOUTS, TrainConfig

pytestmark = pytest.mark.usefixtures("single_thread")

#: 50/50 train/val, no test split: four subjects give both splits (see the split check in each builder).
FRACTIONS = [0.5, 0.5, 0.0]


def _half_bright(value: float, seed: int) -> np.ndarray:
    """A head, one half brighter, plus a little case-specific texture (cases differ)."""
    head = _head()
    rng = np.random.default_rng(seed)
    img = np.where(head, value * (0.5 + 0.1 * rng.random(SHAPE)), 0.0)
    img[:, :, : SHAPE[2] // 2][head[:, :, : SHAPE[2] // 2]] *= 2.0
    return img.astype(np.float32)


def _check_both_splits(ids: List[str]) -> None:
    splits = {split_of(subject_of(i), FRACTIONS) for i in ids}
    assert splits == {"train", "val"}, f"fake tree must have train and val subjects, got {splits}"


def make_brats_tree(root: Path, n: int = 4) -> Path:
    """``root/BraTS20_Training_00k/BraTS20_Training_00k_{t1,t2,seg}.nii.gz`` for k = 1..n; returns root."""
    ids = []
    for i in range(1, n + 1):
        name = f"BraTS20_Training_{i:03d}"
        _write(root / name / f"{name}_t1.nii.gz", _half_bright(800.0, i))
        _write(root / name / f"{name}_t2.nii.gz", _half_bright(500.0, 100 + i)[:, :, ::-1].astype(np.int16))
        seg = np.zeros(SHAPE, np.uint8)
        seg[4:6, 6:8, 6:9] = 2
        _write(root / name / f"{name}_seg.nii.gz", seg)
        ids.append(name)
    _check_both_splits(ids)
    return root


def make_synthrad_tree(root: Path) -> Path:
    """``root/Task1/{brain,pelvis}/1?A00k/{mr,ct,mask}.nii.gz``; returns root."""
    head = _head()
    ids = []
    for i, (region, case) in enumerate((("brain", "1BA001"), ("brain", "1BB001"), ("pelvis", "1PA001"),
                                        ("pelvis", "1PA002"))):
        d = root / "Task1" / region / case
        _write(d / "mr.nii.gz", _half_bright(400.0, i))
        _write(d / "ct.nii.gz", np.where(head, 40 + 10 * i, -1000).astype(np.int16))
        _write(d / "mask.nii.gz", head.astype(np.uint8))
        ids.append(case)
    _check_both_splits(ids)
    return root


def make_fdg_tree(root: Path) -> Path:
    """``root/PETCT_*/<study>/{CTres,SUV,SEG}.nii.gz``: patient PETCT_aa has two studies; returns root."""
    head = _head()
    studies = {"PETCT_aa": ["01-01-2001-NA-PET-CT", "02-02-2002-NA-PET-CT"], "PETCT_bb": ["03-03-2003-NA-PET-CT"],
               "PETCT_0011f3deaf": ["04-04-2004-NA-PET-CT"]}
    ids = []
    for k, (patient, dates) in enumerate(studies.items()):
        for j, date in enumerate(dates):
            d = root / patient / date
            _write(d / "CTres.nii.gz", np.where(head, 30, -1000).astype(np.int16))
            _write(d / "SUV.nii.gz", _half_bright(8.0, 10 * k + j))
            _write(d / "SEG.nii.gz", np.zeros(SHAPE, np.uint8))
            ids.append(f"{patient}/{date}")
    _check_both_splits(ids)
    return root


TREES = {"brats2020": make_brats_tree, "synthrad2023": make_synthrad_tree, "fdg-petct": make_fdg_tree}


def tiny_folder_config(path: Path, **changes) -> Path:
    """A JSON training config on the ``tiny`` base for fake trees (16³, batch 2, 8 samples); returns its path."""
    fields = {"base": "tiny", "name": "tiny_folders", "steps": 3, "train_samples": 8, "val_samples": 2,
              "val_every": 100, "checkpoint_every": 100, "log_every": 1, "folder_options": {"fractions": FRACTIONS}}
    fields.update(changes)
    path.write_text(json.dumps(fields), encoding="utf-8")
    return path


def _parser() -> argparse.ArgumentParser:
    from unifuse.train.cli_train import add_train_parser

    parser = argparse.ArgumentParser(prog="unifuse")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def _rows(path: Path) -> List[Dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("layout", sorted(TREES))
def test_train_a_few_steps_on_each_layout(layout: str, tmp_path: Path, capsys):
    from unifuse.train.cli_train import run_train
    from unifuse.weights import load_checkpoint

    root = TREES[layout](tmp_path / "data")
    config = tiny_folder_config(tmp_path / "cfg.json")
    out = tmp_path / "run"
    args = _parser().parse_args(["train", "--config", str(config), "--out", str(out), "--device", "cpu",
                                 "--data", str(root), "--layout", layout])
    assert run_train(args) == 0
    rows = _rows(out / "train_log.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert all(np.isfinite(float(r["loss_total"])) for r in rows)
    val = _rows(out / "val_log.csv")
    assert [int(r["step"]) for r in val] == [0, 3] and all(np.isfinite(float(r["val_loss_total"])) for r in val)
    saved = json.loads((out / "train_config.json").read_text(encoding="utf-8"))
    assert saved["data_layout"] == layout and Path(saved["data_root"]) == root.resolve()

    meta = load_checkpoint(out / "final.pt").metadata
    data = meta["training_data"]
    assert data["generator"] == f"unifuse.data.folders.FolderPairs({layout})"
    assert data["dataset"]["layout"] == layout and data["dataset"]["train_cases"] >= 1
    assert data["dataset"]["val_cases"] >= 1 and data["train"]["dataset_samples"] == 8
    assert meta["compute"]["distributed"]["world_size"] == 1
    assert f"{layout} '" in capsys.readouterr().err  # the start-up line names the dataset


def test_validation_split_is_by_subject_and_disjoint(tmp_path: Path):
    from unifuse.train.datasets import build_train_set, build_val_set

    root = make_fdg_tree(tmp_path / "data")
    cfg = TrainConfig.from_dict({**_tiny_dict(), "data_root": str(root), "data_layout": "fdg-petct",
                                 "folder_options": {"fractions": FRACTIONS}})
    train, val = build_train_set(cfg), build_val_set(cfg)
    train_subjects = {c.subject for c in train.cases}
    val_subjects = {c.subject for c in val.cases}
    assert train_subjects and val_subjects and not train_subjects & val_subjects
    # both studies of one patient stay together
    aa = [c.case_id for c in train.cases + val.cases if c.subject == "PETCT_aa"]
    assert len(aa) == 2 and len({("train" if c in [x.case_id for x in train.cases] else "val") for c in aa}) == 1
    assert len(train) == cfg.train_samples  # samples cycle over the cases with new draws
    assert len(val) == max(cfg.val_samples, len(val.cases))
    # sample i is case i mod n with draw i div n: the same case, another misalignment
    n = len(train.cases)
    a, b = train.sample_arrays(0), train.sample_arrays(n)
    assert np.array_equal(a.reference, b.reference)
    assert not np.array_equal(a.misalignment.forward, b.misalignment.forward)


def _tiny_dict() -> dict:
    from unifuse.train import configs

    return configs.tiny().to_dict()


def test_mix_synthetic_interleaves_synthetic_samples(tmp_path: Path):
    from torch.utils.data import ConcatDataset

    from unifuse.data.synthetic import SyntheticPairs
    from unifuse.train.datasets import build_train_set, describe_training_data

    root = make_brats_tree(tmp_path / "data")
    cfg = TrainConfig.from_dict({**_tiny_dict(), "data_root": str(root), "data_layout": "brats2020",
                                 "mix_synthetic": 0.25, "folder_options": {"fractions": FRACTIONS}})
    mixed = build_train_set(cfg)
    assert isinstance(mixed, ConcatDataset) and len(mixed) == cfg.train_samples == 8
    folder, synthetic = mixed.datasets
    assert isinstance(folder, FolderPairs) and len(folder) == 6
    assert isinstance(synthetic, SyntheticPairs) and len(synthetic) == 2 and synthetic.split == "train"
    info = describe_training_data(cfg, mixed, None)
    assert info["train"]["synthetic_samples"] == 2 and info["train"]["dataset_samples"] == 6


def test_resume_refuses_a_dataset_with_other_cases(tmp_path: Path):
    from unifuse.train.trainer import Trainer

    root = make_brats_tree(tmp_path / "data", n=4)
    cfg = TrainConfig.from_dict({**_tiny_dict(), "steps": 4, "train_samples": 4, "val_samples": 1,
                                 "data_root": str(root), "data_layout": "brats2020",
                                 "folder_options": {"fractions": FRACTIONS}})
    Trainer(cfg, tmp_path / "run", device="cpu", log_stream=None).fit(stop_at=1)
    make_brats_tree(root, n=6)  # two more subjects appear
    with pytest.raises(UniFuseError, match="other dataset cases"):
        Trainer(cfg, tmp_path / "run", device="cpu", resume=True, log_stream=None)
    # a moved dataset with the same cases resumes (data_root is not compared, the case list is)
    moved = make_brats_tree(tmp_path / "moved", n=4)
    resumed = Trainer(cfg.replace(data_root=str(moved)), tmp_path / "run", device="cpu", resume=True, log_stream=None)
    assert resumed.step == 1


def test_dataset_options_are_checked(tmp_path: Path):
    assert set(DATA_LAYOUTS) == set(LAYOUTS) | {"unifuse-real"}  # + the real-anatomy cache (RealCrops)
    with pytest.raises(UniFuseError, match="data_root and data_layout go together"):
        TrainConfig(name="x", model="tiny", data_root="/data")
    with pytest.raises(UniFuseError, match="mix_synthetic"):
        TrainConfig(name="x", model="tiny", mix_synthetic=0.5)
    with pytest.raises(UniFuseError, match="mix_synthetic must be a fraction"):
        TrainConfig(name="x", model="tiny", data_root="/d", data_layout="brats2020", mix_synthetic=1.0)
    with pytest.raises(UniFuseError, match="unknown folder_options"):
        TrainConfig(name="x", model="tiny", data_root="/d", data_layout="brats2020", folder_options={"fraction": 1})
    with pytest.raises(UniFuseError, match="not one of"):
        TrainConfig(name="x", model="tiny", data_root="/d", data_layout="adni")
    from unifuse.train.cli_train import run_train

    args = _parser().parse_args(["train", "--config", "tiny", "--out", str(tmp_path / "r"), "--data", str(tmp_path)])
    with pytest.raises(UniFuseError, match="--data and --layout go together"):
        run_train(args)
    # a dataset whose validation split is empty says how to fix it
    root = make_brats_tree(tmp_path / "data")
    from unifuse.train.datasets import build_val_set

    cfg = TrainConfig.from_dict({**_tiny_dict(), "data_root": str(root), "data_layout": "brats2020",
                                 "folder_options": {"fractions": [1.0, 0.0, 0.0]}})
    with pytest.raises(DatasetError, match="val split .* is empty.*fractions"):
        build_val_set(cfg)
    assert torch.get_num_threads() == 1


def test_model_card_of_a_dataset_run_names_the_dataset(tmp_path: Path, capsys):
    from unifuse.train.cli_train import run_evaluate, run_train

    root = make_brats_tree(tmp_path / "data")
    out = tmp_path / "run"
    parser = _parser()
    assert run_train(parser.parse_args(["train", "--config", str(tiny_folder_config(tmp_path / "cfg.json", steps=2)),
                                        "--out", str(out), "--device", "cpu", "--data", str(root),
                                        "--layout", "brats2020"])) == 0
    card = tmp_path / "card"
    assert run_evaluate(parser.parse_args(["evaluate", "--weights", str(out / "final.pt"), "--out", str(card),
                                           "--cases", "1", "--device", "cpu", "--model-card"])) == 0
    text = (card / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert "Trained on the `brats2020` dataset folder." in text
    assert "`unifuse.data.folders.FolderPairs(brats2020)` — 8 training samples" in text
    card_json = json.loads((card / "model_card.json").read_text(encoding="utf-8"))
    assert card_json["evaluation"]["checkpoint"]["training"]["training_data"]["dataset"]["layout"] == "brats2020"
    capsys.readouterr()
