"""Tests of unifuse.metrics against hand-computed values and independent implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from unifuse import metrics
from unifuse.errors import InputImageError
from unifuse.spatial import jacobian_determinant


def smooth_volume(shape=(24, 22, 20), seed=0, sigma=1.5) -> np.ndarray:
    """A textured volume in [0, 1] (smoothed noise, min-max normalised)."""
    rng = np.random.default_rng(seed)
    v = ndimage.gaussian_filter(rng.random(shape), sigma)
    return (v - v.min()) / (v.max() - v.min())


# ------------------------------------------------------------------------------------ identical images
def test_identical_sources_and_fused_give_ideal_scores():
    a = smooth_volume()
    m = metrics.fusion_metrics(a, a, a)
    assert m["q_mse"] == 0.0
    assert m["q_cc"] == pytest.approx(1.0, abs=1e-12)
    assert m["q_ssim"] == pytest.approx(2.0, abs=1e-12)  # SSIM = 1 per source, summed
    assert m["q_psnr"] == math.inf
    assert math.isnan(m["q_vif"])  # 24x22x20 is below the 41-voxel VIF minimum
    assert math.isnan(m["q_scd"])  # f - b == 0 is constant: correlation undefined
    assert metrics.ssim3d(a, a) == pytest.approx(1.0, abs=1e-12)


def test_fusion_metrics_keys_and_consistency_with_single_metrics():
    a = smooth_volume((44, 44, 44), seed=1)
    b = smooth_volume((44, 44, 44), seed=2)
    f = 0.5 * (a + b)
    m = metrics.fusion_metrics(a, b, f)
    assert set(m) == {"q_mse", "q_cc", "q_psnr", "q_ssim", "q_vif", "q_scd"}
    assert m["q_mse"] == pytest.approx(0.5 * (metrics.mse(f, a) + metrics.mse(f, b)))
    assert m["q_cc"] == pytest.approx(0.5 * (metrics.pearson_r(f, a) + metrics.pearson_r(f, b)))
    assert m["q_ssim"] == pytest.approx(metrics.ssim3d(f, a) + metrics.ssim3d(f, b))
    assert m["q_vif"] == pytest.approx(metrics.vif_pixel(a, f) + metrics.vif_pixel(b, f))
    assert m["q_psnr"] == pytest.approx(10 * math.log10(1.0 / m["q_mse"]))
    assert all(math.isfinite(v) for v in m.values())


# ------------------------------------------------------------------------------------------ MSE, PSNR
def test_constant_offset_gives_exact_mse_and_psnr():
    a = smooth_volume()
    c = 0.1
    assert metrics.q_mse(a, a, a + c) == pytest.approx(c * c, rel=1e-12)
    assert metrics.q_psnr(a, a, a + c) == pytest.approx(20.0, rel=1e-10)  # 10 log10(1 / 0.01)
    # only one source differs: the two MSEs are averaged
    assert metrics.q_mse(a, a + c, a) == pytest.approx(c * c / 2, rel=1e-12)
    # the data range enters PSNR squared
    assert metrics.q_psnr(a, a, a + c, data_range=2.0) == pytest.approx(20.0 + 20 * math.log10(2.0), rel=1e-10)


def test_gaussian_noise_mse_matches_variance():
    rng = np.random.default_rng(3)
    a = smooth_volume((32, 32, 32), seed=3)
    sigma = 0.05
    f = a + rng.normal(0.0, sigma, a.shape)
    # 32768 samples: the sample variance is within ~1 % (1 sd) of sigma^2
    assert metrics.q_mse(a, a, f) == pytest.approx(sigma**2, rel=0.04)
    assert metrics.q_psnr(a, a, f) == pytest.approx(10 * math.log10(1 / sigma**2), abs=0.2)


# ------------------------------------------------------------------------------------------- CC, SCD
def test_correlation_of_affine_copies():
    a = smooth_volume(seed=4)
    assert metrics.pearson_r(a, 2.0 * a + 3.0) == pytest.approx(1.0, abs=1e-12)
    assert metrics.pearson_r(a, -a) == pytest.approx(-1.0, abs=1e-12)
    assert math.isnan(metrics.pearson_r(a, np.full_like(a, 0.3)))
    b = smooth_volume(seed=5)
    assert metrics.q_cc(a, b, a) == pytest.approx(0.5 * (1.0 + metrics.pearson_r(a, b)), abs=1e-12)


def test_scd_is_symmetric_and_two_for_additive_fusion():
    a = smooth_volume(seed=6)
    b = smooth_volume(seed=7)
    f = 0.3 * a + 0.7 * b + 0.05 * smooth_volume(seed=8)
    assert metrics.q_scd(a, b, f) == pytest.approx(metrics.q_scd(b, a, f), abs=1e-12)
    # f = a + b: f - b = a and f - a = b, so each correlation is exactly 1
    assert metrics.q_scd(a, b, a + b) == pytest.approx(2.0, abs=1e-12)
    # uncorrelated sources of equal variance: r(a, (a - b)/2) = σ² / (σ · σ√2) = 1/√2 per term
    z, y, x = np.meshgrid(np.arange(8), np.arange(8), np.arange(8), indexing="ij")
    ca = np.cos(2 * np.pi * x / 8)
    cb = np.cos(2 * np.pi * y / 8)
    assert metrics.pearson_r(ca, cb) == pytest.approx(0.0, abs=1e-12)
    assert metrics.q_scd(ca, cb, 0.5 * (ca + cb)) == pytest.approx(math.sqrt(2.0), abs=1e-12)


# ------------------------------------------------------------------------------------------------ SSIM
def _ssim_at_voxel_bruteforce(x: np.ndarray, y: np.ndarray, p, data_range=1.0) -> float:
    """Independent SSIM at one interior voxel: explicit 11³ Gaussian weights, weighted moments."""
    k = np.arange(-5, 6, dtype=np.float64)
    g = np.exp(-0.5 * (k / 1.5) ** 2)
    g /= g.sum()
    w = np.einsum("i,j,k->ijk", g, g, g)
    sl = tuple(slice(c - 5, c + 6) for c in p)
    px, py = x[sl], y[sl]
    mx, my = (w * px).sum(), (w * py).sum()
    vx = (w * (px - mx) ** 2).sum()
    vy = (w * (py - my) ** 2).sum()
    cxy = (w * (px - mx) * (py - my)).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))


def test_ssim_map_matches_bruteforce_window_and_mean_is_valid_region():
    rng = np.random.default_rng(9)
    x = smooth_volume((20, 19, 18), seed=9, sigma=1.0)
    y = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1)
    smap = metrics.ssim3d_map(x, y)
    assert smap.shape == x.shape
    for p in [(5, 5, 5), (10, 9, 8), (14, 13, 12), (7, 12, 6)]:
        assert smap[p] == pytest.approx(_ssim_at_voxel_bruteforce(x, y, p), abs=1e-10)
    assert metrics.ssim3d(x, y) == pytest.approx(smap[5:-5, 5:-5, 5:-5].mean(), abs=1e-12)


def test_ssim_of_two_constant_volumes_is_the_luminance_term():
    c_x, c_y = 0.2, 0.6
    x = np.full((16, 16, 16), c_x)
    y = np.full((16, 16, 16), c_y)
    c1 = 0.01**2
    expected = (2 * c_x * c_y + c1) / (c_x**2 + c_y**2 + c1)  # contrast term is C2/C2 = 1
    assert metrics.ssim3d(x, y) == pytest.approx(expected, abs=1e-12)


def test_ssim_is_symmetric_and_decreases_with_noise():
    rng = np.random.default_rng(10)
    x = smooth_volume(seed=10)
    y1 = x + rng.normal(0, 0.02, x.shape)
    y2 = x + rng.normal(0, 0.2, x.shape)
    assert metrics.ssim3d(x, y1) == pytest.approx(metrics.ssim3d(y1, x), abs=1e-12)
    assert 1.0 > metrics.ssim3d(x, y1) > metrics.ssim3d(x, y2)


def test_ssim_truncates_window_on_small_volumes():
    x = smooth_volume((7, 9, 8), seed=11)
    assert metrics.ssim_window_radius(x.shape) == 3
    assert metrics.ssim3d(x, x) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(InputImageError, match="at least 3 voxels"):
        metrics.ssim3d(np.zeros((2, 8, 8)), np.zeros((2, 8, 8)))


def test_ssim_matches_monai_oracle():
    monai_metrics = pytest.importorskip("monai.metrics")
    # MONAI's SSIMMetric uses the same sampled 11-tap Gaussian (σ 1.5), valid convolution and population
    # moments; it computes in float32, hence the tolerance.
    rng = np.random.default_rng(12)
    x = smooth_volume((24, 22, 20), seed=12)
    y = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1)
    oracle = monai_metrics.SSIMMetric(spatial_dims=3, data_range=1.0, win_size=11, kernel_sigma=1.5, k1=0.01, k2=0.03)
    expected = float(oracle(torch.tensor(x)[None, None].float(), torch.tensor(y)[None, None].float()))
    assert metrics.ssim3d(x, y) == pytest.approx(expected, abs=1e-5)


# ------------------------------------------------------------------------------------------------- VIF
def test_vif_of_a_volume_with_itself_is_one():
    a = smooth_volume((44, 44, 44), seed=13)
    assert metrics.vif_pixel(a, a) == pytest.approx(1.0, abs=1e-6)
    b = smooth_volume((44, 44, 44), seed=14)
    assert metrics.q_vif(a, b, a) == pytest.approx(1.0 + metrics.vif_pixel(b, a), abs=1e-6)


def test_vif_drops_with_noise_and_blur_and_rises_with_contrast_gain():
    rng = np.random.default_rng(15)
    a = smooth_volume((44, 44, 44), seed=15, sigma=1.0)
    light = metrics.vif_pixel(a, a + rng.normal(0, 0.02, a.shape))
    heavy = metrics.vif_pixel(a, a + rng.normal(0, 0.1, a.shape))
    assert 1.0 > light > heavy > 0.0
    assert metrics.vif_pixel(a, ndimage.gaussian_filter(a, 2.0)) < 0.7
    assert metrics.vif_pixel(a, 1.5 * a) > 1.0  # gain > 1 adds "information" in VIF's channel model


def test_vif_requires_large_enough_volumes_and_a_non_constant_reference():
    assert metrics.vif_min_size() == 41
    small = smooth_volume((40, 44, 44))
    with pytest.raises(InputImageError, match="41 voxels"):
        metrics.vif_pixel(small, small)
    flat = np.full((41, 41, 41), 0.5)
    assert math.isnan(metrics.vif_pixel(flat, smooth_volume((41, 41, 41))))


# --------------------------------------------------------------------------------- endpoint error (mm)
def test_endpoint_error_of_a_constant_shift_is_shift_times_spacing():
    rng = np.random.default_rng(16)
    u_gt = rng.normal(0, 2.0, (3, 6, 7, 8))
    shift = np.array([2.0, 0.0, 0.0]).reshape(3, 1, 1, 1)  # 2 voxels along x
    res = metrics.endpoint_error_mm(u_gt + shift, u_gt, spacing=(0.5, 1.0, 3.0))
    assert res.mean_mm == pytest.approx(1.0, abs=1e-12)  # 2 voxels x 0.5 mm
    assert res.max_mm == pytest.approx(1.0, abs=1e-12)
    assert res.map_mm.shape == (6, 7, 8)
    # z is the third channel and the third spacing: 1 voxel x 3 mm
    res_z = metrics.endpoint_error_mm(u_gt + np.array([0, 0, 1.0]).reshape(3, 1, 1, 1), u_gt, spacing=(0.5, 1.0, 3.0))
    assert res_z.mean_mm == pytest.approx(3.0, abs=1e-12)
    # (1, 2, 2) voxels at 1 mm: |v| = 3 mm exactly
    res_iso = metrics.endpoint_error_mm(u_gt + np.array([1.0, 2.0, 2.0]).reshape(3, 1, 1, 1), u_gt, spacing=1.0)
    assert res_iso.mean_mm == pytest.approx(3.0, abs=1e-12)


def test_endpoint_error_mask_restricts_statistics():
    u_gt = np.zeros((3, 4, 4, 4))
    u = np.zeros((3, 4, 4, 4))
    u[0, 0] = 4.0  # first z-slice wrong by 4 voxels in x
    mask = np.zeros((4, 4, 4), bool)
    mask[:2] = True
    res = metrics.endpoint_error_mm(u, u_gt, spacing=(2.0, 1.0, 1.0), mask=mask)
    assert res.mean_mm == pytest.approx(4.0, abs=1e-12)  # half of the masked voxels have 8 mm
    assert res.max_mm == pytest.approx(8.0)
    assert metrics.endpoint_error_mm(u, u_gt, spacing=(2.0, 1.0, 1.0)).mean_mm == pytest.approx(2.0)


def test_endpoint_error_rejects_bad_inputs():
    u = np.zeros((3, 4, 4, 4))
    with pytest.raises(InputImageError, match=r"\(3, D, H, W\)"):
        metrics.endpoint_error_mm(u[None], u[None], 1.0)
    with pytest.raises(InputImageError, match="spacing"):
        metrics.endpoint_error_mm(u, u, (1.0, -1.0, 1.0))
    with pytest.raises(InputImageError, match="different grids"):
        metrics.endpoint_error_mm(u, np.zeros((3, 4, 4, 5)), 1.0)


# ------------------------------------------------------------------------------------------------ Dice
def test_dice_of_two_overlapping_boxes_is_the_exact_fraction():
    a = np.zeros((20, 20, 20), np.int16)
    b = np.zeros((20, 20, 20), np.int16)
    a[0:10, 0:10, 0:10] = 1  # 1000 voxels
    b[5:15, 0:10, 0:8] = 1  # 800 voxels; overlap 5*10*8 = 400
    a[15:20, 15:20, 15:20] = 2  # 125 voxels, identical in both
    b[15:20, 15:20, 15:20] = 2
    d = metrics.dice(a, b)
    assert d[1] == pytest.approx(2 * 400 / 1800, abs=1e-15)
    assert d[2] == 1.0
    assert d["mean"] == pytest.approx((800 / 1800 + 1.0) / 2, abs=1e-15)
    d3 = metrics.dice(a, b, labels=[1, 3])
    assert math.isnan(d3[3]) and d3["mean"] == pytest.approx(800 / 1800)
    with pytest.raises(InputImageError, match="integer labels"):
        metrics.dice(a.astype(float), b)


def test_dice_matches_simpleitk_label_overlap_on_random_labels():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 12, (14, 15, 16))
    b = np.where(rng.random(a.shape) < 0.7, a, rng.integers(0, 12, a.shape))
    overlap = sitk.LabelOverlapMeasuresImageFilter()
    overlap.Execute(sitk.GetImageFromArray(a), sitk.GetImageFromArray(b))
    d = metrics.dice(a, b)
    assert sorted(k for k in d if k != "mean") == list(range(1, 12))
    for lab in range(1, 12):
        assert d[lab] == pytest.approx(overlap.GetDiceCoefficient(lab), abs=1e-12)


# --------------------------------------------------------------------------------------------- folding
def test_folding_percent_of_hand_values_and_of_a_checkerboard_field():
    assert metrics.folding_percent(np.array([-1.0, 0.0, 0.5, 2.0])) == 50.0
    assert metrics.folding_percent(np.array([[1.0, 0.2], [3.0, -0.1]]), mask=np.array([[True, False], [False, False]])) == 0.0

    identity = torch.zeros(1, 3, 12, 12, 12)
    assert metrics.folding_percent(jacobian_determinant(identity)) == 0.0
    # x-displacement alternating +1.5 / -1.5 voxels in 2-voxel blocks: d u_x / d x = -1.5 at block edges
    z, y, x = np.meshgrid(np.arange(12), np.arange(12), np.arange(12), indexing="ij")
    sign = np.where(((x // 2) + (y // 2) + (z // 2)) % 2 == 0, 1.0, -1.0)
    u = torch.zeros(1, 3, 12, 12, 12)
    u[0, 0] = torch.from_numpy(1.5 * sign).float()
    pct = metrics.folding_percent(jacobian_determinant(u))
    assert 0.0 < pct < 100.0


# ---------------------------------------------------------------------------------- alignment metrics
def test_alignment_metrics_identity_and_offset():
    a = smooth_volume(seed=17)
    ident = metrics.alignment_metrics(a, a)
    assert ident == {"mse": 0.0, "cc": pytest.approx(1.0, abs=1e-12), "ssim": pytest.approx(1.0, abs=1e-12)}
    off = metrics.alignment_metrics(a + 0.05, a)
    assert off["mse"] == pytest.approx(0.0025, rel=1e-12)
    assert off["cc"] == pytest.approx(1.0, abs=1e-12)
    assert off["ssim"] < 1.0


# -------------------------------------------------------------------------------------------- inputs
def test_bad_volumes_raise_input_image_error():
    a = smooth_volume()
    with pytest.raises(InputImageError, match="3D volume"):
        metrics.q_mse(a[None], a[None], a[None])
    with pytest.raises(InputImageError, match="one grid"):
        metrics.q_cc(a, a[:-1], a)
    bad = a.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputImageError, match="NaN"):
        metrics.ssim3d(a, bad)
    with pytest.raises(InputImageError, match="data_range"):
        metrics.q_psnr(a, a, a, data_range=0)


def test_torch_tensors_are_accepted():
    a = smooth_volume(seed=18)
    t = torch.from_numpy(a).float()
    assert metrics.ssim3d(t, t) == pytest.approx(1.0, abs=1e-6)
    assert metrics.mse(t, t + 0.5) == pytest.approx(0.25, rel=1e-6)
