"""THE evaluation against known truth: every published alignment and fusion figure comes from this module.

Users: ``unifuse demo`` (:func:`unifuse.demo.evaluate_against_truth`), ``unifuse evaluate`` and the model card
(:mod:`unifuse.train.evaluate`), and ``unifuse bench`` (synthetic, ``--pairs`` and ``--real``;
:mod:`unifuse.bench.runner`).

Conventions. Images are ``SimpleITK.Image`` in LPS mm; arrays are (z, y, x). A displacement field is a
**pull-back field on the reference grid**, ``aligned(x) = moving(x + U(x))`` for the physical points x of the
reference voxels, stored as a 3-component vector image in LPS mm (the pipeline's ``result.displacement``,
``geometry.transform_to_displacement`` of a baseline's transform, the cases' ``truth_displacement``). All
lengths are in mm; percentages are 0–100.

The rules (the three former implementations — demo, model card, benchmark — are compared where they differed):

1. **Evaluation mask** (:func:`evaluation_mask`, "inside the object"): the reference's foreground by
   :func:`unifuse.intensity.foreground_mask` (Otsu threshold of the reference smoothed by one voxel, holes
   filled, no dilation), intersected — when the moving volume and the true field are known — with the
   reference points that the true field maps into the moving volume's field of view (:func:`moving_fov_mask`;
   nothing can be aligned where the moving scan has no data: this matters for partial-field-of-view cases and
   is (nearly) everything for full ones). All three former implementations thresholded the [0, 1]-normalised
   reference at 0.05 instead; on the synthetic MR references that threshold kept the background noise (38 %
   of its voxels lay outside the head labels, against 8 % for the Otsu mask, which still covers 99.6 % of the
   head) and it depends on the normalisation rule (CT window vs MR percentiles), so it was replaced.
2. **Endpoint error** (:func:`endpoint_error`): ``‖U(x) − U_true(x)‖₂`` in mm over the evaluation mask;
   mean, median, 95th percentile and max. Same formula as before (mean and max were reported).
3. **Dice of warped labels** (:func:`label_dice`): the moving-pose labels resampled (nearest neighbour)
   through the method's ``x -> x + U(x)`` onto the reference grid, against the reference labels, per label
   and their mean, over the labels present in the reference labels inside the region where the true field
   maps into the moving field of view (labels cannot be recovered elsewhere). The benchmark counted every
   label present in either volume over the whole grid, the model card the labels present in the reference;
   the reference (the truth) decides which labels are evaluated — a standard choice — and the region rule
   keeps a partial moving scan from lowering every method's Dice, the oracle's included.
4. **Folding** (:func:`folding_percent`): % of reference-grid voxels (the whole grid: a fold anywhere is a
   defect of the transform that is applied there) where ``det ∂(x + U(x))/∂x ≤ 0``, with the physical
   Jacobian of :func:`unifuse.error_maps.jacobian_determinant_image` (central differences, one-sided at the
   borders, direction cosines honoured). The model card used the same finite differences in voxel units on
   its isotropic grid (identical values).
5. **Intensities** (:class:`EvaluationCase`): the reference R and the clean aligned label L are mapped to
   [0, 1] by the pipeline's rule (:func:`unifuse.intensity.normalize_image`) computed on themselves; EVERY
   aligned moving volume is mapped with the rule computed once on the moving INPUT, so no method gains or loses
   from its own output's histogram (the benchmark's rule; the demo renormalised each aligned volume on its
   own percentiles). A fused volume in reference units is mapped back with the reference's rule (the demo
   renormalised it on its own percentiles).
6. **Aligned-volume similarity** (``mse``, ``cc``, ``ssim``; the paper's Table 6 columns): the aligned moving
   volume against the SAME moving volume resampled through the true field, both in [0, 1] on the reference
   grid (the model card's rule). Comparing with the clean label instead (demo and benchmark) mixes the
   moving scan's degradation into an alignment score and gives the exact field a non-perfect value; against
   the truth-resampled input the oracle scores MSE 0, CC 1, SSIM 1.
7. **Fusion** (:func:`evaluate_fusion`): :func:`unifuse.metrics.fusion_metrics` of the fused volume against the
   two ideal aligned sources (R, L), all in [0, 1] (unchanged).
8. **MIND** (optional, no truth needed): mean local MIND dissimilarity (:func:`unifuse.error_maps.
   local_dissimilarity`) of the aligned volume to R inside R's foreground dilated by 5 mm (the benchmark's).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any, Dict, Iterable, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk

from . import error_maps, geometry, metrics
from .bench.cases import moving_pose_labels
from .errors import GeometryError, InputImageError
from .intensity import IntensityNormalization, foreground_mask, normalize_image

__all__ = [
    "MASK_RULE",
    "MIND_MASK_DILATE_MM",
    "EndpointErrorStats",
    "EvaluationCase",
    "as_evaluation_case",
    "evaluation_mask",
    "moving_fov_mask",
    "zero_displacement",
    "displacement_from_voxels",
    "warp_moving",
    "endpoint_error",
    "warp_labels",
    "label_dice",
    "folding_percent",
    "reduction_percent",
    "evaluate_alignment",
    "evaluate_fusion",
    "evaluate_output_sharpness",
    "evaluate_restoration",
    "fused_to_unit",
    "mean_gradient",
]

#: One-line statement of the evaluation-mask rule, for reports.
MASK_RULE = ("reference foreground (Otsu threshold of the reference smoothed by one voxel, holes filled) where the "
             "true field maps into the moving volume's field of view")
#: Dilation (mm) of the reference foreground inside which the MIND dissimilarity is averaged.
MIND_MASK_DILATE_MM = 5.0
_SLAB = 16  # z-planes per block in the field computations (bounds memory on large reference grids)

Field = Union[sitk.Image, np.ndarray]


# --------------------------------------------------------------------------------------------------------
# fields and grids


def _field_array(field: Field, grid: sitk.Image, role: str) -> np.ndarray:
    """(z, y, x, 3) LPS mm view of a displacement field that must lie on ``grid``."""
    if isinstance(field, sitk.Image):
        if field.GetNumberOfComponentsPerPixel() != 3 or field.GetDimension() != 3:
            raise InputImageError(f"the {role} must be a 3D, 3-component displacement field (LPS mm); it has "
                                  f"{field.GetNumberOfComponentsPerPixel()} component(s)")
        if not geometry.on_same_grid(field, grid):
            raise GeometryError(f"the {role} (size {field.GetSize()}) is not on the reference grid (size "
                                f"{grid.GetSize()}); express it there with geometry.transform_to_displacement()")
        return sitk.GetArrayViewFromImage(field)
    arr = np.asarray(field)
    expected = tuple(reversed(grid.GetSize())) + (3,)
    if arr.shape != expected:
        raise GeometryError(f"the {role} array has shape {arr.shape}; expected {expected} = (z, y, x, 3) LPS mm on "
                            "the reference grid")
    return arr


def _field_image(field: Field, grid: sitk.Image, role: str) -> sitk.Image:
    """``field`` as a ``sitkVectorFloat64`` image on ``grid`` (a private copy)."""
    if isinstance(field, sitk.Image):
        _field_array(field, grid, role)
        image = sitk.Cast(field, sitk.sitkVectorFloat64)
    else:
        image = sitk.GetImageFromArray(np.asarray(_field_array(field, grid, role), dtype=np.float64), isVector=True)
    image.CopyInformation(grid)
    return image


def _field_transform(field: Field, grid: sitk.Image) -> sitk.Transform:
    """``x -> x + U(x)`` as an ITK transform (linear interpolation of U between voxel centres, 0 outside)."""
    return sitk.DisplacementFieldTransform(_field_image(field, grid, "displacement field"))


def zero_displacement(reference: sitk.Image) -> sitk.Image:
    """The identity field (no registration: header geometry only) on ``reference``'s grid."""
    return geometry.transform_to_displacement(sitk.Transform(3, sitk.sitkIdentity), reference)


def displacement_from_voxels(u: Any, grid: sitk.Image) -> sitk.Image:
    """A network field ``(3, D, H, W)`` in voxels of ``grid`` (channels x, y, z; a torch tensor or array) as an
    LPS mm displacement image on ``grid`` (:func:`unifuse.geometry.field_voxels_to_image`)."""
    if hasattr(u, "detach"):
        u = u.detach().float().cpu().numpy()
    return geometry.field_voxels_to_image(np.asarray(u, dtype=np.float64), grid)


def warp_moving(case: "EvaluationCase", displacement: Field) -> sitk.Image:
    """The moving volume resampled (linear) onto the reference grid through ``x -> x + U(x)``, the moving
    normalisation's low value outside the moving volume (as the pipeline's one warp); moving's units."""
    return geometry.warp_image(case.moving, _field_transform(displacement, case.reference), case.reference,
                               default=float(case.moving_norm.low))


# --------------------------------------------------------------------------------------------------------
# the evaluation mask


def moving_fov_mask(truth: Field, moving: sitk.Image, reference: sitk.Image) -> np.ndarray:
    """Reference voxels x whose true correspondent ``x + U_true(x)`` lies inside the moving volume's field of
    view (continuous index within half a voxel of the outer voxel centres), bool (z, y, x)."""
    u = _field_array(truth, reference, "true displacement field")
    m_ref = geometry.index_to_physical_matrix(reference)
    origin_ref = np.asarray(reference.GetOrigin(), dtype=np.float64)
    to_moving = np.linalg.inv(geometry.index_to_physical_matrix(moving))
    origin_mov = np.asarray(moving.GetOrigin(), dtype=np.float64)
    upper = np.asarray(moving.GetSize(), dtype=np.float64) - 0.5
    nx, ny, nz = reference.GetSize()
    out = np.zeros((nz, ny, nx), dtype=bool)
    jj, ii = np.meshgrid(np.arange(ny, dtype=np.float64), np.arange(nx, dtype=np.float64), indexing="ij")
    for z0 in range(0, nz, _SLAB):
        z1 = min(z0 + _SLAB, nz)
        kk = np.broadcast_to(np.arange(z0, z1, dtype=np.float64)[:, None, None], (z1 - z0, ny, nx))
        index = np.stack([np.broadcast_to(ii, kk.shape), np.broadcast_to(jj, kk.shape), kk], axis=-1)
        points = origin_ref + index @ m_ref.T + np.asarray(u[z0:z1], dtype=np.float64)
        cont = (points - origin_mov) @ to_moving.T
        out[z0:z1] = np.all((cont >= -0.5) & (cont <= upper), axis=-1)
    return out


def evaluation_mask(reference: sitk.Image, moving: Optional[sitk.Image] = None, truth: Optional[Field] = None,
                    *, fov: Optional[np.ndarray] = None, name: str = "") -> np.ndarray:
    """THE evaluation mask ("inside the object"; rule 1 of the module docstring), bool (z, y, x).

    Args:
        reference: the reference volume (its foreground defines the object).
        moving: the moving volume on its own grid; with ``truth``, restricts the mask to what it shows.
        truth: the true pull-back field on the reference grid (LPS mm).
        fov: :func:`moving_fov_mask` when already computed (then ``moving`` and ``truth`` are not needed).
        name: case name for the error message.

    Raises:
        InputImageError: the mask is empty (no foreground, or the moving scan shows none of it).
    """
    mask = sitk.GetArrayFromImage(foreground_mask(reference)) > 0
    if fov is None and moving is not None and truth is not None:
        fov = moving_fov_mask(truth, moving, reference)
    if fov is not None:
        mask &= fov
    if not mask.any():
        raise InputImageError(f"{'case ' + name + ': ' if name else ''}the evaluation mask is empty (no reference "
                              "foreground that the moving volume shows); check that the true field and both volumes "
                              "share one physical space")
    return mask


# --------------------------------------------------------------------------------------------------------
# alignment metrics


@dataclass(frozen=True)
class EndpointErrorStats:
    """Endpoint error ``‖U − U_true‖₂`` (mm) over the evaluated voxels.

    Attributes:
        mean_mm, median_mm, p95_mm, max_mm: statistics over the voxels; voxels: how many were evaluated.
    """

    mean_mm: float
    median_mm: float
    p95_mm: float
    max_mm: float
    voxels: int

    def to_dict(self) -> Dict[str, float]:
        return asdict(self)


def endpoint_error(displacement: Field, truth: Field, mask: Optional[np.ndarray] = None,
                   grid: Optional[sitk.Image] = None) -> EndpointErrorStats:
    """Endpoint error ``EPE(x) = ‖U(x) − U_true(x)‖₂`` in mm over ``mask`` (rule 2).

    Args:
        displacement: the method's pull-back field (LPS mm), an image, or a (z, y, x, 3) array on ``grid``.
        truth: the true field on the same grid (image or array).
        mask: bool (z, y, x) voxels to evaluate (normally :func:`evaluation_mask`); None = every voxel.
        grid: the reference grid; needed only when both fields are arrays (default: the image given).

    Returns:
        :class:`EndpointErrorStats` (mean, median, 95th percentile, max, voxel count).
    """
    if grid is None:
        grid = truth if isinstance(truth, sitk.Image) else displacement
        if not isinstance(grid, sitk.Image):
            raise ValueError("endpoint_error needs grid= when both fields are arrays")
    u = _field_array(displacement, grid, "displacement field")
    t = _field_array(truth, grid, "true displacement field")
    shape = u.shape[:3]
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != shape:
            raise ValueError(f"the evaluation mask has shape {mask.shape}; the fields have {shape}")
        if not mask.any():
            raise InputImageError("the evaluation mask selects no voxel; pass a mask with at least one voxel")
    values = []
    for z0 in range(0, shape[0], _SLAB):
        diff = np.asarray(u[z0:z0 + _SLAB], dtype=np.float64) - np.asarray(t[z0:z0 + _SLAB], dtype=np.float64)
        norm = np.sqrt(np.einsum("...c,...c->...", diff, diff))
        values.append(norm[mask[z0:z0 + _SLAB]] if mask is not None else norm.ravel())
    epe = np.concatenate(values)
    return EndpointErrorStats(mean_mm=float(epe.mean()), median_mm=float(np.median(epe)),
                              p95_mm=float(np.percentile(epe, 95)), max_mm=float(epe.max()), voxels=int(epe.size))


def warp_labels(moving_labels: sitk.Image, displacement: Field, reference: sitk.Image) -> np.ndarray:
    """Moving-pose labels resampled (nearest neighbour, 0 outside) through ``x -> x + U(x)`` onto the reference
    grid; uint8 (z, y, x)."""
    warped = sitk.Resample(moving_labels, reference, _field_transform(displacement, reference),
                           sitk.sitkNearestNeighbor, 0.0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(warped)


def label_dice(moving_labels: sitk.Image, reference_labels: sitk.Image, displacement: Field,
               region: Optional[np.ndarray] = None) -> Dict[str, Any]:
    """Dice of the moving-pose labels warped by the method against the reference labels (rule 3).

    Args:
        moving_labels: integer labels on the moving grid (moving pose).
        reference_labels: integer labels on the reference grid (reference pose).
        displacement: the method's pull-back field on the reference grid (LPS mm).
        region: bool (z, y, x) voxels counted (normally :attr:`EvaluationCase.dice_region`); None = all.

    Returns:
        ``{"mean": mean Dice over the labels, "per_label": {label: Dice}}``; labels are the non-zero values of
        the reference labels inside ``region``.
    """
    warped = warp_labels(moving_labels, displacement, reference_labels)
    truth = sitk.GetArrayViewFromImage(reference_labels)
    if region is not None:
        warped, truth = warped[region], np.asarray(truth)[region]
    labels = [int(v) for v in np.unique(truth) if v != 0]
    if not labels:
        raise InputImageError("the reference labels hold no non-zero label inside the evaluated region; check "
                              "reference_labels (0 = background)")
    values = metrics.dice(np.asarray(warped, dtype=np.int64), np.asarray(truth, dtype=np.int64), labels)
    mean = values.pop("mean")
    return {"mean": float(mean), "per_label": {int(k): float(v) for k, v in values.items()}}


def folding_percent(displacement: Field, reference: Optional[sitk.Image] = None,
                    jacobian: Optional[sitk.Image] = None) -> float:
    """% of the field's grid voxels where ``det ∂(x + U(x))/∂x ≤ 0`` (rule 4).

    Args:
        displacement: pull-back field (LPS mm), an image or a (z, y, x, 3) array on ``reference``.
        reference: the grid of an array field.
        jacobian: the determinant image already computed by
            :func:`unifuse.error_maps.jacobian_determinant_image` (the pipeline's ``result.jacobian``).
    """
    if jacobian is None:
        grid = displacement if isinstance(displacement, sitk.Image) else reference
        if grid is None:
            raise ValueError("folding_percent needs reference= for an array field")
        jacobian = error_maps.jacobian_determinant_image(_field_image(displacement, grid, "displacement field"))
    return metrics.folding_percent(sitk.GetArrayViewFromImage(jacobian))


def reduction_percent(before: float, after: float) -> float:
    """``100 (1 − after / before)``: how much of the error before (e.g. header-only EPE) a method removed
    (negative when it made things worse; ``nan`` when ``before`` is 0 or not finite)."""
    if not (math.isfinite(before) and math.isfinite(after)) or before <= 0:
        return math.nan
    return 100.0 * (1.0 - after / before)


# --------------------------------------------------------------------------------------------------------
# one case with its truth, prepared once


class EvaluationCase:
    """A (reference, moving) pair with whatever truth is known, and what every evaluation of it shares.

    Attributes (None where unknown):
        reference: reference volume (fixed space), LPS, its own units.
        moving: moving volume on its own grid, its own units.
        truth_displacement: exact pull-back field on the reference grid (LPS mm).
        truth_aligned: clean moving modality aligned with the reference, on the reference grid (label L).
        reference_labels: integer labels of the reference pose on the reference grid.
        moving_labels: integer labels of the moving pose on the moving grid; derived from the reference labels
            and the true field (:func:`unifuse.bench.cases.moving_pose_labels`) when not given.
        name: for messages.

    Derived values (computed once, on first use): :attr:`mask`, :attr:`dice_region`, :attr:`reference_u`,
    :attr:`label_u`, :attr:`moving_norm`, :attr:`truth_warped_u`.
    """

    def __init__(self, reference: sitk.Image, moving: sitk.Image, truth_displacement: Optional[sitk.Image] = None,
                 truth_aligned: Optional[sitk.Image] = None, reference_labels: Optional[sitk.Image] = None,
                 moving_labels: Optional[sitk.Image] = None, name: str = "",
                 reference_norm: Optional[IntensityNormalization] = None,
                 moving_norm: Optional[IntensityNormalization] = None,
                 label_norm: Optional[IntensityNormalization] = None) -> None:
        self.reference, self.moving, self.name = reference, moving, name
        self.truth_displacement = (None if truth_displacement is None
                                   else _field_image(truth_displacement, reference, "true displacement field"))
        self.truth_aligned = truth_aligned
        self.reference_labels = reference_labels
        self._moving_labels = moving_labels
        self._norms = {"reference": reference_norm, "moving": moving_norm, "label": label_norm}

    @classmethod
    def from_working_grid(cls, reference: Any, moving: Any, spacing_mm: float, truth_voxels: Any = None,
                          reference_labels: Any = None, moving_labels: Any = None,
                          truth_aligned: Any = None) -> "EvaluationCase":
        """A case whose volumes are already normalised to [0, 1] on one isotropic grid (the training data).

        Args:
            reference, moving: (z, y, x) arrays or tensors in [0, 1] on the same grid.
            spacing_mm: isotropic grid spacing (mm).
            truth_voxels: the true pull-back field (3, z, y, x) in voxels, channels (x, y, z).
            reference_labels, moving_labels: integer (z, y, x) labels of the reference and moving pose; without
                reference labels they are the moving labels resampled (nearest) through the true field.
            truth_aligned: the clean moving volume aligned with the reference, in [0, 1].
        """
        def array(x: Any) -> Optional[np.ndarray]:
            if x is None:
                return None
            if hasattr(x, "detach"):
                x = x.detach().cpu().numpy()
            return np.asarray(x)

        ref = array(reference).astype(np.float32)
        grid = sitk.GetImageFromArray(ref)
        grid.SetSpacing((float(spacing_mm),) * 3)

        def on_grid(x: Optional[np.ndarray], pixel: int) -> Optional[sitk.Image]:
            if x is None:
                return None
            image = sitk.Cast(sitk.GetImageFromArray(x.astype(np.float32 if pixel == sitk.sitkFloat32 else np.int32)),
                              pixel)
            image.CopyInformation(grid)
            return image

        unit = IntensityNormalization("window", 0.0, 1.0, "normalised")
        truth = array(truth_voxels)
        truth_image = None if truth is None else displacement_from_voxels(truth, grid)
        moving_lab = on_grid(array(moving_labels), sitk.sitkUInt8)
        reference_lab = on_grid(array(reference_labels), sitk.sitkUInt8)
        if reference_lab is None and moving_lab is not None and truth_image is not None:
            reference_lab = on_grid(warp_labels(moving_lab, truth_image, grid), sitk.sitkUInt8)
        return cls(reference=grid, moving=on_grid(array(moving), sitk.sitkFloat32), truth_displacement=truth_image,
                   truth_aligned=on_grid(array(truth_aligned), sitk.sitkFloat32), reference_labels=reference_lab,
                   moving_labels=moving_lab, reference_norm=unit, moving_norm=unit, label_norm=unit)

    # normalisations (rule 5)
    def _norm(self, role: str, image: sitk.Image) -> IntensityNormalization:
        if self._norms[role] is None:
            self._norms[role] = normalize_image(image)[1]
        return self._norms[role]

    @property
    def reference_norm(self) -> IntensityNormalization:
        return self._norm("reference", self.reference)

    @property
    def moving_norm(self) -> IntensityNormalization:
        """The [0, 1] rule of the moving INPUT, applied to every aligned moving volume."""
        return self._norm("moving", self.moving)

    @cached_property
    def reference_u(self) -> np.ndarray:
        """Reference in [0, 1], float32 (z, y, x)."""
        return self.reference_norm.apply(sitk.GetArrayViewFromImage(self.reference))

    @cached_property
    def label_u(self) -> Optional[np.ndarray]:
        """Clean aligned label L in [0, 1] by its own rule (None without it)."""
        if self.truth_aligned is None:
            return None
        return self._norm("label", self.truth_aligned).apply(sitk.GetArrayViewFromImage(self.truth_aligned))

    def moving_u(self, aligned: Union[sitk.Image, np.ndarray]) -> np.ndarray:
        """An aligned moving volume (moving's units, reference grid) in [0, 1] by the moving input's rule."""
        arr = sitk.GetArrayViewFromImage(aligned) if isinstance(aligned, sitk.Image) else aligned
        return self.moving_norm.apply(arr)

    # masks (rules 1 and 3)
    @cached_property
    def fov(self) -> Optional[np.ndarray]:
        """Reference voxels the true field maps into the moving field of view (None without a true field)."""
        if self.truth_displacement is None:
            return None
        return moving_fov_mask(self.truth_displacement, self.moving, self.reference)

    @cached_property
    def mask(self) -> np.ndarray:
        """:func:`evaluation_mask` of this case."""
        return evaluation_mask(self.reference, fov=self.fov, name=self.name)

    @property
    def dice_region(self) -> Optional[np.ndarray]:
        """Voxels counted by the Dice (rule 3): where the true field maps into the moving field of view."""
        return self.fov

    @cached_property
    def mind_mask(self) -> sitk.Image:
        return foreground_mask(self.reference, dilate_mm=MIND_MASK_DILATE_MM)

    @property
    def moving_labels(self) -> Optional[sitk.Image]:
        if self._moving_labels is None and self.reference_labels is not None and self.truth_displacement is not None:
            self._moving_labels = moving_pose_labels(sitk.Cast(self.reference_labels, sitk.sitkUInt8),
                                                     self.truth_displacement, self.moving)
        return self._moving_labels

    @cached_property
    def truth_warped_u(self) -> Optional[np.ndarray]:
        """The moving volume resampled through the true field, in [0, 1] (target of rule 6)."""
        if self.truth_displacement is None:
            return None
        return self.moving_u(warp_moving(self, self.truth_displacement))


def as_evaluation_case(case: Any) -> EvaluationCase:
    """An :class:`EvaluationCase` from a bench case (:class:`unifuse.bench.cases.BenchCase`), a demo case
    (:class:`unifuse.data.synthetic.DemoCase`: ``displacement_gt``, ``moving_clean``, ``labels``) or an
    :class:`EvaluationCase` (returned as is)."""
    if isinstance(case, EvaluationCase):
        return case
    if hasattr(case, "displacement_gt"):  # DemoCase
        labels = getattr(case, "labels", None)
        return EvaluationCase(case.reference, case.moving, truth_displacement=case.displacement_gt,
                              truth_aligned=getattr(case, "moving_clean", None),
                              reference_labels=None if labels is None else sitk.Cast(labels, sitk.sitkUInt8),
                              name=str(getattr(case, "task", "")))
    return EvaluationCase(case.reference, case.moving, truth_displacement=getattr(case, "truth_displacement", None),
                          truth_aligned=getattr(case, "truth_aligned", None),
                          reference_labels=getattr(case, "reference_labels", None),
                          moving_labels=getattr(case, "moving_labels", None), name=str(getattr(case, "name", "")))


# --------------------------------------------------------------------------------------------------------
# the two entry points


def evaluate_alignment(case: Any, aligned: Optional[sitk.Image], displacement: Field, *,
                       jacobian: Optional[sitk.Image] = None, mind: bool = False) -> Dict[str, Any]:
    """Every alignment figure of one method on one case (rules 1–4, 6, 8).

    Args:
        case: an :class:`EvaluationCase` (or anything :func:`as_evaluation_case` takes; build it once per case
            when several methods are evaluated, the masks and normalisations are cached on it).
        aligned: the method's aligned moving volume on the reference grid, moving's units; None = resample
            the moving volume through ``displacement`` here (:func:`warp_moving`).
        displacement: the method's pull-back field on the reference grid (LPS mm).
        jacobian: its Jacobian determinant image when already computed (the pipeline's ``result.jacobian``).
        mind: also compute ``mind`` (rule 8; costs a MIND descriptor per call).

    Returns:
        keys present only where the truth allows them: ``epe_mm`` (mean), ``epe_median_mm``, ``epe_p95_mm``,
        ``epe_max_mm`` (true field), ``dice`` (mean) and ``dice_per_label`` (labels), ``mse``, ``cc``, ``ssim``
        (true field), always ``folding_percent``, and ``mind`` when asked.
    """
    case = as_evaluation_case(case)
    out: Dict[str, Any] = {}
    if case.truth_displacement is not None:
        epe = endpoint_error(displacement, case.truth_displacement, case.mask, grid=case.reference)
        out.update({"epe_mm": epe.mean_mm, "epe_median_mm": epe.median_mm, "epe_p95_mm": epe.p95_mm,
                    "epe_max_mm": epe.max_mm})
    if case.reference_labels is not None and case.moving_labels is not None:
        d = label_dice(case.moving_labels, case.reference_labels, displacement, case.dice_region)
        out["dice"], out["dice_per_label"] = d["mean"], d["per_label"]
    out["folding_percent"] = folding_percent(displacement, case.reference, jacobian)
    if aligned is None and (case.truth_displacement is not None or mind):
        aligned = warp_moving(case, displacement)
    if case.truth_displacement is not None:
        out.update(metrics.alignment_metrics(case.moving_u(aligned), case.truth_warped_u))
    if mind:
        keep = sitk.GetArrayViewFromImage(case.mind_mask) > 0
        dis = sitk.GetArrayViewFromImage(error_maps.local_dissimilarity(case.reference, aligned, mask=case.mind_mask))
        out["mind"] = float(dis[keep].mean()) if keep.any() else math.nan
    return out


def fused_to_unit(case: Any, fused: Union[sitk.Image, np.ndarray], reference_units: bool) -> np.ndarray:
    """A fused volume on the reference grid in [0, 1] (rule 5): one in reference units (``map_back``) is mapped
    with the reference's rule; one already in [0, 1] is returned as float32."""
    case = as_evaluation_case(case)
    arr = sitk.GetArrayViewFromImage(fused) if isinstance(fused, sitk.Image) else np.asarray(fused)
    return case.reference_norm.apply(arr) if reference_units else np.asarray(arr, dtype=np.float32)


def evaluate_fusion(case: Any, fused_u: np.ndarray, sources: Optional[Iterable[np.ndarray]] = None) -> Dict[str, float]:
    """Fusion metrics (rule 7; :func:`unifuse.metrics.fusion_metrics`) of a fused volume in [0, 1] against the
    ideal aligned sources: the reference R and the clean aligned label L of ``case``.

    Args:
        case: the case (needs ``truth_aligned``).
        fused_u: fused volume in [0, 1] on the reference grid (:func:`fused_to_unit`).
        sources: (R, L) in [0, 1] to use instead of the case's (e.g. the training data's own arrays).

    Raises:
        InputImageError: the case has no clean aligned label.
    """
    if sources is None:
        case = as_evaluation_case(case)
        if case.label_u is None:
            raise InputImageError(f"case {case.name or '(unnamed)'} has no clean aligned label "
                                  "(truth_moving_aligned_clean), so fusion metrics cannot be computed")
        a, b = case.reference_u, case.label_u
    else:
        a, b = sources
    return metrics.fusion_metrics(a, b, fused_u)


def mean_gradient(volume_u: np.ndarray, mask: np.ndarray, spacing_mm: Sequence[float]) -> float:
    """Mean gradient magnitude (intensity per mm) of a (z, y, x) volume inside ``mask``; ``spacing_mm`` (x, y, z)."""
    grads = np.gradient(np.asarray(volume_u, dtype=np.float32), *[float(s) for s in reversed(tuple(spacing_mm))])
    return float(np.sqrt(sum(g * g for g in grads))[mask].mean())


def evaluate_output_sharpness(case: Any, volume_u: np.ndarray, sources: Iterable[np.ndarray]) -> Dict[str, float]:
    """``gradient_ratio``: mean gradient magnitude of ``volume_u`` inside the evaluation mask over the sharper
    of ``sources``' (issue 12: fused and restored volumes must keep ≥ 0.9 of the sharper source's detail);
    ``ssim_truth``: SSIM of ``volume_u`` against the clean aligned label (noise must not count as detail).
    All volumes in [0, 1] on the reference grid."""
    case = as_evaluation_case(case)
    spacing = case.reference.GetSpacing()
    sharpest = max(mean_gradient(s, case.mask, spacing) for s in sources)
    out = {"gradient_ratio": mean_gradient(volume_u, case.mask, spacing) / max(sharpest, 1e-12)}
    if case.label_u is not None:
        out["ssim_truth"] = metrics.ssim3d(volume_u, case.label_u)
    return out


def evaluate_restoration(case: Any, restored_u: np.ndarray, aligned_u: np.ndarray) -> Dict[str, float]:
    """PSNR (dB) and SSIM of the restored and of the (unrestored) aligned moving volume against the clean
    aligned label, inside the evaluation mask for PSNR; all in [0, 1] on the reference grid.

    Raises:
        InputImageError: the case has no clean aligned label.
    """
    case = as_evaluation_case(case)
    if case.label_u is None:
        raise InputImageError(f"case {case.name or '(unnamed)'} has no clean aligned label, so restoration "
                              "cannot be evaluated")
    m = case.mask

    def psnr(x: np.ndarray) -> float:
        return float(10.0 * np.log10(1.0 / max(float(np.mean((x[m] - case.label_u[m]) ** 2)), 1e-12)))

    return {"psnr_aligned": psnr(aligned_u), "psnr_restored": psnr(restored_u),
            "ssim_aligned": metrics.ssim3d(aligned_u, case.label_u), "ssim_restored": metrics.ssim3d(restored_u, case.label_u)}
