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
from unifuse.errors import DeviceError, OutputExistsError, UniFuseError
from unifuse.model import UniFuseOutput
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


class KnownFieldNet(torch.nn.Module):
    """Test double with UniFuse's interface that returns a prescribed field and fuses by averaging."""

    def __init__(self, u_vox: np.ndarray, probs=(0.1, 0.7, 0.1, 0.1)):
        super().__init__()
        self.register_buffer("u", torch.as_tensor(u_vox, dtype=torch.float32)[None])
        self.register_buffer("p", torch.tensor([probs]))
        self.seen = {}

    def forward(self, reference, moving, degradation=None):
        self.seen = {"reference": reference.clone(), "moving": moving.clone(), "degradation": degradation}
        from unifuse.spatial import warp

        aligned = warp(moving, self.u)
        n = self.p.shape[1]
        return UniFuseOutput(
            fused=(reference + aligned) / 2, displacement=self.u.clone(), aligned=aligned,
            logits=self.p.log(), probs=self.p.clone(), prompt=torch.zeros(1, n, 1, 1),
            tokens_ref=torch.zeros(1, 1, 1), tokens_mov=torch.zeros(1, 1, 1),
            dapl_states=(torch.zeros(1, 1, 1),) * 3,
        )


def _loaded(u_vox, size):
    return LoadedModel(KnownFieldNet(u_vox), tiny().replace(working_size=size), "known-field", True, "test", {})


def _working_field(reference: sitk.Image, size: int, displacement_mm) -> np.ndarray:
    """The working-grid voxel field (3, S, S, S), channels (x, y, z), of a physical LPS-mm field U(x)."""
    grid = geometry.working_grid(reference, size)
    s = size
    idx = np.stack(np.meshgrid(np.arange(s), np.arange(s), np.arange(s), indexing="ij"), -1).reshape(-1, 3)
    d = np.array(grid.GetDirection()).reshape(3, 3)
    pts = np.array(grid.GetOrigin()) + (idx * np.array(grid.GetSpacing())) @ d.T
    u_mm = displacement_mm(pts)
    u_vox = (u_mm @ d) / np.array(grid.GetSpacing())  # D^T u / spacing
    return u_vox.reshape(s, s, s, 3).transpose(3, 2, 1, 0)  # (x,y,z) channels, (z,y,x) arrays


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

    size = 32
    loaded = _loaded(_working_field(reference, size, forward_map), size)
    result = fuse(reference, moving, device="cpu", model=loaded, working_size=size)

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


def test_network_sees_normalised_inputs_on_the_working_grid():
    reference = _image(**REF_GEOM, fn=lambda p: 1000 * _blobs(p) + 50)
    moving = _image(**MOV_GEOM, fn=lambda p: 3 * _blobs(p))
    net = KnownFieldNet(np.zeros((3, 16, 16, 16), np.float32))
    fuse(reference, moving, device="cpu", model=LoadedModel(net, tiny(), "known", True, "test", {}), working_size=16)
    for key in ("reference", "moving"):
        x = net.seen[key]
        assert x.shape == (1, 1, 16, 16, 16) and x.dtype == torch.float32
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.max()) > 0.9


def test_degradation_override_reaches_the_network_and_report():
    reference = _image(**REF_GEOM, fn=_blobs)
    moving = _image(**MOV_GEOM, fn=_blobs)
    net = KnownFieldNet(np.zeros((3, 16, 16, 16), np.float32))
    loaded = LoadedModel(net, tiny(), "known", True, "test", {})
    auto = fuse(reference, moving, device="cpu", model=loaded, working_size=16)
    assert auto.degradation == "motion" and net.seen["degradation"] is None
    assert set(auto.probabilities) == set(DEGRADATION_CLASSES)
    forced = fuse(reference, moving, degradation="lowdose", device="cpu", model=loaded, working_size=16)
    assert forced.degradation == "lowdose"
    assert int(net.seen["degradation"][0]) == DEGRADATION_CLASSES.index("lowdose")
    assert forced.report["degradation"]["predicted"] == "motion"
    with pytest.raises(UniFuseError, match="unknown degradation"):
        fuse(reference, moving, degradation="blurry", device="cpu", model=loaded, working_size=16)


def test_untrained_network_runs_end_to_end_and_says_so(tmp_path):
    reference = _image(**REF_GEOM, fn=_blobs)
    moving = _image(**MOV_GEOM, fn=_blobs)
    calls = []
    result = fuse(reference, moving, device="cpu", config="tiny", progress=lambda f, m: calls.append((f, m)))
    assert result.report["model"]["trained"] is False
    assert "UNTRAINED" in result.report["warning"]
    assert result.report["device"].startswith("cpu")
    assert set(result.report["timings_s"]) >= {"read", "load_model", "prepare", "network", "warp", "maps", "total"}
    fractions = [f for f, _ in calls]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    paths = result.save(tmp_path / "out dir ü")
    assert sorted(p.name for p in paths.values()) == sorted([*OUTPUT_FILES.values(), REPORT_FILE])
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


def test_unavailable_cuda_and_bad_working_size_are_clear_errors():
    reference = _image(**REF_GEOM, fn=_blobs)
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="--device cpu"):
            fuse(reference, reference, device="cuda", config="tiny")
    with pytest.raises(UniFuseError, match="multiple of"):
        fuse(reference, reference, device="cpu", config="tiny", working_size=18)
