"""``python -m unifuse.train``: the ``unifuse train`` command as a module, for launchers such as torchrun.

::

    torchrun --nproc_per_node 2 -m unifuse.train --config tiny --out runs/ddp --device cpu     # 2 CPU processes (gloo)
    torchrun --nproc_per_node 8 -m unifuse.train --config gpu --out runs/ddp --data BraTS --layout brats2020

It takes exactly the arguments of ``unifuse train`` (:func:`unifuse.train.cli_train.add_train_arguments`).
Exit codes: 0 success; 1 a user-facing error (one line on stderr naming the problem and the fix); 2 usage.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..errors import UniFuseError
from .cli_train import add_train_arguments, run_train


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``unifuse train`` arguments and run the (possibly distributed) training; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m unifuse.train",
                                     description="Train UniFuse (one process, or one rank of a torchrun launch).")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_train(args)
    except UniFuseError as exc:
        print(f"unifuse train: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
