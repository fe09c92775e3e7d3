"""Tests of ``unifuse bench``: the quick benchmark end to end, baselines on a known translation, user folders of
pairs, unavailable baselines, peak-memory measurement and the speed mode (small volumes, one CPU thread)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from unifuse import geometry
from unifuse.bench import add_bench_parser, run_bench
from unifuse.bench.baselines import (QUICK_SETTINGS, REGISTRATION_METHODS, normalized_for_registration,
                                     registration_method)
from unifuse.bench.cases import BENCH_FIRST_SEED, folder_cases, moving_pose_labels
from unifuse.bench.measure import measure, memory_method
from unifuse.bench.report import REPORT_JSON, REPORT_MD, format_markdown
from unifuse.bench.runner import ALIGNMENT_KEYS, FUSION_KEYS, BenchOptions, run_benchmark
from unifuse.bench.speed import SpeedRow, _predicted_skip, format_speed_table, run_speed
from unifuse.errors import DatasetError, OutputExistsError, UniFuseError

torch.set_num_threads(1)
# itk's SWIG bindings (loaded by the elastix baseline) emit DeprecationWarnings on import; they are not ours
pytestmark = pytest.mark.filterwarnings("ignore:builtin type .* has no __module__ attribute:DeprecationWarning")


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="unifuse")
    add_bench_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", *argv])


def _strict_json(path: Path) -> dict:
    def no_constants(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name} in {path}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=no_constants)


# ------------------------------------------------------------------------------------------ quick benchmark


def test_quick_bench_writes_tables_json_and_figures(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "bench"
    # elastix is left out here only for time (its ITK import alone takes seconds); it goes through the same
    # child-process path as ants-syn and is checked on its own in test_baselines_recover_a_known_translation
    methods = ["unifuse", "none", "sitk-rigid", "sitk-bspline", "ants-syn", "truth"]
    args = _parse("--quick", "--config", "tiny", "--threads", "1", "--tasks", "t1-t2-motion", "--out", str(out),
                  "--methods", *methods)
    assert run_bench(args) == 0
    printed = capsys.readouterr().out
    assert "UNTRAINED" in printed  # an untrained network is flagged in the output

    data = _strict_json(out / REPORT_JSON)
    available = [m for m in REGISTRATION_METHODS if m in methods and m not in data["unavailable"]]
    assert set(data["unavailable"]) <= {"ants-syn", "elastix-bspline"}  # only optional packages may be missing
    assert {"none", "sitk-rigid", "sitk-bspline"} <= set(available)
    fusion_methods = {r["method"] for r in data["fusion"]}
    expected = {"unifuse"} | {f"{reg}+{rule}" for reg in [*available, "truth"] for rule in ("average", "max", "laplacian")}
    assert fusion_methods == expected
    assert {r["method"] for r in data["alignment"]} == {"unifuse", *available, "truth"}
    for row in data["fusion"]:
        assert set(row["metrics"]) == set(FUSION_KEYS)
        assert row["metrics"]["q_vif"] is None  # 32³ < 41 voxels: undefined, written as null
        assert row["seconds"] >= 0 and "rss_increase_mb" in row
    for row in data["alignment"]:
        assert set(row["metrics"]) == set(ALIGNMENT_KEYS)
    by_method = {r["method"]: r["metrics"] for r in data["alignment"]}
    assert by_method["truth"]["epe_mm"] == pytest.approx(0.0, abs=1e-6)
    assert by_method["none"]["epe_mm"] > 5.0  # the benchmark cases are really misaligned
    assert by_method["truth"]["dice"] > by_method["none"]["dice"] + 0.1
    assert by_method["sitk-rigid"]["epe_mm"] < 0.5 * by_method["none"]["epe_mm"]
    assert by_method["sitk-bspline"]["epe_mm"] < by_method["none"]["epe_mm"]
    assert data["meta"]["model"]["trained"] is False
    assert data["meta"]["synthetic"]["seeds"] == [BENCH_FIRST_SEED]
    summary = data["summary"]["t1-t2-motion"]
    assert summary["cases"] == [f"t1-t2-motion/seed{BENCH_FIRST_SEED}"]
    assert summary["fusion"]["unifuse"]["q_ssim"]["n"] == 1

    md = (out / REPORT_MD).read_text(encoding="utf-8")
    assert "## t1-t2-motion" in md and "Q_ssim" in md and "EPE" in md and "UNTRAINED" in md
    assert "Q_vif is n/a here" in md
    for png in ("metrics_t1-t2-motion.png", "examples_t1-t2-motion.png", "time_vs_quality.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with pytest.raises(OutputExistsError):  # refuses to overwrite before running anything
        run_bench(args)


# ------------------------------------------------------------------------------- baselines, known translation


def _phantom(size: int = 32) -> sitk.Image:
    """A head-like phantom: an ellipsoid with three inner blobs of different intensity, 6 mm voxels."""
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, size)] * 3, indexing="ij")
    arr = np.where((x / 0.8) ** 2 + (y / 0.7) ** 2 + (z / 0.75) ** 2 < 1, 0.4, 0.0)
    for cx, cy, cz, r, v in ((0.3, 0.2, 0.1, 0.25, 1.0), (-0.35, -0.1, 0.2, 0.2, 0.7), (0.0, -0.35, -0.3, 0.18, 0.15)):
        arr = np.where((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 < r * r, v, arr)
    img = sitk.GetImageFromArray(arr.astype(np.float32))
    img.SetSpacing((6.0, 6.0, 6.0))
    return sitk.SmoothingRecursiveGaussian(img, 4.0)


@pytest.mark.parametrize("name", [m for m in REGISTRATION_METHODS if m != "none"])
def test_baselines_recover_a_known_translation(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # toolkits must not leave files in the working directory (transformix did)
    method = registration_method(name)
    ok, reason = method.availability()
    if not ok:
        pytest.skip(f"{name} unavailable here: {reason}")
    reference = _phantom()
    shift = np.array([9.0, -7.0, 6.0])  # LPS mm
    # moving(y) = reference(y - t) with another contrast (a gamma curve): aligned(x) = moving(x + t)
    moving = sitk.Resample(reference, reference, sitk.TranslationTransform(3, (-shift).tolist()), sitk.sitkLinear, 0.0)
    arr = sitk.GetArrayFromImage(moving)
    moving_other = sitk.GetImageFromArray((np.clip(arr, 0.0, None) ** 0.4).astype(np.float32))
    moving_other.CopyInformation(moving)

    settings = QUICK_SETTINGS.with_threads(1)
    transform = method.register(normalized_for_registration(reference), normalized_for_registration(moving_other), settings)
    u = sitk.GetArrayFromImage(geometry.transform_to_displacement(transform, reference))  # (z, y, x, 3) LPS mm
    head = sitk.GetArrayFromImage(reference) > 0.1
    epe_before = float(np.linalg.norm(shift))
    epe_after = float(np.linalg.norm(u - shift, axis=-1)[head].mean())
    assert epe_after < 0.4 * epe_before, f"{name}: EPE {epe_after:.2f} mm vs {epe_before:.2f} mm before"
    assert np.allclose(np.median(u[head], axis=0), shift, atol=3.0)  # sign and axis order of the field
    assert list(tmp_path.iterdir()) == []


def test_no_registration_is_the_identity() -> None:
    reference = _phantom(16)
    t = registration_method("none").register(reference, reference, QUICK_SETTINGS)
    u = sitk.GetArrayFromImage(geometry.transform_to_displacement(t, reference))
    assert np.abs(u).max() == 0.0
    with pytest.raises(ValueError, match="unknown registration baseline"):
        registration_method("demons")


# ------------------------------------------------------------------------------------------- user pair folders


@pytest.fixture(scope="module")
def demo_case():
    from unifuse.data.synthetic import make_demo_case

    return make_demo_case(size=24, task="t1-t2-motion", seed=BENCH_FIRST_SEED + 7)


def _write_case(folder: Path, case, with_labels: bool = True) -> None:
    folder.mkdir(parents=True)
    sitk.WriteImage(case.reference, str(folder / "reference.nii.gz"))
    sitk.WriteImage(case.moving, str(folder / "moving.nrrd"))
    sitk.WriteImage(case.displacement_gt, str(folder / "truth_displacement.nii.gz"))
    sitk.WriteImage(case.moving_clean, str(folder / "truth_moving_aligned_clean.nii.gz"))
    if with_labels:
        sitk.WriteImage(sitk.Cast(case.labels, sitk.sitkUInt8), str(folder / "labels.nii.gz"))


def test_pairs_folder_is_discovered_and_benchmarked(tmp_path: Path, demo_case) -> None:
    root = tmp_path / "pairs"
    _write_case(root / "patient_b", demo_case)
    _write_case(root / "patient_a", demo_case, with_labels=False)
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not a case")
    (root / "patient_a" / "extra.txt").write_text("ignored")

    cases = folder_cases(root)
    assert [c.name for c in cases] == ["patient_a", "patient_b"]
    a, b = cases
    assert a.task == "pairs" and a.truth_displacement is not None and a.truth_aligned is not None
    assert a.reference_labels is None and a.moving_labels is None
    assert b.reference_labels is not None
    assert b.moving_labels is not None and b.moving_labels.GetSize() == demo_case.moving.GetSize()  # derived
    assert [c.name for c in folder_cases(root / "patient_b")] == ["patient_b"]  # a single case folder

    results = run_benchmark(BenchOptions(pairs=root, methods=("none", "truth"), rules=("average",), threads=1),
                            log=lambda line: None)
    assert results.meta["synthetic"] is None  # --pairs without --tasks runs only the user's pairs
    rows = {(r["case"], r["method"]): r["metrics"] for r in results.alignment}
    assert set(rows) == {(c, m) for c in ("patient_a", "patient_b") for m in ("none", "truth")}
    assert "dice" not in rows[("patient_a", "none")] and "dice" in rows[("patient_b", "none")]
    assert rows[("patient_b", "truth")]["dice"] > rows[("patient_b", "none")]["dice"]
    assert "pairs" in format_markdown(results)


def test_pairs_folder_errors(tmp_path: Path, demo_case) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        folder_cases(tmp_path / "missing")
    (tmp_path / "empty" / "case1").mkdir(parents=True)
    with pytest.raises(DatasetError, match="reference"):
        folder_cases(tmp_path / "empty")
    folder = tmp_path / "dup" / "case1"
    _write_case(folder, demo_case, with_labels=False)
    sitk.WriteImage(demo_case.reference, str(folder / "reference.mha"))
    with pytest.raises(DatasetError, match="several files for one role"):
        folder_cases(tmp_path / "dup")


def test_moving_pose_labels_match_the_truth(demo_case) -> None:
    labels = sitk.Cast(demo_case.labels, sitk.sitkUInt8)
    moved = moving_pose_labels(labels, demo_case.displacement_gt, demo_case.moving)
    back = sitk.Resample(moved, demo_case.reference, sitk.DisplacementFieldTransform(
        sitk.Cast(demo_case.displacement_gt, sitk.sitkVectorFloat64)), sitk.sitkNearestNeighbor, 0.0, sitk.sitkUInt8)
    ident = sitk.Resample(moved, demo_case.reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0, sitk.sitkUInt8)
    ref = sitk.GetArrayFromImage(labels) > 0
    agree_truth = (sitk.GetArrayFromImage(back) > 0) == ref
    agree_ident = (sitk.GetArrayFromImage(ident) > 0) == ref
    assert agree_truth.mean() > 0.95 and agree_truth.mean() > agree_ident.mean() + 0.02


# --------------------------------------------------------------------------------------- unavailable methods


def test_unavailable_baseline_is_reported_not_faked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, demo_case) -> None:
    monkeypatch.setitem(sys.modules, "ants", None)  # `import ants` now raises ImportError
    ok, reason = registration_method("ants-syn").availability()
    assert not ok and "antspyx" in reason
    _write_case(tmp_path / "pairs" / "c1", demo_case, with_labels=False)
    results = run_benchmark(BenchOptions(pairs=tmp_path / "pairs", methods=("none", "ants-syn"), rules=("max",),
                                         threads=1), log=lambda line: None)
    assert results.unavailable["ants-syn"] == reason
    assert all(not r["method"].startswith("ants-syn") for r in results.fusion + results.alignment)
    assert "`ants-syn`: unavailable: " in format_markdown(results)


def test_bad_options_raise_user_errors() -> None:
    with pytest.raises(UniFuseError, match="--methods"):
        BenchOptions(methods=("unifuse", "voxelmorph")).resolved()
    with pytest.raises(UniFuseError, match="--tasks"):
        BenchOptions(tasks=("pet-mr",)).resolved()
    opts = BenchOptions(quick=True).resolved()
    assert (opts.size, opts.cases_per_task, opts.settings.threads >= 1) == (32, 1, True)


# ------------------------------------------------------------------------------------------ memory and speed


def test_measure_sees_an_allocation() -> None:
    if memory_method().startswith("not measured"):
        pytest.skip(memory_method())
    with measure() as m:
        block = np.ones(40 * 2**20 // 8)  # 40 MiB
        del block
    assert m.seconds >= 0
    assert 35 <= m.rss_increase_mb < 200


def test_speed_mode_times_every_stage_and_skips_with_a_reason() -> None:
    rows, meta = run_speed(sizes=[32, 16], device="cpu", precisions=["fp32", "bf16"], config="tiny", repeats=1,
                           threads=1, log=lambda line: None)
    assert [(r.size, r.precision) for r in rows] == [(16, "fp32"), (32, "fp32"), (16, "bf16"), (32, "bf16")]
    for r in rows:
        assert r.status == "ok", r.reason
        assert {"prepare", "network", "warp", "maps", "total"} <= set(r.timings_s)
        assert r.timings_s["total"] >= r.timings_s["network"] > 0
    assert rows[2].max_diff_fused is not None and rows[2].max_diff_displacement_mm is not None
    assert meta["model"]["trained"] is False
    table = format_speed_table(rows)
    assert "32³" in table and "bf16" in table

    last = SpeedRow(size=64, device="cpu", precision="fp32", compiled=False, timings_s={"total": 2.0},
                    rss_increase_mb=1e9)
    assert "RAM" in _predicted_skip(128, last, torch.device("cpu"), time_limit_s=1e9)
    last.rss_increase_mb = 1.0
    assert "limit" in _predicted_skip(256, last, torch.device("cpu"), time_limit_s=10.0)
    assert _predicted_skip(96, last, torch.device("cpu"), time_limit_s=1e9) == ""
    with pytest.raises(UniFuseError, match="multiples"):
        run_speed(sizes=[30], device="cpu", config="tiny", log=lambda line: None)
