"""Scale: memory budget, working-size choice, out-of-memory fallback, reduced error-map grid.

The large-volume behaviour is tested with small volumes and a mocked memory budget (the logic is the same);
the real 512x512x600 CT case was measured once and is documented in docs/troubleshooting.md. CUDA
out-of-memory is tested on the CPU with a test double whose forward raises ``torch.cuda.OutOfMemoryError``
above a working size.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unifuse import geometry, pipeline, resources
from unifuse.config import get_config, tiny
from unifuse.errors import InsufficientMemoryError
from unifuse.model import UniFuseOutput
from unifuse.pipeline import LoadedModel, fuse, network_attempts, run_with_fallback

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # only a label here: the fakes below never allocate on it


def _blob_image(size=(22, 20, 18), spacing=(1.6, 1.5, 2.0), origin=(-15.0, -14.0, -16.0), shift=0.0) -> sitk.Image:
    z, y, x = np.meshgrid(*[np.arange(s) for s in size[::-1]], indexing="ij")
    c = np.array(size[::-1]) / 2.0
    arr = 5 + 100 * np.exp(-(((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2] - shift) ** 2) / 20.0))
    img = sitk.GetImageFromArray(arr.astype(np.float32))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    return img


def _box_corners_in(grid: sitk.Image, image: sitk.Image) -> np.ndarray:
    """Continuous indices, in ``grid``, of the 8 corners of ``image``'s voxel-extent box."""
    size = np.asarray(image.GetSize(), dtype=np.float64)
    corners = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)]) * size - 0.5
    pts = (np.c_[corners, np.ones(8)] @ geometry.ijk_to_lps_matrix(image).T)[:, :3]
    return (np.c_[pts, np.ones(8)] @ geometry.lps_to_ijk_matrix(grid).T)[:, :3]


def _covers(grid: sitk.Image, image: sitk.Image, tol=1e-6) -> bool:
    idx = _box_corners_in(grid, image)
    return bool(np.all(idx >= -0.5 - tol) and np.all(idx <= np.asarray(grid.GetSize()) - 0.5 + tol))


# --------------------------------------------------------------------------------------------------------
# free memory and estimates


def test_available_ram_matches_proc_meminfo():
    with open("/proc/meminfo") as fh:
        info = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in fh}
    free = resources.available_memory_bytes("cpu")
    assert 0 < free <= info["MemTotal"]
    assert abs(free - info["MemAvailable"]) < 1 << 30  # the same quantity, read moments apart


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_available_cuda_memory_is_the_free_device_memory():
    free, total = torch.cuda.mem_get_info()
    assert 0 < resources.available_memory_bytes("cuda") <= total
    assert resources.available_memory_bytes("cuda:0") >= free * 0.9


def test_network_estimate_grows_with_size_and_width_and_bounds_a_measurement():
    cfg = get_config("default")
    sizes = [16, 32, 64, 128, 256]
    est = [resources.estimate_network_bytes(cfg, s) for s in sizes]
    assert est == sorted(est) and est[0] >= resources.NETWORK_FIXED_BYTES
    # the calibrated slope: 128³ -> 256³ adds 7 x 128³ voxels at 74 B per voxel and channel (8 channels)
    assert est[4] - est[3] == pytest.approx(74 * 8 * 7 * 128**3, rel=1e-6)
    assert resources.estimate_network_bytes(get_config("paper"), 64) > est[2]  # 32 full-resolution channels
    measured = resources.measure_network_peak_bytes(tiny(), 32)
    assert 0 < measured <= resources.estimate_network_bytes(tiny(), 32)


def test_reference_stage_estimate_caps_the_error_map_term():
    est = resources.estimate_reference_stage_bytes
    cap = resources.ERROR_MAP_MAX_VOXELS
    per_voxel_small = (est(200**3, 0) - est(100**3, 0)) / (200**3 - 100**3)
    per_voxel_large = (est(cap + 10**6, 0) - est(cap, 0)) / 10**6
    assert per_voxel_small == pytest.approx(resources.REFERENCE_BYTES_PER_VOXEL + resources.ERROR_MAP_BYTES_PER_VOXEL)
    assert per_voxel_large == pytest.approx(resources.REFERENCE_BYTES_PER_VOXEL)
    # the measured 512x512x600 case (7.4 GB peak) is covered, without refusing it on a 16 GB machine
    assert 7.4e9 < est(512 * 512 * 600, 256 * 256 * 300) < 12e9


# --------------------------------------------------------------------------------------------------------
# working-size choice


def test_choose_working_size_keeps_the_request_when_it_fits_and_reduces_otherwise():
    cfg = get_config("default")  # size_multiple 8
    big = resources.choose_working_size(cfg, 64, 64 * resources.GiB)
    assert (big.size, big.reduced, big.fits, big.message) == (64, False, True, "")
    budget = resources.estimate_network_bytes(cfg, 48) + 1
    mid = resources.choose_working_size(cfg, 64, budget)
    assert mid.size == 48 and mid.reduced and mid.fits
    assert resources.estimate_network_bytes(cfg, 56) > budget
    assert "reduced from 64³ to 48³" in mid.message and "whole field of view" in mid.message
    low = resources.choose_working_size(cfg, 64, 1)
    assert low.size == resources.min_working_size(cfg) == 16 and not low.fits
    assert "trying anyway" in low.message
    assert mid.to_dict()["reduced"] is True and mid.to_dict()["budget_bytes"] == budget
    with pytest.raises(ValueError, match="multiple of 8"):
        resources.choose_working_size(cfg, 60, budget)


def test_fallback_sizes_shrink_by_about_half_the_voxels_down_to_the_floor():
    cfg = get_config("default")
    sizes = resources.fallback_sizes(cfg, 128)
    assert sizes == [96, 72, 56, 40, 32, 24, 16]
    assert all(s % cfg.size_multiple == 0 for s in sizes)
    assert all(b <= 0.8 * a for a, b in zip([128, *sizes], sizes))
    assert resources.fallback_sizes(cfg, 16) == []
    assert resources.fallback_sizes(tiny(), 16) == [12, 8]
    assert resources.fallback_sizes(cfg, 128, floor=64) == [96, 72]


def test_network_attempts_go_down_on_cuda_then_to_the_cpu():
    cfg = get_config("default")
    assert network_attempts(cfg, 64, CPU) == [(64, CPU), (48, CPU), (32, CPU), (24, CPU), (16, CPU)]
    plan = network_attempts(cfg, 128, CUDA, cpu_size=96)
    assert plan[:3] == [(128, CUDA), (96, CUDA), (72, CUDA)]  # not below half the edge on the GPU
    assert plan[3] == (96, CPU) and all(d == CPU for _, d in plan[3:])


def test_out_of_memory_errors_are_recognised():
    assert resources.is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert resources.is_out_of_memory(MemoryError())
    assert resources.is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: "
                                                   "can't allocate memory: you tried to allocate 9 GB"))
    assert not resources.is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not resources.is_out_of_memory(ValueError("out of memory"))


def test_run_with_fallback_retries_cuda_oom_then_runs_on_the_cpu():
    calls, messages = [], []

    def run(size, device):
        calls.append((size, device.type))
        if device.type == "cuda":
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory at {size}")
        if size > 48:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return f"ran {size} on {device.type}"

    plan = network_attempts(get_config("default"), 96, CUDA, cpu_size=64)
    assert run_with_fallback(plan, run, messages.append) == "ran 48 on cpu"
    assert calls == [(96, "cuda"), (72, "cuda"), (56, "cuda"), (64, "cpu"), (48, "cpu")]  # GPU floor: 48
    assert messages[0] == "out of memory running the network at 96³ on cuda; retrying at 72³ on cuda"
    assert messages[2] == "out of memory running the network at 56³ on cuda; retrying at 64³ on the CPU (slower)"
    assert len(messages) == 4


def test_run_with_fallback_lets_other_errors_through_and_gives_up_clearly():
    def broken(size, device):
        raise RuntimeError("shapes do not match")

    with pytest.raises(RuntimeError, match="shapes do not match"):
        run_with_fallback([(32, CPU), (16, CPU)], broken, lambda m: None)

    def always_oom(size, device):
        raise MemoryError()

    with pytest.raises(InsufficientMemoryError, match=r"tried 32³ on cpu, 16³ on cpu; .* of RAM free"):
        run_with_fallback([(32, CPU), (16, CPU)], always_oom, lambda m: None)


# --------------------------------------------------------------------------------------------------------
# the pipeline with a mocked budget and an out-of-memory test double


class OomAboveNet(torch.nn.Module):
    """UniFuse's interface; raises torch.cuda.OutOfMemoryError for working grids larger than ``limit``,
    otherwise returns a zero field and the average as fused volume."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit
        self.sizes: list = []

    def forward(self, reference, moving, degradation=None):
        s = reference.shape[-1]
        self.sizes.append(s)
        if s > self.limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {s**3 * 4096} bytes")
        zero = torch.zeros(1, 3, s, s, s)
        probs = torch.tensor([[0.7, 0.1, 0.1, 0.1]])
        return UniFuseOutput(
            fused=(reference + moving) / 2, displacement=zero, aligned=moving, logits=probs.log(), probs=probs,
            prompt=torch.zeros(1, 4, 1, 1), tokens_ref=torch.zeros(1, 1, 1), tokens_mov=torch.zeros(1, 1, 1),
            dapl_states=(torch.zeros(1, 1, 1),) * 3,
        )


def test_network_oom_is_retried_at_lower_working_sizes_with_messages():
    ref, mov = _blob_image(), _blob_image(shift=1.0)
    ref_before, mov_before = sitk.GetArrayFromImage(ref).copy(), sitk.GetArrayFromImage(mov).copy()
    net = OomAboveNet(limit=16)
    loaded = LoadedModel(net, tiny().replace(working_size=32), "oom-double", True, "test", {})
    progress = []
    result = fuse(ref, mov, device="cpu", model=loaded, progress=lambda f, m: progress.append((f, m)))
    assert net.sizes == [32, 24, 16]
    report = result.report
    assert report["working_grid"]["size"] == [16, 16, 16] and report["working_grid"]["requested_size"] == 32
    assert report["notes"] == [
        "out of memory running the network at 32³ on cpu; retrying at 24³ on cpu",
        "out of memory running the network at 24³ on cpu; retrying at 16³ on cpu",
    ]
    assert [m for _, m in progress if m.startswith("out of memory")] == report["notes"]
    fractions = [f for f, _ in progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    # the smaller grid still covers the whole reference FOV and the outputs are at full resolution
    grid = geometry.working_grid(ref, 16)
    assert report["working_grid"]["spacing_mm"] == pytest.approx(list(grid.GetSpacing()))
    assert _covers(grid, ref)
    for img in (result.fused, result.aligned, result.displacement, result.jacobian, result.error_map):
        assert img.GetSize() == ref.GetSize()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ref), ref_before)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mov), mov_before)


def test_network_oom_at_every_size_is_a_clear_error():
    loaded = LoadedModel(OomAboveNet(limit=0), tiny().replace(working_size=16), "oom-double", True, "test", {})
    with pytest.raises(InsufficientMemoryError) as info:
        fuse(_blob_image(), _blob_image(), device="cpu", model=loaded)
    msg = str(info.value)
    assert "tried 16³ on cpu, 12³ on cpu, 8³ on cpu" in msg and "close other programs" in msg


def test_small_memory_budget_reduces_the_working_grid_and_says_so(monkeypatch):
    cfg = tiny().replace(working_size=32)
    budget = resources.estimate_network_bytes(cfg, 16) + 1000
    monkeypatch.setattr(resources, "available_memory_bytes", lambda device="cpu": int(budget / 0.8) + 1)
    net = OomAboveNet(limit=1000)
    progress = []
    result = fuse(_blob_image(), _blob_image(shift=1.0), device="cpu", progress=lambda f, m: progress.append(m),
                  model=LoadedModel(net, cfg, "double", True, "test", {}))
    assert net.sizes == [16]
    note = result.report["notes"][0]
    assert note.startswith("working grid reduced from 32³ to 16³ to fit the memory budget of")
    assert note in progress
    assert result.report["working_grid"]["size"] == [16] * 3
    assert result.report["memory"]["network_estimated_bytes"] <= result.report["memory"]["network_budget_bytes"]


def test_reference_too_large_for_free_memory_is_refused_before_the_network(monkeypatch):
    monkeypatch.setattr(resources, "available_memory_bytes", lambda device="cpu": 100_000)
    net = OomAboveNet(limit=1000)
    with pytest.raises(InsufficientMemoryError) as info:
        fuse(_blob_image(), _blob_image(), device="cpu", model=LoadedModel(net, tiny(), "double", True, "test", {}))
    msg = str(info.value)
    assert "(22, 20, 18) needs about" in msg and "is free" in msg and "crop/downsample the reference" in msg
    assert net.sizes == []


def test_error_maps_on_a_coarser_grid_for_huge_references(monkeypatch):
    ref = _blob_image(size=(40, 36, 32), spacing=(1.0, 1.1, 1.2))
    mov = _blob_image(size=(30, 30, 30), spacing=(1.4, 1.3, 1.3), shift=2.0)
    loaded = LoadedModel(OomAboveNet(limit=1000), tiny(), "double", True, "test", {})
    full = fuse(ref, mov, device="cpu", model=loaded)
    assert full.report["error_maps"]["reduced"] is False and full.report["notes"] == []
    monkeypatch.setattr(resources, "ERROR_MAP_MAX_VOXELS", ref.GetNumberOfPixels() // 8)
    small = fuse(ref, mov, device="cpu", model=loaded)
    info = small.report["error_maps"]
    assert info["reduced"] is True and np.prod(info["grid_size"]) <= ref.GetNumberOfPixels() // 8
    assert info["grid_size"] == [20, 18, 16]
    assert "error maps computed on a 20x18x16 grid" in small.report["notes"][0]
    for name in ("error_map", "error_map_before"):
        a = sitk.GetArrayFromImage(getattr(full, name))
        b = sitk.GetArrayFromImage(getattr(small, name))
        assert getattr(small, name).GetSize() == ref.GetSize()
        # inside the full-resolution map's (masked) support the coarse map tells the same story (measured:
        # r = 0.98, mean |difference| 0.02 for values of mean 0.16); its mask is dilated in coarser voxels,
        # so it reaches a few mm further out
        inside = a > 0
        assert (b[inside] > 0).all()
        assert np.corrcoef(a[inside], b[inside])[0, 1] > 0.9
        assert np.abs(a[inside] - b[inside]).mean() < 0.25 * a[inside].mean()
        assert 0.0 <= b.min() and b.max() <= 1.0
    # everything else is computed at full resolution, identically
    for name in ("fused", "aligned", "displacement", "jacobian"):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(getattr(full, name)),
                                      sitk.GetArrayFromImage(getattr(small, name)))


def test_displacement_field_is_float32_and_equals_the_float64_field():
    ref = _blob_image()
    field = sitk.GetImageFromArray(np.random.default_rng(0).normal(scale=2.0, size=(8, 8, 8, 3)), isVector=True)
    field.SetSpacing((5.0, 5.0, 5.0))
    field.SetOrigin((-18.0, -18.0, -18.0))
    composed = geometry.compose_transform(sitk.TranslationTransform(3, (1.0, -2.0, 0.5)), field)
    f32 = pipeline._displacement_field(composed, ref)
    f64 = geometry.transform_to_displacement(composed, ref)
    assert f32.GetPixelID() == sitk.sitkVectorFloat32 and f32.GetSize() == ref.GetSize()
    np.testing.assert_allclose(sitk.GetArrayFromImage(f32), sitk.GetArrayFromImage(f64), atol=1e-5)
    arr = sitk.GetArrayFromImage(f64)
    assert pipeline._max_vector_norm(f64, slab=3) == pytest.approx(float(np.linalg.norm(arr, axis=-1).max()))


def test_normalisation_of_huge_volumes_uses_a_sub_lattice(monkeypatch):
    arr = np.random.default_rng(0).gamma(4.0, 100.0, size=(32, 36, 40)).astype(np.float32)  # MR-like texture
    img = sitk.GetImageFromArray(arr)
    exact, step = pipeline._normalization(img)
    assert step == 1
    monkeypatch.setattr(pipeline, "NORMALIZATION_MAX_VOXELS", img.GetNumberOfPixels() // 8)
    approx, step = pipeline._normalization(img)
    assert step == 2
    assert approx.mode == exact.mode == "percentile"
    span = exact.high - exact.low  # compare in normalised units: within 2% of the [0, 1] range
    assert abs(approx.low - exact.low) < 0.02 * span and abs(approx.high - exact.high) < 0.02 * span
    assert approx.low != exact.low  # really computed on the sub-lattice


# --------------------------------------------------------------------------------------------------------
# properties over random geometries and budgets

spacings = st.tuples(*(st.floats(0.2, 6.0),) * 3)
origins = st.tuples(*(st.floats(-400.0, 400.0),) * 3)
angles = st.tuples(*(st.floats(-math.pi, math.pi),) * 3)
sizes = st.tuples(st.integers(8, 700), st.integers(8, 700), st.integers(8, 700))


def _reference(size, spacing, origin, ang) -> sitk.Image:
    rot = sitk.Euler3DTransform()
    rot.SetRotation(*ang)
    img = sitk.Image([int(s) for s in size], sitk.sitkUInt8)  # geometry only (never filled)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(rot.GetMatrix())
    return img


@settings(max_examples=40, deadline=None)
@given(size=st.tuples(*(st.integers(8, 60),) * 3), spacing=spacings, origin=origins, ang=angles,
       config=st.sampled_from(["tiny", "default", "paper"]), requested_steps=st.integers(2, 24),
       budget_gib=st.floats(0.01, 200.0))
def test_property_chosen_working_grid_fits_and_covers_the_fov(size, spacing, origin, ang, config, requested_steps,
                                                              budget_gib):
    cfg = get_config(config)
    m = cfg.size_multiple
    requested = requested_steps * m
    budget = int(budget_gib * resources.GiB)
    choice = resources.choose_working_size(cfg, requested, budget)
    assert choice.size % m == 0 and 0 < choice.size <= requested
    if choice.fits:
        assert resources.estimate_network_bytes(cfg, choice.size) <= budget
        if choice.size < requested:  # the largest that fits
            assert resources.estimate_network_bytes(cfg, choice.size + m) > budget
    else:
        assert choice.size == min(resources.min_working_size(cfg), requested)
    grid = geometry.working_grid(_reference(size, spacing, origin, ang), choice.size)
    assert _covers(grid, _reference(size, spacing, origin, ang))


@settings(max_examples=40, deadline=None)
@given(size=sizes, spacing=spacings, origin=origins, ang=angles, limit=st.integers(64**3, 300**3))
def test_property_error_map_grid_covers_the_same_fov_within_the_voxel_limit(size, spacing, origin, ang, limit):
    ref = _reference(size, spacing, origin, ang)
    grid = resources.coarser_grid(ref, limit)
    if ref.GetNumberOfPixels() <= limit:
        assert grid is None
        return
    assert grid.GetNumberOfPixels() <= limit
    np.testing.assert_allclose(grid.GetDirection(), ref.GetDirection(), atol=1e-12)
    # the same voxel-extent box: ref's corners sit exactly on the coarse grid's box corners
    idx = _box_corners_in(grid, ref)
    box = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)]) * np.asarray(grid.GetSize()) - 0.5
    np.testing.assert_allclose(idx, box, atol=1e-6 * max(grid.GetSize()))
