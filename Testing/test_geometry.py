"""Geometry of the SimpleITK side (unifuse.geometry): every sign, order and axis convention is pinned here.

The warping tests build volumes from an analytic function f of LPS physical position, so the expected
aligned volume ``f(T_init(x + u(x)))`` is known exactly at every reference voxel centre x. Each such test
also computes what a *wrong* convention (flipped sign, swapped channel order, reversed composition,
forgotten direction cosines or spacing) would give and checks that those differ from the result by far
more than the tolerance — so the tests fail if any convention is broken.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unifuse import geometry as geo
from unifuse import spatial
from unifuse.errors import GeometryError

# --------------------------------------------------------------------------------------------------------
# helpers: analytic volumes in physical space


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """3x3 rotation matrix from Euler angles (radians) about x, then y, then z (ITK Euler3D, ZXY order)."""
    t = sitk.Euler3DTransform()
    t.SetRotation(ax, ay, az)
    return np.asarray(t.GetMatrix()).reshape(3, 3)


def make_image(size, spacing, origin, direction: Optional[np.ndarray] = None, pixel=sitk.sitkFloat32) -> sitk.Image:
    img = sitk.Image([int(s) for s in size], pixel)
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(o) for o in origin])
    img.SetDirection((np.eye(3) if direction is None else np.asarray(direction)).ravel().tolist())
    return img


def centred_origin(size, spacing, direction, centre) -> np.ndarray:
    """Origin that puts the image centre (continuous index (size-1)/2) at ``centre``."""
    m = np.asarray(direction).reshape(3, 3) @ np.diag(spacing)
    return np.asarray(centre, dtype=float) - m @ ((np.asarray(size, dtype=float) - 1) / 2)


def physical_points(image: sitk.Image) -> np.ndarray:
    """(z, y, x, 3) LPS coordinates of all voxel centres, computed with SimpleITK's own transform for a
    few voxels as a cross-check of the matrix formula."""
    k, j, i = np.meshgrid(*(np.arange(n, dtype=float) for n in reversed(image.GetSize())), indexing="ij")
    idx = np.stack((i, j, k), axis=-1)
    pts = idx @ geo.index_to_physical_matrix(image).T + np.asarray(image.GetOrigin())
    for probe in [(0, 0, 0), tuple(s - 1 for s in image.GetSize()), (1, 2, 3)]:
        expected = image.TransformIndexToPhysicalPoint([int(v) for v in probe])
        np.testing.assert_allclose(pts[probe[2], probe[1], probe[0]], expected, atol=1e-9)
    return pts


BLOBS = [  # (centre LPS mm, sigma mm, weight)
    (np.array([8.0, -6.0, 4.0]), 9.0, 1.0),
    (np.array([-11.0, 9.0, -6.0]), 8.0, 0.7),
    (np.array([2.0, 13.0, 12.0]), 7.0, -0.5),
]


def f_phys(p: np.ndarray) -> np.ndarray:
    """Smooth, asymmetric test function of LPS position (..., 3) -> (...)."""
    out = np.zeros(p.shape[:-1])
    for c, s, w in BLOBS:
        out += w * np.exp(-np.sum((p - c) ** 2, axis=-1) / (2 * s * s))
    return out


def sample(image: sitk.Image, fn: Callable[[np.ndarray], np.ndarray] = f_phys) -> sitk.Image:
    """``image``'s grid filled with fn(physical point) (float32)."""
    out = sitk.GetImageFromArray(fn(physical_points(image)).astype(np.float32))
    out.CopyInformation(image)
    return out


def apply_transform_points(t: sitk.Transform, pts: np.ndarray) -> np.ndarray:
    flat = pts.reshape(-1, 3)
    return np.array([t.TransformPoint(tuple(map(float, p))) for p in flat]).reshape(pts.shape)


def inside_mask(image: sitk.Image, pts: np.ndarray) -> np.ndarray:
    """True where LPS points fall within the voxel-centre box of ``image`` (no extrapolation involved)."""
    m_inv = np.linalg.inv(geo.index_to_physical_matrix(image))
    idx = (pts - np.asarray(image.GetOrigin())) @ m_inv.T
    size = np.asarray(image.GetSize(), dtype=float)
    return np.all((idx >= 0) & (idx <= size - 1), axis=-1)


# --------------------------------------------------------------------------------------------------------
# LPS <-> RAS and index <-> physical


def test_lps_ras_flip_values_and_round_trip():
    p = np.array([[1.0, 2.0, 3.0], [-4.5, 0.0, 7.25]])
    np.testing.assert_array_equal(geo.lps_to_ras(p), [[-1.0, -2.0, 3.0], [4.5, -0.0, 7.25]])
    np.testing.assert_array_equal(geo.ras_to_lps(geo.lps_to_ras(p)), p)
    np.testing.assert_array_equal(geo.LPS_TO_RAS, np.diag([-1.0, -1.0, 1.0]))
    with pytest.raises(ValueError):
        geo.lps_to_ras(np.zeros((4, 2)))


def test_ijk_to_lps_matches_simpleitk_and_inverts():
    img = make_image((10, 12, 14), (0.7, 1.1, 2.3), (10.0, -20.0, 30.0), rotation(0.35, 0.0, 0.35))
    m = geo.ijk_to_lps_matrix(img)
    m_inv = geo.lps_to_ijk_matrix(img)
    rng = np.random.default_rng(0)
    for idx in rng.uniform(-2, 15, size=(20, 3)):
        p = m @ np.append(idx, 1.0)
        np.testing.assert_allclose(p[:3], img.TransformContinuousIndexToPhysicalPoint(idx.tolist()), atol=1e-9)
        np.testing.assert_allclose((m_inv @ p)[:3], idx, atol=1e-9)
        np.testing.assert_allclose(img.TransformPhysicalPointToContinuousIndex(p[:3].tolist()), idx, atol=1e-9)


def test_ijk_to_ras_is_slicers_ijk_to_ras(tmp_path):
    """Compare with the IJKToRAS matrix that Slicer (slicer-core MRML) reads from the same file."""
    slicer = pytest.importorskip("slicer", reason="slicer-core is part of the dev environment (make venv)")
    import vtk

    img = make_image((10, 12, 14), (0.7, 1.1, 2.3), (10.0, -20.0, 30.0), rotation(0.35, -0.2, 0.35), sitk.sitkInt16)
    path = tmp_path / "oblique.nrrd"
    sitk.WriteImage(img, str(path))
    scene = slicer.vtkMRMLScene()
    node = slicer.vtkMRMLScalarVolumeNode()
    scene.AddNode(node)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    mat = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(mat)
    slicer_ijk_to_ras = np.array([[mat.GetElement(r, c) for c in range(4)] for r in range(4)])
    np.testing.assert_allclose(geo.ijk_to_ras_matrix(img), slicer_ijk_to_ras, atol=1e-6)
    # ... and it is NOT the LPS matrix (the flip matters)
    assert not np.allclose(geo.ijk_to_lps_matrix(img), slicer_ijk_to_ras, atol=1e-3)


# --------------------------------------------------------------------------------------------------------
# working grid


def _corner_indices(size) -> np.ndarray:
    """The 8 corners of the voxel-extent box in continuous index: -0.5 and size - 0.5 per axis."""
    lo, hi = -0.5, np.asarray(size, dtype=float) - 0.5
    return np.array([[hi[0] if a else lo, hi[1] if b else lo, hi[2] if c else lo]
                     for a in (0, 1) for b in (0, 1) for c in (0, 1)])


def check_working_grid(reference: sitk.Image, s: int) -> None:
    grid = geo.working_grid(reference, s)
    assert grid.GetSize() == (s, s, s)
    assert grid.GetPixelID() == sitk.sitkFloat32
    sp = np.asarray(grid.GetSpacing())
    np.testing.assert_allclose(sp, sp[0], rtol=1e-12)  # isotropic
    extent = np.asarray(reference.GetSize()) * np.asarray(reference.GetSpacing())
    np.testing.assert_allclose(sp[0] * s, extent.max(), rtol=1e-9)  # largest extent exactly covered
    np.testing.assert_allclose(grid.GetDirection(), reference.GetDirection(), atol=1e-12)
    np.testing.assert_allclose(geo.physical_center(grid), geo.physical_center(reference), atol=1e-6)
    # all 8 corners of the reference's voxel-extent box lie inside the grid's voxel-extent box
    to_ref = geo.ijk_to_lps_matrix(reference)
    to_grid = geo.lps_to_ijk_matrix(grid)
    for corner in _corner_indices(reference.GetSize()):
        g = (to_grid @ to_ref @ np.append(corner, 1.0))[:3]
        assert np.all(g >= -0.5 - 1e-6) and np.all(g <= s - 0.5 + 1e-6), (corner, g)


def test_working_grid_examples():
    check_working_grid(make_image((40, 30, 12), (1.0, 1.2, 4.0), (3.0, -7.0, 11.0)), 16)
    ref = make_image((20, 36, 28), (2.0, 0.8, 1.5), (-50.0, 20.0, 5.0), rotation(0.349, 0.349, 0.0))
    check_working_grid(ref, 32)
    grid = geo.working_grid(ref, 32)
    # here the largest extent is the z extent (28 * 1.5 = 42 mm): spacing 42 / 32
    assert grid.GetSpacing()[0] == pytest.approx(42.0 / 32)
    with pytest.raises(GeometryError):
        geo.working_grid(ref, 1)


# --------------------------------------------------------------------------------------------------------
# fields voxel <-> mm


def test_field_voxels_to_image_matches_simpleitk_index_geometry():
    """u_mm at voxel p must be phys(p + u_vox(p)) - phys(p), with SimpleITK's own index->point map."""
    grid = make_image((6, 5, 4), (0.8, 1.7, 2.9), (5.0, -3.0, 12.0), rotation(0.3, -0.4, 0.2))
    rng = np.random.default_rng(1)
    u = rng.normal(scale=2.0, size=(3, 4, 5, 6))
    field = geo.field_voxels_to_image(u, grid)
    assert field.GetPixelID() == sitk.sitkVectorFloat64 and field.GetNumberOfComponentsPerPixel() == 3
    assert field.GetSize() == grid.GetSize()
    np.testing.assert_allclose(field.GetOrigin(), grid.GetOrigin())
    np.testing.assert_allclose(field.GetSpacing(), grid.GetSpacing())
    np.testing.assert_allclose(field.GetDirection(), grid.GetDirection())
    for i, j, k in [(0, 0, 0), (5, 4, 3), (2, 1, 3), (4, 0, 1)]:
        uvox = u[:, k, j, i]  # channels (x, y, z), array (z, y, x)
        expected = np.subtract(
            grid.TransformContinuousIndexToPhysicalPoint([i + uvox[0], j + uvox[1], k + uvox[2]]),
            grid.TransformIndexToPhysicalPoint([i, j, k]),
        )
        np.testing.assert_allclose(field.GetPixel(i, j, k), expected, atol=1e-9)
    back = geo.field_image_to_voxels(field, grid)
    assert back.shape == u.shape and back.dtype == np.float32
    np.testing.assert_allclose(back, u, atol=1e-5)


def test_field_conversion_rejects_wrong_shapes_and_grids():
    grid = make_image((6, 5, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="shape"):
        geo.field_voxels_to_image(np.zeros((3, 6, 5, 4)), grid)  # (x, y, z) order instead of (z, y, x)
    field = geo.field_voxels_to_image(np.zeros((3, 4, 5, 6)), grid)
    other = make_image((6, 5, 4), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
    with pytest.raises(GeometryError, match="not on the given grid"):
        geo.field_image_to_voxels(field, other)


# --------------------------------------------------------------------------------------------------------
# composition order


def test_compose_transform_applies_field_first_then_initial():
    grid = make_image((16, 16, 16), (2.0, 2.0, 2.0), (-15.0, -15.0, -15.0))
    pts = physical_points(grid)
    u_mm = np.stack([3.0 * np.sin(pts[..., 1] / 6.0), 2.0 * np.cos(pts[..., 2] / 5.0), 1.5 * np.sin(pts[..., 0] / 7.0)], -1)
    u_vox = np.moveaxis(u_mm @ np.linalg.inv(geo.index_to_physical_matrix(grid)).T, -1, 0)
    field = geo.field_voxels_to_image(u_vox, grid)
    init = sitk.Euler3DTransform((1.0, 2.0, 3.0), 0.2, -0.1, 0.3, (4.0, -5.0, 6.0))
    composed = geo.compose_transform(init, field)
    field_only = sitk.DisplacementFieldTransform(sitk.Image(field))
    worst_reverse = 0.0
    for x in pts.reshape(-1, 3)[::97]:
        x = tuple(map(float, x))
        expected = init.TransformPoint(field_only.TransformPoint(x))  # T_init(x + u(x))
        np.testing.assert_allclose(composed.TransformPoint(x), expected, atol=1e-9)
        reverse = field_only.TransformPoint(init.TransformPoint(x))  # x' + u(x') with x' = T_init(x)
        worst_reverse = max(worst_reverse, float(np.linalg.norm(np.subtract(reverse, expected))))
    assert worst_reverse > 1.0  # the other order is measurably different: the check above has teeth
    # the input field survives (DisplacementFieldTransform would otherwise steal its buffer)
    assert field.GetSize() == (16, 16, 16)
    np.testing.assert_allclose(geo.field_image_to_voxels(field, grid), u_vox, atol=1e-5)


# --------------------------------------------------------------------------------------------------------
# end-to-end: known field -> field_voxels_to_image -> compose_transform -> warp_image


def _field_fn(kind: str, centre: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    if kind == "translation":
        t = np.array([4.0, -1.0, -3.0])
        return lambda p: np.broadcast_to(t, p.shape).copy()
    if kind == "rotation":
        r = rotation(0.0, 0.0, math.radians(16.0)) @ rotation(math.radians(8.0), 0.0, 0.0)
        return lambda p: (p - centre) @ r.T + centre - p
    if kind == "sinusoid":
        def fn(p: np.ndarray) -> np.ndarray:
            q = p - centre
            return np.stack([
                3.5 * np.sin(2 * np.pi * q[..., 1] / 60.0),
                2.5 * np.sin(2 * np.pi * q[..., 2] / 50.0 + 0.5),
                3.0 * np.cos(2 * np.pi * q[..., 0] / 70.0),
            ], axis=-1)
        return fn
    raise ValueError(kind)


CENTRE = np.array([1.0, -2.0, 3.0])
OBLIQUE = rotation(math.radians(20.0), 0.0, math.radians(20.0))  # 20 degrees about x and about z

SETUPS: Dict[str, dict] = {
    "isotropic": dict(ref=((30, 30, 30), (2.0, 2.0, 2.0), np.eye(3)), mov=None, init=None),
    "anisotropic": dict(ref=((40, 24, 14), (1.5, 2.5, 4.2), np.eye(3)), mov=None, init=None),
    "oblique": dict(ref=((36, 28, 20), (1.7, 2.2, 3.0), OBLIQUE), mov=None, init=None),
    # reference and moving on different grids (size, spacing, origin, direction) + a rigid T_init
    "different_grids": dict(
        ref=((28, 24, 20), (2.2, 2.5, 3.0), OBLIQUE),
        mov=((60, 52, 44), (1.6, 1.8, 2.0), rotation(-0.25, 0.15, 0.4), np.array([4.0, -3.0, 1.0])),
        init=sitk.Euler3DTransform(tuple(CENTRE), 0.08, -0.05, 0.12, (3.0, 2.0, -4.0)),
    ),
}


def _setup_images(setup: dict):
    size, spacing, direction = setup["ref"]
    reference = sample(make_image(size, spacing, centred_origin(size, spacing, direction, CENTRE), direction))
    if setup["mov"] is None:
        moving = reference
    else:
        msize, mspacing, mdir, mshift = setup["mov"]
        moving = sample(make_image(msize, mspacing, centred_origin(msize, mspacing, mdir, CENTRE + mshift), mdir))
    init = setup["init"] if setup["init"] is not None else sitk.Transform(3, sitk.sitkIdentity)
    return reference, moving, init


@pytest.mark.parametrize("setup_name", list(SETUPS))
@pytest.mark.parametrize("kind", ["translation", "rotation", "sinusoid"])
def test_known_field_warps_to_expected_volume(setup_name: str, kind: str):
    reference, moving, init = _setup_images(SETUPS[setup_name])
    grid = geo.working_grid(reference, 32)
    u_fn = _field_fn(kind, CENTRE)

    # the field as the network would give it: voxels of the working grid, channels (x, y, z)
    m_grid = geo.index_to_physical_matrix(grid)
    u_vox = np.moveaxis(u_fn(physical_points(grid)) @ np.linalg.inv(m_grid).T, -1, 0)
    field = geo.field_voxels_to_image(u_vox, grid)
    aligned = geo.warp_image(moving, geo.compose_transform(init, field), reference, interpolator="bspline")
    assert aligned.GetPixelID() == sitk.sitkFloat32
    assert aligned.GetSize() == reference.GetSize()
    np.testing.assert_allclose(aligned.GetOrigin(), reference.GetOrigin())
    np.testing.assert_allclose(aligned.GetDirection(), reference.GetDirection())
    got = sitk.GetArrayFromImage(aligned).astype(np.float64)

    x = physical_points(reference)
    u_x = u_fn(x)

    mapped = apply_transform_points(init, x + u_x)
    valid = inside_mask(moving, mapped)
    # every voxel whose pre-image falls in the working grid's voxel-centre box (no field extrapolation)
    valid &= inside_mask(grid, x)
    assert valid.mean() > 0.5
    err = np.abs(got - f_phys(mapped))[valid]
    assert err.max() < 0.02 and err.mean() < 0.004, (err.max(), err.mean())

    # negative controls: each wrong convention gives a clearly different volume
    u_vox_at_x = u_x @ np.linalg.inv(m_grid).T  # what the network field means at x, in grid voxels
    wrong = {
        "sign": apply_transform_points(init, x - u_x),
        "channel order (z,y,x)": apply_transform_points(init, x + u_vox_at_x[..., ::-1] @ m_grid.T),
    }
    if SETUPS[setup_name]["init"] is not None and kind != "translation":
        # (for a uniform shift t the two orders differ only by (R - I) t, too little to resolve here)
        tx = apply_transform_points(init, x)
        wrong["order: initial first"] = tx + u_fn(tx)
    if not np.allclose(np.asarray(reference.GetDirection()), np.eye(3).ravel()):
        wrong["direction ignored"] = apply_transform_points(init, x + u_vox_at_x * np.asarray(grid.GetSpacing()))
    wrong["spacing ignored"] = apply_transform_points(init, x + u_vox_at_x @ np.asarray(grid.GetDirection()).reshape(3, 3).T)
    for name, wrong_mapped in wrong.items():
        diff = np.abs(got - f_phys(wrong_mapped))[valid].max()
        assert diff > 0.06, f"{name}: a wrong convention is indistinguishable ({diff:.4f})"


def test_anisotropic_voxel_units_are_scaled_per_axis():
    """A 1-voxel shift along x of an anisotropic grid moves by spacing_x mm, not by 1 mm or spacing_z mm."""
    size, spacing = (20, 20, 20), (1.0, 2.0, 3.0)
    grid = sample(make_image(size, spacing, centred_origin(size, spacing, np.eye(3), CENTRE)))
    for axis in range(3):
        u = np.zeros((3, 20, 20, 20))
        u[axis] = 2.0  # two voxels along this axis
        aligned = geo.warp_image(grid, geo.compose_transform(sitk.Transform(3, sitk.sitkIdentity),
                                                             geo.field_voxels_to_image(u, grid)), grid)
        shift = np.zeros(3)
        shift[axis] = 2.0 * spacing[axis]
        pts = physical_points(grid)
        expected = f_phys(pts + shift)
        inner = inside_mask(grid, pts + shift)
        got = sitk.GetArrayFromImage(aligned)
        np.testing.assert_allclose(got[inner], expected[inner], atol=5e-3)


def test_transform_to_displacement_represents_the_composed_transform():
    reference, moving, init = _setup_images(SETUPS["different_grids"])
    grid = geo.working_grid(reference, 16)
    u_vox = np.moveaxis(
        _field_fn("sinusoid", CENTRE)(physical_points(grid)) @ np.linalg.inv(geo.index_to_physical_matrix(grid)).T,
        -1, 0,
    )
    composed = geo.compose_transform(init, geo.field_voxels_to_image(u_vox, grid))
    disp = geo.transform_to_displacement(composed, reference)
    assert disp.GetPixelID() == sitk.sitkVectorFloat64 and disp.GetSize() == reference.GetSize()
    np.testing.assert_allclose(disp.GetSpacing(), reference.GetSpacing())
    np.testing.assert_allclose(disp.GetDirection(), reference.GetDirection())
    x = physical_points(reference)
    u_arr = sitk.GetArrayFromImage(disp)  # (z, y, x, 3) LPS mm
    np.testing.assert_allclose(x + u_arr, apply_transform_points(composed, x), atol=1e-6)
    # aligned(x) = moving(x + U(x)): warping through U alone reproduces the composed warp
    via_u = geo.warp_image(moving, sitk.DisplacementFieldTransform(sitk.Image(disp)), reference)
    via_t = geo.warp_image(moving, composed, reference)
    np.testing.assert_allclose(sitk.GetArrayFromImage(via_u), sitk.GetArrayFromImage(via_t), atol=1e-5)


def test_simpleitk_path_equals_torch_spatial_warp_on_working_grid():
    """Same voxel field -> same aligned volume via unifuse.spatial.warp and via the SimpleITK path."""
    size, spacing = (30, 26, 18), (1.6, 1.9, 2.8)
    reference = make_image(size, spacing, centred_origin(size, spacing, OBLIQUE, CENTRE), OBLIQUE)
    grid = geo.working_grid(reference, 24)
    # smooth and ~0 near the border, where the two padding rules (zeros vs. ITK's default) differ
    blobs = [(CENTRE + [6.0, -4.0, 2.0], 4.0, 1.0), (CENTRE + [-5.0, 5.0, -3.0], 5.0, 0.6)]
    moving = sample(grid, lambda p: sum(w * np.exp(-np.sum((p - c) ** 2, -1) / (2 * s * s)) for c, s, w in blobs))
    k, j, i = np.meshgrid(*(np.arange(24.0),) * 3, indexing="ij")
    u = np.stack([
        2.0 * np.sin(2 * np.pi * j / 24.0),
        -1.5 * np.cos(2 * np.pi * k / 20.0),
        1.2 * np.sin(2 * np.pi * (i + j) / 30.0),
    ]).astype(np.float32)  # (3, D, H, W) voxels, channels (x, y, z)
    torch_aligned = spatial.warp(
        torch.from_numpy(sitk.GetArrayFromImage(moving))[None, None], torch.from_numpy(u)[None]
    )[0, 0].numpy()
    sitk_aligned = sitk.GetArrayFromImage(geo.warp_image(
        moving,
        geo.compose_transform(geo.initial_transform(grid, grid, "geometry"), geo.field_voxels_to_image(u, grid)),
        grid,
    ))
    assert np.abs(torch_aligned - sitk.GetArrayFromImage(moving)).max() > 0.05  # the field does something
    np.testing.assert_allclose(sitk_aligned, torch_aligned, atol=1e-3)


# --------------------------------------------------------------------------------------------------------
# pre-alignment, overlap, resampling


def _phantom(size=(32, 32, 32), spacing=(2.0, 2.0, 2.0), origin=(-31.0, -31.0, -31.0), direction=None,
             invert: bool = False) -> sitk.Image:
    """An off-centre ellipsoid with an inner structure on a zero background."""
    img = make_image(size, spacing, origin, direction)

    def fn(p: np.ndarray) -> np.ndarray:
        outer = ((p[..., 0] - 5) / 18) ** 2 + ((p[..., 1] + 3) / 14) ** 2 + ((p[..., 2] - 2) / 12) ** 2 < 1
        inner = ((p[..., 0] - 9) / 6) ** 2 + ((p[..., 1] + 1) / 5) ** 2 + ((p[..., 2] - 2) / 5) ** 2 < 1
        tissue = np.where(inner, 0.3, 1.0) if invert else np.where(inner, 1.0, 0.4)
        return np.where(outer, tissue, 0.0) * 100.0

    return sample(img, fn)


def test_initial_transform_geometry_is_identity_and_moments_recovers_a_shift():
    reference = _phantom()
    ident = geo.initial_transform(reference, reference, "geometry")
    np.testing.assert_allclose(ident.TransformPoint((1.0, -2.0, 3.5)), (1.0, -2.0, 3.5))
    shift = np.array([7.0, -5.0, 4.0])
    # moving: different contrast, different grid, content displaced by `shift` in physical space
    moving = _phantom(size=(40, 36, 30), spacing=(1.7, 1.9, 2.3), origin=(-34.0, -33.0, -35.0), invert=True)
    moved = sitk.Image(moving)
    moved.SetOrigin((np.asarray(moving.GetOrigin()) + shift).tolist())  # moved(p) = moving(p - shift)
    t = geo.initial_transform(reference, moved, "moments")
    offset = np.subtract(t.TransformPoint((0.0, 0.0, 0.0)), (0.0, 0.0, 0.0))
    np.testing.assert_allclose(offset, shift, atol=1.0)  # fixed -> moving: x + shift
    aligned = geo.warp_image(moved, t, reference, interpolator="nearest")
    before = geo.warp_image(moved, ident, reference, interpolator="nearest")
    fg_ref = sitk.GetArrayFromImage(reference) > 0

    def dice(img: sitk.Image) -> float:
        fg = sitk.GetArrayFromImage(img) > 0
        return 2.0 * np.count_nonzero(fg & fg_ref) / (np.count_nonzero(fg) + np.count_nonzero(fg_ref))

    assert dice(aligned) > 0.95
    assert dice(before) < 0.75
    with pytest.raises(ValueError, match="moments"):
        geo.initial_transform(reference, moved, "centre")


def test_check_overlap_flags_disjoint_volumes_and_accepts_overlapping_ones():
    reference = _phantom()
    assert geo.check_overlap(reference, reference) == pytest.approx(1.0)
    far = sitk.Image(reference)
    far.SetOrigin((np.asarray(reference.GetOrigin()) + [500.0, 0.0, 0.0]).tolist())
    assert geo.overlap_fraction(reference, far) == 0.0
    with pytest.raises(GeometryError, match="moments"):
        geo.check_overlap(reference, far)
    half = sitk.Image(reference)
    half.SetOrigin((np.asarray(reference.GetOrigin()) + [32.0, 0.0, 0.0]).tolist())
    assert 0.4 < geo.overlap_fraction(reference, half) < 0.6
    # with a transform that maps the reference onto the far volume, the overlap is restored
    back = sitk.TranslationTransform(3, (500.0, 0.0, 0.0))
    assert geo.check_overlap(reference, far, back) == pytest.approx(1.0)


def test_resample_interpolators_and_output_type():
    src = make_image((12, 12, 12), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), pixel=sitk.sitkInt16)
    arr = np.zeros((12, 12, 12), np.int16)
    arr[:, :, 6:] = 100
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(src)
    shifted = sitk.TranslationTransform(3, (0.5, 0.0, 0.0))  # sample halfway between voxels 5 and 6
    lin = sitk.GetArrayFromImage(geo.resample(img, img, shifted, "linear"))
    near = sitk.GetArrayFromImage(geo.resample(img, img, shifted, "nearest"))
    assert lin.dtype == np.float32 and near.dtype == np.float32
    assert lin[4, 4, 5] == pytest.approx(50.0)
    assert near[4, 4, 5] in (0.0, 100.0)
    outside = sitk.GetArrayFromImage(geo.resample(img, img, sitk.TranslationTransform(3, (50.0, 0, 0)), default=-7.0))
    assert np.all(outside == -7.0)
    bsp = sitk.GetArrayFromImage(geo.resample(sitk.Cast(img, sitk.sitkFloat32), img, None, "bspline"))
    np.testing.assert_allclose(bsp, arr, atol=1e-3)  # identity resampling reproduces the samples
    with pytest.raises(ValueError, match="interpolator"):
        geo.resample(img, img, interpolator="cubic")


# --------------------------------------------------------------------------------------------------------
# property tests over random geometries

spacings = st.tuples(*(st.floats(0.3, 5.0),) * 3)
origins = st.tuples(*(st.floats(-300.0, 300.0),) * 3)
angles = st.tuples(*(st.floats(-math.pi, math.pi),) * 3)
flips = st.tuples(*(st.sampled_from([-1.0, 1.0]),) * 3)
sizes = st.tuples(*(st.integers(8, 40),) * 3)


def _random_image(size, spacing, origin, ang, flip) -> sitk.Image:
    return make_image(size, spacing, origin, rotation(*ang) @ np.diag(flip))


@settings(max_examples=25, deadline=None)
@given(size=sizes, spacing=spacings, origin=origins, ang=angles, flip=flips, seed=st.integers(0, 2**16))
def test_property_round_trips(size, spacing, origin, ang, flip, seed):
    img = _random_image(size, spacing, origin, ang, flip)
    rng = np.random.default_rng(seed)
    # ijk <-> lps
    idx = rng.uniform(-1, 40, size=(7, 3))
    pts = np.c_[idx, np.ones(7)] @ geo.ijk_to_lps_matrix(img).T
    np.testing.assert_allclose((pts @ geo.lps_to_ijk_matrix(img).T)[:, :3], idx, atol=1e-7)
    np.testing.assert_allclose(pts[0, :3], img.TransformContinuousIndexToPhysicalPoint(idx[0].tolist()), atol=1e-7)
    # lps <-> ras, and ijk -> ras = flip o ijk -> lps
    np.testing.assert_allclose(geo.ras_to_lps(geo.lps_to_ras(pts[:, :3])), pts[:, :3], atol=1e-12)
    np.testing.assert_allclose((np.c_[idx, np.ones(7)] @ geo.ijk_to_ras_matrix(img).T)[:, :3],
                               geo.lps_to_ras(pts[:, :3]), atol=1e-7)
    # voxel <-> mm fields on a small grid with this geometry
    small = make_image((5, 4, 3), spacing, origin, np.asarray(img.GetDirection()).reshape(3, 3))
    u = rng.normal(scale=3.0, size=(3, 3, 4, 5))
    field = geo.field_voxels_to_image(u, small)
    np.testing.assert_allclose(geo.field_image_to_voxels(field, small), u, atol=1e-4)
    mm = sitk.GetArrayFromImage(field)
    np.testing.assert_allclose(np.linalg.norm(mm, axis=-1),
                               np.linalg.norm(np.moveaxis(u, 0, -1) * np.asarray(spacing), axis=-1), rtol=1e-9, atol=1e-9)


@settings(max_examples=25, deadline=None)
@given(size=sizes, spacing=spacings, origin=origins, ang=angles, flip=flips, s=st.sampled_from([16, 32, 48]))
def test_property_working_grid_covers_reference(size, spacing, origin, ang, flip, s):
    check_working_grid(_random_image(size, spacing, origin, ang, flip), s)
