"""Issue #15 "Nothing lost, nothing silent": every reproduction of the issue, through the ``unifuse`` CLI.

Each failing case must end with a non-zero exit code and exactly ONE line naming the problem and the fix
(exit 130 and a true statement for the interrupts of items 8-9), with every input byte-identical, previous
outputs intact, no traceback and no partial file, lock or staging folder. Runs that need real signals, a
file-size limit or two processes run the CLI in subprocesses; the rest call :func:`unifuse.cli.main`.
Item 7 (working-grid bounds) is tested with the run options.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Dict, Iterable, List

import numpy as np
import pytest
import SimpleITK as sitk

from unifuse.cli import EXIT_CANCELLED, EXIT_ERROR, EXIT_OK, main
from unifuse.outputs import LOCK_NAME, STAGING_PREFIX
from unifuse.pipeline import IMAGE_OUTPUT_FILES, OUTPUT_FILES, REPORT_FILE

#: where this version has the optional global-affine and refinement stages, skip them: ~2-3 s per CLI run
FAST = ["--affine", "none", "--refine", "none"] if importlib.util.find_spec("unifuse.options") else []
RUN = ["--config", "tiny", "--device", "cpu", "--quiet", *FAST]
OUTPUTS = sorted([*OUTPUT_FILES.values(), REPORT_FILE])
CANCEL_NOTHING = "unifuse: cancelled (Ctrl-C); no outputs were written"
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
    [str(Path(__file__).resolve().parents[1] / "UniFuseSlicer"), os.environ.get("PYTHONPATH", "")])}


# ------------------------------------------------------------------------------------------------ helpers


def volume(path: Path, size=(20, 18, 16), shift: float = 0.0, noise: float = 0.0, scale: float = 1.0) -> Path:
    """A blob (optionally with noise, which makes the compressed outputs large) written to ``path``."""
    z, y, x = np.meshgrid(*[np.arange(s) for s in size[::-1]], indexing="ij")
    c = np.array(size[::-1]) / 2.0
    arr = 5 + 100 * np.exp(-(((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2] - shift) ** 2) / 25.0))
    arr = arr + noise * np.random.default_rng(int(shift * 10)).random(arr.shape)
    img = sitk.GetImageFromArray((arr * scale).astype(np.float32))
    img.SetSpacing((1.5, 1.4, 1.6))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


def digests(paths: Iterable[Path]) -> Dict[str, str]:
    """sha256 of every file (recursively for folders)."""
    out = {}
    for p in paths:
        for f in ([p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())):
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def leftovers(root: Path) -> List[str]:
    return [str(p) for p in root.rglob("*") if p.name == LOCK_NAME or p.name.startswith(STAGING_PREFIX)
            or ".tmp" in p.name]


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def run_inprocess(capfd, *args: str) -> tuple:
    code = main([str(a) for a in args])
    captured = capfd.readouterr()
    return code, captured.err


@pytest.fixture
def pair(tmp_path):
    ref = volume(tmp_path / "in" / "ref.nii.gz")
    mov = volume(tmp_path / "in" / "mov.nii.gz", shift=2.0)
    return ref, mov


def fuse_args(ref: Path, mov: Path, out, *extra: str) -> List[str]:
    return ["fuse", "--reference", str(ref), "--moving", str(mov), "--out", str(out), *RUN, *extra]


# ------------------------------------------------------------------------- 1. failed writes are errors


def test_1_write_beyond_ulimit_f_fails_with_one_line_and_keeps_previous_outputs(tmp_path, capfd):
    ref = volume(tmp_path / "in" / "ref.nii.gz", size=(24, 24, 24), noise=40.0)
    mov = volume(tmp_path / "in" / "mov.nii.gz", size=(24, 24, 24), shift=1.0, noise=40.0)
    inputs = digests([ref, mov])
    out = tmp_path / "out"
    limited = f"ulimit -f 8; exec {sys.executable} -m unifuse " + " ".join(f"'{a}'" for a in fuse_args(ref, mov, out))

    done = subprocess.run(["bash", "-c", limited], capture_output=True, encoding="utf-8", errors="replace", timeout=180, env=ENV)
    line = one_line(done.stderr)
    assert done.returncode == EXIT_ERROR
    assert line.startswith("unifuse: error: could not write") and "ulimit -f" in line and "8192 bytes" in line
    assert not out.exists()  # nothing half-written, and the folder the run created is gone again

    assert run_inprocess(capfd, *fuse_args(ref, mov, out))[0] == EXIT_OK  # a good run without the limit
    previous = digests([out])
    done = subprocess.run(["bash", "-c", limited + " --overwrite"], capture_output=True, encoding="utf-8", errors="replace", timeout=180, env=ENV)
    assert done.returncode == EXIT_ERROR and "the previous outputs are kept" in one_line(done.stderr)
    assert digests([out]) == previous  # --overwrite did not replace good outputs with broken ones
    assert digests([ref, mov]) == inputs and not leftovers(tmp_path)


# ------------------------------------------------------------------------------------------ 2. DICOM


def write_dicom_series(vol: sitk.Image, folder: Path, uid: str, description: str = "") -> List[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    files = []
    for k in range(vol.GetDepth()):
        s = vol[:, :, k]
        tags = {"0008|0060": "MR", "0008|0018": f"{uid}.{k + 1}", "0020|000d": "1.2.826.0.1.3680043.2.1125.9",
                "0020|000e": uid, "0020|0013": str(k + 1), "0008|103e": description,
                "0020|0032": "\\".join(f"{v:.6f}" for v in vol.TransformIndexToPhysicalPoint((0, 0, k))),
                "0020|0037": "1\\0\\0\\0\\1\\0", "0018|0050": str(vol.GetSpacing()[2])}
        for tag, value in tags.items():
            s.SetMetaData(tag, value)
        files.append(folder / f"{uid[-3:]}_{k:03d}.dcm")
        writer.SetFileName(str(files[-1]))
        writer.Execute(s)
    return files


def dicom_volume(depth: int = 12) -> sitk.Image:
    arr = np.random.default_rng(depth).integers(0, 1000, size=(depth, 16, 16)).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.9, 0.9, 2.5))
    return img


@pytest.mark.parametrize("case, words", [
    ("two series", ["holds 2 DICOM series", "1.2.826.0.1.3680043.2.1125.1.100 'T1 axial' (12 slices)",
                    "1.2.826.0.1.3680043.2.1125.1.101 'T2 axial' (10 slices, in 'sub')",
                    "point --reference/--moving at a folder holding only that series"]),
    ("missing slice", ["missing or duplicated slice", "step by 2.5 mm except 5 mm from 7.50 to 12.50 mm"]),
    ("truncated slice", ["missing or duplicated slice", "not readable as its slices: 102_004.dcm"]),
    ("duplicated slice", ["missing or duplicated slice", "0 mm from"]),
])
def test_2_dicom_folders_with_several_series_or_gaps_are_refused(tmp_path, capfd, pair, case, words):
    folder = tmp_path / "dicom"
    if case == "two series":
        write_dicom_series(dicom_volume(12), folder, "1.2.826.0.1.3680043.2.1125.1.100", "T1 axial")
        write_dicom_series(dicom_volume(10), folder / "sub", "1.2.826.0.1.3680043.2.1125.1.101", "T2 axial")
    else:
        files = write_dicom_series(dicom_volume(12), folder, "1.2.826.0.1.3680043.2.1125.1.102")
        if case == "missing slice":
            files[4].unlink()
        elif case == "truncated slice":
            files[4].write_bytes(files[4].read_bytes()[:-200])
        else:
            shutil.copy(files[4], folder / "copy.dcm")
    inputs = digests([folder, *pair])
    code, err = run_inprocess(capfd, *fuse_args(folder, pair[1], tmp_path / "out"))
    line = one_line(err)
    assert code == EXIT_ERROR and line.startswith("unifuse: error: ")
    for word in words:
        assert word in line, line
    assert digests([folder, *pair]) == inputs and not (tmp_path / "out").exists()


def test_2_a_complete_single_series_still_reads(tmp_path):
    from unifuse.io import read_image

    vol = dicom_volume(12)
    write_dicom_series(vol, tmp_path / "ok", "1.2.826.0.1.3680043.2.1125.1.103")
    img = read_image(tmp_path / "ok")
    assert img.GetSize() == (16, 16, 12) and np.allclose(img.GetSpacing(), (0.9, 0.9, 2.5))


# ------------------------------------------------------------------------------- 3. concurrent runs

GATED_CLI = textwrap.dedent(
    """
    import os, sys, time
    import unifuse.pipeline as pipeline

    real = pipeline.fuse

    def gated(*args, **kwargs):
        print("FUSE STARTED", file=sys.stderr, flush=True)
        while not os.path.exists(os.environ["UNIFUSE_TEST_GATE"]):
            time.sleep(0.02)
        return real(*args, **kwargs)

    pipeline.fuse = gated
    from unifuse.cli import main
    sys.exit(main())
    """
)


def test_3_a_second_run_into_the_same_folder_is_refused_while_the_first_runs(tmp_path, capfd, pair):
    ref, mov = pair
    inputs = digests([ref, mov])
    out, gate = tmp_path / "out", tmp_path / "gate"
    script = tmp_path / "gated_cli.py"
    script.write_text(GATED_CLI, encoding="utf-8")
    first = subprocess.Popen([sys.executable, str(script), *fuse_args(ref, mov, out)], stderr=subprocess.PIPE,
                             stdout=subprocess.PIPE, encoding="utf-8", errors="replace", env={**ENV, "UNIFUSE_TEST_GATE": str(gate)})
    try:
        assert first.stderr.readline().strip() == "FUSE STARTED"  # the first run holds --out now
        code, err = run_inprocess(capfd, *fuse_args(mov, ref, out))
        line = one_line(err)
        assert code == EXIT_ERROR and "is in use by another unifuse run" in line and f"process {first.pid}" in line
        gate.touch()
        _, first_err = first.communicate(timeout=180)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == EXIT_OK, first_err
    assert sorted(p.name for p in out.iterdir()) == OUTPUTS  # the first run's outputs, complete, no lock
    assert digests([ref, mov]) == inputs and not leftovers(tmp_path)


def test_3_two_simultaneous_runs_exactly_one_writes(tmp_path, pair):
    ref, mov = pair
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-m", "unifuse", *fuse_args(a, b, out)], stderr=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, encoding="utf-8", errors="replace", env=ENV) for a, b in ((ref, mov), (mov, ref))]
    results = [(p.wait(timeout=240), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [EXIT_OK, EXIT_ERROR], results
    refused = next(err for code, err in results if code == EXIT_ERROR)
    line = one_line(refused)
    assert "in use by another unifuse run" in line or "already exist" in line
    assert sorted(p.name for p in out.iterdir()) == OUTPUTS and not leftovers(tmp_path)


# ------------------------------------------------------------------------- 4. output location errors


@pytest.mark.parametrize("case, words", [
    ("out is a file", "is a file, not a folder"),
    ("under /proc", "pseudo-filesystem"),
    ("300-character name", "allows at most 255"),
])
def test_4_output_location_errors_are_one_line_before_any_work(tmp_path, capfd, monkeypatch, pair, case, words):
    import unifuse.pipeline as pipeline

    monkeypatch.setattr(pipeline, "fuse", lambda *a, **k: pytest.fail("the pipeline ran before --out was checked"))
    (tmp_path / "a file").write_text("x", encoding="utf-8")
    out = {"out is a file": tmp_path / "a file", "under /proc": "/proc/unifuse-out",
           "300-character name": tmp_path / ("x" * 300)}[case]
    inputs = digests([*pair, tmp_path / "a file"])
    code, err = run_inprocess(capfd, *fuse_args(*pair, out))
    line = one_line(err)
    assert code == EXIT_ERROR and line.startswith("unifuse: error: ") and words in line and "--out" in line
    assert digests([*pair, tmp_path / "a file"]) == inputs and not leftovers(tmp_path)


def test_4_a_folder_that_is_not_writable_is_refused_up_front(tmp_path, capfd, monkeypatch, pair):
    """A read-only folder (for root, who may write anywhere, os.access is made to say so)."""
    import unifuse.pipeline as pipeline

    monkeypatch.setattr(pipeline, "fuse", lambda *a, **k: pytest.fail("the pipeline ran before --out was checked"))
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    os.chmod(readonly, 0o555)
    if os.access(readonly, os.W_OK):  # root
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == readonly else real(p, mode, **kw))
    try:
        code, err = run_inprocess(capfd, *fuse_args(*pair, readonly / "out"))
    finally:
        os.chmod(readonly, 0o755)
    line = one_line(err)
    assert code == EXIT_ERROR and "is not writable" in line and "--out" in line
    assert list(readonly.iterdir()) == []


# ------------------------------------------------------------------------------------------ 5. FIFO


def test_5_a_fifo_or_process_substitution_is_refused_at_once(tmp_path, capfd, pair):
    ref, mov = pair
    fifo = tmp_path / "volume.nii.gz"
    os.mkfifo(fifo)  # nobody writes into it: opening it would block forever
    t0 = time.monotonic()
    code, err = run_inprocess(capfd, *fuse_args(fifo, mov, tmp_path / "out"))
    assert code == EXIT_ERROR and "is a pipe" in one_line(err)
    substituted = f"exec {sys.executable} -m unifuse fuse --reference <(cat '{ref}') --moving '{mov}' --out " \
                  f"'{tmp_path / 'out'}' {' '.join(RUN)}"
    done = subprocess.run(["bash", "-c", substituted], capture_output=True, encoding="utf-8", errors="replace", timeout=120, env=ENV)
    assert done.returncode == EXIT_ERROR and "process substitution" in one_line(done.stderr)
    assert time.monotonic() - t0 < 110 and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ 6. NaN


@pytest.mark.parametrize("ext", ["nii.gz", "nii", "mha", "nrrd"])
def test_6_nan_and_inf_voxels_are_refused_in_every_format(tmp_path, capfd, pair, ext):
    img = sitk.ReadImage(str(pair[0]))
    arr = sitk.GetArrayFromImage(img)
    arr[3, 4, 5], arr[6, 7, 8] = np.nan, np.inf
    bad = sitk.GetImageFromArray(arr)
    bad.CopyInformation(img)
    path = tmp_path / f"nan.{ext}"
    sitk.WriteImage(bad, str(path))
    inputs = digests([path, pair[1]])
    code, err = run_inprocess(capfd, *fuse_args(path, pair[1], tmp_path / "out"))
    line = one_line(err)
    assert code == EXIT_ERROR and "2 of 5760 voxels" in line and "NaN or infinite" in line and "nan_to_num" in line
    assert digests([path, pair[1]]) == inputs and not (tmp_path / "out").exists()


def test_6_huge_but_finite_intensities_give_finite_outputs(tmp_path, capfd):
    """Intensities x 1e30 made NaN error maps (float32 squared differences overflow) with exit 0."""
    import nibabel

    ref = volume(tmp_path / "ref.nii.gz", scale=1e30)
    mov = volume(tmp_path / "mov.nii.gz", shift=2.0, scale=1e30)
    every_stage = ["fuse", "--reference", ref, "--moving", mov, "--out", tmp_path / "out", *RUN[: -len(FAST) or None]]
    code, err = run_inprocess(capfd, *every_stage)
    assert code == EXIT_OK, err
    for name in IMAGE_OUTPUT_FILES.values():  # raw data: ITK's NIfTI reader would hide NaN as 0
        data = np.asarray(nibabel.load(str(tmp_path / "out" / name)).dataobj)
        assert np.isfinite(data).all(), name
    report = json.loads((tmp_path / "out" / REPORT_FILE).read_text(encoding="utf-8"))
    assert all(np.isfinite(v) for v in report["error_map_mean"].values())


# ------------------------------------------------------------------------------ 8. Ctrl-C at startup


@pytest.mark.parametrize("how, sig, delay", [
    ("python -m unifuse", signal.SIGINT, 0.2),
    ("python -m unifuse", signal.SIGINT, 0.6),
    ("python -m unifuse", signal.SIGTERM, 1.0),
    ("unifuse", signal.SIGINT, 1.4),
    ("unifuse", signal.SIGTERM, 0.4),
])
def test_8_ctrl_c_while_importing_exits_130_with_one_true_line(tmp_path, pair, how, sig, delay):
    ref, mov = pair
    inputs = digests([ref, mov])
    out = tmp_path / "out"
    script = Path(sys.executable).with_name("unifuse")
    if how == "unifuse" and not script.exists():
        pytest.skip("the unifuse console script is not installed next to this Python")
    cmd = [str(script)] if how == "unifuse" else [sys.executable, "-m", "unifuse"]
    proc = subprocess.Popen([*cmd, *fuse_args(ref, mov, out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            encoding="utf-8", errors="replace", env=ENV)
    time.sleep(delay)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    if proc.returncode == EXIT_OK and delay >= 1.0:  # a fast machine finished the whole run first
        assert sorted(p.name for p in out.iterdir()) == OUTPUTS
        return
    assert proc.returncode == EXIT_CANCELLED, stderr
    assert one_line(stderr) == CANCEL_NOTHING
    assert not out.exists() and digests([ref, mov]) == inputs and not leftovers(tmp_path)


# -------------------------------------------------------------------------- 9. Ctrl-C around the save

INTERRUPTING_CLI = textwrap.dedent(
    """
    import os, signal, sys
    import unifuse.outputs as outputs

    when = os.environ["UNIFUSE_TEST_INTERRUPT"]
    real_write, real_stage, staged = outputs.OutputClaim.write, outputs.OutputClaim._stage, []

    def write(self, *args, **kwargs):
        paths = real_write(self, *args, **kwargs)
        if when == "after-save":
            os.kill(os.getpid(), signal.SIGINT)
        return paths

    def stage(self, *args, **kwargs):
        staged.append(1)
        if when == "staging" and len(staged) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real_stage(self, *args, **kwargs)

    outputs.OutputClaim.write, outputs.OutputClaim._stage = write, stage
    from unifuse.cli import main
    sys.exit(main())
    """
)


@pytest.mark.parametrize("when", ["after-save", "staging"])
def test_9_ctrl_c_around_the_save_says_exactly_what_was_written(tmp_path, capfd, pair, when):
    ref, mov = pair
    out = tmp_path / "out"
    assert run_inprocess(capfd, *fuse_args(mov, ref, out))[0] == EXIT_OK
    previous = digests([out])
    inputs = digests([ref, mov])
    script = tmp_path / "interrupting_cli.py"
    script.write_text(INTERRUPTING_CLI, encoding="utf-8")
    done = subprocess.run([sys.executable, str(script), *fuse_args(ref, mov, out, "--overwrite")],
                          capture_output=True, encoding="utf-8", errors="replace", timeout=180,
                          env={**ENV, "UNIFUSE_TEST_INTERRUPT": when})
    line = one_line(done.stderr)
    assert done.returncode == EXIT_CANCELLED
    if when == "after-save":
        assert line.startswith(f"unifuse: cancelled (Ctrl-C); {len(OUTPUT_FILES) + 1} output file(s) in ") and "were already complete" in line
        assert "replacing the previous ones" in line and "no outputs were written" not in line
        now = digests([out])
        assert sorted(Path(p).name for p in now) == OUTPUTS and now != previous
    else:
        assert line == f"{CANCEL_NOTHING} (the previous outputs in '{out}' are unchanged)"
        assert digests([out]) == previous
    assert digests([ref, mov]) == inputs and not leftovers(tmp_path)


# ----------------------------------------------------------------------------------------- 10. misc


def test_10_unsafe_checkpoint_is_refused_in_one_line_without_torch_advice(tmp_path, capfd, pair):
    import torch

    from unifuse.config import ModelConfig
    from unifuse.weights import checksum_path, sha256_of

    path = tmp_path / "evil.pt"
    torch.save({"format": "unifuse-checkpoint", "obj": ModelConfig()}, path)
    checksum_path(path).write_text(f"{sha256_of(path)}  {path.name}\n", encoding="utf-8")
    inputs = digests([path, *pair])
    code, err = run_inprocess(capfd, *fuse_args(*pair, tmp_path / "out"), "--weights", str(path))
    line = one_line(err)
    assert code == EXIT_ERROR and "could run code" in line and "unifuse.config.ModelConfig" in line
    assert "weights_only" not in line and "trust" not in line
    assert digests([path, *pair]) == inputs and not (tmp_path / "out").exists()


def test_10_a_weights_folder_is_called_a_folder(tmp_path, capfd, pair):
    code, err = run_inprocess(capfd, *fuse_args(*pair, tmp_path / "out"), "--weights", str(tmp_path))
    assert code == EXIT_ERROR and "is a folder; pass the checkpoint file" in one_line(err)


def test_10_overwrite_never_deletes_a_user_folder_or_an_input(tmp_path, capfd, pair):
    out = tmp_path / "out"
    (out / "fused.nii.gz").mkdir(parents=True)
    (out / "fused.nii.gz" / "notes.txt").write_text("mine", encoding="utf-8")
    code, err = run_inprocess(capfd, *fuse_args(*pair, out, "--overwrite"))
    assert code == EXIT_ERROR and "is a folder" in one_line(err)
    assert (out / "fused.nii.gz" / "notes.txt").read_text(encoding="utf-8") == "mine"

    out2 = tmp_path / "out2"
    inside = volume(out2 / "aligned.nii.gz")  # an input stored under an output's name inside --out
    before = digests([inside])
    code, err = run_inprocess(capfd, *fuse_args(inside, pair[1], out2, "--overwrite"))
    assert code == EXIT_ERROR and "is an input of this run" in one_line(err)
    assert digests([inside]) == before and sorted(p.name for p in out2.iterdir()) == ["aligned.nii.gz"]


def test_10_empty_out_does_not_write_into_the_current_folder(tmp_path, capfd, monkeypatch, pair):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    for args in (["--out", ""], ["--out="]):
        argv = ["fuse", "--reference", str(pair[0]), "--moving", str(pair[1]), *args, *RUN]
        code, err = run_inprocess(capfd, *argv)
        assert code == EXIT_ERROR and "--out is an empty string" in one_line(err)
    assert list(work.iterdir()) == []


def test_10_a_singular_direction_is_one_readable_line(tmp_path, capfd, pair):
    path = tmp_path / "singular.mha"
    sitk.WriteImage(sitk.ReadImage(str(pair[0])), str(path), False)
    text = path.read_bytes()
    start = text.index(b"TransformMatrix")
    path.write_bytes(text[:start] + b"TransformMatrix = 1 0 0 0 0 0 0 0 1" + text[text.index(b"\n", start):])
    code, err = run_inprocess(capfd, *fuse_args(path, pair[1], tmp_path / "out"))
    lines = [ln for ln in err.splitlines() if ln.startswith("unifuse:")]
    assert code == EXIT_ERROR and len(lines) == 1, err
    assert "direction cosines (1 0 0 0 0 0 0 0 1) form a singular matrix" in lines[0] and "re-export" in lines[0]
