"""Command-line glue of ``unifuse bench`` (hooked into :mod:`unifuse.cli` by :func:`add_bench_parser`).

``unifuse bench [--quick] [--out DIR] [--pairs DIR] [--tasks ...] [--cases N] [--size S] [--methods ...]
[--rules ...] [--weights W] [--config C] [--spacing MM] [--device D] [--threads N] [--overwrite]``
runs the accuracy benchmark (:mod:`unifuse.bench.runner`) and writes ``bench.md``, ``bench.json`` and PNG
figures (:mod:`unifuse.bench.report`). ``unifuse bench --real [--cache DIR] [--split S] [--ants-python PY]``
runs it on the real-anatomy validation cases of ``unifuse data real`` (every refinement, the ablations and every
baseline by default; per-category and per-case tables).

``unifuse bench --speed [--spacings 4 3 2 1.5] [--precisions fp32 bf16] [--compile] [--repeats N]`` times the
pipeline alone at finer and finer working grids (:mod:`unifuse.bench.speed`) and writes ``speed.md``/``speed.json``.

The runner and the speed module (the pipeline, torch) are imported where they are used: every baseline child
process (``python -m unifuse.bench.baselines``, ANTs in its own environment without torch) imports this module.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..config import CONFIGS
from ..outputs import claim_output_dir
from .cases import BENCH_TASKS
from .report import REPORT_JSON, REPORT_MD, format_markdown, json_safe, write_reports

__all__ = ["add_bench_parser", "run_bench"]

SPEED_MD = "speed.md"
SPEED_JSON = "speed.json"


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` sub-command to ``unifuse``'s sub-parsers; returns the new parser."""
    from .runner import FUSION_RULES, METHODS, REAL_METHODS, SYNTHETIC_METHODS
    from .speed import DEFAULT_REFERENCE_SPACING_MM, DEFAULT_SPACINGS_MM

    p = subparsers.add_parser(
        "bench",
        help="benchmark UniFuse against registration + fusion baselines (or, with --speed, time the pipeline)",
        description="Accuracy benchmark on the held-out synthetic tasks, a folder of user pairs or (--real) the "
                    "real-anatomy validation cases, or (--speed) pipeline timings per stage at finer and finer working "
                    "grids. See docs/benchmark.md.",
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
    p.add_argument("--real", action="store_true",
                   help="run the real-anatomy validation cases of --cache (from `unifuse data real`): per category "
                        "(full / partial field of view) and per case")
    p.add_argument("--cache", type=Path, default=None, help="--real: the real-data cache (default: real_data)")
    p.add_argument("--split", default="validation", help="--real: which split of the cache (default: validation)")
    p.add_argument("--case", dest="case_names", nargs="+", default=None, metavar="NAME",
                   help="--real / --pairs: only these cases (folder names)")
    p.add_argument("--ants-python", default=None, metavar="PYTHON",
                   help="interpreter that has antspyx for ants-syn (default: $UNIFUSE_ANTS_PYTHON, else "
                        ".venv-ants/bin/python made by `make bench-deps`, else this one)")
    p.add_argument("--no-mind", dest="mind", action="store_false",
                   help="skip the truth-free MIND dissimilarity of every aligned volume (saves time on large volumes)")
    p.add_argument("--cases", type=int, default=None,
                   help="synthetic cases per task (default 2; 1 with --quick); with --real the first N cases (default all)")
    p.add_argument("--size", type=int, default=None, help="edge of the synthetic volumes in voxels (default 64; 32 with --quick)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=None,
                   help=f"methods to run (default: {' '.join(SYNTHETIC_METHODS)}; with --real: {' '.join(REAL_METHODS)}); "
                        "registrations are fused by every --rules")
    p.add_argument("--rules", nargs="*", choices=FUSION_RULES, default=None,
                   help="fusion rules applied after each registration baseline (default: all; none with --real)")
    p.add_argument("--weights", type=Path, default=None, help="UniFuse checkpoint (default: the shipped weights)")
    p.add_argument("--config", choices=sorted(CONFIGS), default=None,
                   help="config of an UNTRAINED network (ignores the shipped weights; for tests and timing)")
    p.add_argument("--spacing", dest="spacing_mm", type=float, default=None, metavar="MM",
                   help="UniFuse working-grid spacing in mm (default: the pipeline's)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="UniFuse device (default: auto)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch and the toolkits (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report in --out")
    s = p.add_argument_group("speed mode")
    s.add_argument("--speed", action="store_true", help="time the pipeline alone per stage at --spacings instead")
    s.add_argument("--spacings", nargs="+", type=float, default=list(DEFAULT_SPACINGS_MM), metavar="MM",
                   help=f"working-grid spacings (mm) for --speed, coarse to fine (default: "
                        f"{' '.join(f'{v:g}' for v in DEFAULT_SPACINGS_MM)})")
    s.add_argument("--reference-spacing", type=float, default=DEFAULT_REFERENCE_SPACING_MM, metavar="MM",
                   help=f"--speed: spacing of the timed pair's reference grid (default {DEFAULT_REFERENCE_SPACING_MM:g} mm)")
    s.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=None,
                   help="--speed precisions (default: fp32 on CPU; fp32 and bf16 autocast on CUDA)")
    s.add_argument("--compile", action="store_true", help="--speed: also time the network under torch.compile")
    s.add_argument("--repeats", type=int, default=None, help="--speed: timed runs per spacing (default 1 on CPU, 3 on CUDA)")
    s.add_argument("--time-limit", type=float, default=600.0,
                   help="--speed: skip a spacing whose extrapolated time per run exceeds this many seconds (default 600)")
    return p


def run_bench(args: argparse.Namespace) -> int:
    """Handler of ``unifuse bench``; returns the exit code (0). User errors raise :class:`~unifuse.errors.UniFuseError`."""
    if args.speed:
        return _run_speed(args)
    from .runner import BenchOptions, run_benchmark

    out = Path(args.out)
    with claim_output_dir(out, [REPORT_MD, REPORT_JSON], args.overwrite):  # checked and locked before the minutes
        options = BenchOptions(
            quick=args.quick, tasks=args.tasks, cases_per_task=args.cases, size=args.size, pairs=args.pairs,
            real=args.real, cache=args.cache, split=args.split, case_names=args.case_names,
            methods=args.methods, rules=args.rules,
            weights=args.weights, config=args.config, spacing_mm=args.spacing_mm, device=args.device,
            threads=args.threads, ants_python=args.ants_python, mind=args.mind,
        )
        results = run_benchmark(options)
        written = write_reports(results, out, overwrite=args.overwrite)
    print()
    print(format_markdown(results))
    print("written: " + ", ".join(str(p) for p in written.values()))
    return 0


def _run_speed(args: argparse.Namespace) -> int:
    from .speed import run_speed

    out = Path(args.out)
    with claim_output_dir(out, [SPEED_MD, SPEED_JSON], args.overwrite) as claim:  # checked and locked first
        rows, meta = run_speed(spacings=args.spacings, reference_spacing_mm=args.reference_spacing,
                               device=args.device, precisions=args.precisions,
                               compile_model=args.compile, weights=args.weights, config=args.config,
                               repeats=args.repeats, time_limit_s=args.time_limit, threads=args.threads)
        _write_speed(claim, rows, meta)
    return 0


def _write_speed(claim: Any, rows: Any, meta: Any) -> None:
    from .speed import format_speed_table

    out = claim.folder
    table = format_speed_table(rows)
    mach = meta["machine"]
    text = (f"# UniFuse pipeline speed\n\nModel `{meta['model']['id']}` ({'trained' if meta['model']['trained'] else 'untrained'}), "
            f"{mach['cpu']} ({mach['cpu_count']} cores, {meta['threads']} torch threads)"
            + (f", GPU {mach['gpu']}" if mach.get("gpu") else ", no GPU") + ". " + _pair_text(meta) + "\n\n" + table + "\n")
    claim.write({SPEED_MD: text, SPEED_JSON: json_safe({"meta": meta, "rows": [r.to_dict() for r in rows]})})
    print()
    print(table)
    print(f"written: {out / SPEED_MD}, {out / SPEED_JSON}")


def _pair_text(meta: Any) -> str:
    """One sentence on the timed pair of ``--speed``."""
    pair = meta.get("pair") or {}
    if not pair:
        return ""
    ref = "×".join(map(str, pair["reference_size"]))
    mov = "×".join(map(str, pair["moving_size"]))
    return (f"Pair: reference {ref} voxels at {pair['reference_spacing_mm'][0]:.3g} mm, moving {mov} voxels at "
            f"{', '.join(f'{v:.3g}' for v in pair['moving_spacing_mm'])} mm; working-grid spacings "
            f"{', '.join(f'{v:g}' for v in meta.get('spacings_mm', []))} mm.")
