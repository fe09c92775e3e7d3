"""Registration cases with exactly known truth, built from real volumes (``unifuse data real``).

A case starts from one converted real volume (:mod:`unifuse.data.real_sources`), physical coordinates LPS mm,
arrays (z, y, x), displacement vectors (x, y, z):

1. **Reference grid** R: the source's direction cosines, isotropic spacing in [1, 1.5] mm chosen so that the
   body's bounding box (+5 mm) holds at most 3 M voxels (if not even at 1.5 mm, the box is cropped along
   the axis closest to S: heads keep the top, chests the centre). P is R padded by 10 mm on every side
   (the smooth field and the clean second modality are known beyond R's border). The reference is the
   real volume resampled onto R (linear).
2. **Clean second modality** D on P: a random, smooth, non-monotonic intensity transfer of the real volume
   (PCHIP through random values at fixed intensity knots, :func:`synthesize`) — or, for the real pair, the
   second real image (DWI) resampled onto P.
3. **Misalignment**, the pull-back point map from reference to moving space ``T(x) = c + M (x + n(x) - c) + t``:
   n a smooth random field on P (largest length 2–6 mm, correlation length 20–40 mm, non-folding; trilinear
   between P's voxel centres), M = rotation (±15° about x, y, z, ``R = Rz Ry Rx``) × per-axis scaling (±5 %),
   t a translation (±20 mm), c the centre of R. The truth ``U(x) = T(x) - x`` is evaluated on R's voxel
   centres in closed form (exact).
4. **Moving acquisition grid** G: axial (CT, PET) or axial/coronal/sagittal (MR) axes tilted by up to 10°,
   anisotropic spacing (MR 0.9–1.2 × 3–5 mm, CT a 160² matrix × 2–3 mm, PET 2–3 mm), covering T(R) (× 1–1.1)
   — or only a slab of 40–60 % of it along the slice axis for ``partial`` cases.
5. **Moving image** ``moving_clean(y) = D(T^-1(y))`` for every y of G: ``T^-1(y) = w`` with
   ``z = A^-1(y)`` in closed form and ``w = z + m``, ``m = -n(z + m)`` by fixed-point iteration at those
   points (torch ``grid_sample``), to 1e-4 voxel; the residual ``|w + n(w) - z|`` is recorded. D is sampled
   once (trilinear).
6. **Degradation** of moving_clean on G, with G's spacing, BEFORE any resampling (:mod:`.degradations`), with
   the split's settings (:data:`DEGRADATION_SETTINGS`: validation uses settings training never sees).

Outputs per case (the layout :func:`unifuse.bench.cases.folder_cases` reads): ``reference``, ``moving``,
``truth_displacement`` (VectorFloat32 LPS mm on R), ``truth_moving_aligned_clean`` (D on R),
``reference_labels`` (uint8 on R), ``moving_labels`` (labels in the moving pose on G) and the extra
``moving_clean`` (G, before degradation), all ``.nii.gz``, plus ``case.json``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage
from scipy.interpolate import PchipInterpolator

from ..intensity import CT_AIR_HU
from .deformations import min_jacobian, random_smooth_displacement, rotation_matrix
from .degradations import apply_degradation, ct_metal, mri_motion, pet_lowdose, random_metal_mask
from .real_sources import CT_RANGE, body_mask

__all__ = [
    "CaseSettings",
    "CaseKind",
    "KINDS",
    "DEGRADATION_SETTINGS",
    "LABEL_OFFSET",
    "BuiltCase",
    "reference_grid",
    "tissue_classes",
    "synthesize",
    "degrade",
    "moving_grid",
    "build_case",
]

#: Source segmentation labels are written as ``LABEL_OFFSET + value`` (intensity classes are 1–4).
LABEL_OFFSET = 10


@dataclass(frozen=True)
class CaseSettings:
    """Sizes and ranges of case building (defaults: the shipped recipe; tests use smaller grids)."""

    max_reference_voxels: int = 3_000_000
    reference_spacing_mm: Tuple[float, float] = (1.0, 1.5)
    margin_mm: float = 5.0
    pad_mm: float = 10.0
    max_rotation_deg: float = 15.0
    max_translation_mm: float = 20.0
    max_scaling: float = 0.05
    nonrigid_mm: Tuple[float, float] = (2.0, 6.0)
    correlation_mm: Tuple[float, float] = (20.0, 40.0)
    max_tilt_deg: float = 10.0
    mr_inplane_mm: Tuple[float, float] = (0.9, 1.2)
    mr_slice_mm: Tuple[float, float] = (3.0, 5.0)
    dwi_inplane_mm: Tuple[float, float] = (1.6, 2.2)
    dwi_slice_mm: Tuple[float, float] = (2.0, 3.0)
    pet_mm: Tuple[float, float] = (2.0, 3.0)
    ct_matrix: int = 160
    ct_slice_mm: Tuple[float, float] = (2.0, 3.0)
    fov_factor: Tuple[float, float] = (1.0, 1.1)
    partial_fraction: Tuple[float, float] = (0.4, 0.6)
    max_moving_voxels: int = 4_000_000
    inverse_tolerance_vox: float = 1e-4


@dataclass(frozen=True)
class CaseKind:
    """What a case pairs: the reference is the real volume; the moving is ``synthesis`` of it, degraded."""

    name: str
    moving_modality: str  # "mr", "ct", "pet" or "dwi"
    synthesis: str  # "ct-to-pet", "ct-to-mr", "mr-to-t2", "mr-to-ct", "mr-to-pet", "real-second"
    degradation: str


#: Kinds per subject type; case k of a subject uses ``kinds[k % len(kinds)]``.
KINDS: Dict[str, Tuple[CaseKind, ...]] = {
    "ct": (CaseKind("ct-pet-lowdose", "pet", "ct-to-pet", "lowdose"),
           CaseKind("ct-mr-motion", "mr", "ct-to-mr", "motion")),
    "mr": (CaseKind("mr-t2-motion", "mr", "mr-to-t2", "motion"),
           CaseKind("mr-ct-metal", "ct", "mr-to-ct", "metal"),
           CaseKind("mr-pet-lowdose", "pet", "mr-to-pet", "lowdose")),
    "pair": (CaseKind("b0-dwi-none", "dwi", "real-second", "none"),
             CaseKind("b0-dwi-motion", "dwi", "real-second", "motion")),
}

#: Degradation parameter ranges per split (each case draws its values inside them). Validation uses motion
#: patterns, metal sizes/materials/doses and PET dose levels that the training cases never use.
DEGRADATION_SETTINGS: Dict[str, Dict[str, Dict[str, Tuple[float, float]]]] = {
    "train": {
        "motion": {"num_segments": (3, 5), "max_rotation_deg": (1.0, 3.5), "max_translation_mm": (1.0, 4.5)},
        "metal": {"num_objects": (1, 2), "radius_mm": (2.0, 4.0), "metal_mu_per_mm": (0.2, 0.6),
                  "photons": (3e4, 1e5)},
        "lowdose": {"dose_fraction": (1 / 8, 1 / 3)},
    },
    "validation": {
        "motion": {"num_segments": (6, 8), "max_rotation_deg": (4.0, 6.0), "max_translation_mm": (5.0, 8.0)},
        "metal": {"num_objects": (3, 3), "radius_mm": (4.5, 7.0), "metal_mu_per_mm": (0.8, 2.0),
                  "photons": (1e4, 2.5e4)},
        "lowdose": {"dose_fraction": (1 / 25, 1 / 12)},
    },
}


def background(modality: str) -> float:
    """Value outside the body in a modality's units: -1000 HU for CT, 0 otherwise."""
    return -1000.0 if modality == "ct" else 0.0


# --------------------------------------------------------------------------------------------------------
# grids


def _direction(image: sitk.Image) -> np.ndarray:
    return np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)


def _make_grid(origin: np.ndarray, spacing: Sequence[float], size: Sequence[int], direction: np.ndarray) -> sitk.Image:
    grid = sitk.Image([int(n) for n in size], sitk.sitkUInt8)
    grid.SetOrigin([float(v) for v in origin])
    grid.SetSpacing([float(v) for v in spacing])
    grid.SetDirection(direction.ravel().tolist())
    return grid


def _points(grid: sitk.Image) -> np.ndarray:
    """LPS mm coordinates of every voxel centre of ``grid``: float64 (3, D, H, W), channels (x, y, z) = (L, P, S)."""
    d, h, w = reversed(grid.GetSize())
    zz, yy, xx = np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij", sparse=True)
    m = _direction(grid) @ np.diag(grid.GetSpacing())
    o = np.asarray(grid.GetOrigin())
    return np.stack([o[r] + m[r, 0] * xx + m[r, 1] * yy + m[r, 2] * zz for r in range(3)]).astype(np.float64)


def reference_grid(image: sitk.Image, mask: np.ndarray, body_part: str,
                   settings: CaseSettings = CaseSettings()) -> Tuple[sitk.Image, Dict[str, Any]]:
    """The reference grid R over the body's bounding box (see the module docstring, step 1).

    Args:
        image: source volume (its direction cosines are kept).
        mask: bool (z, y, x) body mask on ``image``'s grid.
        body_part: ``head`` (a crop keeps the top) or ``chest`` (a crop keeps the centre).

    Returns:
        (R as an empty uint8 image, a record of spacing, size and any crop for ``case.json``).
    """
    spacing_src = np.asarray(image.GetSpacing(), dtype=np.float64)
    direction = _direction(image)
    idx = np.argwhere(mask)
    lo = idx.min(axis=0)[::-1] * spacing_src - settings.margin_mm  # (i, j, k) mm along the source axes
    hi = idx.max(axis=0)[::-1] * spacing_src + settings.margin_mm
    extent = hi - lo
    s_min, s_max = settings.reference_spacing_mm
    s = float(np.clip((np.prod(extent) / settings.max_reference_voxels) ** (1 / 3), s_min, s_max))
    size = np.floor(extent / s).astype(int) + 1
    while int(np.prod(size)) > settings.max_reference_voxels and s < s_max:  # rounding: grow s by 1 % steps
        s = min(s * 1.01, s_max)
        size = np.floor(extent / s).astype(int) + 1
    record: Dict[str, Any] = {"spacing_mm": s, "body_box_mm": extent.round(1).tolist(), "cropped": None}
    if int(np.prod(size)) > settings.max_reference_voxels:
        axis = int(np.argmax(np.abs(direction[2])))  # source axis closest to S
        keep = max(8, settings.max_reference_voxels // int(np.prod(np.delete(size, axis))))
        superior_up = direction[2, axis] > 0
        if body_part == "head":  # keep the top of the head, drop the neck
            start = hi[axis] - (keep - 1) * s if superior_up else lo[axis]
        else:  # the body's centre of mass along that axis
            centre = float(idx[:, 2 - axis].mean()) * spacing_src[axis]
            start = centre - (keep - 1) * s / 2.0
        record["cropped"] = {"axis": axis, "kept_mm": round((keep - 1) * s, 1),
                             "of_mm": round(float(extent[axis]), 1)}
        lo = lo.copy()
        lo[axis] = start
        size[axis] = keep
    origin = np.asarray(image.GetOrigin()) + direction @ lo
    record["size"] = size.tolist()
    return _make_grid(origin, [s, s, s], size, direction), record


def _padded(grid: sitk.Image, pad: int) -> sitk.Image:
    """``grid`` extended by ``pad`` voxels on every side (same spacing, direction and voxel centres)."""
    m = _direction(grid) @ np.diag(grid.GetSpacing())
    origin = np.asarray(grid.GetOrigin()) - m @ np.full(3, float(pad))
    return _make_grid(origin, grid.GetSpacing(), np.asarray(grid.GetSize()) + 2 * pad, _direction(grid))


def _crop(array: np.ndarray, pad: int) -> np.ndarray:
    """The R block of a P array (last three axes (z, y, x))."""
    return array[..., pad:-pad, pad:-pad, pad:-pad] if pad > 0 else array


def _tilt(rng: np.random.Generator, max_deg: float) -> Tuple[np.ndarray, float, np.ndarray]:
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    angle = math.radians(float(rng.uniform(-max_deg, max_deg)))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k, math.degrees(angle), axis


#: Base acquisition axes (columns = directions of i, j, k in LPS): rows run down (toward I) for coronal and
#: sagittal slices, as scanners store them; all right-handed.
_ORIENTATIONS: Dict[str, np.ndarray] = {
    "axial": np.eye(3),
    "coronal": np.array([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]]),
    "sagittal": np.array([[0, 0, -1.0], [1.0, 0, 0], [0, -1.0, 0]]),
}


def moving_grid(reference: sitk.Image, affine: Dict[str, np.ndarray], modality: str, category: str,
                rng: np.random.Generator, settings: CaseSettings = CaseSettings()) -> Tuple[sitk.Image, Dict[str, Any]]:
    """The moving scan's own acquisition grid G (module docstring, step 4).

    The anatomy of R sits at ``T(x) ≈ A(x)`` in moving space, so G covers the box of A(R's corners) (+ the
    largest non-rigid displacement) along G's axes.

    Args:
        reference: the reference grid R.
        affine: ``{"matrix": M, "centre": c, "translation": t}`` of the misalignment.
        modality: ``mr``, ``ct``, ``pet`` or ``dwi`` (sets orientation choices and spacing).
        category: ``full`` or ``partial`` (a slab along the slice axis).

    Returns:
        (G as an empty uint8 image, a record for ``case.json``).
    """
    orientation = str(rng.choice(["axial", "coronal", "sagittal"])) if modality == "mr" else "axial"
    tilt, tilt_deg, tilt_axis = _tilt(rng, settings.max_tilt_deg)
    direction = tilt @ _ORIENTATIONS[orientation]
    corners = np.array([reference.TransformContinuousIndexToPhysicalPoint(
        [c * (n - 1) for c, n in zip(corner, reference.GetSize())]) for corner in np.ndindex(2, 2, 2)])
    moved = (affine["centre"] + (corners - affine["centre"]) @ affine["matrix"].T + affine["translation"])
    local = moved @ direction  # coordinates along G's axes
    lo, hi = local.min(axis=0) - settings.nonrigid_mm[1], local.max(axis=0) + settings.nonrigid_mm[1]
    extent = (hi - lo) * rng.uniform(*settings.fov_factor)
    centre = (lo + hi) / 2.0 + rng.uniform(-5.0, 5.0, size=3)
    record: Dict[str, Any] = {"orientation": orientation, "tilt_deg": round(tilt_deg, 2),
                              "tilt_axis": tilt_axis.round(3).tolist()}
    if category == "partial":
        fraction = float(rng.uniform(*settings.partial_fraction))
        slab = fraction * (hi[2] - lo[2])
        centre[2] = float(rng.uniform(lo[2] + slab / 2.0, hi[2] - slab / 2.0))
        extent[2] = slab
        record["slab"] = {"axis": "k (slice axis)", "fraction": round(fraction, 3), "extent_mm": round(slab, 1)}
    if modality == "ct":
        inplane = max(extent[0], extent[1]) / settings.ct_matrix
        spacing = np.array([inplane, inplane, rng.uniform(*settings.ct_slice_mm)])
    elif modality == "pet":
        spacing = np.full(3, rng.uniform(*settings.pet_mm))
    else:
        inplane_range, slice_range = ((settings.dwi_inplane_mm, settings.dwi_slice_mm) if modality == "dwi"
                                      else (settings.mr_inplane_mm, settings.mr_slice_mm))
        inplane = rng.uniform(*inplane_range)
        spacing = np.array([inplane, inplane, rng.uniform(*slice_range)])
    size = np.maximum(np.ceil(extent / spacing).astype(int), 8)
    if modality == "ct":
        size[:2] = settings.ct_matrix
    while int(np.prod(size)) > settings.max_moving_voxels:  # coarser in-plane pixels, same field of view
        spacing[:2] *= 1.1
        size[:2] = np.maximum(np.ceil(extent[:2] / spacing[:2]).astype(int), 8)
    origin = direction @ (centre - spacing * (size - 1) / 2.0)
    record.update(size=size.tolist(), spacing_mm=spacing.round(4).tolist(), fov_mm=extent.round(1).tolist())
    return _make_grid(origin, spacing, size, direction), record


# --------------------------------------------------------------------------------------------------------
# labels and synthetic second modality


def _otsu_thresholds(values: np.ndarray, count: int) -> List[float]:
    f = sitk.OtsuMultipleThresholdsImageFilter()
    f.SetNumberOfThresholds(count)
    f.SetNumberOfHistogramBins(128)
    f.Execute(sitk.GetImageFromArray(values.astype(np.float32).reshape(1, 1, -1)))
    return [float(t) for t in f.GetThresholds()]


def tissue_classes(array: np.ndarray, mask: np.ndarray, modality: str) -> Tuple[np.ndarray, Dict[str, str]]:
    """Intensity classes inside the body: uint8 (z, y, x) and the meaning of each value.

    CT (fixed HU thresholds): 1 air/lung < -400, 2 fat -400..-20, 3 soft tissue -20..250, 4 bone >= 250.
    MR: three classes by Otsu's two thresholds of the body's intensities (1 dark, 2 middle, 3 bright).
    """
    a = np.asarray(array, dtype=np.float32)
    out = np.zeros(a.shape, dtype=np.uint8)
    if modality == "ct":
        edges, names = [-400.0, -20.0, 250.0], ["air/lung", "fat", "soft tissue", "bone"]
    else:
        edges, names = _otsu_thresholds(a[mask], 2), ["dark", "middle", "bright"]
    out[mask] = (np.digitize(a[mask], edges) + 1).astype(np.uint8)
    return out, {str(i + 1): n for i, n in enumerate(names)}


def _normalised(array: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """MR intensities mapped to t in [0, 1.3]: the body's 1st / 99th percentiles go to 0 / 1."""
    lo, hi = np.percentile(array[mask], [1.0, 99.0])
    return np.clip((array - lo) / max(hi - lo, 1e-6), 0.0, 1.3).astype(np.float32)


def _transfer(x: np.ndarray, knots: Sequence[float], values: Sequence[float]) -> np.ndarray:
    """Smooth (monotone-piecewise cubic, PCHIP) transfer through (knots, values); x clipped to the knots."""
    curve = PchipInterpolator(np.asarray(knots, dtype=np.float64), np.asarray(values, dtype=np.float64))
    return curve(np.clip(x, knots[0], knots[-1])).astype(np.float32)


def _draw(rng: np.random.Generator, ranges: Sequence[Tuple[float, float]]) -> List[float]:
    return [float(rng.uniform(lo, hi)) for lo, hi in ranges]


def _blur_fwhm(array: np.ndarray, fwhm_mm: float, spacing_mm: float) -> np.ndarray:
    return ndimage.gaussian_filter(array, fwhm_mm / 2.3548 / spacing_mm).astype(np.float32)


_HU_KNOTS = (-1000.0, -700.0, -100.0, 0.0, 30.0, 60.0, 150.0, 400.0, 1500.0)
_T_KNOTS = (0.0, 0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 1.0, 1.3)


def synthesize(kind: CaseKind, array: np.ndarray, mask: np.ndarray, lesion: Optional[np.ndarray], head: bool,
               spacing_mm: float, rng: np.random.Generator) -> Tuple[np.ndarray, Dict[str, Any]]:
    """The clean second modality D from a real volume on the isotropic grid P.

    * ``ct-to-pet``: FDG-like activity (kBq/mL) = curve(HU) x U[1.5, 3]; curve values at the HU knots
      (-1000 … 1500): air 0, lung 0.05–0.15, fat 0.15–0.4, water 0.1–0.4, 30 and 60 HU 0.5–1.5 each
      (grey/white matter, muscle, organs: random, non-monotonic), 150 HU 0.4–1, bone 0.2–0.5 / 0.1–0.3; a
      lesion mask (tumour) × U[3, 8]; Gaussian PSF of FWHM U[4, 7] mm.
    * ``ct-to-mr``: MR-like (0–1000) = curve(HU): air 0, lung 0–0.08, fat 0.6–1 (bright), water 0.1–0.9,
      soft tissues 0.2–0.8 (random order), 150 HU 0.2–0.7, bone 0.02–0.2 / 0–0.1 (dark); blur σ 0.5 voxel.
    * ``mr-to-t2``: t = MR normalised to the body's percentiles 1/99 -> 0/1; curve values at t knots
      ``w (1 - t/1.3) + (1 - w) U[0, 1]`` with w ~ U[0.4, 0.8]: roughly inverted (T1-like -> T2-like) with
      random, non-monotonic wiggles; x 1000.
    * ``mr-to-ct``: soft tissue HU = curve(t) with values U[-100, 80]; for heads a skull: voxels less than
      U[10, 14] mm deep in the body and darker than t < U[0.2, 0.35] (the dark band between scalp and brain)
      become bone U[800, 1400] HU (smoothed σ 1 voxel); air -1000 outside the body; blur σ 0.5 voxel.
    * ``mr-to-pet``: activity = curve(t) with values U[0.1, 1.5] x U[1.5, 3] kBq/mL, lesions x U[3, 8],
      PSF FWHM U[4, 7] mm.

    Outside the body mask D is the modality's background (0, or -1000 HU).

    Returns:
        (D as float32 (z, y, x), the drawn parameters).
    """
    a = np.asarray(array, dtype=np.float32)
    params: Dict[str, Any] = {"synthesis": kind.synthesis}
    if kind.synthesis in ("ct-to-pet", "ct-to-mr"):
        if kind.synthesis == "ct-to-pet":
            ranges = [(0, 0), (0.05, 0.15), (0.15, 0.4), (0.1, 0.4), (0.5, 1.5), (0.5, 1.5), (0.4, 1.0),
                      (0.2, 0.5), (0.1, 0.3)]
        else:
            ranges = [(0, 0), (0, 0.08), (0.6, 1.0), (0.1, 0.9), (0.2, 0.8), (0.2, 0.8), (0.2, 0.7),
                      (0.02, 0.2), (0.0, 0.1)]
        values = _draw(rng, ranges)
        out = _transfer(a, _HU_KNOTS, values)
        params.update(knots_hu=list(_HU_KNOTS), values=[round(v, 4) for v in values])
    else:
        t = _normalised(a, mask)
        if kind.synthesis == "mr-to-t2":
            w = float(rng.uniform(0.4, 0.8))
            values = [w * (1 - k / 1.3) + (1 - w) * float(rng.uniform(0, 1)) for k in _T_KNOTS]
            params["inversion_weight"] = round(w, 4)
        elif kind.synthesis == "mr-to-ct":
            values = _draw(rng, [(-100.0, 80.0)] * len(_T_KNOTS))
        else:
            values = _draw(rng, [(0.1, 1.5)] * len(_T_KNOTS))
        out = _transfer(t, _T_KNOTS, values)
        params.update(knots_t=list(_T_KNOTS), values=[round(v, 4) for v in values])
        if kind.synthesis == "mr-to-ct" and head:
            depth = ndimage.distance_transform_edt(mask, sampling=spacing_mm)
            depth_mm, dark, bone_hu = float(rng.uniform(10, 14)), float(rng.uniform(0.2, 0.35)), float(rng.uniform(800, 1400))
            bone = ndimage.gaussian_filter(((depth < depth_mm) & (t < dark) & mask).astype(np.float32), 1.0)
            out = out + bone * (bone_hu - out)
            params["skull"] = {"depth_mm": round(depth_mm, 2), "t_below": round(dark, 3), "hu": round(bone_hu, 1)}
    if kind.moving_modality == "pet":
        scale, fwhm = float(rng.uniform(1.5, 3.0)), float(rng.uniform(4.0, 7.0))
        out = out * scale
        if lesion is not None and lesion.any():
            boost = float(rng.uniform(3.0, 8.0))
            out = np.where(lesion, out * boost, out)
            params["lesion_uptake_factor"] = round(boost, 3)
        out = np.where(mask, out, 0.0).astype(np.float32)
        out = np.clip(_blur_fwhm(out, fwhm, spacing_mm), 0.0, None)
        params.update(activity_scale_kbq_ml=round(scale, 4), psf_fwhm_mm=round(fwhm, 3))
        return out.astype(np.float32), params
    if kind.moving_modality == "mr":
        out = out * 1000.0
    out = ndimage.gaussian_filter(np.where(mask, out, background(kind.moving_modality)).astype(np.float32), 0.5)
    if kind.moving_modality == "ct":
        out = np.clip(out, *CT_RANGE)
    return out.astype(np.float32), params


# --------------------------------------------------------------------------------------------------------
# degradation


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def degrade(name: str, volume: np.ndarray, spacing_mm: Sequence[float], split: str,
            rng: np.random.Generator) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Apply degradation ``name`` on the moving grid with the split's settings (:data:`DEGRADATION_SETTINGS`).

    Args:
        volume: (z, y, x) clean moving image on its acquisition grid, physical units.
        spacing_mm: the grid's (x, y, z) spacing.
        split: ``train`` or ``validation``.

    Returns:
        (degraded float32 volume, the drawn parameters).
    """
    if name == "none":
        return apply_degradation("none", volume, rng), {}
    ranges = DEGRADATION_SETTINGS[split][name]
    spacing = tuple(float(s) for s in spacing_mm)
    if name == "motion":
        p = {"num_segments": int(rng.integers(ranges["num_segments"][0], ranges["num_segments"][1] + 1)),
             "max_rotation_deg": float(rng.uniform(*ranges["max_rotation_deg"])),
             "max_translation_mm": float(rng.uniform(*ranges["max_translation_mm"])),
             "phase_encode_axis": int(rng.integers(1, 3))}
        return mri_motion(volume, rng, spacing_mm=spacing, **p), p
    if name == "metal":
        count = int(rng.integers(ranges["num_objects"][0], ranges["num_objects"][1] + 1))
        mask = random_metal_mask(volume.shape, rng, inside=volume > CT_AIR_HU, spacing_mm=spacing,
                                 num_objects=count, radius_mm=tuple(ranges["radius_mm"]))
        p = {"num_objects": count, "radius_mm": list(ranges["radius_mm"]), "metal_voxels": int(mask.sum()),
             "metal_mu_per_mm": _log_uniform(rng, *ranges["metal_mu_per_mm"]),
             "photons": _log_uniform(rng, *ranges["photons"]), "beam_hardening": float(rng.uniform(0.05, 0.25))}
        out = ct_metal(volume, rng, spacing_mm=spacing, metal_mask=mask, metal_mu_per_mm=p["metal_mu_per_mm"],
                       photons=p["photons"], beam_hardening=p["beam_hardening"])
        return out, p
    if name == "lowdose":
        p = {"dose_fraction": _log_uniform(rng, *ranges["dose_fraction"])}
        return pet_lowdose(volume, rng, dose_fraction=p["dose_fraction"]), p
    raise ValueError(f"unknown degradation {name!r}")


# --------------------------------------------------------------------------------------------------------
# misalignment, inverse at the moving grid's points, sampling


def _random_affine(rng: np.random.Generator, centre: np.ndarray, settings: CaseSettings) -> Dict[str, Any]:
    rotation = rng.uniform(-settings.max_rotation_deg, settings.max_rotation_deg, size=3)
    scaling = 1.0 + rng.uniform(-settings.max_scaling, settings.max_scaling, size=3)
    translation = rng.uniform(-settings.max_translation_mm, settings.max_translation_mm, size=3)
    return {"matrix": rotation_matrix(rotation) @ np.diag(scaling), "centre": np.asarray(centre, dtype=np.float64),
            "translation": translation, "rotation_deg": rotation, "scaling": scaling}


def _grid_index_matrix(grid: sitk.Image) -> Tuple[np.ndarray, np.ndarray]:
    """(inverse of D diag(s), origin): continuous index (i, j, k) = inv @ (p - origin)."""
    return np.linalg.inv(_direction(grid) @ np.diag(grid.GetSpacing())), np.asarray(grid.GetOrigin())


def _sampler(shape: Sequence[int]):
    """grid_sample at voxel points (1, 3, ...) (x, y, z) of a (D, H, W) grid; align_corners=True."""
    d, h, w = shape
    scale = torch.tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1), 2.0 / max(d - 1, 1)]).view(1, 3, 1, 1, 1)

    def sample(volume: torch.Tensor, points: torch.Tensor, padding: str, mode: str = "bilinear") -> torch.Tensor:
        grid = (points * scale - 1.0).permute(0, 2, 3, 4, 1)
        return torch.nn.functional.grid_sample(volume, grid, mode=mode, padding_mode=padding, align_corners=True)

    return sample


def _inverse_at(moving: sitk.Image, padded: sitk.Image, affine: Dict[str, Any], n_vox: np.ndarray,
                tolerance: float) -> Tuple[torch.Tensor, Dict[str, float]]:
    """``T^-1(y)`` for every voxel centre y of ``moving``, as continuous (x, y, z) voxel indices of ``padded``.

    ``z = A^-1(y)`` in closed form, then ``m = -n(z + m)`` iterated (n trilinear on P, border-clamped) until no
    component moves by more than ``tolerance`` voxel (at most 100 iterations).

    Returns:
        ((1, 3, Dm, Hm, Wm) float32 tensor of P indices, residual statistics in mm and the iteration count).
    """
    y = _points(moving)  # (3, Dm, Hm, Wm) LPS
    shape_m = y.shape[1:]
    rel = y.reshape(3, -1) - (affine["centre"] + affine["translation"])[:, None]
    z = np.linalg.solve(affine["matrix"], rel) + affine["centre"][:, None]
    inv, origin = _grid_index_matrix(padded)
    q = torch.from_numpy((inv @ (z - origin[:, None])).reshape(3, *shape_m).astype(np.float32))[None]
    sample = _sampler(tuple(reversed(padded.GetSize())))
    n = torch.from_numpy(np.ascontiguousarray(n_vox, dtype=np.float32))[None]
    m = -sample(n, q, "border")
    iterations = 0
    for iterations in range(1, 101):
        m_next = -sample(n, q + m, "border")
        change = float((m_next - m).abs().max())
        m = m_next
        if change < tolerance:
            break
    w = q + m
    residual = (m + sample(n, w, "border")).norm(dim=1)[0].numpy() * float(padded.GetSpacing()[0])
    limits = torch.tensor([s - 1 for s in padded.GetSize()], dtype=torch.float32).view(1, 3, 1, 1, 1)
    inside = ((w >= 0) & (w <= limits)).all(dim=1)[0].numpy()
    r = residual[inside] if inside.any() else np.zeros(1)
    return w, {"residual_max_mm": float(r.max()), "residual_p99_mm": float(np.percentile(r, 99)),
               "iterations": iterations}


def _truth_field(padded: sitk.Image, affine: Dict[str, Any], n_vox: np.ndarray) -> np.ndarray:
    """``U(x) = T(x) - x`` (LPS mm) at P's voxel centres: float32 (D, H, W, 3), vector order (x, y, z)."""
    x = _points(padded)
    m = _direction(padded) @ np.diag(padded.GetSpacing())
    n_mm = np.einsum("ck,kzyx->czyx", m, n_vox.astype(np.float64))
    rel = (x + n_mm - affine["centre"][:, None, None, None]).reshape(3, -1)
    t = (affine["matrix"] @ rel).reshape(x.shape) + (affine["centre"] + affine["translation"])[:, None, None, None]
    return np.moveaxis(t - x, 0, -1).astype(np.float32)


def _control_points(padded: sitk.Image, correlation_mm: float) -> int:
    extent = float(max(np.asarray(padded.GetSize()) * np.asarray(padded.GetSpacing())))
    return int(np.clip(round(extent / correlation_mm) + 1, 3, 16))


# --------------------------------------------------------------------------------------------------------
# one case


@dataclass(frozen=True, eq=False)
class BuiltCase:
    """A built case: images keyed by output file stem, and the ``case.json`` record."""

    images: Dict[str, sitk.Image]
    info: Dict[str, Any] = field(default_factory=dict)


def _image(array: np.ndarray, grid: sitk.Image, modality: Optional[str] = None) -> sitk.Image:
    img = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=array.ndim == 4)
    img.CopyInformation(grid)
    if modality == "ct":
        return sitk.Cast(sitk.Round(sitk.Clamp(img, sitk.sitkFloat32, *CT_RANGE)), sitk.sitkInt16)
    if modality is not None:
        return sitk.Cast(img, sitk.sitkFloat32)
    return img


def _check_truth(moving_clean: sitk.Image, truth: sitk.Image, field_mm: sitk.Image, mask: np.ndarray) -> Dict[str, float]:
    """Warp ``moving_clean`` through the truth onto the reference grid and compare with ``truth`` inside the
    overlap and the body: relative mean absolute error (/ truth's 1–99 % range) and Pearson correlation; for
    scale, the correlation of the header-only (unaligned) resampling and of the truth shifted by 1 mm along
    x (a truth wrong by 1 mm scores visibly lower)."""
    ref = sitk.GetArrayFromImage(truth).astype(np.float32)
    field64 = sitk.Cast(field_mm, sitk.sitkVectorFloat64)
    ones = sitk.Cast(moving_clean * 0 + 1, sitk.sitkUInt8)

    def warped(transform: sitk.Transform) -> np.ndarray:
        return sitk.GetArrayFromImage(sitk.Resample(moving_clean, truth, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))

    transform = sitk.DisplacementFieldTransform(sitk.Image(field64))
    inside = sitk.GetArrayFromImage(sitk.Resample(ones, truth, transform, sitk.sitkNearestNeighbor, 0)) > 0
    sel = inside & mask
    if sel.sum() < 10:
        return {"overlap_fraction": float(inside.mean()), "relative_mae": float("nan"), "correlation": float("nan")}
    aligned = warped(transform)
    shifted = sitk.Compose([sitk.VectorIndexSelectionCast(field64, i) + (1.0 if i == 0 else 0.0) for i in range(3)])
    shifted.CopyInformation(field64)
    lo, hi = np.percentile(ref[sel], [1, 99])

    def corr(a: np.ndarray) -> float:
        return round(float(np.corrcoef(a[sel], ref[sel])[0, 1]), 5)

    return {"overlap_fraction": round(float(inside.mean()), 4),
            "relative_mae": round(float(np.abs(aligned[sel] - ref[sel]).mean() / max(hi - lo, 1e-6)), 5),
            "correlation": corr(aligned),
            "correlation_truth_shifted_1mm": corr(warped(sitk.DisplacementFieldTransform(shifted))),
            "correlation_header_only": corr(warped(sitk.Transform()))}


def build_case(image: sitk.Image, modality: str, body_part: str, kind: CaseKind, category: str, split: str,
               rngs: Dict[str, np.random.Generator], labels: Optional[sitk.Image] = None,
               labels_kind: Optional[str] = None, second: Optional[sitk.Image] = None,
               settings: CaseSettings = CaseSettings()) -> BuiltCase:
    """Build one case from a converted real volume (the module docstring's steps 1–6).

    Args:
        image: real volume (LPS; CT in HU, MR any units).
        modality: ``ct`` or ``mr``; body_part: ``head`` or ``chest``.
        kind: what to pair (:data:`KINDS`); category: ``full`` or ``partial``; split: sets the degradation
            settings.
        rngs: generators for ``"modality"``, ``"field"``, ``"affine"``, ``"grid"``, ``"degradation"``.
        labels: uint8 source labels on ``image``'s grid (``labels_kind`` ``lesion`` boosts PET uptake).
        second: the real second image (kind ``real-second``), any grid.

    Returns:
        :class:`BuiltCase` with ``reference``, ``moving``, ``moving_clean``, ``truth_displacement``,
        ``truth_moving_aligned_clean``, ``reference_labels``, ``moving_labels`` and the ``case.json`` record.
    """
    src = sitk.GetArrayViewFromImage(image)
    ref_grid, ref_record = reference_grid(image, body_mask(src, modality), body_part, settings)
    s = float(ref_grid.GetSpacing()[0])
    pad = int(math.ceil(settings.pad_mm / s))
    padded = _padded(ref_grid, pad)
    bg = background(modality)
    ref_p = sitk.GetArrayFromImage(sitk.Resample(image, padded, sitk.Transform(), sitk.sitkLinear, bg, sitk.sitkFloat32))
    mask_p = body_mask(ref_p, modality)
    classes, names = tissue_classes(ref_p, mask_p, modality)
    lesion = None
    if labels is not None:
        lab_p = sitk.GetArrayFromImage(sitk.Resample(labels, padded, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
        classes = np.where(lab_p > 0, lab_p.astype(np.int32) + LABEL_OFFSET, classes).astype(np.uint8)
        names.update({f"{LABEL_OFFSET}+k": f"source segmentation label k ({labels_kind})"})
        lesion = (lab_p > 0) if labels_kind == "lesion" else None

    if kind.synthesis == "real-second":
        if second is None:
            raise ValueError(f"case kind {kind.name} needs the second real image")
        clean_p = sitk.GetArrayFromImage(sitk.Resample(second, padded, sitk.Transform(), sitk.sitkLinear, 0.0,
                                                       sitk.sitkFloat32))
        synth = {"synthesis": "real-second", "note": "the second real image resampled (linear) onto the grid"}
    else:
        clean_p, synth = synthesize(kind, ref_p, mask_p, lesion, body_part == "head", s, rngs["modality"])
    mov_mod = "mr" if kind.moving_modality == "dwi" else kind.moving_modality

    amplitude = float(rngs["field"].uniform(*settings.nonrigid_mm))
    correlation = float(rngs["field"].uniform(*settings.correlation_mm))
    control = _control_points(padded, correlation)
    n_vox = random_smooth_displacement(tuple(reversed(padded.GetSize())), rngs["field"], amplitude, s, control)
    affine = _random_affine(rngs["affine"], np.asarray(ref_grid.TransformContinuousIndexToPhysicalPoint(
        [(n - 1) / 2.0 for n in ref_grid.GetSize()])), settings)
    grid, grid_record = moving_grid(ref_grid, affine, kind.moving_modality, category, rngs["grid"], settings)

    points, inverse = _inverse_at(grid, padded, affine, n_vox, settings.inverse_tolerance_vox)
    sample = _sampler(clean_p.shape)
    mbg = background(mov_mod)
    clean_t = torch.from_numpy(clean_p - np.float32(mbg))[None, None]
    moving_clean = sample(clean_t, points, "zeros")[0, 0].numpy() + np.float32(mbg)
    moving_labels = sample(torch.from_numpy(classes.astype(np.float32))[None, None], points, "zeros", "nearest")
    degraded, deg_params = degrade(kind.degradation, moving_clean, grid.GetSpacing(), split, rngs["degradation"])

    truth_p = _truth_field(padded, affine, n_vox)
    images = {
        "reference": _image(_crop(ref_p, pad), ref_grid, modality),
        "moving": _image(degraded, grid, mov_mod),
        "moving_clean": _image(moving_clean, grid, mov_mod),
        "truth_displacement": _image(np.ascontiguousarray(truth_p[pad:-pad, pad:-pad, pad:-pad]), ref_grid),
        "truth_moving_aligned_clean": _image(_crop(clean_p, pad), ref_grid, mov_mod),
        "reference_labels": sitk.Cast(_image(_crop(classes, pad), ref_grid), sitk.sitkUInt8),
        "moving_labels": sitk.Cast(_image(np.rint(moving_labels[0, 0].numpy()).astype(np.uint8), grid), sitk.sitkUInt8),
    }
    check = _check_truth(images["moving_clean"], images["truth_moving_aligned_clean"], images["truth_displacement"],
                         _crop(mask_p, pad))
    info = {
        "kind": kind.name, "category": category, "split": split, "body_part": body_part,
        "reference": {"modality": modality, "grid": ref_record},
        "moving": {"modality": mov_mod, "kind_modality": kind.moving_modality, "synthesis": synth, "grid": grid_record},
        "degradation": kind.degradation,
        "degradation_settings": split if kind.degradation != "none" else None,
        "degradation_params": deg_params,
        "misalignment": {
            "point_map": "T(x) = c + M (x + n(x) - c) + t, M = Rz Ry Rx diag(scaling); truth U(x) = T(x) - x",
            "rotation_deg": affine["rotation_deg"].round(4).tolist(), "scaling": affine["scaling"].round(5).tolist(),
            "translation_mm": affine["translation"].round(4).tolist(), "centre_mm": affine["centre"].round(3).tolist(),
            "matrix": affine["matrix"].round(6).tolist(),
            "nonrigid": {"max_length_mm": round(amplitude, 4), "correlation_mm": round(correlation, 3),
                         "control_points": control, "min_jacobian": round(min_jacobian(n_vox), 4),
                         "achieved_max_mm": round(float(np.linalg.norm(n_vox, axis=0).max() * s), 4)},
        },
        "inverse": {"method": "closed-form A^-1, fixed point m = -n(z + m) at the moving grid's points",
                    **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in inverse.items()}},
        "labels": names,
        "truth_check": check,
    }
    return BuiltCase(images=images, info=info)
