"""Temporary folders of background runs (no Qt needed).

Inside Slicer they go under the application's temporary folder (``slicer.app.temporaryPath``, the folder
``slicer.util.tempDirectory`` also uses, set in *Application Settings → General → Temporary directory*),
so they land where the user told Slicer to put temporary data; outside Slicer (``slicer-core``, tests,
scripts) under the system temporary folder. Each run gets its own folder from ``tempfile.mkdtemp`` (unique
and created atomically, also when two runs start in the same millisecond).

Developer switch: keep a run's folder (inputs written for the child, its outputs, nothing deleted) with the
module's *Keep temporary files* check box, ``keep_temporary_files=True`` of ``FusionLogic.start_background``,
or the environment variable :data:`KEEP_TEMPORARY_FILES_ENV` = ``1``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping, Optional, Union

__all__ = [
    "KEEP_TEMPORARY_FILES_ENV",
    "WORK_DIR_PREFIX",
    "keep_temporary_files_requested",
    "make_work_dir",
    "remove_work_dir",
    "temporary_parent",
]

KEEP_TEMPORARY_FILES_ENV = "UNIFUSE_KEEP_TEMPORARY_FILES"
WORK_DIR_PREFIX = "UniFuse-"


def temporary_parent() -> Path:
    """Slicer's application temporary folder when running inside Slicer, else the system temporary folder."""
    try:
        import slicer

        app = getattr(slicer, "app", None)  # absent in slicer-core (no application)
        path = getattr(app, "temporaryPath", None) if app is not None else None
    except ImportError:
        path = None
    if path:
        parent = Path(str(path))
        try:
            parent.mkdir(parents=True, exist_ok=True)
            return parent
        except OSError:
            pass  # an unwritable setting: fall back to the system folder
    return Path(tempfile.gettempdir())


def make_work_dir(parent: Union[None, str, Path] = None, prefix: str = WORK_DIR_PREFIX) -> Path:
    """Create a new, empty, private folder for one run under ``parent`` (default :func:`temporary_parent`)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=str(parent) if parent is not None else str(temporary_parent())))


def keep_temporary_files_requested(environ: Optional[Mapping[str, str]] = None) -> bool:
    """True when :data:`KEEP_TEMPORARY_FILES_ENV` asks to keep run folders (``1``, ``true``, ``yes``, ``on``)."""
    value = (os.environ if environ is None else environ).get(KEEP_TEMPORARY_FILES_ENV, "")
    return value.strip().lower() in ("1", "true", "yes", "on")


def remove_work_dir(path: Union[None, str, Path]) -> None:
    """Delete a run folder and everything in it (missing folders and locked files are ignored)."""
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)
