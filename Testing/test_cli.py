"""The ``unifuse`` command line as a user runs it: outputs, exit codes, one-line errors, demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from unifuse.cli import EXIT_ERROR, EXIT_OK, main
from unifuse.pipeline import OUTPUT_FILES, REPORT_FILE


def _volume(path: Path, size=(20, 18, 16), spacing=(1.5, 1.5, 2.0), shift=0.0, pixel=sitk.sitkFloat32) -> Path:
    z, y, x = np.meshgrid(*[np.arange(s) for s in size[::-1]], indexing="ij")
    c = np.array(size[::-1]) / 2
    arr = 100 * np.exp(-(((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2] - shift) ** 2) / 20.0)) + 5
    img = sitk.Cast(sitk.GetImageFromArray(arr.astype(np.float32)), pixel)
    img.SetSpacing(spacing)
    img.SetOrigin((-10.0, -12.0, 4.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


def test_fuse_writes_every_output_and_a_report(tmp_path, capsys):
    ref = _volume(tmp_path / "in" / "ref.nrrd")
    mov = _volume(tmp_path / "in" / "mov.mha", spacing=(1.7, 1.4, 2.5), shift=2, pixel=sitk.sitkInt16)
    before = (ref.read_bytes(), mov.read_bytes())
    out = tmp_path / "out"
    code = main(["fuse", "--reference", str(ref), "--moving", str(mov), "--out", str(out), "--config", "tiny",
                 "--device", "cpu", "--quiet"])
    assert code == EXIT_OK
    assert sorted(p.name for p in out.iterdir()) == sorted([*OUTPUT_FILES.values(), REPORT_FILE])
    report = json.loads((out / REPORT_FILE).read_text(encoding="utf-8"))
    assert report["model"]["trained"] is False and "UNTRAINED" in report["warning"]
    # 3 mm default spacing over a 30 x 27 x 32 mm overlap, edges rounded up to the tiny network's multiple of 4
    assert report["working_grid"]["spacing_mm"] == [3.0] * 3 and report["working_grid"]["size"] == [12, 12, 12]
    assert [s["name"] for s in report["stages"]][3:10] == ["header", "affine", "working_grid", "network", "refine", "warp",
                                                           "fusion"]
    fused = sitk.ReadImage(str(out / "fused.nii.gz"))
    assert fused.GetSize() == (20, 18, 16) and np.allclose(fused.GetSpacing(), (1.5, 1.5, 2.0))
    assert (ref.read_bytes(), mov.read_bytes()) == before  # inputs untouched
    text = capsys.readouterr().out
    assert "UNTRAINED" in text and "degradation used" in text and "alignment  final stage:" in text


def test_existing_outputs_need_overwrite(tmp_path, capsys):
    ref = _volume(tmp_path / "ref.nii.gz")
    out = tmp_path / "out"
    args = ["fuse", "--reference", str(ref), "--moving", str(ref), "--out", str(out), "--config", "tiny", "--quiet"]
    assert main(args) == EXIT_OK
    stamp = (out / "fused.nii.gz").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exist" in err[0] and "--overwrite" in err[0]
    assert (out / "fused.nii.gz").stat().st_mtime_ns == stamp
    assert main([*args, "--overwrite"]) == EXIT_OK


@pytest.mark.parametrize(
    "make_args, words",
    [
        (lambda d: ["--reference", str(d / "missing.nii.gz"), "--moving", str(d / "ref.nii.gz")], "does not exist"),
        (lambda d: ["--reference", str(d / "ref.nii.gz"), "--moving", str(d / "ref.nii.gz"), "--degradation", "none",
                    "--spacing", "0"], "spacing"),
    ],
)
def test_failures_exit_nonzero_with_one_line(tmp_path, capsys, make_args, words):
    _volume(tmp_path / "ref.nii.gz")
    code = main(["fuse", *make_args(tmp_path), "--out", str(tmp_path / "out"), "--config", "tiny", "--quiet"])
    assert code == EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("unifuse: error:") and words in err[0]
    assert not (tmp_path / "out").exists()


def test_machine_progress_lines_for_the_slicer_background_process(tmp_path):
    ref = _volume(tmp_path / "ref.nii.gz")
    proc = subprocess.run(
        [sys.executable, "-m", "unifuse", "fuse", "--reference", str(ref), "--moving", str(ref), "--out",
         str(tmp_path / "o"), "--config", "tiny", "--machine-progress"],
        capture_output=True, encoding="utf-8", timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    lines = [ln.split(" ", 2) for ln in proc.stderr.splitlines() if ln.startswith("PROGRESS ")]
    fractions = [float(p[1]) for p in lines]
    assert len(fractions) >= 5 and fractions == sorted(fractions) and fractions[-1] == 1.0


def test_demo_reports_metrics_against_the_truth(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--size", "32", "--config", "tiny", "--spacing", "4", "--quiet"]) == EXIT_OK
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["endpoint_error_mm"]["no_registration"] > 1.0  # the demo pair really is misaligned
    assert set(metrics["fusion"]) == {"unifuse", "no_registration+average", "no_registration+max"}
    assert (out / "demo.png").stat().st_size > 10_000
    for f in ("reference.nii.gz", "moving.nii.gz", "truth_displacement.nii.gz", *OUTPUT_FILES.values()):
        assert (out / f).is_file()
    text = capsys.readouterr().out
    assert "endpoint error (mm)" in text and "UNTRAINED" in text
