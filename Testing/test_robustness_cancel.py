"""Cancellation leaves nothing behind.

* Ctrl-C (SIGINT) and SIGTERM delivered to a running ``unifuse fuse`` process while the network runs: exit code
  130, one ``unifuse: cancelled`` line, no output folder, no staging folder.
* A Python ``cancel`` callback is honoured *during* the network's forward pass, not only between stages.
* An interruption while the outputs are being written or renamed leaves the output folder exactly as it was
  (absent, or with the previous outputs byte-identical).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import SimpleITK as sitk

from unifuse import io as uio
from unifuse.cli import EXIT_CANCELLED, EXIT_OK, main
from unifuse.errors import CancelledError
from unifuse.pipeline import OUTPUT_FILES, REPORT_FILE, fuse, load_model

CANCEL_LINE = "unifuse: cancelled (Ctrl-C); no outputs were written"


def _volume(path: Path, size=(24, 22, 20), shift=0.0) -> Path:
    z, y, x = np.meshgrid(*[np.arange(s) for s in size[::-1]], indexing="ij")
    c = np.array(size[::-1]) / 2.0
    arr = 5 + 100 * np.exp(-(((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2] - shift) ** 2) / 25.0))
    img = sitk.GetImageFromArray(arr.astype(np.float32))
    img.SetSpacing((1.5, 1.4, 1.6))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


def _digests(paths) -> Dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def _leftovers(folder: Path) -> List[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(".unifuse-partial") or ".tmp" in p.name]


# A stand-in network that signals when its forward pass has started and then runs for up to a minute: the
# signal is then certain to arrive while the network stage is running.
SLOW_NETWORK_SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    import unifuse.pipeline as pipeline
    from unifuse.config import tiny

    class SlowNet(torch.nn.Module):
        def analyse(self, reference, moving):
            print("NETWORK STARTED", file=sys.stderr, flush=True)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                time.sleep(0.01)
            raise SystemExit("no signal arrived")

    pipeline.load_model = lambda *a, **k: pipeline.LoadedModel(SlowNet(), tiny(), "slow", True, "test", {})
    from unifuse.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def _run_and_interrupt(cmd: List[str], wait_for: str, sig: int, cwd: Path) -> subprocess.CompletedProcess:
    """Start ``cmd``, send ``sig`` as soon as a stderr line starts with ``wait_for``, collect the rest."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    seen: List[str] = []
    deadline = time.monotonic() + 240
    try:
        for line in proc.stderr:
            seen.append(line.rstrip("\n"))
            if line.startswith(wait_for):
                proc.send_signal(sig)
                break
            assert time.monotonic() < deadline, "the run never reached the network stage"
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "\n".join(seen) + "\n" + err)


def _assert_cancelled_cleanly(done: subprocess.CompletedProcess, out: Path, inputs: Dict[Path, str]) -> None:
    messages = [ln for ln in done.stderr.splitlines()
                if ln.strip() and not ln.startswith(("PROGRESS ", "NETWORK STARTED"))]
    assert done.returncode == EXIT_CANCELLED, done.stderr
    assert messages == [CANCEL_LINE], done.stderr
    assert not out.exists()
    assert not _leftovers(out.parent)
    assert _digests(inputs) == inputs


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_the_network_exits_130_and_leaves_nothing(tmp_path, sig):
    ref, mov = _volume(tmp_path / "in" / "ref.nii.gz"), _volume(tmp_path / "in" / "mov.nrrd", shift=2.0)
    inputs = _digests([ref, mov])
    script = tmp_path / "slow_cli.py"
    script.write_text(SLOW_NETWORK_SCRIPT, encoding="utf-8")
    out = tmp_path / "out"
    done = _run_and_interrupt(
        [sys.executable, str(script), "fuse", "--reference", str(ref), "--moving", str(mov), "--out", str(out),
         "--device", "cpu", "--machine-progress"],
        "NETWORK STARTED", sig, tmp_path,
    )
    _assert_cancelled_cleanly(done, out, inputs)


def test_ctrl_c_during_a_real_run_of_the_unifuse_command(tmp_path):
    """The real network (tiny config on a 0.5 mm working grid, several seconds on a CPU) receives SIGINT right
    after the CLI announces the network stage."""
    ref, mov = _volume(tmp_path / "in" / "ref.nii.gz"), _volume(tmp_path / "in" / "mov.mha", shift=2.0)
    inputs = _digests([ref, mov])
    out = tmp_path / "out"
    done = _run_and_interrupt(
        [sys.executable, "-m", "unifuse", "fuse", "--reference", str(ref), "--moving", str(mov), "--out", str(out),
         "--config", "tiny", "--spacing", "0.5", "--affine", "none", "--device", "cpu", "--machine-progress"],
        "PROGRESS 0.400 running UniFuse", signal.SIGINT, tmp_path,
    )
    assert not any(ln.startswith("PROGRESS 0.550") for ln in done.stderr.splitlines())  # stopped in the network
    _assert_cancelled_cleanly(done, out, inputs)


def test_cancel_callback_is_polled_inside_the_network_forward_pass(tmp_path):
    ref_path = _volume(tmp_path / "ref.nii.gz")
    loaded = load_model(config="tiny", device="cpu")
    polls: List[int] = []
    progress: List[str] = []

    def cancel() -> bool:  # True at the 2nd poll after the network stage began (i.e. inside its forward pass)
        if progress and progress[-1].startswith("running UniFuse"):
            polls.append(1)
        return len(polls) >= 3

    with pytest.raises(CancelledError, match="cancelled by the user; nothing was written"):
        fuse(ref_path, ref_path, device="cpu", model=loaded, cancel=cancel, progress=lambda f, m: progress.append(m))
    assert len(polls) == 3  # 1: the stage's own check, 2-3: the network's top-level blocks
    assert progress[-1].startswith("running UniFuse") and not any("warping" in m for m in progress)
    assert all(not child._forward_pre_hooks for child in loaded.model.children())  # hooks removed again
    fuse(ref_path, ref_path, device="cpu", model=loaded)  # the network still works normally afterwards


def test_ctrl_c_while_writing_outputs_leaves_no_output_folder(tmp_path, capsys, monkeypatch):
    ref = _volume(tmp_path / "ref.nii.gz")
    out = tmp_path / "new" / "out"
    real_write = uio.write_image
    calls: List[Path] = []

    def write_then_interrupt(image, path, overwrite=False):
        calls.append(Path(path))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_write(image, path, overwrite)

    monkeypatch.setattr(uio, "write_image", write_then_interrupt)
    code = main(["fuse", "--reference", str(ref), "--moving", str(ref), "--out", str(out), "--config", "tiny",
                 "--device", "cpu", "--quiet"])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == EXIT_CANCELLED and lines == [CANCEL_LINE]
    assert len(calls) == 3 and calls[0].parent.name.startswith(".unifuse-partial")  # it was staging
    assert not (tmp_path / "new").exists()  # the folders the run created are gone again


def test_interrupted_overwrite_restores_the_previous_outputs(tmp_path, monkeypatch):
    ref = _volume(tmp_path / "ref.nii.gz")
    mov = _volume(tmp_path / "mov.nii.gz", shift=3.0)
    out = tmp_path / "out"
    assert main(["fuse", "--reference", str(ref), "--moving", str(ref), "--out", str(out), "--config", "tiny",
                 "--device", "cpu", "--quiet"]) == EXIT_OK
    previous = _digests(sorted(out.iterdir()))
    result = fuse(ref, mov, device="cpu", config="tiny")

    real_replace = os.replace
    count = [0]
    writes = len(OUTPUT_FILES) + 1  # the atomic writes into the staging folder each end with one os.replace

    def replace_then_interrupt(src, dst):
        count[0] += 1
        if count[0] == writes + 5:  # in the middle of moving the new outputs into place
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        result.save(out, overwrite=True)
    monkeypatch.setattr(os, "replace", real_replace)
    # interrupted while setting the 3rd old output aside; the 2 old outputs already set aside were put back
    assert count[0] == writes + 5 + 2
    assert _digests(sorted(out.iterdir())) == previous  # every old output back, byte-identical
    assert not _leftovers(tmp_path)
    paths = result.save(out, overwrite=True)  # and a normal overwrite still works
    assert sorted(p.name for p in paths.values()) == sorted([*OUTPUT_FILES.values(), REPORT_FILE])
    assert _digests(sorted(out.iterdir())) != previous
