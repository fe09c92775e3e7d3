"""``unifuse bench``: UniFuse against multi-stage baselines on the same cases, metrics and machine, in one run.

For every case (:mod:`unifuse.bench.cases`: the synthetic held-out tasks, ``--pairs`` folders, or with
``--real`` the real-anatomy validation cases) and method:

* **UniFuse pipeline runs** (:data:`PIPELINE_VARIANTS`) — :func:`unifuse.pipeline.fuse` with one network
  loaded once (shipped weights, ``--weights``, or an untrained network that the report flags),
  ``degradation="auto"`` with the case's moving modality stated when known (``BenchCase.moving_modality``), fused
  volume in [0, 1] (``map_back=False``), each with its own options: ``unifuse``
  (the defaults: fast refinement), ``unifuse-refine-none`` / ``unifuse-refine-full``, and the ablations
  without the network's field: ``affine+refine-fast``, ``affine+refine-full`` and ``affine-only``. Every run
  records the guard's decisions (``report["alignment"]``) and its per-stage times (``report["timings_s"]``).
* **registration baselines** (:mod:`unifuse.bench.baselines`) — ``none`` (header geometry: the floor),
  ``sitk-rigid``, ``sitk-affine``, ``sitk-bspline``, ``ants-syn`` (in its own environment), ``elastix-bspline``
  and, when the exact field is known, ``truth`` (the oracle). Each gives a fixed -> moving transform; the
  ORIGINAL moving volume is warped once onto the reference grid, then (when ``rules`` are asked for) fused
  with the reference by each rule of :mod:`unifuse.fusion_rules`: rows ``<registration>+<rule>``.

Every figure comes from :mod:`unifuse.evaluation` (the demo and the model card use the same code): the
evaluation mask, endpoint error (mean, median, p95, max; mm), its reduction against header-only ``none`` of the
same case (%), Dice of warped labels (mean and per label), folding (%), aligned-volume MSE/CC/SSIM against the
moving volume resampled through the true field, ``mind`` (no truth needed), and the fusion metrics against the
ideal sources (R, clean aligned label L). Cost: wall time per case per method and peak memory
(:mod:`unifuse.bench.measure`).
"""

from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch

from .. import __version__, geometry
from ..data.synthetic import make_demo_case
from ..errors import UniFuseError
from ..fusion_rules import fuse_average, fuse_laplacian_pyramid, fuse_max
from ..options import FuseOptions
from ..pipeline import UNTRAINED_WARNING, fuse, load_model, resolve_device
from ..procfs import cpu_model, proc_bytes
from ..evaluation import (MASK_RULE, EvaluationCase, as_evaluation_case, evaluate_alignment, evaluate_fusion,
                          evaluate_output_sharpness, evaluate_restoration)
from ..evaluation import reduction_percent
from ..metrics import FUSION_METRIC_KEYS
from .baselines import (FULL_SETTINGS, QUICK_SETTINGS, REAL_SETTINGS, REGISTRATION_METHODS, RegistrationSettings,
                        baseline_interpreter, normalized_for_registration, register_isolated, registration_method)
from .cases import (BENCH_FIRST_SEED, BENCH_TASKS, REAL_CATEGORIES, BenchCase, folder_cases, real_cases,
                    synthetic_cases)
from .measure import Measurement, measure, memory_method
from .report import guard_text, summarize

__all__ = [
    "UNIFUSE",
    "TRUTH",
    "HEADER_ONLY",
    "PIPELINE_VARIANTS",
    "METHODS",
    "SYNTHETIC_METHODS",
    "REAL_METHODS",
    "FUSION_RULES",
    "FUSION_KEYS",
    "ALIGNMENT_KEYS",
    "BenchOptions",
    "BenchResults",
    "machine_description",
    "run_benchmark",
]

UNIFUSE = "unifuse"
TRUTH = "truth"
HEADER_ONLY = "none"
#: UniFuse pipeline runs: method name -> FuseOptions overrides (on top of the defaults) and a description.
PIPELINE_VARIANTS: Dict[str, Tuple[Dict[str, Any], str]] = {
    UNIFUSE: ({}, "the pipeline's defaults (affine, network field, fast refinement, guard)"),
    "unifuse-refine-none": ({"refine": "none"}, "defaults without the refinement"),
    "unifuse-refine-full": ({"refine": "full"}, "defaults with the full refinement"),
    "affine+refine-fast": ({"network": False, "refine": "fast"}, "ablation: no network field, fast refinement"),
    "affine+refine-full": ({"network": False, "refine": "full"}, "ablation: no network field, full refinement"),
    "affine-only": ({"network": False, "refine": "none"}, "ablation: the guarded affine stage alone"),
}
#: Every method name accepted by ``--methods``, in table order.
METHODS: Tuple[str, ...] = (*PIPELINE_VARIANTS, *REGISTRATION_METHODS, TRUTH)
#: Default methods of the synthetic / ``--pairs`` benchmark.
SYNTHETIC_METHODS: Tuple[str, ...] = (UNIFUSE, *REGISTRATION_METHODS, TRUTH)
#: Default methods of ``--real``: every refinement, the ablations and every baseline.
REAL_METHODS: Tuple[str, ...] = (*PIPELINE_VARIANTS, *REGISTRATION_METHODS)
#: Fusion rules applied after each registration baseline.
FUSION_RULES: Tuple[str, ...] = ("average", "max", "laplacian")
FUSION_KEYS: Tuple[str, ...] = FUSION_METRIC_KEYS
#: Scalar alignment metrics of a row (``dice_per_label`` is recorded next to them).
ALIGNMENT_KEYS: Tuple[str, ...] = ("epe_mm", "epe_median_mm", "epe_p95_mm", "epe_max_mm", "epe_reduction_percent",
                                   "dice", "folding_percent", "mse", "cc", "ssim", "mind")

Log = Callable[[str], None]


@dataclass
class BenchOptions:
    """What ``unifuse bench`` runs (CLI flags in brackets).

    Attributes:
        quick: tiny inputs and cheap baseline settings [--quick].
        tasks: synthetic tasks to run; None = all three unless ``pairs`` or ``real`` is given [--tasks].
        cases_per_task: synthetic cases per task; with ``real``: the first N real cases (None = all) [--cases].
        case_names: with ``real`` or ``pairs``: only these cases (folder names) [--case].
        size: edge of the synthetic reference grid in voxels [--size].
        first_seed: first demo-stream seed of the synthetic cases.
        pairs: folder of user pairs [--pairs].
        real: run the real-anatomy validation cases of ``cache`` [--real].
        cache: the real-data cache (``unifuse data real``) [--cache].
        split: which real split [--split].
        methods: methods to run (:data:`METHODS`); None = :data:`SYNTHETIC_METHODS` or :data:`REAL_METHODS`
            [--methods].
        rules: fusion rules after each registration baseline (:data:`FUSION_RULES`); None = all three, or none
            with ``real`` (alignment only) [--rules].
        weights: UniFuse checkpoint; None = shipped weights or untrained [--weights].
        config: config of an untrained network (forces an untrained network) [--config].
        spacing_mm: UniFuse working-grid spacing (mm); None = the pipeline's default [--spacing].
        device: ``auto``, ``cpu`` or ``cuda`` [--device].
        threads: CPU threads for torch and the registration toolkits; None = all cores [--threads].
        settings: registration effort; None = :data:`QUICK_SETTINGS` / :data:`FULL_SETTINGS` /
            :data:`REAL_SETTINGS` (``real`` without ``quick``).
        ants_python: interpreter with antspyx for ``ants-syn`` (None: :func:`baseline_interpreter`)
            [--ants-python].
        mind: compute the truth-free MIND dissimilarity of every aligned volume [--no-mind turns it off].
    """

    quick: bool = False
    tasks: Optional[Sequence[str]] = None
    cases_per_task: Optional[int] = None
    case_names: Optional[Sequence[str]] = None
    size: Optional[int] = None
    first_seed: int = BENCH_FIRST_SEED
    pairs: Optional[Path] = None
    real: bool = False
    cache: Optional[Path] = None
    split: str = "validation"
    methods: Optional[Sequence[str]] = None
    rules: Optional[Sequence[str]] = None
    weights: Optional[Path] = None
    config: Optional[str] = None
    spacing_mm: Optional[float] = None
    device: str = "auto"
    threads: Optional[int] = None
    settings: Optional[RegistrationSettings] = None
    ants_python: Optional[str] = None
    mind: bool = True

    def resolved(self) -> "BenchOptions":
        """A copy with every default filled in and every name validated (raises :class:`UniFuseError`)."""
        methods = tuple(self.methods) if self.methods is not None else (REAL_METHODS if self.real else SYNTHETIC_METHODS)
        unknown = [m for m in methods if m not in METHODS]
        if unknown or not methods:
            raise UniFuseError(f"unknown or empty --methods {list(unknown or methods)}; choose from {', '.join(METHODS)}")
        rules = tuple(self.rules) if self.rules is not None else (() if self.real else FUSION_RULES)
        bad_rules = [r for r in rules if r not in FUSION_RULES]
        if bad_rules:
            raise UniFuseError(f"unknown --rules {bad_rules}; choose from {', '.join(FUSION_RULES)}")
        tasks = self.tasks if self.tasks is not None else (() if (self.pairs is not None or self.real) else BENCH_TASKS)
        bad_tasks = [t for t in tasks if t not in BENCH_TASKS]
        if bad_tasks:
            raise UniFuseError(f"unknown --tasks {bad_tasks}; choose from {', '.join(BENCH_TASKS)}")
        size = int(self.size if self.size is not None else (32 if self.quick else 64))
        default_cases = None if (self.real and not tasks) else (1 if self.quick else 2)
        cases = self.cases_per_task if self.cases_per_task is not None else default_cases
        if size < 16 or (cases is not None and int(cases) < 1):
            raise UniFuseError(f"--size must be ≥ 16 voxels and --cases ≥ 1; got size {size}, cases {cases}")
        if self.spacing_mm is not None:
            FuseOptions(spacing_mm=self.spacing_mm)  # validates the range (one-line UniFuseError)
        cache = Path(self.cache) if self.cache is not None else (Path("real_data") if self.real else None)
        threads = int(self.threads or os.cpu_count() or 1)
        default = QUICK_SETTINGS if self.quick else (REAL_SETTINGS if self.real else FULL_SETTINGS)
        settings = (self.settings or default).with_threads(threads)
        return replace(self, tasks=tuple(tasks), size=size, cases_per_task=None if cases is None else int(cases),
                       threads=threads, cache=cache, methods=tuple(m for m in METHODS if m in methods),
                       rules=tuple(r for r in FUSION_RULES if r in rules), settings=settings)


@dataclass
class BenchResults:
    """Everything a benchmark run measured (JSON-ready except ``examples``).

    Attributes:
        meta: date, machine, software versions, options, model, memory method, notes.
        unavailable: method -> reason it could not run here.
        fusion: one dict per (case, fusion row): case, task, method, registration, rule, metrics, time, memory.
        alignment: one dict per (case, registration incl. UniFuse runs): metrics, time, memory (UniFuse runs also
            ``guard`` = the run's ``report["alignment"]``, ``timings_s``, degradation and warnings).
        failures: one dict per (case, method) that raised: the error message (the run goes on).
        examples: per task, central axial slices (2D float arrays in [0, 1]) of the first case:
            ``reference``, ``label`` (if known), ``moving`` (header geometry), ``aligned`` {registration: slice},
            ``fused`` {row: slice}.
    """

    meta: Dict[str, Any]
    unavailable: Dict[str, str] = field(default_factory=dict)
    fusion: List[Dict[str, Any]] = field(default_factory=list)
    alignment: List[Dict[str, Any]] = field(default_factory=list)
    failures: List[Dict[str, Any]] = field(default_factory=list)
    examples: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> Dict[str, Any]:
        return {"meta": self.meta, "unavailable": self.unavailable, "summary": summarize(self),
                "fusion": self.fusion, "alignment": self.alignment, "failures": self.failures}


def machine_description() -> Dict[str, Any]:
    """CPU model, core count, RAM, OS, Python/torch/SimpleITK versions and the GPU (if any)."""
    ram = proc_bytes("/proc/meminfo", "MemTotal")
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = f"{props.name} ({props.total_memory / 2**30:.1f} GiB)"
    return {
        "cpu": cpu_model(), "cpu_count": os.cpu_count(), "ram_gib": round(ram / 2**30, 1) if ram else math.nan, "gpu": gpu,
        "os": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "simpleitk": sitk.Version_VersionString(), "unifuse": __version__,
    }


# ------------------------------------------------------------------------------------------- per-case work


@dataclass
class _CaseData:
    """Per-case data shared by all methods: the evaluation case (masks, [0, 1] intensities, truth) and the
    normalised copies given to the registration baselines."""

    case: BenchCase
    ev: EvaluationCase
    ref_for_reg: Optional[sitk.Image] = None
    mov_for_reg: Optional[sitk.Image] = None


def _prepare(case: BenchCase) -> _CaseData:
    return _CaseData(case=case, ev=as_evaluation_case(case))


def _field_transform(displacement: sitk.Image) -> sitk.Transform:
    """A transform ``x -> x + U(x)`` from a displacement field (the field image is copied, not consumed)."""
    return sitk.DisplacementFieldTransform(sitk.Cast(displacement, sitk.sitkVectorFloat64))


def _fuse_rule(rule: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return {"average": fuse_average, "max": fuse_max, "laplacian": fuse_laplacian_pyramid}[rule](a, b)


def _mid(volume: np.ndarray) -> np.ndarray:
    """Central axial slice (z index S/2) as float32."""
    return np.asarray(volume[volume.shape[0] // 2], dtype=np.float32)


def _memory(m: Measurement) -> Dict[str, Any]:
    return {"peak_rss_mb": m.peak_rss_mb, "rss_increase_mb": m.rss_increase_mb, "cuda_peak_mb": m.cuda_peak_mb}


# ---------------------------------------------------------------------------------------------- main loop


def _selected(cases: List[BenchCase], names: Optional[Sequence[str]], where: str) -> List[BenchCase]:
    """``cases`` restricted to ``names`` (None: all); an unknown name is a user error."""
    if names is None:
        return cases
    unknown = [n for n in names if n not in {c.name for c in cases}]
    if unknown:
        raise UniFuseError(f"--case {' '.join(unknown)}: no such case in {where}; choose from "
                           f"{', '.join(c.name for c in cases)}")
    return [c for c in cases if c.name in set(names)]


def _cases(opts: BenchOptions, log: Log) -> Iterable[BenchCase]:
    if opts.real:
        cases = _selected(real_cases(opts.cache, opts.split), opts.case_names, f"{opts.cache} ({opts.split})")
        if opts.cases_per_task is not None:
            cases = cases[: opts.cases_per_task]
        log(f"--real {opts.cache} ({opts.split}): {len(cases)} case(s): "
            + ", ".join(f"{c.name} [{c.task}]" for c in cases))
        yield from cases
    if opts.pairs is not None:
        cases = _selected(folder_cases(opts.pairs), opts.case_names, str(opts.pairs))
        log(f"--pairs {opts.pairs}: {len(cases)} case(s): {', '.join(c.name for c in cases)}")
        yield from cases
    if opts.tasks:
        yield from synthetic_cases(opts.tasks, opts.cases_per_task, opts.size, opts.first_seed)


def _warm_up(loaded: Any, device: Any, opts: BenchOptions, variants: Sequence[str], log: Log) -> None:
    """One untimed pipeline run per refinement setting on a small synthetic pair, so that one-off
    initialisation (lazy imports, torch kernels) is not timed as the first case's."""
    if not variants:
        return
    demo = make_demo_case(size=24, task="t1-t2-motion", seed=BENCH_FIRST_SEED)
    t0 = time.perf_counter()
    for refine in sorted({PIPELINE_VARIANTS[v][0].get("refine", FuseOptions().refine) for v in variants}):
        try:
            fuse(demo.reference, demo.moving, device=str(device), model=loaded, map_back=False, refine=refine)
        except Exception as exc:  # the timed runs will report it per case
            log(f"warm-up (refine={refine}) failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    log(f"warm-up: {time.perf_counter() - t0:.1f} s (not counted)")


def run_benchmark(options: BenchOptions, log: Optional[Log] = None) -> BenchResults:
    """Run the benchmark of the module docstring; nothing is written (see :mod:`unifuse.bench.report`).

    Args:
        options: what to run (see :class:`BenchOptions`; defaults are resolved here).
        log: progress lines (default: print to stdout).

    Returns:
        :class:`BenchResults`. A method that raises on a case is recorded in ``failures`` and the run goes on;
        a method that cannot run here at all is listed in ``unavailable`` with the reason.
    """
    log = log or (lambda line: print(line, flush=True))
    opts = options.resolved()
    torch.set_num_threads(opts.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(opts.threads)

    unavailable: Dict[str, str] = {}
    registrations: List[str] = []
    for name in opts.methods:
        if name in REGISTRATION_METHODS:
            ok, reason = registration_method(name).availability(baseline_interpreter(name, opts.ants_python))
            if ok:
                registrations.append(name)
            else:
                unavailable[name] = reason
                log(f"{name}: unavailable: {reason}")
    variants = [m for m in opts.methods if m in PIPELINE_VARIANTS]
    run_truth = TRUTH in opts.methods

    loaded = None
    model_info: Dict[str, Any] = {}
    device = resolve_device(opts.device)
    if variants:
        loaded = load_model(opts.weights, opts.config, device)
        model_info = {"id": loaded.model_id, "config": loaded.config.name, "trained": loaded.trained,
                      "source": loaded.source,
                      "spacing_mm": FuseOptions(spacing_mm=opts.spacing_mm).working_spacing_mm}
        if not loaded.trained:
            model_info["warning"] = UNTRAINED_WARNING
            log(f"WARNING: {UNTRAINED_WARNING}")
        log(f"UniFuse model {loaded.model_id} ({'trained' if loaded.trained else 'UNTRAINED'}) on {device}")

    results = BenchResults(meta={
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_description(),
        "device": str(device),
        "threads": opts.threads,
        "quick": opts.quick,
        "synthetic": {"tasks": list(opts.tasks), "cases_per_task": opts.cases_per_task, "size": opts.size,
                      "seeds": [opts.first_seed + k for k in range(opts.cases_per_task)]} if opts.tasks else None,
        "pairs": str(opts.pairs) if opts.pairs is not None else None,
        "real": {"cache": str(opts.cache), "split": opts.split, "categories": list(REAL_CATEGORIES),
                 "cases": []} if opts.real else None,
        "methods": list(opts.methods),
        "rules": list(opts.rules),
        "pipeline_variants": {v: {"options": PIPELINE_VARIANTS[v][0], "description": PIPELINE_VARIANTS[v][1]}
                              for v in variants},
        "registration_settings": {k: (list(v) if isinstance(v, tuple) else v)
                                  for k, v in opts.settings.__dict__.items()},
        "registration_descriptions": {n: REGISTRATION_METHODS[n].description for n in registrations},
        "interpreters": {n: baseline_interpreter(n, opts.ants_python) for n in registrations if n != HEADER_ONLY},
        "model": model_info or None,
        "memory_method": memory_method(),
        "evaluation_mask": MASK_RULE,
    }, unavailable=unavailable)

    if loaded is not None and not opts.quick:  # --quick is a smoke test, not a measurement
        _warm_up(loaded, device, opts, variants, log)
    t_start = time.perf_counter()
    for index, case in enumerate(_cases(opts, log)):
        log(f"case {index + 1}: {case.name} [{case.task}] (reference {case.reference.GetSize()}, "
            f"moving {case.moving.GetSize()})")
        if results.meta["real"] is not None:
            results.meta["real"]["cases"].append({"case": case.name, **case.info})
        _run_case(case, opts, variants, registrations, run_truth, loaded, device, results, log)
    results.meta["total_seconds"] = round(time.perf_counter() - t_start, 1)
    return results


class _CaseRun:
    """Records the rows of one case into :class:`BenchResults` (alignment, fusion, failures, example slices)."""

    def __init__(self, data: _CaseData, results: BenchResults, log: Log, fusion: bool) -> None:
        self.data, self.results, self.log, self.fusion = data, results, log, fusion
        case = data.case
        self.base = {"case": case.name, "task": case.task}
        self.example: Optional[Dict[str, Any]] = None
        if case.task not in results.examples:
            ev = data.ev
            pre = geometry.resample(case.moving, case.reference, default=float(ev.moving_norm.low))
            self.example = {"case": case.name, "reference": _mid(ev.reference_u), "moving": _mid(ev.moving_u(pre)),
                            "label": _mid(ev.label_u) if ev.label_u is not None else None, "aligned": {},
                            "fused": {}}
            results.examples[case.task] = self.example

    def fusion_row(self, method: str, registration: str, rule: str, fused: np.ndarray, seconds: float,
                   memory: Dict[str, Any]) -> None:
        row = {**self.base, "method": method, "registration": registration, "rule": rule, "seconds": seconds,
               **memory}
        row["metrics"] = evaluate_fusion(self.data.ev, fused) if self.data.ev.label_u is not None else {}
        self.results.fusion.append(row)
        if self.example is not None:
            self.example["fused"][method] = _mid(fused)

    def alignment_row(self, method: str, aligned: sitk.Image, displacement: sitk.Image, m: Measurement,
                      mind: bool, jacobian: Optional[sitk.Image] = None,
                      extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        values = evaluate_alignment(self.data.ev, aligned, displacement, jacobian=jacobian, mind=mind)
        per_label = values.pop("dice_per_label", None)
        row = {**self.base, "method": method, "metrics": values, "seconds": m.seconds, **_memory(m), **(extra or {})}
        if per_label is not None:
            row["dice_per_label"] = per_label
        self.results.alignment.append(row)
        if self.example is not None:
            self.example["aligned"][method] = _mid(self.data.ev.moving_u(aligned))
        return values

    def fail(self, method: str, exc: BaseException) -> None:
        message = f"{type(exc).__name__}: {exc}".splitlines()[0]
        self.results.failures.append({**self.base, "method": method, "error": message})
        self.log(f"  {method:<20} FAILED: {message}")

    def add_reductions(self) -> None:
        """``epe_reduction_percent`` of every row of this case against its header-only (``none``) row."""
        rows = [r for r in self.results.alignment if r["case"] == self.base["case"] and r["task"] == self.base["task"]]
        floor = next((r["metrics"].get("epe_mm") for r in rows if r["method"] == HEADER_ONLY), None)
        if floor is None:
            return
        for r in rows:
            if "epe_mm" in r["metrics"]:
                r["metrics"]["epe_reduction_percent"] = reduction_percent(floor, r["metrics"]["epe_mm"])


def _run_case(case: BenchCase, opts: BenchOptions, variants: Sequence[str], registrations: Sequence[str],
              run_truth: bool, loaded: Any, device: Any, results: BenchResults, log: Log) -> None:
    data = _prepare(case)
    rec = _CaseRun(data, results, log, fusion=bool(opts.rules))
    for name in variants:
        _run_variant(name, rec, opts, loaded, device)
    methods: List[str] = list(registrations)
    if run_truth and case.truth_displacement is not None:
        methods.append(TRUTH)
    for name in methods:
        _run_registration(name, rec, opts)
    rec.add_reductions()


def _run_variant(name: str, rec: _CaseRun, opts: BenchOptions, loaded: Any, device: Any) -> None:
    """One UniFuse pipeline run (:data:`PIPELINE_VARIANTS`) on the case: alignment row (+ fusion row)."""
    case = rec.data.case
    overrides = PIPELINE_VARIANTS[name][0]
    try:
        with measure(device if device.type == "cuda" else None) as m:
            result = fuse(case.reference, case.moving, degradation="auto", device=str(device), model=loaded,
                          spacing_mm=opts.spacing_mm, map_back=False,
                          moving_modality=case.moving_modality or "auto", **overrides)
        report = result.report
        values = rec.alignment_row(name, result.aligned, result.displacement, m, opts.mind, result.jacobian, {
            "options": {"network": overrides.get("network", True), "refine": report["options"]["refine"]},
            "guard": report["alignment"], "timings_s": report["timings_s"],
            "working_grid_spacing_mm": report["working_grid"].get("spacing_mm"),
            "degradation_true": case.degradation, "degradation_predicted": report["degradation"]["predicted"],
            "moving_modality": report["degradation"]["moving_modality"],
            "warnings": report.get("warnings", [])})
        if rec.fusion or not opts.real:  # synthetic/pairs: UniFuse's own fused volume always has a row
            rec.fusion_row(name, name, name, sitk.GetArrayFromImage(result.fused), m.seconds, _memory(m))
        if rec.fusion and rec.data.ev.label_u is not None:  # the same final alignment fused by each rule
            _unifuse_outputs(name, rec, opts, result, values)
    except Exception as exc:  # one failing run must not end the benchmark; it is listed under failures
        rec.fail(name, exc)
        return
    rec.log(f"  {name:<20} {m.seconds:7.2f} s  {_short(values)}  [guard: {guard_text(report['alignment'])}]")


def _unifuse_outputs(name: str, rec: _CaseRun, opts: BenchOptions, result: Any, values: Dict[str, Any]) -> None:
    """Rows ``<variant> alignment+<rule>`` (UniFuse's own final alignment fused by each rule: what the
    network's fusion must beat) and, in the variant's alignment row, the fused/restored volumes' sharpness and
    the restoration's PSNR/SSIM against the clean truth (issue 12)."""
    ev = rec.data.ev
    aligned_u = ev.moving_u(result.aligned)
    row = next(r for r in reversed(rec.results.alignment) if r["method"] == name and r["case"] == rec.base["case"])
    row["outputs"] = {"fused": evaluate_output_sharpness(ev, sitk.GetArrayFromImage(result.fused),
                                                         (ev.reference_u, ev.label_u))}
    if result.restored is not None:
        restored_u = ev.moving_norm.apply(sitk.GetArrayViewFromImage(result.restored)) \
            if result.report.get("restored") == "moving units" else sitk.GetArrayFromImage(result.restored)
        row["outputs"]["restored"] = {**evaluate_output_sharpness(ev, restored_u, (ev.label_u,)),
                                      **evaluate_restoration(ev, restored_u, aligned_u)}
    for rule in opts.rules:
        with measure() as mr:
            fused = _fuse_rule(rule, ev.reference_u, aligned_u)
        rec.fusion_row(f"{name} alignment+{rule}", name, rule, fused, mr.seconds, _memory(mr))


def _run_registration(name: str, rec: _CaseRun, opts: BenchOptions) -> None:
    """One registration baseline (or the oracle field): alignment row, then one fusion row per rule."""
    data, case = rec.data, rec.data.case
    low = float(data.ev.moving_norm.low)
    try:
        if name == TRUTH:
            with measure() as m:
                displacement = case.truth_displacement
                aligned = geometry.warp_image(case.moving, _field_transform(displacement), case.reference, default=low)
        else:
            if data.ref_for_reg is None:
                data.ref_for_reg = normalized_for_registration(case.reference)
                data.mov_for_reg = normalized_for_registration(case.moving)
            if name == HEADER_ONLY:
                with measure() as m:
                    transform = registration_method(name).register(data.ref_for_reg, data.mov_for_reg, opts.settings)
                    displacement = geometry.transform_to_displacement(transform, case.reference)
            else:
                displacement, m = register_isolated(name, data.ref_for_reg, data.mov_for_reg, opts.settings,
                                                    python=baseline_interpreter(name, opts.ants_python))
                displacement.CopyInformation(case.reference)
            t0 = time.perf_counter()
            aligned = geometry.warp_image(case.moving, _field_transform(displacement), case.reference, default=low)
            m.seconds += time.perf_counter() - t0
        values = rec.alignment_row(name, aligned, displacement, m, opts.mind)
    except Exception as exc:  # a toolkit failing on one case must not end the benchmark
        rec.fail(name, exc)
        return
    rec.log(f"  {name:<20} {m.seconds:7.2f} s  {_short(values)}")
    if not opts.rules:
        return
    aligned_u = data.ev.moving_u(aligned)
    for rule in opts.rules:
        with measure() as mr:
            fused = _fuse_rule(rule, data.ev.reference_u, aligned_u)
        memory = {"peak_rss_mb": max(m.peak_rss_mb, mr.peak_rss_mb),
                  "rss_increase_mb": max(m.rss_increase_mb, mr.rss_increase_mb), "cuda_peak_mb": None}
        rec.fusion_row(f"{name}+{rule}", name, rule, fused, m.seconds + mr.seconds, memory)


def _short(values: Dict[str, float]) -> str:
    parts = []
    for key, label, fmt in (("epe_mm", "EPE", "{:.2f} mm"), ("dice", "Dice", "{:.3f}"), ("ssim", "SSIM", "{:.3f}"),
                            ("mind", "MIND", "{:.3f}"), ("folding_percent", "fold", "{:.2f} %")):
        if key in values:
            parts.append(f"{label} " + fmt.format(values[key]))
    return "  ".join(parts)
