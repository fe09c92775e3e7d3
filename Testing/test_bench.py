"""Tests of ``unifuse bench``: the quick benchmark end to end, ``--real`` on tiny fake real-case folders, baselines
on a known translation (each in its child process, ANTs in its own environment when there is one), user folders of
pairs, unavailable baselines, peak-memory measurement and the speed mode (small volumes, one CPU thread)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from unifuse import geometry
from unifuse.bench import add_bench_parser, run_bench
from unifuse import evaluation
from unifuse.bench.baselines import (QUICK_SETTINGS, REGISTRATION_METHODS, baseline_interpreter,
                                     normalized_for_registration, register_isolated, registration_method)
from unifuse.bench.cases import BENCH_FIRST_SEED, folder_cases, moving_pose_labels, real_cases
from unifuse.bench.measure import measure, memory_method
from unifuse.bench.report import REPORT_JSON, REPORT_MD, format_markdown
from unifuse.bench.baselines import REAL_SETTINGS
from unifuse.bench.runner import ALIGNMENT_KEYS, FUSION_KEYS, REAL_METHODS, BenchOptions, run_benchmark
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
    # elastix and ANTs are left out here only for time (importing either takes seconds); they go through the same
    # child-process path as sitk-rigid and are checked on their own in test_baselines_recover_a_known_translation
    methods = ["unifuse", "none", "sitk-rigid", "sitk-bspline", "truth"]
    args = _parse("--quick", "--config", "tiny", "--threads", "1", "--tasks", "t1-t2-motion", "--out", str(out),
                  "--methods", *methods)
    started = time.perf_counter()
    assert run_bench(args) == 0
    elapsed = time.perf_counter() - started
    printed = capsys.readouterr().out
    assert "UNTRAINED" in printed  # an untrained network is flagged in the output

    data = _strict_json(out / REPORT_JSON)
    available = [m for m in REGISTRATION_METHODS if m in methods and m not in data["unavailable"]]
    assert data["unavailable"] == {}
    assert available == ["none", "sitk-rigid", "sitk-bspline"]
    fusion_methods = {r["method"] for r in data["fusion"]}
    rules = ("average", "max", "laplacian")
    expected = {"unifuse"} | {f"{reg}+{rule}" for reg in [*available, "truth"] for rule in rules}
    expected |= {f"unifuse alignment+{rule}" for rule in rules}  # UniFuse's own final alignment, fused by rule
    assert fusion_methods == expected
    assert {r["method"] for r in data["alignment"]} == {"unifuse", *available, "truth"}
    for row in data["fusion"]:
        assert set(row["metrics"]) == set(FUSION_KEYS)
        assert row["metrics"]["q_vif"] is None  # 32³ < 41 voxels: undefined, written as null
        assert 0 < row["seconds"] < elapsed and "rss_increase_mb" in row  # measured, within the run
    unifuse_row = next(r for r in data["alignment"] if r["method"] == "unifuse")
    outputs = unifuse_row["outputs"]  # sharpness of the fused volume, and restoration against the clean truth
    assert 0 < outputs["fused"]["gradient_ratio"] < 10 and -1 <= outputs["fused"]["ssim_truth"] <= 1
    assert {"psnr_aligned", "psnr_restored", "ssim_aligned", "ssim_restored", "gradient_ratio"} <= set(outputs["restored"])
    for row in data["alignment"]:
        assert set(row["metrics"]) == set(ALIGNMENT_KEYS)
        assert 0 < row["seconds"] < elapsed
        assert set(row["dice_per_label"]) == {"1", "2", "3", "4", "5"}  # JSON keys of the tissue labels
    by_method = {r["method"]: r["metrics"] for r in data["alignment"]}
    assert by_method["truth"]["epe_mm"] == pytest.approx(0.0, abs=1e-6)
    assert by_method["truth"]["epe_reduction_percent"] == pytest.approx(100.0)
    assert by_method["none"]["epe_reduction_percent"] == 0.0
    assert by_method["truth"]["mse"] == 0.0 and by_method["truth"]["ssim"] == pytest.approx(1.0)
    assert by_method["none"]["epe_mm"] > 5.0  # the benchmark cases are really misaligned
    assert by_method["truth"]["dice"] > by_method["none"]["dice"] + 0.1
    assert by_method["sitk-rigid"]["epe_mm"] < 0.5 * by_method["none"]["epe_mm"]
    assert by_method["sitk-bspline"]["epe_mm"] < by_method["none"]["epe_mm"]
    assert data["meta"]["model"]["trained"] is False
    assert data["meta"]["evaluation_mask"] == evaluation.MASK_RULE
    unifuse_row = next(r for r in data["alignment"] if r["method"] == "unifuse")
    assert unifuse_row["guard"]["final_stage"] in {"header", "affine", "network", "refine"}
    assert unifuse_row["timings_s"]["total"] > 0
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
    """Each baseline through the benchmark's own path: a child process with its interpreter (ants-syn: the
    separate antspyx environment of `make bench-deps`). elastix takes ~30 s here, most of it importing itk."""
    monkeypatch.chdir(tmp_path)  # toolkits must not leave files in the working directory (transformix did)
    method = registration_method(name)
    ok, reason = method.availability(baseline_interpreter(name))
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
    field, m = register_isolated(name, normalized_for_registration(reference), normalized_for_registration(moving_other),
                                 settings)
    assert m.seconds > 0
    u = sitk.GetArrayFromImage(field)  # (z, y, x, 3) LPS mm
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
    missing = str(tmp_path / "no-such-venv" / "bin" / "python")
    ok, reason = registration_method("ants-syn").availability(missing)
    assert not ok and "antspyx" in reason and "make bench-deps" in reason
    monkeypatch.setitem(sys.modules, "ants", None)  # in this interpreter `import ants` now raises ImportError
    ok_here, reason_here = registration_method("ants-syn").availability(sys.executable)
    assert not ok_here and "antspyx" in reason_here
    _write_case(tmp_path / "pairs" / "c1", demo_case, with_labels=False)
    results = run_benchmark(BenchOptions(pairs=tmp_path / "pairs", methods=("none", "ants-syn"), rules=("max",),
                                         threads=1, ants_python=missing), log=lambda line: None)
    assert results.unavailable["ants-syn"] == reason
    assert all(not r["method"].startswith("ants-syn") for r in results.fusion + results.alignment)
    assert "`ants-syn`: unavailable: " in format_markdown(results)


def test_bad_options_raise_user_errors() -> None:
    with pytest.raises(UniFuseError, match="--methods"):
        BenchOptions(methods=("unifuse", "voxelmorph")).resolved()
    with pytest.raises(UniFuseError, match="--tasks"):
        BenchOptions(tasks=("pet-mr",)).resolved()
    with pytest.raises(UniFuseError, match="spacing"):
        BenchOptions(spacing_mm=0.01).resolved()
    opts = BenchOptions(quick=True).resolved()
    assert (opts.size, opts.cases_per_task, opts.settings.threads >= 1) == (32, 1, True)
    real = BenchOptions(real=True).resolved()
    assert real.methods == REAL_METHODS and real.rules == () and real.tasks == () and real.cases_per_task is None
    assert str(real.cache) == "real_data" and real.settings.sitk_mesh_size == REAL_SETTINGS.sitk_mesh_size


# ------------------------------------------------------------------------------------------------- --real


def _write_real_case(root: Path, name: str, case, category: str, keep_fraction: float = 1.0) -> None:
    """A case folder as `unifuse data real` writes it; ``keep_fraction`` < 1 crops the moving scan along its
    first axis (a partial field of view)."""
    folder = root / "cases" / "validation" / name
    folder.mkdir(parents=True)
    moving = case.moving
    if keep_fraction < 1.0:
        moving = moving[: max(2, int(round(moving.GetSize()[0] * keep_fraction))), :, :]
    sitk.WriteImage(case.reference, str(folder / "reference.nii.gz"))
    sitk.WriteImage(moving, str(folder / "moving.nii.gz"))
    sitk.WriteImage(case.displacement_gt, str(folder / "truth_displacement.nii.gz"))
    sitk.WriteImage(case.moving_clean, str(folder / "truth_moving_aligned_clean.nii.gz"))
    sitk.WriteImage(sitk.Cast(case.labels, sitk.sitkUInt8), str(folder / "reference_labels.nii.gz"))
    (folder / "case.json").write_text(json.dumps({"category": category, "subject": f"sub-{name}", "body_part": "head",
                                                  "degradation": case.degradation}), encoding="utf-8")


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tiny fake real cases: one full field of view, one whose moving scan covers only half of it."""
    from unifuse.data.synthetic import make_demo_case

    root = tmp_path_factory.mktemp("real_data")
    _write_real_case(root, "caseA", make_demo_case(size=24, task="t1-t2-motion", seed=BENCH_FIRST_SEED + 11), "full")
    _write_real_case(root, "caseB", make_demo_case(size=24, task="mr-ct-metal", seed=BENCH_FIRST_SEED + 12), "partial",
                     keep_fraction=0.5)
    return root


def test_real_cases_are_read_with_their_category(real_cache: Path, tmp_path: Path) -> None:
    cases = real_cases(real_cache)
    assert [(c.name, c.task) for c in cases] == [("caseA", "full"), ("caseB", "partial")]
    assert cases[1].info == {"category": "partial", "subject": "sub-caseB", "body_part": "head",
                             "degradation": "metal", "kind": None}
    assert cases[1].moving_labels is not None  # derived from the reference labels and the true field
    with pytest.raises(DatasetError, match="unifuse data real"):
        real_cases(tmp_path / "nothing")
    bad = tmp_path / "bad"
    _write_real_case(bad, "c1", _tiny_demo(), "sideways")
    with pytest.raises(DatasetError, match="category must be one of full, partial"):
        real_cases(bad)


def _tiny_demo():
    from unifuse.data.synthetic import make_demo_case

    return make_demo_case(size=16, task="t1-t2-motion", seed=BENCH_FIRST_SEED + 13)


def test_real_bench_reports_categories_cases_reductions_and_guard(real_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench_real"
    args = _parse("--real", "--cache", str(real_cache), "--quick", "--config", "tiny", "--threads", "1", "--out",
                  str(out), "--methods", "unifuse", "affine-only", "none", "sitk-rigid")
    assert run_bench(args) == 0
    data = _strict_json(out / REPORT_JSON)
    assert data["failures"] == [] and data["unavailable"] == {}
    rows = {(r["case"], r["method"]): r for r in data["alignment"]}
    assert set(rows) == {(c, m) for c in ("caseA", "caseB") for m in ("unifuse", "affine-only", "none", "sitk-rigid")}
    assert data["fusion"] == []  # --real is alignment only unless --rules asks for fusion rows
    assert [c["category"] for c in data["meta"]["real"]["cases"]] == ["full", "partial"]

    for case in real_cases(real_cache):
        # the header-only row is exactly the evaluation module's EPE of the zero field on that case
        ev = evaluation.as_evaluation_case(case)
        floor = evaluation.endpoint_error(evaluation.zero_displacement(case.reference), case.truth_displacement,
                                          ev.mask).mean_mm
        none = rows[(case.name, "none")]["metrics"]
        assert none["epe_mm"] == pytest.approx(floor, rel=1e-9) and floor > 3.0
        assert none["epe_reduction_percent"] == 0.0 and none["folding_percent"] == 0.0
        for method in ("unifuse", "affine-only", "sitk-rigid"):
            m = rows[(case.name, method)]["metrics"]
            assert m["epe_reduction_percent"] == pytest.approx(100.0 * (1.0 - m["epe_mm"] / floor), rel=1e-9)
        assert rows[(case.name, "sitk-rigid")]["metrics"]["epe_reduction_percent"] > 20.0  # it really registers
        for method in ("unifuse", "affine-only"):  # every UniFuse run records the guard's decisions
            guard = rows[(case.name, method)]["guard"]
            assert guard["final_stage"] in {"header", "affine", "network", "refine"} and "affine" in guard["stages"]
        ablation = rows[(case.name, "affine-only")]
        assert ablation["options"] == {"network": False, "refine": "none"}
        assert set(ablation["guard"]["stages"]) == {"affine"}  # no network field, no refinement to judge
    # the partial case is evaluated only where its cropped moving scan has data
    partial = real_cases(real_cache)[1]
    ev = evaluation.as_evaluation_case(partial)
    assert ev.mask.sum() < 0.8 * evaluation.evaluation_mask(partial.reference).sum()

    summary = data["summary"]
    assert set(summary) == {"full", "partial"}
    for category, case in (("full", "caseA"), ("partial", "caseB")):
        stats = summary[category]["alignment"]["sitk-rigid"]["epe_reduction_percent"]
        assert stats["n"] == 1 and stats["mean"] == pytest.approx(rows[(case, "sitk-rigid")]["metrics"]["epe_reduction_percent"])

    md = (out / REPORT_MD).read_text(encoding="utf-8")
    assert "## Per category" in md and "### full" in md and "### partial" in md and "## Per case" in md
    assert "### caseB (partial, head, subject sub-caseB)" in md
    assert "time / ANTs SyN" in md and "| n/a |" in md  # no ANTs row was asked for: no ratio
    guard = rows[("caseA", "unifuse")]["guard"]
    assert f"→ {guard['final_stage']}" in md
    reduction = rows[("caseA", "sitk-rigid")]["metrics"]["epe_reduction_percent"]
    assert f"| {reduction:.1f} |" in md


# ------------------------------------------------------------------------------------------ memory and speed


def test_measure_sees_an_allocation() -> None:
    if memory_method().startswith("not measured"):
        pytest.skip(memory_method())
    with measure() as m:
        block = np.ones(40 * 2**20 // 8)  # 40 MiB
        del block
        time.sleep(0.2)
    assert 0.2 <= m.seconds < 2.0
    assert 35 <= m.rss_increase_mb < 200


def test_speed_mode_times_every_stage_and_skips_with_a_reason() -> None:
    # a 9 mm reference (26³) keeps this fast; the default is a 1.5 mm pair at 4, 3, 2 and 1.5 mm working grids
    rows, meta = run_speed(spacings=[9.0, 12.0], reference_spacing_mm=9.0, device="cpu", precisions=["fp32", "bf16"],
                           config="tiny", repeats=1, threads=1, log=lambda line: None)
    assert [(r.spacing_mm, r.precision) for r in rows] == [(12.0, "fp32"), (9.0, "fp32"), (12.0, "bf16"), (9.0, "bf16")]
    assert meta["pair"]["reference_size"] == [26, 26, 26] and meta["spacings_mm"] == [12.0, 9.0]
    for r in rows:
        assert r.status == "ok", r.reason
        assert {"header", "affine", "working_grid", "network", "refine", "fusion", "warp", "maps", "total"} <= set(r.timings_s)
        assert r.timings_s["total"] >= r.timings_s["network"] > 0 and r.timings_s["affine"] > 0
    assert rows[1].voxels > rows[0].voxels  # the finer spacing has the larger working grid
    assert rows[1].working_spacing_mm == pytest.approx(9.0, rel=0.05)
    # bf16 vs fp32 at the same spacing (fp32 rows are the reference): bf16 keeps ~3 significant digits, so the
    # fused outputs differ, but little (measured: ~1e-3); the untrained tiny network's field stays (nearly) the
    # same (0 to 5e-6 mm)
    assert rows[0].max_diff_fused is None and rows[1].max_diff_displacement_mm is None
    for r in rows[2:]:
        assert 0 < r.max_diff_fused < 1e-2 and 0 <= r.max_diff_displacement_mm < 1e-4
    assert meta["model"]["trained"] is False
    table = format_speed_table(rows)
    assert "| 12 |" in table and "bf16" in table and "refine (s)" in table

    last = SpeedRow(spacing_mm=4.0, device="cpu", precision="fp32", compiled=False, timings_s={"total": 2.0},
                    rss_increase_mb=1e9)
    assert "RAM" in _predicted_skip(2.0, last, torch.device("cpu"), time_limit_s=1e9)
    last.rss_increase_mb = 1.0
    assert "limit" in _predicted_skip(1.0, last, torch.device("cpu"), time_limit_s=10.0)  # 2 s × 4³ = 128 s
    assert _predicted_skip(3.0, last, torch.device("cpu"), time_limit_s=1e9) == ""
    with pytest.raises(UniFuseError, match="spacings"):
        run_speed(spacings=[0.1], device="cpu", config="tiny", log=lambda line: None)
