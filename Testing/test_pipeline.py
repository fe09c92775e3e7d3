"""The inference pipeline end to end, with geometry proven independently of learned weights.

A "known-field" network (a test double that returns a prescribed displacement) is pushed through
``unifuse.fuse``: the moving volume is made from the reference by a known physical transform, the double
returns the working-grid field that undoes it, and the pipeline must recover the reference (aligned) and the
exact physical displacement — on anisotropic, oblique grids with reference and moving on different grids.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import unifuse
from unifuse import geometry
from unifuse.config import DEGRADATION_CLASSES, tiny
from unifuse.errors import DeviceError, InputImageError, OutputExistsError, UniFuseError
from network_doubles import FieldNet
from unifuse import stages
from unifuse.guard import REFINE_MIN_GAIN
from unifuse.pipeline import OUTPUT_FILES, REPORT_FILE, LoadedModel, fuse


def _image(size, spacing, origin, direction, fn) -> sitk.Image:
    """Scalar image whose voxel values are fn(physical LPS points (…, 3))."""
    img = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in size], indexing="ij"), -1).reshape(-1, 3)  # (i, j, k)
    d = np.array(direction).reshape(3, 3)
    pts = np.array(origin) + (idx * np.array(spacing)) @ d.T
    vals = fn(pts).reshape(size).transpose(2, 1, 0)  # -> (z, y, x)
    out = sitk.GetImageFromArray(vals.astype(np.float32))
    out.CopyInformation(img)
    return out


def _rot(axis, deg):
    t = np.radians(deg)
    c, s = np.cos(t), np.sin(t)
    m = {"z": [[c, -s, 0], [s, c, 0], [0, 0, 1]], "y": [[c, 0, s], [0, 1, 0], [-s, 0, c]], "x": [[1, 0, 0], [0, c, -s], [0, s, c]]}
    return np.array(m[axis])


CENTRE = np.array([3.0, -4.0, 5.0])


def _blobs(pts: np.ndarray) -> np.ndarray:
    """A smooth, asymmetric phantom (three Gaussian blobs) defined in physical LPS mm."""
    out = np.zeros(len(pts))
    for c, w, a in [((0, 0, 0), 9.0, 1.0), ((8, 3, -4), 5.0, 0.7), ((-6, -5, 6), 4.0, 0.5)]:
        out += a * np.exp(-(((pts - CENTRE - np.array(c)) ** 2).sum(-1)) / (2 * w**2))
    return out


OBLIQUE = tuple((_rot("z", 20) @ _rot("x", 15)).ravel())
REF_GEOM = dict(size=(30, 26, 22), spacing=(1.5, 1.7, 2.2), origin=(-20.0, -18.0, -17.0), direction=OBLIQUE)
MOV_GEOM = dict(size=(24, 28, 20), spacing=(2.0, 1.6, 2.4), origin=(-21.0, -26.0, -17.0),
                direction=tuple((_rot("y", -10)).ravel()))


SPACING = 2.0  # working-grid spacing (mm) of these tests


def _grid(reference: sitk.Image, moving: sitk.Image) -> sitk.Image:
    """The working grid the pipeline chooses for header geometry only (affine off) at SPACING."""
    choice = stages.plan_working_grid(reference, moving, [sitk.Transform(3, sitk.sitkIdentity)], SPACING,
                                      tiny().size_multiple, lambda v: 0, 1)
    return choice.grid


def _working_field(grid: sitk.Image, displacement_mm) -> np.ndarray:
    """The working-grid voxel field (3, D, H, W), channels (x, y, z), of a physical LPS-mm field U(x)."""
    size = grid.GetSize()
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in size], indexing="ij"), -1).reshape(-1, 3)
    d = np.array(grid.GetDirection()).reshape(3, 3)
    pts = np.array(grid.GetOrigin()) + (idx * np.array(grid.GetSpacing())) @ d.T
    u_vox = (displacement_mm(pts) @ d) / np.array(grid.GetSpacing())  # D^T u / spacing
    return u_vox.reshape(*size, 3).transpose(3, 2, 1, 0).astype(np.float32)  # (x,y,z) channels, (z,y,x) arrays


def _loaded(net) -> LoadedModel:
    return LoadedModel(net, tiny(), "double", True, "test", {})


#: Only header geometry and the network's field: the geometry of the pipeline, without the registrations.
GEOMETRY_ONLY = dict(affine="none", refine="none", guard=False, spacing_mm=SPACING)


def _interior(img: sitk.Image, margin=4) -> np.ndarray:
    a = sitk.GetArrayFromImage(img)
    return a[margin:-margin, margin:-margin, margin:-margin]


@pytest.mark.parametrize("kind", ["translation", "rotation", "smooth"])
def test_known_field_recovers_reference_on_oblique_anisotropic_grids(kind):
    rot = _rot("z", 15) @ _rot("y", -10)  # about the LPS origin, ~7 mm from the phantom's centre
    t = np.array([4.0, -3.0, 2.5])

    def forward_map(x):  # U(x): aligned(x) = moving(x + U(x))
        if kind == "translation":
            return np.broadcast_to(t, x.shape).copy()
        if kind == "rotation":
            return x @ rot.T - x
        return 3.0 * np.stack([np.sin(x[:, 1] / 9.0), np.cos(x[:, 2] / 11.0), np.sin(x[:, 0] / 10.0)], -1)

    reference = _image(**REF_GEOM, fn=_blobs)
    if kind == "translation":
        moving_fn = lambda y: _blobs(y - t)  # noqa: E731
    elif kind == "rotation":
        moving_fn = lambda y: _blobs(y @ rot)  # noqa: E731  f(R^T y)
    else:
        # invert y = x + U(x) numerically by fixed-point iteration x = y - U(x)
        def moving_fn(y):
            x = y.copy()
            for _ in range(50):
                x = y - forward_map(x)
            return _blobs(x)
    moving = _image(**MOV_GEOM, fn=moving_fn)
    ref_before = sitk.GetArrayFromImage(reference).copy()
    mov_before = sitk.GetArrayFromImage(moving).copy()

    u_vox = torch.from_numpy(_working_field(_grid(reference, moving), forward_map))[None]
    result = fuse(reference, moving, device="cpu", model=_loaded(FieldNet(lambda fixed: u_vox)), **GEOMETRY_ONLY)

    # inputs untouched
    assert np.array_equal(sitk.GetArrayFromImage(reference), ref_before)
    assert np.array_equal(sitk.GetArrayFromImage(moving), mov_before)
    # outputs on the reference grid
    for img in (result.fused, result.aligned, result.displacement, result.jacobian, result.error_map):
        assert img.GetSize() == reference.GetSize()
        assert np.allclose(img.GetSpacing(), reference.GetSpacing())
        assert np.allclose(img.GetDirection(), reference.GetDirection())
        assert np.allclose(img.GetOrigin(), reference.GetOrigin())
    # the physical displacement equals the prescribed map (up to the working grid's trilinear sampling)
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in reference.GetSize()], indexing="ij"), -1).reshape(-1, 3)
    d = np.array(reference.GetDirection()).reshape(3, 3)
    pts = np.array(reference.GetOrigin()) + (idx * np.array(reference.GetSpacing())) @ d.T
    expected = forward_map(pts).reshape(*reference.GetSize(), 3).transpose(2, 1, 0, 3)
    got = sitk.GetArrayFromImage(result.displacement)
    err = np.linalg.norm(got - expected, axis=-1)[3:-3, 3:-3, 3:-3]
    assert err.mean() < 0.05 and err.max() < 0.6, (err.mean(), err.max())
    # aligned moving ≈ reference on the phantom (up to trilinear interpolation of the coarse moving grid)
    ref_in = _interior(reference)
    on_phantom = ref_in > 0.05
    diff = np.abs(_interior(result.aligned) - ref_in)[on_phantom]
    before = np.abs(_interior(geometry.resample(moving, reference)) - ref_in)[on_phantom]
    assert diff.mean() < 0.15 * before.mean(), (diff.mean(), before.mean())
    assert diff.max() < 0.12
    # rigid maps keep volume: det J ≈ 1; nothing folds
    jac = _interior(result.jacobian)
    if kind != "smooth":
        assert np.allclose(jac, 1.0, atol=0.02)
    assert (jac > 0).all()
    assert result.report["error_map_mean"]["after"] < result.report["error_map_mean"]["before"]


def test_network_sees_normalised_inputs_on_the_mm_working_grid():
    reference = _image(**REF_GEOM, fn=lambda p: 1000 * _blobs(p) + 50)
    moving = _image(**MOV_GEOM, fn=lambda p: 3 * _blobs(p))
    net = FieldNet()
    result = fuse(reference, moving, device="cpu", model=_loaded(net), **GEOMETRY_ONLY)
    grid = _grid(reference, moving)
    shape = tuple(reversed(grid.GetSize()))
    assert result.report["working_grid"]["size"] == list(grid.GetSize())
    assert result.report["working_grid"]["spacing_mm"] == [SPACING] * 3
    assert all(s % tiny().size_multiple == 0 for s in shape)
    for key in ("reference", "moving"):
        x = net.seen[key]
        assert x.shape == (1, 1, *shape) and x.dtype == torch.float32
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.max()) > 0.9


def test_degradation_override_reaches_the_network_and_report():
    reference = _image(**REF_GEOM, fn=_blobs)
    moving = _image(**MOV_GEOM, fn=_blobs)
    net = FieldNet()
    loaded = _loaded(net)
    auto = fuse(reference, moving, device="cpu", model=loaded, **GEOMETRY_ONLY)
    deg = auto.report["degradation"]
    # the shipped calibration decides from the physical evidence alone (it does not combine the shipped
    # weights' classifier, docs/network.md); the network's own probabilities are reported, and the calibrated
    # result is what the network mixes its prompts and LoRA experts with
    assert deg["network_probabilities"] == pytest.approx({"none": 0.1, "motion": 0.7, "metal": 0.1, "lowdose": 0.1})
    assert deg["decision"]["used_network"] is False and "does not combine" in deg["note"]
    assert set(auto.probabilities) == set(DEGRADATION_CLASSES) and sum(auto.probabilities.values()) == pytest.approx(1)
    assert deg["mixture"] == pytest.approx(auto.probabilities)
    assert net.seen["degradation"].tolist() == [[pytest.approx(auto.probabilities[c]) for c in DEGRADATION_CLASSES]]
    assert auto.degradation == max(auto.probabilities, key=auto.probabilities.get)
    forced = fuse(reference, moving, degradation="lowdose", device="cpu", model=loaded, **GEOMETRY_ONLY)
    assert forced.degradation == "lowdose"
    assert int(net.seen["degradation"][0]) == DEGRADATION_CLASSES.index("lowdose")
    assert forced.report["degradation"]["predicted"] == auto.degradation
    assert forced.report["degradation"]["mixture"]["lowdose"] == 1.0
    with pytest.raises(UniFuseError, match="unknown degradation"):
        fuse(reference, moving, degradation="blurry", device="cpu", model=loaded)
    assert deg["moving_modality"] == {"requested": "auto", "stated": "auto", "used": "mr_or_pet",
                                      "source": "measured (HU scale: CT or not)"}


def test_stated_moving_modality_reaches_the_decision_and_report():
    reference = _image(**REF_GEOM, fn=_blobs)
    moving = _image(**MOV_GEOM, fn=_blobs)
    loaded = _loaded(FieldNet())
    pet = fuse(reference, moving, moving_modality="pet", device="cpu", model=loaded, **GEOMETRY_ONLY)
    deg = pet.report["degradation"]
    assert deg["moving_modality"] == {"requested": "pet", "stated": "pet", "used": "pet", "source": "user"}
    assert deg["decision"]["model"] == "evidence+modality"
    assert pet.probabilities["motion"] < 1e-9 and pet.probabilities["metal"] < 1e-9  # not in a PET
    assert deg["mixture"] == pytest.approx(pet.probabilities)
    moving.SetMetaData("0008|0060", "MR")  # what io.read_image keeps from a DICOM series
    mr = fuse(reference, moving, device="cpu", model=loaded, **GEOMETRY_ONLY)
    assert mr.report["degradation"]["moving_modality"]["source"] == "DICOM header"
    assert mr.probabilities["lowdose"] < 1e-9 and mr.probabilities["metal"] < 1e-9
    with pytest.raises(UniFuseError, match="unknown moving modality"):
        fuse(reference, moving, moving_modality="xray", device="cpu", model=loaded)
    with pytest.raises(InputImageError, match="stated to be a CT"):  # not HU: the user's statement is refused
        fuse(reference, moving, moving_modality="ct", device="cpu", model=loaded, **GEOMETRY_ONLY)
    moving.SetMetaData("0008|0060", "CT")  # a header that contradicts the voxels is only noted
    ct = fuse(reference, moving, device="cpu", model=loaded, **GEOMETRY_ONLY)
    assert ct.report["degradation"]["moving_modality"]["source"] == "measured (DICOM header contradicted)"
    assert any("DICOM header says" in n for n in ct.report["notes"])


def test_untrained_network_runs_every_stage_end_to_end_and_says_so(tmp_path):
    reference = _image(**REF_GEOM, fn=_blobs)
    moving = _image(**MOV_GEOM, fn=_blobs)
    calls = []
    result = fuse(reference, moving, device="cpu", config="tiny", spacing_mm=SPACING, refine="fast",
                  progress=lambda f, m: calls.append((f, m)))
    report = result.report
    assert report["model"]["trained"] is False
    assert any("UNTRAINED" in w for w in report["warnings"])
    assert report["device"].startswith("cpu")
    names = [s["name"] for s in report["stages"]]
    assert names == ["read", "degradation_evidence", "load_model", "header", "affine", "working_grid", "network", "refine", "warp",
                     "fusion", "maps"]
    assert set(report["timings_s"]) == {*names, "total"}
    for name in ("affine", "network", "refine"):
        stage = report["alignment"]["stages"][name]
        assert isinstance(stage["kept"], bool) and stage["score"] >= 0.0
    refine = next(s for s in report["stages"] if s["name"] == "refine")  # judged with the larger margin
    assert refine["details"]["min_gain"] == REFINE_MIN_GAIN
    assert refine["kept"] == (refine["score"] < refine["previous_score"] * (1.0 - REFINE_MIN_GAIN))
    fractions = [f for f, _ in calls]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    paths = result.save(tmp_path / "out dir ü")
    assert {p.name for p in paths.values()} >= {*OUTPUT_FILES.values(), REPORT_FILE}
    assert all(p.is_file() for p in paths.values())
    assert not [p for p in (tmp_path / "out dir ü").iterdir() if p.name.startswith(".unifuse-partial")]
    back = sitk.ReadImage(str(paths["displacement"]))
    assert back.GetNumberOfComponentsPerPixel() == 3
    with pytest.raises(OutputExistsError, match="overwrite"):
        result.save(tmp_path / "out dir ü")
    result.save(tmp_path / "out dir ü", overwrite=True)


def test_cancel_stops_before_any_output():
    reference = _image(**REF_GEOM, fn=_blobs)
    with pytest.raises(unifuse.errors.CancelledError):
        fuse(reference, reference, device="cpu", config="tiny", cancel=lambda: True)


def test_unavailable_cuda_and_bad_spacing_are_clear_errors():
    reference = _image(**REF_GEOM, fn=_blobs)
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="--device cpu"):
            fuse(reference, reference, device="cuda", config="tiny")
    for bad in (0, -1.0, 1e5, float("nan")):
        with pytest.raises(UniFuseError, match="spacing"):
            fuse(reference, reference, device="cpu", config="tiny", spacing_mm=bad)


def test_fusion_runs_on_the_reference_grid_or_at_the_cap():
    reference = _image(**REF_GEOM, fn=_blobs)
    moving = _image(**MOV_GEOM, fn=_blobs)
    net = FieldNet()
    result = fuse(reference, moving, device="cpu", model=_loaded(net), map_back=False, **GEOMETRY_ONLY)
    details = next(s for s in result.report["stages"] if s["name"] == "fusion")["details"]
    assert details["grid_size"] == list(reference.GetSize())
    # the double fuses by averaging: on the reference grid that is exactly (reference + aligned) / 2 in [0, 1]
    norm_r = stages.normalization(reference, "r")[0]
    norm_m = stages.normalization(moving, "m")[0]
    expected = (norm_r.apply(sitk.GetArrayFromImage(reference)) + norm_m.apply(sitk.GetArrayFromImage(result.aligned))) / 2
    assert np.abs(sitk.GetArrayFromImage(result.fused) - expected).max() < 1e-5
    capped = fuse(reference, moving, device="cpu", model=_loaded(FieldNet()), fusion_spacing_mm=3.0, **GEOMETRY_ONLY)
    details = next(s for s in capped.report["stages"] if s["name"] == "fusion")["details"]
    assert min(details["grid_spacing_mm"]) >= 3.0 - 1e-6 and details["grid_size"] != list(reference.GetSize())
    assert capped.fused.GetSize() == reference.GetSize() and capped.fused.GetSpacing() == reference.GetSpacing()
    for bad in (0, 0.1, float("inf"), True):
        with pytest.raises(UniFuseError, match="fusion spacing"):
            fuse(reference, reference, device="cpu", config="tiny", fusion_spacing_mm=bad)


def test_spacing_finer_than_the_reference_is_raised_to_it_and_said():
    reference = _image(**REF_GEOM, fn=_blobs)
    result = fuse(reference, reference, device="cpu", model=_loaded(FieldNet()), **{**GEOMETRY_ONLY, "spacing_mm": 0.5})
    assert result.report["working_grid"]["spacing_mm"] == [1.5] * 3
    assert any("raised from 0.5 mm" in n for n in result.report["notes"])


def _damaging_field(fixed: torch.Tensor) -> torch.Tensor:
    """A smooth field of ~3 working-grid voxels (6 mm) that scrambles an aligned pair."""
    d, h, w = fixed.shape[2:]
    z, y, x = torch.meshgrid(torch.arange(d), torch.arange(h), torch.arange(w), indexing="ij")
    u = torch.stack([3 * torch.sin(y / 2.0), 3 * torch.cos(z / 2.5), 3 * torch.sin(x / 2.2)]).float()
    return u[None]


def test_guard_rejects_a_stage_that_damages_the_alignment_and_says_so():
    reference = _image(**REF_GEOM, fn=_blobs)
    moving = _image(**MOV_GEOM, fn=lambda p: 1.0 - 0.8 * _blobs(p))  # aligned by header, other contrast
    net = FieldNet(_damaging_field)
    options = dict(affine="none", refine="none", spacing_mm=SPACING, device="cpu")
    guarded = fuse(reference, moving, model=_loaded(net), **options)
    stage = guarded.report["alignment"]["stages"]["network"]
    assert stage["kept"] is False and stage["score"] > stage["previous_score"]
    assert guarded.report["alignment"]["final_stage"] == "header"
    # the result is the previous stage's: header geometry, no displacement, and the fusion used no field
    assert np.abs(sitk.GetArrayFromImage(guarded.displacement)).max() < 1e-4
    assert float(net.fused_with.abs().max()) == 0.0
    assert any("not better than the header geometry" in w for w in guarded.report["warnings"])
    # without the guard the damaging field is kept (and the pipeline still warns: nothing improved the score)
    unguarded = fuse(reference, moving, model=_loaded(net), guard=False, **options)
    assert unguarded.report["alignment"]["stages"]["network"]["kept"] is True
    assert np.abs(sitk.GetArrayFromImage(unguarded.displacement)).max() > 3.0


def test_guard_keeps_a_field_that_repairs_the_alignment():
    t = np.array([4.0, -3.0, 2.5])
    reference = _image(**REF_GEOM, fn=_blobs)
    moving = _image(**MOV_GEOM, fn=lambda y: 1.0 - 0.8 * _blobs(y - t))
    u = torch.from_numpy(_working_field(_grid(reference, moving), lambda x: np.broadcast_to(t, x.shape).copy()))[None]
    result = fuse(reference, moving, model=_loaded(FieldNet(lambda fixed: u)), affine="none", refine="none",
                  spacing_mm=SPACING, device="cpu")
    stage = result.report["alignment"]["stages"]["network"]
    assert stage["kept"] is True and stage["score"] < 0.9 * stage["previous_score"]
    assert result.report["alignment"]["final_stage"] == "network"
    assert "warnings" not in result.report


def test_restored_output_and_nothing_to_restore_when_the_degradation_is_none():
    reference = _image(**REF_GEOM, fn=_blobs)
    moving = _image(**MOV_GEOM, fn=_blobs)
    options = dict(device="cpu", config="tiny", affine="none", spacing_mm=SPACING)
    motion = fuse(reference, moving, degradation="motion", **options)  # tiny has the restoration output
    assert motion.restored is not None and motion.restored.GetSize() == reference.GetSize()
    assert motion.report["restored"] == "moving units"
    assert any("restored.nii.gz" in n and "not verified" in n for n in motion.report["notes"])  # the user is told
    assert not np.allclose(sitk.GetArrayFromImage(motion.restored), sitk.GetArrayFromImage(motion.aligned))
    clean = fuse(reference, moving, degradation="none", **options)
    assert "unchanged" in clean.report["restored"]
    assert not any("restored.nii.gz" in n for n in clean.report["notes"])
    assert np.array_equal(sitk.GetArrayFromImage(clean.restored), sitk.GetArrayFromImage(clean.aligned))


def test_guard_falls_back_to_the_rigid_step_when_the_affine_step_is_worse(monkeypatch):
    from unifuse import pipeline
    from unifuse.registration.affine import AffineResult

    t = np.array([4.0, -3.0, 2.5])
    reference = _image(**REF_GEOM, fn=_blobs)
    moving = _image(**MOV_GEOM, fn=lambda y: 1.0 - 0.8 * _blobs(y - t))  # moving(x + t) shows reference(x)
    rigid = sitk.TranslationTransform(3, t.tolist())
    bad = sitk.AffineTransform(3)  # an affine step that went astray: scaled and shifted the wrong way
    bad.SetMatrix((1.3, 0, 0, 0, 0.8, 0, 0, 0, 1.25))
    bad.SetCenter(CENTRE.tolist())
    bad.SetTranslation((-t).tolist())

    def register(reference, moving, initial, **kwargs):
        return AffineResult(transform=bad, rigid=rigid, stage_kept="affine", start="header", metric={},
                            iterations={}, seconds={}, parameters={})

    monkeypatch.setattr(pipeline, "register_affine", register)
    options = dict(network=False, refine="none", spacing_mm=SPACING, device="cpu")
    result = fuse(reference, moving, model=_loaded(FieldNet()), **options)
    stage = result.report["alignment"]["stages"]["affine"]
    assert stage["kept"] is True and stage["score"] < 0.9 * stage["previous_score"]
    assert result.report["global_transform"]["step"] == "rigid"
    assert next(s for s in result.report["stages"] if s["name"] == "affine")["details"]["guard_kept_step"] == "rigid"
    assert any("affine step made the alignment score worse" in n and "rigid step" in n for n in result.report["notes"])
    np.testing.assert_allclose(result.global_transform.TransformPoint(CENTRE.tolist()), CENTRE + t, atol=1e-6)
    assert "warnings" not in result.report
    # without the guard the affine step is kept as it came
    unguarded = fuse(reference, moving, model=_loaded(FieldNet()), guard=False, **options)
    assert unguarded.report["global_transform"]["step"] == "affine"
