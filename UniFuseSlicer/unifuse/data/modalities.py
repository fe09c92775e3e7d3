"""Imaging modalities synthesised from tissue probability maps (clean, full-quality images).

Every function maps a :class:`~unifuse.data.anatomy.Tissues` (partial-volume fractions, float32 (z, y, x))
to a float32 (z, y, x) volume on the same grid, in the modality's physical units, with its parameters drawn
from ``rng`` in the ranges documented below (and in ``docs/data.md``). Normalisation to [0, 1] is left to
the pipeline's rule (:mod:`unifuse.intensity`).

* MR (:func:`mr_contrast`): tissue signals from the spin-echo / inversion-recovery signal equations with
  randomised relaxation times and sequence timings; partial-volume mixing; point-spread blur; smooth
  multiplicative bias field (coil sensitivity); Rician noise (magnitude of complex Gaussian noise).
  Arbitrary units (fully relaxed water at TE = 0 gives 1000).
* CT (:func:`ct_like`): Hounsfield units per tissue (linear in attenuation, so partial volumes mix
  linearly), reconstruction blur, Gaussian quantum noise of a standard-dose scan.
* PET (:func:`pet_like`): FDG activity concentration per tissue (GM : WM : CSF ≈ 4 : 1 : 0.2),
  4–6 mm FWHM Gaussian point-spread function, Poisson counting noise of a full-dose scan. kBq/mL.
* Domain randomisation (:func:`random_contrast`): SynthMorph-style random intensity per label.
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Tuple

import numpy as np
from scipy import ndimage

from .anatomy import TISSUES, Tissues
from .deformations import smooth_noise

__all__ = [
    "MR_KINDS",
    "MODALITIES",
    "TISSUE_RELAXATION",
    "MR_SEQUENCES",
    "CT_HU",
    "PET_UPTAKE",
    "mr_tissue_signals",
    "mr_contrast",
    "ct_like",
    "pet_like",
    "random_contrast",
    "synthesize",
]

#: MR contrasts of :func:`mr_contrast`.
MR_KINDS: Tuple[str, ...] = ("t1", "t2", "pd", "flair")
#: Every modality :func:`synthesize` knows.
MODALITIES: Tuple[str, ...] = MR_KINDS + ("ct", "pet")

#: Tissue MR properties at 3 T: (proton density relative to water, T1 ms, T2 ms). Each is scaled by an
#: independent factor uniform in [0.95, 1.05] per image (larger spreads can swap GM/WM in PD and FLAIR).
#: Cortical bone has almost no MR-visible water and a sub-millisecond T2 (dark in every sequence); the
#: scalp is a skin/fat/muscle mixture (averaged values).
TISSUE_RELAXATION: Dict[str, Tuple[float, float, float]] = {
    "background": (0.0, 1000.0, 100.0),
    "csf": (1.00, 4000.0, 2000.0),
    "gm": (0.80, 1330.0, 110.0),
    "wm": (0.70, 830.0, 80.0),
    "bone": (0.05, 500.0, 5.0),
    "scalp": (0.75, 600.0, 60.0),
}

#: Sequence parameter ranges (ms; flip angle FA in degrees), each drawn uniformly per image. ``t1`` is a
#: spoiled gradient echo (FLASH), ``t2`` and ``pd`` are spin echo, ``flair`` is inversion recovery with TI
#: near T1_csf · ln 2 (nulls CSF).
MR_SEQUENCES: Dict[str, Dict[str, Tuple[float, float]]] = {
    "t1": {"TR": (15.0, 30.0), "TE": (3.0, 6.0), "FA": (20.0, 35.0)},
    "t2": {"TR": (3000.0, 6000.0), "TE": (80.0, 120.0)},
    "pd": {"TR": (3000.0, 5000.0), "TE": (10.0, 20.0)},
    "flair": {"TR": (8000.0, 11000.0), "TE": (90.0, 130.0), "TI": (2400.0, 2800.0)},
}

#: CT Hounsfield ranges per tissue (uniform draw per image). Air -1000 by definition; bone = skull
#: (cortical + diploë); scalp = skin/fat/muscle mixture.
CT_HU: Dict[str, Tuple[float, float]] = {
    "background": (-1000.0, -1000.0),
    "csf": (0.0, 15.0),
    "gm": (35.0, 45.0),
    "wm": (20.0, 30.0),
    "bone": (700.0, 1500.0),
    "scalp": (-80.0, 40.0),
}

#: FDG uptake relative to WM (each scaled by uniform [0.9, 1.1] per image); GM : WM : CSF ≈ 4 : 1 : 0.2
#: (cortical glucose metabolism is ~4× white matter; CSF has none beyond blood-pool spill-in).
PET_UPTAKE: Dict[str, float] = {"background": 0.0, "csf": 0.2, "gm": 4.0, "wm": 1.0, "bone": 0.4, "scalp": 0.6}


def _mix(tissues: Tissues, values: Mapping[str, float]) -> np.ndarray:
    """Partial-volume mixture ``sum_t p_t * value_t`` (float32 (z, y, x))."""
    out = np.zeros(tissues.shape, dtype=np.float32)
    for name in TISSUES:
        v = float(values[name])
        if v != 0.0:
            out += np.float32(v) * getattr(tissues, name)
    return out


def _check_rng(rng: np.random.Generator) -> None:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)); got {type(rng).__name__}")


# --------------------------------------------------------------------------------------------------------
# MR


def mr_tissue_signals(kind: str, rng: np.random.Generator) -> Dict[str, float]:
    """Random tissue-to-signal table of one MR image.

    Spoiled gradient echo (``t1``): ``S = PD sin(FA) (1 - E1) / (1 - cos(FA) E1) exp(-TE/T2)``,
    ``E1 = exp(-TR/T1)`` (T2 stands in for T2*); spin echo (``t2``, ``pd``):
    ``S = PD (1 - exp(-TR/T1)) exp(-TE/T2)``; inversion recovery (``flair``):
    ``S = PD |1 - 2 exp(-TI/T1) + exp(-TR/T1)| exp(-TE/T2)`` (magnitude reconstruction);
    with the tissue properties of :data:`TISSUE_RELAXATION` (each ×U(0.95, 1.05)) and the parameters of
    :data:`MR_SEQUENCES`; ×1000 (arbitrary units). Resulting order: T1 scalp > WM > GM > CSF; T2 CSF > GM >
    WM; FLAIR GM > WM >> CSF; PD GM ≳ CSF > WM; bone dark everywhere.
    """
    if kind not in MR_SEQUENCES:
        raise ValueError(f"unknown MR contrast {kind!r}; use one of {', '.join(MR_KINDS)}")
    _check_rng(rng)
    timing = {k: float(rng.uniform(*r)) for k, r in MR_SEQUENCES[kind].items()}
    signals = {}
    for name in TISSUES:
        pd, t1, t2 = (v * float(rng.uniform(0.95, 1.05)) for v in TISSUE_RELAXATION[name])
        e1 = math.exp(-timing["TR"] / t1)
        if "FA" in timing:
            fa = math.radians(timing["FA"])
            longitudinal = math.sin(fa) * (1.0 - e1) / (1.0 - math.cos(fa) * e1)
        elif "TI" in timing:
            longitudinal = abs(1.0 - 2.0 * math.exp(-timing["TI"] / t1) + e1)
        else:
            longitudinal = 1.0 - e1
        signals[name] = 1000.0 * pd * longitudinal * math.exp(-timing["TE"] / t2)
    return signals


def mr_contrast(tissues: Tissues, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A clean (full-quality) MR image of the given contrast.

    Model, in acquisition order:

    1. tissue signals from :func:`mr_tissue_signals`, mixed by partial volume;
    2. blur by a Gaussian point-spread function, sigma uniform in [0.3, 0.7] voxel (finite k-space extent);
    3. multiplicative bias field ``exp(b · f)``: f a smooth random field (3–4 control points per edge,
       peak |f| = 1), b uniform in [0.05, 0.3] (a ±5–35 % receive-coil sensitivity variation);
    4. Rician noise: magnitude of (signal + N(0, σ²) + i N(0, σ²)), σ uniform in [1 %, 4 %] of the
       brightest tissue signal (background becomes Rayleigh-distributed, as in magnitude images).

    Args:
        tissues: tissue maps.
        kind: ``"t1"``, ``"t2"``, ``"pd"`` or ``"flair"``.
        rng: numpy random generator (required: all parameters and noise come from it).

    Returns:
        float32 (z, y, x) magnitude image, arbitrary units (>= 0).
    """
    _check_rng(rng)
    signals = mr_tissue_signals(kind, rng)
    image = _mix(tissues, signals)
    image = ndimage.gaussian_filter(image, float(rng.uniform(0.3, 0.7)))
    bias = smooth_noise(tissues.shape, rng, control_points=int(rng.integers(3, 5)))[0]
    image = image * np.exp(float(rng.uniform(0.05, 0.3)) * bias)
    sigma = float(rng.uniform(0.01, 0.04)) * max(signals.values())
    real = image + rng.normal(0.0, sigma, size=image.shape)
    imag = rng.normal(0.0, sigma, size=image.shape)
    return np.hypot(real, imag).astype(np.float32)


# --------------------------------------------------------------------------------------------------------
# CT and PET


def ct_like(tissues: Tissues, rng: np.random.Generator) -> np.ndarray:
    """A clean (standard-dose, metal-free) CT image in Hounsfield units.

    HU per tissue uniform in the ranges of :data:`CT_HU` (air -1000, CSF 0–15, GM 35–45, WM 20–30, skull
    700–1500, scalp -80–40), mixed linearly by partial volume (HU is linear in the attenuation
    coefficient), blurred by the reconstruction point-spread function (Gaussian sigma uniform in
    [0.4, 0.8] voxel) and with Gaussian quantum noise of sigma uniform in [3, 10] HU, then clipped to the
    int16 storage range of scanners [-1024, 3071].

    Returns:
        float32 (z, y, x) image in HU.
    """
    _check_rng(rng)
    hu = {name: float(rng.uniform(*CT_HU[name])) for name in TISSUES}
    image = ndimage.gaussian_filter(_mix(tissues, hu), float(rng.uniform(0.4, 0.8)), mode="nearest")
    image = image + rng.normal(0.0, float(rng.uniform(3.0, 10.0)), size=image.shape)
    return np.clip(image, -1024.0, 3071.0).astype(np.float32)


def pet_like(tissues: Tissues, rng: np.random.Generator) -> np.ndarray:
    """A full-dose FDG-PET image (activity concentration, kBq/mL).

    * Uptake relative to WM from :data:`PET_UPTAKE` (GM 4, WM 1, CSF 0.2, bone 0.4, scalp 0.6; each
      ×U(0.9, 1.1)), times a WM activity uniform in [1.5, 3] kBq/mL (so GM ≈ 6–12 kBq/mL, SUV-like).
    * Scanner resolution: Gaussian PSF with FWHM uniform in [4, 6] mm (sigma = FWHM / 2.355 / spacing).
    * Counting statistics: expected counts per voxel = activity × k, with k set so that a voxel of mean GM
      activity collects uniform [200, 600] counts; Poisson draw, divided back by k (unbiased).

    Returns:
        float32 (z, y, x) activity (>= 0), kBq/mL.
    """
    _check_rng(rng)
    wm_activity = float(rng.uniform(1.5, 3.0))
    uptake = {name: PET_UPTAKE[name] * float(rng.uniform(0.9, 1.1)) * wm_activity for name in TISSUES}
    fwhm_mm = float(rng.uniform(4.0, 6.0))
    sigma_vox = fwhm_mm / (2.0 * math.sqrt(2.0 * math.log(2.0))) / tissues.spacing_mm
    activity = np.clip(ndimage.gaussian_filter(_mix(tissues, uptake), sigma_vox), 0.0, None)
    counts_per_unit = float(rng.uniform(200.0, 600.0)) / uptake["gm"]
    counts = rng.poisson(activity.astype(np.float64) * counts_per_unit)
    return (counts / counts_per_unit).astype(np.float32)


# --------------------------------------------------------------------------------------------------------
# domain randomisation


def random_contrast(label_map: np.ndarray, rng: np.random.Generator, zero_background: bool = True) -> np.ndarray:
    """SynthMorph-style random contrast of a label map (domain randomisation).

    Every label gets a mean intensity uniform in [0, 1] (label 0 gets 0 if ``zero_background``: air gives
    no MR signal, and the warps pad with 0); the piecewise-constant image is blurred (Gaussian sigma uniform
    in [0.5, 1.5] voxel, partial volume), multiplied by a smooth bias ``exp(b f)`` with b uniform in
    [0, 0.3], and Gaussian noise with sigma uniform in [0, 0.05] is added; negatives are clipped.

    Args:
        label_map: integer (z, y, x) labels (>= 0).
        rng: numpy random generator.
        zero_background: force label 0 to intensity 0.

    Returns:
        float32 (z, y, x) image, roughly in [0, 1.4].
    """
    _check_rng(rng)
    labels = np.asarray(label_map)
    if labels.ndim != 3 or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise ValueError("label_map must be a non-negative integer (z, y, x) array")
    means = rng.uniform(0.0, 1.0, size=int(labels.max()) + 1).astype(np.float32)
    if zero_background:
        means[0] = 0.0
    image = ndimage.gaussian_filter(means[labels], float(rng.uniform(0.5, 1.5)))
    bias = smooth_noise(labels.shape, rng, control_points=4)[0]
    image = image * np.exp(float(rng.uniform(0.0, 0.3)) * bias)
    image = image + rng.normal(0.0, float(rng.uniform(0.0, 0.05)), size=image.shape)
    return np.clip(image, 0.0, None).astype(np.float32)


def synthesize(tissues: Tissues, modality: str, rng: np.random.Generator) -> np.ndarray:
    """Dispatch to :func:`mr_contrast` (``t1``, ``t2``, ``pd``, ``flair``), :func:`ct_like` (``ct``) or
    :func:`pet_like` (``pet``); float32 (z, y, x) in that modality's units."""
    if modality in MR_KINDS:
        return mr_contrast(tissues, modality, rng)
    if modality == "ct":
        return ct_like(tissues, rng)
    if modality == "pet":
        return pet_like(tissues, rng)
    raise ValueError(f"unknown modality {modality!r}; use one of {', '.join(MODALITIES)}")
