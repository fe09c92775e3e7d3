"""Training crops from the real-anatomy cases of ``unifuse data real`` (layout ``unifuse-real``).

What the pipeline asks of the network, on real anatomy: after the MI affine stage, find the remaining
millimetres of misalignment on a working grid of ~3 mm, and restore + fuse at the reference's own resolution
(1–1.5 mm). One sample is therefore an S³ crop at a random isotropic spacing in ``spacing_mm`` (half of them
at the working spacing ``working_mm``, the rest uniform over the range), centred on a random foreground voxel
of a real reference volume, with

* the moving input: the real case's moving volume — its own degraded acquisition, a re-degradation of its
  clean acquisition with the **training** split's simulator settings (``real_cases.degrade``), or the clean
  acquisition itself (class ``none``) — sampled through the case's exact truth composed with a residual
  misalignment ``v`` (a small rigid motion, ±2 % scaling and a smooth field; the affine stage's residual);
* the labels of the trainer's losses (keys of :func:`unifuse.data.synthetic.to_tensors`): the clean moving
  volume aligned with the reference (the case's ``truth_moving_aligned_clean``), the clean moving volume and
  the reference in the input's pose, and the pull-back field ``u = v⁻¹`` in crop voxels
  (:func:`unifuse.data.deformations.invert_field`).

Geometry: the crop grid has the reference's direction; fields are LPS mm in SimpleITK and (x, y, z) voxel
channels in the sample; ``input(x + u(x)) = aligned(x)``. Intensities are normalised with the whole volume's
normalisation (as the pipeline normalises its full inputs). Samples are a pure function of (seed, index).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..config import DEGRADATION_CLASSES
from ..data.deformations import invert_field, rotation_matrix
from ..data.real import load_real_cases
from ..data.real_cases import degrade
from ..errors import DatasetError
from ..geometry import field_voxels_to_image
from ..intensity import IntensityNormalization, foreground_mask
from ..stages import normalization

__all__ = ["RealCrops", "RealVolumes", "load_volumes"]


@dataclass
class RealVolumes:
    """One real case in memory (SimpleITK images on their own grids; fields LPS mm).

    Attributes:
        case_id: ``subject/case`` (the subject is the split unit).
        reference, reference_norm: the reference and its normalisation.
        movings: [(degradation class, moving volume on its acquisition grid, its normalisation)].
        moving_clean, clean_norm: the clean acquisition and its normalisation.
        aligned_clean: the clean moving volume aligned with the reference (reference grid).
        truth: the truth as a transform, ``x -> x + T(x)`` (reference -> moving LPS points; built once).
        foreground: (n, 3) reference voxel indices (x, y, z) inside the body, to centre crops on.
    """

    case_id: str
    reference: sitk.Image
    reference_norm: IntensityNormalization
    movings: List[Tuple[str, sitk.Image, IntensityNormalization]]
    moving_clean: sitk.Image
    clean_norm: IntensityNormalization
    aligned_clean: sitk.Image
    truth: sitk.Transform
    foreground: np.ndarray


def _load(case: Any, info: Dict[str, Any], folder: Path, variants: int, seed: int) -> RealVolumes:
    """A :class:`RealVolumes` from a built case (``case``: its BenchCase; ``folder``: its case folder)."""
    reference = sitk.Cast(case.reference, sitk.sitkFloat32)
    moving = sitk.Cast(case.moving, sitk.sitkFloat32)
    clean = sitk.ReadImage(str(folder / "moving_clean.nii.gz"), sitk.sitkFloat32)
    degradation = info.get("degradation") or "none"
    movings = [(degradation, moving, normalization(moving, "moving")[0])]
    rng = np.random.default_rng([seed, zlib.crc32(case.name.encode("utf-8"))])
    for _ in range(max(0, variants - 1) if degradation != "none" else 0):
        array, _ = degrade(degradation, sitk.GetArrayFromImage(clean), clean.GetSpacing(), "train", rng)
        image = sitk.GetImageFromArray(array.astype(np.float32))
        image.CopyInformation(clean)
        movings.append((degradation, image, normalization(image, "moving")[0]))
    clean_norm = normalization(clean, "moving")[0]
    movings.append(("none", clean, clean_norm))
    # crops are centred in the body where the moving scan has data (a partial field of view covers a slab)
    ones = sitk.Cast(moving * 0 + 1, sitk.sitkUInt8)
    truth = sitk.DisplacementFieldTransform(sitk.Cast(case.truth_displacement, sitk.sitkVectorFloat64))
    covered = sitk.Resample(ones, reference, truth, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    inside = sitk.GetArrayViewFromImage(foreground_mask(reference)) * sitk.GetArrayViewFromImage(covered)
    fg = np.argwhere(inside > 0)[:, ::-1]  # (x, y, z)
    if len(fg) == 0:
        raise DatasetError(f"real case {case.name} has no foreground in its reference; rebuild the cache")
    return RealVolumes(
        case_id=f"{info.get('subject', 'subject')}/{case.name}",
        reference=reference, reference_norm=normalization(reference, "reference")[0], movings=movings,
        moving_clean=clean, clean_norm=clean_norm,
        aligned_clean=sitk.Cast(case.truth_aligned, sitk.sitkFloat32),
        truth=truth,
        foreground=fg[:: max(1, len(fg) // 20000)].astype(np.float64),
    )


_LOADED: Dict[Tuple[str, str, int], List[RealVolumes]] = {}


def load_volumes(cache: Any, split: str, variants: int) -> List[RealVolumes]:
    """The cases of ``split`` in memory, loaded once per process (the training and validation sets share
    them; the re-degradations are drawn with a fixed seed per case, so every process holds the same)."""
    key = (str(Path(cache).resolve()), split, int(variants))
    if key not in _LOADED:
        root = Path(cache) / "cases" / split
        _LOADED[key] = [_load(rc.case, rc.info, root / rc.case.name, variants, 0) for rc in load_real_cases(cache, split)]
    return _LOADED[key]


def _crop_grid(reference: sitk.Image, centre_index: np.ndarray, size: int, spacing: float) -> sitk.Image:
    d = np.asarray(reference.GetDirection(), dtype=np.float64).reshape(3, 3)
    centre = np.asarray(reference.TransformContinuousIndexToPhysicalPoint(centre_index.tolist()))
    origin = centre - d @ np.full(3, spacing * (size - 1) / 2.0)
    grid = sitk.Image([size] * 3, sitk.sitkUInt8)
    grid.SetSpacing([spacing] * 3)
    grid.SetDirection(reference.GetDirection())
    grid.SetOrigin(origin.tolist())
    return grid


def _residual_field(rng: np.random.Generator, size: int, spacing: float, max_rot_deg: float,
                    max_trans_mm: float, max_scale: float, nonrigid_mm: float) -> np.ndarray:
    """v on the crop grid, (3, D, H, W), crop voxels, channels (x, y, z): rigid + scaling about the centre and
    a smooth field (Gaussian vectors on a 4³ cell-centred control grid, trilinear)."""
    c = (size - 1) / 2.0
    z, y, x = np.meshgrid(*[np.arange(size, dtype=np.float64) - c] * 3, indexing="ij")
    p = np.stack([x, y, z])  # (3, D, H, W), voxels from the centre
    rot = rotation_matrix(rng.uniform(-max_rot_deg, max_rot_deg, 3))
    a = rot @ np.diag(1.0 + rng.uniform(-max_scale, max_scale, 3))
    t = rng.uniform(-max_trans_mm, max_trans_mm, 3) / spacing
    v = np.einsum("ij,jdhw->idhw", a - np.eye(3), p) + t[:, None, None, None]
    amplitude = rng.uniform(0.0, nonrigid_mm) / spacing
    coarse = torch.from_numpy(rng.normal(0.0, amplitude, (1, 3, 4, 4, 4)).astype(np.float32))
    smooth = F.interpolate(coarse, size=(size,) * 3, mode="trilinear", align_corners=False)[0].numpy()
    return (v + smooth).astype(np.float32)


def _through(field_mm: sitk.Image) -> sitk.Transform:
    """``x -> x + v(x)`` of a crop-grid LPS-mm field (the transform takes ownership of its image: a copy)."""
    return sitk.DisplacementFieldTransform(sitk.Image(field_mm))


class RealCrops(Dataset):
    """S³ training crops of the real cases of one split (see the module docstring).

    Args:
        cache: the ``unifuse data real`` cache folder.
        split: the split whose cases are read (``train``; the validation split is the benchmark's).
        size: crop edge S (voxels).
        length: samples per pass.
        seed: sample i is drawn from the stream (seed, i).
        spacing_mm: range of the crops' isotropic spacing; working_mm: the spacing half of them use.
        variants: degraded acquisitions per case (the case's own + re-degradations of its clean one).
        none_fraction: fraction of samples whose moving input is the clean acquisition (class ``none``).
        max_rot_deg, max_trans_mm, max_scale, nonrigid_mm: bounds of the residual misalignment ``v``.
    """

    def __init__(self, cache: Any, split: str = "train", size: int = 32, length: int = 1000, seed: int = 0,
                 spacing_mm: Tuple[float, float] = (1.0, 3.0), working_mm: float = 3.0, variants: int = 2,
                 none_fraction: float = 0.2, max_rot_deg: float = 2.0, max_trans_mm: float = 2.0,
                 max_scale: float = 0.02, nonrigid_mm: float = 3.0,
                 volumes: Optional[Sequence[RealVolumes]] = None) -> None:
        self.size, self.length, self.seed = int(size), int(length), int(seed)
        self.spacing_mm, self.working_mm = tuple(map(float, spacing_mm)), float(working_mm)
        self.none_fraction = float(none_fraction)
        self.bounds = (float(max_rot_deg), float(max_trans_mm), float(max_scale), float(nonrigid_mm))
        if volumes is None:
            volumes = load_volumes(cache, split, variants)
        self.volumes = list(volumes)
        if not self.volumes:
            raise DatasetError(f"no {split} cases in the real-data cache {cache}; run 'unifuse data real'")
        self.cases = [_CaseId(v.case_id) for v in self.volumes]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(index)])
        vol = self.volumes[int(index) % len(self.volumes)]
        lo, hi = self.spacing_mm
        spacing = self.working_mm if rng.random() < 0.5 else float(rng.uniform(lo, hi))
        centre = vol.foreground[rng.integers(len(vol.foreground))] + rng.uniform(-0.5, 0.5, 3)
        grid = _crop_grid(vol.reference, centre, self.size, spacing)
        v = _residual_field(rng, self.size, spacing, *self.bounds)
        u = invert_field(v)
        residual = _through(field_voxels_to_image(v, grid))
        # phi(x) = y + T(y), y = x + v(x): the truth applied after the residual misalignment (ITK's composite
        # applies its last-added transform first)
        phi = sitk.CompositeTransform([vol.truth, residual])
        degraded = [m for m in vol.movings if m[0] != "none"]
        if rng.random() < self.none_fraction or not degraded:
            name, moving, mov_norm = vol.movings[-1]
        else:
            name, moving, mov_norm = degraded[rng.integers(len(degraded))]

        def sample(image: sitk.Image, norm: IntensityNormalization, transform: Optional[sitk.Transform]) -> torch.Tensor:
            t = transform if transform is not None else sitk.Transform(3, sitk.sitkIdentity)
            out = sitk.Resample(image, grid, t, sitk.sitkLinear, float(norm.low), sitk.sitkFloat32)
            return torch.from_numpy(norm.apply(sitk.GetArrayFromImage(out)).astype(np.float32))[None]

        labels = torch.zeros((self.size,) * 3, dtype=torch.long)
        return {
            "reference": sample(vol.reference, vol.reference_norm, None),
            "moving": sample(moving, mov_norm, phi),
            "moving_clean": sample(vol.moving_clean, vol.clean_norm, phi),
            "moving_clean_aligned": sample(vol.aligned_clean, vol.clean_norm, None),
            "reference_moved": sample(vol.reference, vol.reference_norm, residual),
            "field": torch.from_numpy(np.ascontiguousarray(u, dtype=np.float32)),
            "degradation": torch.tensor(DEGRADATION_CLASSES.index(name), dtype=torch.long),
            "task": torch.tensor(-1, dtype=torch.long),
            "labels": labels,
            "labels_reference": labels.clone(),
            "spacing": torch.tensor(spacing, dtype=torch.float32),
        }


@dataclass(frozen=True)
class _CaseId:
    case_id: str
