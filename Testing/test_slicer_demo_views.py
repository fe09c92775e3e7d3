"""`make demo`'s second step: Slicer's views of a run folder rendered offscreen (UniFuseSlicerLib.demo_views)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("slicer")
pytest.importorskip("trame_slicer")

from PIL import Image  # noqa: E402

from unifuse.cli import main  # noqa: E402


def test_demo_folder_renders_overlay_grid_and_error_map(tmp_path, offscreen_rendering):
    from UniFuseSlicerLib import demo_views

    run = tmp_path / "demo"
    assert main(["demo", "--out", str(run), "--size", "32", "--config", "tiny", "--spacing", "8", "--affine", "none", "--refine", "none", "--quiet"]) == 0
    paths = demo_views.render_demo_views(run, size=(200, 200))
    assert set(paths) == {"overlay", "grid", "error_map"}
    pixels = {k: np.asarray(Image.open(p).convert("RGB"), dtype=float) for k, p in paths.items()}
    for name, rgb in pixels.items():
        assert rgb.shape == (200, 200, 3), name
        assert rgb.std() > 5, f"{name} is blank"
    # the error map is colour-mapped (not grey); the overlay is grey-level anatomy
    err = pixels["error_map"]
    assert np.abs(err[..., 0] - err[..., 2]).mean() > 5
    ov = pixels["overlay"]
    assert np.abs(ov[..., 0] - ov[..., 2]).mean() < 2
