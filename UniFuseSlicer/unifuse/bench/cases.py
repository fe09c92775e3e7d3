"""Benchmark cases: the held-out synthetic benchmark and user folders of pairs.

A :class:`BenchCase` is a (reference, moving) pair as a user would load it — SimpleITK images in LPS mm, the
moving volume on its own grid — plus whatever truth is known:

* ``truth_aligned``: the clean moving modality aligned with the reference, on the reference grid (the
  "high-quality label" the fusion metrics compare with);
* ``truth_displacement``: the ITK displacement field (``sitkVectorFloat64``, LPS mm, reference grid, pull-back
  ``aligned(x) = moving(x + U(x))``) that aligns the moving volume exactly;
* ``reference_labels`` / ``moving_labels``: integer tissue labels in the reference pose (reference grid) and
  in the moving pose (moving grid), for the Dice of warped labels.

**Synthetic benchmark** (:func:`synthetic_cases`): the paper's three tasks (``t1-t2-motion``, ``mr-ct-metal``,
``ct-pet-lowdose``) built with :func:`unifuse.data.synthetic.make_demo_case`. That generator draws from the
*demo* random streams (split id 3 of ``docs/data.md`` §5), which training (split id 0) and validation
(split id 1) never touch, so every benchmark case is held out by construction. The benchmark uses the seeds
``BENCH_FIRST_SEED, BENCH_FIRST_SEED + 1, …`` (1000 on), so it also never shows the shipped sample pair
(seed 0).

**User folders** (:func:`folder_cases`): ``DIR/<case>/reference.*`` and ``DIR/<case>/moving.*`` (any format
:func:`unifuse.io.read_image` reads: ``.nii.gz``, ``.nii``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``), with
optional ``truth_displacement.*``, ``truth_moving_aligned_clean.*``, ``reference_labels.*`` (or ``labels.*``)
and ``moving_labels.*``. ``DIR`` may also be a single case folder (e.g. the output folder of ``unifuse demo``,
which writes exactly these names).

**Real-anatomy validation cases** (:func:`real_cases`, ``unifuse bench --real``): the case folders that
``unifuse data real`` writes under ``<cache>/cases/<split>/<case>/`` — the user-folder layout above plus a
``case.json`` with ``category`` (``"full"`` or ``"partial"`` field of view), ``subject``, ``body_part`` and
``degradation``. The case's ``task`` is its category (so the report groups by it) and ``info`` holds the
``case.json`` fields.

The data generators (torch) are imported where they are used: :mod:`unifuse.bench.cli_bench` imports this
module, and every baseline child process, ANTs's in an environment without torch, imports that one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk

from .. import geometry
from ..errors import DatasetError
from ..io import read_image

__all__ = [
    "BENCH_FIRST_SEED",
    "BENCH_TASKS",
    "IMAGE_EXTENSIONS",
    "CASE_FILES",
    "CASE_JSON",
    "REAL_CATEGORIES",
    "BenchCase",
    "moving_pose_labels",
    "synthetic_cases",
    "folder_cases",
    "real_cases",
]

#: First seed of the synthetic benchmark cases (demo random stream; seed 0 is the shipped sample pair).
BENCH_FIRST_SEED = 1000
#: The paper's three tasks, in table order (keys of :data:`unifuse.data.synthetic.TASKS`).
BENCH_TASKS = ("t1-t2-motion", "mr-ct-metal", "ct-pet-lowdose")
#: File name endings accepted in user case folders (longest first, so ``.nii.gz`` wins over ``.gz``).
IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
#: Stem of each file of a user case folder -> :class:`BenchCase` attribute (``labels`` is an alias).
CASE_FILES: Dict[str, str] = {
    "reference": "reference",
    "moving": "moving",
    "truth_displacement": "truth_displacement",
    "truth_moving_aligned_clean": "truth_aligned",
    "reference_labels": "reference_labels",
    "labels": "reference_labels",
    "moving_labels": "moving_labels",
}
#: Description file of a real case folder.
CASE_JSON = "case.json"
#: Categories of the real cases (``case.json`` ``category``), in table order.
REAL_CATEGORIES = ("full", "partial")


@dataclass(frozen=True, eq=False)
class BenchCase:
    """One benchmark pair and its known truth (None where unknown).

    Attributes:
        name: unique case name, e.g. ``t1-t2-motion/seed1000`` or the folder name.
        task: table the case belongs to (a :data:`BENCH_TASKS` name, or ``pairs`` for user folders).
        reference: reference volume (fixed space), LPS, its own units (HU for CT).
        moving: moving volume on its own grid, its own units.
        degradation: true degradation class name when known.
        truth_aligned: clean moving modality aligned with the reference, on the reference grid.
        truth_displacement: exact pull-back field, ``sitkVectorFloat64`` LPS mm on the reference grid.
        reference_labels: integer labels in the reference pose, reference grid.
        moving_labels: integer labels in the moving pose, moving grid.
        info: what else is known (real cases: the ``case.json`` fields category, subject, body_part,
            degradation).
        moving_modality: the moving volume's modality (``ct``, ``mr``, ``pet``) when known; UniFuse is told it
            as a user who knows what they scanned would (``FuseOptions.moving_modality``).
    """

    name: str
    task: str
    reference: sitk.Image
    moving: sitk.Image
    degradation: Optional[str] = None
    truth_aligned: Optional[sitk.Image] = None
    truth_displacement: Optional[sitk.Image] = None
    reference_labels: Optional[sitk.Image] = None
    moving_labels: Optional[sitk.Image] = None
    info: Dict[str, Any] = field(default_factory=dict)
    moving_modality: Optional[str] = None


def moving_pose_labels(reference_labels: sitk.Image, truth_displacement: sitk.Image, moving_grid: sitk.Image) -> sitk.Image:
    """Labels of the reference pose carried into the moving pose, on ``moving_grid``.

    The truth maps reference points to moving points, ``x -> x + U(x)``. Its inverse ``y -> y + V(y)`` (moving
    -> reference points) is computed on the reference grid in voxel units with
    :func:`unifuse.data.deformations.invert_field` (fixed-point iteration, < 0.05 voxel residual for the
    benchmark's smooth, non-folding fields), and ``labels_moving(y) = labels_reference(y + V(y))`` is sampled
    with nearest-neighbour interpolation at the moving grid's voxel centres (``V = 0`` outside the reference
    grid, where the labels are background anyway).

    Args:
        reference_labels: integer labels on the reference grid.
        truth_displacement: 3-component LPS mm field on the same grid.
        moving_grid: grid of the moving volume (pixels unused).

    Returns:
        uint8 label image on ``moving_grid``.
    """
    from ..data.deformations import invert_field

    u_vox = geometry.field_image_to_voxels(truth_displacement, reference_labels)
    v_vox = invert_field(u_vox)
    v_mm = geometry.field_voxels_to_image(v_vox, reference_labels)
    inverse = sitk.DisplacementFieldTransform(sitk.Cast(v_mm, sitk.sitkVectorFloat64))
    labels = sitk.Resample(reference_labels, moving_grid, inverse, sitk.sitkNearestNeighbor, 0.0, sitk.sitkUInt8)
    return labels


def synthetic_cases(
    tasks: Sequence[str] = BENCH_TASKS,
    cases_per_task: int = 2,
    size: int = 64,
    first_seed: int = BENCH_FIRST_SEED,
) -> Iterator[BenchCase]:
    """Yield the held-out synthetic benchmark, ``cases_per_task`` cases of each task (generated lazily).

    Args:
        tasks: task names (:data:`BENCH_TASKS` or a subset).
        cases_per_task: cases per task; case k of every task uses seed ``first_seed + k``.
        size: edge of the S³ anatomy grid of the reference (spacing 233 mm / S).
        first_seed: first demo-stream seed (keep it ≥ 1 so the shipped sample pair is not used).

    Yields:
        :class:`BenchCase` with all truth fields set (labels: 0 background, 1 CSF, 2 GM, 3 WM, 4 bone, 5 scalp).
    """
    from ..data.synthetic import TASKS, make_demo_case, normalisation_modality

    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown benchmark task(s) {unknown}; choose from {', '.join(TASKS)}")
    if int(cases_per_task) < 1:
        raise ValueError(f"cases_per_task must be at least 1; got {cases_per_task}")
    for task in tasks:
        for k in range(int(cases_per_task)):
            seed = int(first_seed) + k
            demo = make_demo_case(size=int(size), task=task, seed=seed)
            labels = sitk.Cast(demo.labels, sitk.sitkUInt8)
            yield BenchCase(
                name=f"{task}/seed{seed}",
                task=task,
                reference=demo.reference,
                moving=demo.moving,
                degradation=demo.degradation,
                truth_aligned=demo.moving_clean,
                truth_displacement=demo.displacement_gt,
                reference_labels=labels,
                moving_labels=moving_pose_labels(labels, demo.displacement_gt, demo.moving),
                moving_modality=normalisation_modality(TASKS[task].moving),
            )


def _find_files(folder: Path) -> Dict[str, Path]:
    """Map each :data:`CASE_FILES` stem present in ``folder`` to its file; refuse ambiguous stems."""
    found: Dict[str, List[Path]] = {}
    for p in sorted(folder.iterdir()):
        if not p.is_file():
            continue
        name = p.name.lower()
        for ext in IMAGE_EXTENSIONS:
            if name.endswith(ext):
                stem = name[: -len(ext)]
                if stem in CASE_FILES:
                    found.setdefault(stem, []).append(p)
                break
    ambiguous = {s: ps for s, ps in found.items() if len(ps) > 1}
    if ambiguous:
        desc = "; ".join(f"{s}: {', '.join(p.name for p in ps)}" for s, ps in ambiguous.items())
        raise DatasetError(f"case folder {folder} holds several files for one role ({desc}); keep one per role")
    if "labels" in found and "reference_labels" in found:
        raise DatasetError(f"case folder {folder} has both labels.* and reference_labels.*; keep one of them")
    return {s: ps[0] for s, ps in found.items()}


def _is_case_folder(folder: Path) -> bool:
    files = _find_files(folder)
    return "reference" in files and "moving" in files


def folder_cases(root: Union[str, Path]) -> List[BenchCase]:
    """Discover and load the user pairs under ``root`` (layout in the module docstring).

    Case folders are the direct sub-folders of ``root`` holding ``reference.*`` and ``moving.*`` (or ``root``
    itself when it holds them). Sub-folders without both files are skipped; if none qualifies, a
    :class:`~unifuse.errors.DatasetError` explains the expected layout. When a case has reference labels and a
    truth displacement but no moving labels, the moving labels are derived with :func:`moving_pose_labels`.

    Returns:
        the cases, sorted by folder name, with ``task = "pairs"``.
    """
    base = Path(root)
    if not base.is_dir():
        raise DatasetError(f"--pairs folder {base} does not exist or is not a folder")
    folders = [base] if _is_case_folder(base) else [p for p in sorted(base.iterdir()) if p.is_dir() and _is_case_folder(p)]
    if not folders:
        raise DatasetError(
            f"no case found under {base}: expected {base}/<case>/reference.<ext> and {base}/<case>/moving.<ext> "
            f"(ext one of {', '.join(IMAGE_EXTENSIONS)}), optionally truth_displacement, truth_moving_aligned_clean, "
            "reference_labels (or labels) and moving_labels in the same folder"
        )
    cases: List[BenchCase] = []
    for folder in folders:
        files = _find_files(folder)
        loaded: Dict[str, Optional[sitk.Image]] = {attr: None for attr in set(CASE_FILES.values())}
        for stem, path in files.items():
            loaded[CASE_FILES[stem]] = read_image(path)
        reference, moving = loaded["reference"], loaded["moving"]
        _check_on_reference_grid(folder, reference, loaded)
        for attr in ("reference_labels", "moving_labels"):
            if loaded[attr] is not None:
                loaded[attr] = _as_labels(loaded[attr], folder / files[next(s for s in files if CASE_FILES[s] == attr)].name)
        if loaded["moving_labels"] is not None and loaded["moving_labels"].GetSize() != moving.GetSize():
            raise DatasetError(f"{folder}: moving_labels has size {loaded['moving_labels'].GetSize()} but moving has "
                               f"{moving.GetSize()}; the moving labels must be on the moving volume's grid")
        if (loaded["moving_labels"] is None and loaded["reference_labels"] is not None
                and loaded["truth_displacement"] is not None):
            loaded["moving_labels"] = moving_pose_labels(loaded["reference_labels"], loaded["truth_displacement"], moving)
        cases.append(BenchCase(
            name=folder.name or str(folder), task="pairs", reference=reference, moving=moving, degradation=None,
            truth_aligned=loaded["truth_aligned"], truth_displacement=loaded["truth_displacement"],
            reference_labels=loaded["reference_labels"], moving_labels=loaded["moving_labels"],
        ))
    return cases


def _check_on_reference_grid(folder: Path, reference: sitk.Image, loaded: Dict[str, Optional[sitk.Image]]) -> None:
    """Truth volumes and reference labels must share the reference grid (size, spacing, origin, direction)."""
    for attr in ("truth_aligned", "truth_displacement", "reference_labels"):
        img = loaded[attr]
        if img is None:
            continue
        if not geometry.on_same_grid(img, reference):
            raise DatasetError(f"{folder}: {attr} is not on the reference grid (size {img.GetSize()} vs "
                               f"{reference.GetSize()}); resample it onto reference's grid")
    field = loaded["truth_displacement"]
    if field is not None:
        if field.GetNumberOfComponentsPerPixel() != 3:
            raise DatasetError(f"{folder}: truth_displacement must be a 3-component displacement field (LPS mm); "
                               f"it has {field.GetNumberOfComponentsPerPixel()} component(s)")
        loaded["truth_displacement"] = sitk.Cast(field, sitk.sitkVectorFloat64)


def _as_labels(image: sitk.Image, path_name: str) -> sitk.Image:
    arr = sitk.GetArrayViewFromImage(image)
    if image.GetNumberOfComponentsPerPixel() != 1 or not np.all(np.mod(arr, 1) == 0) or arr.min() < 0 or arr.max() > 255:
        raise DatasetError(f"{path_name} must be an integer label volume with labels 0..255 (0 = background)")
    return sitk.Cast(image, sitk.sitkUInt8)


def _read_case_json(folder: Path) -> Dict[str, Any]:
    """The ``case.json`` of a real case folder, its ``category`` checked."""
    path = folder / CASE_JSON
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{folder} has no {CASE_JSON}; real cases need one (written by `unifuse data real`) — "
                           "regenerate the cache") from None
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path} is not valid JSON ({exc}); regenerate the cache with `unifuse data real`") from None
    _check_category(path, info)
    return info


def _check_category(path: Path, info: Any) -> None:
    if not isinstance(info, dict) or info.get("category") not in REAL_CATEGORIES:
        got = info.get("category") if isinstance(info, dict) else info
        raise DatasetError(f"{path}: category must be one of {', '.join(REAL_CATEGORIES)}; got {got!r}")


def _info(record: Dict[str, Any]) -> Dict[str, Any]:
    """The fields of a ``case.json`` record the benchmark reports (``degradation`` as its name)."""
    degradation = record.get("degradation")
    if isinstance(degradation, dict):
        degradation = degradation.get("name")
    return {"category": record.get("category"), "subject": record.get("subject"), "body_part": record.get("body_part"),
            "degradation": degradation, "kind": record.get("kind")}


def _as_real_case(case: BenchCase, record: Dict[str, Any]) -> BenchCase:
    """``case`` with ``task`` = its category and ``info`` = the reported fields of its ``case.json``."""
    info = _info(record)
    moving = record.get("moving")
    modality = moving.get("modality") if isinstance(moving, dict) else None
    return replace(case, task=str(info["category"]), degradation=case.degradation or info["degradation"], info=info,
                   moving_modality=modality if modality in ("ct", "mr", "pet") else None)


def real_cases(cache: Union[str, Path], split: str = "validation") -> List[BenchCase]:
    """The real-anatomy cases of ``split`` in the cache of ``unifuse data real`` (layout in the module docstring).

    A cache with its ``manifest.json`` is read through :func:`unifuse.data.real.load_real_cases`; case folders
    without one (e.g. hand-made ones) are read here with :func:`folder_cases` and each ``case.json``.

    Returns:
        the cases sorted by folder name; ``task`` = category (``full`` / ``partial``), ``info`` = category,
        subject, body_part, degradation and kind from case.json.

    Raises:
        DatasetError: the cache or split folder is missing (run ``unifuse data real``), or a case.json is bad.
    """
    root = Path(cache) / "cases" / split
    if not root.is_dir():
        raise DatasetError(f"no real cases at {root}; create them with `unifuse data real` (or `make bench-real`), "
                           "or pass --cache DIR")
    if (Path(cache) / "manifest.json").is_file():
        from ..data.real import load_real_cases

        loaded = load_real_cases(cache, split=split)
        for item in loaded:
            _check_category(root / item.case.name / CASE_JSON, item.info)
        cases = [_as_real_case(item.case, item.info) for item in loaded]
    else:
        cases = [_as_real_case(c, _read_case_json(root / c.name)) for c in folder_cases(root)]
    return sorted(cases, key=lambda c: c.name)
