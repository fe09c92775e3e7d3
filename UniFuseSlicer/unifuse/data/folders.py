"""Datasets of the paper on disk (BraTS2020, SynthRAD2023 Task 1, FDG-PET/CT), as training/evaluation pairs.

The real pairs are already aligned (BraTS co-registered, SynthRAD registered, PET/CT from one scanner), so
:class:`FolderPairs` turns each into a sample exactly as :class:`~unifuse.data.synthetic.SyntheticPairs`
does: resample both volumes onto the reference's isotropic S³ working grid
(:func:`unifuse.geometry.working_grid`), misalign the moving volume with a random field of known inverse,
degrade it in its physical units, normalise, and return the same dict (:func:`~unifuse.data.synthetic.
to_tensors`).

Accepted layouts (``root`` may be the folder shown or any parent up to three levels above the case
folders; ``.nii.gz`` or ``.nii``):

``brats2020`` (reference T1, moving T2, degradation ``motion``)::

    root/BraTS20_Training_001/BraTS20_Training_001_t1.nii.gz      (also _t1ce, _t2, _flair)
    root/BraTS20_Training_001/BraTS20_Training_001_seg.nii.gz     (optional: tumour labels 1, 2, 4)
    (BraTS20_Validation_XXX folders, which have no seg, are accepted too)

``synthrad2023`` (Task 1; reference MR, moving CT in HU, degradation ``metal``)::

    root/1BA001/mr.nii.gz  ct.nii.gz  mask.nii.gz                 (brain: 1B…; pelvis: 1P…; A/B/C = centre)
    e.g. root = Task1/ holding brain/1BA001 … and pelvis/1PA001 …; ``region`` selects brain or pelvis

``fdg-petct`` (TCIA FDG-PET-CT-Lesions converted to NIfTI as distributed for autoPET; reference CT,
moving PET, degradation ``lowdose``)::

    root/PETCT_0011f3deaf/<study folder, e.g. 03-23-2003-NA-PET-CT Ganzkoerper …>/
        CTres.nii.gz   CT resampled to the PET grid (HU)            [required]
        SUV.nii.gz     PET in SUV units (preferred), or PET.nii.gz  [one required]
        SEG.nii.gz     lesion mask                                  [optional]

Each study folder is one case. Labels for Dice: the dataset's segmentation (BraTS seg, SynthRAD mask,
FDG SEG) when present, else the reference's foreground mask (:func:`unifuse.intensity.foreground_mask`).

Splits are assigned per subject by a hash of (split_seed, subject id) with ``fractions`` (default
70/10/20 %), so a case never changes split when cases are added or removed and all studies of one patient
(FDG-PET/CT: ``PETCT_…/<study>``) fall in the same split; for BraTS and SynthRAD the subject is the case.
``split="all"`` uses every case.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
import torch
from torch.utils.data import Dataset

from .. import geometry
from ..errors import DatasetError
from ..intensity import foreground_mask
from ..io import read_image
from .degradations import DEGRADATIONS
from .synthetic import SampleArrays, misalign_and_degrade, to_tensors

__all__ = ["Layout", "LAYOUTS", "Case", "discover_cases", "split_of", "subject_of", "FolderPairs"]

PathLike = Union[str, Path]
_NIFTI = (".nii.gz", ".nii")
_MAX_DEPTH = 3


@dataclass(frozen=True)
class Layout:
    """A dataset layout: how cases are found and which files form the pair.

    Attributes:
        name: layout key.
        reference, moving: roles' file keys in :attr:`Case.files`.
        reference_modality, moving_modality: ``mr``, ``ct`` or ``pet`` (background value, normalisation).
        degradation: default degradation of the moving volume.
        description: the expected folder structure, shown in error messages.
    """

    name: str
    reference: str
    moving: str
    reference_modality: str
    moving_modality: str
    degradation: str
    description: str


@dataclass(frozen=True)
class Case:
    """One aligned pair on disk: ``case_id`` and its files by key (``reference``, ``moving``, ``labels``)."""

    case_id: str
    files: Dict[str, Path] = field(default_factory=dict)

    @property
    def subject(self) -> str:
        """The person the case belongs to: the case id up to its first ``/`` (FDG-PET/CT: the ``PETCT_…``
        patient of a study; BraTS and SynthRAD: the case id). Splits are assigned per subject."""
        return subject_of(self.case_id)


def subject_of(case_id: str) -> str:
    """Subject of a case id: the part before the first ``/`` (``PETCT_0011f3deaf/03-23-2003-…`` ->
    ``PETCT_0011f3deaf``), the whole id when it has none."""
    return case_id.split("/", 1)[0]


def _nifti(folder: Path, stem: str) -> Optional[Path]:
    for ext in _NIFTI:
        p = folder / f"{stem}{ext}"
        if p.is_file():
            return p
    return None


def _folders(root: Path, pattern: "re.Pattern[str]") -> List[Path]:
    """Directories whose name matches ``pattern`` at depth 0..:data:`_MAX_DEPTH` below root (sorted)."""
    found, frontier = [], [root]
    for _ in range(_MAX_DEPTH + 1):
        nxt = []
        for d in frontier:
            if pattern.match(d.name) and d != root:
                found.append(d)
                continue
            try:
                nxt.extend(sorted(c for c in d.iterdir() if c.is_dir() and not c.name.startswith(".")))
            except OSError:
                continue
        frontier = nxt
    if pattern.match(root.name):
        found.append(root)
    return sorted(set(found))


def _brats(root: Path, reference: str, moving: str, **_: object) -> Tuple[List[Case], List[str]]:
    cases, problems = [], []
    for d in _folders(root, re.compile(r"^BraTS20_(Training|Validation)_\d{3}$")):
        ref, mov = _nifti(d, f"{d.name}_{reference}"), _nifti(d, f"{d.name}_{moving}")
        if ref is None or mov is None:
            problems.append(f"{d.name}: missing {d.name}_{reference if ref is None else moving}.nii.gz")
            continue
        files = {"reference": ref, "moving": mov}
        seg = _nifti(d, f"{d.name}_seg")
        if seg is not None:
            files["labels"] = seg
        cases.append(Case(d.name, files))
    return cases, problems


def _synthrad(root: Path, region: Optional[str] = None, **_: object) -> Tuple[List[Case], List[str]]:
    letter = {"brain": "B", "pelvis": "P", None: "[BP]"}.get(region)
    if letter is None:
        raise DatasetError(f"unknown SynthRAD2023 region {region!r}; use 'brain', 'pelvis' or None (both)")
    cases, problems = [], []
    for d in _folders(root, re.compile(rf"^1{letter}[ABC]\d{{3}}$")):
        mr, ct = _nifti(d, "mr"), _nifti(d, "ct")
        if mr is None or ct is None:
            problems.append(f"{d.name}: missing {'mr' if mr is None else 'ct'}.nii.gz")
            continue
        files = {"reference": mr, "moving": ct}
        mask = _nifti(d, "mask")
        if mask is not None:
            files["labels"] = mask
        cases.append(Case(d.name, files))
    return cases, problems


def _fdg(root: Path, **_: object) -> Tuple[List[Case], List[str]]:
    cases, problems = [], []
    for patient in _folders(root, re.compile(r"^PETCT_[0-9A-Za-z]+$")):
        studies = sorted(c for c in patient.iterdir() if c.is_dir() and not c.name.startswith("."))
        if not studies:
            problems.append(f"{patient.name}: no study folder inside")
        for study in studies:
            ct = _nifti(study, "CTres")
            pet = _nifti(study, "SUV") or _nifti(study, "PET")
            if ct is None or pet is None:
                problems.append(f"{patient.name}/{study.name}: missing {'CTres' if ct is None else 'SUV/PET'}.nii.gz")
                continue
            files = {"reference": ct, "moving": pet}
            seg = _nifti(study, "SEG")
            if seg is not None:
                files["labels"] = seg
            cases.append(Case(f"{patient.name}/{study.name}", files))
    return cases, problems


#: The accepted layouts (see the module docstring).
LAYOUTS: Dict[str, Layout] = {
    "brats2020": Layout("brats2020", "reference", "moving", "mr", "mr", "motion",
                        "root/BraTS20_Training_001/BraTS20_Training_001_{t1,t2,seg}.nii.gz"),
    "synthrad2023": Layout("synthrad2023", "reference", "moving", "mr", "ct", "metal",
                           "root/[brain|pelvis]/1BA001/{mr,ct,mask}.nii.gz"),
    "fdg-petct": Layout("fdg-petct", "reference", "moving", "ct", "pet", "lowdose",
                        "root/PETCT_xxxxxxxxxx/<study>/{CTres,SUV or PET,SEG}.nii.gz"),
}
_DISCOVER: Dict[str, Callable[..., Tuple[List[Case], List[str]]]] = {
    "brats2020": _brats,
    "synthrad2023": _synthrad,
    "fdg-petct": _fdg,
}


def discover_cases(root: PathLike, layout: str, **options: object) -> Tuple[List[Case], List[str]]:
    """Find the cases of ``layout`` under ``root``.

    Args:
        root: dataset folder.
        layout: a :data:`LAYOUTS` key.
        options: ``reference``/``moving`` modality suffixes for BraTS (default ``t1``/``t2``), ``region``
            for SynthRAD2023 (``brain``, ``pelvis`` or None).

    Returns:
        (cases sorted by id, problems: human-readable notes on case folders skipped for missing files).

    Raises:
        DatasetError: unknown layout, missing root, or no complete case found (the message shows the
            expected layout and the first problems met).
    """
    if layout not in LAYOUTS:
        raise DatasetError(f"unknown dataset layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetError(f"dataset root '{path}' does not exist or is not a folder; pass the folder that holds "
                           f"the {layout} case folders ({LAYOUTS[layout].description})")
    if layout == "brats2020":
        options = {"reference": "t1", "moving": "t2", **options}
    cases, problems = _DISCOVER[layout](path, **options)
    if not cases:
        detail = f" Skipped: {'; '.join(problems[:3])}." if problems else ""
        raise DatasetError(f"no {layout} case found under '{path}'; expected {LAYOUTS[layout].description} "
                           f"(case folders at most {_MAX_DEPTH} levels below the root).{detail}")
    return sorted(cases, key=lambda c: c.case_id), problems


def split_of(case_id: str, fractions: Sequence[float] = (0.7, 0.1, 0.2), seed: int = 0) -> str:
    """Split of a case: ``"train"``, ``"val"`` or ``"test"`` from a hash of (seed, case id) and ``fractions``
    (train, val, test; normalised). Stable: independent of the other cases and of file order."""
    f = np.asarray(fractions, dtype=np.float64)
    if f.shape != (3,) or np.any(f < 0) or f.sum() <= 0:
        raise ValueError(f"fractions must be three non-negative numbers (train, val, test); got {fractions}")
    f = np.cumsum(f / f.sum())
    digest = hashlib.sha256(f"{int(seed)}:{case_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    return ("train", "val", "test")[int(np.searchsorted(f, u, side="right").clip(0, 2))]


def _case_key(case_id: str) -> int:
    return int.from_bytes(hashlib.sha256(case_id.encode()).digest()[:4], "big")


class FolderPairs(Dataset):
    """Real aligned pairs from a dataset folder, misaligned and degraded like :class:`SyntheticPairs`.

    ``dataset[i]`` uses case ``i % n_cases`` with repeat ``r = i // n_cases``; its random draws (misalignment,
    degradation, none-or-degraded) come from ``SeedSequence(seed, spawn_key=(split id, hash(case id), r,
    purpose))``, so they depend on the case, not on its position in the listing.

    Args:
        root: dataset folder (see the module docstring for the accepted layouts).
        layout: ``"brats2020"``, ``"synthrad2023"`` or ``"fdg-petct"``.
        size: S, working-grid edge (isotropic, covering the reference's field of view).
        degradation: ``None`` = the layout's degradation, used with probability ``1 - none_fraction``;
            a name from :data:`DEGRADATIONS` = always that one.
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"``.
        seed: seed of the random draws.
        split_seed: seed of the case-to-split hash.
        fractions: (train, val, test) fractions of cases.
        none_fraction: probability of leaving the moving volume undegraded when ``degradation`` is None.
        repeats: each case appears this many times (with different draws) per pass.
        length: number of samples (default ``len(cases) × repeats``); sample i is still case ``i % n_cases``,
            repeat ``i // n_cases``, so a length above ``len(cases)`` gives every visit of a case new draws.
        max_rot_deg, max_trans_mm, nonrigid_mm: misalignment bounds.
        options: layout options (BraTS ``reference``/``moving`` suffixes, SynthRAD ``region``).

    Attributes:
        cases: the cases of this split. skipped: problems met while discovering (incomplete folders).
    """

    def __init__(
        self,
        root: PathLike,
        layout: str,
        size: int = 64,
        degradation: Optional[str] = None,
        split: str = "train",
        seed: int = 0,
        split_seed: int = 0,
        fractions: Sequence[float] = (0.7, 0.1, 0.2),
        none_fraction: float = 0.25,
        repeats: int = 1,
        length: Optional[int] = None,
        max_rot_deg: float = 10.0,
        max_trans_mm: float = 10.0,
        nonrigid_mm: float = 4.0,
        **options: object,
    ) -> None:
        if split not in ("train", "val", "test", "all"):
            raise ValueError(f"unknown split {split!r}; use train, val, test or all")
        if degradation is not None and degradation not in DEGRADATIONS:
            raise ValueError(f"unknown degradation {degradation!r}; use one of {', '.join(DEGRADATIONS)}")
        if not 0.0 <= float(none_fraction) <= 1.0:
            raise ValueError(f"none_fraction must be in [0, 1]; got {none_fraction}")
        if int(size) < 8 or int(repeats) < 1:
            raise ValueError(f"size must be >= 8 and repeats >= 1; got size={size}, repeats={repeats}")
        if length is not None and int(length) < 1:
            raise ValueError(f"length must be >= 1 or None; got {length}")
        all_cases, self.skipped = discover_cases(root, layout, **options)
        self.layout = LAYOUTS[layout]
        self.split = split
        self.cases = [c for c in all_cases if split == "all" or split_of(c.subject, fractions, split_seed) == split]
        if not self.cases:
            raise DatasetError(f"the {split} split of '{root}' is empty ({len(all_cases)} cases in total, "
                               f"fractions {tuple(fractions)}); use split='all' or other fractions")
        self.size = int(size)
        self.degradation = degradation
        self.seed = int(seed)
        self.none_fraction = float(none_fraction)
        self.repeats = int(repeats)
        self.length = len(self.cases) * self.repeats if length is None else int(length)
        self.misalignment = {"max_rot_deg": float(max_rot_deg), "max_trans_mm": float(max_trans_mm),
                             "nonrigid_mm": float(nonrigid_mm)}
        self._split_id = ("train", "val", "test", "all").index(split)

    def __len__(self) -> int:
        return self.length

    def _rng(self, case: Case, repeat: int, purpose: int) -> np.random.Generator:
        key = (self._split_id, _case_key(case.case_id), int(repeat), int(purpose))
        return np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=key))

    def load_aligned(self, case: Case) -> Tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """The case's reference, moving and labels on the S³ working grid (physical units, (z, y, x)) and
        the grid spacing (mm). The moving volume and labels are resampled by their header geometry."""
        reference = read_image(case.files["reference"])
        moving = read_image(case.files["moving"])
        for role, img in (("reference", reference), ("moving", moving)):
            if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
                raise DatasetError(f"{case.case_id}: the {role} file {case.files[role]} is not a 3D scalar volume")
        grid = geometry.working_grid(reference, self.size)
        ref_bg = -1000.0 if self.layout.reference_modality == "ct" else 0.0
        mov_bg = -1000.0 if self.layout.moving_modality == "ct" else 0.0
        ref = sitk.GetArrayFromImage(geometry.resample(reference, grid, default=ref_bg))
        mov = sitk.GetArrayFromImage(geometry.resample(moving, grid, default=mov_bg))
        if "labels" in case.files:
            label_img = read_image(case.files["labels"])
        else:
            label_img = foreground_mask(reference)
        labels = sitk.GetArrayFromImage(geometry.resample(label_img, grid, interpolator="nearest", default=0.0))
        return ref, mov, np.rint(labels).astype(np.int64), float(grid.GetSpacing()[0])

    def sample_arrays(self, index: int) -> SampleArrays:
        """Sample ``index`` in physical units (before normalisation)."""
        if not 0 <= int(index) < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} samples")
        case = self.cases[int(index) % len(self.cases)]
        repeat = int(index) // len(self.cases)
        if self.degradation is not None:
            degradation = self.degradation
        else:
            coin = self._rng(case, repeat, 0).random()
            degradation = "none" if coin < self.none_fraction else self.layout.degradation
        ref, mov, labels, spacing = self.load_aligned(case)
        rngs = {"misalignment": self._rng(case, repeat, 1), "degradation": self._rng(case, repeat, 2)}
        return misalign_and_degrade(
            ref, mov, labels, rngs,
            reference_modality=self.layout.reference_modality, moving_modality=self.layout.moving_modality,
            degradation=degradation, spacing_mm=spacing, task=f"{self.layout.name}:{case.case_id}",
            misalignment=self.misalignment,
        )

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        return to_tensors(self.sample_arrays(index), task_id=-1)
