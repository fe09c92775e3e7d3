"""unifuse.outputs: claim, stage, verify, replace — one writer for every output folder (issue #15)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import SimpleITK as sitk

from unifuse import io as uio
from unifuse import outputs
from unifuse.errors import (OutputExistsError, OutputLocationError, OutputLockedError, OutputWriteError,
                            UniFuseError)
from unifuse.outputs import LOCK_NAME, STAGING_PREFIX, claim_output_dir, deferred_signals, write_outputs


def _image(seed: int = 0, size=(12, 10, 8)) -> sitk.Image:
    arr = np.random.default_rng(seed).random(size[::-1]).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.5, 1.25, 2.0))
    return img


def _files(seed: int = 0) -> Dict[str, object]:
    return {"a.nii.gz": _image(seed), "report.json": {"seed": seed, "x": np.float32(1.5)}}


def _digests(folder: Path) -> Dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _assert_clean(folder: Path) -> None:
    """No lock, no staging folder, no temporary file left behind."""
    if folder.exists():
        left = [p.name for p in folder.iterdir() if p.name == LOCK_NAME or p.name.startswith(STAGING_PREFIX)
                or ".tmp" in p.name]
        assert not left, left
    assert not outputs.active_claims()


@pytest.fixture(autouse=True)
def _no_claims_left():
    yield
    leaked = outputs.active_claims()
    outputs.release_all()
    assert not leaked, "a test left an output folder claimed"


# ------------------------------------------------------------------------------------------ writing


def test_write_outputs_writes_verifies_and_releases(tmp_path):
    out = tmp_path / "new" / "out ü"
    paths = write_outputs(out, _files())
    assert sorted(p.name for p in paths.values()) == ["a.nii.gz", "report.json"]
    assert sitk.ReadImage(str(paths["a.nii.gz"])).GetSize() == (12, 10, 8)
    assert json.loads(paths["report.json"].read_text(encoding="utf-8")) == {"seed": 0, "x": 1.5}
    _assert_clean(out)


def test_every_payload_kind_round_trips(tmp_path):
    affine = sitk.AffineTransform(3)
    affine.SetMatrix((1.1, 0.01, 0, 0, 0.9, 0.02, 0, 0, 1.0))
    affine.SetTranslation((1.5, -2.0, 3.25))
    affine.SetCenter((4.0, 5.0, 6.0))
    files = {"field.nii.gz": sitk.Image([6, 5, 4], sitk.sitkVectorFloat32, 3), "affine.tfm": affine,
             "notes.md": "# résumé\n", "blob.bin": b"\x00\x01\x02", "list.json": [1, 2.5, None],
             "plot.png": lambda path: path.write_bytes(b"\x89PNG\r\n\x1a\n..."), "skipped.png": lambda path: None}
    paths = write_outputs(tmp_path / "o", files)
    assert "skipped.png" not in paths and not (tmp_path / "o" / "skipped.png").exists()
    back = sitk.ReadTransform(str(paths["affine.tfm"]))
    np.testing.assert_allclose(back.GetParameters(), affine.GetParameters())
    np.testing.assert_allclose(back.GetFixedParameters(), affine.GetFixedParameters())
    assert sitk.ReadImage(str(paths["field.nii.gz"])).GetNumberOfComponentsPerPixel() == 3
    assert paths["notes.md"].read_text(encoding="utf-8") == "# résumé\n"
    assert paths["blob.bin"].read_bytes() == b"\x00\x01\x02"
    _assert_clean(tmp_path / "o")


def test_existing_outputs_need_overwrite_and_overwrite_replaces_only_them(tmp_path):
    out = tmp_path / "o"
    write_outputs(out, _files(1))
    (out / "mine.txt").write_text("keep", encoding="utf-8")
    before = _digests(out)
    with pytest.raises(OutputExistsError, match="already exist.*a.nii.gz.*--overwrite"):
        claim_output_dir(out, ["a.nii.gz", "report.json"])
    assert _digests(out) == before
    write_outputs(out, _files(2), overwrite=True)
    after = _digests(out)
    assert after["mine.txt"] == before["mine.txt"] and after["a.nii.gz"] != before["a.nii.gz"]
    _assert_clean(out)


def test_a_truncated_write_is_detected_and_changes_nothing(tmp_path, monkeypatch):
    """SimpleITK's NIfTI writer reports no error when the disk is full or ulimit -f is hit: the file is
    just cut. The read-back verification must catch it; previous outputs stay."""
    out = tmp_path / "o"
    write_outputs(out, _files(1))
    before = _digests(out)
    real = uio.write_image

    def cut_write(image, path, overwrite=False):
        written = real(image, path, overwrite)
        data = Path(written).read_bytes()
        Path(written).write_bytes(data[: len(data) // 2])
        return written

    monkeypatch.setattr(uio, "write_image", cut_write)
    with pytest.raises(OutputWriteError) as info:
        write_outputs(out, _files(2), overwrite=True)
    msg = str(info.value)
    assert "could not write" in msg and "a.nii.gz" in msg and "nothing in the output folder was changed" in msg
    assert "\n" not in msg and STAGING_PREFIX not in msg
    assert _digests(out) == before
    _assert_clean(out)


def test_a_writer_exception_becomes_one_output_write_error(tmp_path, monkeypatch):
    def failing(image, path, overwrite=False):
        raise RuntimeError("Exception thrown in SimpleITK WriteImage: x.cxx:12:\nITK ERROR: NiftiImageIO(0x1): disk broke")

    monkeypatch.setattr(uio, "write_image", failing)
    with pytest.raises(OutputWriteError, match="could not write .*a.nii.gz.*disk broke") as info:
        write_outputs(tmp_path / "o", _files())
    assert "\n" not in str(info.value)
    assert not (tmp_path / "o").exists()  # the folder the claim created is removed again
    _assert_clean(tmp_path)


def test_non_finite_image_output_is_refused(tmp_path):
    arr = np.zeros((8, 8, 8), np.float32)
    arr[1, 2, 3] = np.nan
    with pytest.raises(OutputWriteError, match="1 of its voxels are NaN or infinite"):
        write_outputs(tmp_path / "o", {"bad.nii.gz": sitk.GetImageFromArray(arr)})
    assert not (tmp_path / "o").exists()


def test_interrupt_while_replacing_restores_the_previous_outputs(tmp_path, monkeypatch):
    out = tmp_path / "o"
    write_outputs(out, {f"f{i}.json": {"i": i} for i in range(4)})
    before = _digests(out)
    real = os.replace
    calls = []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 4 + 3:  # 4 staged writes, then: old f0 aside, new f0 in, old f1 aside <- Ctrl-C
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        write_outputs(out, {f"f{i}.json": {"i": -i} for i in range(4)}, overwrite=True)
    monkeypatch.setattr(os, "replace", real)
    assert _digests(out) == before
    _assert_clean(out)


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler (KeyboardInterrupt) for the test: a process started with SIGINT ignored
    (e.g. a background job of a non-interactive shell, `cmd &` in a script) has no Ctrl-C to defer."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ignored_sigint_stays_ignored_after_the_block(python_sigint):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with deferred_signals():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN  # nothing raised, nothing changed


def test_ctrl_c_during_the_renames_is_deferred_until_all_are_in_place(tmp_path, monkeypatch, python_sigint):
    out = tmp_path / "o"
    real = os.replace
    count = [0]

    def replace(src, dst):
        count[0] += 1
        if count[0] == 2 + 1:  # the first rename into place: a real SIGINT arrives
            os.kill(os.getpid(), signal.SIGINT)
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with claim_output_dir(out, ["a.json", "b.json"]) as claim:
        with pytest.raises(KeyboardInterrupt):
            claim.write({"a.json": {"a": 1}, "b.json": {"b": 2}})
        assert claim.state == "written" and [p.name for p in claim.written] == ["a.json", "b.json"]
        assert "2 output file(s)" in outputs.interrupt_summary() and "already complete" in outputs.interrupt_summary()
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "b.json"]


def test_deferred_signals_delivers_after_the_block(python_sigint):
    order = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_signals():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            order.append("block finished")
    assert order == ["block finished"]


# ------------------------------------------------------------------------------------------ location


@pytest.mark.parametrize("case, words", [
    ("empty", "empty string"),
    ("file", "is a file, not a folder"),
    ("inside-file", "which is a file"),
    ("proc", "pseudo-filesystem"),
    ("long-name", "this file system allows at most"),
    ("long-path", "this file system allows at most"),
])
def test_unusable_locations_are_refused_up_front(tmp_path, case, words):
    (tmp_path / "f").write_text("x", encoding="utf-8")
    out = {"empty": "", "file": tmp_path / "f", "inside-file": tmp_path / "f" / "sub", "proc": "/proc/unifuse-out",
           "long-name": tmp_path / ("n" * 300), "long-path": tmp_path.joinpath(*["d" * 200] * 25)}[case]
    with pytest.raises(OutputLocationError) as info:
        claim_output_dir(out, ["fused.nii.gz"])
    assert words in str(info.value) and "\n" not in str(info.value) and len(str(info.value)) < 400
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_not_writable_folder_is_refused(tmp_path, monkeypatch):
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(tmp_path) else real(path, mode))
    with pytest.raises(OutputLocationError, match="not writable"):
        claim_output_dir(tmp_path / "o", ["a.json"])
    assert not (tmp_path / "o").exists()


def test_a_folder_with_an_output_name_is_never_replaced(tmp_path):
    out = tmp_path / "o"
    (out / "fused.nii.gz").mkdir(parents=True)
    (out / "fused.nii.gz" / "keep.txt").write_text("user data", encoding="utf-8")
    for overwrite in (False, True):
        with pytest.raises(OutputLocationError, match="is a folder.*never replaces a folder"):
            claim_output_dir(out, ["fused.nii.gz"], overwrite=overwrite)
    assert (out / "fused.nii.gz" / "keep.txt").read_text(encoding="utf-8") == "user data"


def test_an_input_inside_the_output_folder_is_never_overwritten(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    uio.write_image(_image(), out / "fused.nii.gz")
    digest = hashlib.sha256((out / "fused.nii.gz").read_bytes()).hexdigest()
    os.link(out / "fused.nii.gz", tmp_path / "input.nii.gz")  # the same file under another name
    for given in (out / "fused.nii.gz", tmp_path / "input.nii.gz"):
        with pytest.raises(OutputLocationError, match="is an input of this run"):
            claim_output_dir(out, ["fused.nii.gz"], overwrite=True, inputs=[given])
    assert hashlib.sha256((out / "fused.nii.gz").read_bytes()).hexdigest() == digest
    _assert_clean(out)


def test_result_save_raises_unifuse_errors_not_bare_os_errors(tmp_path):
    from unifuse.pipeline import FusionResult

    img = _image()
    result = FusionResult(img, img, sitk.Image([12, 10, 8], sitk.sitkVectorFloat32, 3), img, img, img, "none", {},
                          {"model": "x"})
    (tmp_path / "file").write_text("x", encoding="utf-8")
    for out in (tmp_path / "file", "/proc/unifuse", tmp_path / "file" / "below"):
        with pytest.raises(UniFuseError):
            result.save(out)
    paths = result.save(tmp_path / "ok")
    assert {"fused", "report"} <= set(paths)


# ------------------------------------------------------------------------------------------ lock


def _foreign_lock(folder: Path, pid: int, host: str = "") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                                                "started": "2024-01-01 00:00:00"}), encoding="utf-8")


def test_a_folder_locked_by_a_running_process_is_refused(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _foreign_lock(tmp_path / "o", sleeper.pid)
        with pytest.raises(OutputLockedError) as info:
            claim_output_dir(tmp_path / "o", ["a.json"])
        msg = str(info.value)
        assert f"process {sleeper.pid}" in msg and "in use by another unifuse run" in msg and LOCK_NAME in msg
        _foreign_lock(tmp_path / "p", 1, host="another-host.example")  # other host: cannot tell, so locked
        with pytest.raises(OutputLockedError):
            claim_output_dir(tmp_path / "p", ["a.json"])
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_stale_lock_of_a_dead_process_is_reclaimed_with_a_note(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _foreign_lock(tmp_path / "o", dead.pid)
    with claim_output_dir(tmp_path / "o", ["a.json"]) as claim:
        assert any("stale lock" in n and str(dead.pid) in n for n in claim.notes)
        assert json.loads((tmp_path / "o" / LOCK_NAME).read_text(encoding="utf-8"))["pid"] == os.getpid()
        claim.write({"a.json": {}})
    _assert_clean(tmp_path / "o")


def test_a_second_process_is_refused_while_the_first_holds_the_folder(tmp_path):
    out = tmp_path / "o"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from unifuse.outputs import claim_output_dir\n"
         f"c = claim_output_dir({str(out)!r}, ['a.json']); print('CLAIMED', flush=True); sys.stdin.readline()\n"
         "c.write({'a.json': {'by': 'first'}}); c.release()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "CLAIMED"
        with pytest.raises(OutputLockedError, match=f"process {holder.pid}"):
            write_outputs(out, {"a.json": {"by": "second"}}, overwrite=True)
        holder.communicate("go\n", timeout=60)
    finally:
        if holder.poll() is None:
            holder.kill()
    assert holder.returncode == 0
    assert json.loads((out / "a.json").read_text(encoding="utf-8")) == {"by": "first"}
    _assert_clean(out)


def test_claiming_the_same_folder_again_in_one_process_joins_the_claim(tmp_path):
    out = tmp_path / "o"
    with claim_output_dir(out, ["a.json", "b.json"]) as outer:
        write_outputs(out, {"a.json": {"a": 1}})  # e.g. FusionResult.save inside the CLI's claim
        assert (out / LOCK_NAME).exists() and outer.state == "written"
        outer.write({"b.json": {"b": 2}})
        assert [p.name for p in outer.written] == ["a.json", "b.json"]
    _assert_clean(out)
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "b.json"]


def test_the_leftovers_of_a_killed_run_are_cleaned_up_and_previous_outputs_restored(tmp_path):
    out = tmp_path / "o"
    write_outputs(out, {"a.json": {"v": "old"}, "b.json": {"v": "old"}})
    before = _digests(out)
    staging = out / f"{STAGING_PREFIX}killed"  # as left by SIGKILL in the middle of the renames
    (staging / ".previous").mkdir(parents=True)
    os.replace(out / "a.json", staging / ".previous" / "a.json")
    (out / "a.json").write_text('{"v": "new"}', encoding="utf-8")
    (staging / "b.json").write_text('{"v": "new"}', encoding="utf-8")
    with claim_output_dir(out, ["a.json", "b.json"], overwrite=True) as claim:
        assert any("killed while writing" in n and "a.json" in n for n in claim.notes)
    assert _digests(out) == before
    _assert_clean(out)
