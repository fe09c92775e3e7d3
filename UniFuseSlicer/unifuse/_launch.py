"""Entry point of the ``unifuse`` command (console script and ``python -m unifuse``).

Ctrl-C/SIGTERM arriving before :func:`unifuse.cli.main` has installed its handlers (while the interpreter
imports the CLI, 0.2–0.5 s: SimpleITK, numpy, tqdm) end the process quietly with exit code 130: nothing has been
written yet. This module imports nothing heavy, so the handlers are in place before the CLI is imported.
"""

import os
import signal

__all__ = ["main"]


def _cancelled_early(signum: int, frame: object) -> None:
    os.write(2, b"unifuse: cancelled (Ctrl-C); no outputs were written\n")
    os._exit(130)


def main() -> int:
    """Install the early handlers, then run :func:`unifuse.cli.main` (which replaces them with its own)."""
    signal.signal(signal.SIGINT, _cancelled_early)
    signal.signal(signal.SIGTERM, _cancelled_early)
    from .cli import main as cli_main

    return cli_main()
