"""Running the UniFuse CLI in a child process without blocking a GUI event loop (no Qt needed).

The GUI calls :meth:`CliProcess.poll` from a timer (e.g. every 200 ms). Two reader threads copy the
child's stdout and stderr lines into a queue; ``poll`` drains that queue *in the caller's thread* and
invokes the callbacks there, so callbacks may touch Qt widgets and the MRML scene safely.

Protocol of the child (``python -m unifuse.cli fuse ... --machine-progress``):

* ``PROGRESS <fraction> <message>`` lines on stderr (fraction in [0, 1]);
* any other line is log output; on failure the last stderr line is a one-line reason;
* exit code 0 on success, non-zero on failure (130 = cancelled).
"""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
from typing import Callable, Dict, IO, List, Optional, Sequence, Tuple

__all__ = ["PROGRESS_PREFIX", "parse_progress_line", "CliProcess"]

PROGRESS_PREFIX = "PROGRESS "

ProgressCallback = Callable[[float, str], None]
LogCallback = Callable[[str], None]


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


class CliProcess:
    """One child process whose progress and log lines are delivered through :meth:`poll`.

    Args:
        command: argv of the child (see ``logic.build_cli_command``).
        env: environment of the child (see ``logic.cli_environment``); None inherits ours.
        on_progress: called as ``on_progress(fraction, message)`` for every progress line.
        on_log: called with every other output line (stdout and stderr, without the newline).
    """

    def __init__(
        self,
        command: Sequence[str],
        env: Optional[Dict[str, str]] = None,
        on_progress: Optional[ProgressCallback] = None,
        on_log: Optional[LogCallback] = None,
    ) -> None:
        self.command: List[str] = [str(c) for c in command]
        self.env = env
        self.on_progress = on_progress
        self.on_log = on_log
        self._process: Optional[subprocess.Popen] = None
        self._lines: "queue.Queue[Tuple[str, str]]" = queue.Queue()
        self._readers: List[threading.Thread] = []
        self._stderr_tail: List[str] = []
        self.cancelled = False
        self.last_fraction = 0.0

    # -- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the child; raises ``RuntimeError`` when already started, ``OSError`` when it cannot run."""
        if self._process is not None:
            raise RuntimeError("this process was already started; create a new CliProcess for another run")
        creationflags = getattr(subprocess, "CREATE_NO_WINDOW", 0) if sys.platform == "win32" else 0
        self._process = subprocess.Popen(
            self.command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=self.env,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            creationflags=creationflags,
        )
        for name, stream in (("stdout", self._process.stdout), ("stderr", self._process.stderr)):
            reader = threading.Thread(target=self._read, args=(name, stream), daemon=True)
            reader.start()
            self._readers.append(reader)

    def _read(self, name: str, stream: IO[str]) -> None:
        for line in iter(stream.readline, ""):
            self._lines.put((name, line.rstrip("\r\n")))
        stream.close()

    @property
    def started(self) -> bool:
        return self._process is not None

    @property
    def pid(self) -> Optional[int]:
        return self._process.pid if self._process is not None else None

    def poll(self) -> Optional[int]:
        """Deliver pending lines to the callbacks; return the exit code once the child ended and all its
        output was delivered, else None."""
        if self._process is None:
            raise RuntimeError("poll() before start()")
        returncode = self._process.poll()
        finished = returncode is not None
        if finished:
            for reader in self._readers:  # the pipes close when the child exits; collect the last lines
                reader.join(timeout=5.0)
        self._drain()
        return returncode if finished else None

    def wait(self, timeout: Optional[float] = None) -> int:
        """Block until the child ends (delivering lines as they come); for scripts and tests."""
        if self._process is None:
            raise RuntimeError("wait() before start()")
        try:
            self._process.wait(timeout=timeout)
        finally:
            code = self.poll()
        return int(code if code is not None else self._process.returncode)

    def _drain(self) -> None:
        while True:
            try:
                stream, line = self._lines.get_nowait()
            except queue.Empty:
                return
            parsed = parse_progress_line(line) if stream == "stderr" else None
            if parsed is not None:
                self.last_fraction = parsed[0]
                if self.on_progress is not None:
                    self.on_progress(*parsed)
                continue
            if stream == "stderr" and line.strip():
                self._stderr_tail = (self._stderr_tail + [line])[-20:]
            if self.on_log is not None:
                self.on_log(line)

    def cancel(self, timeout: float = 5.0) -> None:
        """Stop the child: terminate, then kill if it is still alive after ``timeout`` seconds."""
        if self._process is None or self._process.poll() is not None:
            return
        self.cancelled = True
        self._process.terminate()
        try:
            self._process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=timeout)
        self.poll()

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
