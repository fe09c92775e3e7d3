"""Slicer's views of a ``unifuse demo`` (or ``unifuse fuse``) output folder, rendered offscreen to PNG.

``make demo`` runs this after ``unifuse demo`` so the demo also shows what the module shows in Slicer: the
fused overlay, the deformation grid and the error map, drawn by Slicer's own displayable managers
(:func:`UniFuseSlicerLib.rendering.snapshot_fusion`) on a fresh MRML scene.

Usage (``UniFuseSlicer/`` on ``PYTHONPATH``)::

    python -m UniFuseSlicerLib.demo_views demo_output [--out demo_output/slicer_views]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import SimpleITK as sitk

from . import logic, rendering, volumes

#: Inputs of a demo folder, as written by ``unifuse demo``.
REFERENCE_FILE, MOVING_FILE = "reference.nii.gz", "moving.nii.gz"


def render_demo_views(
    run_dir: Union[str, Path],
    out_dir: Optional[Union[str, Path]] = None,
    size: Tuple[int, int] = (512, 512),
    reference: Optional[Union[str, Path]] = None,
    moving: Optional[Union[str, Path]] = None,
) -> Dict[str, Path]:
    """Load a run's inputs and outputs into a new scene and write ``overlay.png``, ``grid.png``, ``error_map.png``.

    Args:
        run_dir: folder with the pipeline outputs (``fused.nii.gz`` ... ``report.json``).
        out_dir: where the PNGs go (default ``<run_dir>/slicer_views``).
        reference, moving: input files (default: the demo's ``reference.nii.gz``/``moving.nii.gz`` in run_dir).
    """
    import slicer

    run_dir = Path(run_dir)
    scene = slicer.vtkMRMLScene()
    ref_node = volumes.image_to_volume_node(sitk.ReadImage(str(reference or run_dir / REFERENCE_FILE)), scene, "reference")
    mov_node = volumes.image_to_volume_node(sitk.ReadImage(str(moving or run_dir / MOVING_FILE)), scene, "moving")
    nodes = logic.FusionLogic(scene).load_cli_outputs(run_dir, ref_node, mov_node)
    return rendering.snapshot_fusion(nodes, Path(out_dir) if out_dir else run_dir / "slicer_views", size=size)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m UniFuseSlicerLib.demo_views", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="output folder of `unifuse demo` or `unifuse fuse`")
    parser.add_argument("--out", type=Path, default=None, help="PNG folder (default: RUN_DIR/slicer_views)")
    args = parser.parse_args(argv)
    for name, path in render_demo_views(args.run_dir, args.out).items():
        print(f"{name:<10} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
