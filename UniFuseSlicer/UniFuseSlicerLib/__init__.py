"""MRML glue of the UniFuse Slicer module: everything between MRML nodes and the ``unifuse`` core that does
not need Qt, so it runs (and is tested) with ``slicer-core`` alone.

Modules:

* :mod:`.volumes` — SimpleITK image <-> ``vtkMRMLScalarVolumeNode`` (LPS <-> RAS, exact IJKToRAS);
* :mod:`.transforms` — LPS displacement field <-> ``vtkMRMLGridTransformNode`` (from-parent, RAS mm);
* :mod:`.display` — slice layers, colour tables and legends of the error maps, deformation grid;
* :mod:`.hierarchy` — subject-hierarchy folder and provenance attributes of a run;
* :mod:`.logic` — :class:`~.logic.FusionLogic` (in-process and background-process runs);
* :mod:`.controller` — :class:`~.controller.RunController`: run / poll / cancel / finish behind Apply/Cancel;
* :mod:`.background` — the child-process runner behind the background runs (process-tree cancel);
* :mod:`.workdir` — temporary folders of background runs (Slicer's temporary folder; keep switch);
* :mod:`.options` — GUI choices (degradation, device, overlay);
* :mod:`.dependencies` — first-use installation plan of the core's Python packages, and the installer;
* :mod:`.selftest` — the scene side of the module's self-test (no network, no torch);
* :mod:`.sampledata` — the sample pair for Slicer's Sample Data module;
* :mod:`.rendering` — offscreen PNG snapshots with Slicer's own displayable managers (trame-slicer);
* :mod:`.icon` — the procedurally drawn module icon (``Resources/Icons/UniFuseSlicer.png``).

Submodules are imported on demand (``from UniFuseSlicerLib.logic import FusionLogic``) so that importing
the package stays cheap.
"""

from __future__ import annotations

__all__ = [
    "background",
    "controller",
    "dependencies",
    "display",
    "hierarchy",
    "icon",
    "logic",
    "options",
    "rendering",
    "sampledata",
    "selftest",
    "transforms",
    "volumes",
    "workdir",
]
