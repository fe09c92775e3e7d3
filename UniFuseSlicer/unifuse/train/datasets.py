"""The trainer's training and validation sets: synthetic pairs, a dataset folder, or a mix of both.

Every sample is a pure function of (seed, split, index) — for a dataset folder of (seed, split, case id,
repeat) — so what a sample holds does not depend on which process or DataLoader worker builds it, nor on
how many processes share the run (:mod:`unifuse.train.distributed`).

``TrainConfig.data_root`` None (the default): :class:`~unifuse.data.synthetic.SyntheticPairs` for training
(``train_samples`` cases of ``train_seed``) and validation (``val_samples`` cases of ``val_seed``).

``data_root`` set: :class:`~unifuse.data.folders.FolderPairs` over the folder (layout ``data_layout``), its
subjects split into train/val/test by a stable hash (``folder_options``: ``fractions``, ``split_seed``):

* training: the train split, ``train_samples`` samples (sample i = case ``i mod n``, draw ``i div n``: every
  visit of a case brings a new misalignment and degradation, as synthetic training does);
  with ``mix_synthetic = F``, ``round(F × train_samples)`` of them are synthetic pairs instead (indices after
  the folder samples; the trainer's epoch permutation interleaves them);
* validation: the val split only, ``max(val_samples, cases)`` samples (every validation case at least once);
* the test split is never read here.
"""

from __future__ import annotations

import hashlib
from typing import Any, Dict, List, Optional

from torch.utils.data import ConcatDataset, Dataset

from ..errors import DatasetError
from .configs import FOLDER_OPTION_KEYS, TrainConfig

__all__ = ["build_train_set", "build_val_set", "describe_training_data", "data_fingerprint", "samples_per_case",
           "synthetic_pairs"]

#: The layout of the ``unifuse data real`` cache (:class:`unifuse.train.real_crops.RealCrops`). Its validation
#: split is the benchmark's, so training validates on crops of the training subjects drawn with ``val_seed``.
REAL_LAYOUT = "unifuse-real"
#: ``folder_options`` keys passed to :class:`~unifuse.train.real_crops.RealCrops`.
REAL_OPTION_KEYS = ("spacing_mm", "working_mm", "variants", "none_fraction", "max_rot_deg", "max_trans_mm",
                    "max_scale", "nonrigid_mm")
#: ``data_options`` keys that also apply to a dataset folder (misalignment bounds, undegraded fraction).
_SHARED_OPTION_KEYS = ("none_fraction", "max_rot_deg", "max_trans_mm", "nonrigid_mm")


def synthetic_pairs(split: str, samples: int, size: int, seed: int, options: Optional[Dict[str, Any]] = None) -> Dataset:
    """The synthetic dataset of ``samples`` cases on an ``size``³ grid (see :mod:`unifuse.data.synthetic`)."""
    from ..data.synthetic import SyntheticPairs

    return SyntheticPairs(split=split, size=size, seed=seed, length=samples, **(options or {}))


def _folder_kwargs(cfg: TrainConfig) -> Dict[str, Any]:
    shared = {k: v for k, v in cfg.data_options.items() if k in _SHARED_OPTION_KEYS}
    own = {k: v for k, v in cfg.folder_options.items()
           if k in FOLDER_OPTION_KEYS and (k not in REAL_OPTION_KEYS or k in _SHARED_OPTION_KEYS)}
    if "fractions" in own:
        own["fractions"] = tuple(own["fractions"])
    return {**shared, **own}


def _folder_pairs(cfg: TrainConfig, split: str, seed: int, length: Optional[int]) -> "Dataset":
    if cfg.data_layout == REAL_LAYOUT:  # the real-anatomy cache: crops of its training split
        from .real_crops import RealCrops

        options = {k: v for k, v in cfg.folder_options.items() if k in REAL_OPTION_KEYS}
        return RealCrops(cfg.data_root, "train", size=cfg.grid, length=length or cfg.val_samples, seed=seed, **options)
    from ..data.folders import FolderPairs

    try:
        return FolderPairs(cfg.data_root, cfg.data_layout, size=cfg.grid, split=split, seed=seed, length=length,
                           **_folder_kwargs(cfg))
    except DatasetError as exc:
        if "split" not in str(exc):
            raise
        raise DatasetError(
            f"the {split} split of the dataset '{cfg.data_root}' is empty (subjects are split by a stable hash; "
            f"{exc}); add cases or set folder_options.fractions in a JSON training config (e.g. [0.8, 0.2, 0])"
        ) from None


def build_train_set(cfg: TrainConfig) -> Dataset:
    """The training set of ``cfg``: ``train_samples`` samples (see the module docstring)."""
    if not cfg.uses_dataset:
        return synthetic_pairs("train", cfg.train_samples, cfg.grid, cfg.train_seed, cfg.data_options)
    n_synthetic = int(round(cfg.mix_synthetic * cfg.train_samples))
    n_folder = cfg.train_samples - n_synthetic
    if n_folder < 1:
        raise DatasetError(f"mix_synthetic {cfg.mix_synthetic} leaves no dataset sample of train_samples "
                           f"{cfg.train_samples}; lower --mix-synthetic or raise train_samples")
    folder = _folder_pairs(cfg, "train", cfg.train_seed, n_folder)
    if n_synthetic == 0:
        return folder
    synthetic = synthetic_pairs("train", n_synthetic, cfg.grid, cfg.train_seed, cfg.data_options)
    mixed = ConcatDataset([folder, synthetic])
    mixed.cases = folder.cases  # type: ignore[attr-defined]  # for describe_training_data
    return mixed


def build_val_set(cfg: TrainConfig) -> Dataset:
    """The validation set of ``cfg`` (synthetic ``val`` split, or the dataset's validation subjects)."""
    if not cfg.uses_dataset:
        return synthetic_pairs("val", cfg.val_samples, cfg.grid, cfg.val_seed, cfg.data_options)
    if cfg.data_layout == REAL_LAYOUT:
        return _folder_pairs(cfg, "val", cfg.val_seed, max(cfg.val_samples, 1))
    val = _folder_pairs(cfg, "val", cfg.val_seed, None)
    val.length = max(cfg.val_samples, len(val.cases))  # every validation case at least once
    return val


def _case_ids(dataset: Dataset) -> List[str]:
    return [c.case_id for c in getattr(dataset, "cases", [])]


def data_fingerprint(cfg: TrainConfig, train_set: Dataset, val_set: Optional[Dataset] = None) -> str:
    """SHA-256 (hex, 16 digits) of what the run trains on: synthetic, or the layout and the sorted case ids
    of the training (and validation) split. Equal across processes and folder moves; it changes when cases
    are added, removed or renamed."""
    if not cfg.uses_dataset:
        return "synthetic"
    text = "\n".join([str(cfg.data_layout), *sorted(_case_ids(train_set)), "--", *sorted(_case_ids(val_set) if val_set else [])])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def describe_training_data(cfg: TrainConfig, train_set: Dataset, val_set: Optional[Dataset]) -> Dict[str, Any]:
    """The ``training_data`` entry of an exported checkpoint's metadata (plain JSON data)."""
    if not cfg.uses_dataset:
        return {
            "generator": "unifuse.data.synthetic.SyntheticPairs",
            "train": {"split": "train", "cases": cfg.train_samples, "seed": cfg.train_seed, "size": cfg.grid},
            "validation": {"split": "val", "cases": cfg.val_samples, "seed": cfg.val_seed, "size": cfg.grid},
            "options": cfg.data_options,
        }
    n_synthetic = int(round(cfg.mix_synthetic * cfg.train_samples))
    train_cases = _case_ids(train_set)
    val_cases = _case_ids(val_set) if val_set is not None else []
    return {
        "generator": ("unifuse.train.real_crops.RealCrops(train split; validation: crops of the training subjects)"
                      if cfg.data_layout == REAL_LAYOUT else f"unifuse.data.folders.FolderPairs({cfg.data_layout})"),
        "dataset": {
            "root": str(cfg.data_root),
            "layout": cfg.data_layout,
            "train_cases": len(train_cases),
            "val_cases": len(val_cases),
            "train_subjects": len({c.split("/", 1)[0] for c in train_cases}),
            "fingerprint": data_fingerprint(cfg, train_set, val_set),
            "folder_options": cfg.folder_options,
        },
        "train": {"split": "train", "cases": cfg.train_samples, "dataset_samples": cfg.train_samples - n_synthetic,
                  "synthetic_samples": n_synthetic, "seed": cfg.train_seed, "size": cfg.grid},
        "validation": {"split": "val", "cases": len(val_set) if val_set is not None else None,
                       "seed": cfg.val_seed, "size": cfg.grid},
        "mix_synthetic": cfg.mix_synthetic,
        "options": cfg.data_options,
    }


def samples_per_case(cfg: TrainConfig, train_set: Dataset) -> float:
    """Mean visits of each training case per pass over ``train_samples`` (for the start-up message)."""
    cases = len(getattr(train_set, "cases", []) or [1])
    return (cfg.train_samples - int(round(cfg.mix_synthetic * cfg.train_samples))) / max(cases, 1)
