"""``python -m unifuse`` is the ``unifuse`` command (:func:`unifuse._launch.main`: early Ctrl-C handlers, then
the CLI)."""

import sys

from ._launch import main

sys.exit(main())
