"""``unifuse bench``: UniFuse against multi-stage baselines on the same cases, metrics and machine, in one run.

For every case (:mod:`unifuse.bench.cases`) and method:

* **UniFuse** — :func:`unifuse.pipeline.fuse` with one network loaded once (shipped weights, ``--weights``, or
  an untrained network that the report flags), ``degradation="auto"``, fused volume in [0, 1]
  (``map_back=False``).
* **registration baselines** (:mod:`unifuse.bench.baselines`) — ``none`` (the floor), ``sitk-bspline``,
  ``ants-syn``, ``elastix-bspline`` and, when the exact field is known, ``truth`` (the oracle: the true field,
  the ceiling of what any registration + fusion rule can reach). Each gives a fixed -> moving transform; the
  ORIGINAL moving volume is warped once onto the reference grid, then fused with the reference by each rule
  of :mod:`unifuse.fusion_rules` (``average``, ``max``, ``laplacian``): rows ``<registration>+<rule>``.

Intensities (all methods alike): reference R and aligned moving A are mapped to [0, 1] with the pipeline's
rules computed once per case on the reference and on the moving INPUT (:func:`unifuse.intensity.
normalize_image`), so every method's aligned volume gets the same mapping; the clean aligned label L gets its
own rule (it is a different acquisition).

Metrics (DESIGN §7, :mod:`unifuse.metrics`):

* fusion rows (need the label L): ``q_mse, q_cc, q_psnr, q_ssim, q_vif, q_scd`` of the fused volume against
  the sources (R, L); ``q_vif`` is ``nan`` on volumes with an edge under 41 voxels (4-scale VIF undefined).
* alignment rows (one per registration, UniFuse included): endpoint error (mean and max over the head,
  R_[0,1] > 0.05, mm) against the true field; Dice (mean over labels) of the moving-pose labels warped by the
  method vs the reference labels; % folding voxels (Jacobian det ≤ 0 of ``x -> x + U(x)`` on the reference
  grid); MSE/CC/SSIM of A vs L (the paper's Table 6); and ``mind``, the mean local MIND dissimilarity of A
  to R inside the reference's head mask (:func:`unifuse.error_maps.local_dissimilarity`; needs no truth).
* cost: wall time per case per method (fusion rows: registration + rule) and peak memory
  (:mod:`unifuse.bench.measure`).
"""

from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from .. import __version__
from ..errors import UniFuseError
from ..metrics import FUSION_METRIC_KEYS
from .baselines import (FULL_SETTINGS, QUICK_SETTINGS, REGISTRATION_METHODS, RegistrationSettings,
                        normalized_for_registration, register_isolated, registration_method)
from .cases import BENCH_FIRST_SEED, BENCH_TASKS, BenchCase, folder_cases, synthetic_cases
from .measure import Measurement, measure, memory_method

__all__ = [
    "UNIFUSE",
    "TRUTH",
    "METHODS",
    "FUSION_RULES",
    "FUSION_KEYS",
    "ALIGNMENT_KEYS",
    "HEAD_THRESHOLD",
    "BenchOptions",
    "BenchResults",
    "machine_description",
    "run_benchmark",
]

UNIFUSE = "unifuse"
TRUTH = "truth"
#: Every method name accepted by ``--methods``, in table order.
METHODS: Tuple[str, ...] = (UNIFUSE, *REGISTRATION_METHODS, TRUTH)
#: Fusion rules applied after each registration baseline.
FUSION_RULES: Tuple[str, ...] = ("average", "max", "laplacian")
FUSION_KEYS: Tuple[str, ...] = FUSION_METRIC_KEYS
ALIGNMENT_KEYS: Tuple[str, ...] = ("epe_mm", "epe_max_mm", "dice", "folding_percent", "mse", "cc", "ssim", "mind")
#: Head mask of the endpoint error: voxels where the [0, 1]-normalised reference exceeds this (as ``unifuse demo``).
HEAD_THRESHOLD = 0.05

Log = Callable[[str], None]


@dataclass
class BenchOptions:
    """What ``unifuse bench`` runs (CLI flags in brackets).

    Attributes:
        quick: tiny inputs and cheap baseline settings [--quick].
        tasks: synthetic tasks to run; None = all three unless ``pairs`` is given [--tasks].
        cases_per_task: synthetic cases per task [--cases].
        size: edge of the synthetic reference grid in voxels [--size].
        first_seed: first demo-stream seed of the synthetic cases.
        pairs: folder of user pairs [--pairs].
        methods: methods to run (:data:`METHODS`) [--methods].
        rules: fusion rules after each registration baseline (:data:`FUSION_RULES`) [--rules].
        weights: UniFuse checkpoint; None = shipped weights or untrained [--weights].
        config: config of an untrained network (forces an untrained network) [--config].
        working_size: UniFuse working grid edge; None = the weights' [--working-size].
        device: ``auto``, ``cpu`` or ``cuda`` [--device].
        threads: CPU threads for torch and the registration toolkits; None = all cores [--threads].
        settings: registration effort; None = :data:`QUICK_SETTINGS` / :data:`FULL_SETTINGS`.
    """

    quick: bool = False
    tasks: Optional[Sequence[str]] = None
    cases_per_task: Optional[int] = None
    size: Optional[int] = None
    first_seed: int = BENCH_FIRST_SEED
    pairs: Optional[Path] = None
    methods: Sequence[str] = METHODS
    rules: Sequence[str] = FUSION_RULES
    weights: Optional[Path] = None
    config: Optional[str] = None
    working_size: Optional[int] = None
    device: str = "auto"
    threads: Optional[int] = None
    settings: Optional[RegistrationSettings] = None

    def resolved(self) -> "BenchOptions":
        """A copy with every default filled in and every name validated (raises :class:`UniFuseError`)."""
        from dataclasses import replace

        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise UniFuseError(f"unknown or empty --methods {list(unknown or self.methods)}; choose from {', '.join(METHODS)}")
        bad_rules = [r for r in self.rules if r not in FUSION_RULES]
        if bad_rules:
            raise UniFuseError(f"unknown --rules {bad_rules}; choose from {', '.join(FUSION_RULES)}")
        tasks = self.tasks if self.tasks is not None else (() if self.pairs is not None else BENCH_TASKS)
        bad_tasks = [t for t in tasks if t not in BENCH_TASKS]
        if bad_tasks:
            raise UniFuseError(f"unknown --tasks {bad_tasks}; choose from {', '.join(BENCH_TASKS)}")
        size = int(self.size if self.size is not None else (32 if self.quick else 64))
        cases = int(self.cases_per_task if self.cases_per_task is not None else (1 if self.quick else 2))
        if size < 16 or cases < 1:
            raise UniFuseError(f"--size must be ≥ 16 voxels and --cases ≥ 1; got size {size}, cases {cases}")
        threads = int(self.threads or os.cpu_count() or 1)
        settings = (self.settings or (QUICK_SETTINGS if self.quick else FULL_SETTINGS)).with_threads(threads)
        return replace(self, tasks=tuple(tasks), size=size, cases_per_task=cases, threads=threads,
                       methods=tuple(m for m in METHODS if m in self.methods),
                       rules=tuple(r for r in FUSION_RULES if r in self.rules), settings=settings)


@dataclass
class BenchResults:
    """Everything a benchmark run measured (JSON-ready except ``examples``).

    Attributes:
        meta: date, machine, software versions, options, model, memory method, notes.
        unavailable: method -> reason it could not run here.
        fusion: one dict per (case, fusion row): case, task, method, registration, rule, metrics, time, memory.
        alignment: one dict per (case, registration incl. UniFuse): metrics, time, memory.
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
        from .report import summarize

        return {"meta": self.meta, "unavailable": self.unavailable, "summary": summarize(self),
                "fusion": self.fusion, "alignment": self.alignment, "failures": self.failures}


def machine_description() -> Dict[str, Any]:
    """CPU model, core count, RAM, OS, Python/torch/SimpleITK versions and the GPU (if any)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gb = math.nan
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gb = float(line.split()[1]) / 2**20
    except OSError:
        pass
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = f"{props.name} ({props.total_memory / 2**30:.1f} GiB)"
    return {
        "cpu": cpu, "cpu_count": os.cpu_count(), "ram_gib": round(ram_gb, 1), "gpu": gpu,
        "os": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "simpleitk": sitk.Version_VersionString(), "unifuse": __version__,
    }


# ------------------------------------------------------------------------------------------- per-case work


@dataclass
class _CaseData:
    """Per-case arrays shared by all methods (reference grid, (z, y, x), intensities in [0, 1])."""

    case: BenchCase
    ref_u: np.ndarray
    label_u: Optional[np.ndarray]
    moving_norm: Any  # IntensityNormalization of the moving input
    head: np.ndarray  # bool, R_[0,1] > HEAD_THRESHOLD
    mind_mask: sitk.Image
    ref_for_reg: Optional[sitk.Image] = None
    mov_for_reg: Optional[sitk.Image] = None


def _prepare(case: BenchCase) -> _CaseData:
    from ..intensity import foreground_mask, normalize_image

    ref_u, _ = normalize_image(case.reference)
    _, moving_norm = normalize_image(case.moving)
    label_u = normalize_image(case.truth_aligned)[0] if case.truth_aligned is not None else None
    return _CaseData(case=case, ref_u=ref_u, label_u=label_u, moving_norm=moving_norm,
                     head=ref_u > HEAD_THRESHOLD, mind_mask=foreground_mask(case.reference, dilate_mm=5.0))


def _field_transform(displacement: sitk.Image) -> sitk.Transform:
    """A transform ``x -> x + U(x)`` from a displacement field (the field image is copied, not consumed)."""
    return sitk.DisplacementFieldTransform(sitk.Cast(displacement, sitk.sitkVectorFloat64))


def _alignment_metrics(data: _CaseData, aligned: sitk.Image, displacement: sitk.Image,
                       jacobian: Optional[sitk.Image] = None) -> Dict[str, float]:
    """Alignment metrics of one registration result (keys :data:`ALIGNMENT_KEYS`; absent truth -> absent key)."""
    from .. import error_maps, metrics

    case = data.case
    out: Dict[str, float] = {}
    if case.truth_displacement is not None:
        u = np.moveaxis(sitk.GetArrayFromImage(displacement), -1, 0)  # (3, z, y, x) LPS mm
        u_gt = np.moveaxis(sitk.GetArrayFromImage(case.truth_displacement), -1, 0)
        # the fields are already in mm, so the voxel spacing of endpoint_error_mm is 1
        epe = metrics.endpoint_error_mm(u, u_gt, 1.0, mask=data.head if data.head.any() else None)
        out["epe_mm"], out["epe_max_mm"] = epe.mean_mm, epe.max_mm
    if case.moving_labels is not None and case.reference_labels is not None:
        warped = sitk.Resample(case.moving_labels, case.reference, _field_transform(displacement),
                               sitk.sitkNearestNeighbor, 0.0, sitk.sitkUInt8)
        d = metrics.dice(sitk.GetArrayFromImage(warped), sitk.GetArrayFromImage(case.reference_labels))
        out["dice"] = d["mean"]
    jac = jacobian if jacobian is not None else error_maps.jacobian_determinant_image(displacement)
    out["folding_percent"] = metrics.folding_percent(sitk.GetArrayViewFromImage(jac))
    aligned_u = data.moving_norm.apply(sitk.GetArrayFromImage(aligned))
    if data.label_u is not None:
        out.update(metrics.alignment_metrics(aligned_u, data.label_u))
    keep = sitk.GetArrayViewFromImage(data.mind_mask) > 0
    dis = sitk.GetArrayViewFromImage(error_maps.local_dissimilarity(case.reference, aligned, mask=data.mind_mask))
    out["mind"] = float(dis[keep].mean()) if keep.any() else math.nan
    return out


def _fuse_rule(rule: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from ..fusion_rules import fuse_average, fuse_laplacian_pyramid, fuse_max

    return {"average": fuse_average, "max": fuse_max, "laplacian": fuse_laplacian_pyramid}[rule](a, b)


def _mid(volume: np.ndarray) -> np.ndarray:
    """Central axial slice (z index S/2) as float32."""
    return np.asarray(volume[volume.shape[0] // 2], dtype=np.float32)


def _memory(m: Measurement) -> Dict[str, Any]:
    return {"peak_rss_mb": m.peak_rss_mb, "rss_increase_mb": m.rss_increase_mb, "cuda_peak_mb": m.cuda_peak_mb}


# ---------------------------------------------------------------------------------------------- main loop


def _cases(opts: BenchOptions, log: Log) -> Iterable[BenchCase]:
    if opts.pairs is not None:
        cases = folder_cases(opts.pairs)
        log(f"--pairs {opts.pairs}: {len(cases)} case(s): {', '.join(c.name for c in cases)}")
        yield from cases
    if opts.tasks:
        yield from synthetic_cases(opts.tasks, opts.cases_per_task, opts.size, opts.first_seed)


def run_benchmark(options: BenchOptions, log: Optional[Log] = None) -> BenchResults:
    """Run the benchmark of the module docstring; nothing is written (see :mod:`unifuse.bench.report`).

    Args:
        options: what to run (see :class:`BenchOptions`; defaults are resolved here).
        log: progress lines (default: print to stdout).

    Returns:
        :class:`BenchResults`. A method that raises on a case is recorded in ``failures`` and the run goes on;
        a method that cannot run here at all is listed in ``unavailable`` with the reason.
    """
    import torch

    from ..pipeline import load_model, resolve_device

    log = log or (lambda line: print(line, flush=True))
    opts = options.resolved()
    torch.set_num_threads(opts.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(opts.threads)

    unavailable: Dict[str, str] = {}
    registrations: List[str] = []
    for name in opts.methods:
        if name in REGISTRATION_METHODS:
            ok, reason = registration_method(name).availability()
            if ok:
                registrations.append(name)
            else:
                unavailable[name] = reason
                log(f"{name}: unavailable: {reason}")
    run_truth = TRUTH in opts.methods

    loaded = None
    model_info: Dict[str, Any] = {}
    device = resolve_device(opts.device)
    if UNIFUSE in opts.methods:
        loaded = load_model(opts.weights, opts.config, device)
        model_info = {"id": loaded.model_id, "config": loaded.config.name, "trained": loaded.trained,
                      "source": loaded.source, "working_size": int(opts.working_size or loaded.config.working_size)}
        if not loaded.trained:
            from ..pipeline import UNTRAINED_WARNING

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
        "methods": list(opts.methods),
        "rules": list(opts.rules),
        "registration_settings": {k: (list(v) if isinstance(v, tuple) else v)
                                  for k, v in opts.settings.__dict__.items()},
        "registration_descriptions": {n: REGISTRATION_METHODS[n].description for n in registrations},
        "model": model_info or None,
        "memory_method": memory_method(),
        "head_threshold": HEAD_THRESHOLD,
    }, unavailable=unavailable)

    t_start = time.perf_counter()
    for index, case in enumerate(_cases(opts, log)):
        log(f"case {index + 1}: {case.name} (reference {case.reference.GetSize()}, moving {case.moving.GetSize()})")
        _run_case(case, opts, registrations, run_truth, loaded, device, results, log)
    results.meta["total_seconds"] = round(time.perf_counter() - t_start, 1)
    return results


def _run_case(case: BenchCase, opts: BenchOptions, registrations: Sequence[str], run_truth: bool, loaded: Any,
              device: Any, results: BenchResults, log: Log) -> None:
    from .. import geometry
    from ..metrics import fusion_metrics
    from ..pipeline import fuse

    data = _prepare(case)
    example = None
    if case.task not in results.examples:
        pre = geometry.resample(case.moving, case.reference, default=float(data.moving_norm.low))
        example = {"case": case.name, "reference": _mid(data.ref_u),
                   "moving": _mid(data.moving_norm.apply(sitk.GetArrayFromImage(pre))),
                   "label": _mid(data.label_u) if data.label_u is not None else None, "aligned": {}, "fused": {}}
        results.examples[case.task] = example
    base = {"case": case.name, "task": case.task}

    def record_fusion(method: str, registration: str, rule: str, fused: np.ndarray, seconds: float,
                      memory: Dict[str, Any]) -> None:
        row = {**base, "method": method, "registration": registration, "rule": rule, "seconds": seconds, **memory}
        if data.label_u is not None:
            row["metrics"] = fusion_metrics(data.ref_u, data.label_u, fused)
        else:
            row["metrics"] = {}
        results.fusion.append(row)
        if example is not None:
            example["fused"][method] = _mid(fused)

    def record_alignment(method: str, aligned: sitk.Image, displacement: sitk.Image, m: Measurement,
                         jacobian: Optional[sitk.Image] = None, extra: Optional[Dict[str, Any]] = None) -> Dict[str, float]:
        values = _alignment_metrics(data, aligned, displacement, jacobian)
        results.alignment.append({**base, "method": method, "metrics": values, "seconds": m.seconds,
                                  **_memory(m), **(extra or {})})
        if example is not None:
            example["aligned"][method] = _mid(data.moving_norm.apply(sitk.GetArrayFromImage(aligned)))
        return values

    def fail(method: str, exc: BaseException) -> None:
        message = f"{type(exc).__name__}: {exc}".splitlines()[0]
        results.failures.append({**base, "method": method, "error": message})
        log(f"  {method:<16} FAILED: {message}")

    if loaded is not None:
        try:
            with measure(device if device.type == "cuda" else None) as m:
                result = fuse(case.reference, case.moving, degradation="auto", device=str(device), model=loaded,
                              working_size=opts.working_size, map_back=False)
            values = record_alignment(UNIFUSE, result.aligned, result.displacement, m, result.jacobian, {
                "degradation_true": case.degradation, "degradation_predicted": result.report["degradation"]["predicted"],
                "timings_s": result.report["timings_s"]})
            record_fusion(UNIFUSE, UNIFUSE, UNIFUSE, sitk.GetArrayFromImage(result.fused), m.seconds, _memory(m))
            log(f"  {UNIFUSE:<16} {m.seconds:7.2f} s  {_short(values)}")
        except UniFuseError as exc:
            fail(UNIFUSE, exc)

    methods: List[str] = list(registrations)
    if run_truth and case.truth_displacement is not None:
        methods.append(TRUTH)
    for name in methods:
        try:
            if name == TRUTH:
                with measure() as m:
                    transform = _field_transform(case.truth_displacement)
                    displacement = case.truth_displacement
                    aligned = geometry.warp_image(case.moving, transform, case.reference, default=float(data.moving_norm.low))
            else:
                if data.ref_for_reg is None:
                    data.ref_for_reg = normalized_for_registration(case.reference)
                    data.mov_for_reg = normalized_for_registration(case.moving)
                if name == "none":
                    with measure() as m:
                        transform = registration_method(name).register(data.ref_for_reg, data.mov_for_reg, opts.settings)
                        displacement = geometry.transform_to_displacement(transform, case.reference)
                else:
                    displacement, m = register_isolated(name, data.ref_for_reg, data.mov_for_reg, opts.settings)
                    displacement.CopyInformation(case.reference)
                t0 = time.perf_counter()
                aligned = geometry.warp_image(case.moving, _field_transform(displacement), case.reference,
                                              default=float(data.moving_norm.low))
                m.seconds += time.perf_counter() - t0
            values = record_alignment(name, aligned, displacement, m)
        except Exception as exc:  # a toolkit failing on one case must not end the benchmark
            fail(name, exc)
            continue
        log(f"  {name:<16} {m.seconds:7.2f} s  {_short(values)}")
        aligned_u = data.moving_norm.apply(sitk.GetArrayFromImage(aligned))
        for rule in opts.rules:
            with measure() as mr:
                fused = _fuse_rule(rule, data.ref_u, aligned_u)
            memory = {"peak_rss_mb": max(m.peak_rss_mb, mr.peak_rss_mb),
                      "rss_increase_mb": max(m.rss_increase_mb, mr.rss_increase_mb), "cuda_peak_mb": None}
            record_fusion(f"{name}+{rule}", name, rule, fused, m.seconds + mr.seconds, memory)


def _short(values: Dict[str, float]) -> str:
    parts = []
    for key, label, fmt in (("epe_mm", "EPE", "{:.2f} mm"), ("dice", "Dice", "{:.3f}"), ("ssim", "SSIM", "{:.3f}"),
                            ("mind", "MIND", "{:.3f}"), ("folding_percent", "fold", "{:.2f} %")):
        if key in values:
            parts.append(f"{label} " + fmt.format(values[key]))
    return "  ".join(parts)
