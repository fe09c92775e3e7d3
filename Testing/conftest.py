"""Test-suite set-up shared by every test file.

The Slicer module folder ``UniFuseSlicer/`` goes on ``sys.path`` so the MRML glue library
(``UniFuseSlicerLib``) imports as it does inside Slicer; the core package ``unifuse`` is installed
(editable) by ``make test``.
"""

from __future__ import annotations

import subprocess
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


_OFFSCREEN_PROBE = """
import os
if not os.environ.get("DISPLAY") and "VTK_DEFAULT_OPENGL_WINDOW" not in os.environ:
    os.environ["VTK_DEFAULT_OPENGL_WINDOW"] = "vtkEGLRenderWindow"  # as UniFuseSlicerLib.rendering does
import vtk
window = vtk.vtkRenderWindow()
window.SetOffScreenRendering(1)
print("ok" if window.SupportsOpenGL() else "no OpenGL context")
"""


@pytest.fixture(scope="session")
def offscreen_rendering():
    """Skip when this machine cannot make an offscreen OpenGL context (no GPU/EGL/OSMesa), checked once up front
    in a child process (a failed context can abort the interpreter). Any failure of the code under test once
    the context exists is a failure, not a skip."""
    probe = subprocess.run([sys.executable, "-c", _OFFSCREEN_PROBE], capture_output=True, text=True, timeout=120)
    answer = probe.stdout.strip().splitlines()[-1:] or [probe.stderr.strip()[-300:] or f"exit code {probe.returncode}"]
    if probe.returncode != 0 or answer[0] != "ok":
        pytest.skip(f"offscreen rendering is not available here: {answer[0]}")
