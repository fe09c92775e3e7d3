"""The UniFuse trainer: seeded, resumable, logged training on synthetic pairs or a dataset folder (paper §4.2),
in one process or data-parallel over several (:mod:`unifuse.train.distributed`).

One optimisation step (``Trainer.train_step``)::

    out   = model(R, D')                                 # classifier p drives prompts and ALSN
    A_gt  = warp(D_fine, u_gt)                           # clean moving volume, aligned by the true field
    F̄_D, F̄'_R = model.encode_unified(A_gt, R', h)        # the clean pair {I_D, I'_R} of eq. (4)
    L     = UniFuseLoss(logits vs class, [(F̄_D, F̄_R), (F̄'_D, F̄'_R)], u vs u_gt,
                        F vs (warp(D_fine, u), R))        # L_ce + L_moda + L_reg + λ L_smooth + L_rf
    AdamW step with the gradient clipped to an L2 norm of ``grad_clip``; cosine learning-rate schedule.

Here R = ``reference``, D' = ``moving`` (degraded, misaligned), D_fine = ``moving_clean`` (same pose,
no degradation), R' = ``reference_moved`` (reference in the moving volume's pose) and u_gt = ``field``, all on
the S³ working grid; fields are pull-back displacements in voxels with channels (x, y, z)
(``aligned(p) = moving(p + u(p))``).

Output folder (``out_dir``)::

    train_config.json   the TrainConfig of the run
    train_state.pt      resumable state: model, optimiser, scheduler, GradScaler, step, RNG states, best
                        validation loss (written atomically every ``checkpoint_every`` steps)
    train_log.csv       one row per step: lr, every loss component, gradient norm, timing
    val_log.csv         one row per validation: every loss component and the validation metrics
    log.jsonl           the same records as JSON lines ({"kind": "train" | "val", ...})
    best.pt (+.sha256)  the network with the lowest validation loss (unifuse.weights checkpoint)
    final.pt (+.sha256) the network after the last step
    summary.json        best step, best validation loss, wall time, steps

Determinism: the network initialisation, the data order (a seeded permutation per epoch; case i of the
synthetic set is a function of (seed, i), a dataset sample of (seed, case id, repeat)), L_moda's negative
sampling and every other random choice are seeded; resuming restores all RNG states, so on CPU a resumed run
ends with the same parameters as an uninterrupted one. CUDA runs are seeded but not bit-reproducible
(non-deterministic kernels). Data-parallel runs (``torchrun``) give the updates of one process with the same
global batch (up to floating-point summation order) and resume on any number of processes.

Data (:mod:`unifuse.train.datasets`): synthetic pairs, or with ``TrainConfig.data_root`` a BraTS2020,
SynthRAD2023 or FDG-PET/CT folder (optionally mixed with synthetic pairs), misaligned and degraded on the fly.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ContextManager, Dict, Iterator, List, Optional, Sequence, TextIO, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import UniFuseError
from ..io import atomic_write
from ..procfs import cpu_model
from ..spatial import jacobian_determinant, warp
from ..weights import save_checkpoint
from .configs import TrainConfig
from .datasets import build_train_set, build_val_set, data_fingerprint, describe_training_data, synthetic_pairs
from .distributed import (DistContext, DistributedError, all_gather_objects, all_reduce_mean, barrier, rank_seed,
                          rank_slice, single_process)
from .losses import LossWeights, UniFuseLoss, ssim3d_torch

__all__ = [
    "LOSS_COMPONENTS",
    "TRAIN_COLUMNS",
    "VAL_COLUMNS",
    "STATE_FILE",
    "EpochPermutationSampler",
    "CachedDataset",
    "TrainResult",
    "Trainer",
    "cosine_lr_factor",
    "describe_source_checkpoint",
    "he_conv_init",
    "parameter_groups",
    "make_dataset",
    "soft_class_weights",
]

#: Largest blend weight of the random part of a soft class mixture (:func:`soft_class_weights`).
SOFT_MIX_MAX = 0.75

#: Parameter-name prefix of the degradation-statistics branch (``ModelConfig.degradation_stats``).
DEGRADATION_STATS_PREFIX = "dapl.stats."
#: Training cases whose moving volumes standardise a new degradation-statistics branch.
CALIBRATION_CASES = 64

#: Loss components logged every step (unweighted, as returned by :class:`UniFuseLoss`; ``total`` is weighted).
LOSS_COMPONENTS = ("total", "ce", "moda", "reg", "smooth", "rf", "rf_ssim", "rf_inten", "rf_grad", "restore")
#: Columns of ``train_log.csv``.
TRAIN_COLUMNS = ("step", "epoch", "lr", *(f"loss_{c}" for c in LOSS_COMPONENTS), "grad_norm", "step_time_s", "elapsed_s")
#: Validation metrics (besides the loss components) in ``val_log.csv``.
VAL_METRICS = (
    "epe_vox",            # mean ‖u − u_gt‖ in voxels of the working grid
    "epe_vox_identity",   # the same for u = 0 (no registration)
    "folding_percent",    # % voxels with det J ≤ 0
    "degradation_accuracy",
    "fused_ssim_sum",     # SSIM(F, R) + SSIM(F, warp(D_fine, u_gt)), cf. Q_ssim
)
VAL_COLUMNS = ("step", *(f"val_loss_{c}" for c in LOSS_COMPONENTS), *(f"val_{m}" for m in VAL_METRICS), "elapsed_s")

STATE_FILE = "train_state.pt"
STATE_FORMAT = "unifuse-train-state"
STATE_VERSION = 1
#: TrainConfig fields that may differ between a run and its resumption (they do not change the result;
#: ``data_root`` may move — the dataset's case list is compared instead).
RESUME_FREE_FIELDS = ("steps", "num_threads", "num_workers", "log_every", "data_root")


# --------------------------------------------------------------------------------------------- helpers
def cosine_lr_factor(step: int, total: int, warmup: int, lr: float, lr_min: float) -> float:
    """Multiplier of ``lr`` for optimisation step ``step`` (0-based): linear warm-up from 0.1 to 1 over
    ``warmup`` steps, then cosine annealing to ``lr_min / lr`` at step ``total`` (paper §4.2). Driven by
    ``LambdaLR``: ``SequentialLR(LinearLR, CosineAnnealingLR)`` gives the same curve (5e-14 relative, tested)
    but stores ``T_max`` in its state, so a resume with another ``steps`` would keep the old schedule and
    states saved by earlier runs would not load."""
    floor = lr_min / lr
    if step < warmup:
        return 0.1 + 0.9 * step / warmup
    span = max(total - warmup, 1)
    t = min(max(step - warmup, 0), span) / span
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def describe_source_checkpoint(ckpt: Any) -> Dict[str, Any]:
    """Provenance of a checkpoint a run started from (fine-tuning): path, SHA-256, its step, training config
    and compute, and its run folder's ``summary.json`` when present (plain data for checkpoint metadata)."""
    meta = ckpt.metadata
    info: Dict[str, Any] = {
        "path": str(ckpt.path),
        "sha256": ckpt.sha256,
        "step": meta.get("step"),
        "train_config": meta.get("train_config"),
        "training_data": meta.get("training_data"),
        "compute": meta.get("compute"),
    }
    if ckpt.path is not None and (Path(ckpt.path).parent / "summary.json").is_file():
        info["run_summary"] = json.loads((Path(ckpt.path).parent / "summary.json").read_text(encoding="utf-8"))
    if meta.get("initialised_from"):
        info["initialised_from"] = meta["initialised_from"]
    return info


def parameter_groups(
    model: torch.nn.Module, lr: float, multipliers: Dict[str, float]
) -> List[Dict[str, Any]]:
    """AdamW parameter groups: the first holds every parameter at ``lr``; one group per prefix of ``multipliers``
    holds the parameters whose name starts with it (longest prefix wins) at ``factor × lr``.

    Raises UniFuseError for a prefix that names no parameter (a typo would silently train at the base rate).
    """
    prefixes = sorted(multipliers, key=len, reverse=True)
    groups: Dict[str, List[torch.nn.Parameter]] = {p: [] for p in prefixes}
    base: List[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        match = next((p for p in prefixes if name.startswith(p)), None)
        (groups[match] if match is not None else base).append(param)
    unused = [p for p in prefixes if not groups[p]]
    if unused:
        raise UniFuseError(f"lr_multipliers prefixes {unused} match no parameter of the network; check the names "
                           f"(e.g. 'dapl.stats.')")
    out: List[Dict[str, Any]] = [{"params": base, "lr": lr}]
    out += [{"params": groups[p], "lr": lr * float(multipliers[p])} for p in prefixes]
    return out


def he_conv_init(model: torch.nn.Module) -> int:
    """Kaiming-normal weights (fan-in, ReLU gain) and zero biases for every ``Conv3d`` of ``model`` whose weight
    is not all zero (deliberately zero-initialised layers — the field head, LoRA up-projections — keep their
    zeros). Uses the global torch RNG (seeded by the trainer). Returns the number of layers re-initialised.

    Why: the network's conv stacks have no normalisation layers; with PyTorch's default initialisation
    (uniform weights of gain 1/√3 and uniform biases) the input-dependent part of the activations shrinks at
    every conv + GELU while the biases do not, so the feature-alignment head sees (almost) the same features
    for every input pair and neither the field nor the degradation classifier can start learning.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Conv3d) and bool(module.weight.detach().ne(0).any()):
            torch.nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
            count += 1
    return count


class EpochPermutationSampler(Sampler[int]):
    """Endless stream of case indices: epoch e visits ``randperm(n)`` seeded with ``(seed, e)``.

    ``start`` skips the first ``start`` indices of the stream, so a run resumed at step k with batch b uses
    ``start = k · b`` and sees exactly the cases an uninterrupted run would have seen.

    Data-parallel sharding (``world_size`` > 1): the stream is cut into global batches of ``batch_size``
    indices and this sampler yields only rank ``rank``'s contiguous slice of each (``batch_size / world_size``
    indices); the slices of all ranks, in rank order, are exactly the one-process stream. ``start`` must then
    be a multiple of ``batch_size`` (it is: ``step × global batch``).
    """

    def __init__(self, n: int, seed: int, start: int = 0, batch_size: int = 1, rank: int = 0,
                 world_size: int = 1) -> None:
        if n < 1:
            raise ValueError(f"need at least one case, got n={n}")
        if world_size < 1 or not 0 <= rank < world_size or batch_size % world_size:
            raise ValueError(f"rank {rank} of {world_size} cannot take an equal slice of batches of {batch_size}")
        if world_size > 1 and start % batch_size:
            raise ValueError(f"start {start} is not at a batch boundary (batch {batch_size})")
        self.n, self.seed, self.start = int(n), int(seed), int(start)
        self.batch_size, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)

    def epoch_order(self, epoch: int) -> List[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def _stream(self) -> Iterator[int]:
        epoch, offset = divmod(self.start, self.n)
        while True:
            order = self.epoch_order(epoch)
            yield from order[offset:]
            epoch, offset = epoch + 1, 0

    def __iter__(self) -> Iterator[int]:
        if self.world_size == 1:
            yield from self._stream()
            return
        local = self.batch_size // self.world_size
        lo = self.rank * local
        stream = self._stream()
        while True:
            batch = [next(stream) for _ in range(self.batch_size)]
            yield from batch[lo:lo + local]

    def __len__(self) -> int:  # an endless sampler; DataLoader only needs this for progress bars
        return sys.maxsize


class CachedDataset(Dataset):
    """Wraps a deterministic dataset and keeps every generated case in memory (main process only)."""

    def __init__(self, base: Dataset) -> None:
        self.base = base
        self._cache: Dict[int, Dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        item = self._cache.get(index)
        if item is None:
            item = self.base[index]
            self._cache[index] = item
        return item


def soft_class_weights(classes: torch.Tensor, num_classes: int, fraction: float, generator: torch.Generator,
                       batch_slice: Optional[tuple] = None) -> torch.Tensor:
    """Teacher-forcing class weights with soft mixtures, (B, Ñ) float rows that sum to 1.

    Each sample gets the one-hot vector of its true class ``classes`` (B,), except a random ``fraction`` of
    them, which get ``(1 - a) one_hot + a q`` with ``a ~ U(0, SOFT_MIX_MAX)`` and ``q`` uniform on the simplex
    (Dirichlet(1, …, 1)): the kind of calibrated probabilities the pipeline mixes the LoRA experts with, from
    confident to wrong (for ``a`` > 0.5 another class can carry the most weight). The draws come from
    ``generator`` for the global batch (``batch_slice`` = (this rank's offset, global batch size); default
    this batch), so every process of a data-parallel run draws the same numbers.
    """
    b = int(classes.shape[0])
    offset, total = batch_slice if batch_slice is not None else (0, b)
    chosen = torch.rand(total, generator=generator)[offset:offset + b] < fraction
    blend = (torch.rand(total, generator=generator) * SOFT_MIX_MAX)[offset:offset + b]
    q = -torch.log(torch.rand(total, num_classes, generator=generator).clamp_min(1e-12))[offset:offset + b]
    q = q / q.sum(dim=1, keepdim=True)
    one_hot = torch.nn.functional.one_hot(classes.cpu(), num_classes).float()
    a = torch.where(chosen, blend, torch.zeros_like(blend))[:, None]
    return ((1.0 - a) * one_hot + a * q).to(classes.device)


def make_dataset(split: str, samples: int, size: int, seed: int, options: Optional[Dict[str, Any]] = None) -> Dataset:
    """The synthetic dataset of ``samples`` cases on an ``size``³ grid (see :mod:`unifuse.data.synthetic`)."""
    return synthetic_pairs(split, samples, size, seed, options)


class _TrainingForward(torch.nn.Module):
    """The forward pass of a training step as one module call, so ``DistributedDataParallel`` sees every use
    of the parameters: the network on (R, D') and its unified encoder on the clean pair {I_D, I'_R}."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, reference: torch.Tensor, moving: torch.Tensor, degradation: Optional[torch.Tensor],
                aligned_clean: torch.Tensor, reference_moved: torch.Tensor):
        """All (B, 1, S, S, S) volumes; ``degradation`` (B,) class ids or (B, Ñ) class weights for teacher
        forcing, or None.
        Returns ``(UniFuseOutput, F̄_D, F̄'_R)`` with token sets (B, N, M)."""
        out = self.model(reference, moving, degradation=degradation)
        tokens_d, tokens_r_moved = self.model.encode_unified(aligned_clean, reference_moved, out.dapl_states)
        return out, tokens_d, tokens_r_moved


def _to_device(batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _aligned_label(batch: Dict[str, Any]) -> torch.Tensor:
    """I_D, the clean moving volume aligned with the reference, (B, 1, S, S, S): the dataset's exact
    ``moving_clean_aligned`` when present, else ``warp(moving_clean, field)``."""
    if "moving_clean_aligned" in batch:
        return batch["moving_clean_aligned"]
    return warp(batch["moving_clean"], batch["field"])


def _atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, True, path.suffix, lambda tmp: torch.save(obj, tmp))


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, True, path.suffix, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _rng_state(loss_generator: torch.Generator) -> Dict[str, Any]:
    """All RNG states as tensors/plain data (loadable with ``torch.load(weights_only=True)``)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss_next": py_state[2]},
        "loss_generator": loss_generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any], loss_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    loss_generator.set_state(state["loss_generator"])
    if "cuda" in state and torch.cuda.is_available():  # (a run may resume on a machine with fewer GPUs)
        for index, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _CsvLog:
    """Append-only CSV + JSON-lines log with a fixed header; resuming truncates rows past a step."""

    def __init__(self, path: Path, columns: Sequence[str], jsonl: Path, kind: str) -> None:
        self.path, self.columns, self.jsonl, self.kind = path, tuple(columns), jsonl, kind

    def start(self, keep_until_step: Optional[int]) -> None:
        """Create a fresh file (``keep_until_step=None``) or keep only rows with ``step <= keep_until_step``."""
        rows: List[Dict[str, str]] = []
        if keep_until_step is not None and self.path.is_file():
            with open(self.path, newline="", encoding="utf-8") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step") and int(r["step"]) <= keep_until_step]
        with open(self.path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def append(self, record: Dict[str, Any]) -> None:
        row = {c: ("" if record.get(c) is None else record.get(c)) for c in self.columns}
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore").writerow(row)
        with open(self.jsonl, "a", encoding="utf-8") as f:
            f.write(json.dumps({"kind": self.kind, **record}, default=float) + "\n")


def _truncate_jsonl(path: Path, keep_until_step: Optional[int]) -> None:
    if keep_until_step is None or not path.is_file():
        path.write_text("", encoding="utf-8")
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and int(json.loads(line).get("step", 0)) <= keep_until_step]
    _atomic_write_text(path, "".join(line + "\n" for line in kept))


# ---------------------------------------------------------------------------------------------- trainer
@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` did.

    Attributes:
        out_dir: the run folder.
        step: optimisation steps completed (counting steps of earlier runs that were resumed).
        finished: True when ``step == config.steps`` (False when stopped early with ``stop_at``).
        best_step, best_val_loss: step and value of the lowest validation loss so far.
        best_checkpoint, final_checkpoint: exported :mod:`unifuse.weights` checkpoints (final only when finished).
        wall_time_s: training wall time, summed over resumed runs (seconds).
    """

    out_dir: Path
    step: int
    finished: bool
    best_step: Optional[int]
    best_val_loss: Optional[float]
    best_checkpoint: Optional[Path]
    final_checkpoint: Optional[Path]
    wall_time_s: float
    history: Dict[str, List[Dict[str, Any]]] = field(default_factory=dict)


class Trainer:
    """Trains UniFuse on synthetic pairs or a dataset folder according to a :class:`TrainConfig`.

    Args:
        config: the training config (``batch_size`` is the global batch over all processes).
        out_dir: run folder (created). Without ``resume`` it must not hold a previous run's state.
        device: ``auto`` | ``cpu`` | ``cuda`` (``cuda:N``); ignored when ``dist`` is given (its device is used).
        resume: continue the run saved in ``out_dir/train_state.pt`` (written by any number of processes).
        log_stream: where progress lines go (default ``"stderr"``: ``sys.stderr`` at call time); None silences
            them. Only rank 0 prints.
        dist: this process's place in a data-parallel run (:func:`unifuse.train.distributed.init_distributed`);
            None = one process.
    """

    def __init__(
        self,
        config: TrainConfig,
        out_dir: Union[str, os.PathLike],
        device: str = "auto",
        resume: bool = False,
        log_stream: Union[TextIO, str, None] = "stderr",
        dist: Optional[DistContext] = None,
    ) -> None:
        from ..model import build_model

        self.config = config
        self.out_dir = Path(out_dir)
        self.dist = dist if dist is not None else single_process(device)
        self.device = self.dist.device
        self.is_main = self.dist.is_main
        self.batch_offset, self.local_batch = rank_slice(config.batch_size, self.dist)
        if isinstance(log_stream, str):  # the default: sys.stderr at call time (pytest swaps it per test)
            log_stream = sys.stderr
        self.log_stream = log_stream if self.is_main else None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        state_path = self.out_dir / STATE_FILE
        if not resume and state_path.exists():
            raise UniFuseError(
                f"{self.out_dir} already holds a training run ({STATE_FILE}); pass --resume to continue it or "
                f"choose another --out folder"
            )
        if resume and not state_path.is_file():
            raise UniFuseError(f"cannot resume: {state_path} does not exist; start the run without --resume")
        if self.device.type == "cpu" and config.num_threads:
            torch.set_num_threads(int(config.num_threads))

        self.model_config = config.model_config()
        _seed_everything(config.seed)
        self.model = build_model(self.model_config)
        self.init_info: Optional[Dict[str, Any]] = None
        if config.init_from:
            self._load_initial_weights(Path(config.init_from))
        elif config.init == "he_conv":
            he_conv_init(self.model)
        self.model.to(self.device)
        if self.dist.rank > 0:  # rank 0 keeps the one-process stream; the other ranks get their own
            _seed_everything(rank_seed(config.seed, self.dist.rank))
        self.loss_fn = UniFuseLoss(LossWeights(**config.loss_weights))
        self.optimizer = torch.optim.AdamW(
            parameter_groups(self.model, config.lr, config.lr_multipliers),
            lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: cosine_lr_factor(s, self.config.steps, self.config.warmup_steps, self.config.lr, self.config.lr_min),
        )
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.loss_generator = torch.Generator().manual_seed(config.seed + 17)

        self.step = 0
        self.best_val_loss: Optional[float] = None
        self.best_step: Optional[int] = None
        self.elapsed_before = 0.0
        self.history: Dict[str, List[Dict[str, Any]]] = {"train": [], "val": []}

        self.train_base = build_train_set(config)
        self.val_set = build_val_set(config)
        self.data_fingerprint = data_fingerprint(config, self.train_base, self.val_set)
        self._check_ranks_agree()

        jsonl = self.out_dir / "log.jsonl"
        self.train_log = _CsvLog(self.out_dir / "train_log.csv", TRAIN_COLUMNS, jsonl, "train")
        self.val_log = _CsvLog(self.out_dir / "val_log.csv", VAL_COLUMNS, jsonl, "val")
        if resume:
            self._load_state(state_path)
            if self.dist.rank > 0:  # the saved RNG states are rank 0's
                _seed_everything(rank_seed(config.seed, self.dist.rank) + self.step)
        if self.is_main:  # only rank 0 writes files
            keep = self.step if resume else None
            self.train_log.start(keep)
            self.val_log.start(keep)
            _truncate_jsonl(jsonl, keep)
            _atomic_write_text(self.out_dir / "train_config.json", json.dumps(config.to_dict(), indent=2) + "\n")

        self.train_set: Dataset = self.train_base
        if config.cache_train and config.num_workers == 0:
            self.train_set = CachedDataset(self.train_base)
        if not resume and self.is_main:  # DDP copies rank 0's calibrated buffers to the other ranks
            self._calibrate_degradation_statistics()  # after caching: the cases it reads are then kept
        self.val_batches = self._build_val_batches() if self.is_main else []
        self.forward_module = self._wrap_for_training()

    # ------------------------------------------------------------------------------------------ setup
    def _check_ranks_agree(self) -> None:
        """Every rank must train on the same data and config (a node with another dataset copy would
        silently train on different samples)."""
        if self.dist.world_size == 1:
            return
        config = {k: v for k, v in self.config.to_dict().items() if k not in RESUME_FREE_FIELDS}
        mine = (self.data_fingerprint, json.dumps(config, sort_keys=True, default=str))
        views = all_gather_objects(mine, self.dist)
        data_ranks = [r for r, v in enumerate(views) if v[0] != views[0][0]]
        config_ranks = [r for r, v in enumerate(views) if v[1] != views[0][1]]
        if data_ranks:
            raise DistributedError(
                f"ranks {data_ranks} see other dataset cases than rank 0 under --data; give every machine the same "
                f"dataset (same case folders) or a shared file system"
            )
        if config_ranks:
            raise DistributedError(f"ranks {config_ranks} run another training config than rank 0; pass the same "
                                   f"--config and options on every machine")

    def _wrap_for_training(self) -> torch.nn.Module:
        """The training forward module: ``DistributedDataParallel`` in a process group, else plain."""
        module = _TrainingForward(self.model)
        if not self.dist.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index or 0] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, output_device=ids[0] if ids else None)

    def _load_initial_weights(self, path: Path) -> None:
        """Start from a trained checkpoint (fine-tuning).

        Its network config must equal this run's, except that a network without ``degradation_stats`` or
        ``restoration_head`` may start a run with them (every trained weight is loaded and the new branch starts
        as built; the statistics branch's last layer is zero, so the classifier is unchanged until it trains),
        and ``fa_cell_centred`` may differ (no parameters; the fine-tuning adapts to the fixed upsampling).
        """
        from ..weights import load_checkpoint

        ckpt = load_checkpoint(path)
        # options a run may add to a checkpoint's network: new parameters start as built
        growable = {"degradation_stats": DEGRADATION_STATS_PREFIX, "restoration_head": "ufrf.restore_out."}
        grown = [name for name in growable if getattr(self.model_config, name) and not getattr(ckpt.config, name)]
        # the FA head's upsampling convention has no parameters: fine-tuning adapts the weights to the fix
        source = ckpt.config.replace(**{name: True for name in grown}, fa_cell_centred=self.model_config.fa_cell_centred)
        if source != self.model_config:
            raise UniFuseError(
                f"init_from {path} holds a {ckpt.config.name!r} network ({ckpt.config.to_dict()}) but this run trains "
                f"{self.model_config.to_dict()}; fine-tune with the same network config"
            )
        result = self.model.load_state_dict(ckpt.state_dict, strict=not grown)
        if grown:
            prefixes = tuple(growable[name] for name in grown)
            new = [k for k in result.missing_keys if not k.startswith(prefixes)]
            if new or result.unexpected_keys:
                raise UniFuseError(
                    f"init_from {path} does not fit this network: missing {new}, unexpected {result.unexpected_keys}"
                )
            self._say(f"init_from {path.name}: added {', '.join(grown)} ({', '.join(p + '*' for p in prefixes)})")
        self.init_info = describe_source_checkpoint(ckpt)

    def _calibrate_degradation_statistics(self) -> None:
        """Standardise the degradation-statistics branch on the first training cases (if it is not already)."""
        stats = getattr(self.model.dapl, "stats", None)
        if stats is None or bool(stats.calibrated):
            return
        count = min(CALIBRATION_CASES, len(self.train_set))
        used = stats.calibrate(self.train_set[i]["moving"][None].to(self.device) for i in range(count))
        self._say(f"calibrated the degradation statistics on the first {used} training cases")

    def _amp_dtype(self) -> Optional[torch.dtype]:
        if self.device.type != "cuda" or self.config.amp == "off":
            return None
        if self.config.amp == "bf16" or (self.config.amp == "auto" and torch.cuda.is_bf16_supported()):
            return torch.bfloat16
        return torch.float16

    def _build_val_batches(self) -> List[Dict[str, Any]]:
        cfg = self.config
        loader = DataLoader(self.val_set, batch_size=cfg.batch_size, shuffle=False, num_workers=0)
        return list(loader)

    def _train_loader(self) -> Iterator[Dict[str, Any]]:
        cfg = self.config
        sampler = EpochPermutationSampler(len(self.train_set), cfg.seed, start=self.step * cfg.batch_size,
                                          batch_size=cfg.batch_size, rank=self.dist.rank,
                                          world_size=self.dist.world_size)
        loader = DataLoader(
            self.train_set,
            batch_size=self.local_batch,
            sampler=sampler,
            num_workers=cfg.num_workers,
            drop_last=True,
            pin_memory=self.device.type == "cuda",
            persistent_workers=cfg.num_workers > 0,
        )
        return iter(loader)

    def _autocast(self) -> ContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _say(self, message: str) -> None:
        if self.log_stream is not None:
            print(message, file=self.log_stream, flush=True)

    # ------------------------------------------------------------------------------------- the losses
    def compute_loss(self, batch: Dict[str, Any], generator: torch.Generator, teacher_forcing: bool = False,
                     forward: Optional[torch.nn.Module] = None, batch_slice: Optional[tuple] = None):
        """Forward pass and total loss of one batch; returns ``(total, components, output)``.

        ``teacher_forcing`` conditions the prompts and ALSN on the true degradation class instead of the
        classifier's p (``TrainConfig.true_degradation_in_training``), softened for a fraction of the samples
        (``TrainConfig.soft_degradation_fraction``, :func:`soft_class_weights`). The network runs under autocast
        (CUDA only); the losses are evaluated in float32. ``forward``: the training forward module (the
        DDP-wrapped one in a training step; default: the bare network). ``batch_slice``: ``(offset, global
        batch)`` of this rank's items (L_moda's negatives; see :func:`unifuse.train.losses.loss_moda`).
        """
        reference = batch["reference"]
        moving = batch["moving"]
        moving_clean = batch["moving_clean"]
        reference_moved = batch["reference_moved"]
        u_gt = batch["field"]
        aligned_clean_gt = _aligned_label(batch)  # I_D: the clean moving volume aligned with R
        forward = forward if forward is not None else _TrainingForward(self.model)
        forced = None
        if teacher_forcing:
            forced = batch["degradation"]
            if self.config.soft_degradation_fraction > 0:  # no draw otherwise: older runs replay unchanged
                forced = soft_class_weights(forced, self.model_config.num_degradations,
                                            self.config.soft_degradation_fraction, generator, batch_slice)
        with self._autocast():
            out, tokens_d, tokens_r_moved = forward(reference, moving, forced, aligned_clean_gt, reference_moved)
        displacement = out.displacement.float()
        total, parts = self.loss_fn(
            logits=out.logits.float(),
            degradation_target=batch["degradation"],
            token_pairs=[
                (tokens_d.float(), out.tokens_ref.float()),        # L_cont(F̄_D, F̄_R): reference space
                (out.tokens_mov.float(), tokens_r_moved.float()),  # L_cont(F̄'_D, F̄'_R): moving space
            ],
            displacement=displacement,
            displacement_gt=u_gt,
            fused=out.fused.float(),
            aligned_fine=warp(moving_clean, displacement),
            reference=reference,
            restored=None if out.restored is None else out.restored.float(),
            restored_target=aligned_clean_gt,
            generator=generator,
            batch_slice=batch_slice,
        )
        return total, parts, out

    def train_step(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        """One AdamW step on ``batch`` (this rank's part of the global batch); returns the log record (lr,
        loss components of the global batch, gradient norm)."""
        self.forward_module.train()
        batch = _to_device(batch, self.device)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.zero_grad(set_to_none=True)
        total, parts, _ = self.compute_loss(batch, self.loss_generator, self.config.true_degradation_in_training,
                                            forward=self.forward_module,
                                            batch_slice=(self.batch_offset, self.config.batch_size))
        parts = all_reduce_mean(parts, self.dist)  # every rank sees the global batch's losses and stops together
        if not math.isfinite(parts["total"]):
            raise UniFuseError(
                f"the training loss became {parts['total']} at step {self.step + 1} (components {parts}); lower the "
                f"learning rate in the training config or resume from the last checkpoint"
            )
        self.scaler.scale(total).backward()
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        record: Dict[str, Any] = {"step": self.step, "lr": lr, "grad_norm": float(grad_norm)}
        record.update({f"loss_{k}": parts.get(k) for k in LOSS_COMPONENTS})
        return record

    @torch.no_grad()
    def validate(self) -> Dict[str, Any]:
        """Loss components and quick metrics on the fixed held-out set (seeded; leaves training RNG alone).

        Returns a record with ``val_loss_<component>`` (batch-size weighted means) and ``val_<metric>`` for
        the metrics of :data:`VAL_METRICS`.
        """
        self.model.eval()
        sums: Dict[str, float] = {}
        n_total = 0
        generator = torch.Generator().manual_seed(self.config.val_seed)
        cuda_devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda_devices):
            for batch in self.val_batches:
                batch = _to_device(batch, self.device)
                n = int(batch["reference"].shape[0])
                _, parts, out = self.compute_loss(batch, generator)
                u = out.displacement.float()
                u_gt = batch["field"]
                label = _aligned_label(batch)
                fused = out.fused.float()
                metrics = {
                    "epe_vox": torch.linalg.vector_norm(u - u_gt, dim=1).mean().item(),
                    "epe_vox_identity": torch.linalg.vector_norm(u_gt, dim=1).mean().item(),
                    "folding_percent": 100.0 * (jacobian_determinant(u) <= 0).float().mean().item(),
                    "degradation_accuracy": (out.probs.argmax(dim=1) == batch["degradation"]).float().mean().item(),
                    "fused_ssim_sum": (ssim3d_torch(fused, batch["reference"]) + ssim3d_torch(fused, label)).mean().item(),
                }
                for k, v in parts.items():
                    sums[f"val_loss_{k}"] = sums.get(f"val_loss_{k}", 0.0) + v * n
                for k, v in metrics.items():
                    sums[f"val_{k}"] = sums.get(f"val_{k}", 0.0) + v * n
                n_total += n
        return {"step": self.step, **{k: v / n_total for k, v in sums.items()}}

    # --------------------------------------------------------------------------------- checkpoints
    def _state_dict(self, elapsed: float) -> Dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "format_version": STATE_VERSION,
            "train_config": self.config.to_dict(),
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": _rng_state(self.loss_generator),
            "best_val_loss": self.best_val_loss,
            "best_step": self.best_step,
            "elapsed_s": elapsed,
            "data_fingerprint": self.data_fingerprint,
            "world_size": self.dist.world_size,
        }

    def save_state(self, elapsed: float) -> Path:
        """Write the resumable training state atomically to ``out_dir/train_state.pt``."""
        path = self.out_dir / STATE_FILE
        _atomic_torch_save(self._state_dict(elapsed), path)
        return path

    def _load_state(self, path: Path) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means the state is unusable
            raise UniFuseError(f"cannot read the training state {path} ({exc.__class__.__name__}: {exc}); start a new run") from exc
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise UniFuseError(f"{path} is not a UniFuse training state")
        saved = dict(state["train_config"])
        current = self.config.to_dict()
        differing = sorted(k for k in set(saved) | set(current)
                           if k not in RESUME_FREE_FIELDS and saved.get(k) != current.get(k))
        if differing:
            raise UniFuseError(
                f"cannot resume {path}: the training config differs in {differing} (saved vs now: "
                + ", ".join(f"{k}={saved.get(k)!r}/{current.get(k)!r}" for k in differing)
                + "); resume with the same config or start a new run in another folder"
            )
        saved_data = state.get("data_fingerprint", "synthetic")
        if saved_data != self.data_fingerprint:
            raise UniFuseError(
                f"cannot resume {path}: the run trained on other dataset cases (fingerprint {saved_data}) than "
                f"{self.config.data_root or 'synthetic pairs'} holds now ({self.data_fingerprint}); resume with the "
                f"same dataset or start a new run in another folder"
            )
        if saved.get("steps") != current.get("steps"):
            self._say(f"note: total steps changed from {saved.get('steps')} to {current.get('steps')}; "
                      f"the cosine schedule is recomputed for the new length")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"], self.loss_generator)
        self.step = int(state["step"])
        self.best_val_loss = state["best_val_loss"]
        self.best_step = state["best_step"]
        self.elapsed_before = float(state["elapsed_s"])
        if self.step > self.config.steps:
            raise UniFuseError(f"the saved run is at step {self.step}, beyond --steps {self.config.steps}; pass a larger --steps")

    def export(self, name: str, extra: Optional[Dict[str, Any]] = None, elapsed: float = 0.0) -> Path:
        """Export the current network as a :mod:`unifuse.weights` checkpoint ``out_dir/<name>`` (+ .sha256)."""
        cfg = self.config
        metadata = {
            "trained": True,
            "step": self.step,
            "train_config": cfg.to_dict(),
            "training_data": describe_training_data(cfg, self.train_base, self.val_set),
            "compute": {
                "device": str(self.device),
                "cpu": cpu_model(),
                "cpu_threads": torch.get_num_threads(),
                "cuda_device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None,
                "amp": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "off",
                "wall_time_s": round(elapsed, 1),
                "torch": str(torch.__version__),
                "distributed": self.dist.describe(),
            },
            "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            **(extra or {}),
        }
        if self.init_info is not None:
            metadata["initialised_from"] = self.init_info
        path = self.out_dir / name
        save_checkpoint(path, self.model_config, self.model.state_dict(), metadata)
        return path

    # ------------------------------------------------------------------------------------- the loop
    def fit(self, stop_at: Optional[int] = None) -> TrainResult:
        """Train until ``config.steps`` (or until step ``stop_at``, to split a run into resumable parts).

        Validation runs every ``val_every`` steps and at the last step; the resumable state is saved every
        ``checkpoint_every`` steps and at the end of this call; ``best.pt`` is re-exported whenever the
        validation loss improves, ``final.pt`` when the run is finished. In a data-parallel run every rank
        calls this; rank 0 alone validates and writes (the others wait for it at the next collective).
        """
        cfg = self.config
        main = self.is_main
        end = cfg.steps if stop_at is None else min(int(stop_at), cfg.steps)
        t0 = time.perf_counter()
        elapsed = lambda: self.elapsed_before + (time.perf_counter() - t0)  # noqa: E731
        world = self.dist.world_size
        self._say(
            f"unifuse train: config {cfg.name!r}, network {self.model_config.name!r} "
            f"({sum(p.numel() for p in self.model.parameters()):,} parameters) on {cfg.grid}³, batch {cfg.batch_size}"
            f"{f' ({world} processes × {self.local_batch}, {self.dist.backend})' if world > 1 else ''}, "
            f"device {self.device}{' (' + str(self.amp_dtype).replace('torch.', '') + ' autocast)' if self.amp_dtype else ''}, "
            f"data {self._data_line()}, steps {self.step} -> {end} of {cfg.steps}, output {self.out_dir}"
        )
        if self.step == 0 and end > 0 and main:
            self._validate_and_export(elapsed(), export=False)  # the untrained network, for reference
        batches = self._train_loader() if self.step < end else iter(())
        saved_at = self.step
        while self.step < end:
            t_step = time.perf_counter()
            record = self.train_step(next(batches))
            record["epoch"] = (self.step * cfg.batch_size - 1) // len(self.train_set)
            record["step_time_s"] = round(time.perf_counter() - t_step, 4)
            record["elapsed_s"] = round(elapsed(), 2)
            self.history["train"].append(record)
            if not main:
                continue
            self.train_log.append(record)
            if self.step % cfg.log_every == 0 or self.step == end:
                self._progress(record, end)
            if self.step % cfg.val_every == 0 or self.step == cfg.steps:
                self._validate_and_export(elapsed())
            if self.step % cfg.checkpoint_every == 0 or self.step == end:
                self.save_state(elapsed())
                saved_at = self.step
        finished = self.step >= cfg.steps
        if not main:
            barrier(self.dist)  # return once rank 0 has written the state, the checkpoints and the summary
            return self._result(finished, None, round(elapsed(), 1))
        if saved_at != self.step:
            self.save_state(elapsed())
        final = None
        if finished:
            final = self.export("final.pt", {"checkpoint": "final"}, elapsed())
        summary = {
            "config": cfg.name,
            "step": self.step,
            "steps": cfg.steps,
            "finished": finished,
            "best_step": self.best_step,
            "best_val_loss": self.best_val_loss,
            "wall_time_s": round(elapsed(), 1),
            "device": str(self.device),
            "cpu": cpu_model(),
            "cpu_threads": torch.get_num_threads(),
            "distributed": self.dist.describe(),
        }
        _atomic_write_text(self.out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        barrier(self.dist)
        return self._result(finished, final, summary["wall_time_s"])

    def _result(self, finished: bool, final: Optional[Path], wall_time_s: float) -> TrainResult:
        best = self.out_dir / "best.pt"
        return TrainResult(
            out_dir=self.out_dir,
            step=self.step,
            finished=finished,
            best_step=self.best_step,
            best_val_loss=self.best_val_loss,
            best_checkpoint=best if best.is_file() else None,
            final_checkpoint=final if final is not None else (self.out_dir / "final.pt" if finished else None),
            wall_time_s=wall_time_s,
            history=self.history,
        )

    def _data_line(self) -> str:
        """What the run trains on, for the start-up line."""
        cfg = self.config
        if not cfg.uses_dataset:
            return f"synthetic ({cfg.train_samples} training cases)"
        n_train, n_val = len(getattr(self.train_base, "cases", [])), len(getattr(self.val_set, "cases", []))
        mix = f", {cfg.mix_synthetic:.0%} synthetic" if cfg.mix_synthetic else ""
        return (f"{cfg.data_layout} '{cfg.data_root}' ({n_train} training / {n_val} validation cases, "
                f"{cfg.train_samples} samples{mix})")

    def _validate_and_export(self, elapsed: float, export: bool = True) -> None:
        """Validate, log, and (``export``) re-export ``best.pt`` when the validation loss improved."""
        t = time.perf_counter()
        record = self.validate()
        record["elapsed_s"] = round(elapsed, 2)
        self.val_log.append(record)
        self.history["val"].append(record)
        loss = record["val_loss_total"]
        improved = export and (self.best_val_loss is None or loss < self.best_val_loss)
        if improved:
            self.best_val_loss, self.best_step = loss, self.step
            metrics = {k: v for k, v in record.items() if k.startswith("val_")}
            self.export("best.pt", {"checkpoint": "best", "best_by": "val_loss_total", "validation": metrics}, elapsed)
        self._say(
            f"  validation @ {self.step}: loss {loss:.4f}{' (best)' if improved else ''}, "
            f"EPE {record['val_epe_vox']:.3f} vox (identity {record['val_epe_vox_identity']:.3f}), "
            f"folding {record['val_folding_percent']:.3f} %, degradation acc {record['val_degradation_accuracy']:.2f}, "
            f"SSIM(F,R)+SSIM(F,A) {record['val_fused_ssim_sum']:.3f} [{time.perf_counter() - t:.1f} s]"
        )

    def _progress(self, record: Dict[str, Any], end: int) -> None:
        recent = self.history["train"][-self.config.log_every:]
        sec = sum(r["step_time_s"] for r in recent) / max(len(recent), 1)
        eta = sec * (end - self.step)
        parts = " ".join(f"{k} {record[f'loss_{k}']:.4f}" for k in LOSS_COMPONENTS[1:6] if record.get(f"loss_{k}") is not None)
        self._say(
            f"step {self.step}/{end} loss {record['loss_total']:.4f} ({parts}) lr {record['lr']:.2e} "
            f"|g| {record['grad_norm']:.2f} {sec:.2f} s/step ETA {eta / 60:.1f} min"
        )
