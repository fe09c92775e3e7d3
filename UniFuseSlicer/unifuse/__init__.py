"""UniFuse 3D: one network that aligns, restores and fuses a degraded, misaligned moving volume onto a
good-quality reference volume (Su et al., "UniFuse: A Unified All-in-One Framework for Multi-Modal Medical
Image Fusion Under Diverse Degradations and Misalignments").

This package is the Slicer-free core of the UniFuseSlicer extension. Public entry points::

    import unifuse
    result = unifuse.fuse("t1.nii.gz", "t2.nii.gz", degradation="auto", device="auto")
    result = unifuse.fuse("t1.nii.gz", "t2.nii.gz", unifuse.FuseOptions(refine="full", spacing_mm=2.0))
    result.fused, result.aligned, result.displacement, result.report

Conventions used throughout (see ``docs/geometry.md``):

* Images at the API boundary are ``SimpleITK.Image`` in LPS physical space, millimetres.
* Arrays inside are ordered (z, y, x) = (K, J, I), float32.
* Displacement fields are pull-back fields on the reference (fixed) grid:
  ``aligned(x) = moving(x + u(x))``. Inside the network ``u`` is in voxels of the working grid with
  channels ordered (x, y, z) = (I, J, K); at the boundary it is an ITK displacement field in LPS mm.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "fuse", "FusionResult", "FuseOptions"]


def __getattr__(name: str):  # lazy: keep `import unifuse` cheap (no torch import until needed)
    if name in ("fuse", "FusionResult"):
        from . import pipeline

        return getattr(pipeline, name)
    if name == "FuseOptions":
        from .options import FuseOptions

        return FuseOptions
    raise AttributeError(f"module 'unifuse' has no attribute {name!r}")
