"""Tissue anatomy for synthetic data: the MNI ICBM152 2009 template shipped with nilearn, random smooth
deformations of it, and SynthMorph-style random label-map subjects.

Source data (inside the ``nilearn`` wheel, nothing is downloaded): the ICBM152 2009a *symmetric* non-linear
template at 1 mm (197 × 233 × 189 voxels, RAS-aligned axes) — the skull-stripped T1 image, the GM and WM
probability maps and the brain mask. Because that T1 image is skull-stripped there is no head in it, so the
tissues outside the brain are built geometrically from the brain mask's distance map (1 mm grid):

* **csf** = clip(brain mask − GM − WM, 0, 1) inside the mask (ventricles, sulci) plus a 2.5 mm subarachnoid
  layer outside it;
* **bone** (skull) = the shell 2.5–8.5 mm outside the brain mask;
* **scalp** (skin, fat, muscle) = the shell 8.5–13.5 mm outside it;
* **background** (air) = 1 − the sum of the others.

Shell edges are soft (logistic ramps of 0.7 mm) so they carry partial volume after resampling. The maps are
resampled (SimpleITK, linear, after a Gaussian anti-aliasing filter with sigma = 0.4 × the new spacing) onto
an isotropic S³ grid that covers the template's field of view (:func:`unifuse.geometry.working_grid`:
spacing = 233 mm / S, the template's direction cosines, same centre) and renormalised to sum to 1 per voxel.

Held-out anatomy: the template is symmetric, so a left-right flip gives the same brain and is *not* used.
Distinct subjects come from :func:`deform_anatomy` (random smooth diffeomorphism + anisotropic scaling) and
from :func:`random_subject` (random label maps), each drawn from a random stream keyed by (seed, split,
index) — see :mod:`unifuse.data.synthetic` and ``docs/data.md``.

Arrays are float32 numpy (z, y, x); images are SimpleITK in LPS millimetres.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage, special

from .. import geometry
from ..errors import InputImageError
from .deformations import random_smooth_displacement, smooth_noise, warp_array

__all__ = [
    "TISSUES",
    "LABELS",
    "Tissues",
    "template_grid",
    "load_mni_tissues",
    "as_image",
    "deform_anatomy",
    "random_label_map",
    "random_subject",
]

#: Tissue classes in stacking order; the index is the class's label value in :meth:`Tissues.labels`.
TISSUES: Tuple[str, ...] = ("background", "csf", "gm", "wm", "bone", "scalp")
#: Label value of each tissue class.
LABELS: Dict[str, int] = {name: i for i, name in enumerate(TISSUES)}

#: Shell geometry outside the brain mask (mm): subarachnoid CSF, skull bone, scalp (outer edges).
CSF_OUTER_MM: float = 2.5
BONE_OUTER_MM: float = 8.5
SCALP_OUTER_MM: float = 13.5
_EDGE_MM = 0.7  # logistic edge width of the shells


@dataclass(frozen=True, eq=False)
class Tissues:
    """Tissue probability maps on one S³ grid (partial-volume fractions summing to 1 per voxel).

    Attributes:
        background, csf, gm, wm, bone, scalp: float32 (z, y, x) maps in [0, 1].
        grid: SimpleITK image (zero pixels) carrying the grid geometry (LPS mm, size, spacing, direction).
        parcels: optional int32 (z, y, x) finer label map the tissues were built from (random label-map
            subjects); used by :func:`unifuse.data.modalities.random_contrast`. None for the template.
    """

    background: np.ndarray
    csf: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    bone: np.ndarray
    scalp: np.ndarray
    grid: sitk.Image
    parcels: Optional[np.ndarray] = None

    @property
    def shape(self) -> Tuple[int, int, int]:
        """(D, H, W) of the grid."""
        return tuple(self.gm.shape)  # type: ignore[return-value]

    @property
    def spacing_mm(self) -> float:
        """Isotropic voxel spacing (mm)."""
        return float(self.grid.GetSpacing()[0])

    @property
    def brain(self) -> np.ndarray:
        """Intracranial (CSF + GM + WM) fraction (z, y, x)."""
        return self.csf + self.gm + self.wm

    def stack(self) -> np.ndarray:
        """float32 (6, D, H, W) maps in :data:`TISSUES` order."""
        return np.stack([getattr(self, name) for name in TISSUES]).astype(np.float32)

    def labels(self) -> np.ndarray:
        """uint8 (z, y, x) hard tissue labels (argmax of the maps; values = :data:`LABELS`)."""
        return np.argmax(self.stack(), axis=0).astype(np.uint8)

    def as_image(self, array: np.ndarray) -> sitk.Image:
        """A (z, y, x) array on this grid as a SimpleITK image with the grid's LPS geometry."""
        return _array_on_grid(array, self.grid)

    @classmethod
    def from_stack(cls, stack: np.ndarray, grid: sitk.Image, parcels: Optional[np.ndarray] = None) -> "Tissues":
        """Build from (6, D, H, W) maps in :data:`TISSUES` order; clipped to >= 0 and renormalised to sum 1."""
        s = np.clip(np.asarray(stack, dtype=np.float32), 0.0, None)
        if s.ndim != 4 or s.shape[0] != len(TISSUES):
            raise ValueError(f"tissue stack must be ({len(TISSUES)}, D, H, W); got {s.shape}")
        total = s.sum(axis=0, keepdims=True)
        s[0] += np.where(total[0] <= 1e-6, 1.0, 0.0)  # empty voxels are air
        s /= np.maximum(s.sum(axis=0, keepdims=True), 1e-6)
        return cls(*[np.ascontiguousarray(s[i]) for i in range(len(TISSUES))], grid=grid, parcels=parcels)


def _array_on_grid(array: np.ndarray, grid: sitk.Image) -> sitk.Image:
    a = np.asarray(array)
    expected = tuple(reversed(grid.GetSize()))
    if a.shape != expected:
        raise InputImageError(f"array of shape {a.shape} does not fit the grid (z, y, x) = {expected}")
    if a.dtype == np.float64:
        a = a.astype(np.float32)
    image = sitk.GetImageFromArray(np.ascontiguousarray(a))
    image.CopyInformation(grid)
    return image


# --------------------------------------------------------------------------------------------------------
# template at 1 mm


def _nifti_to_sitk(nifti) -> sitk.Image:
    """nibabel image (x, y, z) with a RAS affine -> SimpleITK image (LPS), float32."""
    data = np.asanyarray(nifti.dataobj).astype(np.float32)
    affine = np.asarray(nifti.affine, dtype=np.float64)
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    linear = ras_to_lps @ affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    image.SetSpacing(spacing.tolist())
    image.SetDirection((linear / spacing).ravel().tolist())
    image.SetOrigin((ras_to_lps @ affine[:3, 3]).tolist())
    return image


def _ramp(distance: np.ndarray, edge: float) -> np.ndarray:
    """Soft step from 0 to 1 where ``distance`` (mm) crosses ``edge`` (logistic, width :data:`_EDGE_MM`)."""
    return special.expit((np.asarray(distance, dtype=np.float32) - np.float32(edge)) / np.float32(_EDGE_MM))


def _band(distance: np.ndarray, inner: float, outer: float) -> np.ndarray:
    """Soft indicator of ``inner < distance <= outer`` (mm), logistic edges of width :data:`_EDGE_MM`."""
    return (_ramp(distance, inner) - _ramp(distance, outer)).astype(np.float32)


@functools.lru_cache(maxsize=1)
def _template_1mm() -> Tuple[sitk.Image, Dict[str, sitk.Image]]:
    """The template grid and the six tissue maps at 1 mm (SimpleITK, LPS). Cached (a few seconds, once)."""
    try:
        from nilearn import datasets  # lazy: ~1.5 s to import, for the (cached) template only
    except ImportError as exc:  # pragma: no cover - nilearn is a dependency
        raise InputImageError("the MNI template needs the 'nilearn' package: pip install nilearn") from exc
    t1 = _nifti_to_sitk(datasets.load_mni152_template(resolution=1))
    gm = sitk.GetArrayFromImage(_nifti_to_sitk(datasets.load_mni152_gm_template(resolution=1)))
    wm = sitk.GetArrayFromImage(_nifti_to_sitk(datasets.load_mni152_wm_template(resolution=1)))
    mask_img = _nifti_to_sitk(datasets.load_mni152_brain_mask(resolution=1))
    mask = sitk.GetArrayFromImage(mask_img) > 0.5

    gm, wm = np.clip(gm, 0, 1), np.clip(wm, 0, 1)
    gm, wm = gm * mask, wm * mask  # the few GM/WM voxels outside the mask (<1 %) would float in the skull
    inner_csf = np.clip(mask.astype(np.float32) - gm - wm, 0, 1)
    mask_u8 = sitk.Cast(mask_img > 0.5, sitk.sitkUInt8)
    distance = sitk.GetArrayFromImage(
        sitk.SignedMaurerDistanceMap(mask_u8, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    )
    outside = np.clip(distance, 0.0, None)
    steps = [_ramp(outside, edge) for edge in (0.0, CSF_OUTER_MM, BONE_OUTER_MM, SCALP_OUTER_MM)]
    not_brain = (~mask).astype(np.float32)
    maps = {
        "csf": inner_csf + (steps[0] - steps[1]) * not_brain,
        "gm": gm,
        "wm": wm,
        "bone": (steps[1] - steps[2]) * not_brain,
        "scalp": (steps[2] - steps[3]) * not_brain,
    }
    total = sum(maps.values())
    maps["background"] = np.clip(1.0 - total, 0.0, 1.0)
    images = {}
    for name, arr in maps.items():
        img = sitk.GetImageFromArray(np.ascontiguousarray(arr, dtype=np.float32))
        img.CopyInformation(t1)
        images[name] = img
    return t1, images


def template_grid(size: int) -> sitk.Image:
    """The isotropic ``size``³ grid covering the template's field of view (zero float32 image, LPS).

    Spacing = 233 mm / size (the template's largest extent), centred on the template's centre, with the
    template's direction cosines: array axes x, y, z point to the subject's right, anterior and superior
    (LPS direction matrix diag(-1, -1, 1)), so ``array[k]`` is an axial slice. See
    :func:`unifuse.geometry.working_grid`.
    """
    if int(size) < 8:
        raise ValueError(f"the anatomy grid needs at least 8 voxels per edge; got {size}")
    t1, _ = _template_1mm()
    return geometry.working_grid(t1, int(size))


def _bin2(image: sitk.Image) -> sitk.Image:
    """2×2×2 block average (area-exact downsampling) keeping the physical geometry of the blocks."""
    a = sitk.GetArrayFromImage(image)
    d, h, w = (n - n % 2 for n in a.shape)
    a = a[:d, :h, :w].reshape(d // 2, 2, h // 2, 2, w // 2, 2).mean(axis=(1, 3, 5), dtype=np.float32)
    out = sitk.GetImageFromArray(np.ascontiguousarray(a))
    out.SetSpacing([2.0 * s for s in image.GetSpacing()])
    out.SetDirection(image.GetDirection())
    out.SetOrigin(image.TransformContinuousIndexToPhysicalPoint((0.5, 0.5, 0.5)))
    return out


@functools.lru_cache(maxsize=1)
def _template_2mm() -> Dict[str, sitk.Image]:
    """The 1 mm tissue maps block-averaged to 2 mm (speeds up resampling onto coarse grids)."""
    return {name: _bin2(img) for name, img in _template_1mm()[1].items()}


@functools.lru_cache(maxsize=8)
def _tissues_cached(size: int) -> Tissues:
    t1, images = _template_1mm()
    grid = geometry.working_grid(t1, size)
    new_spacing = float(grid.GetSpacing()[0])
    if new_spacing >= 2.0 * float(max(t1.GetSpacing())):
        images = _template_2mm()
    stack = []
    for name in TISSUES:
        img = images[name]
        if new_spacing > float(min(img.GetSpacing())):
            img = sitk.SmoothingRecursiveGaussian(img, 0.4 * new_spacing)
        res = sitk.Resample(img, grid, sitk.Transform(3, sitk.sitkIdentity), sitk.sitkLinear,
                            1.0 if name == "background" else 0.0, sitk.sitkFloat32)
        stack.append(sitk.GetArrayFromImage(res))
    tissues = Tissues.from_stack(np.stack(stack), grid)
    for name in TISSUES:
        getattr(tissues, name).setflags(write=False)  # shared by every caller: keep it immutable
    return tissues


def load_mni_tissues(size: int) -> Tissues:
    """Tissue maps of the MNI ICBM152 2009 template on the isotropic ``size``³ grid (cached per size).

    Args:
        size: voxels per edge S (>= 8); spacing is 233 mm / S (about 3.6 mm at 64, 1.8 mm at 128).

    Returns:
        :class:`Tissues` with read-only float32 (S, S, S) maps; copy before modifying.
    """
    size = int(size)
    if size < 8:
        raise ValueError(f"the anatomy grid needs at least 8 voxels per edge; got {size}")
    return _tissues_cached(size)


def as_image(array: np.ndarray) -> sitk.Image:
    """A cubic (S, S, S) array on the template grid of that size, as a SimpleITK image (LPS geometry)."""
    a = np.asarray(array)
    if a.ndim != 3 or len(set(a.shape)) != 1:
        raise InputImageError(f"as_image expects a cubic (S, S, S) array on the template grid; got {a.shape}")
    return _array_on_grid(a, template_grid(a.shape[0]))


# --------------------------------------------------------------------------------------------------------
# subject variability


def deform_anatomy(
    tissues: Tissues,
    rng: np.random.Generator,
    max_displacement_mm: float = 8.0,
    max_scale: float = 0.08,
    control_points: int = 6,
) -> Tissues:
    """A new subject: the tissue maps warped by a random smooth diffeomorphism.

    The pull-back map is ``p -> c + (1 + s) ⊙ (p - c) + n(p)``: an anisotropic scaling about the grid centre
    c (each factor ``1 + s_a`` with ``s_a`` uniform in ``[-max_scale, max_scale]``: head size and shape) plus a
    smooth random displacement n whose largest length is uniform in ``[0.5, 1] × max_displacement_mm`` mm
    (:func:`~unifuse.data.deformations.random_smooth_displacement`, non-folding). Maps are warped
    trilinearly (outside the grid: air) and renormalised; ``parcels`` (if any) are warped nearest-neighbour.

    Args:
        tissues: the subject to deform (not modified).
        rng: numpy random generator.
        max_displacement_mm: bound of the smooth displacement (mm).
        max_scale: bound of the relative scaling per axis.
        control_points: lattice points per edge of the smooth displacement.

    Returns:
        :class:`Tissues` on the same grid.
    """
    shape = tissues.shape
    scale = 1.0 + rng.uniform(-max_scale, max_scale, size=3)  # (x, y, z)
    amplitude = float(rng.uniform(0.5, 1.0)) * float(max_displacement_mm)
    n = random_smooth_displacement(shape, rng, amplitude, tissues.spacing_mm, control_points)
    d, h, w = shape
    centre = np.array([(w - 1) / 2.0, (h - 1) / 2.0, (d - 1) / 2.0]).reshape(3, 1, 1, 1)
    zz, yy, xx = np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij")
    p = np.stack((xx, yy, zz)).astype(np.float64)
    field = ((scale.reshape(3, 1, 1, 1) - 1.0) * (p - centre) + n).astype(np.float32)
    stack = tissues.stack()
    warped = warp_array(stack[1:], field, background=0.0)
    warped = np.concatenate([np.clip(1.0 - warped.sum(axis=0, keepdims=True), 0, 1), warped])
    parcels = None
    if tissues.parcels is not None:
        parcels = warp_array(tissues.parcels.astype(np.float32), field, mode="nearest").astype(np.int32)
    return Tissues.from_stack(warped, tissues.grid, parcels)


def random_label_map(
    rng: np.random.Generator,
    size: int,
    num_labels: Optional[int] = None,
    control_points: Optional[int] = None,
    warp_voxels: float = 0.0,
) -> np.ndarray:
    """A SynthMorph-style random label map: argmax over K smooth random noise fields.

    K independent :func:`~unifuse.data.deformations.smooth_noise` fields (lattice of ``control_points``³,
    drawn in [S/8, S/4] if None, i.e. regions of 4–8 voxels) are compared voxel by voxel; the label is the
    index of the largest. The result is a partition of the cube into K blob-shaped regions with smooth
    boundaries; ``warp_voxels > 0`` additionally deforms it with a finer smooth displacement
    (nearest-neighbour), as in SynthMorph.

    Args:
        rng: numpy random generator.
        size: S, voxels per edge.
        num_labels: K (>= 2); drawn in [8, 16] if None.
        control_points: lattice size of the noise fields.
        warp_voxels: bound of the extra deformation (voxels).

    Returns:
        int32 (S, S, S) labels in [0, K).
    """
    size = int(size)
    k = int(rng.integers(8, 17)) if num_labels is None else int(num_labels)
    if k < 2:
        raise ValueError(f"a label map needs at least 2 labels; got {k}")
    c = int(rng.integers(max(3, size // 8), max(4, size // 4) + 1)) if control_points is None else int(control_points)
    fields = smooth_noise((size, size, size), rng, control_points=c, channels=k, smoothing=0.35)
    labels = np.argmax(fields, axis=0).astype(np.int32)
    if warp_voxels > 0:
        n = random_smooth_displacement(labels.shape, rng, warp_voxels, 1.0, control_points=2 * c)
        labels = warp_array(labels.astype(np.float32), n, mode="nearest", background=0.0).astype(np.int32)
    return labels


def random_subject(
    rng: np.random.Generator,
    size: int,
    num_labels: Optional[int] = None,
) -> Tissues:
    """A random label-map subject on the template grid of ``size``: a randomly shaped head whose inside is a
    :func:`random_label_map` with each label assigned to a brain tissue.

    * Head: an ellipsoid with semi-axes uniform in [0.32, 0.44] × the grid edge (per axis), centre offset up
      to 0.04 × edge, its radius modulated by ±10 % smooth noise.
    * Shells measured inward from the head surface (mm, with 0.7 mm soft edges): scalp 0–5 mm, bone
      5–11 mm, outer CSF 11–13.5 mm; inside that, every label of the random map becomes CSF, GM or WM with
      probabilities 0.2 / 0.4 / 0.4, blurred by 0.5 voxel for partial volume.

    Returns:
        :class:`Tissues` with ``parcels``: 0 air, 1 bone, 2 scalp, 3 + k for label k of the random map
        inside the brain (by the hard tissue labels).
    """
    tissues_grid = load_mni_tissues(size)
    grid = tissues_grid.grid
    spacing = tissues_grid.spacing_mm
    shape = tissues_grid.shape
    semi = rng.uniform(0.32, 0.44, size=3) * size  # (x, y, z) voxels
    centre = (size - 1) / 2.0 + rng.uniform(-0.04, 0.04, size=3) * size
    zz, yy, xx = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")
    radius = np.sqrt(((xx - centre[0]) / semi[0]) ** 2 + ((yy - centre[1]) / semi[1]) ** 2
                     + ((zz - centre[2]) / semi[2]) ** 2)
    radius = radius * (1.0 + 0.1 * smooth_noise(shape, rng, control_points=4)[0])
    depth_mm = (1.0 - radius) * float(semi.mean()) * spacing  # approximate depth below the head surface
    scalp = _band(depth_mm, 0.0, 5.0)
    bone = _band(depth_mm, 5.0, 11.0)
    outer_csf = _band(depth_mm, 11.0, 13.5)
    inside = _ramp(depth_mm, 13.5)

    parcels = random_label_map(rng, size, num_labels=num_labels)
    k = int(parcels.max()) + 1
    tissue_of_label = rng.choice(3, size=k, p=[0.2, 0.4, 0.4])  # 0 csf, 1 gm, 2 wm
    brain = []
    for t in range(3):
        onehot = np.isin(parcels, np.nonzero(tissue_of_label == t)[0]).astype(np.float32)
        brain.append(ndimage.gaussian_filter(onehot, 0.5) * inside)
    csf = brain[0] + outer_csf
    stack = np.stack([np.zeros_like(csf), csf, brain[1], brain[2], bone, scalp])
    stack[0] = np.clip(1.0 - stack[1:].sum(axis=0), 0.0, 1.0)
    tissues = Tissues.from_stack(stack, grid)
    hard = tissues.labels()  # 0 air, 1 csf, 2 gm, 3 wm, 4 bone, 5 scalp
    outside_labels = np.select([hard == LABELS["bone"], hard == LABELS["scalp"]], [1, 2], default=0)
    parcels_out = np.where((hard >= LABELS["csf"]) & (hard <= LABELS["wm"]), parcels + 3, outside_labels)
    return Tissues.from_stack(stack, grid, parcels_out.astype(np.int32))
