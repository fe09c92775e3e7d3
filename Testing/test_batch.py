"""``unifuse fuse-batch``: cohort processing from a CSV manifest (unifuse.batch).

Tiny 12³ volumes, the untrained ``tiny`` network, no affine stage and no refinement, a 4 mm working grid:
each case takes well under a second.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import SimpleITK as sitk

import unifuse.batch as batch
from unifuse.batch import (FAILURE_COLUMNS, SUMMARY_COLUMNS, BatchCase, ManifestError, is_finished, parse_shard,
                           read_manifest, shard_cases, summary_row)
from unifuse.cli import main
from unifuse.errors import UniFuseError
from unifuse.pipeline import OUTPUT_FILES, REPORT_FILE

pytestmark = pytest.mark.usefixtures("single_thread")

FAST = ["--config", "tiny", "--affine", "none", "--refine", "none", "--spacing", "4", "--device", "cpu", "--quiet"]


def _volume(path: Path, shift: int, scale: float) -> None:
    zz, yy, xx = np.mgrid[:12, :12, :12]
    ball = ((zz - 6) ** 2 + (yy - 6) ** 2 + (xx - 5 - shift) ** 2 < 16).astype(np.float32)
    img = sitk.GetImageFromArray(ball * scale + 1.0)
    img.SetSpacing((4.0, 4.0, 4.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))


def _cohort(root: Path) -> Path:
    """Four pairs sub-1..sub-4 (``ref.nii.gz``, ``mov.nii.gz``); sub-3's moving file is not an image.
    Rows: explicit id, no id (named from the file names), the bad case, a row with its own degradation."""
    for i in range(1, 5):
        _volume(root / f"sub-{i}" / "ref.nii.gz", 0, 100.0)
        _volume(root / f"sub-{i}" / "mov.nii.gz", 1, 50.0 + i)
    (root / "sub-3" / "mov.nii.gz").write_bytes(b"not an image at all")
    manifest = root / "cohort.csv"
    manifest.write_text(
        "id,reference,moving,degradation\n"
        "alpha,sub-1/ref.nii.gz,sub-1/mov.nii.gz,\n"
        ",sub-2/ref.nii.gz,sub-2/mov.nii.gz,\n"
        "bad,sub-3/ref.nii.gz,sub-3/mov.nii.gz,\n"
        f"delta,{root / 'sub-4' / 'ref.nii.gz'},sub-4/mov.nii.gz,motion\n",
        encoding="utf-8")
    return manifest


def _table(path: Path) -> List[Dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _mtimes(folder: Path) -> Dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir())}


GOOD = ["alpha", "sub-2_ref", "delta"]


def test_batch_runs_records_the_failure_and_a_second_run_skips_finished_cases(tmp_path: Path, capsys):
    manifest = _cohort(tmp_path / "cohort")
    out = tmp_path / "out"
    assert main(["fuse-batch", str(manifest), "--out", str(out), "--workers", "2", *FAST]) == 1
    err = capsys.readouterr().err
    assert "1 of 4 cases failed" in err and "failures.csv" in err

    for case in GOOD:
        assert is_finished(out / case), case
        assert {p.name for p in (out / case).iterdir()} == {*OUTPUT_FILES.values(), REPORT_FILE}
    assert not (out / "bad").exists()  # a failed case leaves nothing behind
    failures = _table(out / "failures.csv")
    assert [f["id"] for f in failures] == ["bad"] and failures[0]["row"] == "2" and failures[0]["error"]
    assert tuple(failures[0]) == FAILURE_COLUMNS
    summary = _table(out / "summary.csv")
    assert tuple(summary[0]) == SUMMARY_COLUMNS
    assert [r["id"] for r in summary] == ["alpha", "sub-2_ref", "bad", "delta"]  # manifest order
    by_id = {r["id"]: r for r in summary}
    assert [by_id[c]["status"] for c in GOOD] == ["fused"] * 3 and by_id["bad"]["status"] == "failed"
    for case in GOOD:
        row = by_id[case]
        assert row["final_stage"] and float(row["time_total_s"]) > 0 and row["folding_percent"] != ""
        assert row["error_map_mean_before"] != "" and row["error_map_mean_after"] != ""
        assert "network=" in row["guard"] and row["model_id"].startswith("unifuse-tiny")
        assert "UNTRAINED" in row["warnings"] and int(row["n_warnings"]) >= 1
    assert by_id["delta"]["degradation_requested"] == "motion" == by_id["delta"]["degradation_used"]
    assert by_id["alpha"]["degradation_requested"] == "auto"
    assert by_id["bad"]["error_type"] and by_id["bad"]["error"]

    before = {case: _mtimes(out / case) for case in GOOD}
    assert main(["fuse-batch", str(manifest), "--out", str(out), *FAST]) == 1  # the bad case fails again
    summary = _table(out / "summary.csv")
    assert [r["status"] for r in summary] == ["finished-before", "finished-before", "failed", "finished-before"]
    assert summary[0]["final_stage"] and summary[0]["time_total_s"]  # read back from report.json
    assert {case: _mtimes(out / case) for case in GOOD} == before  # untouched

    # fix the bad input: the next run computes only that case
    (manifest.parent / "sub-3" / "mov.nii.gz").unlink()
    _volume(manifest.parent / "sub-3" / "mov.nii.gz", 1, 60.0)
    assert main(["fuse-batch", str(manifest), "--out", str(out), *FAST]) == 0
    assert [r["status"] for r in _table(out / "summary.csv")] == ["finished-before"] * 2 + ["fused", "finished-before"]
    assert _table(out / "failures.csv") == []


def test_two_shards_cover_the_manifest_exactly_once(tmp_path: Path):
    manifest = _cohort(tmp_path / "cohort")
    cases = read_manifest(manifest)
    parts = [shard_cases(cases, (i, 2)) for i in range(2)]
    assert [c.row for c in parts[0]] == [0, 2] and [c.row for c in parts[1]] == [1, 3]

    out = tmp_path / "out"  # both shards share the batch folder, as a SLURM array would
    codes = [main(["fuse-batch", str(manifest), "--out", str(out), "--shard", f"{i}/2", *FAST]) for i in range(2)]
    assert codes == [1, 0]  # shard 0 holds the bad case
    shard_rows = [_table(out / f"summary.shard-{i}-of-2.csv") for i in range(2)]
    ids = [r["id"] for rows in shard_rows for r in rows]
    assert sorted(ids) == sorted(["alpha", "sub-2_ref", "bad", "delta"]) and len(ids) == len(set(ids)) == 4
    assert [r["id"] for r in _table(out / "failures.shard-0-of-2.csv")] == ["bad"]
    assert _table(out / "failures.shard-1-of-2.csv") == []
    assert all(is_finished(out / c) for c in GOOD)
    # a run without --shard afterwards only gathers the whole cohort's summary (the bad case is retried)
    assert main(["fuse-batch", str(manifest), "--out", str(out), *FAST]) == 1
    statuses = {r["id"]: r["status"] for r in _table(out / "summary.csv")}
    assert statuses == {"alpha": "finished-before", "sub-2_ref": "finished-before", "bad": "failed",
                        "delta": "finished-before"}


def test_an_unfinished_case_is_computed_again(tmp_path: Path):
    manifest = _cohort(tmp_path / "cohort")
    out = tmp_path / "out"
    leftover = out / "alpha"
    leftover.mkdir(parents=True)
    (leftover / "fused.nii.gz").write_bytes(b"half of a file from a killed run")  # no report.json
    assert not is_finished(leftover)
    main(["fuse-batch", str(manifest), "--out", str(out), "--shard", "0/4", *FAST])  # row 0 only: alpha
    assert is_finished(leftover)
    assert sitk.ReadImage(str(leftover / "fused.nii.gz")).GetSize() == (12, 12, 12)
    assert [r["status"] for r in _table(out / "summary.shard-0-of-4.csv")] == ["fused"]


def test_manifest_and_shard_errors_name_the_problem(tmp_path: Path):
    def manifest(text: str) -> Path:
        path = tmp_path / "m.csv"
        path.write_text(text, encoding="utf-8")
        return path

    with pytest.raises(ManifestError, match="no moving column"):
        read_manifest(manifest("reference,other\na.nii,b.nii\n"))
    with pytest.raises(ManifestError, match="lines 2 and 3 both name the case 'x'"):
        read_manifest(manifest("id,reference,moving\nx,a.nii,b.nii\nx,c.nii,d.nii\n"))
    with pytest.raises(ManifestError, match="line 2: the moving cell is empty"):
        read_manifest(manifest("reference,moving\na.nii,\n"))
    with pytest.raises(ManifestError, match="unknown degradation 'blur'"):
        read_manifest(manifest("reference,moving,degradation\na.nii,b.nii,blur\n"))
    with pytest.raises(ManifestError, match="no rows"):
        read_manifest(manifest("reference,moving\n"))
    with pytest.raises(ManifestError, match="cannot read the manifest"):
        read_manifest(tmp_path / "missing.csv")
    cases = read_manifest(manifest("Reference,Moving,ID\nx/t1.nii.gz,x/t2.nii.gz,\ny/t1.nii.gz,y/t2.nii.gz,my case/1\n"))
    assert [c.case_id for c in cases] == ["x_t1", "my_case_1"]  # t1 is in two rows; sanitised; any header case
    assert cases[0].reference == (tmp_path / "x" / "t1.nii.gz")  # relative to the manifest's folder
    assert parse_shard("1/4") == (1, 4) and parse_shard(None) is None
    for bad in ("4/4", "1", "-1/2", "a/b", "0/0"):
        with pytest.raises(UniFuseError, match="must be i/N"):
            parse_shard(bad)


def test_the_moving_modality_column_parses_like_the_degradation_column(tmp_path: Path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("ID,Reference,Moving,Degradation,Moving_Modality\n"
                        "a,a/r.nii,a/m.nii,,MR\n"
                        "b,b/r.nii,b/m.nii,Motion,\n"
                        "c,c/r.nii,c/m.nii,, Pet \n"
                        "d,d/r.nii,d/m.nii,,AUTO\n"
                        "e,e/r.nii,e/m.nii,,ct\n", encoding="utf-8")
    cases = read_manifest(manifest)
    assert [c.moving_modality for c in cases] == ["mr", None, "pet", "auto", "ct"]  # empty = the run's option
    assert [c.degradation for c in cases] == [None, "motion", None, None, None]
    # a manifest without the column (written before it existed) reads as before: every row takes the run's option
    manifest.write_text("id,reference,moving,degradation\na,a/r.nii,a/m.nii,metal\n", encoding="utf-8")
    assert [(c.case_id, c.degradation, c.moving_modality) for c in read_manifest(manifest)] == [("a", "metal", None)]


def test_an_unknown_moving_modality_is_refused_with_its_line_before_any_work(tmp_path: Path, capsys, monkeypatch):
    manifest = tmp_path / "m.csv"
    manifest.write_text("reference,moving,moving_modality\na.nii,b.nii,mr\nc.nii,d.nii,xray\n", encoding="utf-8")
    with pytest.raises(ManifestError, match=r"m\.csv, line 3: unknown moving modality 'xray'; use auto, ct, mr, pet or "
                                            r"leave the cell empty"):
        read_manifest(manifest)

    def no_work(*args, **kwargs):
        raise AssertionError("work started although the manifest is bad")

    monkeypatch.setattr(batch, "load_model", no_work)
    monkeypatch.setattr(batch, "fuse", no_work)
    out = tmp_path / "out"
    assert main(["fuse-batch", str(manifest), "--out", str(out), *FAST]) == 1
    assert "line 3: unknown moving modality 'xray'" in capsys.readouterr().err
    assert not out.exists()  # refused before the batch folder was even created


def test_a_row_moving_modality_overrides_the_run_option_for_that_row_only(tmp_path: Path, monkeypatch):
    root = tmp_path / "cohort"
    for i in range(1, 5):
        _volume(root / f"sub-{i}" / "ref.nii.gz", 0, 100.0)
        _volume(root / f"sub-{i}" / "mov.nii.gz", 1, 50.0 + i)
    manifest = root / "cohort.csv"
    manifest.write_text("id,reference,moving,degradation,moving_modality\n"
                        "stated-pet,sub-1/ref.nii.gz,sub-1/mov.nii.gz,,PET\n"
                        "run-default,sub-2/ref.nii.gz,sub-2/mov.nii.gz,,\n"
                        "measured,sub-3/ref.nii.gz,sub-3/mov.nii.gz,motion,auto\n"
                        "degradation-only,sub-4/ref.nii.gz,sub-4/mov.nii.gz,motion,\n", encoding="utf-8")
    seen: Dict[str, tuple] = {}
    real_fuse = batch.fuse

    def spy(reference, moving, options, **kwargs):
        seen[Path(reference).parent.name] = (options.moving_modality, options.degradation)
        return real_fuse(reference, moving, options, **kwargs)

    monkeypatch.setattr(batch, "fuse", spy)
    out = tmp_path / "out"
    assert main(["fuse-batch", str(manifest), "--out", str(out), "--moving-modality", "mr", *FAST]) == 0
    assert seen == {"sub-1": ("pet", "auto"), "sub-2": ("mr", "auto"), "sub-3": ("auto", "motion"),
                    "sub-4": ("mr", "motion")}

    summary = _table(out / "summary.csv")
    assert tuple(summary[0]) == SUMMARY_COLUMNS
    by_id = {r["id"]: r for r in summary}
    assert [by_id[c]["moving_modality_used"] for c in ("stated-pet", "run-default", "degradation-only")] == \
        ["pet", "mr", "mr"]
    assert {by_id[c]["moving_modality_source"] for c in ("stated-pet", "run-default", "degradation-only")} == {"user"}
    assert by_id["measured"]["moving_modality_used"] in ("ct", "mr_or_pet")  # auto: measured on the volume
    assert by_id["measured"]["moving_modality_source"].startswith("measured")
    assert by_id["measured"]["degradation_used"] == "motion" == by_id["degradation-only"]["degradation_used"]

    # a second run reads the columns back from the reports of the finished cases
    assert main(["fuse-batch", str(manifest), "--out", str(out), *FAST]) == 0
    again = {r["id"]: r for r in _table(out / "summary.csv")}
    assert {r["status"] for r in again.values()} == {"finished-before"}
    assert [again[c]["moving_modality_used"] for c in ("stated-pet", "run-default")] == ["pet", "mr"]
    assert again["stated-pet"]["moving_modality_source"] == "user"


def test_summary_row_moving_modality_columns_tolerate_reports_without_them(tmp_path: Path):
    case = BatchCase(0, "c", tmp_path / "r.nii", tmp_path / "m.nii")
    modality = {"requested": "auto", "stated": "mr", "source": "DICOM header", "used": "mr"}
    row = summary_row(case, {"degradation": {"requested": "auto", "used": "motion", "moving_modality": modality}},
                      "fused", tmp_path)
    assert (row["moving_modality_used"], row["moving_modality_source"]) == ("mr", "DICOM header")
    for old_report in ({"degradation": {"requested": "auto", "used": "none"}}, {"device": "cpu"},
                       {"degradation": {"moving_modality": None}}):
        row = summary_row(case, old_report, "finished-before", tmp_path)
        assert (row["moving_modality_used"], row["moving_modality_source"]) == ("", "")
    failed = summary_row(case, None, "failed", tmp_path, 0.1, RuntimeError("boom"))
    assert (failed["moving_modality_used"], failed["moving_modality_source"]) == ("", "")
    assert list(row) == list(SUMMARY_COLUMNS)
