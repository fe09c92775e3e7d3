"""PNG snapshots of volumes for reports and the demo (matplotlib, headless ``Agg`` backend).

Slices are taken through the centre of the reference grid in the three orthogonal array planes and shown
in radiological-free "array" orientation: row = y (J) or z (K) index, column = x (I) index, as stored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk


def _robust_limits(arr: np.ndarray) -> Tuple[float, float]:
    finite = arr[np.isfinite(arr)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [0.5, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1.0)


def central_slices(image: sitk.Image) -> List[np.ndarray]:
    """Axial (z), coronal (y) and sagittal (x) central slices of a scalar image as 2-D arrays."""
    arr = sitk.GetArrayFromImage(image)
    k, j, i = (s // 2 for s in arr.shape)
    return [arr[k], arr[:, j, :][::-1], arr[:, :, i][::-1]]


def save_montage(
    panels: Sequence[Tuple[str, sitk.Image, Optional[Dict[str, object]]]],
    path: Union[str, Path],
    title: str = "",
) -> Path:
    """Write a grid of central slices: one column per panel, rows = axial, coronal, sagittal.

    Args:
        panels: (label, image, style) where style may set ``cmap``, ``vmin``, ``vmax``.
        path: PNG file to write (parent folders are created).
    """
    import matplotlib  # lazy: choosing the Agg backend must not happen on import (Slicer has its own backend)

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(3, len(panels), figsize=(2.6 * len(panels), 7.8), squeeze=False)
    for col, (label, image, style) in enumerate(panels):
        style = dict(style or {})
        slices = central_slices(image)
        lo, hi = _robust_limits(np.concatenate([s.ravel() for s in slices]))
        vmin = style.pop("vmin", lo)
        vmax = style.pop("vmax", hi)
        cmap = style.pop("cmap", "gray")
        for row, sl in enumerate(slices):
            ax = axes[row, col]
            im = ax.imshow(sl, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(label, fontsize=9)
        if cmap != "gray":
            fig.colorbar(im, ax=axes[:, col].tolist(), fraction=0.05, shrink=0.6)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
