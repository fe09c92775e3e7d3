"""``python -m unifuse`` is the ``unifuse`` command.

Ctrl-C/SIGTERM arriving before :func:`unifuse.cli.main` has installed its handlers (while the interpreter
imports the CLI) end the process quietly with exit code 130: nothing has been written yet.
"""

import os
import signal


def _cancelled_early(signum: int, frame: object) -> None:
    os.write(2, b"unifuse: cancelled (Ctrl-C); no outputs were written\n")
    os._exit(130)


signal.signal(signal.SIGINT, _cancelled_early)
signal.signal(signal.SIGTERM, _cancelled_early)

import sys  # noqa: E402 - after the handlers on purpose

from .cli import main  # noqa: E402

sys.exit(main())
