"""Data for UniFuse: synthetic anatomy and modalities, degradations, misalignments, datasets.

Modules (import them directly; this package imports nothing heavy on its own):

* :mod:`~unifuse.data.anatomy` — MNI ICBM152 tissue maps from nilearn, random deformations, random
  label-map subjects.
* :mod:`~unifuse.data.modalities` — MR (T1/T2/PD/FLAIR), CT and PET images from tissue maps; random
  SynthMorph contrasts.
* :mod:`~unifuse.data.degradations` — MR motion (k-space), CT metal artefacts + noise (projection
  domain), low-dose PET (Poisson); ``DEGRADATIONS`` = ``config.DEGRADATION_CLASSES``.
* :mod:`~unifuse.data.deformations` — random rigid + non-rigid misalignment with its exact inverse.
* :mod:`~unifuse.data.synthetic` — ``SyntheticPairs`` (torch Dataset) and ``make_demo_case``.
* :mod:`~unifuse.data.folders` — ``FolderPairs`` over BraTS2020, SynthRAD2023 and FDG-PET/CT folders.

The physical models, parameter ranges and split rules are documented in ``docs/data.md``.
"""

from __future__ import annotations

__all__ = ["anatomy", "modalities", "degradations", "deformations", "synthetic", "folders"]
