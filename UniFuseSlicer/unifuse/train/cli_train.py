"""``unifuse train`` and ``unifuse evaluate``: the command-line front end of the trainer and the evaluation.

Hook into :mod:`unifuse.cli` with::

    add_train_parser(sub)                      # adds both sub-commands
    handlers = {..., "train": run_train, "evaluate": run_evaluate}

``unifuse train --config CONFIG --out DIR [--resume] [--steps N] [--stop-at K] [--batch-size B] [--device auto|cpu|cuda]
[--threads T] [--init-from W] [--data DIR --layout brats2020|synthrad2023|fdg-petct [--mix-synthetic F]]``
    CONFIG is a named training config (``tiny``, ``cpu``, ``cpu_finetune``, ``cpu_stats``, ``gpu``; :mod:`unifuse.train.configs`) or a JSON file
    of TrainConfig fields. Progress goes to stderr, logs and checkpoints to DIR (see :mod:`unifuse.train.trainer`).
    ``--data``/``--layout`` train on a dataset folder instead of synthetic pairs (:mod:`unifuse.train.datasets`).
    Under ``torchrun`` (``torchrun --nproc_per_node N -m unifuse.train ...``, the same arguments) every process
    joins one data-parallel run (:mod:`unifuse.train.distributed`); ``--batch-size`` is the global batch.

``unifuse evaluate --weights W [--out DIR] [--cases N] [--seed S] [--device ...] [--model-card] [--publish]``
    Held-out evaluation of a checkpoint against the no-registration average/max baselines; prints a table,
    writes ``evaluation.json`` to DIR or, with ``--model-card``, ``model_card.json`` (the same report plus the
    card's fields) + ``MODEL_CARD.md``.
    ``--publish`` first re-saves W as ``DIR/unifuse_default.pt`` and evaluates that copy (the shipped file).

Both return the process exit code (0 on success); user errors raise :class:`~unifuse.errors.UniFuseError`,
which :func:`unifuse.cli.main` turns into a one-line message and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..errors import UniFuseError
from ..weights import SHIPPED_WEIGHTS_NAME, load_checkpoint, save_checkpoint
from .configs import DATA_LAYOUTS, TRAIN_CONFIGS, TrainConfig, get_train_config
from .distributed import init_distributed
from .evaluate import HELDOUT_CASES, HELDOUT_SEED, evaluate_checkpoint, format_report, write_model_card
from .trainer import Trainer, describe_source_checkpoint

__all__ = ["add_train_parser", "add_train_arguments", "train_config_from_args", "run_train", "run_evaluate",
           "publish_checkpoint"]


def add_train_parser(subparsers: "argparse._SubParsersAction") -> None:
    """Add the ``train`` and ``evaluate`` sub-commands to an ``argparse`` sub-parser collection."""
    p = subparsers.add_parser("train", help="train UniFuse on synthetic pairs or a dataset folder (resumable; "
                                            "data-parallel under torchrun; logs and checkpoints in --out)")
    add_train_arguments(p)

    p = subparsers.add_parser("evaluate", help="evaluate a checkpoint on the held-out synthetic set against baselines")
    p.add_argument("--weights", required=True, type=Path, help="UniFuse checkpoint (.pt with its .sha256)")
    p.add_argument("--out", type=Path, default=None, help="folder for evaluation.json (or the model card)")
    p.add_argument("--cases", type=int, default=HELDOUT_CASES, help=f"held-out cases (default: {HELDOUT_CASES})")
    p.add_argument("--seed", type=int, default=HELDOUT_SEED, help=f"held-out seed (default: {HELDOUT_SEED})")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="compute device (default: auto)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch")
    p.add_argument("--model-card", action="store_true", help="also write model_card.json and MODEL_CARD.md to --out")
    p.add_argument("--publish", action="store_true",
                   help="re-save the checkpoint as --out/unifuse_default.pt (+ .sha256) and evaluate that copy, so the "
                        "model card describes the exact shipped file (use --out UniFuseSlicer/Resources/Models)")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``unifuse train`` (also those of ``python -m unifuse.train`` under torchrun)."""
    p.add_argument("--config", required=True,
                   help=f"training config: one of {', '.join(TRAIN_CONFIGS)} or a JSON file of TrainConfig fields")
    p.add_argument("--out", required=True, type=Path, help="run folder for logs, training state and checkpoints")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--steps", type=int, default=None, help="total optimisation steps (overrides the config)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="compute device (default: auto; under torchrun a CUDA rank uses GPU LOCAL_RANK)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch (overrides the config)")
    p.add_argument("--init-from", type=Path, default=None,
                   help="start from this trained checkpoint (fine-tuning; same network config, or one without "
                        "the degradation-statistics branch, which is then added)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="global batch per optimisation step, over all processes (overrides the config; under "
                        "torchrun a multiple of the number of processes)")
    p.add_argument("--stop-at", type=int, default=None, metavar="K",
                   help="stop after step K and save the state (resume later with --resume; e.g. to fit a job's "
                        "time limit); the learning-rate schedule still runs over --steps")
    g = p.add_argument_group("training on a dataset folder")
    g.add_argument("--data", type=Path, default=None, metavar="DIR",
                   help="dataset folder to train on instead of synthetic pairs (needs --layout)")
    g.add_argument("--layout", choices=DATA_LAYOUTS, default=None,
                   help="layout of --data: brats2020 (T1 -> T2, motion), synthrad2023 (MR -> CT, metal), "
                        "fdg-petct (CT -> PET, low dose)")
    g.add_argument("--mix-synthetic", type=float, default=None, metavar="F",
                   help="fraction in [0, 1) of the training samples taken from synthetic pairs (default 0)")


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`~unifuse.train.configs.TrainConfig` of parsed ``unifuse train`` arguments (config + overrides)."""
    config = get_train_config(args.config)
    changes = {}
    if args.steps is not None:
        changes["steps"] = int(args.steps)
    if args.threads is not None:
        changes["num_threads"] = int(args.threads)
    if getattr(args, "init_from", None) is not None:
        changes["init_from"] = str(args.init_from)
    if getattr(args, "batch_size", None) is not None:
        changes["batch_size"] = int(args.batch_size)
    if getattr(args, "data", None) is not None or getattr(args, "layout", None) is not None:
        if args.data is None or args.layout is None:
            raise UniFuseError("--data and --layout go together: unifuse train --data DIR --layout "
                               "brats2020|synthrad2023|fdg-petct")
        changes["data_root"] = str(Path(args.data).expanduser().resolve())
        changes["data_layout"] = args.layout
    if getattr(args, "mix_synthetic", None) is not None:
        changes["mix_synthetic"] = float(args.mix_synthetic)
    return config.replace(**changes) if changes else config


def run_train(args: argparse.Namespace) -> int:
    """Run (or resume) a training run from parsed ``unifuse train`` arguments; returns the exit code.

    Under torchrun every process runs this; rank 0 prints the summary."""
    config = train_config_from_args(args)
    if getattr(args, "stop_at", None) is not None and args.stop_at < 1:
        raise UniFuseError(f"--stop-at must be a step >= 1 (got {args.stop_at})")
    dist = init_distributed(args.device)
    try:
        trainer = Trainer(config, args.out, device=args.device, resume=args.resume, dist=dist)
        result = trainer.fit(stop_at=getattr(args, "stop_at", None))
    finally:
        dist.close()
    if dist.is_main:
        print(f"steps      {result.step}/{config.steps}{'' if result.finished else ' (stopped; continue with --resume)'}")
        print(f"best       step {result.best_step}, validation loss {result.best_val_loss}")
        print(f"best.pt    {result.best_checkpoint}")
        print(f"final.pt   {result.final_checkpoint}")
        print(f"wall time  {result.wall_time_s:.1f} s")
    return 0


def publish_checkpoint(source: Path, out_dir: Path) -> Path:
    """Verify ``source`` and re-save it with :func:`unifuse.weights.save_checkpoint` as
    ``out_dir/unifuse_default.pt`` (+ ``.sha256``), recording where it came from, the run's ``summary.json``
    (total steps and wall time) when its folder has one and, for a fine-tuned checkpoint, the provenance of
    the checkpoint it started from; returns the new path."""
    ckpt = load_checkpoint(source)
    if not ckpt.metadata.get("trained"):
        raise UniFuseError(f"{source} is not marked as trained (metadata 'trained'); only trained weights can be published")
    destination = Path(out_dir) / SHIPPED_WEIGHTS_NAME
    metadata = {**ckpt.metadata, "published_from": {"path": str(source), "sha256": ckpt.sha256}}
    summary = Path(source).parent / "summary.json"
    if summary.is_file():  # the whole run (the checkpoint's own metadata describes the run up to its export)
        metadata["run_summary"] = json.loads(summary.read_text(encoding="utf-8"))
    init_from = (ckpt.metadata.get("train_config") or {}).get("init_from")
    if init_from and "initialised_from" not in metadata and Path(init_from).is_file():
        metadata["initialised_from"] = describe_source_checkpoint(load_checkpoint(init_from))
    save_checkpoint(destination, ckpt.config, ckpt.state_dict, metadata)
    return destination


def run_evaluate(args: argparse.Namespace) -> int:
    """Evaluate a checkpoint from parsed ``unifuse evaluate`` arguments; returns the exit code."""
    if args.cases < 1:
        raise UniFuseError(f"--cases must be at least 1 (got {args.cases})")
    if (args.model_card or args.publish) and args.out is None:
        raise UniFuseError("--model-card and --publish need --out (the folder that receives the card / the weights)")
    if args.threads is not None:
        torch.set_num_threads(int(args.threads))

    def progress(i: int, n: int) -> None:
        print(f"evaluating case {i}/{n}", file=sys.stderr, flush=True)

    weights = publish_checkpoint(args.weights, args.out) if args.publish else args.weights
    report = evaluate_checkpoint(weights, cases=args.cases, seed=args.seed, device=args.device, progress=progress)
    print(format_report(report))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        if args.model_card:  # model_card.json holds the whole report
            json_path, md_path = write_model_card(report, args.out)
            print(f"model card {json_path} {md_path}")
        else:
            (args.out / "evaluation.json").write_text(json.dumps(report, indent=2, default=float) + "\n", encoding="utf-8")
    return 0
