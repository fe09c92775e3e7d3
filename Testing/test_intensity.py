"""Intensity normalisation (unifuse.intensity): percentile/HU-window rules, CT auto-detection, inversion."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from unifuse.errors import InputImageError
from unifuse.intensity import (
    DEFAULT_CT_WINDOW,
    IntensityNormalization,
    foreground_mask,
    looks_like_ct,
    normalize_image,
)


def image(arr: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    return img


def ball(shape=(24, 28, 32), radius=9.0, centre=None) -> np.ndarray:
    zz, yy, xx = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    c = np.asarray(shape) / 2 if centre is None else np.asarray(centre)
    return (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 < radius**2


def mr_like(seed: int = 0) -> np.ndarray:
    """Zero background, foreground uniform in [200, 1200] plus a few very bright outliers (float32)."""
    rng = np.random.default_rng(seed)
    fg = ball()
    arr = np.zeros(fg.shape, np.float32)
    arr[fg] = rng.uniform(200, 1200, size=fg.sum())
    idx = np.flatnonzero(fg)[:5]
    arr.flat[idx] = 50000.0  # outliers the percentiles must ignore
    return arr


def ct_like() -> np.ndarray:
    """int16 HU: air -1000 outside a soft-tissue ball (40 HU) holding a bone ball (1000 HU)."""
    arr = np.full((24, 28, 32), -1000, np.int16)
    arr[ball()] = 40
    arr[ball(radius=4.0)] = 1000
    return arr


def test_percentile_normalisation_of_mr_uses_nonzero_voxels():
    arr = mr_like()
    img = image(arr)
    out, norm = normalize_image(img)
    nonzero = arr[arr != 0].astype(np.float64)
    assert norm.mode == "percentile" and norm.modality == "mr_or_pet"
    assert norm.percentiles == (0.5, 99.5)
    assert norm.low == pytest.approx(np.percentile(nonzero, 0.5))
    assert norm.high == pytest.approx(np.percentile(nonzero, 99.5))
    assert 200 <= norm.low < 210 and 1190 < norm.high <= 1200  # background and outliers ignored
    assert out.dtype == np.float32 and out.shape == arr.shape  # (z, y, x)
    assert out.min() == 0.0 and out.max() == 1.0
    np.testing.assert_allclose(out, np.clip((arr - norm.low) / (norm.high - norm.low), 0, 1), atol=1e-6)
    # the input is untouched
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), arr)


def test_ct_is_auto_detected_and_windowed():
    arr = ct_like()
    out, norm = normalize_image(image(arr))
    assert (norm.mode, norm.modality, norm.low, norm.high) == ("window", "ct", *DEFAULT_CT_WINDOW)
    assert out[0, 0, 0] == 0.0  # air -> 0
    assert out[12, 14, 16] == pytest.approx((1000 + 1000) / 3000)  # bone
    assert out[ball() & ~ball(radius=4.0)].mean() == pytest.approx(1040 / 3000, abs=1e-6)  # soft tissue
    # a custom window and padding values far below the window are clipped
    arr2 = arr.copy()
    arr2[:, :, :2] = -3024
    out2, norm2 = normalize_image(image(arr2), ct_window=(-200.0, 300.0))
    assert (norm2.low, norm2.high) == (-200.0, 300.0)
    assert out2[:, :, :2].max() == 0.0 and out2[12, 14, 16] == 1.0


@pytest.mark.parametrize(
    "name, arr, expected",
    [
        ("int16 CT", ct_like(), True),
        ("float CT after a DICOM rescale (integral values)", ct_like().astype(np.float32), True),
        ("MR magnitude, no negatives", mr_like(), False),
        ("int16 MR, no negatives", np.clip(mr_like(), 0, 30000).astype(np.int16), False),
        ("float image with non-integer negatives", ct_like().astype(np.float32) + 0.25, False),
        ("only 1% of voxels below -500", np.where(np.arange(24 * 28 * 32).reshape(24, 28, 32) % 100 == 0,
                                                    -1000, 100).astype(np.int16), False),
        ("values beyond the int16 HU range", np.where(ball(), 40000, -1000).astype(np.int32), False),
    ],
)
def test_ct_detection_rule(name, arr, expected):
    assert looks_like_ct(image(arr)) is expected, name


def test_explicit_modality_overrides_detection():
    _, as_mr = normalize_image(image(ct_like()), modality="mr")
    assert as_mr.mode == "percentile" and as_mr.modality == "mr"
    _, pet = normalize_image(image(mr_like()), modality="pet")
    assert pet.mode == "percentile" and pet.modality == "pet"
    out, as_ct = normalize_image(image(mr_like()), modality="ct")
    assert as_ct.mode == "window" and as_ct.modality == "ct"
    with pytest.raises(ValueError, match="modality"):
        normalize_image(image(mr_like()), modality="xray")


def test_apply_invert_round_trip_and_clipping():
    norm = IntensityNormalization("percentile", 100.0, 600.0, "mr", (0.5, 99.5))
    x = np.array([100.0, 225.0, 350.0, 600.0])
    y = norm.apply(x)
    np.testing.assert_allclose(y, [0.0, 0.25, 0.5, 1.0], atol=1e-7)
    np.testing.assert_allclose(norm.invert(y), x, rtol=1e-6)
    assert y.dtype == np.float32 and norm.invert(y).dtype == np.float32
    np.testing.assert_array_equal(norm.apply(np.array([-50.0, 9000.0])), [0.0, 1.0])


def test_to_dict_round_trips_through_json():
    _, norm = normalize_image(image(mr_like()))
    d = json.loads(json.dumps(norm.to_dict()))
    assert set(d) >= {"mode", "low", "high", "modality"}
    assert IntensityNormalization.from_dict(d) == norm
    _, ct = normalize_image(image(ct_like()))
    assert IntensityNormalization.from_dict(json.loads(json.dumps(ct.to_dict()))) == ct


def test_degenerate_ranges_are_rejected():
    with pytest.raises(ValueError, match="low < high"):
        IntensityNormalization("window", 5.0, 5.0, "ct")
    flat = np.zeros((16, 16, 16), np.float32)
    flat[4:12, 4:12, 4:12] = 7.0  # one nonzero value: nothing to normalise
    with pytest.raises(InputImageError, match="no contrast"):
        normalize_image(image(flat))
    # a mostly binary image falls back to its nonzero min/max instead of failing
    two = flat.copy()
    two[5, 5, 5] = 9.0
    _, norm = normalize_image(image(two))
    assert (norm.low, norm.high) == (7.0, 9.0)


def test_foreground_mask_covers_object_fills_holes_and_dilates():
    truth = ball(radius=10.0)
    arr = np.where(truth, 500.0, 0.0).astype(np.float32)
    arr[ball(radius=4.0)] = 5.0  # a dark enclosed structure (e.g. ventricles) belongs to the object
    rng = np.random.default_rng(3)
    arr += rng.normal(0, 10, arr.shape).astype(np.float32)
    mask = sitk.GetArrayFromImage(foreground_mask(image(arr, spacing=(1.2, 1.0, 0.9))))
    assert mask.dtype == np.uint8
    dice = 2 * np.count_nonzero(mask.astype(bool) & truth) / (mask.sum() + truth.sum())
    assert dice > 0.95
    assert mask[ball(radius=4.0)].all()  # hole filled
    dilated = sitk.GetArrayFromImage(foreground_mask(image(arr, spacing=(1.2, 1.0, 0.9)), dilate_mm=3.0))
    assert dilated.sum() > mask.sum() and np.all(dilated[mask.astype(bool)] == 1)
    # CT: the object is everything that is not air
    ct_mask = sitk.GetArrayFromImage(foreground_mask(image(ct_like())))
    assert 2 * np.count_nonzero(ct_mask.astype(bool) & ball()) / (ct_mask.sum() + ball().sum()) > 0.95
