"""``python -m unifuse`` is the ``unifuse`` command."""

import sys

from .cli import main

sys.exit(main())
