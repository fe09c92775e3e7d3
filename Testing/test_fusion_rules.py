"""Tests of the classical fusion rules (average, max, 3D Laplacian pyramid)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from unifuse import fusion_rules
from unifuse.errors import InputImageError


def textured(shape=(24, 20, 28), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = ndimage.gaussian_filter(rng.random(shape), 0.8)
    return (v - v.min()) / (v.max() - v.min())


def test_average_and_max_are_exact():
    a = np.array([[[0.0, 0.2], [1.0, 0.5]]])
    b = np.array([[[0.4, 0.1], [0.0, 0.5]]])
    np.testing.assert_array_equal(fusion_rules.fuse_average(a, b), np.array([[[0.2, 0.15], [0.5, 0.5]]], np.float32))
    np.testing.assert_array_equal(fusion_rules.fuse_max(a, b), np.array([[[0.4, 0.2], [1.0, 0.5]]], np.float32))
    assert fusion_rules.fuse_average(a, b).dtype == np.float32


def test_pyramid_of_identical_inputs_reconstructs_the_input():
    a = textured()
    fused = fusion_rules.fuse_laplacian_pyramid(a, a, levels=3)
    assert fused.shape == a.shape and fused.dtype == np.float32
    np.testing.assert_allclose(fused, a, atol=1e-5)


def test_pyramid_decomposition_is_exactly_invertible_for_odd_and_even_shapes():
    for shape in [(16, 16, 16), (17, 19, 23)]:
        x = textured(shape, seed=1)
        pyr = fusion_rules.laplacian_pyramid(x, levels=3)
        assert len(pyr) == 4
        assert pyr[1].shape == tuple((n + 1) // 2 for n in shape)
        np.testing.assert_allclose(fusion_rules.reconstruct_laplacian_pyramid(pyr), x, atol=1e-12)
    # the band-pass levels carry the detail: a linear ramp has (almost) no fine-level energy inside
    ramp = np.broadcast_to(np.linspace(0, 1, 16), (16, 16, 16)).copy()
    fine = fusion_rules.laplacian_pyramid(ramp, levels=2)[0]
    assert np.abs(fine[2:-2, 2:-2, 2:-2]).max() < 1e-2


def test_pyramid_takes_the_detail_of_the_sharper_source():
    sharp = textured((32, 32, 32), seed=2)
    blurred = ndimage.gaussian_filter(sharp, 2.0)
    fused = fusion_rules.fuse_laplacian_pyramid(sharp, blurred, levels=3)
    p_fused = fusion_rules.laplacian_pyramid(fused, levels=3)[0]
    p_sharp = fusion_rules.laplacian_pyramid(sharp, levels=3)[0]
    p_blur = fusion_rules.laplacian_pyramid(blurred, levels=3)[0]
    # finest band of the result follows the sharp source, not the blurred one
    assert np.corrcoef(p_fused.ravel(), p_sharp.ravel())[0, 1] > 0.95
    assert np.abs(p_fused).mean() > 3 * np.abs(p_blur).mean()
    # and the result is far closer to the sharp volume than averaging is
    err_pyr = np.abs(fused - sharp).mean()
    err_avg = np.abs(fusion_rules.fuse_average(sharp, blurred) - sharp).mean()
    assert err_pyr < 0.2 * err_avg
    # order of the inputs does not matter (ties aside)
    np.testing.assert_allclose(fusion_rules.fuse_laplacian_pyramid(blurred, sharp, levels=3), fused, atol=1e-6)


def test_pyramid_output_stays_in_the_joint_input_range():
    a = np.zeros((16, 16, 16))
    a[4:12, 4:12, 4:12] = 1.0  # hard edges make the reconstruction overshoot
    b = np.full((16, 16, 16), 0.25)
    fused = fusion_rules.fuse_laplacian_pyramid(a, b, levels=2)
    assert fused.min() >= 0.0 and fused.max() <= 1.0


def test_bad_inputs_are_rejected():
    a = textured((16, 16, 16))
    with pytest.raises(InputImageError, match="different grids"):
        fusion_rules.fuse_max(a, a[:-1])
    with pytest.raises(InputImageError, match="3D volume"):
        fusion_rules.fuse_average(a[0], a[0])
    with pytest.raises(InputImageError, match="at least 16 voxels"):
        fusion_rules.fuse_laplacian_pyramid(a[:8], a[:8], levels=4)
    with pytest.raises(ValueError, match="levels"):
        fusion_rules.fuse_laplacian_pyramid(a, a, levels=0)
    bad = a.copy()
    bad[1, 2, 3] = np.inf
    with pytest.raises(InputImageError, match="NaN or infinite"):
        fusion_rules.fuse_average(a, bad)
