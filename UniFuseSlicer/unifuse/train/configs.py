"""Training configurations of UniFuse (optimiser, schedule, data, logging), as plain dataclasses.

Five named configs ship:

``tiny``
    The unit-test setting: the ``tiny`` network on 16³ grids, a few synthetic cases, tens of steps.
``cpu``
    The setting that produced the shipped weights on a 2-core CPU in under an hour (see
    ``UniFuseSlicer/Resources/Models/MODEL_CARD.md`` for the exact run).
``cpu_finetune``
    Continue training ``cpu`` weights (``--init-from``) at a lower learning rate on new synthetic cases
    (stage 2 of the shipped weights).
``cpu_stats``
    Stage 3 of the shipped weights: grow the degradation-statistics branch on stage-2 weights and fine-tune,
    with L_inten towards the mean of the sources.
``gpu``
    Paper-like: the ``default`` network, batch 3, lr 1e-4 → 1e-6 cosine, mixed precision, a large synthetic
    pool regenerated on the fly (the paper trains 500 epochs at 160³ on one RTX 4090; §4.2).

Learning rate: the paper uses AdamW with 1e-4 decayed to 1e-6 by cosine annealing over ~60k steps
(500 epochs × 369 pairs / batch 3). A CPU run affords a few thousand steps; with so few steps 1e-4 leaves the
network far from converged, so the ``cpu`` config scales the peak rate up (documented in
``docs/training.md`` with the measurement that justified it) and keeps the paper's cosine shape, its final
rate of 1e-6 and its gradient clipping at an L2 norm of 1.

A config can also be read from / written to JSON (:func:`load_train_config`), so users retraining on their
own machine can change any field without editing code.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

from ..config import CONFIGS, ModelConfig, get_config
from ..errors import ConfigError, UniFuseError

__all__ = [
    "TrainConfig",
    "TRAIN_CONFIGS",
    "tiny",
    "cpu",
    "cpu_finetune",
    "cpu_stats",
    "cpu_real",
    "cpu_real_deform",
    "gpu",
    "get_train_config",
    "load_train_config",
    "DATA_LAYOUTS",
    "FOLDER_OPTION_KEYS",
]

AMP_CHOICES = ("auto", "bf16", "fp16", "off")
INIT_CHOICES = ("he_conv", "pytorch")
#: Dataset-folder layouts the trainer reads (the keys of :data:`unifuse.data.folders.LAYOUTS`, plus
#: ``unifuse-real``: the ``unifuse data real`` cache read by :class:`unifuse.train.real_crops.RealCrops`; listed
#: here so that reading a config does not import the imaging stack).
DATA_LAYOUTS = ("brats2020", "synthrad2023", "fdg-petct", "unifuse-real")
#: ``folder_options`` keys: :class:`unifuse.data.folders.FolderPairs` arguments a config may set.
FOLDER_OPTION_KEYS = ("degradation", "split_seed", "fractions", "none_fraction", "max_rot_deg", "max_trans_mm",
                      "nonrigid_mm", "region", "reference", "moving",
                      # the unifuse-real layout (unifuse.train.real_crops.RealCrops)
                      "spacing_mm", "working_mm", "variants", "max_scale")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (the network itself is named by ``model``).

    Attributes:
        name: config name, recorded in logs and checkpoints.
        model: name of the network config in :data:`unifuse.config.CONFIGS`.
        working_size: edge S of the S³ training grid in voxels (None = the network config's
            ``working_size``). Must be a multiple of the network's ``size_multiple``.
        batch_size: volumes per optimisation step.
        steps: total optimisation steps; the cosine schedule reaches ``lr_min`` at this step.
        lr: peak learning rate of AdamW.
        lr_min: final learning rate of the cosine schedule.
        lr_multipliers: ``{parameter-name prefix: factor}``: parameters whose name (``model.named_parameters()``)
            starts with a prefix train at ``factor`` × the scheduled learning rate (the longest matching prefix
            wins), e.g. ``{"dapl.stats.": 20}`` for a branch added to a trained network. Empty = one rate.
        warmup_steps: linear warm-up from ``lr / 10`` to ``lr`` before the cosine decay (0 = none).
        weight_decay: AdamW decoupled weight decay.
        betas: AdamW betas.
        grad_clip: maximum L2 norm of the full gradient (paper: 1).
        amp: mixed precision on CUDA: ``auto`` (bf16 if the GPU supports it, else fp16 + GradScaler),
            ``bf16``, ``fp16`` or ``off``. Always off on CPU.
        train_samples: number of distinct synthetic training cases; the data order cycles through them in a
            seeded random permutation per epoch.
        val_samples: number of cases in the fixed held-out validation set.
        train_seed: seed of the training cases (case i is a pure function of (train_seed, i)).
        val_seed: seed of the held-out set; must differ from ``train_seed`` so the sets do not overlap.
        data_options: extra keyword arguments of :class:`unifuse.data.synthetic.SyntheticPairs`.
        data_root: dataset folder to train on (None = synthetic pairs only). Its cases are read by
            :class:`unifuse.data.folders.FolderPairs` (layout ``data_layout``), resampled to the training grid
            and misaligned and degraded on the fly exactly like synthetic pairs; the cases' subjects are split
            into train/val/test by a stable hash (``folder_options["fractions"]``, default 70/10/20 %):
            training uses the train split, validation the val split, the test split is left for evaluation.
            ``train_samples`` is then the number of distinct (case, draw) samples, each case visited
            ``≈ train_samples / cases`` times with new draws; ``val_samples`` is the minimum validation
            samples (every validation case at least once). Not compared on ``--resume`` (the case list is).
        data_layout: ``brats2020``, ``synthrad2023`` or ``fdg-petct`` (required with ``data_root``).
        mix_synthetic: fraction in [0, 1) of the training samples drawn from synthetic pairs instead of the
            dataset (with ``data_root``): ``round(mix_synthetic × train_samples)`` synthetic cases join the
            data set and the seeded epoch permutation interleaves them; validation uses the dataset only.
        folder_options: :class:`~unifuse.data.folders.FolderPairs` options (:data:`FOLDER_OPTION_KEYS`:
            ``degradation``, ``split_seed``, ``fractions``, ``none_fraction``, the misalignment bounds, SynthRAD
            ``region``, BraTS ``reference``/``moving`` sequence suffixes); misalignment bounds and
            ``none_fraction`` default to ``data_options``' values. Unused without ``data_root`` (so one config
            file can name the options and ``--data`` the folder).
        cache_train: keep generated training cases in memory (worth it when epochs repeat cases and the
            synthesis costs more than a step; memory ≈ train_samples × ~12 volumes × S³ × 4 bytes).
        num_workers: DataLoader worker processes for the training set (0 = synthesise in the main process).
        loss_weights: keyword arguments of :class:`unifuse.train.losses.LossWeights` (empty = its defaults).
        init: weight initialisation applied after the network is built: ``"he_conv"`` re-initialises every
            Conv3d that is not deliberately zero-initialised with Kaiming-normal weights (fan-in, ReLU gain)
            and zero biases (see ``docs/training.md`` for the measurement that motivated it); ``"pytorch"``
            keeps the modules' own initialisation.
        init_from: path of a :mod:`unifuse.weights` checkpoint to start from (fine-tuning; its network config
            must equal this run's, or lack only ``degradation_stats``, which the run then adds; ``init`` is
            not applied). None = a freshly initialised network.
        true_degradation_in_training: feed the true degradation class (one-hot) to the prompts and the ALSN
            LoRA mixing during training steps instead of the classifier's p (teacher forcing); the classifier
            is then trained by L_ce alone. Validation uses the classifier's p (the pipeline mixes with its
            calibrated probabilities, :mod:`unifuse.degradation_evidence`).
        soft_degradation_fraction: with ``true_degradation_in_training``, the fraction in [0, 1] of training
            samples whose prompts and ALSN mix the classes with a *soft* probability vector instead of the
            one-hot true class, as at inference, where the pipeline mixes with calibrated probabilities
            (:func:`unifuse.train.trainer.soft_class_weights`: the one-hot vector blended with a random one,
            sometimes so far that another class wins). 0 = one-hot only (and no random draw, so older runs
            replay unchanged).
        val_every: validate every this many steps (and at the last step).
        checkpoint_every: write the resumable training state every this many steps (and at the last step).
        log_every: print a progress line on stderr every this many steps.
        seed: seed of the network initialisation and of every random choice made during training.
        num_threads: ``torch.set_num_threads`` for CPU runs (None = leave PyTorch's default).
    """

    name: str
    model: str = "default"
    working_size: Optional[int] = None
    batch_size: int = 1
    steps: int = 1000
    lr: float = 1e-4
    lr_min: float = 1e-6
    lr_multipliers: Dict[str, float] = field(default_factory=dict)
    warmup_steps: int = 0
    weight_decay: float = 1e-2
    betas: tuple = (0.9, 0.999)
    grad_clip: float = 1.0
    amp: str = "auto"
    train_samples: int = 256
    val_samples: int = 16
    train_seed: int = 1
    val_seed: int = 1_000_003
    data_options: Dict[str, Any] = field(default_factory=dict)
    data_root: Optional[str] = None
    data_layout: Optional[str] = None
    mix_synthetic: float = 0.0
    folder_options: Dict[str, Any] = field(default_factory=dict)
    cache_train: bool = False
    num_workers: int = 0
    loss_weights: Dict[str, Any] = field(default_factory=dict)
    init: str = "he_conv"
    init_from: Optional[str] = None
    true_degradation_in_training: bool = False
    soft_degradation_fraction: float = 0.0
    val_every: int = 100
    checkpoint_every: int = 100
    log_every: int = 10
    seed: int = 0
    num_threads: Optional[int] = None

    def __post_init__(self) -> None:
        problems = []
        if self.model not in CONFIGS:
            problems.append(f"model {self.model!r} is not one of {sorted(CONFIGS)}")
        for name in ("batch_size", "steps", "train_samples", "val_samples", "val_every", "checkpoint_every", "log_every"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.warmup_steps < 0 or self.warmup_steps >= self.steps:
            problems.append(f"warmup_steps must be in [0, steps) (got {self.warmup_steps} with steps={self.steps})")
        if not (0 < self.lr_min <= self.lr):
            problems.append(f"need 0 < lr_min <= lr (got lr={self.lr}, lr_min={self.lr_min})")
        for prefix, factor in dict(self.lr_multipliers).items():
            if not isinstance(prefix, str) or not prefix:
                problems.append(f"lr_multipliers keys must be non-empty parameter-name prefixes (got {prefix!r})")
            if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 0):
                problems.append(f"lr_multipliers[{prefix!r}] must be a finite number > 0 (got {factor!r})")
        if self.grad_clip <= 0:
            problems.append(f"grad_clip must be > 0 (got {self.grad_clip})")
        if self.init not in INIT_CHOICES:
            problems.append(f"init must be one of {INIT_CHOICES} (got {self.init!r})")
        if self.amp not in AMP_CHOICES:
            problems.append(f"amp must be one of {AMP_CHOICES} (got {self.amp!r})")
        if self.train_seed == self.val_seed:
            problems.append("train_seed and val_seed must differ, otherwise validation cases are training cases")
        if self.num_workers < 0:
            problems.append(f"num_workers must be >= 0 (got {self.num_workers})")
        if self.cache_train and self.num_workers > 0:
            problems.append("cache_train keeps cases in the main process and needs num_workers=0 (workers would each cache a copy)")
        soft = self.soft_degradation_fraction
        if isinstance(soft, bool) or not isinstance(soft, (int, float)) or not 0.0 <= soft <= 1.0:
            problems.append(f"soft_degradation_fraction must be a fraction in [0, 1] (got {soft!r})")
        elif soft > 0 and not self.true_degradation_in_training:
            problems.append("soft_degradation_fraction softens the teacher-forced class; it needs "
                            "true_degradation_in_training=True (without it the classifier's own p is used already)")
        problems += self._data_problems()
        if self.num_threads is not None and self.num_threads < 1:
            problems.append(f"num_threads must be >= 1 or None (got {self.num_threads})")
        if not problems and self.working_size is not None:
            mult = self.model_config().size_multiple
            if self.working_size <= 0 or self.working_size % mult:
                problems.append(f"working_size {self.working_size} must be a positive multiple of {mult} for model {self.model!r}")
        if problems:
            raise UniFuseError(f"invalid training config {self.name!r}: " + "; ".join(problems))

    def _data_problems(self) -> list:
        """What is wrong with the dataset fields (empty when nothing)."""
        problems = []
        if (self.data_root is None) != (self.data_layout is None):
            problems.append("data_root and data_layout go together (unifuse train --data DIR --layout LAYOUT)")
        if self.data_layout is not None and self.data_layout not in DATA_LAYOUTS:
            problems.append(f"data_layout {self.data_layout!r} is not one of {', '.join(DATA_LAYOUTS)}")
        mix = self.mix_synthetic
        if isinstance(mix, bool) or not isinstance(mix, (int, float)) or not 0.0 <= mix < 1.0:
            problems.append(f"mix_synthetic must be a fraction in [0, 1) (got {mix!r})")
        elif mix > 0 and self.data_root is None:
            problems.append("mix_synthetic mixes synthetic pairs into a dataset; it needs data_root (--data)")
        unknown = sorted(set(self.folder_options) - set(FOLDER_OPTION_KEYS))
        if unknown:
            problems.append(f"unknown folder_options {unknown}; known: {', '.join(FOLDER_OPTION_KEYS)}")
        return problems

    @property
    def uses_dataset(self) -> bool:
        """True when the run trains on a dataset folder (``data_root``)."""
        return self.data_root is not None

    def model_config(self) -> ModelConfig:
        """The network config, with ``working_size`` set to the training grid (recorded in the checkpoint)."""
        cfg = get_config(self.model)
        if self.working_size is not None and self.working_size != cfg.working_size:
            cfg = cfg.replace(working_size=int(self.working_size))
        return cfg

    @property
    def grid(self) -> int:
        """Edge of the training grid in voxels."""
        return int(self.working_size if self.working_size is not None else get_config(self.model).working_size)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown training-config fields {unknown}; known fields: {sorted(known)}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


def tiny() -> TrainConfig:
    """Unit-test setting: ``tiny`` network, 16³ grid, 8 training cases, 40 steps, no workers (seconds on CPU)."""
    return TrainConfig(
        name="tiny",
        model="tiny",
        working_size=16,
        batch_size=2,
        steps=40,
        lr=3e-3,
        lr_min=1e-5,
        train_samples=8,
        val_samples=4,
        cache_train=True,
        val_every=10,
        checkpoint_every=10,
        log_every=10,
        num_threads=None,
    )


def cpu() -> TrainConfig:
    """The shipped-weights run: the ``cpu`` network (``default`` architecture, 32³ grid) on a 2-core CPU.

    Sized by measurement (``docs/training.md``): ~0.75 s per step of batch 2 on one core, so 4000 steps (8000
    fresh synthetic cases, none repeated) take under an hour. Peak lr 5e-4 (5× the paper's; see the module
    docstring and the lr comparison in ``docs/training.md``), 200 warm-up steps, L_reg weighted 10 (the
    paper's L_reg is a sum over voxels, ours a mean), teacher-forced degradation class during training steps.
    """
    return TrainConfig(
        name="cpu",
        model="cpu",
        working_size=32,
        batch_size=2,
        steps=4000,
        lr=5e-4,
        lr_min=1e-6,
        warmup_steps=200,
        train_samples=10000,
        val_samples=16,
        cache_train=False,
        loss_weights={"reg": 10.0},
        true_degradation_in_training=True,
        val_every=250,
        checkpoint_every=250,
        log_every=50,
        num_threads=1,
    )


def cpu_finetune() -> TrainConfig:
    """Continue training ``cpu`` weights on new cases at a lower rate, 2e-4 → 1e-6 cosine over 2400 steps
    (``unifuse train --config cpu_finetune --init-from UniFuseSlicer/Resources/Models/unifuse_default.pt``);
    3600 cases of ``train_seed`` 2, which the ``cpu`` run never saw. It was the second stage of the first
    shipped weights (token-only FA) and, with ``--steps 1200``, of the current ones (``docs/training.md``).
    """
    return cpu().replace(
        name="cpu_finetune",
        steps=2400,
        lr=2e-4,
        warmup_steps=0,
        train_seed=2,
        train_samples=3600,
    )


def cpu_stats() -> TrainConfig:
    """Stage 3 of the shipped weights: add the degradation-statistics branch to stage-2 weights and fine-tune.

    ``unifuse train --config cpu_stats --init-from <stage-2 weights> --out runs/stats`` (the stage-2 network
    has no ``degradation_stats``; the trainer grows the branch, calibrates its standardisation on the first
    64 training cases and trains it at 30× the rate). 1500 steps at 1.5e-4 → 1e-6 on 3000 cases of
    ``train_seed`` 3 (new to stages 1–2), about 23 minutes on one CPU thread. L_inten targets the mean of the
    two sources instead of the paper's max (``LossWeights.inten_target``; why: ``docs/training.md``).
    """
    return cpu().replace(
        name="cpu_stats",
        steps=1500,
        lr=1.5e-4,
        warmup_steps=0,
        train_seed=3,
        train_samples=3000,
        lr_multipliers={"dapl.stats.": 30.0},
        loss_weights={**cpu().loss_weights, "inten_target": "mean"},
    )


def cpu_real() -> TrainConfig:
    """Fine-tune the shipped ``cpu`` weights for the staged pipeline on real anatomy (issues 11 and 12).

    ``unifuse train --config cpu_real --init-from UniFuseSlicer/Resources/Models/unifuse_default.pt
    --out runs/real`` after ``unifuse data real``: 32³ crops of the real training cases
    (:class:`unifuse.train.real_crops.RealCrops`; half at the 3 mm working spacing, half at 1–3 mm, i.e. the
    reference resolution the fusion now runs at) with the affine stage's residual misalignment, 20 % synthetic
    whole-head pairs; the restoration output grown and trained (``restore`` 1), the FA head's cell-centred
    upsampling, and L_inten towards the paper's maximum of the two sources. Both CPU threads.
    """
    return cpu().replace(
        name="cpu_real",
        steps=3000,
        lr=2e-4,
        warmup_steps=50,
        train_seed=4,
        train_samples=6000,
        val_samples=16,
        data_root="real_data",
        data_layout="unifuse-real",
        mix_synthetic=0.2,
        loss_weights={"reg": 10.0, "restore": 1.0, "inten_target": "max"},
        lr_multipliers={"ufrf.restore_out.": 10.0},
        val_every=250,
        checkpoint_every=100,
        num_threads=2,
    )


def cpu_real_deform() -> TrainConfig:
    """Fine-tune the ``cpu_real`` weights on larger residual deformations, with soft class mixtures (issues 11, 12).

    ``unifuse train --config cpu_real_deform --init-from UniFuseSlicer/Resources/Models/unifuse_default.pt
    --out runs/deform``. ``cpu_real``'s crops left a sub-voxel residual (a smooth field of up to 3 mm) that the
    field head learned to leave alone; here the smooth part of the residual is drawn with up to 6 mm per
    component on the crop's 4³ control grid (a mean length of ~3 mm, 1 working-grid voxel, and up to ~10 mm),
    the scale of the non-affine part that real deformations leave after the affine stage
    (``docs/probes/large_deformation_cases.py``). Half the samples condition the prompts and ALSN on a soft
    class mixture (``soft_degradation_fraction``), as the pipeline does with its calibrated probabilities.
    """
    return cpu_real().replace(
        name="cpu_real_deform",
        steps=2400,
        warmup_steps=50,
        train_seed=5,
        train_samples=4800,
        folder_options={"nonrigid_mm": 6.0},
        lr_multipliers={},
        soft_degradation_fraction=0.5,
        val_every=300,
    )


def gpu() -> TrainConfig:
    """Paper-like setting for one CUDA GPU: ``default`` network at 64³, batch 3, lr 1e-4 → 1e-6, AMP."""
    return TrainConfig(
        name="gpu",
        model="default",
        working_size=64,
        batch_size=3,
        steps=60_000,
        lr=1e-4,
        lr_min=1e-6,
        warmup_steps=500,
        train_samples=180_000,
        val_samples=64,
        cache_train=False,
        num_workers=8,
        amp="auto",
        val_every=1000,
        checkpoint_every=1000,
        log_every=50,
    )


TRAIN_CONFIGS: Dict[str, Callable[[], TrainConfig]] = {
    "tiny": tiny, "cpu": cpu, "cpu_finetune": cpu_finetune, "cpu_stats": cpu_stats, "cpu_real": cpu_real,
    "cpu_real_deform": cpu_real_deform, "gpu": gpu,
}


def load_train_config(path: Union[str, Path]) -> TrainConfig:
    """Read a training config from a JSON file holding :meth:`TrainConfig.to_dict` fields.

    A field ``"base": "<name>"`` starts from that named config and overrides only the fields given.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UniFuseError(f"training config file {p} does not exist; pass a config name ({', '.join(TRAIN_CONFIGS)}) or a JSON file") from None
    except json.JSONDecodeError as exc:
        raise UniFuseError(f"training config file {p} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise UniFuseError(f"training config file {p} must hold a JSON object of TrainConfig fields")
    base = data.pop("base", None)
    data.setdefault("name", p.stem)
    if base is not None:
        merged = get_train_config(base).to_dict()
        merged.update(data)
        data = merged
    return TrainConfig.from_dict(data)


def get_train_config(name_or_path: Union[str, Path]) -> TrainConfig:
    """A named training config (``tiny``, ``cpu``, ``gpu``) or one read from a JSON file path."""
    key = str(name_or_path)
    if key in TRAIN_CONFIGS:
        return TRAIN_CONFIGS[key]()
    if key.endswith(".json") or Path(key).is_file():
        return load_train_config(key)
    raise UniFuseError(f"unknown training config {key!r}; choose one of {sorted(TRAIN_CONFIGS)} or pass a JSON file path")
