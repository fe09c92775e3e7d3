"""The background-process machinery of the Slicer module (UniFuseSlicerLib.background / .workdir / .logic):
cancelling ends the whole process tree without blocking, output files are read off the polling thread,
temporary folders go where Slicer keeps them and can be kept for debugging.

The process-tree tests spawn a real child that itself spawns a grandchild sleeper - the shape of a run
inside Slicer, where the child is the ``PythonSlicer`` launcher and the grandchild the real interpreter.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer")

from UniFuseSlicerLib import background, logic, options, volumes, workdir  # noqa: E402

POSIX = sys.platform != "win32"

#: A child that starts a grandchild sleeper, reports both pids and sleeps; ``ignore`` makes both ignore SIGTERM.
TREE_SCRIPT = r"""
import signal, subprocess, sys, time
ignore = sys.argv[1] == "ignore"
if ignore:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
grandchild = "import signal, time\n" + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if ignore else "") + "time.sleep(120)"
g = subprocess.Popen([sys.executable, "-c", grandchild])
print(f"GRANDCHILD {g.pid}", flush=True)
print("PROGRESS 0.1 sleeping", file=sys.stderr, flush=True)
time.sleep(120)
"""


def _start_tree(ignore_sigterm: bool = False):
    log = []
    process = background.CliProcess([sys.executable, "-c", TREE_SCRIPT, "ignore" if ignore_sigterm else "plain"],
                                    on_log=log.append)
    process.start()
    deadline = time.monotonic() + 30
    while not any(line.startswith("GRANDCHILD ") for line in log):
        assert process.poll() is None, "the child ended early"
        assert time.monotonic() < deadline, "the child did not start its grandchild"
        time.sleep(0.05)
    grandchild = int(next(line for line in log if line.startswith("GRANDCHILD ")).split()[1])
    return process, process.pid, grandchild


def _wait_gone(pids, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [pid for pid in pids if background.pid_alive(pid)]
        if not alive:
            return []
        time.sleep(0.05)
    return alive


def _poll_until_end(process, timeout=20.0):
    """Poll like the GUI timer does; every poll must return at once."""
    deadline = time.monotonic() + timeout
    slowest = 0.0
    while True:
        t = time.monotonic()
        code = process.poll()
        slowest = max(slowest, time.monotonic() - t)
        if code is not None:
            return code, slowest
        assert time.monotonic() < deadline, "the process tree did not end"
        time.sleep(0.02)


@pytest.mark.skipif(not POSIX, reason="process groups and /proc: POSIX")
def test_cancel_ends_child_and_grandchild_without_blocking():
    process, child, grandchild = _start_tree()
    assert background.pid_alive(child) and background.pid_alive(grandchild)
    t = time.monotonic()
    process.cancel()
    assert time.monotonic() - t < 0.2, "cancel() waited for the process"
    code, slowest = _poll_until_end(process)
    assert code != 0 and process.cancelled
    assert slowest < 0.2, f"a poll() call blocked for {slowest:.2f} s"
    assert _wait_gone([child, grandchild]) == [], "a process of the cancelled tree is still running"


@pytest.mark.skipif(not POSIX, reason="process groups and /proc: POSIX")
def test_cancel_escalates_to_kill_when_the_tree_ignores_sigterm():
    process, child, grandchild = _start_tree(ignore_sigterm=True)
    t = time.monotonic()
    process.cancel(grace_s=0.5)
    assert time.monotonic() - t < 0.2
    time.sleep(0.3)
    assert process.poll() is None  # still inside the grace period: SIGTERM was ignored
    code, slowest = _poll_until_end(process)
    assert code == -9 and slowest < 0.2
    assert _wait_gone([child, grandchild]) == []


@pytest.mark.skipif(not POSIX, reason="process groups and /proc: POSIX")
def test_a_grandchild_left_behind_by_an_exiting_launcher_is_ended_and_does_not_hang_poll():
    """The launcher exits while the interpreter it started keeps the pipes open: poll must neither hang on
    the pipes nor leave the interpreter running."""
    script = ("import subprocess, sys\n"
              "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
              "print(f'GRANDCHILD {g.pid}', flush=True)\n")
    log = []
    process = background.CliProcess([sys.executable, "-c", script], on_log=log.append)
    process.start()
    code, slowest = _poll_until_end(process)
    assert code == 0 and slowest < 0.2
    grandchild = int(next(line for line in log if line.startswith("GRANDCHILD ")).split()[1])
    assert _wait_gone([grandchild]) == []


def test_children_start_in_their_own_process_group():
    assert background.popen_group_options(windows=False) == {"start_new_session": True}
    flags = background.popen_group_options(windows=True)["creationflags"]
    assert flags & 0x200  # CREATE_NEW_PROCESS_GROUP
    assert background.windows_tree_kill_command(1234) == ["taskkill", "/T", "/F", "/PID", "1234"]
    if POSIX:
        process = background.CliProcess([sys.executable, "-c", "import os; print(os.getpgid(0), os.getsid(0))"],
                                        on_log=(lines := []).append)
        process.start()
        assert process.wait(timeout=30) == 0
        assert lines == [f"{process.pid} {process.pid}"]  # group and session leader: signals reach its tree


def test_work_dirs_go_under_slicers_temporary_folder(tmp_path, monkeypatch):
    assert workdir.temporary_parent() == Path(__import__("tempfile").gettempdir())  # slicer-core: no app
    app = type("App", (), {"temporaryPath": str(tmp_path / "SlicerTemp")})()
    monkeypatch.setattr(slicer, "app", app, raising=False)
    first, second = workdir.make_work_dir(), workdir.make_work_dir()
    assert first.parent == second.parent == tmp_path / "SlicerTemp" and first != second
    assert first.name.startswith("UniFuse-") and not any(first.iterdir())
    workdir.remove_work_dir(first)
    assert not first.exists()
    assert workdir.keep_temporary_files_requested({"UNIFUSE_KEEP_TEMPORARY_FILES": "1"})
    assert not workdir.keep_temporary_files_requested({})


def _pair(scene):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_slicer_logic import synthetic_pair

    reference_image, moving_image = synthetic_pair()
    return (volumes.image_to_volume_node(reference_image, scene, "reference"),
            volumes.image_to_volume_node(moving_image, scene, "moving"))


def test_keep_temporary_files_keeps_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(slicer, "app", type("App", (), {"temporaryPath": str(tmp_path)})(), raising=False)
    scene = slicer.vtkMRMLScene()
    reference, moving = _pair(scene)
    log = []
    run = logic.FusionLogic(scene).start_background(reference, moving, device="cpu", weights=tmp_path / "none.pt",
                                                    on_log=log.append, keep_temporary_files=True)
    with pytest.raises(Exception, match="none.pt"):
        run.wait(timeout=120)
    assert run.work_dir.parent == tmp_path
    assert (run.work_dir / "inputs" / "reference.nrrd").is_file() and (run.work_dir / "inputs" / "moving.nrrd").is_file()
    assert any(str(run.work_dir) in line for line in log)
    workdir.remove_work_dir(run.work_dir)


def test_outputs_are_read_on_a_worker_thread(monkeypatch):
    """The GUI thread only adds nodes: reading/decompressing the output files happens elsewhere, and polls
    during the read return at once."""
    scene = slicer.vtkMRMLScene()
    reference, moving = _pair(scene)
    real_reader = logic.read_cli_outputs
    threads = []

    def slow_reader(out_dir):
        threads.append(threading.current_thread())
        time.sleep(1.0)
        return real_reader(out_dir)

    monkeypatch.setattr(logic, "read_cli_outputs", slow_reader)
    run = logic.FusionLogic(scene).start_background(reference, moving, device="cpu", config="tiny", spacing_mm=4.0,
                                                    affine="none", refine="none")
    polls_during_read = []
    deadline = time.monotonic() + 180
    nodes = None
    while nodes is None:
        t = time.monotonic()
        nodes = run.poll()
        if threads and nodes is None:
            polls_during_read.append(time.monotonic() - t)
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert threads and threads[0] is not threading.main_thread()
    assert len(polls_during_read) >= 5 and max(polls_during_read) < 0.2
    assert nodes.fused.GetImageData().GetDimensions() == reference.GetImageData().GetDimensions()
    assert not run.work_dir.exists()


def test_cancel_while_reading_adds_nothing(monkeypatch):
    scene = slicer.vtkMRMLScene()
    reference, moving = _pair(scene)
    real_reader = logic.read_cli_outputs
    started = threading.Event()

    def slow_reader(out_dir):
        started.set()
        time.sleep(0.5)
        return real_reader(out_dir)

    monkeypatch.setattr(logic, "read_cli_outputs", slow_reader)
    before = scene.GetNumberOfNodes()
    run = logic.FusionLogic(scene).start_background(reference, moving, device="cpu", config="tiny", spacing_mm=4.0,
                                                    affine="none", refine="none")
    deadline = time.monotonic() + 180
    while not started.is_set():
        assert run.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    run.cancel()
    from unifuse.errors import CancelledError

    with pytest.raises(CancelledError):
        while run.poll() is None:
            time.sleep(0.05)
    assert scene.GetNumberOfNodes() == before and not run.work_dir.exists()


def test_device_probe_runs_in_a_child_and_parses_its_answer():
    assert options.parse_probe_output(["noise", "UNIFUSE_GPUS null"]) is None
    assert options.parse_probe_output(["UNIFUSE_GPUS [[0, \"NVIDIA H200\", 139.8]]"]) == [options.GpuInfo(0, "NVIDIA H200", 139.8)]
    assert options.parse_probe_output(["UNIFUSE_GPUS {broken"]) is None
    assert options.parse_probe_output([]) is None
    done = []
    probe = options.DeviceProbe(python=sys.executable, on_done=done.append).start()
    deadline = time.monotonic() + 120
    while not probe.poll():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    import torch

    expected = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert probe.gpus is not None and len(probe.gpus) == expected and done == [probe.gpus]
