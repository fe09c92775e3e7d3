"""One writer for every output folder: claim, stage, verify, replace.

Used by :meth:`unifuse.pipeline.FusionResult.save`, ``unifuse fuse``, ``unifuse demo`` and ``unifuse bench``
(and meant for batch runs)::

    with claim_output_dir(out, ["fused.nii.gz", "report.json"], overwrite, inputs=(ref, mov)) as claim:
        ...                                   # the long computation
        claim.write({"fused.nii.gz": image, "report.json": report})

1. **claim** (:func:`claim_output_dir`, before any heavy work): the location is checked — an empty path, a
   file instead of a folder, a path or name longer than the file system allows, a pseudo-filesystem
   (``/proc``, ``/sys``, ``/dev``), a folder that cannot be created or written, an output name taken by a
   folder or by one of the inputs, and (without ``overwrite``) existing outputs — and an exclusive lock
   file :data:`LOCK_NAME` (pid, host, time) is created with ``O_EXCL``, so a second run into the same folder
   is refused at once. A lock left by a process of this host that no longer runs is reclaimed (with a note).
   Claiming the same folder again in the same process returns the same claim (``FusionResult.save`` inside
   the CLI's claim).
2. **stage**: :meth:`OutputClaim.write` writes every file into a hidden ``.unifuse-partial-*`` folder inside
   the output folder; the native libraries' stderr (ITK, niftilib) is captured meanwhile.
3. **verify**: every staged file is non-empty and reads back: images by their header (size, spacing, pixel
   type) and, for NIfTI, the complete compressed data stream; transforms with ``sitk.ReadTransform``; JSON
   parses; text and bytes compare equal. SimpleITK's writers do not report every failure (a full disk or a
   ``ulimit -f`` limit leaves a truncated ``.nii.gz`` and exit status 0), so this check is what catches them.
4. **replace**: only then are the targets renamed into place, with Ctrl-C/SIGTERM deferred for those few
   renames; outputs replaced with ``overwrite`` are kept aside until every new file is in place. If anything
   fails or is interrupted, the output folder is restored exactly as it was. ``overwrite`` only ever replaces
   the named output files: never a folder, never an input.

:func:`interrupt_summary` says exactly what the active claims have written (for a message after Ctrl-C).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from .errors import OutputExistsError, OutputLocationError, OutputLockedError, OutputWriteError, UniFuseError

__all__ = [
    "LOCK_NAME",
    "STAGING_PREFIX",
    "OutputClaim",
    "claim_output_dir",
    "write_outputs",
    "result_files",
    "active_claims",
    "release_all",
    "interrupt_summary",
    "deferred_signals",
]

PathLike = Union[str, "os.PathLike[str]"]
#: What :meth:`OutputClaim.write` writes: an image (by extension: .nii.gz, .nii, .nrrd, .mha), an ITK
#: transform (.tfm, .txt, .h5, .mat), a dict/list (JSON), str (UTF-8 text), bytes, or a callable
#: ``write(path)`` that creates the file (returning None without creating it skips that output).
Payload = Any

LOCK_NAME = ".unifuse.lock"
STAGING_PREFIX = ".unifuse-partial-"
_PREVIOUS = ".previous"  # inside the staging folder: outputs replaced with overwrite, until all are in place
#: File systems that only look like folders: writing there fails or does something else.
PSEUDO_FILESYSTEMS = frozenset({
    "proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs", "pstore",
    "bpf", "configfs", "fusectl", "mqueue", "efivarfs", "binfmt_misc", "autofs", "nsfs", "rpc_pipefs",
})

_ACTIVE: List["OutputClaim"] = []
_STDERR_LOCK = threading.Lock()  # file descriptor 2 is process-wide: one capture at a time
_REGISTRY_LOCK = threading.RLock()  # claiming/releasing is atomic across threads (e.g. batch workers)


# ------------------------------------------------------------------------------------------------ signals


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT/SIGTERM for the duration of the block, then deliver them to the previous handlers.

    Used around the few renames that replace outputs and around claiming/releasing, so Ctrl-C cannot
    leave half-replaced outputs or a lock file nobody owns. Outside the main thread it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: List[int] = []
    previous: Dict[int, Any] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, lambda signum, frame: received.append(signum))
        except (ValueError, OSError):  # pragma: no cover - signals not available here
            pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        if received:
            _redeliver(received[0], previous.get(received[0]))


def _redeliver(signum: int, handler: Any) -> None:
    if callable(handler):
        handler(signum, None)
    elif handler == signal.SIG_DFL:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        os.kill(os.getpid(), signum)


# ------------------------------------------------------------------------------------------------ location


def _mount_type(path: Path) -> str:
    """File-system type of the mount holding ``path`` (from /proc/self/mounts; "" when unknown)."""
    try:
        lines = Path("/proc/self/mounts").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    best, kind = "", ""
    real = os.path.realpath(path)
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].encode("latin-1", "replace").decode("unicode_escape")  # "\040" = space
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, parts[2]
    return kind


def _first_existing(path: Path) -> Path:
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _limit(folder: Path, name: str, default: int) -> int:
    try:
        return int(os.pathconf(folder, name))
    except (OSError, ValueError, AttributeError):  # (no pathconf on Windows)
        return default


def _check_lengths(display: str, folder: Path, names: Sequence[str], anchor: Path) -> None:
    name_max = _limit(anchor, "PC_NAME_MAX", 255)
    path_max = _limit(anchor, "PC_PATH_MAX", 4096)
    longest = max([len(os.fsencode(n)) for n in names] + [len(STAGING_PREFIX) + 8, len(LOCK_NAME)])
    for part in folder.parts:
        if len(os.fsencode(part)) > name_max:
            raise OutputLocationError(
                f"the output folder has a name of {len(os.fsencode(part))} bytes ('{part[:24]}…'); this file "
                f"system allows at most {name_max}: choose a shorter --out"
            )
    total = len(os.fsencode(str(folder))) + 1 + longest
    if total >= path_max:
        raise OutputLocationError(
            f"the output folder '{display[:40]}…' makes output paths of {total} bytes; this file system allows at "
            f"most {path_max - 1}: choose a shorter --out"
        )


def _input_ids(inputs: Iterable[PathLike]) -> Dict[Tuple[int, int], str]:
    ids = {}
    for item in inputs:
        try:
            st = os.stat(item)
        except (OSError, TypeError, ValueError):
            continue
        ids[(st.st_dev, st.st_ino)] = os.fspath(item)
    return ids


def check_targets(display: str, folder: Path, names: Sequence[str], overwrite: bool,
                   inputs: Mapping[Tuple[int, int], str]) -> List[str]:
    """Refuse output names taken by a folder, a non-file or an input, and existing outputs unless ``overwrite``;
    return the existing outputs. The one "refuse existing outputs" rule (``unifuse.io``'s writers use it too)."""
    existing = []
    for name in names:
        target = folder / name
        try:
            st = os.lstat(target)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise _location_error(display, exc) from exc
        where = f"'{os.path.join(display, name)}'"
        if stat.S_ISDIR(st.st_mode):
            raise OutputLocationError(
                f"{where} is a folder, but unifuse writes a file of that name there (--overwrite never replaces "
                "a folder); move or rename that folder, or choose another --out"
            )
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            raise OutputLocationError(f"{where} exists and is not a regular file; move it away or choose another --out")
        try:
            real = os.stat(target)
            key = (real.st_dev, real.st_ino)
        except OSError:
            key = (-1, -1)
        if key in inputs:
            given = "" if os.path.normpath(inputs[key]) == os.path.normpath(os.path.join(display, name)) else (
                f" (given as '{inputs[key]}')")
            raise OutputLocationError(
                f"{where} is an input of this run{given} and also the name of one of its outputs: writing the "
                "outputs would overwrite it; choose another --out (or move the input out of that folder)"
            )
        existing.append(name)
    if existing and not overwrite:
        raise OutputExistsError(
            f"output file(s) already exist in '{display}': {', '.join(existing[:7])}"
            f"{f' and {len(existing) - 7} more' if len(existing) > 7 else ''}; choose another --out or pass "
            "--overwrite (overwrite=True)"
        )
    return existing


def _location_error(display: str, exc: OSError) -> OutputLocationError:
    reasons = {
        errno.EACCES: "permission denied", errno.EPERM: "permission denied", errno.EROFS: "read-only file system",
        errno.ENOSPC: "the disk is full", errno.EDQUOT: "disk quota exceeded", errno.ENAMETOOLONG: "name too long",
        errno.ENOTDIR: "a part of the path is a file, not a folder", errno.EEXIST: "it exists and is not a folder",
    }
    reason = reasons.get(exc.errno or 0, exc.strerror or str(exc))
    return OutputLocationError(
        f"cannot write into the output folder '{display}': {reason}; choose a folder you can write to (--out)"
    )


def _validate_location(display: str, folder: Path, names: Sequence[str], overwrite: bool,
                       inputs: Mapping[Tuple[int, int], str]) -> List[str]:
    anchor = _first_existing(folder)
    if anchor.exists() and not anchor.is_dir():
        what = "is a file" if anchor == folder else f"is inside '{anchor}', which is a file"
        raise OutputLocationError(f"the output folder '{display}' {what}, not a folder; choose a folder for --out")
    _check_lengths(display, folder, names, anchor)
    kind = _mount_type(anchor)
    if kind in PSEUDO_FILESYSTEMS:
        raise OutputLocationError(
            f"the output folder '{display}' is on the {kind} pseudo-filesystem (like /proc, /sys, /dev), which "
            "holds no files; choose a folder on a disk for --out"
        )
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise OutputLocationError(
            f"cannot write into the output folder '{display}': '{anchor}' is not writable for you; choose a "
            "folder you can write to (--out)"
        )
    return check_targets(display, folder, names, overwrite, inputs)


def _make_folder(display: str, folder: Path) -> List[Path]:
    """Create ``folder`` (and missing parents); return the folders created, deepest first."""
    created = []
    probe = folder
    while not os.path.lexists(probe) and probe != probe.parent:
        created.append(probe)
        probe = probe.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _remove_empty(created)
        raise _location_error(display, exc) from exc
    return created


def _remove_empty(folders: Sequence[Path]) -> None:
    for path in folders:  # deepest first; stop at the first one that is not empty
        try:
            path.rmdir()
        except OSError:
            break


# ------------------------------------------------------------------------------------------------ lock


def _lock_text() -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:300]})


def _read_lock(path: Path) -> Dict[str, Any]:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate it there: never reclaim automatically
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _is_stale(info: Dict[str, Any], lock: Path) -> bool:
    """A lock of this host whose process is gone (or our own pid, not held by an active claim)."""
    if not info:  # unreadable: being written this very moment, or garbage left long ago
        try:
            return time.time() - lock.stat().st_mtime > 60
        except OSError:
            return True
    if info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
        return False
    return info["pid"] == os.getpid() or not _pid_alive(info["pid"])


def _acquire_lock(display: str, folder: Path) -> List[str]:
    """Create the lock file with O_EXCL; reclaim a stale one once. Returns notes (a reclaimed lock)."""
    lock = folder / LOCK_NAME
    notes: List[str] = []
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            info = _read_lock(lock)
            if not _is_stale(info, lock):
                raise OutputLockedError(
                    f"the output folder '{display}' is in use by another unifuse run (process {info.get('pid', '?')} "
                    f"on {info.get('host', '?')}, since {info.get('started', '?')}); wait for it to finish or choose "
                    f"another --out (if that run no longer exists, delete '{os.path.join(display, LOCK_NAME)}')"
                ) from None
            _reclaim(lock, info)
            notes.append(f"removed a stale lock in '{display}' left by process {info.get('pid', '?')}, which no "
                         "longer runs")
            continue
        except OSError as exc:
            raise _location_error(display, exc) from exc
        try:
            os.write(fd, _lock_text().encode("utf-8"))
        except OSError as exc:
            os.close(fd)
            lock.unlink(missing_ok=True)
            raise _location_error(display, exc) from exc
        os.close(fd)
        return notes
    raise OutputLockedError(f"the output folder '{display}' is being claimed by another run right now; choose another --out")


def _reclaim(lock: Path, info: Dict[str, Any]) -> None:
    """Take a stale lock away atomically (rename), and put it back if it turned out to be a fresh one."""
    aside = lock.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return
    if _read_lock(aside) != info and _read_lock(aside):  # another run replaced it meanwhile: give it back
        try:
            os.link(aside, lock)
        except OSError:
            pass
    aside.unlink(missing_ok=True)


def _recover(display: str, folder: Path) -> List[str]:
    """Clean up after a run that was killed (SIGKILL, power loss) while writing into ``folder``: previous
    outputs it had set aside are put back, its staging folders removed. Returns notes."""
    notes = []
    for staging in sorted(folder.glob(f"{STAGING_PREFIX}*")):
        restored = [old.name for old in sorted((staging / _PREVIOUS).glob("*"))]
        for name in restored:
            os.replace(staging / _PREVIOUS / name, folder / name)
        shutil.rmtree(staging, ignore_errors=True)
        notes.append(f"removed the unfinished outputs of a run that was killed while writing into '{display}'"
                     + (f" and restored its previous {', '.join(restored)}" if restored else ""))
    return notes


# ------------------------------------------------------------------------------------------------ staging


@contextmanager
def _native_stderr() -> Iterator[List[str]]:
    """Capture what C/C++ libraries print on file descriptor 2 (ITK warnings, niftilib's write errors)."""
    lines: List[str] = []
    with _STDERR_LOCK:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError, AttributeError):
            yield lines
            return
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield lines
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                sink.seek(0)
                lines.extend(ln.strip() for ln in sink.read().decode("utf-8", "replace").splitlines() if ln.strip())


def _kind(payload: Payload) -> str:
    if isinstance(payload, sitk.Image):
        return "image"
    if isinstance(payload, sitk.Transform):
        return "transform"
    if isinstance(payload, (dict, list)):
        return "json"
    if isinstance(payload, str):
        return "text"
    if isinstance(payload, (bytes, bytearray)):
        return "bytes"
    if callable(payload):
        return "callable"
    raise TypeError(f"cannot write an object of type {type(payload).__name__}")


def _suffix(name: str) -> str:
    return ".nii.gz" if name.lower().endswith(".nii.gz") else Path(name).suffix


def _write_payload(kind: str, payload: Payload, path: Path) -> bool:
    """Write one staged file; False when a callable chose to write nothing."""
    from . import io as uio  # deferred: import cycle with io (io imports outputs.check_targets)

    if kind == "image":
        uio.write_image(payload, path, overwrite=True)
    elif kind == "json":
        uio.write_json(payload, path, overwrite=True)
    elif kind == "transform":
        uio.atomic_write(path, True, _suffix(path.name), lambda tmp: sitk.WriteTransform(payload, str(tmp)))
    elif kind in ("text", "bytes"):
        data = payload.encode("utf-8") if kind == "text" else bytes(payload)
        uio.atomic_write(path, True, _suffix(path.name), lambda tmp: tmp.write_bytes(data))
    else:
        done = payload(path)
        return done is not None or path.exists()
    return True


def _verify(kind: str, payload: Payload, path: Path) -> str:
    """Empty when ``path`` holds ``payload`` completely; else what is wrong with it."""
    size = path.stat().st_size
    if size == 0:
        return "the written file is empty"
    if kind == "image":
        return _verify_image(payload, path)
    if kind == "transform":
        back = sitk.ReadTransform(str(path))
        same = np.allclose(back.GetParameters(), payload.GetParameters(), rtol=1e-6, atol=1e-9) and np.allclose(
            back.GetFixedParameters(), payload.GetFixedParameters(), rtol=1e-6, atol=1e-9)
        return "" if same else "the transform read back differs from the one written"
    if kind == "json":
        json.loads(path.read_text(encoding="utf-8"))
    elif kind in ("text", "bytes"):
        data = payload.encode("utf-8") if kind == "text" else bytes(payload)
        if path.read_bytes() != data:
            return f"the file read back has {size} of the {len(data)} bytes written"
    return ""


def _verify_image(image: Any, path: Path) -> str:
    from . import io as uio  # deferred: import cycle with io (io imports outputs.check_targets)

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    if (tuple(reader.GetSize()) != tuple(image.GetSize()) or reader.GetPixelID() != image.GetPixelID()
            or reader.GetNumberOfComponents() != image.GetNumberOfComponentsPerPixel()
            or not np.allclose(reader.GetSpacing(), image.GetSpacing(), rtol=1e-5)):
        return (f"its header reads back as size {tuple(reader.GetSize())}, "
                f"{sitk.GetPixelIDValueAsString(reader.GetPixelID())} instead of size {tuple(image.GetSize())}, "
                f"{image.GetPixelIDTypeAsString()}")
    if _suffix(path.name) in (".nii", ".nii.gz"):
        uio.scan_nifti(path)  # the data are complete (a cut .nii.gz fails its end-of-stream check)
    else:
        sitk.ReadImage(str(path))
    return ""


def _nonfinite(image: Any, slab: int = 16) -> int:
    """Number of NaN/Inf values of a float image, counted in z-slabs (no full-size temporary)."""
    if "float" not in image.GetPixelIDTypeAsString():
        return 0
    arr = sitk.GetArrayViewFromImage(image)
    return sum(int(arr[z:z + slab].size - np.count_nonzero(np.isfinite(arr[z:z + slab])))
               for z in range(0, arr.shape[0], slab)) if arr.ndim else 0


def _file_size_limit() -> Optional[int]:
    try:
        import resource  # POSIX only

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    except (ImportError, OSError, ValueError):
        return None
    return None if soft == resource.RLIM_INFINITY else int(soft)


def _one_line(text: str) -> str:
    return " ".join(text.split())


# ------------------------------------------------------------------------------------------------ claim


@dataclass
class OutputClaim:
    """An output folder claimed by this process (see the module docstring).

    Attributes:
        folder: the output folder as given; ``path`` is its absolute form.
        names: output file names checked when claiming.
        overwrite: whether existing outputs of these names may be replaced.
        state: ``claimed`` -> ``writing`` -> ``written`` (-> ``writing`` ...) -> ``released``.
        written: files this claim has put in place (complete and verified), in order.
        replaced: names of previous outputs that ``written`` replaced.
        notes: remarks for the user (e.g. a stale lock was removed).
    """

    folder: Path
    path: Path
    names: List[str]
    overwrite: bool
    inputs: Dict[Tuple[int, int], str]
    created: List[Path] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    state: str = "claimed"
    written: List[Path] = field(default_factory=list)
    replaced: List[str] = field(default_factory=list)
    previous: List[str] = field(default_factory=list)
    depth: int = 1

    def __enter__(self) -> "OutputClaim":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _display(self, name: str = "") -> str:
        return os.path.join(os.fspath(self.folder), name) if name else os.fspath(self.folder)

    def write(self, outputs: Mapping[str, Payload], overwrite: Optional[bool] = None) -> Dict[str, Path]:
        """Stage, verify and put ``{file name: payload}`` in place, all or nothing.

        Returns:
            ``{file name: path}`` of every file written (a callable payload may choose to write nothing).

        Raises:
            OutputWriteError: a file could not be written or does not read back; nothing was changed.
            OutputExistsError / OutputLocationError: a target appeared, or is a folder or an input.
        """
        if self.state == "released":
            raise RuntimeError("this output claim was released; claim the folder again")
        overwrite = self.overwrite if overwrite is None else overwrite
        for name in outputs:
            if not name or name in (".", "..") or "/" in name or os.sep in name:
                raise ValueError(f"output names are plain file names; got {name!r}")
        check_targets(self._display(), self.path, list(outputs), overwrite, self.inputs)
        self.state = "writing"
        try:
            staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.path))
        except OSError as exc:
            self.state = "claimed" if not self.written else "written"
            raise _location_error(self._display(), exc) from exc
        try:
            staged = {name: path for name, path in ((n, self._stage(n, p, staging)) for n, p in outputs.items()) if path}
            self._commit(staged, staging, overwrite)
        except BaseException:
            self.state = "claimed" if not self.written else "written"
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.state = "written"
        return {name: self.folder / name for name in staged}

    def _stage(self, name: str, payload: Payload, staging: Path) -> Optional[Path]:
        kind = _kind(payload)
        path = staging / name
        bad = _nonfinite(payload) if kind == "image" else 0
        if bad:
            raise OutputWriteError(
                f"not writing '{self._display(name)}': {bad} of its voxels are NaN or infinite (NIfTI readers would "
                "silently turn them into 0) — a bug in unifuse, please report it with the command and the inputs' "
                "headers; nothing in the output folder was changed")
        problem = ""
        with _native_stderr() as native:
            try:
                if not _write_payload(kind, payload, path):
                    return None
                problem = _verify(kind, payload, path)
            except (UniFuseError, RuntimeError, OSError, ValueError) as exc:
                problem = _one_line(str(exc.__cause__ or exc))
        if problem:
            raise OutputWriteError(self._failure(name, path, problem, native)) from None
        if native:  # the write succeeded: pass on what the libraries said
            print("\n".join(native), file=sys.stderr)
        return path

    def _failure(self, name: str, path: Path, problem: str, native: Sequence[str]) -> str:
        size = path.stat().st_size if path.exists() else 0
        limit = _file_size_limit()
        unchanged = "; nothing in the output folder was changed" + (
            " (the previous outputs are kept)" if self.previous else "")
        if limit is not None and size >= limit:
            return (f"could not write '{self._display(name)}': the file size limit (ulimit -f, {limit} bytes) was "
                    f"reached after {size} bytes; raise the limit (ulimit -f unlimited) or write smaller "
                    f"volumes{unchanged}")
        detail = f"{problem} (the library said: {_one_line(native[-1])})" if native else problem
        if "No space left" in problem or "No space left" in detail:
            return f"could not write '{self._display(name)}': the disk is full; free disk space or choose another --out{unchanged}"
        return (f"could not write '{self._display(name)}': {detail}; check that the disk has free space and "
                f"works, or choose another --out{unchanged}")

    def _commit(self, staged: Mapping[str, Path], staging: Path, overwrite: bool) -> None:
        """Move the staged files into place; on any failure or interrupt put everything back."""
        aside = staging / _PREVIOUS
        aside.mkdir()
        moved: List[str] = []
        replaced: List[str] = []
        with deferred_signals():
            try:
                for name, source in staged.items():
                    target = self.path / name
                    if os.path.lexists(target):
                        if not overwrite:
                            raise OutputExistsError(
                                f"'{self._display(name)}' appeared while this run was writing; choose another --out "
                                "or pass --overwrite")
                        os.replace(target, aside / name)
                        replaced.append(name)
                    os.replace(source, target)
                    moved.append(name)
            except BaseException:
                for name in moved:
                    (self.path / name).unlink(missing_ok=True)
                for name in replaced:
                    os.replace(aside / name, self.path / name)
                raise
            self.written.extend(self.folder / name for name in moved)
            self.replaced.extend(replaced)

    def release(self) -> None:
        """Remove the lock (and the folders the claim created, if still empty). Idempotent; a nested claim
        of the same folder only drops one level."""
        with _REGISTRY_LOCK, deferred_signals():
            self.depth -= 1
            if self.depth > 0 or self.state == "released":
                return
            try:
                if _read_lock(self.path / LOCK_NAME).get("pid") == os.getpid():
                    (self.path / LOCK_NAME).unlink(missing_ok=True)
            except OSError:
                pass
            _remove_empty(self.created)
            if self in _ACTIVE:
                _ACTIVE.remove(self)
            self.state = "released"

    def summary(self) -> str:
        """What this claim has written, for a message after an interrupt."""
        if not self.written:
            kept = f" (the previous outputs in '{self._display()}' are unchanged)" if self.previous else ""
            return f"nothing was written to '{self._display()}'{kept}"
        names = ", ".join(p.name for p in self.written)
        also = ", replacing the previous ones" if self.replaced else ""
        return f"{len(self.written)} output file(s) in '{self._display()}' were already complete ({names}{also})"


def claim_output_dir(
    out: PathLike,
    names: Sequence[str] = (),
    overwrite: bool = False,
    inputs: Iterable[PathLike] = (),
) -> OutputClaim:
    """Check the output location, create it and lock it (see the module docstring); use as a context
    manager or call :meth:`OutputClaim.release`.

    Args:
        out: the output folder (created with its parents if missing).
        names: the output file names the run will write (checked now: not a folder, not an input, and
            without ``overwrite`` not existing).
        overwrite: allow replacing existing files of these names.
        inputs: the run's input paths (an output name that is one of them is refused even with ``overwrite``).

    Raises:
        OutputLocationError: unusable location; OutputExistsError: outputs exist and not ``overwrite``;
        OutputLockedError: another run holds the folder.
    """
    text = os.fspath(out)
    if not str(text).strip():
        raise OutputLocationError("the output folder is an empty string; give a folder name (e.g. --out results, or "
                                  "--out . for the current folder)")
    folder = Path(text).expanduser()
    path = Path(os.path.abspath(folder))
    names = list(names)
    ids = _input_ids(inputs)
    with _REGISTRY_LOCK, deferred_signals():
        for claim in _ACTIVE:
            if claim.path == path:  # the same process claims its own folder again (e.g. FusionResult.save)
                check_targets(os.fspath(folder), path, names, overwrite, {**claim.inputs, **ids})
                claim.depth += 1
                claim.names.extend(n for n in names if n not in claim.names)
                return claim
        previous = _validate_location(os.fspath(folder), path, names, overwrite, ids)
        created = _make_folder(os.fspath(folder), path)
        try:
            notes = _acquire_lock(os.fspath(folder), path)
        except BaseException:
            _remove_empty(created)
            raise
        notes += _recover(os.fspath(folder), path)
        claim = OutputClaim(folder, path, names, overwrite, ids, created, notes, previous=previous)
        _ACTIVE.append(claim)
        return claim


def write_outputs(
    out: PathLike, outputs: Mapping[str, Payload], overwrite: bool = False, inputs: Iterable[PathLike] = ()
) -> Dict[str, Path]:
    """Claim ``out`` (or join this process's claim of it), write ``outputs`` all or nothing, release."""
    with claim_output_dir(out, list(outputs), overwrite, inputs) as claim:
        return claim.write(outputs, overwrite)


def result_files(result: Any) -> Dict[str, Payload]:
    """``{file name: payload}`` of a :class:`~unifuse.pipeline.FusionResult` (``OUTPUT_FILES`` + report)."""
    from .pipeline import OUTPUT_FILES, REPORT_FILE  # deferred: import cycle with pipeline (via weights, io)

    files = {fname: getattr(result, attr) for attr, fname in OUTPUT_FILES.items() if getattr(result, attr, None) is not None}
    files[REPORT_FILE] = result.report
    return files


def active_claims() -> List[OutputClaim]:
    """The output folders this process holds now."""
    return list(_ACTIVE)


def release_all() -> None:
    """Release every claim of this process (end of a CLI command, or before exiting after Ctrl-C)."""
    for claim in list(_ACTIVE):
        claim.depth = 1
        claim.release()


def interrupt_summary() -> str:
    """One sentence on what the active claims have written: for the message after Ctrl-C/SIGTERM."""
    claims = list(_ACTIVE)
    if not any(c.written for c in claims):
        kept = [c for c in claims if c.previous]
        return "no outputs were written" + (
            f" (the previous outputs in {', '.join(repr(c._display()) for c in kept)} are unchanged)" if kept else "")
    return "; ".join(c.summary() for c in claims)
