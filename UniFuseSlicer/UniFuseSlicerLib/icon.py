"""The module icon (``Resources/Icons/UniFuseSlicer.png``), drawn procedurally.

Motif: a reference volume (cool grey-blue disc) and a moving volume (warm orange disc) overlapping, their
overlap blended into a bright fused region, with a lightly warped grid standing for the deformation field,
on a dark rounded square. Rendered with 4x supersampling for anti-aliased edges; deterministic, so the
shipped PNG can be regenerated and checked: ``python -m UniFuseSlicerLib.icon <path>``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Union

import numpy as np

__all__ = ["ICON_SIZE", "render_icon", "write_icon"]

ICON_SIZE = 128


def _smooth_step(edge: float, x: np.ndarray, width: float) -> np.ndarray:
    """1 inside (x < edge), 0 outside, linear ramp of ``width`` across the edge."""
    return np.clip((edge - x) / width + 0.5, 0.0, 1.0)


def render_icon(size: int = ICON_SIZE, supersample: int = 4) -> np.ndarray:
    """The icon as an (size, size, 4) uint8 RGBA array, row 0 at the top."""
    n = size * supersample
    coords = (np.arange(n) + 0.5) / n  # pixel centres in [0, 1]
    y, x = np.meshgrid(coords, coords, indexing="ij")
    px = 1.0 / n

    # Rounded-square background.
    radius, margin = 0.16, 0.02
    qx = np.maximum(np.abs(x - 0.5) - (0.5 - margin - radius), 0.0)
    qy = np.maximum(np.abs(y - 0.5) - (0.5 - margin - radius), 0.0)
    background = _smooth_step(radius, np.hypot(qx, qy), px)
    rgb = np.zeros((n, n, 3))
    rgb[:] = (0.10, 0.12, 0.16)
    rgb += (0.10 * (1.0 - y))[..., None] * np.array([0.4, 0.6, 1.0])  # faint top light

    # Warped grid (the deformation field): a smooth swirl centred between the discs.
    swirl = 0.05 * np.exp(-((x - 0.5) ** 2 + (y - 0.52) ** 2) / (2 * 0.18**2))
    wx = x + swirl * (y - 0.52) / 0.18
    wy = y - swirl * (x - 0.5) / 0.18
    spacing = 1.0 / 8
    dist_x = np.abs((wx / spacing) - np.round(wx / spacing)) * spacing
    dist_y = np.abs((wy / spacing) - np.round(wy / spacing)) * spacing
    grid = np.maximum(_smooth_step(0.004, dist_x, px), _smooth_step(0.004, dist_y, px))
    rgb = rgb * (1.0 - 0.35 * grid[..., None]) + 0.35 * grid[..., None] * np.array([0.45, 0.75, 0.65])

    # Reference (cool) and moving (warm) discs; the overlap is the fused, brighter blend.
    ref = _smooth_step(0.27, np.hypot(x - 0.39, y - 0.45), px)
    mov = _smooth_step(0.27, np.hypot(x - 0.61, y - 0.57), px)
    ref_colour = np.array([0.35, 0.60, 0.95])
    mov_colour = np.array([0.98, 0.58, 0.20])
    fused_colour = np.array([1.00, 0.97, 0.88])
    only_ref = ref * (1.0 - mov)
    only_mov = mov * (1.0 - ref)
    both = ref * mov
    cover = np.clip(only_ref + only_mov + both, 0.0, 1.0)
    disc_rgb = (only_ref[..., None] * ref_colour + only_mov[..., None] * mov_colour
                + both[..., None] * fused_colour) / np.maximum(cover, 1e-9)[..., None]
    rgb = rgb * (1.0 - 0.92 * cover[..., None]) + 0.92 * cover[..., None] * disc_rgb

    # Thin outline rings keep the two inputs readable inside the fused region.
    for cx, cy, colour in ((0.39, 0.45, ref_colour), (0.61, 0.57, mov_colour)):
        ring = _smooth_step(0.006, np.abs(np.hypot(x - cx, y - cy) - 0.27), px)
        rgb = rgb * (1.0 - ring[..., None]) + ring[..., None] * colour

    rgba = np.concatenate([np.clip(rgb, 0.0, 1.0), background[..., None]], axis=-1)
    rgba = rgba.reshape(size, supersample, size, supersample, 4).mean(axis=(1, 3))
    return np.round(rgba * 255.0).astype(np.uint8)


def write_icon(path: Union[str, Path], size: int = ICON_SIZE) -> Path:
    """Render the icon and write it as an RGBA PNG (VTK's PNG writer); returns the path."""
    from .rendering import write_png

    return write_png(render_icon(size), path)


if __name__ == "__main__":  # pragma: no cover - regenerate the shipped icon
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "Resources" / "Icons" / "UniFuseSlicer.png"
    print(write_icon(target))
