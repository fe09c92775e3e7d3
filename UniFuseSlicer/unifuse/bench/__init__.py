"""``unifuse bench``: UniFuse against classical multi-stage baselines, and pipeline speed.

Modules:

* :mod:`~unifuse.bench.cases` — held-out synthetic cases of the paper's three tasks, user folders of pairs, the
  real-anatomy validation cases (``--real``).
* :mod:`~unifuse.bench.baselines` — registration baselines (none, SimpleITK rigid / affine / B-spline, ANTs SyN in
  its own environment, elastix), each in a child process.
* :mod:`~unifuse.bench.measure` — wall time and peak memory of one step.
* :mod:`~unifuse.bench.runner` — runs every method (UniFuse pipeline variants and baselines) on every case; the
  metrics come from :mod:`unifuse.evaluation`.
* :mod:`~unifuse.bench.report` — Markdown tables, JSON and PNG figures.
* :mod:`~unifuse.bench.speed` — pipeline timings per stage at finer and finer working-grid spacings.
* :mod:`~unifuse.bench.cli_bench` — ``add_bench_parser(subparsers)`` and ``run_bench(args)`` for the CLI.

How to run and what each method is: ``docs/benchmark.md``.
"""

from __future__ import annotations

from .cli_bench import add_bench_parser, run_bench

__all__ = ["add_bench_parser", "run_bench"]
