"""Command-line glue of ``unifuse bench`` (hooked into :mod:`unifuse.cli` by :func:`add_bench_parser`).

``unifuse bench [--quick] [--out DIR] [--pairs DIR] [--tasks ...] [--cases N] [--size S] [--methods ...]
[--rules ...] [--weights W] [--config C] [--working-size S] [--device D] [--threads N] [--overwrite]``
runs the accuracy benchmark (:mod:`unifuse.bench.runner`) and writes ``bench.md``, ``bench.json`` and PNG
figures (:mod:`unifuse.bench.report`).

``unifuse bench --speed [--sizes 64 96 ...] [--precisions fp32 bf16] [--compile] [--repeats N]`` times the
pipeline alone at growing working grids (:mod:`unifuse.bench.speed`) and writes ``speed.md``/``speed.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..config import CONFIGS

__all__ = ["add_bench_parser", "run_bench"]

SPEED_MD = "speed.md"
SPEED_JSON = "speed.json"


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` sub-command to ``unifuse``'s sub-parsers; returns the new parser."""
    from .baselines import REGISTRATION_METHODS
    from .cases import BENCH_TASKS
    from .runner import FUSION_RULES, METHODS
    from .speed import DEFAULT_SIZES

    p = subparsers.add_parser(
        "bench",
        help="benchmark UniFuse against registration + fusion baselines (or, with --speed, time the pipeline)",
        description="Accuracy benchmark on the held-out synthetic tasks and/or a folder of user pairs, or (--speed) "
                    "pipeline timings per stage at growing working grids. See docs/benchmark.md.",
    )
    p.add_argument("--out", type=Path, default=Path("bench_output"), help="output folder (default: bench_output)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 32³ inputs, one case per task, cheap baseline settings (well under a minute)")
    p.add_argument("--pairs", type=Path, default=None,
                   help="folder of user pairs: <case>/reference.*, <case>/moving.*, optional truth_displacement.*, "
                        "truth_moving_aligned_clean.*, reference_labels.* (or labels.*), moving_labels.*; "
                        "without --tasks only these pairs are run")
    p.add_argument("--tasks", nargs="+", choices=BENCH_TASKS, default=None,
                   help="synthetic tasks (default: all three, or none when --pairs is given)")
    p.add_argument("--cases", type=int, default=None, help="synthetic cases per task (default 2; 1 with --quick)")
    p.add_argument("--size", type=int, default=None, help="edge of the synthetic volumes in voxels (default 64; 32 with --quick)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                   help=f"methods to run (default: all: {' '.join(METHODS)}; registrations are fused by every --rules)")
    p.add_argument("--rules", nargs="+", choices=FUSION_RULES, default=list(FUSION_RULES),
                   help="fusion rules applied after each registration baseline (default: all)")
    p.add_argument("--weights", type=Path, default=None, help="UniFuse checkpoint (default: the shipped weights)")
    p.add_argument("--config", choices=sorted(CONFIGS), default=None,
                   help="config of an UNTRAINED network (ignores the shipped weights; for tests and timing)")
    p.add_argument("--working-size", type=int, default=None, help="UniFuse working grid edge (default: the weights')")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="UniFuse device (default: auto)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch and the toolkits (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report in --out")
    s = p.add_argument_group("speed mode")
    s.add_argument("--speed", action="store_true", help="time the pipeline alone per stage at --sizes instead")
    s.add_argument("--sizes", nargs="+", type=int, default=list(DEFAULT_SIZES),
                   help=f"working-grid edges for --speed (default: {' '.join(map(str, DEFAULT_SIZES))})")
    s.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=None,
                   help="--speed precisions (default: fp32 on CPU; fp32 and bf16 autocast on CUDA)")
    s.add_argument("--compile", action="store_true", help="--speed: also time the network under torch.compile")
    s.add_argument("--repeats", type=int, default=None, help="--speed: timed runs per size (default 1 on CPU, 3 on CUDA)")
    s.add_argument("--time-limit", type=float, default=600.0,
                   help="--speed: skip a size whose extrapolated time per run exceeds this many seconds (default 600)")
    del REGISTRATION_METHODS
    return p


def run_bench(args: argparse.Namespace) -> int:
    """Handler of ``unifuse bench``; returns the exit code (0). User errors raise :class:`~unifuse.errors.UniFuseError`."""
    if args.speed:
        return _run_speed(args)
    from .report import write_reports
    from .runner import BenchOptions, run_benchmark

    out = Path(args.out)
    if not args.overwrite:
        from ..errors import OutputExistsError
        from .report import REPORT_JSON, REPORT_MD

        existing = [str(out / n) for n in (REPORT_MD, REPORT_JSON) if (out / n).exists()]
        if existing:  # refuse before spending minutes on the benchmark
            raise OutputExistsError(f"benchmark report(s) already exist: {', '.join(existing)}; choose another --out "
                                    "or pass --overwrite")
    options = BenchOptions(
        quick=args.quick, tasks=args.tasks, cases_per_task=args.cases, size=args.size, pairs=args.pairs,
        methods=args.methods, rules=args.rules, weights=args.weights, config=args.config,
        working_size=args.working_size, device=args.device, threads=args.threads,
    )
    results = run_benchmark(options)
    written = write_reports(results, out, overwrite=True)
    from .report import format_markdown

    print()
    print(format_markdown(results))
    print("written: " + ", ".join(str(p) for p in written.values()))
    return 0


def _run_speed(args: argparse.Namespace) -> int:
    from ..io import write_json
    from .report import json_safe
    from .speed import format_speed_table, run_speed

    out = Path(args.out)
    if not args.overwrite:
        from ..errors import OutputExistsError

        existing = [str(out / n) for n in (SPEED_MD, SPEED_JSON) if (out / n).exists()]
        if existing:
            raise OutputExistsError(f"speed report(s) already exist: {', '.join(existing)}; choose another --out or "
                                    "pass --overwrite")
    rows, meta = run_speed(sizes=args.sizes, device=args.device, precisions=args.precisions,
                           compile_model=args.compile, weights=args.weights, config=args.config,
                           repeats=args.repeats, time_limit_s=args.time_limit, threads=args.threads)
    table = format_speed_table(rows)
    mach = meta["machine"]
    text = (f"# UniFuse pipeline speed\n\nModel `{meta['model']['id']}` ({'trained' if meta['model']['trained'] else 'untrained'}), "
            f"{mach['cpu']} ({mach['cpu_count']} cores, {meta['threads']} torch threads)"
            + (f", GPU {mach['gpu']}" if mach.get("gpu") else ", no GPU") + ".\n\n" + table + "\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / SPEED_MD).write_text(text, encoding="utf-8")
    write_json(json_safe({"meta": meta, "rows": [r.to_dict() for r in rows]}), out / SPEED_JSON, overwrite=True)
    print()
    print(table)
    print(f"written: {out / SPEED_MD}, {out / SPEED_JSON}")
    return 0
