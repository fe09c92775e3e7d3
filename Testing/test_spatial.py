"""Voxel-grid displacement maths (unifuse.spatial): conventions proven on fields with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from unifuse.spatial import compose, identity_grid, jacobian_determinant, resize_field, warp


def _ramp(shape=(8, 10, 12)):
    d, h, w = shape
    z, y, x = torch.meshgrid(torch.arange(d), torch.arange(h), torch.arange(w), indexing="ij")
    return (100 * z + 10 * y + x).float()[None, None]  # value encodes its own (z, y, x) index


def _const_field(shape, xyz):
    u = torch.zeros(1, 3, *shape)
    for c, v in enumerate(xyz):
        u[:, c] = v
    return u


def test_identity_grid_channels_are_x_y_z():
    g = identity_grid((2, 3, 4))
    assert g.shape == (1, 3, 2, 3, 4)
    assert g[0, 0, 1, 2, 3] == 3 and g[0, 1, 1, 2, 3] == 2 and g[0, 2, 1, 2, 3] == 1


def test_zero_field_is_exact_identity():
    img = _ramp()
    assert torch.allclose(warp(img, torch.zeros(1, 3, *img.shape[2:])), img, atol=1e-4)


def test_integer_translation_pulls_back_along_each_axis():
    img = _ramp()
    shape = img.shape[2:]
    # u = +1 voxel in x: out(p) = img(p + e_x) -> value increases by 1 (x step) where inside
    out = warp(img, _const_field(shape, (1, 0, 0)))
    assert torch.allclose(out[..., :-1], img[..., :-1] + 1, atol=1e-4)
    assert torch.all(out[..., -1] == 0)  # sampled outside -> zeros padding
    out = warp(img, _const_field(shape, (0, 2, 0)))
    assert torch.allclose(out[..., :-2, :], img[..., :-2, :] + 20, atol=1e-4)
    out = warp(img, _const_field(shape, (0, 0, -1)))
    assert torch.allclose(out[:, :, 1:], img[:, :, 1:] - 100, atol=1e-4)


def test_subvoxel_translation_interpolates_linearly():
    img = _ramp()
    out = warp(img, _const_field(img.shape[2:], (0.25, 0, 0)))
    assert torch.allclose(out[..., :-1], img[..., :-1] + 0.25, atol=1e-4)


def test_compose_matches_sequential_warps():
    torch.manual_seed(0)
    shape = (12, 12, 12)
    # Multilinear volumes and fields (upsampled from 2³) are interpolated exactly by trilinear sampling,
    # so composition matches the two sequential warps up to the re-interpolation of the once-warped volume.
    def up(t):
        return torch.nn.functional.interpolate(t, size=shape, mode="trilinear", align_corners=True)

    base = up(torch.rand(1, 1, 2, 2, 2, dtype=torch.float64))
    u1 = up(torch.randn(1, 3, 2, 2, 2, dtype=torch.float64))
    u2 = up(torch.randn(1, 3, 2, 2, 2, dtype=torch.float64))
    seq = warp(warp(base, u1, padding_mode="border"), u2, padding_mode="border")
    one = warp(base, compose(u1, u2), padding_mode="border")
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4), slice(4, -4))
    assert torch.allclose(seq[inner], one[inner], atol=5e-4)
    assert not torch.allclose(one[inner], warp(base, u1 + u2)[inner], atol=1e-3)  # naive sum is wrong


def test_resize_field_preserves_physical_displacement():
    u = _const_field((9, 9, 9), (2.0, -1.0, 0.5))  # voxels of a 9-grid (8 intervals)
    v = resize_field(u, (17, 17, 17))  # 16 intervals: twice as many voxels per mm
    assert torch.allclose(v[:, 0], torch.full_like(v[:, 0], 4.0))
    assert torch.allclose(v[:, 1], torch.full_like(v[:, 1], -2.0))
    assert torch.allclose(v[:, 2], torch.full_like(v[:, 2], 1.0))


def test_jacobian_of_translation_is_one_and_of_scaling_is_cubed_factor():
    shape = (10, 10, 10)
    assert torch.allclose(jacobian_determinant(_const_field(shape, (1.5, -2, 0.3))), torch.ones(1, 1, *shape))
    s = 0.1
    u = s * identity_grid(shape)  # p -> (1 + s) p
    assert torch.allclose(jacobian_determinant(u), torch.full((1, 1, *shape), (1 + s) ** 3), atol=1e-5)


def test_jacobian_detects_folding():
    shape = (10, 10, 10)
    u = -2.0 * identity_grid(shape)  # p -> -p: reflection, det = -1
    assert torch.all(jacobian_determinant(u) < 0)


def test_jacobian_matches_analytic_rotation():
    shape = (12, 12, 12)
    g = identity_grid(shape, dtype=torch.float64)
    c = (torch.tensor(shape[::-1], dtype=torch.float64) - 1).view(1, 3, 1, 1, 1) / 2
    t = math.radians(10)
    x, y = g[:, 0] - c[:, 0], g[:, 1] - c[:, 1]
    u = torch.zeros_like(g)
    u[:, 0] = math.cos(t) * x - math.sin(t) * y - x
    u[:, 1] = math.sin(t) * x + math.cos(t) * y - y
    assert np.allclose(jacobian_determinant(u).numpy(), 1.0, atol=1e-9)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
def test_warp_equals_monai_warp_with_channels_reversed(mode, padding_mode):
    monai_blocks = pytest.importorskip("monai.networks.blocks")  # test extra: the oracle of our warp
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(2, 2, 9, 11, 13, generator=gen)
    u = 2.0 * torch.randn(2, 3, 9, 11, 13, generator=gen)
    theirs = monai_blocks.Warp(mode=mode, padding_mode=padding_mode)(image, u.flip(1))
    torch.testing.assert_close(warp(image, u, mode=mode, padding_mode=padding_mode), theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("n,m", [(16, 32), (8, 24), (12, 12)])
def test_cell_centred_resize_keeps_a_linear_physical_field(n, m):
    """Cell-centred grids share their outer box: voxel i of an n-grid sits at (i + 0.5) / n of the box. A field
    u(x) = c · x (x in box units) is c·(i + 0.5) voxels of the n-grid; resized it must be c·(j + 0.5) voxels of
    the m-grid (interior; the ends clamp). The corner-aligned convention (the FA head's old one) misses this
    by the factor (m - 1)/(n - 1) vs m/n: ~3 % for 16 -> 32."""
    c = 0.1
    i = torch.arange(n, dtype=torch.float32) + 0.5
    u = torch.zeros(1, 3, n, n, n)
    u[0, 0] = c * i.view(1, 1, n).expand(n, n, n)
    out = resize_field(u, (m, m, m), cell_centred=True)
    j = torch.arange(m, dtype=torch.float32) + 0.5
    inner = slice(m // n, m - m // n) if m > n else slice(0, m)
    torch.testing.assert_close(out[0, 0, 0, 0, inner], c * j[inner], atol=1e-5, rtol=0)
    assert out[0, 1:].abs().max() == 0
    if m != n:
        old = resize_field(u, (m, m, m))
        assert not torch.allclose(old[0, 0, 0, 0, inner], c * j[inner], atol=1e-3)
