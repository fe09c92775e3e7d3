"""Global registration stage: rigid, then affine, by Mattes mutual information over the foreground overlap.

Direction: every transform here maps **reference (fixed) LPS mm points to moving LPS mm points** (ITK's
resampling convention): ``aligned(x) = moving(T(x))``, ``aligned = geometry.warp_image(moving, T, reference)``.
The returned transform already contains the ``initial`` transform: ``T(x) = T_init(G(x))``, ``G`` found here.

Method (details, settings and measurements: ``docs/geometry.md`` §7 "Global stage (rigid -> affine)"):
2 mm working copies clamped to their 0.5-99.5th intensity percentiles; Mattes MI, 8-4-2 mm pyramid, fixed
random samples drawn in the reference foreground (∩ user mask) that count only where they land in the
moving foreground (∩ user mask) and field of view, frozen to the current overlap after the coarsest level;
header and centre-of-mass starts ranked by a short coarse run; ``Euler3DTransform`` then ``AffineTransform``,
the affine kept only if plausible and clearly better. Optimisation runs in the normalised frame
``x' = (x - c) / L`` (reference foreground centroid ``c``, RMS radius ``L``) with unit scales: ITK's
regular-step optimizer bounds the step length in *parameter space*, which in mm/radians lets rotation or
matrix steps move the anatomy ``L`` times too far; in the frame every parameter unit moves it by ~``L`` mm.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from .. import geometry
from ..errors import CancelledError, GeometryError, InputImageError
from ..intensity import foreground_mask

__all__ = ["AffineSettings", "AffineResult", "register_affine", "write_transform", "affine_parameters"]

ProgressFn = Callable[[float, str], None]
CancelFn = Callable[[], bool]
_CANCEL_MESSAGE = "cancelled by the user; nothing was written and the inputs are unchanged"


@dataclass(frozen=True)
class AffineSettings:
    """Settings of :func:`register_affine` (lengths in mm, angles in degrees).

    Attributes:
        working_spacing_mm: volumes finer than this are downsampled to it (per axis) first.
        shrink_factors: pyramid levels as multiples of ``working_spacing_mm``, coarse to fine.
        smoothing_sigmas_mm: Gaussian sigma per level, mm.
        histogram_bins: Mattes MI histogram bins.
        samples: metric samples per level (random, in the reference mask; all voxels if fewer).
        seed: sampling seed; results are bit-identical run to run with one thread (with several, ITK sums
            per-thread histograms in completion order: repeat runs agreed to ~1e-12 mm, not guaranteed).
        rigid_iterations / affine_iterations / start_iterations: optimizer iterations per level / per start.
        min_step_mm: the optimizer stops when its step is below this (scaled with the level's spacing).
        relaxation: step factor applied at every reversal of the gradient direction (regular-step descent).
        affine_levels: number of the finest levels the affine stage runs on.
        affine_min_gain: keep the affine only if it lowers the metric by more than this fraction.
        overlap_margin_mm: margin of the moving field of view used to freeze the overlap.
        rotation_starts_deg: extra starts rotated by +-this about each axis (0: none).
        try_moments: also start from the centre-of-mass translation (only when ``initial`` is None).
        affine: run the affine stage after the rigid one.
        scale_bounds: plausible range of the affine's singular values.
        max_shear: largest plausible |shear| (see :func:`affine_parameters`).
        percentiles: intensity clamp, % of each volume's nonzero voxels.
        foreground_dilate_mm: growth of the Otsu foreground masks (keeps the object's edge in the metric).
        threads: SimpleITK threads for this call (None: the global default). Set by changing SimpleITK's
            global default for the duration of the call, because ITK's metric threads follow it.
    """

    working_spacing_mm: float = 2.0
    shrink_factors: Tuple[int, ...] = (4, 2, 1)
    smoothing_sigmas_mm: Tuple[float, ...] = (4.0, 2.0, 1.0)
    histogram_bins: int = 32
    samples: int = 10000
    seed: int = 121
    rigid_iterations: int = 200
    affine_iterations: int = 150
    start_iterations: int = 40
    min_step_mm: float = 0.01
    relaxation: float = 0.85
    affine_levels: int = 3
    affine_min_gain: float = 0.01
    overlap_margin_mm: float = 4.0
    rotation_starts_deg: float = 0.0
    try_moments: bool = True
    affine: bool = True
    scale_bounds: Tuple[float, float] = (0.8, 1.25)
    max_shear: float = 0.2
    percentiles: Tuple[float, float] = (0.5, 99.5)
    foreground_dilate_mm: float = 4.0
    threads: Optional[int] = None


@dataclass
class AffineResult:
    """Outcome of :func:`register_affine`.

    Attributes:
        transform: reference -> moving LPS point map of the kept stage, INCLUDING the initial transform
            (one ``AffineTransform`` when the initial transform is linear, else a ``CompositeTransform``).
        rigid: the same for the rigid stage.
        stage_kept: ``"affine"``, ``"rigid"`` or ``"initial"`` (the rigid stage did not lower the metric).
        start: the winning start (``"header"``, ``"moments"`` or ``"initial"``, ``+rot..`` if rotated).
        metric: Mattes MI (ITK sign, lower is better) at the working resolution: ``"initial"`` and
            ``"rigid"`` on the same samples; ``"rigid_on_overlap"`` and ``"affine"`` on the same samples.
        iterations: optimizer iterations per step (all levels).
        seconds: wall time per step (``"prepare"``, ``"starts"``, ``"rigid"``, ``"affine"``, ``"total"``).
        parameters: :func:`affine_parameters` of ``transform`` (degrees, mm).
        affine_parameters: the same for the affine stage's own result, kept or not (None if not run).
    """

    transform: sitk.Transform
    rigid: sitk.Transform
    stage_kept: str
    start: str
    metric: Dict[str, float]
    iterations: Dict[str, int]
    seconds: Dict[str, float]
    parameters: Dict[str, Any]
    affine_parameters: Optional[Dict[str, Any]] = None

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready summary (no transform objects)."""
        return {
            "direction": "reference -> moving, LPS mm points (ITK resampling convention)",
            "stage_kept": self.stage_kept,
            "start": self.start,
            "metric_mattes_mi": {k: round(v, 6) if np.isfinite(v) else None for k, v in self.metric.items()},
            "iterations": dict(self.iterations),
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "parameters": self.parameters,
            "affine_parameters": self.affine_parameters,
        }


# --------------------------------------------------------------------------------------------------------
# preparation: working copies, masks, pyramid


def _working_copy(image: sitk.Image, spacing_mm: float, percentiles: Tuple[float, float]) -> sitk.Image:
    """float32 copy at >= ``spacing_mm`` per axis (bin average + linear resampling), intensity-clamped."""
    img = sitk.Cast(image, sitk.sitkFloat32)
    old = np.asarray(img.GetSpacing(), dtype=np.float64)
    new = np.maximum(old, spacing_mm)
    if np.any(new > old * 1.01):
        low = float(np.nanmin(sitk.GetArrayViewFromImage(img)))
        # never bin more voxels than an axis has (a header with a tiny spacing asks for huge factors)
        factors = [min(max(1, int(f + 1e-6)), int(n)) for f, n in zip(new / old, image.GetSize())]
        binned = sitk.BinShrink(img, factors) if max(factors) > 1 else img
        grid = sitk.Image([int(max(v, 1)) for v in np.ceil(np.asarray(image.GetSize()) * old / new)], sitk.sitkFloat32)
        grid.SetSpacing(new.tolist())
        grid.SetDirection(image.GetDirection())
        direction = np.asarray(image.GetDirection()).reshape(3, 3)
        grid.SetOrigin((np.asarray(image.GetOrigin()) + direction @ ((new - old) / 2)).tolist())
        img = sitk.Resample(binned, grid, sitk.Transform(), sitk.sitkLinear, low, sitk.sitkFloat32)
    arr = sitk.GetArrayViewFromImage(img)
    if not np.isfinite(arr).all():
        raise InputImageError("a volume contains NaN or infinite voxels; replace them (e.g. by 0) before registering")
    values = arr[arr != 0]
    if values.size < 10:
        raise InputImageError("a volume has (almost) no nonzero voxels, so it cannot be registered; check the file")
    lo, hi = (float(v) for v in np.percentile(values, percentiles))
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
    return sitk.Clamp(img, sitk.sitkFloat32, lo, max(hi, lo + 1e-6))


def _metric_masks(work: sitk.Image, user_mask: Optional[sitk.Image], dilate_mm: float, margin_mm: float,
                  role: str) -> Tuple[sitk.Image, Optional[sitk.Image]]:
    """uint8 masks on ``work``'s grid: dilated Otsu foreground ∩ the user's mask (non-zero = inside, any
    grid), and the user's mask eroded by ``margin_mm`` (None without a user mask)."""
    mask, eroded = foreground_mask(work, dilate_mm), None
    if user_mask is not None:
        if user_mask.GetDimension() != 3 or user_mask.GetNumberOfComponentsPerPixel() != 1:
            raise InputImageError(f"the {role} mask must be a 3D scalar label image (non-zero = inside)")
        inside = sitk.Resample(sitk.NotEqual(user_mask, 0), work, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                               sitk.sitkUInt8)
        radius = [int(v) for v in np.ceil(margin_mm / np.asarray(work.GetSpacing()))]
        mask, eroded = sitk.And(mask, inside), sitk.BinaryErode(inside, radius, sitk.sitkBox, 0, 1, True)
    if int(sitk.GetArrayViewFromImage(mask).sum()) < 50:
        raise InputImageError(
            f"the {role} mask leaves (almost) no foreground voxels for registration; check that the mask "
            f"covers the {role} volume's anatomy and lies in its physical space"
        )
    return mask, eroded


def _mask_points(mask: sitk.Image) -> np.ndarray:
    """(N, 3) LPS mm points of a binary mask's voxels."""
    kji = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)
    m = geometry.ijk_to_lps_matrix(mask)
    return kji[:, ::-1] @ m[:3, :3].T + m[:3, 3]


def _shrink_smooth(image: sitk.Image, spacing_mm: float, sigma_mm: float) -> Tuple[sitk.Image, int]:
    """Bin-average ``image`` to about ``spacing_mm`` per axis (>= 4 voxels), smooth by ``sigma_mm``;
    returns the image and the voxel-count reduction factor."""
    size, spacing = np.asarray(image.GetSize()), np.asarray(image.GetSpacing())
    factors = [int(v) for v in np.clip(np.ceil(spacing_mm / spacing - 0.3), 1, np.maximum(size // 4, 1))]
    out = sitk.BinShrink(image, factors) if max(factors) > 1 else image
    if sigma_mm > 0:
        out = sitk.SmoothingRecursiveGaussian(out, float(sigma_mm))
    return out, int(np.prod(factors))


def _fov_box(image: sitk.Image, margin_mm: float) -> sitk.Image:
    """uint8 image on ``image``'s grid: 1 inside its field of view shrunk by ``margin_mm`` on every side."""
    size = np.asarray(image.GetSize())
    m = np.minimum(np.ceil(margin_mm / np.asarray(image.GetSpacing())).astype(int), (size - 1) // 2)
    box = np.zeros(size[::-1], dtype=np.uint8)
    box[m[2]: size[2] - m[2], m[1]: size[1] - m[1], m[0]: size[0] - m[0]] = 1
    out = sitk.GetImageFromArray(box)
    out.CopyInformation(image)
    return out


# --------------------------------------------------------------------------------------------------------
# transforms: composition, parameters


def _compose(initial: sitk.Transform, inner: sitk.Transform, center: np.ndarray) -> sitk.Transform:
    """``T(x) = initial(inner(x))`` as one AffineTransform (centre ``center``) when both are linear."""
    composite = sitk.CompositeTransform([initial, inner])
    if not (initial.IsLinear() and inner.IsLinear()):
        return composite
    c = np.asarray(center, dtype=np.float64)
    p0 = np.asarray(composite.TransformPoint(c.tolist()))
    matrix = np.stack([np.asarray(composite.TransformPoint((c + e).tolist())) - p0 for e in np.eye(3)], axis=1)
    return sitk.AffineTransform(matrix.ravel().tolist(), (p0 - c).tolist(), c.tolist())


def affine_parameters(transform: sitk.Transform, center: Sequence[float]) -> Dict[str, Any]:
    """Rotation (degrees), translation (mm), scales and shears of a linear reference -> moving LPS map.

    ``A = Q @ U`` (QR with positive diagonal): ``Q`` is the rotation, reported as ITK Euler3D angles about
    x, y, z (matrix ``Rz Rx Ry``) and as one total angle; ``scales = diag(U)``; ``shear`` = (xy, xz, yz) =
    ``U01/U00, U02/U00, U12/U11``; ``singular_values`` of ``A``; ``translation_mm = T(c) - c`` at ``center``.
    """
    c = np.asarray(center, dtype=np.float64)
    p0 = np.asarray(transform.TransformPoint(c.tolist()))
    a = np.stack([np.asarray(transform.TransformPoint((c + e).tolist())) - p0 for e in np.eye(3)], axis=1)
    q, u = np.linalg.qr(a)
    sign = np.where(np.diag(u) < 0, -1.0, 1.0)
    q, u = q * sign, sign[:, None] * u
    angles = [float("nan")] * 3
    if np.linalg.det(q) > 0:
        euler = sitk.Euler3DTransform()
        euler.SetMatrix(q.ravel().tolist(), 1e-6)
        angles = [float(np.degrees(v)) for v in (euler.GetAngleX(), euler.GetAngleY(), euler.GetAngleZ())]
    return {
        "center_mm": c.round(4).tolist(),
        "translation_mm": (p0 - c).round(4).tolist(),
        "rotation_deg": [round(v, 4) for v in angles],
        "rotation_angle_deg": round(float(np.degrees(np.arccos(np.clip((np.trace(q) - 1) / 2, -1, 1)))), 4),
        "scales": np.diag(u).round(5).tolist(),
        "shear": [round(float(v), 5) for v in (u[0, 1] / u[0, 0], u[0, 2] / u[0, 0], u[1, 2] / u[1, 1])],
        "singular_values": np.linalg.svd(a, compute_uv=False).round(5).tolist(),
        "determinant": round(float(np.linalg.det(a)), 5),
        "matrix": a.round(6).tolist(),
    }


def _plausible(params: Dict[str, Any], s: AffineSettings) -> bool:
    sv = params["singular_values"]
    return (
        params["determinant"] > 0
        and s.scale_bounds[0] <= min(sv)
        and max(sv) <= s.scale_bounds[1]
        and max(abs(v) for v in params["shear"]) <= s.max_shear
    )


# --------------------------------------------------------------------------------------------------------
# registration machinery


class _Frame:
    """Normalised coordinates ``x' = (x - c) / L`` (see the module docstring), ``c`` and ``L`` in mm."""

    def __init__(self, center: np.ndarray, length: float) -> None:
        self.c, self.length = np.asarray(center, dtype=np.float64), float(length)

    def image(self, image: sitk.Image) -> sitk.Image:
        out = sitk.Image(image)
        out.SetOrigin(((np.asarray(image.GetOrigin()) - self.c) / self.length).tolist())
        out.SetSpacing((np.asarray(image.GetSpacing()) / self.length).tolist())
        return out

    def transform(self, t: sitk.Transform) -> sitk.Transform:
        """``t'(x') = (t(c + L x') - c) / L`` for a physical reference -> moving map ``t``."""
        scale = sitk.AffineTransform((np.eye(3) * self.length).ravel().tolist(), self.c.tolist())
        return sitk.CompositeTransform([scale.GetInverse(), t, scale])

    def physical(self, inner: sitk.Transform) -> sitk.Transform:
        """Physical map of a normalised Euler/affine transform (centre 0): same matrix, centre c, L t'."""
        shift = (np.asarray(inner.GetTranslation()) * self.length).tolist()
        if isinstance(inner, sitk.Euler3DTransform):
            angles = (inner.GetAngleX(), inner.GetAngleY(), inner.GetAngleZ())
            return sitk.Euler3DTransform(self.c.tolist(), *angles, shift)
        return sitk.AffineTransform(inner.GetMatrix(), shift, self.c.tolist())


class _Level:
    """One pyramid level in the normalised frame; optimizer steps in frame units."""

    def __init__(self, fixed, moving, spacing_mm: float, sigma_mm: float, s: AffineSettings, frame: _Frame) -> None:
        fixed, self.shrink = _shrink_smooth(fixed, spacing_mm, sigma_mm)
        self.fixed, self.moving = frame.image(fixed), frame.image(_shrink_smooth(moving, spacing_mm, sigma_mm)[0])
        self.first_step = spacing_mm / 2.0 / frame.length
        self.min_step = s.min_step_mm * spacing_mm / s.working_spacing_mm / frame.length


class _Job:
    """The prepared pair, pyramid and masks, the metric/optimizer set-up, cancel and progress."""

    def __init__(self, fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image, moving_mask: sitk.Image,
                 moving_core: Optional[sitk.Image], s: AffineSettings, cancel, progress) -> None:
        points = _mask_points(fixed_mask)
        center = points.mean(axis=0)
        self.frame = _Frame(center, max(float(np.sqrt(((points - center) ** 2).sum(axis=1).mean())), 10.0))
        self.s, self.cancel, self.progress = s, cancel, progress
        self.fixed_mask_mm, self.moving_mask_mm = fixed_mask, moving_mask
        self.fixed_mask, self.moving_mask = self.frame.image(fixed_mask), self.frame.image(moving_mask)
        # where frozen reference samples must land: the moving field of view and user mask, less the margin
        self.moving_frozen = _fov_box(moving, s.overlap_margin_mm)
        if moving_core is not None:
            self.moving_frozen = sitk.And(self.moving_frozen, moving_core)
        self.levels = [
            _Level(fixed, moving, f * s.working_spacing_mm, sigma, s, self.frame)
            for f, sigma in zip(s.shrink_factors, s.smoothing_sigmas_mm)
        ]
        self.iterations = 0  # optimizer iterations of the last run

    def overlap_mask(self, transform: sitk.Transform) -> Optional[sitk.Image]:
        """Reference mask ∩ the points that the physical ``transform`` maps into the moving field of view and
        user mask, both less the margin (normalised frame): a frozen sample set that stays valid while the
        transform changes by less than the margin (None if that leaves almost nothing). Samples at the edge
        of the moving foreground (background on both sides) are still checked at every iteration."""
        inside = sitk.Resample(self.moving_frozen, self.fixed_mask_mm, transform, sitk.sitkNearestNeighbor, 0,
                               sitk.sitkUInt8)
        mask = sitk.And(self.fixed_mask_mm, inside)
        return self.frame.image(mask) if int(sitk.GetArrayViewFromImage(mask).sum()) >= 50 else None

    def run(self, level: int, base: sitk.Transform, inner: sitk.Transform, iterations: int,
            span: Tuple[float, float], label: str, fixed_mask: Optional[sitk.Image] = None) -> float:
        """Optimise the normalised ``inner`` in place (``T' = base' o inner``) on pyramid ``level``; returns
        the Mattes MI at the last iterate (same level and mask = same samples, so values compare)."""
        s, lv, r = self.s, self.levels[level], sitk.ImageRegistrationMethod()
        mask = self.fixed_mask if fixed_mask is None else fixed_mask
        r.SetMetricAsMattesMutualInformation(s.histogram_bins)
        r.SetMetricFixedMask(mask)
        r.SetMetricMovingMask(self.moving_mask)
        r.SetMetricSamplingStrategy(r.RANDOM)
        n_mask = max(int(sitk.GetArrayViewFromImage(mask).sum()), 1)
        r.SetMetricSamplingPercentage(float(min(1.0, s.samples * lv.shrink / n_mask)), s.seed)
        r.SetMetricUseFixedImageGradientFilter(False)
        r.SetMetricUseMovingImageGradientFilter(False)  # central differences: no gradient image per run
        r.SetInterpolator(sitk.sitkLinear)
        r.SetOptimizerAsRegularStepGradientDescent(lv.first_step, lv.min_step, iterations, s.relaxation, 1e-8)
        r.SetOptimizerScales([1.0] * inner.GetNumberOfParameters())  # = physical-shift scales in this frame
        cancelled, count = [False], [0]

        def on_iteration() -> None:
            count[0] += 1
            if self.cancel is not None and self.cancel():
                cancelled[0] = True
                r.StopRegistration()
            if self.progress is not None and span[1] > span[0] and count[0] % 10 == 1:
                self.progress(span[0] + (span[1] - span[0]) * min(1.0, count[0] / iterations), label)

        r.AddCommand(sitk.sitkIterationEvent, on_iteration)
        r.SetMovingInitialTransform(base)
        r.SetInitialTransform(inner, inPlace=True)
        try:
            r.Execute(lv.fixed, lv.moving)
        except RuntimeError as error:
            if "outside" not in str(error) and "samples" not in str(error):
                raise
            raise GeometryError(
                "the registration lost the overlap between the volumes (too few reference foreground samples "
                "map into the moving volume); check the headers, try init='moments', or give masks"
            ) from error
        if cancelled[0]:
            raise CancelledError(_CANCEL_MESSAGE)
        self.iterations = count[0]
        return float(r.GetMetricValue())

    def metric(self, base: sitk.Transform, inner: sitk.Transform, fixed_mask: Optional[sitk.Image] = None) -> float:
        """Mattes MI of ``base' o inner`` on the finest level (one optimizer iteration on a copy)."""
        return self.run(len(self.levels) - 1, base, inner.__class__(inner), 1, (0.0, 0.0), "metric", fixed_mask)


def _starts(job: _Job, initial: Optional[sitk.Transform]) -> List[Tuple[str, sitk.Euler3DTransform]]:
    """(name, normalised Euler start) candidates: header or ``initial``, moments, optional rotations."""
    s, frame = job.s, job.frame
    translations = [("initial" if initial is not None else "header", np.zeros(3))]
    if initial is None and s.try_moments:
        moments = _mask_points(job.moving_mask_mm).mean(axis=0)
        translations.append(("moments", (moments - frame.c) / frame.length))
    rotations = [("", np.zeros(3))]
    for axis in range(3) if s.rotation_starts_deg > 0 else ():
        for sign in (1, -1):
            angles = np.zeros(3)
            angles[axis] = np.radians(sign * s.rotation_starts_deg)
            rotations.append((f"+rot{'xyz'[axis]}{sign * s.rotation_starts_deg:+g}", angles))
    return [(n + rn, sitk.Euler3DTransform([0, 0, 0], *ra, t.tolist()))
            for n, t in translations for rn, ra in rotations]


def _best_start(job: _Job, base: sitk.Transform, starts) -> Tuple[str, sitk.Euler3DTransform, int]:
    """Short coarse-level run from every start; the lowest metric wins. Returns (name, euler, iterations)."""
    if len(starts) == 1:
        return starts[0][0], starts[0][1], 0
    scored, its = [], 0
    for i, (name, euler) in enumerate(starts):
        try:
            span = (0.2 * i / len(starts), 0.2 * (i + 1) / len(starts))
            scored.append((job.run(0, base, euler, job.s.start_iterations, span, "starts"), i, name, euler))
        except GeometryError:
            continue
        its += job.iterations
    if not scored:
        raise GeometryError("no start kept the volumes overlapping; check the headers or use init='moments'")
    _, _, name, euler = min(scored, key=lambda v: (v[0], v[1]))
    return name, euler, its


# --------------------------------------------------------------------------------------------------------
# public API


def register_affine(
    reference: sitk.Image,
    moving: sitk.Image,
    initial: Optional[sitk.Transform] = None,
    *,
    reference_mask: Optional[sitk.Image] = None,
    moving_mask: Optional[sitk.Image] = None,
    settings: Optional[AffineSettings] = None,
    cancel: Optional[CancelFn] = None,
    progress: Optional[ProgressFn] = None,
) -> AffineResult:
    """Rigid then affine registration of ``moving`` onto ``reference`` (Mattes MI, any modality pair).

    Args:
        reference, moving: 3D scalar volumes, LPS mm; not modified.
        initial: reference -> moving LPS pre-alignment (e.g. :func:`unifuse.geometry.initial_transform`);
            None = header geometry, with the centre-of-mass translation tried as a second start.
        reference_mask, moving_mask: optional label images on their own grids (non-zero = use); the metric
            only uses reference points inside ``reference_mask`` that land inside ``moving_mask``.
        settings: :class:`AffineSettings` (defaults: 2 mm working copies, 8-4-2 mm pyramid).
        cancel: zero-argument callable polled every iteration; True -> :class:`CancelledError`.
        progress: ``progress(fraction in [0, 1], message)``.

    Returns:
        :class:`AffineResult`; ``result.transform`` maps reference LPS points to moving LPS points
        (initial included): ``aligned = geometry.warp_image(moving, result.transform, reference)``.
    """
    s = settings or AffineSettings()
    if not s.shrink_factors or len(s.shrink_factors) != len(s.smoothing_sigmas_mm):
        raise ValueError("settings.shrink_factors and settings.smoothing_sigmas_mm need the same, non-zero length")
    for image, role in ((reference, "reference"), (moving, "moving")):
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise InputImageError(f"the {role} volume must be a 3D scalar image for the global registration")
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    if s.threads:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(s.threads))
    try:
        return _register(reference, moving, initial, reference_mask, moving_mask, s, cancel, progress)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)


def _register(reference: sitk.Image, moving: sitk.Image, initial: Optional[sitk.Transform],
              reference_mask: Optional[sitk.Image], moving_mask: Optional[sitk.Image], s: AffineSettings,
              cancel: Optional[CancelFn], progress: Optional[ProgressFn]) -> AffineResult:
    t0 = time.perf_counter()
    fixed = _working_copy(reference, s.working_spacing_mm, s.percentiles)
    mov = _working_copy(moving, s.working_spacing_mm, s.percentiles)
    fmask, _ = _metric_masks(fixed, reference_mask, s.foreground_dilate_mm, s.overlap_margin_mm, "reference")
    mmask, mcore = _metric_masks(mov, moving_mask, s.foreground_dilate_mm, s.overlap_margin_mm, "moving")
    job = _Job(fixed, mov, fmask, mmask, mcore, s, cancel, progress)
    frame, center, identity = job.frame, job.frame.c, sitk.Transform(3, sitk.sitkIdentity)
    base = initial if initial is not None else identity
    base_n = frame.transform(base)
    seconds = {"prepare": time.perf_counter() - t0}

    def physical(inner: sitk.Transform) -> sitk.Transform:  # the whole reference -> moving map, mm
        return _compose(base, frame.physical(inner), center)

    # 1. starts (header / initial, moments, rotations), ranked by a short coarse run
    t = time.perf_counter()
    starts = [c for c in _starts(job, initial)
              if geometry.overlap_fraction(reference, moving, physical(c[1])) > 1e-3]
    if not starts:
        geometry.check_overlap(reference, moving, initial)  # raises GeometryError naming the fix
        raise GeometryError("the moving volume does not overlap the reference under any start; check the headers")
    name, euler, start_its = _best_start(job, base_n, starts)
    iterations = {"starts": start_its, "rigid": 0}
    seconds["starts"] = time.perf_counter() - t

    # 2. rigid, coarse to fine; after the coarsest level the samples are frozen to the current overlap
    t = time.perf_counter()
    try:
        metric = {"initial": job.metric(base_n, sitk.Euler3DTransform())}
    except GeometryError:  # the initial transform barely overlaps at the finest level: it cannot win
        metric = {"initial": float("inf")}
    n = len(job.levels)
    for level in range(n):
        mask = job.overlap_mask(physical(euler)) if level > 0 else None
        span = (0.2 + 0.5 * level / n, 0.2 + 0.5 * (level + 1) / n)
        job.run(level, base_n, euler, s.rigid_iterations, span, "rigid", mask)
        iterations["rigid"] += job.iterations
    rigid = physical(euler)
    metric["rigid"] = job.metric(base_n, euler)
    seconds["rigid"] = time.perf_counter() - t
    kept, transform = "rigid", rigid
    if metric["rigid"] >= metric["initial"]:  # the rigid stage made it no better: keep the initial transform
        kept, transform = "initial", _compose(base, identity, center)

    # 3. affine from the rigid result, on the rigid result's overlap
    affine_params = None
    if s.affine:
        t = time.perf_counter()
        mask = job.overlap_mask(rigid)
        metric["rigid_on_overlap"] = job.metric(base_n, euler, mask)
        affine = sitk.AffineTransform(euler.GetMatrix(), euler.GetTranslation(), (0.0, 0.0, 0.0))
        iterations["affine"] = 0
        try:
            for level in range(max(0, n - s.affine_levels), n):
                span = (0.7 + 0.3 * level / n, 0.7 + 0.3 * (level + 1) / n)
                metric["affine"] = job.run(level, base_n, affine, s.affine_iterations, span, "affine", mask)
                iterations["affine"] += job.iterations
        except GeometryError:  # the affine ran off the overlap: implausible, keep the rigid result
            metric["affine"] = float("inf")
        seconds["affine"] = time.perf_counter() - t
        affine_params = affine_parameters(frame.physical(affine), center)
        gain = metric["rigid_on_overlap"] - metric["affine"]
        enough = gain > s.affine_min_gain * abs(metric["rigid_on_overlap"])
        if kept == "rigid" and _plausible(affine_params, s) and enough:
            kept, transform = "affine", physical(affine)
    seconds["total"] = time.perf_counter() - t0
    if progress is not None:
        progress(1.0, f"global registration done ({kept} kept)")
    return AffineResult(
        transform=transform,
        rigid=rigid,
        stage_kept=kept,
        start=name,
        metric=metric,
        iterations=iterations,
        seconds=seconds,
        parameters=affine_parameters(transform, center) if transform.IsLinear() else {"center_mm": center.tolist()},
        affine_parameters=affine_params,
    )


def write_transform(result: Union[AffineResult, sitk.Transform], path: Union[str, Path]) -> Path:
    """Write the global transform as an ITK transform file: ``.tfm``/``.txt`` (text) or ``.h5``/``.hdf5``.

    Direction: the file holds the **reference -> moving** map of **LPS mm** points, ITK's resampling
    convention (``aligned(x) = moving(T(x))``); with a linear initial transform it is a single
    ``AffineTransform_double_3_3`` (matrix, translation, centre = reference foreground centroid).

    * SimpleITK: ``T = sitk.ReadTransform(path)``; ``aligned = sitk.Resample(moving, reference, T)``; the
      reference point ``x`` corresponds to the moving point ``T.TransformPoint(x)`` (both LPS).
    * 3D Slicer: load the file (Add Data, or ``slicer.util.loadTransform(path)``). Slicer reads ITK files as
      resampling transforms: the LPS matrix ``M`` becomes ``F M F`` in RAS (``F = diag(-1, -1, 1)``) and is
      the node's *transform from parent*; the *to parent* transform is its inverse. Put the **moving**
      volume under the node (Data module, or ``movingNode.SetAndObserveTransformNodeID(node.GetID())``):
      it is then displayed aligned to the reference; "Harden transform" resamples it. Do not invert the
      node (that would apply the map twice the wrong way round).
    """
    transform = result.transform if isinstance(result, AffineResult) else result
    out = Path(path)
    if out.suffix.lower() not in (".tfm", ".txt", ".h5", ".hdf5"):
        raise ValueError(f"unsupported transform file extension {out.suffix!r}; use .tfm or .h5")
    sitk.WriteTransform(transform, str(out))
    return out
