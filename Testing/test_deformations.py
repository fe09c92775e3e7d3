"""Random misalignments (unifuse.data.deformations): exact rigid part, bounded, non-folding, exact inverse."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from unifuse import spatial
from unifuse.data.deformations import (
    invert_field,
    min_jacobian,
    random_misalignment,
    random_smooth_displacement,
    rigid_displacement,
    rotation_matrix,
    smooth_noise,
    warp_array,
    warp_rigid,
)

SHAPE = (20, 24, 28)  # (D, H, W): distinct edges catch axis mix-ups


def inversion_residual(v, u):
    """How well ``u`` inverts ``v``: ``||u(p) + v(p + u(p))||`` (voxels), and the mask of the voxels whose sample
    point ``p + u(p)`` lies inside the grid (outside it ``v`` is border-clamped: the residual there measures the
    extrapolation, not the inversion)."""
    vt, ut = (torch.from_numpy(np.asarray(f, dtype=np.float32))[None] for f in (v, u))
    residual = (ut + spatial.warp(vt, ut, padding_mode="border")).norm(dim=1)[0].numpy()
    points = (spatial.identity_grid(ut.shape[2:]) + ut)[0].numpy()
    limits = np.array(ut.shape[:1:-1], dtype=np.float32).reshape(3, 1, 1, 1) - 1  # (W, H, D) - 1
    return residual, np.all((points >= 0) & (points <= limits), axis=0)


def _sitk_rigid_field(shape, rotation_deg, translation_mm, spacing_xyz):
    """v(p) = T(x(p)) - x(p) in voxels, computed with SimpleITK's Euler3DTransform (independent code)."""
    d, h, w = shape
    t = sitk.Euler3DTransform()
    t.SetComputeZYX(True)  # R = Rz Ry Rx
    t.SetCenter([(w - 1) / 2 * spacing_xyz[0], (h - 1) / 2 * spacing_xyz[1], (d - 1) / 2 * spacing_xyz[2]])
    t.SetRotation(*np.deg2rad(rotation_deg).tolist())
    t.SetTranslation(list(map(float, translation_mm)))
    zz, yy, xx = np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij")
    pts = np.stack([xx.ravel() * spacing_xyz[0], yy.ravel() * spacing_xyz[1], zz.ravel() * spacing_xyz[2]], axis=1)
    moved = np.array([t.TransformPoint(p.tolist()) for p in pts])
    v = (moved - pts) / np.asarray(spacing_xyz)
    return v.T.reshape(3, d, h, w)


def test_rotation_matrix_is_proper_and_composed_z_y_x():
    r = rotation_matrix((10.0, -20.0, 30.0))
    assert np.allclose(r @ r.T, np.eye(3), atol=1e-12) and np.isclose(np.linalg.det(r), 1.0)
    rz = rotation_matrix((0, 0, 90.0))
    assert np.allclose(rz @ [1, 0, 0], [0, 1, 0], atol=1e-12)  # right-handed: x -> y about z


def _rotation_matrix_before_scipy(rotation_deg):
    """The hand-written R = Rz @ Ry @ Rx that scipy's Rotation replaced (the oracle of the convention)."""
    ax, ay, az = np.deg2rad(np.asarray(rotation_deg, dtype=np.float64))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def test_rotation_matrix_keeps_the_hand_written_convention_on_random_angles():
    for angles in np.random.default_rng(0).uniform(-180.0, 180.0, size=(200, 3)):
        assert np.abs(rotation_matrix(angles) - _rotation_matrix_before_scipy(angles)).max() < 1e-12


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 1.1, 2.5)])
def test_rigid_field_matches_simpleitk_euler_transform(spacing):
    rot, trans = (4.0, -7.0, 9.0), (3.0, -2.5, 6.0)
    ours = rigid_displacement(SHAPE, rot, trans, spacing)
    ref = _sitk_rigid_field(SHAPE, rot, trans, spacing)
    assert ours.shape == (3, *SHAPE) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() < 1e-4


def test_random_misalignment_rigid_part_matches_its_drawn_parameters():
    spacing = (1.5, 1.2, 2.0)
    m = random_misalignment(SHAPE, np.random.default_rng(3), spacing_mm=spacing, nonrigid_mm=0.0)
    ref = _sitk_rigid_field(SHAPE, m.rotation_deg, m.translation_mm, spacing)
    assert np.abs(m.forward - ref).max() < 1e-4
    assert np.all(m.nonrigid == 0)


def test_zero_parameters_give_zero_fields():
    m = random_misalignment(SHAPE, np.random.default_rng(0), max_rot_deg=0, max_trans_mm=0, nonrigid_mm=0)
    assert np.array_equal(m.forward, np.zeros((3, *SHAPE), np.float32))
    assert np.array_equal(m.inverse, np.zeros((3, *SHAPE), np.float32))
    assert np.all(rigid_displacement(SHAPE) == 0)


def test_reproducible_and_seed_dependent():
    a = random_misalignment(SHAPE, np.random.default_rng(7), spacing_mm=2.0)
    b = random_misalignment(SHAPE, np.random.default_rng(7), spacing_mm=2.0)
    c = random_misalignment(SHAPE, np.random.default_rng(8), spacing_mm=2.0)
    assert np.array_equal(a.forward, b.forward) and np.array_equal(a.inverse, b.inverse)
    assert not np.allclose(a.forward, c.forward)


@pytest.mark.parametrize("seed", range(4))
def test_parameters_and_displacements_are_bounded(seed):
    spacing = np.array([2.0, 2.0, 2.0])
    max_rot, max_trans, nonrigid = 10.0, 10.0, 4.0
    m = random_misalignment(SHAPE, np.random.default_rng(seed), max_rot, max_trans, spacing, nonrigid)
    assert np.all(np.abs(m.rotation_deg) <= max_rot) and np.all(np.abs(m.translation_mm) <= max_trans)
    n_mm = np.linalg.norm(m.nonrigid * spacing[:, None, None, None], axis=0)
    assert n_mm.max() <= nonrigid + 1e-4
    # |R(x + n - c) + c + t - x| <= |(R - I)(x - c)| + |n| + |t|, and |(R - I) y| <= angle * |y|
    d, h, w = SHAPE
    radius_mm = 0.5 * np.linalg.norm((np.array([w, h, d]) - 1) * spacing)
    angle = np.linalg.norm(np.deg2rad(m.rotation_deg)) + 1e-9  # bound of the rotation angle
    bound_vox = (angle * radius_mm + nonrigid + np.linalg.norm(m.translation_mm)) / spacing.min()
    assert np.linalg.norm(m.forward, axis=0).max() <= bound_vox + 1e-3


@pytest.mark.parametrize("seed", range(3))
def test_no_folding_and_exact_inverse(seed):
    m = random_misalignment(SHAPE, np.random.default_rng(seed), spacing_mm=4.0, nonrigid_mm=8.0, control_points=4)
    jac_f = spatial.jacobian_determinant(torch.from_numpy(m.forward)[None])
    jac_i = spatial.jacobian_determinant(torch.from_numpy(m.inverse)[None])
    assert float(jac_f.min()) > 0 and float(jac_i.min()) > 0
    residual, inside = inversion_residual(m.forward, m.inverse)
    assert inside.mean() > 0.5
    assert float(residual[inside].max()) < 0.05  # typically ~1e-5 voxel
    # the inverse is NOT -forward (the field is not a translation): the two differ by far more
    assert float(np.abs(m.inverse + m.forward).max()) > 0.2


def test_generic_inversion_agrees_with_the_closed_form_inverse():
    m = random_misalignment(SHAPE, np.random.default_rng(11), spacing_mm=4.0, nonrigid_mm=8.0, control_points=4)
    u = invert_field(m.forward)
    residual, inside = inversion_residual(m.forward, u)
    assert float(np.percentile(residual[inside], 95)) < 0.05
    assert float(np.linalg.norm(u - m.inverse, axis=0)[inside].max()) < 0.05


def test_invert_constant_translation_is_its_negative():
    v = np.zeros((3, *SHAPE), np.float32)
    v[0], v[1], v[2] = 1.5, -0.5, 0.25
    u = invert_field(v)
    assert np.allclose(u[:, 2:-2, 2:-2, 2:-2], -v[:, 2:-2, 2:-2, 2:-2], atol=1e-5)


def test_warp_with_forward_then_inverse_restores_a_smooth_image():
    d, h, w = SHAPE
    zz, yy, xx = np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij")
    img = (np.sin(xx / 4.0) + np.cos(yy / 5.0) + zz / 10.0).astype(np.float32)
    m = random_misalignment(SHAPE, np.random.default_rng(2), max_rot_deg=6, max_trans_mm=2, nonrigid_mm=2,
                            control_points=4)
    moved = warp_array(img, m.forward)
    back = warp_array(moved, m.inverse)
    residual, inside = inversion_residual(m.forward, m.inverse)
    core = np.zeros(SHAPE, bool)
    core[4:-4, 4:-4, 4:-4] = True
    keep = core & inside
    assert np.abs(back - img)[keep].mean() < 0.05 * np.abs(img).mean()
    assert np.abs(moved - img)[keep].mean() > 5 * np.abs(back - img)[keep].mean()


def test_warp_rigid_equals_the_dense_field_warp_and_leaves_input_untouched():
    vol = np.random.default_rng(0).random(SHAPE).astype(np.float32)
    before = vol.copy()
    a = warp_rigid(vol, (5.0, -3.0, 8.0), (2.0, 1.0, -3.0), (1.0, 2.0, 3.0), background=-1.0)
    b = warp_array(vol, rigid_displacement(SHAPE, (5.0, -3.0, 8.0), (2.0, 1.0, -3.0), (1.0, 2.0, 3.0)), background=-1.0)
    assert np.abs(a - b).max() < 1e-4
    assert np.array_equal(vol, before)


def test_warp_array_pads_with_background():
    vol = np.zeros(SHAPE, np.float32)
    field = np.zeros((3, *SHAPE), np.float32)
    field[0] = 100.0  # every sample far outside the volume
    assert np.all(warp_array(vol, field, background=-1000.0) == -1000.0)


def test_smooth_noise_is_normalised_smooth_and_reproducible():
    a = smooth_noise((16, 16, 16), np.random.default_rng(1), control_points=4, channels=2)
    b = smooth_noise((16, 16, 16), np.random.default_rng(1), control_points=4, channels=2)
    assert a.shape == (2, 16, 16, 16) and np.array_equal(a, b)
    assert np.isclose(np.abs(a).max(), 1.0)
    assert np.abs(np.diff(a, axis=-1)).max() < 0.5  # smooth: no jumps between neighbours


def test_random_smooth_displacement_reaches_its_bound_and_never_folds():
    gentle = random_smooth_displacement(SHAPE, np.random.default_rng(4), max_mm=1.0, spacing_mm=(1.0, 2.0, 3.0))
    mm = gentle * np.array([1.0, 2.0, 3.0])[:, None, None, None]
    assert np.isclose(np.linalg.norm(mm, axis=0).max(), 1.0, rtol=1e-4)  # peak length = max_mm exactly
    harsh = random_smooth_displacement(SHAPE, np.random.default_rng(4), max_mm=40.0, control_points=8)
    assert np.linalg.norm(harsh, axis=0).max() < 40.0  # shrunk ...
    assert min_jacobian(harsh) >= 0.2  # ... until it no longer folds


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError):
        random_misalignment((4, 4), np.random.default_rng(0))
    with pytest.raises(ValueError):
        random_misalignment(SHAPE, np.random.default_rng(0), max_rot_deg=-1)
    with pytest.raises(ValueError):
        invert_field(np.zeros((2, 4, 4, 4), np.float32))
    with pytest.raises(ValueError):
        rigid_displacement(SHAPE, spacing_mm=(1.0, 0.0, 1.0))
