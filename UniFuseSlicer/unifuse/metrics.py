"""Fusion-quality and alignment metrics on 3D volumes, following the image-fusion literature.

All functions take numpy arrays (torch CPU tensors are accepted and converted) ordered (z, y, x) and
accumulate in float64. Intensities are expected in ``[0, data_range]`` (``data_range=1`` for the package's
normalised volumes). Displacement fields are (3, D, H, W) pull-back fields in **voxels** with channels
ordered (x, y, z): ``aligned(p) = moving(p + u(p))``; spacings are given in mm in the same (x, y, z) order
(the order of ``SimpleITK.Image.GetSpacing()``).

Fusion metrics (``a``, ``b`` = the two aligned sources, ``f`` = the fused volume; see ``docs/metrics.md``):

=========  =====================================================  ==============================================
key        formula                                                source
=========  =====================================================  ==============================================
q_mse      (MSE(f, a) + MSE(f, b)) / 2                            fusion-toolbox convention (paper ref. [1])
q_cc       (r(f, a) + r(f, b)) / 2, r = Pearson correlation       Meng et al. 1992 (paper ref. [23])
q_psnr     10 log10(data_range² / q_mse)                          Korhonen & You 2012 (paper ref. [12])
q_ssim     SSIM(f, a) + SSIM(f, b)  (sum: may exceed 1)           Wang et al. 2004 (paper ref. [31])
q_vif      VIF(a, f) + VIF(b, f)  (multi-scale pixel VIF, sum)    Sheikh & Bovik 2006; as used for fusion [9]
q_scd      r(a, f − b) + r(b, f − a)                              Aslantas & Bendes 2015 (paper ref. [1])
=========  =====================================================  ==============================================

Degenerate cases are reported, not invented: a Pearson correlation with a constant input is ``nan``;
``q_psnr`` is ``inf`` when ``q_mse == 0``; VIF with a constant reference is ``nan``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage

from .errors import InputImageError

__all__ = [
    "SSIM_SIGMA",
    "SSIM_RADIUS",
    "SSIM_K1",
    "SSIM_K2",
    "VIF_SIGMA_NSQ",
    "ssim_window_radius",
    "mse",
    "pearson_r",
    "ssim3d_map",
    "ssim3d",
    "vif_pixel",
    "vif_min_size",
    "q_mse",
    "q_cc",
    "q_psnr",
    "q_ssim",
    "q_vif",
    "q_scd",
    "FUSION_METRIC_KEYS",
    "fusion_metrics",
    "EndpointError",
    "endpoint_error_mm",
    "dice",
    "folding_percent",
    "alignment_metrics",
]

#: Standard deviation (voxels) of SSIM's Gaussian window (Wang et al. 2004).
SSIM_SIGMA: float = 1.5
#: Radius of SSIM's Gaussian window: 11 taps per axis, truncated on volumes smaller than 11 voxels.
SSIM_RADIUS: int = 5
#: SSIM stabilising constants: C1 = (K1 L)², C2 = (K2 L)² with L = data range.
SSIM_K1: float = 0.01
SSIM_K2: float = 0.03
#: Variance of VIF's visual-noise model on the 0–255 intensity scale (Sheikh & Bovik 2006).
VIF_SIGMA_NSQ: float = 2.0
#: Scales of the pixel-domain VIF; the window at scale s (1-based) has N = 2^(5-s) + 1 taps, σ = N / 5.
_VIF_SCALES: int = 4
#: Variances below this are treated as zero in VIF (the reference algorithm's threshold).
_VIF_EPS: float = 1e-10

Number = Union[int, float]


# --------------------------------------------------------------------------------------------- helpers
def _to_numpy(x: Any) -> np.ndarray:
    """Array view of ``x``; torch tensors are detached and moved to the CPU first (no torch import)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _as_volume(x: Any, name: str) -> np.ndarray:
    """``x`` as a finite float64 (z, y, x) array, or :class:`InputImageError`."""
    arr = _to_numpy(x)
    if arr.ndim != 3:
        raise InputImageError(
            f"{name} must be a 3D volume ordered (z, y, x); got an array of shape {arr.shape}. "
            "Squeeze batch/channel axes (e.g. volume[0, 0]) before computing metrics."
        )
    if arr.size == 0:
        raise InputImageError(f"{name} is empty (shape {arr.shape}); pass a non-empty volume.")
    arr = arr.astype(np.float64, copy=False)
    if not np.all(np.isfinite(arr)):
        raise InputImageError(f"{name} contains NaN or infinite values; fix or mask them before computing metrics.")
    return arr


def _volumes(names: Sequence[str], arrays: Sequence[Any]) -> Tuple[np.ndarray, ...]:
    """Validate several volumes of identical shape."""
    vols = tuple(_as_volume(a, n) for n, a in zip(names, arrays))
    shapes = {v.shape for v in vols}
    if len(shapes) != 1:
        desc = ", ".join(f"{n} {v.shape}" for n, v in zip(names, vols))
        raise InputImageError(f"volumes must share one grid; got {desc}. Resample them onto the reference grid first.")
    return vols


def _check_data_range(data_range: Number) -> float:
    value = float(data_range)
    if not (math.isfinite(value) and value > 0):
        raise InputImageError(f"data_range must be a positive finite number (1.0 for [0, 1] volumes); got {data_range!r}")
    return value


def _filter(x: np.ndarray, sigma: float, radius: int) -> np.ndarray:
    """Separable normalised Gaussian filter (``radius`` taps each side), reflect boundary, float64."""
    return ndimage.gaussian_filter(x, sigma=sigma, radius=radius, mode="reflect")


def _interior(x: np.ndarray, radius: int) -> np.ndarray:
    """Crop ``radius`` voxels from every face: the 'valid' part of a filtered array."""
    if radius == 0:
        return x
    return x[radius:-radius, radius:-radius, radius:-radius]


# ------------------------------------------------------------------------------------- basic statistics
def mse(x: Any, y: Any) -> float:
    """Mean squared error ``mean((x - y)²)`` of two volumes of one shape (intensity units squared)."""
    x, y = _volumes(("x", "y"), (x, y))
    return float(np.mean((x - y) ** 2))


#: A volume whose standard deviation is below this fraction of its largest magnitude counts as constant
#: (float64 rounding leaves ~1e-17 relative wiggle in, e.g., ``(b + c) - b``).
_CONSTANT_RTOL: float = 1e-12


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    xc = x - x.mean()
    yc = y - y.mean()
    sxx = float(np.sum(xc * xc))
    syy = float(np.sum(yc * yc))
    for ss, arr in ((sxx, x), (syy, y)):
        if math.sqrt(ss / arr.size) <= _CONSTANT_RTOL * float(np.max(np.abs(arr))):
            return float("nan")
    return float(np.sum(xc * yc) / math.sqrt(sxx * syy))


def pearson_r(x: Any, y: Any) -> float:
    """Pearson correlation coefficient ``r = Σ(x-x̄)(y-ȳ) / sqrt(Σ(x-x̄)² Σ(y-ȳ)²)`` over all voxels.

    Returns ``nan`` when either volume is constant (r is undefined there); "constant" allows float64 rounding:
    a standard deviation below 1e-12 × the largest magnitude.
    """
    x, y = _volumes(("x", "y"), (x, y))
    return _pearson(x, y)


# ----------------------------------------------------------------------------------------------- SSIM
def ssim_window_radius(shape: Sequence[int]) -> int:
    """Radius of the Gaussian SSIM window used for a volume of ``shape``.

    The standard window is 11 taps (radius 5, σ = 1.5). On volumes with fewer than 11 voxels along some axis
    it is truncated to the largest radius that fits (``(min(shape) - 1) // 2``); at least 3 voxels are needed.
    """
    smallest = int(min(shape))
    if smallest < 3:
        raise InputImageError(
            f"SSIM needs at least 3 voxels along every axis; got shape {tuple(shape)}. Use a larger volume."
        )
    return min(SSIM_RADIUS, (smallest - 1) // 2)


def _ssim_map(x: np.ndarray, y: np.ndarray, data_range: float, radius: int) -> np.ndarray:
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    mu_x = _filter(x, SSIM_SIGMA, radius)
    mu_y = _filter(y, SSIM_SIGMA, radius)
    var_x = _filter(x * x, SSIM_SIGMA, radius) - mu_x * mu_x
    var_y = _filter(y * y, SSIM_SIGMA, radius) - mu_y * mu_y
    cov = _filter(x * y, SSIM_SIGMA, radius) - mu_x * mu_y
    num = (2.0 * mu_x * mu_y + c1) * (2.0 * cov + c2)
    den = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    return num / den


def ssim3d_map(x: Any, y: Any, data_range: Number = 1.0) -> np.ndarray:
    """Local 3D SSIM map (Wang et al. 2004, eq. 13, extended to 3D), same shape as the inputs.

    ``SSIM = (2 μx μy + C1)(2 σxy + C2) / ((μx² + μy² + C1)(σx² + σy² + C2))`` with local statistics under
    an isotropic Gaussian window (σ = 1.5 voxels, 11³ taps or truncated, see :func:`ssim_window_radius`),
    population (weighted) moments, ``C1 = (0.01 L)²``, ``C2 = (0.03 L)²``, ``L = data_range``.
    Border voxels (within the window radius of a face) use reflected neighbourhoods; :func:`ssim3d`
    excludes them.

    Args:
        x, y: (z, y, x) volumes of one shape, intensities in ``[0, data_range]``.
        data_range: dynamic range L of the intensities (1.0 for normalised volumes).

    Returns:
        float64 (z, y, x) map, 1 where the volumes agree locally.
    """
    x, y = _volumes(("x", "y"), (x, y))
    rng = _check_data_range(data_range)
    return _ssim_map(x, y, rng, ssim_window_radius(x.shape))


def ssim3d(x: Any, y: Any, data_range: Number = 1.0) -> float:
    """Mean 3D SSIM of two volumes (Wang et al. 2004), over voxels whose whole window lies inside.

    This is the mean of :func:`ssim3d_map` after cropping the window radius from every face, i.e. a 'valid'
    Gaussian filtering, as in Wang's reference code and ``skimage.metrics.structural_similarity(...,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``. Equals 1 for identical volumes.
    """
    x, y = _volumes(("x", "y"), (x, y))
    rng = _check_data_range(data_range)
    radius = ssim_window_radius(x.shape)
    return float(np.mean(_interior(_ssim_map(x, y, rng, radius), radius)))


# ------------------------------------------------------------------------------------------------ VIF
def _vif_window(scale: int) -> Tuple[float, int]:
    """(σ, radius) of the Gaussian window of VIF scale ``scale`` (1-based): N = 2^(5-scale) + 1, σ = N/5."""
    taps = 2 ** (_VIF_SCALES - scale + 1) + 1
    return taps / 5.0, (taps - 1) // 2


def _vif_sizes(n: int) -> Iterable[int]:
    """Sizes, along one axis of length ``n``, of the statistics arrays at the VIF scales."""
    for scale in range(1, _VIF_SCALES + 1):
        _, radius = _vif_window(scale)
        if scale > 1:
            n = n - 2 * radius
            n = (n + 1) // 2 if n > 0 else 0
        yield n - 2 * radius


def vif_min_size() -> int:
    """Smallest edge (voxels, every axis) for which all four VIF scales have at least one voxel (41)."""
    n = 1
    while min(_vif_sizes(n)) < 1:
        n += 1
    return n


def vif_pixel(reference: Any, distorted: Any, data_range: Number = 1.0) -> float:
    """Multi-scale pixel-domain Visual Information Fidelity VIF(reference → distorted), in 3D.

    Sheikh & Bovik, "Image information and visual quality", IEEE TIP 15(2), 2006, pixel-domain version
    (``vifp``), as used by the image-fusion literature (paper ref. [9] reports ``Q_vif`` this way, summed over
    sources). Intensities are rescaled to 0–255 (``× 255 / data_range``). At scales s = 1..4 a Gaussian window
    of N = 2^(5-s)+1 taps (17, 9, 5, 3) and σ = N/5 gives local statistics (population moments, 'valid'
    region only); before scales 2–4 both volumes are filtered with that scale's window and decimated by 2
    along every axis. With the Gaussian-scale-mixture channel model ``D = g R + V``:

    ``g = σ_RD / σ_R²``, ``σ_V² = σ_D² − g σ_RD``, and

    ``VIF = Σ_s Σ_voxels log10(1 + g² σ_R² / (σ_V² + σ_n²)) / Σ_s Σ_voxels log10(1 + σ_R² / σ_n²)``

    with σ_n² = 2. The reference algorithm's guards are kept: variances below 1e-10 count as zero, a
    negative gain is set to 0 (and σ_V² to σ_D²), σ_V² is floored at 1e-10. VIF(x, x) = 1; noise and blur
    lower it; contrast enhancement can raise it above 1.

    Args:
        reference, distorted: (z, y, x) volumes of one shape, each edge ≥ :func:`vif_min_size` (41) voxels.
        data_range: dynamic range of the intensities.

    Returns:
        VIF as a float; ``nan`` when the reference is constant (no information to preserve).
    """
    ref, dist = _volumes(("reference", "distorted"), (reference, distorted))
    rng = _check_data_range(data_range)
    need = vif_min_size()
    if min(ref.shape) < need:
        raise InputImageError(
            f"4-scale VIF needs at least {need} voxels along every axis; got shape {ref.shape}. "
            "Compute VIF on a larger volume (e.g. the reference grid rather than a small crop)."
        )
    ref = ref * (255.0 / rng)
    dist = dist * (255.0 / rng)
    num = 0.0
    den = 0.0
    for scale in range(1, _VIF_SCALES + 1):
        sigma, radius = _vif_window(scale)
        if scale > 1:
            ref = _interior(_filter(ref, sigma, radius), radius)[::2, ::2, ::2]
            dist = _interior(_filter(dist, sigma, radius), radius)[::2, ::2, ::2]
        mu1 = _interior(_filter(ref, sigma, radius), radius)
        mu2 = _interior(_filter(dist, sigma, radius), radius)
        s1 = _interior(_filter(ref * ref, sigma, radius), radius) - mu1 * mu1
        s2 = _interior(_filter(dist * dist, sigma, radius), radius) - mu2 * mu2
        s12 = _interior(_filter(ref * dist, sigma, radius), radius) - mu1 * mu2
        s1 = np.maximum(s1, 0.0)
        s2 = np.maximum(s2, 0.0)

        g = s12 / (s1 + _VIF_EPS)
        sv = s2 - g * s12
        flat_ref = s1 < _VIF_EPS
        g[flat_ref] = 0.0
        sv[flat_ref] = s2[flat_ref]
        s1[flat_ref] = 0.0
        flat_dist = s2 < _VIF_EPS
        g[flat_dist] = 0.0
        sv[flat_dist] = 0.0
        negative = g < 0
        sv[negative] = s2[negative]
        g[negative] = 0.0
        sv = np.maximum(sv, _VIF_EPS)

        num += float(np.sum(np.log10(1.0 + g * g * s1 / (sv + VIF_SIGMA_NSQ))))
        den += float(np.sum(np.log10(1.0 + s1 / VIF_SIGMA_NSQ)))
    if den == 0.0:
        return float("nan")
    return num / den


# -------------------------------------------------------------------------------------- fusion metrics
def q_mse(a: Any, b: Any, f: Any) -> float:
    """``Q_mse = (MSE(f, a) + MSE(f, b)) / 2`` — lower is better (intensity units squared)."""
    a, b, f = _volumes(("a", "b", "f"), (a, b, f))
    return 0.5 * (float(np.mean((f - a) ** 2)) + float(np.mean((f - b) ** 2)))


def q_cc(a: Any, b: Any, f: Any) -> float:
    """``Q_cc = (r(f, a) + r(f, b)) / 2`` with Pearson's r — higher is better, at most 1 (nan if constant)."""
    a, b, f = _volumes(("a", "b", "f"), (a, b, f))
    return 0.5 * (_pearson(f, a) + _pearson(f, b))


def q_psnr(a: Any, b: Any, f: Any, data_range: Number = 1.0) -> float:
    """``Q_psnr = 10 log10(data_range² / Q_mse)`` in dB — higher is better; ``inf`` when Q_mse is 0."""
    rng = _check_data_range(data_range)
    err = q_mse(a, b, f)
    if err == 0.0:
        return float("inf")
    return 10.0 * math.log10(rng * rng / err)


def q_ssim(a: Any, b: Any, f: Any, data_range: Number = 1.0) -> float:
    """``Q_ssim = SSIM(f, a) + SSIM(f, b)`` (3D, :func:`ssim3d`) — a SUM over sources, range up to 2."""
    a, b, f = _volumes(("a", "b", "f"), (a, b, f))
    return ssim3d(f, a, data_range) + ssim3d(f, b, data_range)


def q_vif(a: Any, b: Any, f: Any, data_range: Number = 1.0) -> float:
    """``Q_vif = VIF(a → f) + VIF(b → f)`` (:func:`vif_pixel`, sources as references) — a SUM over sources."""
    a, b, f = _volumes(("a", "b", "f"), (a, b, f))
    return vif_pixel(a, f, data_range) + vif_pixel(b, f, data_range)


def q_scd(a: Any, b: Any, f: Any) -> float:
    """Sum of the correlations of differences, ``Q_scd = r(a, f − b) + r(b, f − a)`` (Aslantas & Bendes 2015).

    ``f − b`` is what the fusion took from ``a`` (and vice versa); range [-2, 2], higher is better,
    symmetric in (a, b). ``nan`` when ``f − b`` or ``f − a`` is constant (e.g. ``f = b``).
    """
    a, b, f = _volumes(("a", "b", "f"), (a, b, f))
    return _pearson(a, f - b) + _pearson(b, f - a)


#: Keys of :func:`fusion_metrics`, in the order of the paper's tables.
FUSION_METRIC_KEYS: Tuple[str, ...] = ("q_mse", "q_cc", "q_psnr", "q_ssim", "q_vif", "q_scd")


def fusion_metrics(a: Any, b: Any, f: Any, data_range: Number = 1.0) -> Dict[str, float]:
    """All six fusion metrics of the paper's tables for sources ``a``, ``b`` and fused ``f``.

    Returns:
        :data:`FUSION_METRIC_KEYS` -> floats (see the module table).
        ``q_vif`` is ``nan`` for volumes with an edge below :func:`vif_min_size` voxels (VIF undefined there).
    """
    a, b, f = _volumes(("a", "b", "f"), (a, b, f))
    rng = _check_data_range(data_range)
    vif = q_vif(a, b, f, rng) if min(a.shape) >= vif_min_size() else float("nan")
    return {
        "q_mse": q_mse(a, b, f),
        "q_cc": q_cc(a, b, f),
        "q_psnr": q_psnr(a, b, f, rng),
        "q_ssim": q_ssim(a, b, f, rng),
        "q_vif": vif,
        "q_scd": q_scd(a, b, f),
    }


# ----------------------------------------------------------------------------------- alignment metrics
@dataclass(frozen=True)
class EndpointError:
    """Endpoint error of a displacement field against ground truth, in millimetres.

    Attributes:
        mean_mm: mean of ``map_mm`` over the evaluated voxels (the mask, or all voxels).
        max_mm: maximum of ``map_mm`` over the evaluated voxels.
        map_mm: float64 (z, y, x) map ``‖(u − u_gt) ⊙ spacing‖₂`` at every voxel (mask not applied).
    """

    mean_mm: float
    max_mm: float
    map_mm: np.ndarray


def _as_field(u: Any, name: str) -> np.ndarray:
    arr = _to_numpy(u)
    if arr.ndim != 4 or arr.shape[0] != 3:
        raise InputImageError(
            f"{name} must be a displacement field of shape (3, D, H, W) with channels (x, y, z) in voxels; "
            f"got shape {arr.shape}. Drop the batch axis (u[0]) of a (B, 3, D, H, W) tensor."
        )
    arr = arr.astype(np.float64, copy=False)
    if not np.all(np.isfinite(arr)):
        raise InputImageError(f"{name} contains NaN or infinite displacements.")
    return arr


def _as_mask(mask: Any, shape: Tuple[int, ...]) -> np.ndarray:
    m = _to_numpy(mask).astype(bool)
    if m.shape != tuple(shape):
        raise InputImageError(f"mask shape {m.shape} does not match the volume grid {tuple(shape)}.")
    if not m.any():
        raise InputImageError("mask selects no voxel; pass a mask with at least one True voxel or mask=None.")
    return m


def endpoint_error_mm(
    u: Any,
    u_gt: Any,
    spacing: Union[Number, Sequence[Number]],
    mask: Optional[Any] = None,
) -> EndpointError:
    """Endpoint error ``EPE(p) = ‖(u(p) − u_gt(p)) ⊙ spacing‖₂`` in mm.

    Args:
        u, u_gt: (3, D, H, W) pull-back displacement fields on one grid, in voxels, channels (x, y, z).
        spacing: voxel spacing in mm, a scalar (isotropic) or ``(sx, sy, sz)`` in (x, y, z) order — the order
            of ``SimpleITK.Image.GetSpacing()`` and of the field channels.
        mask: optional boolean (D, H, W) array; mean and max are taken over its True voxels.

    Returns:
        :class:`EndpointError` with the mean, the maximum and the full (D, H, W) map in mm.
    """
    u = _as_field(u, "u")
    u_gt = _as_field(u_gt, "u_gt")
    if u.shape != u_gt.shape:
        raise InputImageError(f"u {u.shape} and u_gt {u_gt.shape} live on different grids; resample one first.")
    sp = np.asarray(spacing, dtype=np.float64)
    if sp.ndim == 0:
        sp = np.full(3, float(sp))
    if sp.shape != (3,) or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise InputImageError(f"spacing must be a positive scalar or 3 positive values (sx, sy, sz) in mm; got {spacing!r}")
    diff_mm = (u - u_gt) * sp.reshape(3, 1, 1, 1)
    epe = np.sqrt(np.sum(diff_mm * diff_mm, axis=0))
    values = epe[_as_mask(mask, epe.shape)] if mask is not None else epe
    return EndpointError(mean_mm=float(values.mean()), max_mm=float(values.max()), map_mm=epe)


def dice(
    labels_a: Any,
    labels_b: Any,
    labels: Optional[Iterable[int]] = None,
) -> Dict[Union[int, str], float]:
    """Dice overlap ``2 |A_l ∩ B_l| / (|A_l| + |B_l|)`` per label l of two integer label volumes.

    Args:
        labels_a, labels_b: integer label arrays of one shape (0 = background).
        labels: labels to evaluate; default: every non-zero label present in either volume.

    Returns:
        ``{label: dice, ..., "mean": mean over labels}``. A requested label absent from both volumes gets
        ``nan`` and is left out of the mean.

    Kept rather than SimpleITK's ``LabelOverlapMeasuresImageFilter`` (the test's oracle): that one is not exact
    (an exact 0.75 comes out 0.7499999999999999) and warns on labels absent from both volumes; its one-pass speed-up
    (8× at 40 labels on 96³) does not matter for the few labels of an evaluation.
    """
    a = _to_numpy(labels_a)
    b = _to_numpy(labels_b)
    if a.shape != b.shape:
        raise InputImageError(f"label volumes differ in shape: {a.shape} vs {b.shape}; resample one onto the other's grid.")
    for name, arr in (("labels_a", a), ("labels_b", b)):
        if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
            raise InputImageError(f"{name} must hold integer labels; got dtype {arr.dtype}. Round/cast it first.")
    if labels is None:
        present = np.union1d(np.unique(a), np.unique(b))
        label_list = [int(v) for v in present if v != 0]
    else:
        label_list = [int(v) for v in labels]
    if not label_list:
        raise InputImageError("no labels to compare: both volumes are all background and no labels were given.")
    result: Dict[Union[int, str], float] = {}
    for lab in label_list:
        in_a = a == lab
        in_b = b == lab
        total = int(in_a.sum()) + int(in_b.sum())
        result[lab] = float("nan") if total == 0 else 2.0 * int(np.logical_and(in_a, in_b).sum()) / total
    values = [v for v in result.values() if not math.isnan(v)]
    result["mean"] = float(np.mean(values)) if values else float("nan")
    return result


def folding_percent(jacobian_det: Any, mask: Optional[Any] = None) -> float:
    """Percentage (0–100) of voxels whose Jacobian determinant is ≤ 0, i.e. where the field folds.

    Args:
        jacobian_det: determinant map of ``p ↦ p + u(p)`` of any shape, e.g. the (B, 1, D, H, W) output of
            :func:`unifuse.spatial.jacobian_determinant` or a (D, H, W) array.
        mask: optional boolean array of the same shape restricting the voxels counted.
    """
    det = _to_numpy(jacobian_det).astype(np.float64, copy=False)
    if det.size == 0:
        raise InputImageError("jacobian_det is empty.")
    if not np.all(np.isfinite(det)):
        raise InputImageError("jacobian_det contains NaN or infinite values; the displacement field is not finite.")
    values = det[_as_mask(mask, det.shape)] if mask is not None else det
    return 100.0 * float(np.count_nonzero(values <= 0.0)) / values.size


def alignment_metrics(aligned: Any, label: Any, data_range: Number = 1.0) -> Dict[str, float]:
    """Alignment quality of a warped volume against its ground-truth aligned version (the paper's Table 6).

    Returns:
        ``{"mse": MSE(aligned, label), "cc": r(aligned, label), "ssim": SSIM3D(aligned, label)}``.
    """
    x, y = _volumes(("aligned", "label"), (aligned, label))
    rng = _check_data_range(data_range)
    return {"mse": float(np.mean((x - y) ** 2)), "cc": _pearson(x, y), "ssim": ssim3d(x, y, rng)}
