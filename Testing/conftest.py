"""Test-suite set-up shared by every test file.

The Slicer module folder ``UniFuseSlicer/`` goes on ``sys.path`` so the MRML glue library
(``UniFuseSlicerLib``) imports as it does inside Slicer; the core package ``unifuse`` is installed
(editable) by ``make test``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

MODULE_DIR = Path(__file__).resolve().parents[1] / "UniFuseSlicer"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))


@pytest.fixture
def single_thread():
    """One torch thread for tiny tensors: faster on a shared 2-core machine and reproducible timings/results.

    Use with ``pytestmark = pytest.mark.usefixtures("single_thread")``.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
