"""Global registration stage (unifuse.registration.affine): rigid -> affine Mattes-MI registration.

The phantom is an analytic "head" (scalp, skull, brain with texture, ventricles, a lesion, a cyst and a nose
that breaks the symmetry) defined as a function of reference LPS position. The moving volume samples the
same anatomy through a known reference -> moving map ``T_true`` and with a different, non-monotonic
contrast, so the truth is exact: the endpoint error (EPE) is ``|T_est(x) - T_true(x)|`` in mm, averaged
over reference voxels inside the head (or inside the moving slab).
"""

from __future__ import annotations

import json
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import pytest
import SimpleITK as sitk

from unifuse import geometry
from unifuse.errors import CancelledError, GeometryError, InputImageError
from unifuse.registration.affine import AffineSettings, register_affine, write_transform

# --------------------------------------------------------------------------------------------------------
# phantom

HEAD_CENTER = np.array([5.0, -10.0, 20.0])  # LPS mm
#: (offset from HEAD_CENTER mm, semi-axes mm, reference value, moving value), painted in this order.
STRUCTURES = [
    ((0.0, -80.0, -15.0), (14.0, 18.0, 22.0), 0.70, 0.35),  # nose
    ((0.0, 0.0, 0.0), (72.0, 88.0, 62.0), 0.70, 0.35),  # scalp
    ((0.0, 0.0, 0.0), (66.0, 82.0, 56.0), 0.20, 0.95),  # skull
    ((0.0, 0.0, 0.0), (60.0, 76.0, 50.0), 0.50, 0.25),  # brain
    ((-10.0, -5.0, 5.0), (6.0, 20.0, 9.0), 0.12, 0.80),  # left ventricle
    ((11.0, -5.0, 5.0), (6.0, 20.0, 9.0), 0.12, 0.80),  # right ventricle
    ((28.0, 30.0, 18.0), (11.0, 11.0, 11.0), 1.00, 0.10),  # lesion
    ((-30.0, 25.0, -18.0), (13.0, 9.0, 12.0), 0.30, 0.60),  # cyst
]
EDGE_MM = 1.0


def _inside(points: np.ndarray, offset, semi) -> np.ndarray:
    """Soft indicator (0..1) of an ellipsoid, edge width ~EDGE_MM."""
    d = (points - HEAD_CENTER - np.asarray(offset)) / np.asarray(semi)
    r = np.sqrt(np.sum(d * d, axis=-1))
    distance = (1.0 - r) * float(np.min(semi))
    return 1.0 / (1.0 + np.exp(-np.clip(distance / EDGE_MM, -50, 50)))


def anatomy(points: np.ndarray, contrast: str) -> np.ndarray:
    """Phantom intensity at reference LPS points (..., 3); ``contrast`` 'reference' or 'moving'."""
    value = np.zeros(points.shape[:-1])
    for offset, semi, ref_value, mov_value in STRUCTURES:
        w = _inside(points, offset, semi)
        value = value * (1 - w) + (ref_value if contrast == "reference" else mov_value) * w
    q = points - HEAD_CENTER
    texture = np.sin(q[..., 0] / 6.0) * np.cos(q[..., 1] / 8.0) * np.sin(q[..., 2] / 7.0 + 0.5)
    brain = _inside(points, (0.0, 0.0, 0.0), (60.0, 76.0, 50.0))
    return value + (0.08 if contrast == "reference" else -0.06) * texture * brain


def grid_points(image: sitk.Image) -> np.ndarray:
    """(z, y, x, 3) LPS mm points of every voxel centre."""
    nx, ny, nz = image.GetSize()
    k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    m = geometry.ijk_to_lps_matrix(image)
    return np.stack([i, j, k], axis=-1).astype(np.float64) @ m[:3, :3].T + m[:3, 3]


def make_grid(size, spacing, center, direction: Optional[np.ndarray] = None) -> sitk.Image:
    """Empty float32 grid with the given size, spacing (mm) and direction, centred on ``center`` (LPS mm)."""
    img = sitk.Image([int(v) for v in size], sitk.sitkFloat32)
    img.SetSpacing([float(v) for v in spacing])
    d = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64)
    img.SetDirection(d.ravel().tolist())
    half = d @ (np.asarray(spacing, dtype=np.float64) * (np.asarray(size) - 1) / 2)
    img.SetOrigin((np.asarray(center, dtype=np.float64) - half).tolist())
    return img


def rotation_matrix(degrees: Sequence[float]) -> np.ndarray:
    """ITK Euler3D rotation (angles about x, y, z in degrees)."""
    e = sitk.Euler3DTransform()
    e.SetRotation(*np.radians(degrees))
    return np.asarray(e.GetMatrix()).reshape(3, 3)


def true_transform(matrix: np.ndarray, translation: Sequence[float]) -> sitk.AffineTransform:
    """Reference -> moving map ``x -> A (x - c) + c + t`` about the head centre."""
    matrix = np.asarray(matrix, dtype=np.float64).ravel().tolist()
    return sitk.AffineTransform(matrix, [float(v) for v in translation], HEAD_CENTER.tolist())


def fill(grid: sitk.Image, values: np.ndarray) -> sitk.Image:
    img = sitk.GetImageFromArray(values.astype(np.float32))
    img.CopyInformation(grid)
    return img


def make_pair(
    truth: sitk.AffineTransform,
    moving_spacing=(2.5, 2.5, 4.0),
    moving_size=(84, 88, 52),
    moving_direction: Optional[np.ndarray] = None,
    moving_shift=(6.0, -4.0, 3.0),
    noise: float = 0.02,
    seed: int = 0,
) -> Tuple[sitk.Image, sitk.Image]:
    """Reference (3 x 3 x 3.5 mm, 60 x 68 x 46) and moving volume (other contrast) with ``moving(T_true(x))
    = anatomy(x)``. The moving grid is centred near ``T_true(head centre)`` (+ ``moving_shift`` mm)."""
    rng = np.random.default_rng(seed)
    ref_grid = make_grid((60, 68, 46), (3.0, 3.0, 3.5), HEAD_CENTER + np.array([2.0, -3.0, 1.0]))
    reference = fill(ref_grid, anatomy(grid_points(ref_grid), "reference") + noise * rng.standard_normal(
        tuple(reversed(ref_grid.GetSize()))))
    center = np.asarray(truth.TransformPoint(HEAD_CENTER.tolist())) + np.asarray(moving_shift)
    mov_grid = make_grid(moving_size, moving_spacing, center, moving_direction)
    inverse = truth.GetInverse()
    q = grid_points(mov_grid).reshape(-1, 3)
    a = np.asarray(inverse.GetMatrix()).reshape(3, 3)
    c = np.asarray(inverse.GetCenter())
    p = (q - c) @ a.T + c + np.asarray(inverse.GetTranslation())
    values = anatomy(p, "moving").reshape(tuple(reversed(mov_grid.GetSize())))
    moving = fill(mov_grid, values + noise * rng.standard_normal(values.shape))
    return reference, moving


def head_mask(reference: sitk.Image) -> np.ndarray:
    """(z, y, x) bool: reference voxels inside the head (scalp ellipsoid)."""
    return _inside(grid_points(reference), STRUCTURES[1][0], STRUCTURES[1][1]) > 0.5


def endpoint_error(estimate: sitk.Transform, truth: sitk.Transform, reference: sitk.Image,
                   mask: Optional[np.ndarray] = None) -> Dict[str, float]:
    """Mean / max |T_est(x) - T_true(x)| (mm) over reference voxels in ``mask`` (default: the head)."""
    inside = head_mask(reference) if mask is None else mask
    fields = [
        sitk.GetArrayFromImage(sitk.TransformToDisplacementField(
            t, sitk.sitkVectorFloat64, reference.GetSize(), reference.GetOrigin(), reference.GetSpacing(),
            reference.GetDirection()))
        for t in (estimate, truth)
    ]
    error = np.linalg.norm(fields[0] - fields[1], axis=-1)[inside]
    return {"mean": float(error.mean()), "max": float(error.max())}


def phantom_affine(matrix: np.ndarray, translation, **kwargs) -> Tuple[sitk.AffineTransform, sitk.Image, sitk.Image]:
    truth = true_transform(matrix, translation)
    reference, moving = make_pair(truth, **kwargs)
    return truth, reference, moving


RIGID_ONLY = AffineSettings(affine=False)

# --------------------------------------------------------------------------------------------------------
# the acceptance case: 20 degrees / 40 mm, other (non-monotonic) contrast, anisotropic grids


@pytest.fixture(scope="module")
def acceptance():
    truth, reference, moving = phantom_affine(rotation_matrix([20.0, 0.0, 0.0]), [40.0, 0.0, 0.0])
    return truth, reference, moving, register_affine(reference, moving)


def test_20deg_40mm_offset_is_registered_below_1mm(acceptance):
    truth, reference, moving, result = acceptance
    before = endpoint_error(sitk.Transform(3, sitk.sitkIdentity), truth, reference)
    after = endpoint_error(result.transform, truth, reference)
    assert before["mean"] > 40.0  # the offset is really there
    assert after["mean"] <= 1.0, after  # the acceptance criterion (measured: about 0.1 mm)
    assert after["max"] <= 2.0, after
    assert endpoint_error(result.rigid, truth, reference)["mean"] <= 1.0
    assert result.stage_kept in ("rigid", "affine")
    assert result.metric["rigid"] < result.metric["initial"] - 0.5  # MI improved a lot (lower is better)
    # the rotation is found: 20 degrees about x, in the reported parameters
    assert result.parameters["rotation_angle_deg"] == pytest.approx(20.0, abs=0.5)


def test_result_warps_like_the_truth_and_is_json_ready(acceptance):
    truth, reference, moving, result = acceptance
    inside = head_mask(reference)
    expected = sitk.GetArrayFromImage(geometry.warp_image(moving, truth, reference))[inside]
    aligned = sitk.GetArrayFromImage(geometry.warp_image(moving, result.transform, reference))[inside]
    identity = sitk.Transform(3, sitk.sitkIdentity)
    unaligned = sitk.GetArrayFromImage(geometry.warp_image(moving, identity, reference))[inside]
    assert np.abs(aligned - expected).mean() < 0.1 * np.abs(unaligned - expected).mean()
    report = json.loads(json.dumps(result.to_dict()))
    assert report["stage_kept"] == result.stage_kept
    assert set(report["seconds"]) >= {"prepare", "starts", "rigid", "total"}
    assert len(report["parameters"]["matrix"]) == 3 and len(report["parameters"]["translation_mm"]) == 3


def test_30deg_60mm_offset_converges_and_initial_transform_is_included():
    axis = np.array([1.0, -1.0, 0.5]) / np.linalg.norm([1.0, -1.0, 0.5])
    matrix = np.asarray(sitk.VersorTransform(axis.tolist(), np.radians(30.0)).GetMatrix()).reshape(3, 3)
    truth, reference, moving = phantom_affine(matrix, (60.0 * np.array([-1.0, 1.0, -1.0]) / np.sqrt(3)).tolist())
    initial = geometry.initial_transform(reference, moving, "moments")
    result = register_affine(reference, moving, initial, settings=RIGID_ONLY)
    assert result.start == "initial"
    assert endpoint_error(initial, truth, reference)["mean"] > 20.0  # moments alone are far off
    error = endpoint_error(result.transform, truth, reference)
    assert error["mean"] <= 0.5, error  # measured: 0.04-0.17 mm over 6 random 30 deg / 60 mm cases (and at 45 deg)


def test_oblique_anisotropic_moving_grid():
    truth, reference, moving = phantom_affine(
        rotation_matrix([15.0, -10.0, 5.0]), [20.0, -15.0, 10.0],
        moving_spacing=(1.5, 1.5, 5.0), moving_size=(130, 140, 40),
        moving_direction=rotation_matrix([25.0, -15.0, 30.0]),
    )
    result = register_affine(reference, moving, settings=RIGID_ONLY)
    error = endpoint_error(result.transform, truth, reference)
    assert error["mean"] <= 0.5, error  # measured: 0.03 mm


def test_partial_fov_slab_is_not_stretched():
    # the moving volume is a 52 mm slab (13 x 4 mm), about 40 % of the head's height
    truth, reference, moving = phantom_affine(
        rotation_matrix([0.0, 0.0, 12.0]), [10.0, -15.0, 8.0], moving_size=(84, 88, 13))
    inside_slab = sitk.GetArrayFromImage(
        sitk.Resample(sitk.Cast(moving * 0 + 1, sitk.sitkUInt8), reference, truth, sitk.sitkNearestNeighbor, 0)
    ) > 0
    mask = inside_slab & head_mask(reference)
    assert 0.25 < mask.sum() / head_mask(reference).sum() < 0.6
    result = register_affine(reference, moving)
    error = endpoint_error(result.transform, truth, reference, mask)
    assert error["mean"] <= 1.0, error
    for params in (result.parameters, result.affine_parameters):  # the kept map and the affine stage's own
        assert all(0.97 <= v <= 1.03 for v in params["singular_values"]), params


def test_known_affine_is_recovered_by_the_affine_stage():
    shear_scale = np.array([[1.08, 0.05, 0.0], [0.0, 0.95, 0.03], [0.0, 0.0, 1.0]])
    truth, reference, moving = phantom_affine(rotation_matrix([6.0, 0.0, -5.0]) @ shear_scale, [8.0, -5.0, 4.0])
    result = register_affine(reference, moving)
    rigid_error = endpoint_error(result.rigid, truth, reference)["mean"]
    affine_error = endpoint_error(result.transform, truth, reference)["mean"]
    assert result.stage_kept == "affine"
    assert rigid_error > 3.0  # a rigid map cannot follow 8 % scaling and shear (measured: 5.4 mm)
    assert affine_error <= 1.2 and affine_error < 0.3 * rigid_error, (affine_error, rigid_error)  # measured: 0.7 mm
    true_sv = np.linalg.svd(np.asarray(truth.GetMatrix()).reshape(3, 3), compute_uv=False)
    np.testing.assert_allclose(result.parameters["singular_values"], true_sv, atol=0.025)
    # the same run with implausibly narrow scale bounds keeps the rigid result and says so
    guarded = register_affine(reference, moving, settings=AffineSettings(scale_bounds=(0.99, 1.01), samples=5000))
    assert guarded.stage_kept == "rigid"
    assert max(guarded.affine_parameters["singular_values"]) > 1.01
    assert endpoint_error(guarded.transform, truth, reference)["mean"] == pytest.approx(
        endpoint_error(guarded.rigid, truth, reference)["mean"])


# --------------------------------------------------------------------------------------------------------
# masks, cancel, files, errors


@pytest.fixture(scope="module")
def corrupted():
    """Half of the moving head (anatomical x > head centre + 5 mm) shows the anatomy displaced by 25 mm."""
    truth = true_transform(rotation_matrix([10.0, 5.0, -8.0]), [12.0, 10.0, -6.0])
    reference, moving = make_pair(truth)
    q = grid_points(moving)
    inverse = truth.GetInverse()
    a, c = np.asarray(inverse.GetMatrix()).reshape(3, 3), np.asarray(inverse.GetCenter())
    p = (q - c) @ a.T + c + np.asarray(inverse.GetTranslation())
    bad = p[..., 0] - HEAD_CENTER[0] > 5.0
    values = np.where(bad, anatomy(p + np.array([0.0, 25.0, 0.0]), "moving"), sitk.GetArrayFromImage(moving))
    moving_mask = fill(moving, (~bad).astype(np.float32))
    return truth, reference, fill(moving, values), sitk.Cast(moving_mask, sitk.sitkUInt8)


def test_user_masks_exclude_a_corrupted_region(corrupted):
    truth, reference, moving, moving_mask = corrupted
    def error(**masks) -> float:
        result = register_affine(reference, moving, settings=RIGID_ONLY, **masks)
        return endpoint_error(result.transform, truth, reference)["mean"]

    plain = error()
    masked = error(moving_mask=moving_mask)
    # a reference mask on another grid (2 x coarser, uint8 labels 0/7) excluding the same anatomy
    coarse = make_grid((30, 34, 23), (6.0, 6.0, 7.0), geometry.physical_center(reference))
    keep = (grid_points(coarse)[..., 0] - HEAD_CENTER[0] < -5.0).astype(np.float32) * 7
    reference_mask = sitk.Cast(fill(coarse, keep), sitk.sitkUInt8)
    by_reference = error(reference_mask=reference_mask)
    assert masked <= 1.0 and by_reference <= 1.0, (masked, by_reference)  # measured: 0.2 and 0.1 mm
    assert plain > 3.0 * max(masked, by_reference), (plain, masked, by_reference)  # measured: 26 mm


def test_cancel_raises_and_progress_is_reported(acceptance):
    _, reference, moving, _ = acceptance
    fractions, polls = [], [0]

    def cancel() -> bool:
        polls[0] += 1
        return polls[0] > 30

    with pytest.raises(CancelledError, match="cancelled by the user; nothing was written"):
        register_affine(reference, moving, cancel=cancel, progress=lambda f, m: fractions.append(f))
    assert polls[0] == 31  # polled every iteration, stopped at once
    assert fractions and all(0.0 <= f <= 1.0 for f in fractions)
    done: list = []
    register_affine(reference, moving, settings=RIGID_ONLY, progress=lambda f, m: done.append((f, m)))
    assert done[-1][0] == 1.0 and all(b[0] >= a[0] for a, b in zip(done, done[1:]))  # monotonic


@pytest.mark.parametrize("suffix", [".tfm", ".h5"])
def test_write_transform_round_trips(acceptance, tmp_path, suffix):
    _, reference, _, result = acceptance
    path = write_transform(result, tmp_path / f"affine{suffix}")
    back = sitk.ReadTransform(str(path))
    points = grid_points(reference).reshape(-1, 3)[::997]
    mapped = np.array([result.transform.TransformPoint(p.tolist()) for p in points])
    np.testing.assert_allclose([back.TransformPoint(p.tolist()) for p in points], mapped, atol=1e-6)
    assert np.abs(mapped - points).max() > 10.0  # a real (non-identity) map was compared
    if suffix == ".tfm":
        assert "AffineTransform_double_3_3" in path.read_text()
    with pytest.raises(ValueError, match="extension"):
        write_transform(result, tmp_path / "affine.nii")


def test_slicer_reads_the_file_as_the_resampling_transform(acceptance, tmp_path):
    """Slicer loads the .tfm as a linear transform node whose from-parent (RAS) is F T F, and resampling the
    moving volume placed under that node gives the same aligned volume as the core."""
    slicer = pytest.importorskip("slicer")
    from vtkmodules.util import numpy_support

    from UniFuseSlicerLib import volumes

    _, reference, moving, result = acceptance
    path = write_transform(result, tmp_path / "affine.tfm")
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    storage = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    flip = np.diag([-1.0, -1.0, 1.0])
    for x in grid_points(reference).reshape(-1, 3)[::4001]:
        from_parent = np.asarray(node.GetTransformFromParent().TransformPoint(*(flip @ x)))
        expected = flip @ np.asarray(result.transform.TransformPoint(x.tolist()))
        np.testing.assert_allclose(from_parent, expected, atol=1e-6)
    moving_node = volumes.image_to_volume_node(moving, scene, "moving")
    reference_node = volumes.image_to_volume_node(reference, scene, "reference")
    moving_node.SetAndObserveTransformNodeID(node.GetID())
    output = slicer.vtkSlicerVolumesLogic.ResampleVolumeToReferenceVolume(moving_node, reference_node)
    nx, ny, nz = output.GetImageData().GetDimensions()
    in_slicer = numpy_support.vtk_to_numpy(output.GetImageData().GetPointData().GetScalars()).reshape(nz, ny, nx)
    core = sitk.GetArrayFromImage(geometry.warp_image(moving, result.transform, reference))
    inside = head_mask(reference)
    assert np.abs(in_slicer[inside] - core[inside]).max() < 1e-3


def test_single_thread_runs_are_identical(acceptance):
    _, reference, moving, _ = acceptance
    settings = AffineSettings(affine=False, threads=1)
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    first = register_affine(reference, moving, settings=settings)
    second = register_affine(reference, moving, settings=settings)
    assert first.transform.GetParameters() == second.transform.GetParameters()
    assert first.metric == second.metric
    assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == previous  # restored


def test_input_errors_name_the_problem(acceptance):
    _, reference, moving, _ = acceptance
    with pytest.raises(InputImageError, match="3D scalar"):
        register_affine(reference[:, :, 10], moving)
    empty = sitk.Cast(reference * 0, sitk.sitkUInt8)
    with pytest.raises(InputImageError, match="reference mask leaves"):
        register_affine(reference, moving, reference_mask=empty)
    far = sitk.Image(moving)
    far.SetOrigin((np.asarray(moving.GetOrigin()) + 5000.0).tolist())
    with pytest.raises(GeometryError):
        register_affine(reference, far, settings=AffineSettings(try_moments=False))
