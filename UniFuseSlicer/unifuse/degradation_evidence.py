"""Degradation evidence measured on the moving volume at its own resolution and in its own units.

The DAPL classifier of the network sees the moving volume on a coarse, intensity-normalised working grid and
was trained on degradations applied at 32³, so it does not transfer to real volumes. This module measures
physical cues of the three degradations on the volume as read from disk (HU for CT, native voxel spacing in
mm) and turns them, optionally with the network's probabilities, into calibrated class probabilities.

Cues (all deterministic; see :data:`FEATURES` for names and units):

* **CT / HU scale** — :func:`unifuse.intensity.looks_like_ct`, or a float volume whose air peak sits at
  -1000 HU (a resampled CT is no longer integer valued).
* **metal** (CT only) — the volume of voxels >= :data:`METAL_HU` (3000 HU: metal saturates the 12-bit HU
  scale at 3071; cortical bone stays under ~2000 HU and tooth enamel under ~3000 HU), and the *streaks* in
  the axial slices through those voxels: (1) the radial anisotropy of the image gradient in a 3–50 mm
  ring of soft tissue around the bright voxels — metal streaks are lines through the metal, so the gradient
  across them is tangential, while noise and anatomy are isotropic on average; (2) the gradient energy of
  that ring's soft tissue relative to soft tissue of slices away from the bright voxels.
* **motion** (not CT) — ghosting: rigid motion between k-space segments corrupts whole phase-encode lines,
  whose error spreads along the phase-encode axis over the whole field of view but stays inside the object's
  extent along the other axes. In the background of the band the object projects onto along an in-plane axis
  a, the line means along a vary between neighbouring lines far more than noise allows (streaks), and more
  than the line means along the other in-plane axis (which cancels spatially correlated noise).
* **low dose** (not CT) — count-limited noise. The in-plane high-pass residual (voxel minus the mean of its
  4 neighbours, scaled to the noise σ) is measured in the flattest 5×5 patches of each intensity bin inside
  the object. Poisson noise has variance ∝ mean: the exponent of σ ∝ mean^b is ~0.5 (additive MR noise ~0),
  ``mean / (σ²/mean)`` is the equivalent number of counts per voxel, the noise is white (per voxel), and
  where there is no activity there is no noise (MR backgrounds carry Rayleigh noise). Their conjunction is
  :func:`count_limited_score`.

:func:`degradation_evidence` measures them; :func:`combine` maps them (plus the log network probabilities if
given) to calibrated probabilities with a gated multinomial logistic regression and a temperature, fitted on
simulated *training* cases (``docs/probes/degradation_evidence_fit.py``, parameters in
``Resources/Models/degradation_evidence.json``; the protocol and its numbers are in ``docs/network.md``).
Arrays are numpy (z, y, x); axis 0 is the slice (axial)
axis of CT. Only numpy, scipy and SimpleITK are used.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .config import DEGRADATION_CLASSES, MOVING_MODALITIES
from .errors import InputImageError
from .intensity import CT_AIR_FRACTION, CT_AIR_HU, looks_like_ct
from .weights import models_dir

__all__ = [
    "FEATURES",
    "FEATURE_NAMES",
    "METAL_HU",
    "Evidence",
    "DegradationDecision",
    "Calibration",
    "degradation_evidence",
    "evidence_from_array",
    "combine",
    "load_calibration",
    "calibration_path",
    "count_limited_score",
    "GATES",
    "MODALITIES",
    "STATED_MODEL",
    "gate_open",
    "in_hounsfield_units",
    "measured_modality",
]

#: HU at and above which a CT voxel counts as metal (scanner maximum 3071 on the standard 12-bit scale).
METAL_HU: float = 3000.0
#: Voxels of the regular sub-sample used for global statistics (percentiles, the CT test).
SAMPLE_VOXELS: int = 1_000_000
#: Voxels of the sub-sampled copy used for the ghosting measurement.
GHOST_VOXELS: int = 2_000_000
#: Slices used for the noise measurement.
NOISE_SLICES: int = 24
#: Slices through metal analysed for streaks (those with the most metal voxels).
STREAK_SLICES: int = 8
#: Inner and outer radius (mm) of the ring around metal voxels in which streaks are measured.
STREAK_RING_MM: Tuple[float, float] = (3.0, 50.0)
#: Soft tissue window (HU) of the streak measurement (after a 5×5 median, which removes thin streaks).
SOFT_TISSUE_HU: Tuple[float, float] = (-300.0, 400.0)
#: Object threshold of the ghosting and noise measurements, as a fraction of the 99.5th percentile.
OBJECT_FRACTION: float = 0.05
#: Distance (mm) from the object beyond which voxels count as background (clear of blur and PSF tails).
BACKGROUND_MARGIN_MM: float = 8.0
#: Background voxels below this fraction of the 99.5th percentile count as unmeasured (padding, noise-free).
MEASURED_FRACTION: float = 5e-3
#: 20th percentile of the 5×5 mean of the squared 4-neighbour residual for white noise of unit variance
#: (measured on 8×256² Gaussian noise; makes :func:`_flat_sigma` an unbiased σ for white noise).
FLAT_Q20: float = 0.703
#: Cap of the equivalent counts (noise-free volumes would give infinity).
MAX_COUNTS: float = 1e5

#: name -> (unit, what it measures). Order = feature vector order of the calibration.
FEATURES: Dict[str, Tuple[str, str]] = {
    "ct_like": ("1 (bool)", "the volume is a CT in HU (looks_like_ct, or an air peak at -1000 HU)"),
    "log10_metal_mm3": ("log10(mm³)", "log10(1 + volume of voxels >= 3000 HU); 0 if not CT"),
    "streak_anisotropy": (
        "1 (log ratio)", "ln(tangential / radial gradient energy) of soft tissue 3-50 mm from metal voxels; 0 if none"),
    "streak_energy": (
        "1 (log ratio)", "ln(gradient energy of that ring / of soft tissue in slices without metal); 0 if none"),
    "ghost_percent": (
        "% of object median", "max over in-plane axes of the background excess inside the object's band along "
                              "that axis; 0 for CT"),
    "ghost_coherence": (
        "log10(1)", "max over in-plane axis pairs (a, c) of log10 Q_a - log10 Q_c in the background band of a; Q_a "
                    "= variance between neighbouring lines of the line means along a / that of independent noise "
                    "(≈1 for noise, ≫1 for ghost streaks along a); 0 for CT or without measured background"),
    "log10_counts": (
        "log10(counts)", "equivalent detected counts per voxel at the object's mean intensity, mean/(σ²/mean), "
                         "capped at 1e5; 5 for CT"),
    "noise_exponent": (
        "1", "b in σ ∝ mean^b of the high-pass residual over intensity bins (Poisson 0.5, additive 0)"),
    "poisson_mismatch": ("1", "|noise_exponent - 0.5|: 0 for Poisson (count-limited) noise; 0.5 if unmeasured"),
    "nsr_high_percent": ("% of signal", "robust σ / mean of the brightest 10 % of the object (high uptake)"),
    "noise_whiteness": (
        "log2(1)", "log2(σ of the residual to neighbours 2 voxels away / σ to neighbours 1 voxel away) in the "
                   "object: 0 for white (per-voxel) noise, up to 2 for smooth anatomy; 2 for CT"),
    "count_limited_score": (
        "log10(counts)", "deficit of counts below full dose × Poisson-exponent match × whiteness (see "
                         "count_limited_score); 0 for CT or when any condition fails"),
    "background_noise_ratio": (
        "1", "robust σ of the residual in measured background / σ in the object at its mean intensity: additive "
             "(MR, Rician) noise ~0.65, count-limited noise ~0 (no counts, no noise); 0 if no measured background"),
}
FEATURE_NAMES: Tuple[str, ...] = tuple(FEATURES)

PathLike = Union[str, Path]


# --------------------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class Evidence:
    """Degradation cues of one volume.

    Attributes:
        features: :data:`FEATURE_NAMES` -> value (units in :data:`FEATURES`).
        modality: ``"ct"`` or ``"mr_or_pet"`` as measured (the HU test), or the modality the user stated
            (``"ct"``, ``"mr"``, ``"pet"``).
        details: supporting measurements (metal voxel count, ghost axis, per-axis ghost excess, voxel step...).
        seconds: time spent measuring.
        stated: whether ``modality`` was stated by the user rather than measured.
    """

    features: Dict[str, float]
    modality: str
    details: Dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    stated: bool = False

    def vector(self, names: Sequence[str] = FEATURE_NAMES) -> np.ndarray:
        """The features in ``names`` order as float64."""
        return np.array([float(self.features[n]) for n in names], dtype=np.float64)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready description: features with units, modality, details, seconds."""
        return {
            "features": {n: {"value": float(v), "unit": FEATURES[n][0]} for n, v in self.features.items()},
            "modality": self.modality,
            "modality_stated": self.stated,
            "details": dict(self.details),
            "seconds": float(self.seconds),
        }


@dataclass(frozen=True)
class DegradationDecision(Mapping[str, float]):
    """Calibrated class probabilities (a read-only mapping class -> probability) and how they were reached.

    Attributes:
        probabilities: :data:`unifuse.config.DEGRADATION_CLASSES` -> probability (sums to 1).
        evidence: the measured :class:`Evidence`.
        cues: class -> whether its physical cue fired (thresholds in the calibration file).
        used_network: whether network probabilities entered the model.
        model: name of the calibrated model used (``"evidence"``, ``"evidence+network"`` or
            :data:`STATED_MODEL`).
    """

    probabilities: Dict[str, float]
    evidence: Evidence
    cues: Dict[str, bool]
    used_network: bool
    model: str

    def __getitem__(self, key: str) -> float:
        return self.probabilities[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.probabilities)

    def __len__(self) -> int:
        return len(self.probabilities)

    @property
    def predicted(self) -> str:
        """The most probable class."""
        return max(self.probabilities, key=self.probabilities.__getitem__)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready record for the run report."""
        return {
            "predicted": self.predicted,
            "probabilities": {k: float(v) for k, v in self.probabilities.items()},
            "cues_fired": [k for k, v in self.cues.items() if v],
            "used_network": self.used_network,
            "model": self.model,
            "evidence": self.evidence.to_dict(),
        }


# --------------------------------------------------------------------------------------------------------
# helpers


def _step_for(n_voxels: int, limit: int) -> int:
    """Smallest stride s along every axis with n / s³ <= limit."""
    step = 1
    while n_voxels / step**3 > limit:
        step += 1
    return step


def is_hu_volume(image: sitk.Image, array: np.ndarray) -> bool:
    """CT in HU (``array``: the image's voxels or a regular sub-sample of them): :func:`looks_like_ct`, or
    (for float volumes, e.g. a resampled CT) at least :data:`~unifuse.intensity.CT_AIR_FRACTION` of the voxels
    air with the 0.5th percentile in [-1100, -900] HU (the air peak)."""
    if looks_like_ct(image, array):
        return True
    flat = np.asarray(array, dtype=np.float32).ravel()
    if flat.size == 0 or float(np.count_nonzero(flat < CT_AIR_HU)) / flat.size < CT_AIR_FRACTION:
        return False
    low = float(np.percentile(flat, 0.5))
    return -1100.0 <= low <= -900.0


def in_hounsfield_units(array_zyx: np.ndarray) -> bool:
    """The HU test :func:`degradation_evidence` applies to a (z, y, x) volume in its own units:
    :func:`is_hu_volume` on a regular sub-sample of at most :data:`SAMPLE_VOXELS` voxels, as float32 (the
    pipeline's working copy; for integer voxels the result is the same)."""
    step = _step_for(array_zyx.size, SAMPLE_VOXELS)
    sample = np.ascontiguousarray(array_zyx[::step, ::step, ::step], dtype=np.float32)
    return bool(is_hu_volume(sitk.GetImageFromArray(sample), sample))


# --------------------------------------------------------------------------------------------------------
# metal


def _tissue_mask(slice_hu: np.ndarray) -> np.ndarray:
    """Soft tissue away from air/bone edges: 5×5 median (removes thin streaks) inside :data:`SOFT_TISSUE_HU`,
    eroded by 2 pixels."""
    med = ndimage.median_filter(slice_hu, size=5, mode="nearest")
    soft = (med >= SOFT_TISSUE_HU[0]) & (med <= SOFT_TISSUE_HU[1])
    return ndimage.binary_erosion(soft, iterations=2)


def _gradient(slice_hu: np.ndarray, pixel_mm: Tuple[float, float]) -> Tuple[np.ndarray, np.ndarray]:
    """Central-difference gradient (HU/mm) along (y, x) of a slice clipped to [-1024, 3071] HU."""
    s = np.clip(slice_hu, -1024.0, 3071.0)
    return np.gradient(s, pixel_mm[0], axis=0), np.gradient(s, pixel_mm[1], axis=1)


def metal_features(array: np.ndarray, spacing_xyz: Sequence[float]) -> Tuple[Dict[str, float], Dict[str, Any]]:
    """Metal cues of a CT volume in HU (see the module docstring).

    Returns:
        ({"log10_metal_mm3", "streak_anisotropy", "streak_energy"}, details).
    """
    sx, sy, sz = (float(s) for s in spacing_xyz)
    pixel = (sy, sx)
    metal = array >= METAL_HU
    per_slice = metal.sum(axis=(1, 2))
    count = int(per_slice.sum())
    details: Dict[str, Any] = {"metal_voxels": count, "metal_hu": METAL_HU}
    out = {"log10_metal_mm3": math.log10(1.0 + count * sx * sy * sz), "streak_anisotropy": 0.0, "streak_energy": 0.0}
    if count == 0:
        return out, details
    metal_slices = np.nonzero(per_slice)[0]
    chosen = metal_slices[np.argsort(-per_slice[metal_slices], kind="stable")[:STREAK_SLICES]]
    ring_lo, ring_hi = STREAK_RING_MM
    e_t = e_r = 0.0
    ring_energy, ring_n = 0.0, 0
    margin = [int(math.ceil(ring_hi / p)) + 3 for p in pixel]
    for z in sorted(int(k) for k in chosen):
        ys, xs = np.nonzero(metal[z])
        y0, y1 = max(0, ys.min() - margin[0]), min(array.shape[1], ys.max() + margin[0] + 1)
        x0, x1 = max(0, xs.min() - margin[1]), min(array.shape[2], xs.max() + margin[1] + 1)
        s = np.asarray(array[z, y0:y1, x0:x1], dtype=np.float32)
        m = metal[z, y0:y1, x0:x1]
        dist, (iy, ix) = ndimage.distance_transform_edt(~m, sampling=pixel, return_indices=True)
        ring = (dist >= ring_lo) & (dist <= ring_hi) & _tissue_mask(s)
        if np.count_nonzero(ring) < 20:
            continue
        gy, gx = _gradient(s, pixel)
        yy, xx = np.nonzero(ring)
        ry = (yy - iy[ring]) * pixel[0]
        rx = (xx - ix[ring]) * pixel[1]
        norm = np.hypot(ry, rx)
        ry, rx = ry / norm, rx / norm
        g_r = gy[ring] * ry + gx[ring] * rx
        g_t = -gy[ring] * rx + gx[ring] * ry
        e_r += float(np.sum(g_r.astype(np.float64) ** 2))
        e_t += float(np.sum(g_t.astype(np.float64) ** 2))
        ring_energy += float(np.sum(g_r.astype(np.float64) ** 2 + g_t.astype(np.float64) ** 2))
        ring_n += int(ring.sum())
    if ring_n == 0 or e_r <= 0:
        details["streak_ring_voxels"] = 0
        return out, details
    out["streak_anisotropy"] = math.log(e_t / e_r)
    # reference: soft tissue of slices at least 10 mm from any metal slice
    far = np.ones(array.shape[0], dtype=bool)
    reach = int(math.ceil(10.0 / sz))
    for z in metal_slices:
        far[max(0, z - reach): z + reach + 1] = False
    candidates = np.nonzero(far)[0]
    ref_energy, ref_n = 0.0, 0
    if candidates.size:
        picks = candidates[np.linspace(0, candidates.size - 1, min(4, candidates.size)).round().astype(int)]
        for z in picks:
            s = np.asarray(array[int(z)], dtype=np.float32)
            tissue = _tissue_mask(s)
            if np.count_nonzero(tissue) < 20:
                continue
            gy, gx = _gradient(s, pixel)
            ref_energy += float(np.sum(gy[tissue].astype(np.float64) ** 2 + gx[tissue].astype(np.float64) ** 2))
            ref_n += int(tissue.sum())
    if ref_n > 0 and ref_energy > 0:
        out["streak_energy"] = math.log((ring_energy / ring_n) / (ref_energy / ref_n))
    details.update(streak_slices=[int(z) for z in sorted(chosen)], streak_ring_voxels=ring_n,
                   reference_tissue_voxels=ref_n)
    return out, details


# --------------------------------------------------------------------------------------------------------
# motion


def inplane_axes(spacing_xyz: Sequence[float]) -> Tuple[int, ...]:
    """Array axes (z=0, y=1, x=2) that can be phase-encode axes: all but the slice axis (the coarsest, if it
    is at least 1.2× the finest spacing), else all three."""
    s_zyx = np.asarray(spacing_xyz, dtype=np.float64)[::-1]
    if s_zyx.max() >= 1.2 * s_zyx.min():
        return tuple(a for a in range(3) if a != slice_axis(spacing_xyz))
    return (0, 1, 2)


def slice_axis(spacing_xyz: Sequence[float]) -> int:
    """Array axis of the slices: the coarsest spacing if it is at least 1.2× the finest, else 0 (z)."""
    s_zyx = np.asarray(spacing_xyz, dtype=np.float64)[::-1]
    return int(np.argmax(s_zyx)) if s_zyx.max() >= 1.2 * s_zyx.min() else 0


def _fill_object(mask: np.ndarray, axis: int) -> np.ndarray:
    """Fill the holes of ``mask`` slice by slice (2D, in the planes across ``axis``): dark structures enclosed
    by the body in a slice (lungs, airways, ventricles) belong to the object, not to the background. (A 3D
    fill would leave the lungs open to the outside air through the airways.)"""
    structure = np.zeros((3, 3, 3), dtype=bool)
    for other in range(3):
        if other == axis:
            continue
        for offset in (0, 2):
            idx = [1, 1, 1]
            idx[other] = offset
            structure[tuple(idx)] = True
    structure[1, 1, 1] = True
    return ndimage.binary_fill_holes(mask, structure=structure)


def _measured_enough(region: np.ndarray, measured: np.ndarray) -> bool:
    """At least 50 voxels and 1 % of ``region`` are measured (not exact zeros)."""
    n = np.count_nonzero(region & measured)
    return n >= max(50, 0.01 * np.count_nonzero(region))


def _line_coherence(values: np.ndarray, region: np.ndarray, along: int, across: int) -> Optional[float]:
    """How much of the background's variation is coherent along axis ``along``: Q = (variance of the mean of
    each line along ``along`` between neighbouring lines along ``across``) / (what independent noise of the
    same pixel-level variance would give). Q ≈ 1 for noise, up to the line length for streaks running along
    ``along`` (ghosts). None if there are too few lines or no variation."""
    v = np.where(region, values, 0.0).astype(np.float64)
    n = region.sum(axis=along)
    mean = v.sum(axis=along) / np.maximum(n, 1)
    c = across if across < along else across - 1
    lo = [slice(None)] * 2
    hi = [slice(None)] * 2
    lo[c], hi[c] = slice(0, -1), slice(1, None)
    n1, n2 = n[tuple(lo)], n[tuple(hi)]
    ok = (n1 >= 3) & (n2 >= 3)
    lo3 = [slice(None)] * 3
    hi3 = [slice(None)] * 3
    lo3[across], hi3[across] = slice(0, -1), slice(1, None)
    both = region[tuple(lo3)] & region[tuple(hi3)]
    diff = (values[tuple(hi3)].astype(np.float64) - values[tuple(lo3)])[both]
    if np.count_nonzero(ok) < 10 or diff.size < 50:
        return None
    pixel_var = float(np.mean(diff**2)) / 2.0
    if pixel_var <= 0:
        return None
    line_var = float(np.mean((mean[tuple(lo)] - mean[tuple(hi)])[ok] ** 2)) / 2.0
    expected = float(np.mean(pixel_var * (1.0 / n1[ok] + 1.0 / n2[ok]) / 2.0))
    return line_var / expected


def _residual_4(a: np.ndarray, k: int = 1) -> np.ndarray:
    """In-plane (axes 1, 2) high-pass residual: voxel minus the mean of its 4 neighbours at distance ``k``,
    times sqrt(0.8) so that white noise of standard deviation σ gives a residual of standard deviation σ.
    Shape (z, y-2k, x-2k)."""
    nb = 0.25 * (a[:, :-2 * k, k:-k] + a[:, 2 * k:, k:-k] + a[:, k:-k, :-2 * k] + a[:, k:-k, 2 * k:])
    return (a[:, k:-k, k:-k] - nb) * math.sqrt(0.8)


def _flat_sigma(local_var: np.ndarray) -> float:
    """Noise σ from local residual variances (:func:`_local_residual_var`): the 20th percentile — the flattest
    patches, where anatomy adds little — divided by its value for white noise (:data:`FLAT_Q20`)."""
    if local_var.size == 0:
        return 0.0
    return math.sqrt(max(float(np.quantile(local_var, 0.2)), 0.0) / FLAT_Q20)


def _local_residual_var(a: np.ndarray, k: int = 1) -> np.ndarray:
    """Mean of the squared 4-neighbour residual (neighbours at distance ``k``) over 5×5 in-plane windows;
    shape (z, y-2k, x-2k)."""
    r = _residual_4(np.asarray(a, dtype=np.float64), k)
    return ndimage.uniform_filter(r * r, size=(1, 5, 5), mode="nearest")


def _background_sigma(b: np.ndarray, region: np.ndarray) -> Optional[float]:
    """Noise σ of the measured background (voxels whose 5×5 in-plane window lies in ``region``), or None with
    fewer than 500 such voxels (no measured background, e.g. a masked or noise-free volume)."""
    if b.shape[1] < 7 or b.shape[2] < 7:
        return None
    inside = ndimage.uniform_filter(region.astype(np.float32), size=(1, 7, 7), mode="constant") > 0.999
    core = inside[:, 1:-1, 1:-1]
    if np.count_nonzero(core) < 500:
        return None
    return _flat_sigma(_local_residual_var(b)[core])


def object_threshold(sample: np.ndarray) -> float:
    """Intensity above which a (smoothed) voxel belongs to the object: :data:`OBJECT_FRACTION` of the 99.5th
    percentile, raised above a noisy background — 1.5× the 10th percentile (the background's mean level for
    magnitude noise), capped at 25 % of the 99.5th percentile."""
    flat = np.asarray(sample, dtype=np.float32).ravel()
    high = float(np.percentile(flat, 99.5))
    floor = 1.5 * float(np.percentile(flat, 10.0))
    return max(OBJECT_FRACTION * high, min(floor, 0.25 * high))


def ghost_features(array: np.ndarray, spacing_xyz: Sequence[float]) -> Tuple[Dict[str, float], Dict[str, Any]]:
    """Ghosting along candidate phase-encode axes of a non-CT volume (see the module docstring).

    Returns:
        ({"ghost_percent"}, details with the per-axis excess in % and the axis of the maximum).
    """
    step = _step_for(array.size, GHOST_VOXELS)
    b = np.asarray(array[::step, ::step, ::step], dtype=np.float32)
    spacing_zyx = np.asarray(spacing_xyz, dtype=np.float64)[::-1] * step
    high = float(np.percentile(b, 99.5))
    details: Dict[str, Any] = {"ghost_step": step}
    if high <= 0:
        return {"ghost_percent": 0.0, "ghost_coherence": 0.0}, details
    smooth = ndimage.uniform_filter(b, size=3, mode="nearest")
    axes = inplane_axes(spacing_xyz)
    threshold = object_threshold(smooth)
    obj = _fill_object(smooth > threshold, slice_axis(spacing_xyz))
    if not obj.any():
        return {"ghost_percent": 0.0, "ghost_coherence": 0.0}, details
    level = float(np.median(b[obj]))
    # background: at least BACKGROUND_MARGIN_MM from the object; padding (exact zeros) carries no measurement
    reach = np.maximum(1, np.ceil(BACKGROUND_MARGIN_MM / spacing_zyx)).astype(int)
    near = ndimage.maximum_filter(obj, size=tuple(2 * reach + 1), mode="constant")
    background = ~near
    measured = np.abs(b) > MEASURED_FRACTION * high
    clipped = np.minimum(b, threshold)
    excess: Dict[int, float] = {}
    for a in axes:
        band = np.broadcast_to(near.any(axis=a, keepdims=True), b.shape)
        inside = background & band
        outside = background & ~band
        n_in, n_out = np.count_nonzero(inside), np.count_nonzero(outside)
        if n_in < 50 or n_out < 50:
            continue
        # padding (exact zeros) carries no measurement: compare measured voxels when both regions have them;
        # a noise-free synthetic background (exact zeros almost everywhere) is averaged whole
        if _measured_enough(inside, measured) and _measured_enough(outside, measured):
            inside, outside = inside & measured, outside & measured
        m_in, m_out = float(clipped[inside].mean()), float(clipped[outside].mean())
        excess[a] = 100.0 * (m_in - m_out) / level
    # ghosts are streaks along the phase-encode axis a: the background's line means along a vary between
    # neighbouring lines much more than those along the other in-plane axis c; spatially correlated noise
    # (interpolation, reconstruction filters) inflates both alike and cancels in the difference
    coherence: Dict[str, float] = {}
    for a in axes:
        region = background & np.broadcast_to(near.any(axis=a, keepdims=True), b.shape) & measured
        for c in axes:
            if c != a:
                q_a = _line_coherence(clipped, region, a, c)
                q_c = _line_coherence(clipped, region, c, a)
                if q_a is not None and q_c is not None:
                    coherence[f"{a}{c}"] = math.log10(max(q_a, 1e-3)) - math.log10(max(q_c, 1e-3))
    details.update(ghost_excess_percent={str(a): round(v, 4) for a, v in excess.items()}, object_level=level,
                   inplane_axes=list(axes), ghost_coherence_log10={k: round(v, 3) for k, v in coherence.items()},
                   background_sigma=_background_sigma(b, background & measured))
    out = {"ghost_percent": 0.0, "ghost_coherence": max([0.0, *coherence.values()])}
    if excess:
        axis = max(excess, key=excess.__getitem__)
        details["ghost_axis"] = int(axis)
        out["ghost_percent"] = max(0.0, excess[axis])
    return out, details


# --------------------------------------------------------------------------------------------------------
# count-limited noise


#: Standard deviation of a Rayleigh variable (magnitude of complex Gaussian noise of σ = 1, the MR
#: background): converts the background's residual σ to the underlying Gaussian σ.
RAYLEIGH_STD: float = 0.655
#: Bins darker than this many Gaussian σ of the background noise are left out of the noise-vs-mean fit:
#: there magnitude (Rician) noise is compressed, which would mimic a signal-dependent noise.
RICIAN_FLOOR_SIGMAS: float = 3.0


def noise_features(
    array: np.ndarray, background_sigma: Optional[float] = None,
) -> Tuple[Dict[str, float], Dict[str, Any]]:
    """Signal-dependent noise of a non-CT volume from the in-plane 4-neighbour residual (see the module
    docstring). ``background_sigma`` (residual σ of the measured background, if any) sets the Rician floor
    below which intensity bins are not used for the exponent and the equivalent counts.

    Returns:
        ({"log10_counts", "noise_exponent", "nsr_high_percent", "noise_whiteness"}, details).
    """
    neutral = {"log10_counts": math.log10(MAX_COUNTS), "noise_exponent": 0.0, "poisson_mismatch": 0.5,
               "nsr_high_percent": 0.0, "noise_whiteness": 2.0}
    step = _step_for(array.size, SAMPLE_VOXELS)
    sample = np.asarray(array[::step, ::step, ::step])
    high = float(np.percentile(sample, 99.5))
    if high <= 0 or array.shape[1] < 5 or array.shape[2] < 5:
        return neutral, {}
    threshold = object_threshold(ndimage.uniform_filter(sample.astype(np.float32), size=3, mode="nearest"))
    occupied = np.nonzero(np.asarray(array[:, ::4, ::4]).max(axis=(1, 2)) > threshold)[0]
    if occupied.size == 0:
        return neutral, {}
    picks = np.unique(np.linspace(occupied[0], occupied[-1], min(NOISE_SLICES, occupied.size)).round().astype(int))
    var_list: List[np.ndarray] = []
    mean_list: List[np.ndarray] = []
    v1_list: List[np.ndarray] = []
    v2_list: List[np.ndarray] = []
    for z in picks:
        s = np.asarray(array[int(z)], dtype=np.float32)
        local = ndimage.uniform_filter(s, size=3, mode="nearest")[1:-1, 1:-1]
        keep = local > threshold
        v1 = _local_residual_var(s[None])[0]
        var_list.append(v1[keep])
        mean_list.append(local[keep])
        if min(s.shape) > 8:
            inner = keep[1:-1, 1:-1]
            v1_list.append(v1[1:-1, 1:-1][inner])
            v2_list.append(_local_residual_var(s[None], 2)[0][inner])
    var = np.concatenate(var_list)
    mean = np.concatenate(mean_list).astype(np.float64)
    if var.size < 200:
        return neutral, {}
    edges = np.quantile(mean, np.linspace(0.0, 1.0, 9))
    sig, mu = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (mean >= lo) & (mean <= hi)
        if np.count_nonzero(sel) < 25:
            continue
        sig.append(_flat_sigma(var[sel]))
        mu.append(float(np.median(mean[sel])))
    sig_a, mu_a = np.asarray(sig), np.asarray(mu)
    floor = RICIAN_FLOOR_SIGMAS * background_sigma / RAYLEIGH_STD if background_sigma else 0.0
    ok = (sig_a > 0) & (mu_a > max(floor, 0.0))
    object_mean = float(mean.mean())
    details: Dict[str, Any] = {"noise_voxels": int(var.size), "noise_slices": int(picks.size),
                               "object_mean": object_mean}
    out = dict(neutral)
    if np.count_nonzero(ok) >= 3:
        slope = np.polyfit(np.log(mu_a[ok]), np.log(sig_a[ok]), 1)[0]
        out["noise_exponent"] = float(slope)
        out["poisson_mismatch"] = float(min(abs(slope - 0.5), 3.0))
        gain = float(np.median(sig_a[ok] ** 2 / mu_a[ok]))
        details["sigma_at_mean"] = float(np.interp(object_mean, mu_a[ok], sig_a[ok]))
        counts = object_mean / gain if gain > 0 else MAX_COUNTS
        out["log10_counts"] = math.log10(min(max(counts, 1.0), MAX_COUNTS))
    if v1_list:
        s1, s2 = _flat_sigma(np.concatenate(v1_list)), _flat_sigma(np.concatenate(v2_list))
        if s1 > 0 and s2 > 0:
            out["noise_whiteness"] = float(np.clip(math.log2(s2 / s1), -1.0, 3.0))
    top = mean >= np.quantile(mean, 0.9)
    if np.count_nonzero(top) >= 25:
        out["nsr_high_percent"] = 100.0 * _flat_sigma(var[top]) / float(np.median(mean[top]))
    details["bins"] = {"mean": [round(v, 6) for v in mu], "sigma": [round(v, 6) for v in sig]}
    return out, details


# --------------------------------------------------------------------------------------------------------
# evidence


#: Tolerances of :func:`count_limited_score`: full-dose counts (log10), exponent tolerance around 0.5,
#: whiteness above which the residual is anatomy rather than noise.
COUNT_LIMITED_FULL_LOG10: float = 2.5
COUNT_LIMITED_EXPONENT_TOL: float = 0.3
COUNT_LIMITED_WHITENESS_MAX: float = 0.8


def count_limited_score(features: Mapping[str, float]) -> float:
    """Evidence of count-limited (low-dose) noise as a product of its three physical conditions, each a hinge
    in [0, 1] except the first: (log10 counts below :data:`COUNT_LIMITED_FULL_LOG10`, i.e. fewer counts per
    voxel than a full-dose PET) × (noise exponent within :data:`COUNT_LIMITED_EXPONENT_TOL` of the Poisson 0.5)
    × (residual white, whiteness below :data:`COUNT_LIMITED_WHITENESS_MAX`). 0 for CT. A product, because each
    condition alone is common in clean MR (low SNR, texture that happens to scale like √mean)."""
    if float(features.get("ct_like", 0.0)) >= 0.5:
        return 0.0
    deficit = max(0.0, COUNT_LIMITED_FULL_LOG10 - float(features["log10_counts"]))
    poisson = max(0.0, 1.0 - float(features["poisson_mismatch"]) / COUNT_LIMITED_EXPONENT_TOL)
    white = max(0.0, 1.0 - max(float(features["noise_whiteness"]), 0.0) / COUNT_LIMITED_WHITENESS_MAX)
    return deficit * poisson * white


def _noise_ratio(background_sigma: Optional[float], object_sigma: Optional[float]) -> float:
    """Background noise σ / object noise σ at the mean intensity, capped at 3; 0 when either is unknown."""
    if not background_sigma or not object_sigma or object_sigma <= 0:
        return 0.0
    return float(min(background_sigma / object_sigma, 3.0))


def evidence_from_array(array: np.ndarray, spacing_xyz: Sequence[float], ct: bool,
                        stated_modality: Optional[str] = None) -> Evidence:
    """:class:`Evidence` of a (z, y, x) array in physical units with (x, y, z) spacing in mm; ``ct`` says
    whether it is a CT in HU; ``stated_modality`` (``"ct"``, ``"mr"``, ``"pet"``) is the modality the user
    gave, None when it is only measured."""
    t0 = time.perf_counter()
    a = np.asarray(array)
    if a.ndim != 3:
        raise ValueError(f"degradation evidence needs a 3D volume; got shape {a.shape}")
    details: Dict[str, Any] = {"shape_zyx": list(a.shape), "spacing_mm_xyz": [float(s) for s in spacing_xyz]}
    spacing = [float(s) for s in spacing_xyz]
    features: Dict[str, float] = {"ct_like": 1.0 if ct else 0.0}
    if ct:
        metal, d = metal_features(a, spacing)
        features.update(metal)
        details.update(d)
        features.update(ghost_percent=0.0, ghost_coherence=0.0, log10_counts=math.log10(MAX_COUNTS),
                        noise_exponent=0.0, poisson_mismatch=0.5, nsr_high_percent=0.0, noise_whiteness=2.0,
                        background_noise_ratio=0.0)
    else:
        features.update(log10_metal_mm3=0.0, streak_anisotropy=0.0, streak_energy=0.0)
        ghost, d = ghost_features(a, spacing)
        features.update(ghost)
        details.update(d)
        noise, d = noise_features(a, details.get("background_sigma"))
        features.update(noise)
        details.update(d)
        features["background_noise_ratio"] = _noise_ratio(details.get("background_sigma"), d.get("sigma_at_mean"))
    features["count_limited_score"] = count_limited_score(features)
    ordered = {n: float(features[n]) for n in FEATURE_NAMES}
    modality = stated_modality or ("ct" if ct else "mr_or_pet")
    return Evidence(ordered, modality, details, time.perf_counter() - t0, stated=stated_modality is not None)


def degradation_evidence(image: sitk.Image, modality: str = "auto") -> Evidence:
    """Measure the degradation cues of the moving volume as read (its own grid, spacing and units).

    Args:
        image: scalar 3D SimpleITK image, not intensity-normalised (HU for CT).
        modality: ``"auto"`` (CT recognised by its HU scale, otherwise MR or PET), or the modality the user
            states (:data:`MODALITIES`): it closes the gates of the degradations that modality cannot have
            (:data:`GATES`) and selects the calibrated model fitted with known modality.

    Returns:
        :class:`Evidence`. Cost is bounded for any size: the CT test and percentiles use a regular sub-sample
        of <= :data:`SAMPLE_VOXELS` voxels, ghosting a strided copy of <= :data:`GHOST_VOXELS` voxels, noise
        <= :data:`NOISE_SLICES` slices and streaks <= :data:`STREAK_SLICES` slices at full resolution; only the
        metal threshold runs over every voxel.

    Raises:
        ValueError: not a scalar 3D image, or an unknown ``modality``.
        InputImageError: ``modality="ct"`` for a volume that is not in Hounsfield units.
    """
    if modality not in MODALITIES:
        raise ValueError(f"unknown moving modality {modality!r}; use one of {', '.join(MODALITIES)}")
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("degradation evidence needs a scalar 3D image")
    array = sitk.GetArrayViewFromImage(image)
    ct = in_hounsfield_units(array)
    if modality == "ct" and not ct:
        raise InputImageError(
            "the moving volume was stated to be a CT, but it is not in Hounsfield units (no air near -1000 HU), "
            "so its metal cues cannot be measured; state its real modality (mr or pet), or let it be detected "
            "(moving modality auto)")
    if modality in ("mr", "pet"):
        ct = False
    return evidence_from_array(array, image.GetSpacing(), ct, None if modality == "auto" else modality)


# --------------------------------------------------------------------------------------------------------
# calibrated combination

#: File name of the shipped calibration in ``UniFuseSlicer/Resources/Models``.
CALIBRATION_NAME = "degradation_evidence.json"
CALIBRATION_FORMAT = "unifuse.degradation_evidence/2"
#: Moving modalities a user can state; ``auto`` measures only CT versus not CT (``"mr_or_pet"``).
MODALITIES: Tuple[str, ...] = MOVING_MODALITIES
#: Which modalities a degradation can occur in (physics): metal artefacts in CT, motion ghosts in MR,
#: count-limited (low-dose) noise in PET; a volume known only as not CT (``"mr_or_pet"``) may have either.
#: A class whose gate is closed gets the logit :data:`CLOSED_LOGIT` (probability ~1e-13).
GATES: Dict[str, Tuple[str, ...]] = {"metal": ("ct",), "motion": ("mr", "mr_or_pet"), "lowdose": ("pet", "mr_or_pet")}
CLOSED_LOGIT: float = -30.0
#: Name of the calibrated model fitted with the modality known (used when the user states it).
STATED_MODEL: str = "evidence+modality"

#: Physical cue rules used when a calibration file does not define its own: class -> {"all": [...],
#: "any": [...]} of ``[feature, ">=" or "<=", value]``; a cue fires when every "all" condition and at least
#: one "any" condition (if listed) hold.
DEFAULT_CUES: Dict[str, Dict[str, List[List[Any]]]] = {
    "metal": {"all": [["ct_like", ">=", 0.5], ["log10_metal_mm3", ">=", 1.0]], "any": []},
    "motion": {"all": [["ct_like", "<=", 0.5], ["ghost_coherence", ">=", 0.6]], "any": []},
    "lowdose": {"all": [["ct_like", "<=", 0.5], ["log10_counts", "<=", 2.3], ["poisson_mismatch", "<=", 0.2],
                        ["noise_whiteness", "<=", 0.55]], "any": []},
}


def measured_modality(features: Mapping[str, float]) -> str:
    """``"ct"`` or ``"mr_or_pet"`` from the HU test recorded in ``features["ct_like"]``."""
    return "ct" if float(features["ct_like"]) >= 0.5 else "mr_or_pet"


def gate_open(degradation: str, modality: str) -> bool:
    """Whether ``degradation`` can occur in a volume of ``modality`` (:data:`GATES`)."""
    return modality in GATES[degradation]


@dataclass(frozen=True)
class Calibration:
    """Parameters of :func:`combine` (the JSON written by ``docs/probes/degradation_evidence_fit.py``).

    Each model is a *gated* multinomial logistic regression with ``none`` as reference class: for a class c
    whose gate is open (:data:`GATES`), ``logit_c = bias_c + weights_c · (x_c - mean_c) / scale_c`` on its
    own clipped evidence features ``x_c`` (so each class is decided by its own physics), plus
    ``network_weight_k · ln p_net(k)`` for every class k (including none) in the ``evidence+network`` model;
    then ``p = softmax(logits / temperature)``.

    Attributes:
        classes: class order (:data:`unifuse.config.DEGRADATION_CLASSES`).
        clip: feature -> (low, high) clipping applied first.
        models: ``"evidence"`` and optionally ``"evidence+network"`` and :data:`STATED_MODEL` (fitted with the
            modality known) -> {"inputs": {class: [features]},
            "mean", "scale", "weights": {class: [...]}, "bias": {class: float}, "network_weight": [4] or
            absent, "temperature"}.
        cues: class -> cue rule (see :data:`DEFAULT_CUES`).
        source: where the parameters were read from.
        fitted_on: provenance of the fit (split, subjects, sample counts, validation summary).
    """

    classes: Tuple[str, ...]
    clip: Dict[str, Tuple[float, float]]
    models: Dict[str, Dict[str, Any]]
    cues: Dict[str, Dict[str, List[List[Any]]]]
    source: str = ""
    fitted_on: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "") -> "Calibration":
        """Parse and check a calibration dictionary (raises ValueError when it does not fit this code)."""
        where = source or "calibration"
        if d.get("format") != CALIBRATION_FORMAT:
            raise ValueError(f"{where}: format {d.get('format')!r}, expected {CALIBRATION_FORMAT!r}")
        classes = tuple(d["classes"])
        if classes != tuple(DEGRADATION_CLASSES):
            raise ValueError(f"{where}: classes {classes} differ from DEGRADATION_CLASSES {DEGRADATION_CLASSES}")
        models = {str(k): dict(v) for k, v in d["models"].items()}
        if "evidence" not in models:
            raise ValueError(f"{where}: no 'evidence' model")
        for name, m in models.items():
            for c in GATES:
                inputs = list(m["inputs"][c])
                unknown = [f for f in inputs if f not in FEATURES]
                sizes = {len(m["mean"][c]), len(m["scale"][c]), len(m["weights"][c])}
                if unknown or sizes != {len(inputs)} or not all(float(v) > 0 for v in m["scale"][c]):
                    raise ValueError(f"{where}: model {name!r}, class {c!r}: bad inputs/shapes ({unknown or sizes})")
            if "network_weight" in m and len(m["network_weight"]) != len(classes):
                raise ValueError(f"{where}: model {name!r}: network_weight needs {len(classes)} values")
            if not float(m["temperature"]) > 0:
                raise ValueError(f"{where}: model {name!r}: temperature must be > 0")
        clip = {str(k): (float(v[0]), float(v[1])) for k, v in d.get("clip", {}).items()}
        return cls(classes, clip, models, dict(d.get("cues", DEFAULT_CUES)), source, dict(d.get("fitted_on", {})))


def calibration_path() -> Path:
    """The shipped calibration file (``UniFuseSlicer/Resources/Models/degradation_evidence.json``)."""
    return models_dir() / CALIBRATION_NAME


_CACHE: Dict[str, Calibration] = {}


def load_calibration(path: Optional[PathLike] = None) -> Calibration:
    """Read a calibration JSON (default: the shipped one; cached per path)."""
    p = Path(path) if path is not None else calibration_path()
    key = str(p.resolve())
    if key not in _CACHE:
        if not p.is_file():
            raise FileNotFoundError(
                f"degradation calibration {p} not found; run docs/probes/degradation_evidence_fit.py")
        _CACHE[key] = Calibration.from_dict(json.loads(p.read_text()), source=str(p))
    return _CACHE[key]


def _cue_fired(rule: Mapping[str, Sequence[Sequence[Any]]], features: Mapping[str, float]) -> bool:
    def holds(cond: Sequence[Any]) -> bool:
        name, op, value = cond
        v = float(features[name])
        return v >= float(value) if op == ">=" else v <= float(value)

    any_rules = list(rule.get("any", []))
    return all(holds(c) for c in rule.get("all", [])) and (not any_rules or any(holds(c) for c in any_rules))


def network_log_probs(network_probs: Mapping[str, float], classes: Sequence[str] = DEGRADATION_CLASSES) -> np.ndarray:
    """Network probabilities in ``classes`` order, renormalised, as natural logs clipped at ln 1e-6."""
    missing = [c for c in classes if c not in network_probs]
    if missing:
        raise ValueError(f"network probabilities lack {missing}")
    p = np.array([float(network_probs[c]) for c in classes], dtype=np.float64)
    if not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
        raise ValueError(f"network probabilities must be finite, >= 0 and not all 0; got {dict(network_probs)}")
    return np.log(np.clip(p / p.sum(), 1e-6, 1.0))


def model_logits(features: Mapping[str, float], model: Mapping[str, Any], clip: Mapping[str, Tuple[float, float]],
                 classes: Sequence[str] = DEGRADATION_CLASSES,
                 network_probs: Optional[Mapping[str, float]] = None, modality: Optional[str] = None) -> np.ndarray:
    """Logits of one gated model (before the temperature), in ``classes`` order; the gates follow
    ``modality`` (default: measured from ``features``)."""
    modality = modality or measured_modality(features)
    logits = np.zeros(len(classes))
    for i, c in enumerate(classes):
        if c not in GATES:
            continue
        if not gate_open(c, modality):
            logits[i] = CLOSED_LOGIT
            continue
        x = np.array([float(np.clip(features[f], *clip.get(f, (-np.inf, np.inf)))) for f in model["inputs"][c]])
        z = (x - np.asarray(model["mean"][c], dtype=np.float64)) / np.asarray(model["scale"][c], dtype=np.float64)
        logits[i] = float(model["bias"][c]) + float(z @ np.asarray(model["weights"][c], dtype=np.float64))
    if network_probs is not None and "network_weight" in model:
        logits += np.asarray(model["network_weight"], dtype=np.float64) * network_log_probs(network_probs, classes)
    return logits


def combine(
    evidence: Evidence,
    network_probs: Optional[Mapping[str, float]] = None,
    calibration: Optional[Calibration] = None,
) -> DegradationDecision:
    """Calibrated degradation probabilities from the evidence and, if given, the network's probabilities.

    The gated logistic model of :class:`Calibration` (default: the shipped file), fitted on simulated
    training cases. When the user stated the modality (``evidence.stated``) the model fitted with the modality
    known (:data:`STATED_MODEL`) is used, the network's probabilities left out; otherwise, without network
    probabilities (e.g. an untrained network) the evidence-only model, which is calibrated on its own.

    Returns:
        :class:`DegradationDecision` — a mapping class -> probability (sums to 1) carrying the evidence, the
        cues that fired and the model used.

    Raises:
        ValueError: network probabilities that lack a class, are negative or not finite.
    """
    cal = calibration if calibration is not None else load_calibration()
    stated = evidence.stated and STATED_MODEL in cal.models
    use_network = not stated and network_probs is not None and "evidence+network" in cal.models
    name = STATED_MODEL if stated else "evidence+network" if use_network else "evidence"
    model = cal.models[name]
    logits = model_logits(evidence.features, model, cal.clip, cal.classes, network_probs if use_network else None,
                          evidence.modality)
    logits = logits / float(model["temperature"])
    logits -= logits.max()
    p = np.exp(logits)
    p /= p.sum()
    probs = {c: float(v) for c, v in zip(cal.classes, p)}
    cues = {c: _cue_fired(rule, evidence.features) for c, rule in cal.cues.items()}
    return DegradationDecision(probs, evidence, cues, use_network, name)
