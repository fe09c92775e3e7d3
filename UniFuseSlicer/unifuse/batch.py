"""Cohort processing: ``unifuse fuse-batch MANIFEST.csv --out DIR [--workers N] [--shard i/N]``.

**Manifest**: a CSV file with a header and one row per pair::

    id,reference,moving,degradation,moving_modality
    sub-001,sub-001/t1.nii.gz,sub-001/t2.nii.gz,,
    sub-002,sub-002/t1.nii.gz,sub-002/t2.nii.gz,motion,mr

``reference`` and ``moving`` are required (files or DICOM folders; relative paths are relative to the
manifest's folder). ``id`` is optional: without it (or with an empty cell) a case is named after its
reference file (``t1`` from ``sub-001/t1.nii.gz``), prefixed with the file's folder when another row's
reference file has the same name (``sub-001_t1``), and with ``rowK_`` if that still collides. Ids become folder names:
characters other than letters, digits, ``.``, ``_`` and ``-`` are replaced by ``_``. Give ids when the
manifest will grow, so the names never change. ``degradation`` is optional (``auto``, ``none``, ``motion``,
``metal``, ``lowdose``; empty = the ``--degradation`` of the run). ``moving_modality`` is optional (``auto``,
``ct``, ``mr``, ``pet``; empty = the ``--moving-modality`` of the run): the moving volume's modality, which
tells the degradation detection which degradations it can have (motion = MR, low dose = PET, metal = CT).
Column names and these values are case-insensitive.

**Outputs**: every case writes the files of ``unifuse fuse`` into ``DIR/<id>/`` through the shared output
writer (:mod:`unifuse.outputs`: the case folder is locked, the files staged, verified and only then put in
place, all or nothing). ``DIR/summary.csv`` holds one row per case of the run (its key figures, among them
the degradation and the moving modality used and where that modality came from, see
:data:`SUMMARY_COLUMNS`) and ``DIR/failures.csv`` one row per failed case; with ``--shard i/N`` they are
``summary.shard-i-of-N.csv`` and ``failures.shard-i-of-N.csv``, so shards never write the same file.

**Resume**: a case is *finished* when its folder holds ``report.json`` and every image of
:data:`unifuse.pipeline.OUTPUT_FILES` (the writer puts ``report.json`` in place last, so a run killed while
writing leaves an unfinished case). Finished cases are skipped (their summary rows are read back from their
reports); unfinished or failed ones are (re)computed. ``--overwrite`` recomputes finished cases too. Running
the same command again after a crash, a time limit or fixing a bad input does only what is left.

**Failures** of one case (an unreadable file, no overlap, out of memory, a bug) are recorded with their
error and the run goes on; the command exits with code 1 when any case failed (0 otherwise).

**Shards**: ``--shard i/N`` (0 ≤ i < N) processes the rows k with ``k mod N = i``, k the 0-based data row of
the manifest (blank lines not counted) — a deterministic split that a cluster scheduler can drive, e.g. a
SLURM array ``--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT`` or a Kubernetes indexed job
``--shard $JOB_COMPLETION_INDEX/<completions>``; all shards may share ``--out``. Afterwards one run without
``--shard`` skips every finished case and writes the whole cohort's ``summary.csv``.

**Workers** are threads of one process: they share one loaded network per device (no copies, no pickling
of results; PyTorch kernels, ITK filters and file compression release the GIL, so the threads do run in
parallel). On CPU, ``--workers N`` threads share one network and PyTorch's threads are divided among them;
on CUDA there is one worker per GPU (all visible GPUs with ``--device cuda``/``auto``, one with ``cuda:K``),
each with its own copy of the network on its GPU — a GPU's network is not shared between threads because
the pipeline's out-of-memory fallback moves the network to the CPU.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import queue
import random
import re
import sys
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar, Union

import SimpleITK as sitk
import torch
from tqdm import tqdm

from .config import DEGRADATION_CLASSES, MOVING_MODALITIES
from .errors import CancelledError, OutputLockedError, UniFuseError
from .options import FuseOptions, add_cli_arguments
from .outputs import claim_output_dir, result_files, write_outputs
from .pipeline import OUTPUT_FILES, REPORT_FILE, fuse, load_model, resolve_device

__all__ = [
    "MANIFEST_COLUMNS",
    "SUMMARY_COLUMNS",
    "FAILURE_COLUMNS",
    "TIMED_STAGES",
    "ManifestError",
    "CaseFailuresError",
    "BatchCase",
    "BatchResult",
    "read_manifest",
    "parse_shard",
    "shard_cases",
    "is_finished",
    "summary_row",
    "run_batch",
    "add_batch_parser",
    "run_fuse_batch",
]

PathLike = Union[str, "os.PathLike[str]"]
#: Columns a manifest may have (``reference`` and ``moving`` are required).
MANIFEST_COLUMNS = ("id", "reference", "moving", "degradation", "moving_modality")
#: Pipeline stages whose times get a summary column (``time_<stage>_s``; blank when the stage did not run).
TIMED_STAGES = ("read", "load_model", "header", "affine", "working_grid", "network", "refine", "fusion", "warp", "maps")
#: Columns of ``summary.csv``:
#:
#: * ``status``: ``fused`` (this run), ``finished-before`` (skipped; figures from its report.json) or ``failed``;
#: * ``final_stage``: the last alignment stage the guard kept (``header`` when none); ``guard``: each guarded
#:   stage ``name=kept|rejected`` (``;``-separated);
#: * ``degradation_*``: requested, classifier's prediction, used; ``p_<class>``: classifier probabilities;
#: * ``moving_modality_used``/``_source``: the moving modality the degradation detection used (``ct``, ``mr``,
#:   ``pet``, or as measured ``ct``/``mr_or_pet``) and where it came from (``user``, ``DICOM header``,
#:   ``measured (…)``); empty for a report written before the option existed;
#: * ``folding_percent``: % of reference-grid voxels with det J ≤ 0; ``error_map_mean_before/after``: mean of
#:   the alignment-error map before (header) and after alignment;
#: * ``time_total_s`` and ``time_<stage>_s``: the pipeline's times; ``case_seconds``: this run's wall time
#:   for the case (reading to written outputs);
#: * ``warnings``: the report's warnings, `` | ``-separated; ``error_type``/``error``: why a case failed.
SUMMARY_COLUMNS = (
    "id", "status", "reference", "moving", "output", "device", "model_id", "model_trained",
    "degradation_requested", "degradation_predicted", "degradation_used", "moving_modality_used",
    "moving_modality_source", *(f"p_{c}" for c in DEGRADATION_CLASSES),
    "final_stage", "guard", "folding_percent", "error_map_mean_before", "error_map_mean_after",
    "time_total_s", *(f"time_{s}_s" for s in TIMED_STAGES), "case_seconds", "n_warnings", "warnings",
    "error_type", "error",
)
#: Columns of ``failures.csv``.
FAILURE_COLUMNS = ("id", "row", "reference", "moving", "error_type", "error")
#: Attempts (1 s apart, jittered) at writing the summary while another shard writes its own into ``--out``.
SUMMARY_WRITE_ATTEMPTS = 60

_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]")
_IO_LOCK = threading.Lock()  # claims, writes and releases of output folders, one thread at a time


class ManifestError(UniFuseError, ValueError):
    """The manifest cannot be used (missing, no header, missing columns, empty cells, unknown degradation or
    moving modality, duplicate ids)."""


class CaseFailuresError(UniFuseError):
    """Some cases of a batch failed (the others are done; the failures are listed in failures.csv)."""


@dataclass(frozen=True)
class BatchCase:
    """One row of the manifest.

    Attributes:
        row: 0-based data row (the shard of the case is ``row mod N``).
        case_id: folder name of the case's outputs.
        reference, moving: input paths (absolute, or as given when already absolute).
        degradation: the row's degradation, or None for the run's ``--degradation``.
        moving_modality: the row's moving modality, or None for the run's ``--moving-modality``.
    """

    row: int
    case_id: str
    reference: Path
    moving: Path
    degradation: Optional[str] = None
    moving_modality: Optional[str] = None


@dataclass
class BatchResult:
    """What a batch run did.

    Attributes:
        cases: the cases of this run (its shard), in manifest order.
        rows: summary rows (:data:`SUMMARY_COLUMNS`), one per case, in manifest order.
        fused, skipped, failed: case ids computed now, finished before, failed.
        summary_path, failures_path: the CSV files written.
        seconds: wall time of the run.
    """

    cases: List[BatchCase]
    rows: List[Dict[str, Any]]
    fused: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    failed: List[str] = field(default_factory=list)
    summary_path: Optional[Path] = None
    failures_path: Optional[Path] = None
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------- manifest
def _sanitize(text: str) -> str:
    return _ID_CHARS.sub("_", text.strip()).lstrip(".")


def _file_stem(path: str) -> str:
    name = Path(path.rstrip("/\\")).name
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".gz"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem or name


def _default_ids(rows: Sequence[Tuple[int, str]], needed: Sequence[int], taken: Sequence[str]) -> Dict[int, str]:
    """Ids of the rows ``needed`` (without an id) from the reference paths of ALL ``rows`` (row, reference):
    the file's stem when no other row's reference has that stem, else ``folder_stem``, else ``rowK_stem``;
    a name in ``taken`` (the explicit ids) moves on to the next form."""
    stems = {k: _sanitize(_file_stem(ref)) or "case" for k, ref in rows}
    with_folder = {k: _sanitize(f"{Path(ref.rstrip('/')).parent.name}_{_file_stem(ref)}").strip("_") or "case"
                   for k, ref in rows}
    forms = [(stems, Counter(stems.values())), (with_folder, Counter(with_folder.values()))]
    explicit = set(taken)
    ids: Dict[int, str] = {}
    for k in needed:
        for candidate, counts in forms:
            name = candidate[k]
            if name not in explicit and counts[name] == 1:
                ids[k] = name
                break
        else:
            ids[k] = f"row{k}_{stems[k]}"
    return ids


def _check_choice(what: str, allowed: Sequence[str], value: str, line: int, path: Path) -> Optional[str]:
    """A row's optional ``what`` cell, lower-cased; None when empty (the run's option applies).

    Raises:
        ManifestError: not one of ``allowed``, naming the manifest, the line and the allowed values.
    """
    value = value.strip().lower()
    if not value:
        return None
    if value not in allowed:
        raise ManifestError(f"{path}, line {line}: unknown {what} {value!r}; use {', '.join(allowed)} "
                            f"or leave the cell empty")
    return value


def _check_degradation(value: str, line: int, path: Path) -> Optional[str]:
    return _check_choice("degradation", ("auto", *DEGRADATION_CLASSES), value, line, path)


def _check_moving_modality(value: str, line: int, path: Path) -> Optional[str]:
    return _check_choice("moving modality", MOVING_MODALITIES, value, line, path)


def read_manifest(path: PathLike) -> List[BatchCase]:
    """Read a manifest (see the module docstring) into cases, in file order.

    Raises:
        ManifestError: missing or unreadable file, no ``reference``/``moving`` column, an empty reference or
            moving cell, an unknown degradation or moving modality, duplicate ids, or no rows at all — one line
            naming the manifest line and the fix.
    """
    manifest = Path(path).expanduser()
    try:
        text = manifest.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"cannot read the manifest {manifest} ({exc.__class__.__name__}); pass a CSV file with the "
                            f"columns id (optional), reference, moving, degradation (optional), moving_modality "
                            f"(optional)") from None
    reader = csv.DictReader(io.StringIO(text))
    columns = [c.strip().lower() for c in (reader.fieldnames or [])]
    missing = [c for c in ("reference", "moving") if c not in columns]
    if missing:
        raise ManifestError(f"the manifest {manifest} has no {' and no '.join(missing)} column (its header: "
                            f"{', '.join(columns) or 'none'}); the first line must name the columns: id,reference,moving")
    reader.fieldnames = columns
    base = manifest.resolve().parent
    raw: List[Tuple[int, int, Dict[str, str]]] = []
    for k, record in enumerate(reader):
        line = reader.line_num
        cells = {c: (record.get(c) or "").strip() for c in MANIFEST_COLUMNS}
        for role in ("reference", "moving"):
            if not cells[role]:
                raise ManifestError(f"{manifest}, line {line}: the {role} cell is empty; give a file or DICOM folder")
        raw.append((k, line, cells))
    if not raw:
        raise ManifestError(f"the manifest {manifest} has a header but no rows; add one row per pair")
    defaults = _default_ids([(k, cells["reference"]) for k, _, cells in raw],
                            [k for k, _, cells in raw if not cells["id"]],
                            [_sanitize(cells["id"]) for _, _, cells in raw if cells["id"]])
    cases, seen = [], {}  # type: List[BatchCase], Dict[str, int]
    for k, line, cells in raw:
        case_id = _sanitize(cells["id"]) if cells["id"] else defaults[k]
        if not case_id:
            raise ManifestError(f"{manifest}, line {line}: the id {cells['id']!r} has no usable character; use "
                                f"letters, digits, '.', '_' or '-'")
        if case_id in seen:
            raise ManifestError(f"{manifest}: lines {seen[case_id]} and {line} both name the case {case_id!r}; "
                                f"give every row its own id")
        seen[case_id] = line
        ref, mov = (Path(cells[r]).expanduser() for r in ("reference", "moving"))
        cases.append(BatchCase(k, case_id, ref if ref.is_absolute() else base / ref,
                               mov if mov.is_absolute() else base / mov,
                               _check_degradation(cells["degradation"], line, manifest),
                               _check_moving_modality(cells["moving_modality"], line, manifest)))
    return cases


def parse_shard(text: Optional[str]) -> Optional[Tuple[int, int]]:
    """``"i/N"`` -> ``(i, N)`` with 0 <= i < N (None stays None).

    Raises:
        UniFuseError: not of that form.
    """
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match or int(match.group(2)) < 1 or int(match.group(1)) >= int(match.group(2)):
        raise UniFuseError(f"--shard {text!r} must be i/N with 0 <= i < N (e.g. --shard 0/4 … --shard 3/4; "
                           f"with SLURM: --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")
    return int(match.group(1)), int(match.group(2))


def shard_cases(cases: Sequence[BatchCase], shard: Optional[Tuple[int, int]]) -> List[BatchCase]:
    """The cases of shard ``(i, N)``: rows k with ``k mod N == i`` (all cases for None)."""
    if shard is None:
        return list(cases)
    index, count = shard
    return [c for c in cases if c.row % count == index]


# ------------------------------------------------------------------------------------------- outputs
def _output_names() -> List[str]:
    return [*OUTPUT_FILES.values(), REPORT_FILE]


def _read_report(folder: Path) -> Optional[Dict[str, Any]]:
    try:
        report = json.loads((folder / REPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) else None


def is_finished(folder: PathLike) -> bool:
    """True when ``folder`` holds a complete set of ``unifuse fuse`` outputs (every image and a readable
    ``report.json``, which the output writer puts in place last)."""
    folder = Path(folder)
    return all((folder / name).is_file() for name in _output_names()) and _read_report(folder) is not None


def _fmt(value: Any, digits: int = 6) -> Any:
    if isinstance(value, float):
        return round(value, digits)
    return "" if value is None else value


def summary_row(case: BatchCase, report: Optional[Dict[str, Any]], status: str, output: Path,
                seconds: Optional[float] = None, error: Optional[BaseException] = None) -> Dict[str, Any]:
    """One ``summary.csv`` row (:data:`SUMMARY_COLUMNS`) from a case's report (None for a failed case)."""
    row: Dict[str, Any] = {c: "" for c in SUMMARY_COLUMNS}
    row.update(id=case.case_id, status=status, reference=str(case.reference), moving=str(case.moving),
               output=str(output), case_seconds=_fmt(seconds, 3))
    if error is not None:
        row.update(error_type=type(error).__name__, error=" ".join(str(error).split()))
    if not report:
        return row
    deg = report.get("degradation") or {}
    modality = deg.get("moving_modality")
    modality = modality if isinstance(modality, dict) else {}  # reports written before the option: empty cells
    model = report.get("model") or {}
    alignment = report.get("alignment") or {}
    guard = ";".join(f"{name}={'kept' if s.get('kept') else 'rejected'}"
                     for name, s in (alignment.get("stages") or {}).items() if s.get("kept") is not None)
    timings = report.get("timings_s") or {}
    warnings = list(report.get("warnings") or [])
    row.update(
        device=report.get("device", ""), model_id=model.get("id", ""), model_trained=model.get("trained", ""),
        degradation_requested=deg.get("requested", ""), degradation_predicted=deg.get("predicted", ""),
        degradation_used=deg.get("used", ""), moving_modality_used=_fmt(modality.get("used")),
        moving_modality_source=_fmt(modality.get("source")), final_stage=alignment.get("final_stage", ""),
        guard=guard,
        folding_percent=_fmt((report.get("folding_percent") or {}).get("reference_grid")),
        error_map_mean_before=_fmt((report.get("error_map_mean") or {}).get("before")),
        error_map_mean_after=_fmt((report.get("error_map_mean") or {}).get("after")),
        time_total_s=_fmt(timings.get("total"), 3), n_warnings=len(warnings), warnings=" | ".join(warnings),
    )
    for c, p in (deg.get("probabilities") or {}).items():
        if f"p_{c}" in row:
            row[f"p_{c}"] = _fmt(p, 4)
    for stage in TIMED_STAGES:
        row[f"time_{stage}_s"] = _fmt(timings.get(stage), 3)
    return row


def _failure_row(case: BatchCase, row: Dict[str, Any]) -> Dict[str, Any]:
    return {"id": case.case_id, "row": case.row, "reference": str(case.reference), "moving": str(case.moving),
            "error_type": row["error_type"], "error": row["error"]}


def _csv_text(columns: Sequence[str], rows: Sequence[Dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _table_names(shard: Optional[Tuple[int, int]]) -> Tuple[str, str]:
    if shard is None:
        return "summary.csv", "failures.csv"
    return f"summary.shard-{shard[0]}-of-{shard[1]}.csv", f"failures.shard-{shard[0]}-of-{shard[1]}.csv"


T = TypeVar("T")


def _in_batch_folder(action: Callable[[], T]) -> T:
    """Run ``action`` (which claims the batch folder itself) while no other thread claims a folder, waiting
    while another shard holds the batch folder for its own tables (a lock held for a second or so)."""
    for attempt in range(SUMMARY_WRITE_ATTEMPTS):
        try:
            with _IO_LOCK:
                return action()
        except OutputLockedError:
            if attempt + 1 == SUMMARY_WRITE_ATTEMPTS:
                raise
            time.sleep(0.5 + random.random())
    raise AssertionError("unreachable")


def _write_tables(out: Path, names: Tuple[str, str], rows: List[Dict[str, Any]],
                  failures: List[Dict[str, Any]]) -> Tuple[Path, Path]:
    """Write the summary and failures CSVs through the shared writer (all or nothing, replacing earlier ones)."""
    payload = {names[0]: _csv_text(SUMMARY_COLUMNS, rows), names[1]: _csv_text(FAILURE_COLUMNS, failures)}
    written = _in_batch_folder(lambda: write_outputs(out, payload, overwrite=True))
    return written[names[0]], written[names[1]]


# ------------------------------------------------------------------------------------------- workers
def _worker_devices(options: FuseOptions, workers: Optional[int]) -> Tuple[List[str], List[str]]:
    """(device of each worker, notes): CPU: ``workers`` (default 1) threads on ``cpu``; CUDA: one per GPU."""
    if workers is not None and workers < 1:
        raise UniFuseError(f"--workers must be at least 1 (got {workers})")
    device = resolve_device(options.device)
    if device.type != "cuda":
        return ["cpu"] * (workers or 1), []

    explicit = ":" in str(options.device)
    gpus = [device.index or 0] if explicit else list(range(torch.cuda.device_count()))
    notes = []
    if workers is not None and workers != len(gpus):
        notes.append(f"--workers {workers} on {len(gpus)} GPU(s): running one worker per GPU ({len(gpus)}); "
                     "a GPU's network is not shared between workers")
    return [f"cuda:{g}" for g in gpus], notes


def _load_models(options: FuseOptions, devices: Sequence[str]) -> Dict[str, Any]:
    """One :class:`~unifuse.pipeline.LoadedModel` per distinct device (loaded once, shared by its workers)."""
    return {d: load_model(options.weights, options.config, d, options.seed) for d in dict.fromkeys(devices)}


class _CpuThreads:
    """Divide the CPU cores among ``workers`` threads (PyTorch and ITK thread pools) for the run's duration."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.saved: Optional[Tuple[int, int]] = None

    def __enter__(self) -> "_CpuThreads":
        if self.workers > 1:
            per = max(1, (os.cpu_count() or 1) // self.workers)
            self.saved = (torch.get_num_threads(), sitk.ProcessObject.GetGlobalDefaultNumberOfThreads())
            torch.set_num_threads(per)
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(per)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.saved is not None:
            torch.set_num_threads(self.saved[0])
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(self.saved[1])


def _fuse_case(case: BatchCase, out: Path, options: FuseOptions, model: Any, overwrite: bool,
               cancel: Callable[[], bool]) -> Dict[str, Any]:
    """Process one case (skip it when finished); returns its summary row. Failures become rows too."""
    folder = out / case.case_id
    if not overwrite and is_finished(folder):
        return summary_row(case, _read_report(folder), "finished-before", folder)
    t0 = time.perf_counter()
    try:
        overrides = {name: value for name, value in (("degradation", case.degradation),
                                                     ("moving_modality", case.moving_modality)) if value}
        opts = options.replace(**overrides) if overrides else options  # the row's cells over the run's options
        with _IO_LOCK:  # overwrite: an unfinished folder may hold a killed run's leftovers
            claim = claim_output_dir(folder, _output_names(), overwrite=True, inputs=(case.reference, case.moving))
        try:
            result = fuse(case.reference, case.moving, opts, model=model, cancel=cancel)
            with _IO_LOCK:  # the writer captures file descriptor 2 while staging: one writer at a time
                claim.write(result_files(result), overwrite=True)
        finally:
            with _IO_LOCK:
                claim.release()
    except CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - one case's failure, whatever it is, must not stop the others
        return summary_row(case, None, "failed", folder, time.perf_counter() - t0, exc)
    return summary_row(case, result.report, "fused", folder, time.perf_counter() - t0)


def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    return tqdm(total=total, unit="case", file=sys.stderr, dynamic_ncols=True, desc="fuse-batch")


def _run_pool(cases: Sequence[BatchCase], out: Path, options: FuseOptions, devices: Sequence[str],
              models: Dict[str, Any], overwrite: bool, bar: Any, cancel_event: threading.Event,
              on_row: Callable[[BatchCase, Dict[str, Any]], None]) -> None:
    """Run the cases on ``len(devices)`` worker threads; each task takes a free device slot."""
    slots: "queue.Queue[str]" = queue.Queue()
    for d in devices:
        slots.put(d)

    def task(case: BatchCase) -> Dict[str, Any]:
        device = slots.get()
        try:
            opts = options.replace(device=device) if device.startswith("cuda") else options
            return _fuse_case(case, out, opts, models[device], overwrite, cancel_event.is_set)
        finally:
            slots.put(device)

    with ThreadPoolExecutor(max_workers=len(devices), thread_name_prefix="fuse-batch") as pool:
        pending: Dict[Future, BatchCase] = {pool.submit(task, c): c for c in cases}
        try:
            while pending:
                done, _ = wait(list(pending), timeout=0.5, return_when=FIRST_COMPLETED)
                for future in done:
                    case = pending.pop(future)
                    on_row(case, future.result())
                    if bar is not None:
                        bar.update(1)
        except BaseException:
            cancel_event.set()  # running cases stop at their next cancel check; queued ones never start
            for future in pending:
                future.cancel()
            raise


def run_batch(
    manifest: PathLike,
    out: PathLike,
    options: Optional[FuseOptions] = None,
    *,
    workers: Optional[int] = None,
    shard: Optional[Tuple[int, int]] = None,
    overwrite: bool = False,
    progress: bool = True,
    log: Optional[Callable[[str], None]] = None,
) -> BatchResult:
    """Fuse every pair of ``manifest`` (or of one shard of it) into ``out/<id>/``; see the module docstring.

    Args:
        manifest: the CSV manifest. out: the batch folder (created).
        options: the run's :class:`FuseOptions` (a row's ``degradation`` and ``moving_modality`` override
            ``options.degradation`` and ``options.moving_modality`` for that row).
        workers: CPU worker threads (default 1); on CUDA one worker per GPU whatever this says.
        shard: ``(i, N)``: only rows k with ``k mod N == i``.
        overwrite: recompute finished cases (replacing their outputs) instead of skipping them.
        progress: show one progress bar over the cases on stderr.
        log: where per-case failure lines go (default: stderr, above the bar).

    Returns:
        :class:`BatchResult`; ``summary.csv`` / ``failures.csv`` (shard-suffixed with ``shard``) are written
        in ``out`` — also when the run is interrupted (KeyboardInterrupt) or aborted, then with the rows of
        the cases done by then.

    Raises:
        ManifestError: the manifest is unusable; UniFuseError: the output folder or the network is unusable
        (nothing was processed).
    """
    t0 = time.perf_counter()
    options = options or FuseOptions()
    out_dir = Path(out).expanduser()
    cases = shard_cases(read_manifest(manifest), shard)
    names = _table_names(shard)
    _in_batch_folder(lambda: claim_output_dir(out_dir, list(names), overwrite=True).release())  # check it, early
    devices, notes = _worker_devices(options, workers)
    say = log or (lambda line: print(line, file=sys.stderr, flush=True))
    for note in notes:
        say(f"unifuse fuse-batch: note: {note}")
    result = BatchResult(cases=list(cases), rows=[])
    rows: Dict[str, Dict[str, Any]] = {}
    bar = _progress_bar(len(cases), progress)

    def on_row(case: BatchCase, row: Dict[str, Any]) -> None:
        rows[case.case_id] = row
        {"fused": result.fused, "finished-before": result.skipped, "failed": result.failed}[row["status"]].append(case.case_id)
        if row["status"] == "failed":
            line = f"unifuse fuse-batch: case {case.case_id} failed: {row['error_type']}: {row['error']}"
            if bar is not None and log is None:
                bar.write(line, file=sys.stderr)  # above the progress bar
            else:
                say(line)
        if bar is not None:
            bar.set_postfix(done=len(result.fused) + len(result.skipped), failed=len(result.failed), refresh=False)

    try:
        todo = [c for c in cases if overwrite or not is_finished(out_dir / c.case_id)]
        todo_ids = {c.case_id for c in todo}
        for case in cases:  # finished cases: their rows come from their reports, no worker needed
            if case.case_id not in todo_ids:
                on_row(case, summary_row(case, _read_report(out_dir / case.case_id), "finished-before",
                                         out_dir / case.case_id))
                if bar is not None:
                    bar.update(1)
        if todo:
            models = _load_models(options, devices)
            with _CpuThreads(len(devices) if devices[0] == "cpu" else 1):
                _run_pool(todo, out_dir, options, devices, models, overwrite, bar, threading.Event(), on_row)
    finally:
        if bar is not None:
            bar.close()
        result.rows = [rows[c.case_id] for c in cases if c.case_id in rows]
        failures = [_failure_row(c, rows[c.case_id]) for c in cases if rows.get(c.case_id, {}).get("status") == "failed"]
        result.summary_path, result.failures_path = _write_tables(out_dir, names, result.rows, failures)
        result.seconds = time.perf_counter() - t0
    return result


# ------------------------------------------------------------------------------------------- CLI
def add_batch_parser(subparsers: "argparse._SubParsersAction") -> None:
    """Add the ``fuse-batch`` sub-command (with the :class:`FuseOptions` flags) to a sub-parser collection."""
    p = subparsers.add_parser(
        "fuse-batch", help="fuse every pair of a CSV manifest (resumable; summary.csv; --shard for clusters)",
        description="Fuse every row (id, reference, moving, degradation, moving_modality) of MANIFEST into "
                    "OUT/<id>/; finished cases are skipped, failures recorded, a summary written (see docs/batch.md).")
    p.add_argument("manifest", type=Path, help="CSV with the columns id (optional), reference, moving, degradation "
                                               "(optional), moving_modality (optional: auto, ct, mr, pet); relative "
                                               "paths are relative to the manifest's folder")
    p.add_argument("--out", required=True, type=Path, help="batch folder: OUT/<id>/ per case, summary.csv, failures.csv")
    p.add_argument("--workers", type=int, default=None,
                   help="CPU worker threads sharing one network (default 1); on CUDA one worker per GPU")
    p.add_argument("--shard", default=None, metavar="i/N",
                   help="process only the rows k with k mod N = i (0-based; e.g. a SLURM array task)")
    add_cli_arguments(p)
    p.add_argument("--overwrite", action="store_true", help="recompute finished cases and replace their outputs")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run_fuse_batch(args: argparse.Namespace) -> int:
    """Run ``unifuse fuse-batch`` from parsed arguments; returns 0, or raises CaseFailuresError (exit 1)."""
    options = FuseOptions.from_namespace(args)
    result = run_batch(args.manifest, args.out, options, workers=args.workers, shard=parse_shard(args.shard),
                       overwrite=args.overwrite, progress=not args.quiet)
    print(f"cases      {len(result.cases)}: {len(result.fused)} fused, {len(result.skipped)} finished before, "
          f"{len(result.failed)} failed")
    print(f"summary    {result.summary_path}")
    print(f"failures   {result.failures_path}")
    print(f"time       {result.seconds:.1f} s")
    if result.failed:
        raise CaseFailuresError(
            f"{len(result.failed)} of {len(result.cases)} cases failed ({', '.join(result.failed[:5])}"
            f"{', …' if len(result.failed) > 5 else ''}; reasons in {result.failures_path}); fix them and run the "
            f"same command again — finished cases are skipped"
        )
    return 0
