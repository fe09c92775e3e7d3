"""Synthetic training/evaluation pairs and the demo case (paper §4.1 tasks, synthesised offline).

A sample is made in physical units on the isotropic S³ anatomy grid (:func:`unifuse.data.anatomy.
template_grid`), then normalised:

1. **anatomy**: the MNI template deformed by a random diffeomorphism (:func:`~unifuse.data.anatomy.
   deform_anatomy`) or, for training only, a random label-map subject (:func:`~unifuse.data.anatomy.
   random_subject`);
2. **modalities**: the reference R and the other modality D, both clean and aligned, from the same tissue
   maps (:mod:`unifuse.data.modalities`); for training, MR images are sometimes replaced by a random
   SynthMorph contrast (domain randomisation);
3. **misalignment** (:func:`~unifuse.data.deformations.random_misalignment`): forward field v and its
   inverse u_gt; ``D_fine = warp(D, v)`` (the clean moving volume in the moving pose) and
   ``R' = warp(R, v)``;
4. **degradation** of D_fine in the moving pose (an acquisition artefact): ``D' = degrade(D_fine)``;
5. **normalisation** to [0, 1] with the pipeline's rule (:func:`unifuse.intensity.normalize_image`:
   percentiles 0.5–99.5 of the nonzero voxels for MR/PET, the fixed [-1000, 2000] HU window for CT).
   Each image is normalised by its own rule, as the pipeline would see it, except that R' uses R's
   mapping and D, D_fine use D's mapping (they are the same acquisition).

Splits and held-out anatomy: every sample is a pure function of (seed, split, index). Its random stream is
``SeedSequence(seed, spawn_key=(split_id, index, purpose))`` with split ids train 0, val 1, test 2 (and the
demo 3): streams of different splits are independent by construction, so no anatomy deformation, label
map, contrast, misalignment or degradation draw is shared between splits. Validation and test subjects
are always deformed templates (the brain-like case that is evaluated); random label-map subjects and random
contrasts are training-only domain randomisation. The template is symmetric, so left-right flips are not
used (they would not give a new brain). Real held-out anatomy needs real data (:mod:`unifuse.data.folders`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
import torch
from torch.utils.data import Dataset

from .. import geometry
from ..intensity import IntensityNormalization, normalize_image
from .anatomy import Tissues, deform_anatomy, load_mni_tissues, random_subject
from .deformations import Misalignment, random_misalignment, warp_array
from .degradations import apply_degradation, degradation_id
from .modalities import MR_KINDS, random_contrast, synthesize

__all__ = [
    "Task",
    "TASKS",
    "SPLITS",
    "SampleArrays",
    "misalign_and_degrade",
    "synthesize_pair",
    "to_tensors",
    "normalisation_modality",
    "SyntheticPairs",
    "DemoCase",
    "make_demo_case",
]


@dataclass(frozen=True)
class Task:
    """A fusion task of the paper: reference modality, moving modality and the moving's degradation."""

    name: str
    reference: str
    moving: str
    degradation: str


#: The paper's three tasks (§4.1). ``mr`` is synthesised as T1-weighted (SynthRAD2023's MR is T1w).
TASKS: Dict[str, Task] = {
    "t1-t2-motion": Task("t1-t2-motion", "t1", "t2", "motion"),
    "mr-ct-metal": Task("mr-ct-metal", "mr", "ct", "metal"),
    "ct-pet-lowdose": Task("ct-pet-lowdose", "ct", "pet", "lowdose"),
}
#: Dataset splits, index = split id of the random streams.
SPLITS: Tuple[str, ...] = ("train", "val", "test")
_DEMO_SPLIT_ID = 3
_PURPOSE = {"anatomy": 0, "task": 1, "reference": 2, "moving": 3, "misalignment": 4, "degradation": 5, "grid": 6}


def _modality(name: str) -> str:
    """Synthesis modality of a task modality name (``mr`` -> ``t1``)."""
    return "t1" if name == "mr" else name


def normalisation_modality(name: str) -> str:
    """Modality argument of :func:`unifuse.intensity.normalize_image` for a task modality name."""
    if name in MR_KINDS or name == "mr":
        return "mr"
    if name in ("ct", "pet"):
        return name
    raise ValueError(f"unknown modality {name!r}")


def _background(name: str) -> float:
    """Value outside the anatomy in a modality's physical units (air: -1000 HU for CT, 0 otherwise)."""
    return -1000.0 if name == "ct" else 0.0


def _stream(seed: int, split_id: int, index: int, purpose: str) -> np.random.Generator:
    ss = np.random.SeedSequence(int(seed), spawn_key=(int(split_id), int(index), _PURPOSE[purpose]))
    return np.random.default_rng(ss)


@dataclass(frozen=True, eq=False)
class SampleArrays:
    """One synthetic pair in physical units on the anatomy grid (numpy, (z, y, x), float32 unless noted).

    Attributes:
        task, degradation: names (see :data:`TASKS`, :data:`~unifuse.data.degradations.DEGRADATIONS`).
        reference_modality, moving_modality: modality names of R and D (``t1``, ``t2``, ``ct``, ``pet``, …).
        reference: R, clean reference (reference pose).
        moving_clean_aligned: D, clean other modality aligned with R (the label I_D).
        moving_clean: D_fine = warp(D, v), clean other modality in the moving pose.
        moving: D' = degradation(D_fine), the network's moving input.
        reference_moved: R' = warp(R, v) (the label I'_R of L_moda).
        misalignment: v (forward) and u_gt (inverse) fields, voxels, (x, y, z).
        labels_reference: int64 labels of the reference pose (0 = background; tissue classes for synthetic
            data, the dataset's segmentation for folders).
        labels: int64 labels of the moving pose (argmax of the tissue maps warped by v, or the reference
            labels warped nearest-neighbour).
        spacing_mm: isotropic grid spacing.
    """

    task: str
    degradation: str
    reference_modality: str
    moving_modality: str
    reference: np.ndarray
    moving_clean_aligned: np.ndarray
    moving_clean: np.ndarray
    moving: np.ndarray
    reference_moved: np.ndarray
    misalignment: Misalignment
    labels_reference: np.ndarray
    labels: np.ndarray
    spacing_mm: float


def misalign_and_degrade(
    reference: np.ndarray,
    moving_aligned: np.ndarray,
    labels_reference: np.ndarray,
    rngs: Mapping[str, np.random.Generator],
    reference_modality: str,
    moving_modality: str,
    degradation: str,
    spacing_mm: float,
    task: str = "",
    misalignment: Optional[Mapping[str, float]] = None,
    tissue_stack: Optional[np.ndarray] = None,
) -> SampleArrays:
    """Steps 3–4 of the module docstring for an aligned pair in physical units on an isotropic grid.

    Args:
        reference, moving_aligned: (z, y, x) clean, aligned volumes (HU for CT, activity for PET).
        labels_reference: integer (z, y, x) labels of the reference pose (0 = background).
        rngs: generators for ``"misalignment"`` and ``"degradation"``.
        reference_modality, moving_modality: modality names (``t1``, ``t2``, ``mr``, ``ct``, ``pet``, …);
            they set the background value outside the grid (-1000 HU for CT, 0 otherwise) and the
            normalisation rule of :func:`to_tensors`.
        degradation: one of :data:`~unifuse.data.degradations.DEGRADATIONS`.
        spacing_mm: isotropic grid spacing (mm).
        task: task name recorded in the sample.
        misalignment: keyword arguments of :func:`random_misalignment` (``max_rot_deg``, ``max_trans_mm``,
            ``nonrigid_mm``, ``control_points``).
        tissue_stack: optional (T, z, y, x) soft tissue maps (background first); if given, the moving-pose
            labels are the argmax of the maps warped trilinearly, otherwise the labels warped
            nearest-neighbour.
    """
    degradation_id(degradation)  # validates the name
    shape = tuple(reference.shape)
    if tuple(moving_aligned.shape) != shape or tuple(labels_reference.shape) != shape:
        raise ValueError(f"reference {shape}, moving {moving_aligned.shape} and labels {labels_reference.shape} "
                         "must share one grid")
    mis = random_misalignment(shape, rngs["misalignment"], spacing_mm=spacing_mm, **dict(misalignment or {}))
    moving_clean = warp_array(moving_aligned, mis.forward, background=_background(moving_modality))
    reference_moved = warp_array(reference, mis.forward, background=_background(reference_modality))
    if tissue_stack is not None:
        moved = warp_array(tissue_stack[1:], mis.forward, background=0.0)
        labels_moving = np.where(moved.max(axis=0) > 1.0 - moved.sum(axis=0), np.argmax(moved, axis=0) + 1, 0)
    else:
        labels_moving = np.rint(warp_array(labels_reference.astype(np.float32), mis.forward, mode="nearest"))
    moving = apply_degradation(degradation, moving_clean, rngs["degradation"], spacing_mm=spacing_mm)
    return SampleArrays(
        task=task,
        degradation=degradation,
        reference_modality=reference_modality,
        moving_modality=moving_modality,
        reference=np.asarray(reference, dtype=np.float32),
        moving_clean_aligned=np.asarray(moving_aligned, dtype=np.float32),
        moving_clean=moving_clean,
        moving=moving,
        reference_moved=reference_moved,
        misalignment=mis,
        labels_reference=np.asarray(labels_reference).astype(np.int64),
        labels=labels_moving.astype(np.int64),
        spacing_mm=float(spacing_mm),
    )


def synthesize_pair(
    tissues: Tissues,
    task: Union[str, Task],
    degradation: Optional[str],
    rngs: Mapping[str, np.random.Generator],
    misalignment: Optional[Mapping[str, float]] = None,
    random_contrast_probability: float = 0.0,
) -> SampleArrays:
    """Synthesise one pair in physical units from tissue maps (steps 2–4 of the module docstring).

    Args:
        tissues: subject anatomy on an isotropic grid.
        task: a :data:`TASKS` key or :class:`Task`.
        degradation: degradation applied to the moving volume (``None`` = the task's own).
        rngs: generators for ``"reference"``, ``"moving"``, ``"misalignment"`` and ``"degradation"``
            (separate streams, so e.g. changing the degradation does not change the anatomy or contrasts).
        misalignment: keyword arguments of :func:`random_misalignment`; ``spacing_mm`` is the grid's.
        random_contrast_probability: chance that an MR image is replaced by a random contrast of the
            subject's labels (SynthMorph domain randomisation; training only).
    """
    t = TASKS[task] if isinstance(task, str) else task
    deg = t.degradation if degradation is None else degradation
    degradation_id(deg)

    def make(name: str, rng: np.random.Generator) -> np.ndarray:
        kind = _modality(name)
        if kind in MR_KINDS and random_contrast_probability > 0 and rng.random() < random_contrast_probability:
            parcels = tissues.parcels if tissues.parcels is not None else tissues.labels().astype(np.int32)
            return random_contrast(parcels, rng) * np.float32(1000.0)
        return synthesize(tissues, kind, rng)

    reference = make(t.reference, rngs["reference"])
    moving_aligned = make(t.moving, rngs["moving"])
    return misalign_and_degrade(
        reference, moving_aligned, tissues.labels(), rngs,
        reference_modality=_modality(t.reference), moving_modality=_modality(t.moving), degradation=deg,
        spacing_mm=tissues.spacing_mm, task=t.name, misalignment=misalignment, tissue_stack=tissues.stack(),
    )


def _normalise(array: np.ndarray, modality: str) -> Tuple[np.ndarray, IntensityNormalization]:
    return normalize_image(sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32)),
                           normalisation_modality(modality))


def to_tensors(sample: SampleArrays, task_id: int = -1) -> Dict[str, torch.Tensor]:
    """Normalise a :class:`SampleArrays` (step 5) and return the training dict.

    Keys (float32 unless noted; S = grid edge):

    * ``reference`` (1, S, S, S): R; ``moving`` (1, S, S, S): D' (degraded, misaligned);
    * ``moving_clean`` (1, S, S, S): D_fine, the clean moving volume in the moving pose
      (``warp(moving_clean, field) ≈ moving_clean_aligned``);
    * ``moving_clean_aligned`` (1, S, S, S): I_D, the clean moving modality aligned with R (exact label);
    * ``reference_moved`` (1, S, S, S): I'_R = R in the moving pose;
    * ``field`` (3, S, S, S): u_gt, pull-back, voxels, channels (x, y, z), aligns the moving pose to R;
    * ``degradation`` (long scalar): class id; ``task`` (long scalar): index in :data:`TASKS` (-1 unknown);
    * ``labels`` (S, S, S) long: tissue labels in the moving pose (0 background, 1 CSF, 2 GM, 3 WM,
      4 bone, 5 scalp); ``labels_reference`` (S, S, S) long: the same in the reference pose;
    * ``spacing`` (float32 scalar): grid spacing in mm.
    """
    ref, ref_norm = _normalise(sample.reference, sample.reference_modality)
    moving, _ = _normalise(sample.moving, sample.moving_modality)
    clean_aligned, clean_norm = _normalise(sample.moving_clean_aligned, sample.moving_modality)

    def vol(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None]

    return {
        "reference": vol(ref),
        "moving": vol(moving),
        "moving_clean": vol(clean_norm.apply(sample.moving_clean)),
        "moving_clean_aligned": vol(clean_aligned),
        "reference_moved": vol(ref_norm.apply(sample.reference_moved)),
        "field": torch.from_numpy(np.ascontiguousarray(sample.misalignment.inverse, dtype=np.float32)),
        "degradation": torch.tensor(degradation_id(sample.degradation), dtype=torch.long),
        "task": torch.tensor(int(task_id), dtype=torch.long),
        "labels": torch.from_numpy(sample.labels.astype(np.int64)),
        "labels_reference": torch.from_numpy(sample.labels_reference.astype(np.int64)),
        "spacing": torch.tensor(float(sample.spacing_mm), dtype=torch.float32),
    }


def _task_weights(tasks: Optional[Union[Mapping[str, float], Sequence[str]]]) -> Tuple[Tuple[str, ...], np.ndarray]:
    if tasks is None:
        names, weights = tuple(TASKS), np.ones(len(TASKS))
    elif isinstance(tasks, Mapping):
        names, weights = tuple(tasks), np.asarray([float(tasks[n]) for n in tasks])
    else:
        names = tuple(tasks)
        weights = np.ones(len(names))
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise ValueError(f"unknown or empty task list {list(names)}; choose from {', '.join(TASKS)}")
    if np.any(weights < 0) or not np.isfinite(weights).all() or weights.sum() <= 0:
        raise ValueError(f"task weights must be non-negative and not all zero; got {weights.tolist()}")
    return names, weights / weights.sum()


class SyntheticPairs(Dataset):
    """Deterministic synthetic (reference, degraded misaligned moving) pairs with full ground truth.

    ``dataset[i]`` is a pure function of (``seed``, ``split``, i) and of the constructor options; see the
    module docstring for the generative model and :func:`to_tensors` for the keys. Generation of one 64³
    sample takes well under a second after the first (which loads the template, ~2–4 s).

    Args:
        split: ``"train"``, ``"val"`` or ``"test"`` (independent random streams; see module docstring).
        size: S, voxels per edge of the isotropic grid (spacing = 233 mm / S).
        length: number of samples.
        seed: base seed.
        tasks: task names (uniform mix) or ``{name: weight}``; default all three of :data:`TASKS`.
        none_fraction: probability that a sample's moving volume is left undegraded (class ``"none"``).
        label_map_fraction: training only — probability of a random label-map subject instead of a deformed
            template.
        random_contrast_fraction: training only — probability that each MR image gets a random contrast.
        max_rot_deg, max_trans_mm, nonrigid_mm: misalignment bounds (degrees, mm, mm).
        anatomy_displacement_mm: bound of the smooth deformation that makes each template subject (mm).
    """

    def __init__(
        self,
        split: str = "train",
        size: int = 64,
        length: int = 1000,
        seed: int = 0,
        tasks: Optional[Union[Mapping[str, float], Sequence[str]]] = None,
        none_fraction: float = 0.25,
        label_map_fraction: float = 0.25,
        random_contrast_fraction: float = 0.2,
        max_rot_deg: float = 10.0,
        max_trans_mm: float = 10.0,
        nonrigid_mm: float = 4.0,
        anatomy_displacement_mm: float = 8.0,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        if int(size) < 8:
            raise ValueError(f"size must be at least 8 voxels; got {size}")
        if int(length) < 0:
            raise ValueError(f"length must be >= 0; got {length}")
        for name, p in (("none_fraction", none_fraction), ("label_map_fraction", label_map_fraction),
                        ("random_contrast_fraction", random_contrast_fraction)):
            if not 0.0 <= float(p) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1]; got {p}")
        self.split = split
        self.split_id = SPLITS.index(split)
        self.size = int(size)
        self.length = int(length)
        self.seed = int(seed)
        self.task_names, self.task_probabilities = _task_weights(tasks)
        self.none_fraction = float(none_fraction)
        training = split == "train"
        self.label_map_fraction = float(label_map_fraction) if training else 0.0
        self.random_contrast_fraction = float(random_contrast_fraction) if training else 0.0
        self.misalignment = {"max_rot_deg": float(max_rot_deg), "max_trans_mm": float(max_trans_mm),
                             "nonrigid_mm": float(nonrigid_mm)}
        self.anatomy_displacement_mm = float(anatomy_displacement_mm)

    def __len__(self) -> int:
        return self.length

    def subject(self, index: int) -> Tissues:
        """The anatomy of sample ``index`` (deformed template or, in training, a random label-map subject)."""
        rng = _stream(self.seed, self.split_id, index, "anatomy")
        if self.label_map_fraction > 0 and rng.random() < self.label_map_fraction:
            return random_subject(rng, self.size)
        return deform_anatomy(load_mni_tissues(self.size), rng, max_displacement_mm=self.anatomy_displacement_mm)

    def sample_arrays(self, index: int) -> SampleArrays:
        """Sample ``index`` in physical units (before normalisation)."""
        if not 0 <= int(index) < self.length:
            raise IndexError(f"index {index} out of range for a dataset of {self.length} samples")
        index = int(index)
        choice = _stream(self.seed, self.split_id, index, "task")
        task = self.task_names[int(choice.choice(len(self.task_names), p=self.task_probabilities))]
        degradation = "none" if choice.random() < self.none_fraction else TASKS[task].degradation
        rngs = {p: _stream(self.seed, self.split_id, index, p)
                for p in ("reference", "moving", "misalignment", "degradation")}
        return synthesize_pair(self.subject(index), task, degradation, rngs, self.misalignment,
                               self.random_contrast_fraction)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        sample = self.sample_arrays(index)
        return to_tensors(sample, list(TASKS).index(sample.task))


# --------------------------------------------------------------------------------------------------------
# demo case with real geometry


@dataclass(frozen=True, eq=False)
class DemoCase:
    """A sample pair as a user would load it: SimpleITK images with physical geometry (LPS mm).

    Attributes:
        task, degradation: names.
        reference: clean reference on the anatomy grid (isotropic, 233 mm / size spacing); CT as int16 HU.
        moving: degraded, misaligned second scan on its OWN grid (anisotropic spacing, shifted origin, tilted
            axes); CT as int16 HU, MR/PET float32.
        moving_clean: truth — the clean moving modality aligned with the reference, on the reference grid.
        displacement_gt: truth — ITK displacement field (sitkVectorFloat64, LPS mm) on the reference grid,
            pull-back: ``aligned(x) = moving(x + U(x))`` for physical points x, the whole map from the
            reference to the moving scan (no header pre-alignment needed beyond the shared physical frame).
        labels: uint8 tissue labels of the reference (0 background, 1 CSF, 2 GM, 3 WM, 4 bone, 5 scalp).
        moving_undegraded: the moving scan before degradation (same grid as ``moving``).
    """

    task: str
    degradation: str
    reference: sitk.Image
    moving: sitk.Image
    moving_clean: sitk.Image
    displacement_gt: sitk.Image
    labels: sitk.Image
    moving_undegraded: sitk.Image


def _moving_grid(reference: sitk.Image, rng: np.random.Generator) -> sitk.Image:
    """A second-scan grid over the reference's field of view: in-plane spacing ×U(0.85, 1), slice spacing
    ×U(1.3, 1.8), axes tilted by up to 5° about x (oblique acquisition), origin shifted by up to ±5 mm per
    axis; 10 % larger extent so the tilted box still covers the head."""
    spacing_ref = np.asarray(reference.GetSpacing())
    spacing = spacing_ref * np.array([rng.uniform(0.85, 1.0), rng.uniform(0.85, 1.0), rng.uniform(1.3, 1.8)])
    extent = np.asarray(reference.GetSize()) * spacing_ref * 1.1
    size = np.ceil(extent / spacing).astype(int)
    tilt = math.radians(float(rng.uniform(-5.0, 5.0)))
    rot = np.array([[1, 0, 0], [0, math.cos(tilt), -math.sin(tilt)], [0, math.sin(tilt), math.cos(tilt)]])
    direction = np.asarray(reference.GetDirection()).reshape(3, 3) @ rot
    centre = geometry.physical_center(reference) + rng.uniform(-5.0, 5.0, size=3)
    origin = centre - direction @ (spacing * (size - 1) / 2.0)
    grid = sitk.Image([int(n) for n in size], sitk.sitkFloat32)
    grid.SetSpacing(spacing.tolist())
    grid.SetDirection(direction.ravel().tolist())
    grid.SetOrigin(origin.tolist())
    return grid


def _as_scan(image: sitk.Image, modality: str) -> sitk.Image:
    """CT stored as int16 HU (as scanners write it); other modalities float32."""
    if modality == "ct":
        return sitk.Cast(sitk.Round(sitk.Clamp(image, sitk.sitkFloat32, -1024.0, 3071.0)), sitk.sitkInt16)
    return sitk.Cast(image, sitk.sitkFloat32)


def make_demo_case(
    size: int = 64,
    task: str = "t1-t2-motion",
    seed: int = 0,
    degradation: Optional[str] = None,
) -> DemoCase:
    """Build the demo pair: held-out anatomy (demo stream), real geometry, known ground truth.

    The reference is synthesised on the ``size``³ anatomy grid. The clean moving modality D (aligned with the
    reference) is resampled onto a different second-scan grid through the forward misalignment ``T_v``
    (``moving(y) = D(T_v(y))`` for physical y, one linear interpolation), then degraded on that grid with its
    own spacing. The ground truth ``U = T_v^-1 − id`` (from :func:`random_misalignment`'s exact inverse) is
    expressed in LPS mm on the reference grid, so ``moving(x + U(x)) = D(x)``.

    Args:
        size: anatomy grid edge (spacing 233 mm / size).
        task: a :data:`TASKS` key.
        seed: demo seed (anatomy, contrasts, misalignment, grid and degradation all follow from it).
        degradation: override of the task's degradation (e.g. ``"none"``).
    """
    if task not in TASKS:
        raise ValueError(f"unknown demo task {task!r}; choose from {', '.join(TASKS)}")
    t = TASKS[task]
    deg = t.degradation if degradation is None else degradation
    degradation_id(deg)
    rng = {p: _stream(seed, _DEMO_SPLIT_ID, 0, p) for p in _PURPOSE}
    tissues = deform_anatomy(load_mni_tissues(int(size)), rng["anatomy"])
    ref_kind, mov_kind = _modality(t.reference), _modality(t.moving)
    reference = synthesize(tissues, ref_kind, rng["reference"])
    moving_aligned = synthesize(tissues, mov_kind, rng["moving"])
    mis = random_misalignment(tissues.shape, rng["misalignment"], spacing_mm=tissues.spacing_mm)

    grid = tissues.grid
    forward_mm = geometry.field_voxels_to_image(mis.forward, grid)
    transform = sitk.DisplacementFieldTransform(sitk.Image(forward_mm))
    moving_grid = _moving_grid(grid, rng["grid"])
    undegraded = geometry.resample(tissues.as_image(moving_aligned), moving_grid, transform,
                                   default=_background(mov_kind))
    undegraded_arr = sitk.GetArrayFromImage(undegraded)
    degraded_arr = apply_degradation(deg, undegraded_arr, rng["degradation"], spacing_mm=moving_grid.GetSpacing())
    degraded = sitk.GetImageFromArray(degraded_arr)
    degraded.CopyInformation(moving_grid)
    return DemoCase(
        task=task,
        degradation=deg,
        reference=_as_scan(tissues.as_image(reference), ref_kind),
        moving=_as_scan(degraded, mov_kind),
        moving_clean=_as_scan(tissues.as_image(moving_aligned), mov_kind),
        displacement_gt=geometry.field_voxels_to_image(mis.inverse, grid),
        labels=tissues.as_image(tissues.labels()),
        moving_undegraded=_as_scan(undegraded, mov_kind),
    )
