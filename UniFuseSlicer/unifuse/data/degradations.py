"""Acquisition degradations of the moving modality: MR motion, CT metal artefacts + noise, low-dose PET.

All functions take a float (z, y, x) volume in its physical units (arbitrary MR units, HU for CT, activity
for PET) and a ``numpy.random.Generator``, never modify the input, and return a new float32 volume of the
same shape. Random parameters are drawn from ``rng`` in the documented ranges unless passed explicitly, so
the same generator state gives the same result. ``z`` is the slice (axial) axis.

* ``"none"`` (:func:`no_degradation`): an exact copy.
* ``"motion"`` (:func:`mri_motion`): k-space corruption after Shaw et al. 2020 (rigid motion between
  segments of phase-encode lines).
* ``"metal"`` (:func:`ct_metal`): per-slice projection-domain simulation (parallel-beam forward projection,
  metal insertion with beam hardening and photon starvation, Poisson counts, filtered back-projection).
* ``"lowdose"`` (:func:`pet_lowdose`): count scaling + Poisson noise, rescaled to the full-dose mean.

The physics and every approximation are described in ``docs/data.md``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np
from scipy import sparse

from ..config import DEGRADATION_CLASSES
from ..errors import InputImageError
from ..intensity import CT_AIR_HU
from .deformations import SpacingLike, _spacing_xyz, warp_rigid

__all__ = [
    "DEGRADATIONS",
    "degradation_id",
    "apply_degradation",
    "no_degradation",
    "mri_motion",
    "MotionSegment",
    "kspace_motion",
    "ct_metal",
    "random_metal_mask",
    "simulate_metal_artifacts",
    "pet_lowdose",
    "ParallelBeamProjector",
    "MU_WATER_PER_MM",
]

#: Degradation names, index = class id of the DAPL classifier (identical to ``config.DEGRADATION_CLASSES``).
DEGRADATIONS: Tuple[str, ...] = tuple(DEGRADATION_CLASSES)

#: Linear attenuation coefficient of water at the ~70 keV effective energy of a 120 kVp CT beam (1/mm).
MU_WATER_PER_MM: float = 0.0192

def degradation_id(name: str) -> int:
    """Class id of a degradation name (index in :data:`DEGRADATIONS`)."""
    try:
        return DEGRADATIONS.index(name)
    except ValueError:
        raise ValueError(f"unknown degradation {name!r}; use one of {', '.join(DEGRADATIONS)}") from None


def _check_volume(volume: np.ndarray, what: str) -> np.ndarray:
    v = np.asarray(volume)
    if v.ndim != 3:
        raise InputImageError(f"{what} needs a 3D (z, y, x) volume; got an array of shape {v.shape}")
    if min(v.shape) < 2:
        raise InputImageError(f"{what} needs at least 2 voxels along every axis; got shape {v.shape}")
    if not np.all(np.isfinite(v)):
        raise InputImageError(f"{what}: the volume contains NaN or infinite values; clean it first")
    return v


# --------------------------------------------------------------------------------------------------------
# none


def no_degradation(volume: np.ndarray, rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """The ``"none"`` class: an exact float32 copy (``rng`` unused, accepted for a uniform signature)."""
    return np.array(_check_volume(volume, "no_degradation"), dtype=np.float32, copy=True)


# --------------------------------------------------------------------------------------------------------
# MR motion (k-space)


@dataclass(frozen=True)
class MotionSegment:
    """Phase-encode lines acquired in one rigid pose.

    Attributes:
        lines: indices (into the FFT's frequency order along the phase-encode axis) of the segment's lines.
        rotation_deg: (3,) rotation about x, y, z of the volume centre (degrees, ``R = Rz @ Ry @ Rx``).
        translation_mm: (3,) translation (x, y, z) in mm.
    """

    lines: np.ndarray
    rotation_deg: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    translation_mm: Tuple[float, float, float] = (0.0, 0.0, 0.0)


def kspace_motion(
    volume: np.ndarray,
    segments: Sequence[MotionSegment],
    phase_encode_axis: int,
    spacing_mm: SpacingLike = 1.0,
) -> np.ndarray:
    """Replace k-space lines of ``volume`` by those of moved copies and return the magnitude image.

    For each segment the volume is rotated about its centre (trilinear; content outside becomes 0), Fourier
    transformed, and translated by the exact phase ramp ``exp(-2πi f·t)`` (f in cycles/voxel, t in voxels:
    the image ``v(x - t)``); the segment's lines along ``phase_encode_axis`` then replace the original ones.
    Lines of no segment keep the reference pose. Output ``|IFFT|``, float32 (z, y, x).
    """
    v = _check_volume(volume, "kspace_motion").astype(np.float32)
    spacing = _spacing_xyz(spacing_mm)
    axis = int(phase_encode_axis)
    if axis not in (0, 1, 2):
        raise ValueError(f"phase_encode_axis must be 0, 1 or 2; got {phase_encode_axis}")
    freqs = [np.fft.fftfreq(n) for n in v.shape]  # cycles per voxel, axes (z, y, x)
    out = np.fft.fftn(v)
    for seg in segments:
        lines = np.asarray(seg.lines, dtype=np.int64)
        if lines.size == 0:
            continue
        if lines.min() < 0 or lines.max() >= v.shape[axis]:
            raise ValueError(f"segment lines must index the {v.shape[axis]} lines of axis {axis}")
        moved = v if not np.any(seg.rotation_deg) else warp_rigid(v, seg.rotation_deg, (0.0, 0.0, 0.0), spacing)
        index = [slice(None)] * 3
        index[axis] = lines
        index = tuple(index)
        k_moved = np.fft.fftn(moved)[index]
        t_vox = np.asarray(seg.translation_mm, dtype=np.float64) / spacing  # (x, y, z)
        fz, fy, fx = (f[lines] if a == axis else f for a, f in enumerate(freqs))
        fz, fy, fx = np.meshgrid(fz, fy, fx, indexing="ij", sparse=True)
        out[index] = k_moved * np.exp(-2j * np.pi * (fx * t_vox[0] + fy * t_vox[1] + fz * t_vox[2]))
    return np.abs(np.fft.ifftn(out)).astype(np.float32)


def mri_motion(
    volume: np.ndarray,
    rng: np.random.Generator,
    spacing_mm: SpacingLike = 1.0,
    num_segments: Optional[int] = None,
    max_rotation_deg: float = 8.0,
    max_translation_mm: float = 10.0,
    phase_encode_axis: Optional[int] = None,
) -> np.ndarray:
    """Rigid patient motion during an MR acquisition, simulated in k-space (Shaw et al., IEEE TMI 2020).

    1. The phase-encode (slow) axis is ``phase_encode_axis`` (array axis 1 = y or 2 = x; random if None).
       Its k-space lines, in acquisition order (linear, from -k_max to +k_max), are split at random times
       into ``num_segments`` contiguous segments (uniform in [3, 8] if None).
    2. The segment containing the k-space centre keeps the reference pose, so the degraded image stays
       registered with the clean one (the misalignment is modelled separately, with exact ground truth).
       Every other segment gets a random rigid pose: each rotation angle uniform in
       ``[-max_rotation_deg, max_rotation_deg]`` about the volume centre, each translation component
       uniform in ``[-max_translation_mm, max_translation_mm]`` mm.
    3. :func:`kspace_motion`: per moved segment, rotate the volume, FFT, apply the translation as a linear
       phase ramp, take that segment's lines; inverse FFT, magnitude — ghosting and blurring along the
       phase-encode direction.

    Args:
        volume: (z, y, x) magnitude image (not modified).
        rng: numpy random generator.
        spacing_mm: voxel spacing, scalar or (x, y, z) mm (converts translations to voxels).
        num_segments: number of motion segments (>= 2).
        max_rotation_deg, max_translation_mm: bounds of the per-segment rigid motion.
        phase_encode_axis: 1 (y) or 2 (x).

    Returns:
        float32 (z, y, x) magnitude image.
    """
    v = _check_volume(volume, "mri_motion")
    axis = int(rng.integers(1, 3)) if phase_encode_axis is None else int(phase_encode_axis)
    if axis not in (1, 2):
        raise ValueError(f"phase_encode_axis must be 1 (y) or 2 (x); got {phase_encode_axis}")
    n_lines = v.shape[axis]
    count = int(rng.integers(3, 9)) if num_segments is None else int(num_segments)
    if not 2 <= count <= n_lines:
        raise ValueError(f"num_segments must be in [2, {n_lines}] (lines along the phase-encode axis); got {count}")
    order = np.argsort(np.fft.fftfreq(n_lines), kind="stable")  # acquisition order: -k_max ... +k_max
    cuts = np.sort(rng.choice(np.arange(1, n_lines), size=count - 1, replace=False))
    bounds = np.concatenate(([0], cuts, [n_lines]))
    centre = int(np.nonzero(order == 0)[0][0])  # position of k = 0 in acquisition order
    segments = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if lo <= centre < hi:
            continue  # reference pose
        rotation = tuple(rng.uniform(-max_rotation_deg, max_rotation_deg, size=3))
        translation = tuple(rng.uniform(-max_translation_mm, max_translation_mm, size=3))
        segments.append(MotionSegment(order[lo:hi], rotation, translation))
    return kspace_motion(v, segments, axis, spacing_mm)


# --------------------------------------------------------------------------------------------------------
# CT: parallel-beam projector


@dataclass(frozen=True, eq=False)
class ParallelBeamProjector:
    """2D parallel-beam Radon transform of (H, W) slices as sparse matrices (pixel units).

    * Forward (ray-driven): for each angle θ_a = π a / n_angles and detector bin s (pixel units, centred),
      the line integral along ``x = s cosθ − t sinθ, y = s sinθ + t cosθ`` sampled every pixel in t with
      bilinear interpolation of the image. ``sinogram = forward @ image.ravel()``, shape (n_angles·n_det,).
    * Back-projection (pixel-driven): ``q(x cosθ + y sinθ)`` with linear interpolation in s, summed over the
      angles — the standard FBP back-projector (not the exact adjoint of ``forward``).
    * :meth:`fbp` applies the Ram-Lak ramp filter (spatial-domain kernel, Hann apodised) and the π/n_angles
      weight, so ``fbp(project(img)) ≈ img`` inside the inscribed circle.

    Pixel (i, j) sits at ``x = j − (W−1)/2, y = i − (H−1)/2``. Build with :func:`projector` (cached).
    """

    height: int
    width: int
    n_angles: int
    n_det: int
    forward: sparse.csr_matrix
    back: sparse.csr_matrix

    def project(self, images: np.ndarray) -> np.ndarray:
        """(..., H, W) images -> (..., n_angles, n_det) line integrals in pixel units."""
        lead = images.shape[:-2]
        flat = images.reshape(-1, self.height * self.width).T.astype(np.float32)
        sino = self.forward @ flat
        return np.ascontiguousarray(sino.T).reshape(*lead, self.n_angles, self.n_det)

    def filter(self, sinograms: np.ndarray) -> np.ndarray:
        """Ramp-filter (..., n_angles, n_det) sinograms along the detector axis (Ram-Lak × Hann)."""
        n = self.n_det
        size = max(64, int(2 ** math.ceil(math.log2(2 * n))))
        k = np.arange(-(size // 2), size // 2)
        kernel = np.zeros(size)
        kernel[size // 2] = 0.25
        odd = (k % 2) == 1
        kernel[odd] = -1.0 / (np.pi * k[odd]) ** 2
        response = np.abs(np.fft.fft(np.fft.ifftshift(kernel)))  # real, even ramp |f|
        freq = np.fft.fftfreq(size)
        response *= 0.5 * (1.0 + np.cos(2.0 * np.pi * freq))  # Hann apodisation
        spectrum = np.fft.fft(sinograms, n=size, axis=-1)
        return np.real(np.fft.ifft(spectrum * response, axis=-1))[..., :n].astype(np.float32)

    def backproject(self, sinograms: np.ndarray) -> np.ndarray:
        """(..., n_angles, n_det) -> (..., H, W) pixel-driven back-projection (sum over angles)."""
        lead = sinograms.shape[:-2]
        flat = sinograms.reshape(-1, self.n_angles * self.n_det).T.astype(np.float32)
        img = self.back @ flat
        return np.ascontiguousarray(img.T).reshape(*lead, self.height, self.width)

    def fbp(self, sinograms: np.ndarray) -> np.ndarray:
        """Filtered back-projection: (..., n_angles, n_det) line integrals -> (..., H, W) images."""
        return self.backproject(self.filter(sinograms)) * np.float32(np.pi / self.n_angles)


@functools.lru_cache(maxsize=4)
def projector(height: int, width: int, n_angles: Optional[int] = None) -> ParallelBeamProjector:
    """A cached :class:`ParallelBeamProjector` for (height, width) slices; ``n_angles`` defaults to
    ⌈π/2 · max(H, W)⌉ (angular Nyquist rate for the inscribed circle)."""
    h, w = int(height), int(width)
    n = max(h, w)
    na = int(math.ceil(math.pi / 2 * n)) if n_angles is None else int(n_angles)
    half = int(math.ceil(math.hypot(h, w) / 2.0))
    det = np.arange(-half, half + 1, dtype=np.float64)
    nd = det.size
    theta = np.pi * np.arange(na) / na
    cos, sin = np.cos(theta), np.sin(theta)
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0

    # forward: rays (a, s), samples t, bilinear weights
    t = det
    a_idx, s_idx, t_idx = np.meshgrid(np.arange(na), np.arange(nd), np.arange(t.size), indexing="ij")
    x = det[s_idx] * cos[a_idx] - t[t_idx] * sin[a_idx] + cx
    y = det[s_idx] * sin[a_idx] + t[t_idx] * cos[a_idx] + cy
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = x - x0, y - y0
    rows_all, cols_all, vals_all = [], [], []
    ray = (a_idx * nd + s_idx).ravel()
    for dy, dx, wgt in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
        xi, yi = (x0 + dx).ravel().astype(np.int64), (y0 + dy).ravel().astype(np.int64)
        wv = wgt.ravel()
        ok = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h) & (wv > 0)
        rows_all.append(ray[ok])
        cols_all.append(yi[ok] * w + xi[ok])
        vals_all.append(wv[ok])
    forward = sparse.csr_matrix(
        (np.concatenate(vals_all).astype(np.float32), (np.concatenate(rows_all), np.concatenate(cols_all))),
        shape=(na * nd, h * w),
    )

    # back-projection: pixels, angles, linear interpolation in s
    iy, ix = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    px, py = (ix - cx).ravel(), (iy - cy).ravel()
    s = px[None, :] * cos[:, None] + py[None, :] * sin[:, None] + half  # (na, n_pix) in bin units
    s0 = np.floor(s)
    fs = s - s0
    pix = np.broadcast_to(np.arange(h * w)[None, :], s.shape)
    ang = np.broadcast_to(np.arange(na)[:, None], s.shape)
    rows_b, cols_b, vals_b = [], [], []
    for ds, wgt in ((0, 1 - fs), (1, fs)):
        si = (s0 + ds).astype(np.int64)
        ok = (si >= 0) & (si < nd)
        rows_b.append(pix[ok])
        cols_b.append(ang[ok] * nd + si[ok])
        vals_b.append(wgt[ok])
    back = sparse.csr_matrix(
        (np.concatenate(vals_b).astype(np.float32), (np.concatenate(rows_b), np.concatenate(cols_b))),
        shape=(h * w, na * nd),
    )
    return ParallelBeamProjector(h, w, na, nd, forward, back)


# --------------------------------------------------------------------------------------------------------
# CT: metal


def random_metal_mask(
    shape: Sequence[int],
    rng: np.random.Generator,
    inside: Optional[np.ndarray] = None,
    spacing_mm: SpacingLike = 1.0,
    num_objects: Optional[int] = None,
    radius_mm: Tuple[float, float] = (2.0, 6.0),
) -> np.ndarray:
    """Random small metal objects (implants, fillings, clips, electrodes): ellipsoids.

    ``num_objects`` (uniform in [1, 3] if None) ellipsoids with semi-axes uniform in ``radius_mm`` (at least
    0.75 voxel so each covers a voxel), centred on random voxels of ``inside`` (e.g. the head; the whole
    volume if None) within a slab of ±2 slices around the first object's slice, as for dental fillings or
    bilateral implants (metal objects sharing slices cause the typical dark bands between them).

    Returns:
        bool (z, y, x) mask.
    """
    d, h, w = (int(n) for n in shape)
    spacing = _spacing_xyz(spacing_mm)
    count = int(rng.integers(1, 4)) if num_objects is None else int(num_objects)
    region = np.ones((d, h, w), dtype=bool) if inside is None else np.asarray(inside, dtype=bool)
    if region.shape != (d, h, w):
        raise ValueError(f"inside mask shape {region.shape} differs from {(d, h, w)}")
    candidates = np.argwhere(region)
    if candidates.size == 0:
        raise InputImageError("no voxel inside the object to place metal in; is the CT empty?")
    zz, yy, xx = np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij", sparse=True)
    mask = np.zeros((d, h, w), dtype=bool)
    for i in range(count):
        cz, cy, cx = candidates[int(rng.integers(len(candidates)))]
        semi = np.maximum(rng.uniform(*radius_mm, size=3) / spacing, 0.75)  # (x, y, z) voxels
        r2 = ((xx - cx) / semi[0]) ** 2 + ((yy - cy) / semi[1]) ** 2 + ((zz - cz) / semi[2]) ** 2
        mask |= r2 <= 1.0
        if i == 0:  # later objects: in the slab of +-2 slices around the first
            candidates = candidates[np.abs(candidates[:, 0] - cz) <= 2]
    return mask


def simulate_metal_artifacts(
    volume_hu: np.ndarray,
    metal_mask: np.ndarray,
    rng: np.random.Generator,
    spacing_mm: SpacingLike = 1.0,
    metal_mu_per_mm: Optional[float] = None,
    beam_hardening: Optional[float] = None,
    photons: Optional[float] = None,
    metal_hu: float = 3071.0,
) -> np.ndarray:
    """Metal artefacts + quantum noise of a CT volume, simulated per axial slice in the projection domain.

    For every slice (array axis 0):

    1. attenuation ``μ = μ_water (1 + HU/1000)`` (1/mm, clipped at 0), metal ``μ_metal`` (log-uniform in
       [0.2, 2.0]/mm if None: titanium ~0.2, steel ~0.5–1, amalgam/gold > 2 at ~70 keV) in ``metal_mask``;
    2. parallel-beam line integrals ``p = Σ μ Δ`` (Δ = in-plane pixel size, mean of x and y spacing) of the
       tissue, ``p_t``, and of the metal, ``p_m``;
    3. beam hardening of the metal path: ``p_m' = (1 − exp(−β p_m)) / β`` (β uniform in [0.05, 0.25] if
       None) — a concave, saturating response standing in for the polychromatic spectrum; the (much
       weaker) water beam hardening is not modelled;
    4. photon counts ``N ~ Poisson(I0 exp(−(p_t + p_m')))`` with I0 per ray uniform in [1e4, 1e5] (log) if
       None; ``N`` is floored at 1 count (photon starvation behind metal) and ``p_meas = −ln(N / I0)``;
    5. filtered back-projection of the *error sinogram* ``p_meas − p_t − p_m`` gives the artefact image
       (streaks + noise, 1/mm), added to the clean volume in HU; the clean volume itself is kept at its own
       resolution instead of being re-reconstructed (so tissue away from streaks is unchanged up to noise);
    6. the metal is put back into the image at ``metal_hu`` (scanner maximum, default 3071 HU) and the
       result is clipped to [-1024, 3071] HU.

    Args:
        volume_hu: (z, y, x) CT in HU (not modified).
        metal_mask: bool (z, y, x) metal voxels.
        rng: numpy random generator.
        spacing_mm: voxel spacing (x, y, z) mm.
        metal_mu_per_mm, beam_hardening, photons: fixed values instead of random draws.
        metal_hu: value written into metal voxels.

    Returns:
        float32 (z, y, x) degraded CT in HU.
    """
    v = _check_volume(volume_hu, "simulate_metal_artifacts").astype(np.float32)
    mask = np.asarray(metal_mask, dtype=bool)
    if mask.shape != v.shape:
        raise ValueError(f"metal_mask shape {mask.shape} differs from the volume shape {v.shape}")
    spacing = _spacing_xyz(spacing_mm)
    pixel_mm = float(spacing[:2].mean())
    if metal_mu_per_mm is None:
        mu_metal = float(np.exp(rng.uniform(np.log(0.2), np.log(2.0))))
    else:
        mu_metal = float(metal_mu_per_mm)
    beta = float(rng.uniform(0.05, 0.25)) if beam_hardening is None else float(beam_hardening)
    i0 = float(np.exp(rng.uniform(np.log(1e4), np.log(1e5)))) if photons is None else float(photons)
    if beta <= 0 or i0 <= 0 or mu_metal < 0:
        raise ValueError("beam_hardening and photons must be > 0 and metal_mu_per_mm >= 0")

    proj = projector(v.shape[1], v.shape[2])
    mu = np.clip(MU_WATER_PER_MM * (1.0 + v / 1000.0), 0.0, None) * (~mask)
    p_tissue = proj.project(mu) * pixel_mm  # (z, n_angles, n_det), unitless
    p_metal = np.zeros_like(p_tissue)
    metal_slices = np.nonzero(mask.any(axis=(1, 2)))[0]
    if metal_slices.size:
        p_metal[metal_slices] = proj.project(mask[metal_slices].astype(np.float32) * mu_metal) * pixel_mm
    p_metal_hardened = (1.0 - np.exp(-beta * p_metal)) / beta
    expected = i0 * np.exp(-(p_tissue + p_metal_hardened).astype(np.float64))
    counts = np.maximum(rng.poisson(expected), 1.0)
    p_measured = -np.log(counts / i0)
    error = (p_measured - p_tissue - p_metal).astype(np.float32)
    artefact_mu = proj.fbp(error) / pixel_mm  # 1/mm
    degraded = v + 1000.0 * artefact_mu / MU_WATER_PER_MM
    degraded[mask] = metal_hu
    return np.clip(degraded, -1024.0, 3071.0).astype(np.float32)


def ct_metal(
    volume_hu: np.ndarray,
    rng: np.random.Generator,
    spacing_mm: SpacingLike = 1.0,
    metal_mask: Optional[np.ndarray] = None,
    num_objects: Optional[int] = None,
    **params: Any,
) -> np.ndarray:
    """CT metal artefacts + noise: :func:`random_metal_mask` inside the body (HU > ``CT_AIR_HU``, if no mask is
    given) then :func:`simulate_metal_artifacts` (extra keyword arguments are passed to it).

    Raises:
        InputImageError: if the volume does not look like HU (its range is under 200, e.g. a [0, 1]
            normalised image) — the physics needs attenuation values.
    """
    v = _check_volume(volume_hu, "ct_metal")
    if float(v.max()) - float(v.min()) < 200.0:
        raise InputImageError(
            "ct_metal expects a CT in Hounsfield units (air about -1000); this volume spans less than 200 "
            "units — apply the degradation before intensity normalisation"
        )
    if metal_mask is None:
        body = v > CT_AIR_HU
        metal_mask = random_metal_mask(v.shape, rng, inside=body if body.any() else None,
                                       spacing_mm=spacing_mm, num_objects=num_objects)
    return simulate_metal_artifacts(v, metal_mask, rng, spacing_mm=spacing_mm, **params)


# --------------------------------------------------------------------------------------------------------
# PET


def pet_lowdose(
    volume: np.ndarray,
    rng: np.random.Generator,
    dose_fraction: Optional[float] = None,
    full_dose_counts: float = 300.0,
) -> np.ndarray:
    """Low-dose PET: fewer detected counts, hence more Poisson noise, at the same mean activity.

    With ``k`` chosen so that a voxel at the volume's mean positive activity collects ``full_dose_counts``
    counts at full dose, the low-dose image is ``Poisson(f · k · a) / (f · k)`` (a = activity clipped at 0,
    f = ``dose_fraction``, log-uniform in [1/20, 1/4] if None), then rescaled so that its mean equals the
    full-dose mean exactly. Relative noise grows as 1/sqrt(f · k · a). Approximation: noise is drawn per
    voxel in the image domain (no reconstruction), so it is spatially uncorrelated.

    Args:
        volume: (z, y, x) activity (PET units, >= 0 expected; negatives are clipped).
        rng: numpy random generator.
        dose_fraction: fraction of the full dose in (0, 1].
        full_dose_counts: counts per voxel at the mean activity for the full dose.

    Returns:
        float32 (z, y, x) low-dose image in the input's units.
    """
    v = np.clip(_check_volume(volume, "pet_lowdose").astype(np.float64), 0.0, None)
    f = float(np.exp(rng.uniform(np.log(1 / 20), np.log(1 / 4)))) if dose_fraction is None else float(dose_fraction)
    if not 0.0 < f <= 1.0:
        raise ValueError(f"dose_fraction must be in (0, 1]; got {dose_fraction}")
    positive = v[v > 0]
    if positive.size == 0:
        return v.astype(np.float32)
    k = float(full_dose_counts) / float(positive.mean())
    noisy = rng.poisson(v * k * f) / (k * f)
    total = float(noisy.sum())
    if total > 0:
        noisy *= float(v.sum()) / total
    return noisy.astype(np.float32)


# --------------------------------------------------------------------------------------------------------
# dispatcher

_FUNCTIONS: Dict[str, Callable[..., np.ndarray]] = {
    "none": no_degradation,
    "motion": mri_motion,
    "metal": ct_metal,
    "lowdose": pet_lowdose,
}
if set(_FUNCTIONS) != set(DEGRADATIONS):  # pragma: no cover - guards config/implementation drift
    raise ImportError(f"degradation functions {sorted(_FUNCTIONS)} do not match DEGRADATION_CLASSES {DEGRADATIONS}")


def apply_degradation(name: str, volume: np.ndarray, rng: np.random.Generator, **params: Any) -> np.ndarray:
    """Apply the degradation ``name`` (one of :data:`DEGRADATIONS`) to a volume in physical units.

    ``params`` are passed to the function (:func:`no_degradation`, :func:`mri_motion`, :func:`ct_metal`,
    :func:`pet_lowdose`); ``spacing_mm`` is accepted (and ignored) by ``"none"`` and ``"lowdose"`` so callers
    can pass it uniformly. Returns a new float32 (z, y, x) array; ``volume`` is not modified.
    """
    func = _FUNCTIONS.get(name)
    if func is None:
        raise ValueError(f"unknown degradation {name!r}; use one of {', '.join(DEGRADATIONS)}")
    if name in ("none", "lowdose"):
        params = {k: val for k, val in params.items() if k != "spacing_mm"}
    return func(volume, rng, **params)
