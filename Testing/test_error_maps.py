"""Alignment-error maps (unifuse.error_maps): physical Jacobian determinant, folding, local dissimilarity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from unifuse import geometry as geo
from unifuse.error_maps import (
    alignment_error_maps,
    folding_fraction,
    jacobian_determinant_image,
    local_dissimilarity,
)
from unifuse.intensity import foreground_mask


def oblique_grid(size=(20, 18, 16), spacing=(1.3, 0.9, 2.1)) -> sitk.Image:
    t = sitk.Euler3DTransform()
    t.SetRotation(math.radians(20), math.radians(-15), math.radians(20))
    img = sitk.Image(list(size), sitk.sitkFloat32)
    img.SetSpacing(spacing)
    img.SetDirection(t.GetMatrix())
    img.SetOrigin((12.0, -7.0, 30.0))
    return img


def field_from(fn, grid: sitk.Image) -> sitk.Image:
    """Displacement field image with U(x) = fn(x) (LPS mm) at the voxel centres of ``grid``."""
    k, j, i = np.meshgrid(*(np.arange(n, dtype=float) for n in reversed(grid.GetSize())), indexing="ij")
    pts = np.stack((i, j, k), -1) @ geo.index_to_physical_matrix(grid).T + np.asarray(grid.GetOrigin())
    field = sitk.GetImageFromArray(fn(pts).astype(np.float64), isVector=True)
    field.CopyInformation(grid)
    return field


# --------------------------------------------------------------------------------------------------------
# Jacobian determinant


def test_jacobian_of_translation_is_one():
    grid = oblique_grid()
    jac = jacobian_determinant_image(field_from(lambda p: np.broadcast_to([3.0, -2.0, 7.5], p.shape), grid))
    assert jac.GetPixelID() == sitk.sitkFloat32 and jac.GetSize() == grid.GetSize()
    np.testing.assert_allclose(jac.GetDirection(), grid.GetDirection())
    np.testing.assert_allclose(sitk.GetArrayFromImage(jac), 1.0, atol=1e-6)


def test_jacobian_of_a_nonlinear_field_matches_the_whole_volume_formula_across_slabs():
    """A smooth non-linear field over 40 planes (several slabs of the blockwise computation) on an oblique grid:
    the same values as det(I + dU/didx (D diag(s))^-1) computed on the whole volume with np.linalg.det."""
    grid = oblique_grid(size=(14, 12, 40))
    field = field_from(lambda p: np.stack([3 * np.sin(p[..., 2] / 9.0), 2 * np.cos(p[..., 0] / 7.0) * np.sin(p[..., 1] / 5.0),
                                           0.05 * p[..., 0] * p[..., 1] / 10.0], -1), grid)
    u = sitk.GetArrayFromImage(field)
    grad = np.empty(u.shape[:3] + (3, 3))
    for c in range(3):
        d_k, d_j, d_i = np.gradient(u[..., c], axis=(0, 1, 2))
        grad[..., c, 0], grad[..., c, 1], grad[..., c, 2] = d_i, d_j, d_k
    expected = np.linalg.det(np.eye(3) + grad @ np.linalg.inv(geo.index_to_physical_matrix(grid)))
    assert expected.std() > 0.05  # really non-uniform
    np.testing.assert_allclose(sitk.GetArrayFromImage(jacobian_determinant_image(field)), expected, rtol=1e-5, atol=1e-6)


def test_jacobian_of_uniform_scaling_is_1331_on_oblique_anisotropic_grid():
    """x -> 1.1 x about a centre: det = 1.1^3 everywhere, border included, whatever the grid orientation
    (SimpleITK's own filter gives ~1.298 here because it ignores the direction cosines)."""
    grid = oblique_grid()
    centre = np.array([5.0, 1.0, 40.0])
    field = field_from(lambda p: 0.1 * (p - centre), grid)
    jac = sitk.GetArrayFromImage(jacobian_determinant_image(field))
    np.testing.assert_allclose(jac, 1.331, atol=1e-5)
    sitk_filter = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(field))
    assert abs(float(sitk_filter[8, 9, 10]) - 1.331) > 0.01  # why the filter is not used


def test_jacobian_matches_simpleitk_filter_on_axis_aligned_grid():
    grid = sitk.Image([18, 16, 14], sitk.sitkFloat32)
    grid.SetSpacing((1.4, 0.8, 2.5))
    field = field_from(lambda p: np.stack([2 * np.sin(p[..., 1] / 4), np.cos(p[..., 2] / 5), 1.5 * np.sin(p[..., 0] / 6)], -1), grid)
    ours = sitk.GetArrayFromImage(jacobian_determinant_image(field))
    itk = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(field, True))
    np.testing.assert_allclose(ours[1:-1, 1:-1, 1:-1], itk[1:-1, 1:-1, 1:-1], atol=1e-5)  # same interior stencil


def test_rotation_field_preserves_volume():
    grid = oblique_grid()
    rot = sitk.Euler3DTransform((10.0, 0.0, 35.0), 0.3, -0.2, 0.4)
    disp = geo.transform_to_displacement(rot, grid)
    np.testing.assert_allclose(sitk.GetArrayFromImage(jacobian_determinant_image(disp)), 1.0, atol=1e-6)


def test_folding_field_gives_negative_determinants_and_positive_folding_fraction():
    grid = sitk.Image([32, 12, 10], sitk.sitkFloat32)
    grid.SetSpacing((0.5, 1.0, 1.0))
    amplitude, wavelength = 2.0, 8.0  # max du/dx = 2 pi * 2 / 8 = 1.57 > 1 -> folds
    field = field_from(lambda p: np.stack([amplitude * np.sin(2 * np.pi * p[..., 0] / wavelength),
                                           np.zeros(p.shape[:-1]), np.zeros(p.shape[:-1])], -1), grid)
    jac_img = jacobian_determinant_image(field)
    jac = sitk.GetArrayFromImage(jac_img)
    x = np.arange(32) * 0.5
    expected = 1 + amplitude * 2 * np.pi / wavelength * np.cos(2 * np.pi * x / wavelength)
    np.testing.assert_allclose(jac[5, 6, 1:-1], expected[1:-1], atol=0.05)  # central differences, h = 0.5 mm
    assert jac.min() < -0.4
    frac = folding_fraction(jac_img)
    assert 0.0 < frac < 1.0
    assert frac == pytest.approx(np.mean(jac <= 0))
    # restricted to a mask without folding voxels
    mask = sitk.GetImageFromArray((jac > 0.5).astype(np.uint8))
    mask.CopyInformation(jac_img)
    assert folding_fraction(jac_img, mask) == 0.0
    ident = jacobian_determinant_image(field_from(lambda p: np.zeros_like(p), grid))
    assert folding_fraction(ident) == 0.0


def test_jacobian_rejects_non_fields():
    with pytest.raises(ValueError, match="3 components"):
        jacobian_determinant_image(sitk.Image([8, 8, 8], sitk.sitkFloat32))


# --------------------------------------------------------------------------------------------------------
# local dissimilarity


def phantom(shape=(36, 40, 44), remap=None, shift_vox=(0, 0, 0), seed=0) -> sitk.Image:
    """Head-like label phantom (background 0, 'skin', 'white', 'grey', two 'ventricles', a 'lesion'),
    intensities per label, blurred by one voxel, with mild noise; spacing 1.2 mm."""
    zz, yy, xx = np.meshgrid(*(np.arange(n, dtype=float) for n in shape), indexing="ij")
    c = np.asarray(shape) / 2 + np.asarray(shift_vox)[::-1]  # shift given as (x, y, z) voxels

    def ell(cz, cy, cx, rz, ry, rx):
        return ((zz - c[0] - cz) / rz) ** 2 + ((yy - c[1] - cy) / ry) ** 2 + ((xx - c[2] - cx) / rx) ** 2 < 1

    labels = np.zeros(shape, np.int32)
    labels[ell(0, 0, 0, 15, 17, 19)] = 1
    labels[ell(0, 0, 0, 13, 15, 17)] = 2
    labels[ell(1, -2, 3, 9, 10, 12)] = 3
    labels[ell(0, 3, -5, 3, 2, 5)] = 4
    labels[ell(-1, 3, 6, 3, 2, 4)] = 4
    labels[ell(5, -6, -6, 3, 3, 3)] = 5
    table = np.array([0.0, 0.9, 0.35, 0.6, 0.1, 1.0]) if remap is None else remap
    arr = table[labels]
    img = sitk.GetImageFromArray(arr.astype(np.float32))
    img.SetSpacing((1.2, 1.2, 1.2))
    img.SetOrigin((-20.0, 30.0, -5.0))
    img = sitk.SmoothingRecursiveGaussian(img, 1.2)
    rng = np.random.default_rng(seed)
    noisy = sitk.GetArrayFromImage(img) + rng.normal(0, 0.01, shape).astype(np.float32)
    out = sitk.GetImageFromArray(np.where(sitk.GetArrayFromImage(img) > 0.02, noisy, 0.0).astype(np.float32))
    out.CopyInformation(img)
    return out


def mean_in_mask(img: sitk.Image) -> float:
    arr = sitk.GetArrayFromImage(img)
    return float(arr[arr > 0].mean()) if np.any(arr > 0) else 0.0


def test_identical_images_have_near_zero_dissimilarity():
    a = phantom()
    d = local_dissimilarity(a, a)
    arr = sitk.GetArrayFromImage(d)
    assert d.GetPixelID() == sitk.sitkFloat32 and d.GetSize() == a.GetSize()
    assert arr.min() >= 0.0 and arr.max() <= 1.0
    assert arr.max() < 1e-3


def test_shift_increases_and_contrast_change_keeps_dissimilarity_low():
    ref = phantom(seed=0)
    same_other_noise = sitk.GetArrayFromImage(local_dissimilarity(ref, phantom(seed=1)))
    shifted = sitk.GetArrayFromImage(local_dissimilarity(ref, phantom(shift_vox=(3, -2, 2), seed=1)))
    # modality change: inverted tissue contrast (background stays 0), a T2-like look
    inverted = sitk.GetArrayFromImage(local_dissimilarity(ref, phantom(remap=np.array([0.0, 0.3, 0.8, 0.45, 1.0, 0.15]), seed=1)))
    # non-linear monotone remap of the same image
    squared_img = sitk.Square(phantom(seed=1))
    squared = sitk.GetArrayFromImage(local_dissimilarity(ref, squared_img))
    means = {name: float(m.mean()) for name, m in
             [("noise", same_other_noise), ("shifted", shifted), ("inverted", inverted), ("squared", squared)]}
    assert means["shifted"] > 0.08, means
    assert means["shifted"] > 4 * means["noise"], means
    assert means["inverted"] < means["shifted"] / 2.5, means
    assert means["squared"] < means["shifted"] / 2.5, means


def test_dissimilarity_is_zero_outside_joint_foreground_and_lives_on_a_grid():
    ref = phantom()
    other = phantom(shift_vox=(2, 0, 0), seed=1)
    # b on another grid (coarser, shifted origin) in the same physical space
    coarse = sitk.Resample(other, [30, 33, 37], sitk.Transform(), sitk.sitkLinear, (-21.0, 29.0, -6.0),
                           (1.45, 1.45, 1.45), other.GetDirection(), 0.0, sitk.sitkFloat32)
    d = local_dissimilarity(ref, coarse, radius_mm=4.0)
    assert d.GetSize() == ref.GetSize()
    np.testing.assert_allclose(d.GetSpacing(), ref.GetSpacing())
    np.testing.assert_allclose(d.GetOrigin(), ref.GetOrigin())
    arr = sitk.GetArrayFromImage(d)
    joint = sitk.And(foreground_mask(ref, 4.0), foreground_mask(geo.resample(coarse, ref), 4.0))
    outside = sitk.GetArrayFromImage(joint) == 0
    assert outside.mean() > 0.2 and np.all(arr[outside] == 0)
    assert np.all(arr[:3, :3, :3] == 0)  # a corner far from the head
    assert arr.max() > 0.2
    # an explicit empty mask zeroes everything
    empty = sitk.Image(ref.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(ref)
    assert sitk.GetArrayFromImage(local_dissimilarity(ref, coarse, mask=empty)).max() == 0.0
    with pytest.raises(ValueError, match="radius_mm"):
        local_dissimilarity(ref, coarse, radius_mm=0.0)


def test_alignment_error_maps_before_after():
    ref = phantom(seed=0)
    before = phantom(shift_vox=(3, 2, -2), seed=1)
    after = phantom(seed=2)
    err_before, err_after = alignment_error_maps(ref, before, after)
    for m in (err_before, err_after):
        assert m.GetSize() == ref.GetSize() and m.GetPixelID() == sitk.sitkFloat32
    b, a = sitk.GetArrayFromImage(err_before), sitk.GetArrayFromImage(err_after)
    assert b.mean() > 3 * a.mean()
    # one shared mask (reference foreground AND either moving foreground, dilated): both maps are 0 outside it
    mask = sitk.And(foreground_mask(ref, 5.0), sitk.Or(foreground_mask(before, 5.0), foreground_mask(after, 5.0)))
    outside = sitk.GetArrayFromImage(mask) == 0
    assert outside.any() and np.all(b[outside] == 0) and np.all(a[outside] == 0)
    assert np.count_nonzero(b[~outside]) > 0.9 * np.count_nonzero(~outside)
    assert mean_in_mask(err_before) > mean_in_mask(err_after)


def test_window_radius_is_in_millimetres_on_anisotropic_grids():
    """A point change spreads over about radius_mm in every direction, whatever the voxel size."""
    shape = (24, 60, 60)  # (z, y, x) with spacing x = y = 1 mm, z = 3 mm: a 72 x 60 x 60 mm box
    a_arr = np.ones(shape, np.float32)
    b_arr = a_arr.copy()
    b_arr[12, 30, 30] = 2.0
    a, b = sitk.GetImageFromArray(a_arr), sitk.GetImageFromArray(b_arr)
    for img in (a, b):
        img.SetSpacing((1.0, 1.0, 3.0))
    everywhere = sitk.Image(a.GetSize(), sitk.sitkUInt8) + 1
    everywhere.CopyInformation(a)
    d = sitk.GetArrayFromImage(local_dissimilarity(a, b, radius_mm=6.0, mask=everywhere))
    support = d > 0.01 * d.max()
    z_idx, _, x_idx = np.nonzero(support)
    extent_x_mm = (x_idx.max() - x_idx.min()) * 1.0
    extent_z_mm = (z_idx.max() - z_idx.min()) * 3.0
    assert 12.0 <= extent_x_mm and 12.0 <= extent_z_mm  # at least the 2 * 6 mm window
    assert max(extent_x_mm, extent_z_mm) < 2.0 * min(extent_x_mm, extent_z_mm), (extent_x_mm, extent_z_mm)
