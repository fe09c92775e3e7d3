"""The ``unifuse`` command line.

``unifuse fuse``   align, restore and fuse two volumes (any format SimpleITK reads, or DICOM folders)
``unifuse demo``   build the synthetic sample pair with known truth, fuse it, print metrics, write PNGs
``unifuse info``   parameter counts per module and FLOPs of the network configs
``unifuse train``  train on synthetic pairs (resumable); ``unifuse evaluate`` held-out metrics + model card
``unifuse bench``  UniFuse against multi-stage baselines (metrics, time, memory); ``--speed`` cost vs grid size

Exit codes: 0 success; 1 a user-facing error (one line on stderr: what is wrong and how to fix it);
2 bad command-line usage; 130 cancelled (Ctrl-C) — in every failure case no partial outputs are left.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from . import __version__
from .config import CONFIGS, DEGRADATION_CLASSES

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CANCELLED = 0, 1, 2, 130


def _progress_printer(machine: bool, quiet: bool) -> Callable[[float, str], None]:
    """Progress on stderr: a tqdm bar for people, ``PROGRESS <fraction> <message>`` lines for programs."""
    if machine:
        def machine_progress(fraction: float, message: str) -> None:
            print(f"PROGRESS {fraction:.3f} {message}", file=sys.stderr, flush=True)

        return machine_progress
    if quiet:
        return lambda fraction, message: None
    from tqdm import tqdm

    bar = tqdm(total=100, file=sys.stderr, bar_format="{l_bar}{bar}| {elapsed}", leave=True)

    def human_progress(fraction: float, message: str) -> None:
        bar.set_description_str(message[:40].ljust(40))
        bar.update(max(0, round(fraction * 100) - bar.n))
        if fraction >= 1.0:
            bar.close()

    return human_progress


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--degradation", default="auto", choices=["auto", *DEGRADATION_CLASSES],
                   help="degradation of the moving volume (default: auto-detect)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="compute device (default: auto)")
    p.add_argument("--weights", type=Path, default=None, help="UniFuse checkpoint (default: the shipped weights)")
    p.add_argument("--working-size", type=int, default=None,
                   help="edge of the isotropic working grid in voxels (default: the size the weights were trained at)")
    p.add_argument("--config", choices=sorted(CONFIGS), default=None,
                   help="network config for an untrained network (only without trained weights)")
    p.add_argument("--init", choices=["geometry", "moments"], default="geometry",
                   help="pre-alignment before the network: header geometry, or + centre-of-mass (default: geometry)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--machine-progress", action="store_true", help="print 'PROGRESS <fraction> <message>' lines on stderr")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unifuse",
        description="UniFuse 3D: align, restore and fuse a degraded, misaligned volume onto a reference volume.",
    )
    parser.add_argument("--version", action="version", version=f"unifuse {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fuse", help="fuse a moving volume onto a reference volume")
    p.add_argument("--reference", required=True, type=Path, help="reference volume (file or DICOM folder)")
    p.add_argument("--moving", required=True, type=Path, help="moving volume (file or DICOM folder)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    _add_run_options(p)

    p = sub.add_parser("demo", help="run the pipeline on the synthetic sample pair and print metrics against the truth")
    p.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder (default: demo_output)")
    p.add_argument("--task", default="t1-t2-motion", help="sample task (default: t1-t2-motion)")
    p.add_argument("--size", type=int, default=None, help="edge of the synthetic volumes in voxels")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic case")
    _add_run_options(p)

    p = sub.add_parser("info", help="parameter counts per module and FLOPs at 160³ and 256³")
    p.add_argument("--config", choices=sorted(CONFIGS), default=None, help="only this config (default: all)")
    p.add_argument("--weights", type=Path, default=None, help="describe this checkpoint's config")

    from .bench import add_bench_parser
    from .train.cli_train import add_train_parser

    add_train_parser(sub)
    add_bench_parser(sub)
    return parser


def _run_fuse(args: argparse.Namespace) -> int:
    from .pipeline import OUTPUT_FILES, REPORT_FILE, fuse
    from .errors import OutputExistsError

    if not args.overwrite:
        existing = [str(args.out / f) for f in [*OUTPUT_FILES.values(), REPORT_FILE] if (args.out / f).exists()]
        if existing:  # refuse before spending minutes on the network
            raise OutputExistsError(f"output file(s) already exist: {', '.join(existing)}; choose another --out or pass --overwrite")
    result = fuse(
        args.reference, args.moving, degradation=args.degradation, device=args.device, weights=args.weights,
        progress=_progress_printer(args.machine_progress, args.quiet), working_size=args.working_size,
        config=args.config, init=args.init,
    )
    result.save(args.out, overwrite=args.overwrite)
    _print_summary(result.report, args.out)
    return EXIT_OK


def _print_summary(report: dict, out: Path) -> None:
    deg = report["degradation"]
    probs = ", ".join(f"{k} {v:.2f}" for k, v in deg["probabilities"].items())
    print(f"model      {report['model']['id']} ({'trained' if report['model']['trained'] else 'UNTRAINED'})")
    print(f"device     {report['device']}")
    print(f"degradation used: {deg['used']} (classifier: {probs})")
    print(f"folding    {report['folding_percent']['reference_grid']:.3f} % of voxels")
    print(f"error map  mean {report['error_map_mean']['before']:.4f} before -> {report['error_map_mean']['after']:.4f} after")
    print(f"time       {report['timings_s']['total']:.2f} s " + json.dumps(report["timings_s"]))
    print(f"outputs    {out}")
    for note in report.get("notes", []):
        print(f"note       {note}")
    if "warning" in report:
        print(f"WARNING    {report['warning']}")


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(
        out_dir=args.out, task=args.task, size=args.size, seed=args.seed, degradation=args.degradation,
        device=args.device, weights=args.weights, working_size=args.working_size, config=args.config,
        init=args.init, overwrite=args.overwrite,
        progress=_progress_printer(args.machine_progress, args.quiet),
    )
    return EXIT_OK


def _run_info(args: argparse.Namespace) -> int:
    from .config import get_config
    from .model.complexity import format_info

    if args.weights is not None:
        from .weights import load_checkpoint

        ckpt = load_checkpoint(args.weights)
        print(f"checkpoint {args.weights} ({ckpt.model_id})")
        print(json.dumps(ckpt.metadata, indent=2, default=str))
        configs = [ckpt.config]
    else:
        configs = [get_config(args.config)] if args.config else [get_config(n) for n in CONFIGS]
    for cfg in configs:
        print(format_info(cfg))
        print()
    return EXIT_OK


def _sigterm_as_ctrl_c(signum: int, frame: object) -> None:
    """SIGTERM (``kill``, a job scheduler, a GUI's Cancel) takes the Ctrl-C path: no outputs, exit 130."""
    raise KeyboardInterrupt


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``unifuse`` console script; returns the process exit code."""
    if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
        previous = signal.signal(signal.SIGTERM, _sigterm_as_ctrl_c)
        try:
            return _main(argv)
        finally:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    return _main(argv)


def _main(argv: Optional[Sequence[str]] = None) -> int:
    from .errors import CancelledError, UniFuseError

    parser = build_parser()
    args = parser.parse_args(argv)
    from .bench import run_bench
    from .train.cli_train import run_evaluate, run_train

    handlers = {"fuse": _run_fuse, "demo": _run_demo, "info": _run_info, "train": run_train,
                "evaluate": run_evaluate, "bench": run_bench}
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        print("unifuse: cancelled (Ctrl-C); no outputs were written", file=sys.stderr)
        return EXIT_CANCELLED
    except CancelledError as exc:
        print(f"unifuse: {exc}", file=sys.stderr)
        return EXIT_CANCELLED
    except UniFuseError as exc:
        print(f"unifuse: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover - `python -m unifuse.cli`
    sys.exit(main())
