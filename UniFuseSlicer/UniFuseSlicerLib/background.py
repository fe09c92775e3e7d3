"""Running the UniFuse CLI in a child process without blocking a GUI event loop (no Qt needed).

The GUI calls :meth:`CliProcess.poll` from a timer (e.g. every 200 ms). Two reader threads copy the
child's stdout and stderr lines into a queue; ``poll`` drains that queue *in the caller's thread* and
invokes the callbacks there, so callbacks may touch Qt widgets and the MRML scene safely. No method here
waits for the child: :meth:`CliProcess.cancel` only sends a signal and returns, and :meth:`CliProcess.poll`
escalates to a hard kill once the grace period is over.

Process tree. Inside Slicer the child is the ``PythonSlicer`` *launcher*, which starts the real Python
interpreter as its own child; stopping only the launcher leaves that interpreter (and anything it started)
running. So the child starts in its own session / process group and the whole group is signalled:

* POSIX: ``start_new_session=True``; cancel sends SIGTERM to the group (the CLI turns SIGTERM into exit code
  130 and removes any partial output), SIGKILL to the group after the grace period, and SIGKILL to whatever
  is left of the group once the launcher has exited;
* Windows: ``CREATE_NEW_PROCESS_GROUP``; cancel ends the tree with ``psutil`` when it is installed (it is not
  a dependency), else with ``taskkill /T /F /PID <pid>`` started without waiting for it.

Protocol of the child (``python -m unifuse.cli fuse ... --machine-progress``):

* ``PROGRESS <fraction> <message>`` lines on stderr (fraction in [0, 1]);
* any other line is log output; on failure the last stderr line is a one-line reason;
* exit code 0 on success, non-zero on failure (130 = cancelled).
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, IO, List, Optional, Sequence, Tuple

__all__ = [
    "PROGRESS_PREFIX",
    "parse_progress_line",
    "CliProcess",
    "kill_process_tree",
    "popen_group_options",
    "pid_alive",
    "windows_tree_kill_command",
]

PROGRESS_PREFIX = "PROGRESS "
#: Seconds between the polite stop (SIGTERM) and the hard kill of the process group.
DEFAULT_GRACE_S = 5.0
#: Seconds ``poll`` keeps waiting for the reader threads after the child exited (they end when the pipes close).
READER_GRACE_S = 3.0

ProgressCallback = Callable[[float, str], None]
LogCallback = Callable[[str], None]

_WINDOWS = sys.platform == "win32"


def parse_progress_line(line: str) -> Optional[Tuple[float, str]]:
    """``"PROGRESS 0.350 running UniFuse"`` -> ``(0.35, "running UniFuse")``; None for any other line.

    Fractions are clamped to [0, 1]; a malformed number makes the line a plain log line (None).
    """
    text = line.rstrip("\r\n")
    if not text.startswith(PROGRESS_PREFIX):
        return None
    parts = text[len(PROGRESS_PREFIX):].split(" ", 1)
    try:
        fraction = float(parts[0])
    except ValueError:
        return None
    if fraction != fraction:  # NaN
        return None
    message = parts[1].strip() if len(parts) > 1 else ""
    return min(max(fraction, 0.0), 1.0), message


def popen_group_options(windows: bool = _WINDOWS) -> Dict[str, object]:
    """``subprocess.Popen`` keyword arguments that start the child as the leader of a new process group
    (POSIX: a new session; Windows: a new process group, console window hidden)."""
    if windows:
        flags = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x200) | getattr(subprocess, "CREATE_NO_WINDOW", 0x8000000)
        return {"creationflags": flags}
    return {"start_new_session": True}


def windows_tree_kill_command(pid: int) -> List[str]:
    """``taskkill`` argv that ends ``pid`` and all its descendants at once (Windows)."""
    return ["taskkill", "/T", "/F", "/PID", str(int(pid))]


def pid_alive(pid: int) -> bool:
    """True while a process with this pid exists and is not a zombie (POSIX; psutil on Windows if present)."""
    if _WINDOWS:
        try:
            import psutil
        except ImportError:
            return False
        return psutil.pid_exists(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie still "exists" for kill(0); it is dead for our purpose
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except OSError:
        return True


def _exited_unreaped(pid: int) -> bool:
    """POSIX: True when the child ``pid`` has exited but was not reaped yet (``waitid`` with ``WNOWAIT``)."""
    if _WINDOWS or not hasattr(os, "waitid"):
        return False
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # already reaped
        return False


def kill_process_tree(pid: int, hard: bool = False, group: bool = True) -> None:
    """Signal the process ``pid`` and its descendants without waiting for them.

    Args:
        pid: the child started with :func:`popen_group_options` (so on POSIX its pid is its group id).
        hard: SIGKILL instead of SIGTERM (POSIX); on Windows the tree is always ended forcibly.
        group: POSIX: signal the whole process group ``pid`` (else only the process).
    """
    if _WINDOWS:
        try:
            import psutil
        except ImportError:
            psutil = None
        if psutil is not None:
            try:
                parent = psutil.Process(pid)
                for proc in [*parent.children(recursive=True), parent]:
                    try:
                        proc.kill()
                    except psutil.NoSuchProcess:
                        pass
            except psutil.NoSuchProcess:
                pass
            return
        try:
            subprocess.Popen(windows_tree_kill_command(pid), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))
        except OSError:
            pass
        return
    sig = signal.SIGKILL if hard else signal.SIGTERM
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already gone (or the pid was never ours)


class CliProcess:
    """One child process (and its descendants) whose progress and log lines are delivered through :meth:`poll`.

    Args:
        command: argv of the child (see ``logic.build_cli_command``).
        env: environment of the child (see ``logic.cli_environment``); None inherits ours.
        on_progress: called as ``on_progress(fraction, message)`` for every progress line.
        on_log: called with every other output line (stdout and stderr, without the newline).
        cwd: working folder of the child.
    """

    def __init__(
        self,
        command: Sequence[str],
        env: Optional[Dict[str, str]] = None,
        on_progress: Optional[ProgressCallback] = None,
        on_log: Optional[LogCallback] = None,
        cwd: Optional[str] = None,
    ) -> None:
        self.command: List[str] = [str(c) for c in command]
        self.env = env
        self.cwd = cwd
        self.on_progress = on_progress
        self.on_log = on_log
        self._process: Optional[subprocess.Popen] = None
        self._lines: "queue.Queue[Tuple[str, str]]" = queue.Queue()
        self._readers: List[threading.Thread] = []
        self._stderr_tail: List[str] = []
        self._kill_at: Optional[float] = None
        self._exited_at: Optional[float] = None
        self._group_reaped = False
        self.cancelled = False

    # -- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the child; raises ``RuntimeError`` when already started, ``OSError`` when it cannot run."""
        if self._process is not None:
            raise RuntimeError("this process was already started; create a new CliProcess for another run")
        self._process = subprocess.Popen(
            self.command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=self.env,
            cwd=self.cwd,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            **popen_group_options(),
        )
        for name, stream in (("stdout", self._process.stdout), ("stderr", self._process.stderr)):
            reader = threading.Thread(target=self._read, args=(name, stream), daemon=True,
                                      name=f"UniFuse {name} reader")
            reader.start()
            self._readers.append(reader)

    def _read(self, name: str, stream: IO[str]) -> None:
        try:
            for line in iter(stream.readline, ""):
                self._lines.put((name, line.rstrip("\r\n")))
        except (OSError, ValueError):  # the pipe was closed under us
            pass
        finally:
            try:
                stream.close()
            except OSError:
                pass

    @property
    def pid(self) -> Optional[int]:
        return self._process.pid if self._process is not None else None

    def poll(self) -> Optional[int]:
        """Deliver pending lines to the callbacks; return the exit code once the child ended and all its
        output was delivered, else None. Never blocks."""
        if self._process is None:
            raise RuntimeError("poll() before start()")
        now = time.monotonic()
        if not self._group_reaped and _exited_unreaped(self._process.pid):
            # The launcher has exited but is not reaped yet, so its pid (= the group id) cannot be reused:
            # end whatever it left behind in its group (the interpreter it started, a grandchild). This also
            # closes pipes a grandchild inherited, so the reader threads can finish.
            self._group_reaped = True
            kill_process_tree(self._process.pid, hard=True)
        returncode = self._process.poll()
        if returncode is None and self._kill_at is not None and now >= self._kill_at:
            kill_process_tree(self._process.pid, hard=True)  # the polite stop was ignored
            self._kill_at = None
        if returncode is not None and self._exited_at is None:
            self._exited_at = now
            if not self._group_reaped and not _WINDOWS:
                # No waitid(WNOWAIT) here (macOS before Python 3.13): the group is ended right after reaping.
                self._group_reaped = True
                kill_process_tree(self._process.pid, hard=True)
        self._drain()
        if returncode is None:
            return None
        if any(r.is_alive() for r in self._readers) and now - self._exited_at < READER_GRACE_S:
            return None  # the last lines are still on their way
        self._drain()
        return returncode

    def wait(self, timeout: Optional[float] = None, interval: float = 0.05) -> int:
        """Poll until the child ended and its output was delivered (for scripts and tests).

        Raises:
            subprocess.TimeoutExpired: still running after ``timeout`` seconds (the child is left running).
        """
        if self._process is None:
            raise RuntimeError("wait() before start()")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            code = self.poll()
            if code is not None:
                return int(code)
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.command, timeout)
            time.sleep(interval)

    def _drain(self) -> None:
        while True:
            try:
                stream, line = self._lines.get_nowait()
            except queue.Empty:
                return
            parsed = parse_progress_line(line) if stream == "stderr" else None
            if parsed is not None:
                if self.on_progress is not None:
                    self.on_progress(*parsed)
                continue
            if stream == "stderr" and line.strip():
                self._stderr_tail = (self._stderr_tail + [line])[-20:]
            if self.on_log is not None:
                self.on_log(line)

    def cancel(self, grace_s: float = DEFAULT_GRACE_S) -> None:
        """Ask the child and its descendants to stop, and return at once.

        POSIX: SIGTERM to the process group now, SIGKILL from the first :meth:`poll` after ``grace_s``
        seconds; Windows: the tree is ended at once. The exit is reported by :meth:`poll` as usual.
        """
        if self._process is None or self._process.poll() is not None:
            return
        self.cancelled = True
        if _WINDOWS:
            kill_process_tree(self._process.pid, hard=True)
            return
        kill_process_tree(self._process.pid, hard=grace_s <= 0)
        self._kill_at = time.monotonic() + max(float(grace_s), 0.0)

    # -- results -----------------------------------------------------------------------------------------

    @property
    def returncode(self) -> Optional[int]:
        return self._process.returncode if self._process is not None else None

    def error_message(self) -> str:
        """One readable line on why the child failed (its last stderr line), for a message box."""
        if self.cancelled:
            return "cancelled by the user"
        if self._stderr_tail:
            return self._stderr_tail[-1].strip()
        code = self.returncode
        return f"the UniFuse process ended with exit code {code} without an error message; see the log"

    def stderr_tail(self) -> List[str]:
        """The last (at most 20) non-progress stderr lines, for the details in the log."""
        return list(self._stderr_tail)
