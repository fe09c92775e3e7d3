"""Robust per-modality intensity normalisation to [0, 1], recorded so it can be reported and inverted.

* MR and PET: the 0.5th and 99.5th percentiles of the *nonzero* voxels (zero is the background/padding
  value of most MR/PET exports) are mapped to 0 and 1.
* CT: a fixed Hounsfield window, by default [-1000, 2000] HU (air .. dense bone), mapped to [0, 1].
* Everything is clipped to [0, 1] afterwards, so :meth:`IntensityNormalization.invert` is exact only for
  values that were inside [low, high].

Automatic CT detection (``modality="auto"``), see :func:`looks_like_ct`: a volume is treated as CT when
(1) at least 5 % of its voxels are below -500 (air in HU; MR/PET magnitudes are never negative),
(2) every value is an integer (an integer pixel type, or float values with no fractional part, as after a
DICOM rescale slope of 1), and (3) all values lie in the int16 range [-32768, 32767] used for HU storage.
Anything else is normalised by percentiles and recorded as modality ``"mr_or_pet"``.

Arrays are numpy (z, y, x) as returned by ``sitk.GetArrayFromImage``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .errors import InputImageError

__all__ = [
    "DEFAULT_PERCENTILES",
    "DEFAULT_CT_WINDOW",
    "CT_AIR_FRACTION",
    "IntensityNormalization",
    "looks_like_ct",
    "normalize_image",
    "foreground_mask",
]

#: Percentiles (in %) of the nonzero voxels mapped to 0 and 1 for MR and PET.
DEFAULT_PERCENTILES: Tuple[float, float] = (0.5, 99.5)
#: Hounsfield window mapped to [0, 1] for CT.
DEFAULT_CT_WINDOW: Tuple[float, float] = (-1000.0, 2000.0)
#: CT voxels below this (HU) are air; above it, the body (one rule for CT detection and CT body masks).
CT_AIR_HU: float = -500.0
#: Minimum fraction of air voxels (< :data:`CT_AIR_HU`) for :func:`looks_like_ct`.
CT_AIR_FRACTION: float = 0.05
_INT16_RANGE = (-32768.0, 32767.0)
_MODALITIES = ("auto", "mr", "ct", "pet")


@dataclass(frozen=True)
class IntensityNormalization:
    """Affine map ``[low, high] -> [0, 1]`` followed by clipping, plus how it was chosen.

    Attributes:
        mode: ``"percentile"`` (MR/PET) or ``"window"`` (CT).
        low, high: input intensities (the image's own units, e.g. HU) mapped to 0 and 1; ``high > low``.
        modality: ``"mr"``, ``"pet"``, ``"ct"`` or ``"mr_or_pet"`` (auto-detected as not CT).
        percentiles: the percentiles used in ``"percentile"`` mode (None for ``"window"``).
    """

    mode: str
    low: float
    high: float
    modality: str
    percentiles: Optional[Tuple[float, float]] = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.high > self.low):
            raise ValueError(f"normalisation needs finite low < high; got low={self.low}, high={self.high}")

    def apply(self, array: np.ndarray) -> np.ndarray:
        """``clip((array - low) / (high - low), 0, 1)`` as float32 (any shape)."""
        a = np.asarray(array, dtype=np.float64)
        return np.clip((a - self.low) / (self.high - self.low), 0.0, 1.0).astype(np.float32)

    def invert(self, array: np.ndarray) -> np.ndarray:
        """Map [0, 1] values back to the image's units: ``low + array * (high - low)``, float32."""
        a = np.asarray(array, dtype=np.float64)
        return (self.low + a * (self.high - self.low)).astype(np.float32)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready description (for the run report)."""
        d = asdict(self)
        d["percentiles"] = list(self.percentiles) if self.percentiles is not None else None
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "IntensityNormalization":
        """Inverse of :meth:`to_dict`."""
        p = d.get("percentiles")
        return cls(str(d["mode"]), float(d["low"]), float(d["high"]), str(d["modality"]),
                   tuple(float(v) for v in p) if p is not None else None)


def _is_integer_valued(image: sitk.Image, array: np.ndarray) -> bool:
    pixel = image.GetPixelID()
    integer_types = {
        sitk.sitkInt8, sitk.sitkUInt8, sitk.sitkInt16, sitk.sitkUInt16,
        sitk.sitkInt32, sitk.sitkUInt32, sitk.sitkInt64, sitk.sitkUInt64,
    }
    if pixel in integer_types:
        return True
    return bool(np.all(np.mod(array, 1.0) == 0.0))


def looks_like_ct(image: sitk.Image, array: Optional[np.ndarray] = None) -> bool:
    """The auto-detection rule for CT (see the module docstring): many voxels < -500, integer values in
    the int16 range."""
    a = sitk.GetArrayViewFromImage(image) if array is None else array
    a = np.asarray(a)
    if a.size == 0:
        return False
    air = float(np.count_nonzero(a < CT_AIR_HU)) / a.size
    if air < CT_AIR_FRACTION:
        return False
    if float(a.min()) < _INT16_RANGE[0] or float(a.max()) > _INT16_RANGE[1]:
        return False
    return _is_integer_valued(image, a)


def _percentile_range(array: np.ndarray, percentiles: Tuple[float, float]) -> Tuple[float, float]:
    values = array[np.isfinite(array)]
    nonzero = values[values != 0]
    if nonzero.size > 0:
        values = nonzero
    if values.size == 0:
        raise InputImageError("the volume has no finite voxels to normalise; check the file")
    low, high = (float(v) for v in np.percentile(values, percentiles))
    if high <= low:  # e.g. a mostly binary image: fall back to the full foreground range
        low, high = float(values.min()), float(values.max())
    if high <= low:
        raise InputImageError(
            f"all nonzero voxels have the value {low:g}, so the volume has no contrast to normalise; "
            "check that the right series/file was chosen"
        )
    return low, high


def normalize_image(
    image: sitk.Image,
    modality: str = "auto",
    percentiles: Tuple[float, float] = DEFAULT_PERCENTILES,
    ct_window: Tuple[float, float] = DEFAULT_CT_WINDOW,
) -> Tuple[np.ndarray, IntensityNormalization]:
    """Normalise a scalar volume to [0, 1].

    Args:
        image: scalar 3D volume in its own units (HU for CT). Not modified.
        modality: ``"auto"`` (CT detected by :func:`looks_like_ct`, else percentiles), ``"mr"``, ``"pet"``
            (percentiles of the nonzero voxels) or ``"ct"`` (fixed HU window).
        percentiles: (low, high) percentiles in % for MR/PET.
        ct_window: (low, high) HU for CT.

    Returns:
        (array, normalisation): float32 (z, y, x) array in [0, 1] and the :class:`IntensityNormalization`
        that produced it.
    """
    if modality not in _MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; use one of {', '.join(_MODALITIES)}")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputImageError("intensity normalisation needs a scalar volume; this one has several components")
    array = sitk.GetArrayFromImage(image)
    if modality == "auto":
        modality = "ct" if looks_like_ct(image, array) else "mr_or_pet"
    if modality == "ct":
        norm = IntensityNormalization("window", float(ct_window[0]), float(ct_window[1]), "ct")
    else:
        p = (float(percentiles[0]), float(percentiles[1]))
        low, high = _percentile_range(array.astype(np.float64), p)
        norm = IntensityNormalization("percentile", low, high, modality, p)
    return norm.apply(array), norm


def foreground_mask(image: sitk.Image, dilate_mm: float = 0.0) -> sitk.Image:
    """Binary mask (uint8, 1 = object) of the imaged anatomy, on ``image``'s grid.

    Otsu threshold of the image smoothed with a Gaussian of sigma = one (largest) voxel spacing in mm,
    holes filled (dark structures enclosed by the object, e.g. ventricles, belong to it), then optionally
    grown by ``dilate_mm``: a box dilation of half-width ``dilate_mm`` converted to voxels per axis
    (rounded up). Works for any modality because Otsu only separates the two main intensity populations
    (background/air vs. object). If the threshold leaves nothing on either side (a nearly constant
    image) the mask is every voxel above the image minimum, or all voxels.
    """
    arr = sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkFloat32))
    spacing_zyx = np.asarray(image.GetSpacing(), dtype=np.float64)[::-1]
    smooth = sitk.GetImageFromArray(ndimage.gaussian_filter(arr, spacing_zyx.max() / spacing_zyx, mode="nearest"))
    mask = sitk.OtsuThreshold(smooth, 0, 1)
    count = int(sitk.GetArrayViewFromImage(mask).sum())
    if count == 0 or count == mask.GetNumberOfPixels():
        fallback = (arr > arr.min()).astype(np.uint8)
        if not fallback.any():
            fallback[...] = 1
        mask = sitk.GetImageFromArray(fallback)
    mask = sitk.BinaryFillhole(mask, fullyConnected=False, foregroundValue=1)
    out = sitk.GetArrayFromImage(mask).astype(np.uint8)
    if dilate_mm > 0:
        half = [int(math.ceil(dilate_mm / s - 1e-9)) for s in spacing_zyx]
        grown = ndimage.uniform_filter(out.astype(np.float32), size=[2 * h + 1 for h in half], mode="constant")
        out = (grown > 1e-6).astype(np.uint8)
    result = sitk.GetImageFromArray(out)
    result.CopyInformation(image)
    return result
