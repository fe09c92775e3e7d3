"""``unifuse bench --speed``: the UniFuse pipeline alone at finer and finer working grids, per stage, with peak
memory.

Input: one fixed pair — the synthetic benchmark case ``make_demo_case(64, "t1-t2-motion", seed=BENCH_FIRST_SEED)``
(233 mm field of view) resampled (linear) onto a reference grid of ``reference_spacing_mm`` (default 1.5 mm:
155³ = 3.7 M voxels, the size class of a 256 × 256 clinical acquisition) and onto its moving grid refined by the
same factor. The pipeline (its default options: affine, network field, fast refinement) then runs with the
working-grid spacing ``spacing_mm`` = each of ``spacings`` (default 4, 3, 2, 1.5 mm), coarse to fine; the
reference-grid stages (warp, maps) stay the same size and the working-grid stages grow. For each device (CPU;
CUDA when present) and precision (``fp32``; on CUDA also ``bf16`` = ``torch.autocast(dtype=torch.bfloat16)``
around the pipeline, which reaches the network's matrix products and convolutions only) and optionally
``torch.compile``:

* one warm-up run at the first spacing (library initialisation, CUDA context, kernel selection; with
  ``--compile`` a warm-up at every spacing, because each new shape is compiled once), then ``repeats`` timed
  runs; the row shows the run with the median total time;
* per-stage times from the pipeline report's ``timings_s`` (:data:`STAGES`), the working grid actually used,
  peak RSS increase (:mod:`unifuse.bench.measure`) and, on CUDA, the peak memory PyTorch allocated;
* a spacing is **skipped with the reason printed** when the memory extrapolated from the previous spacing
  (∝ working-grid voxels, +20 %) exceeds 85 % of the available RAM (or of the free GPU memory), or when the
  time extrapolated the same way exceeds ``time_limit_s``;
* bf16 rows report the largest difference to the fp32 run of the same spacing (fused volume in [0, 1];
  displacement in mm).
"""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch

from .. import geometry
from ..data.synthetic import make_demo_case
from ..errors import UniFuseError
from ..options import MAX_SPACING_MM, MIN_SPACING_MM
from ..pipeline import LoadedModel, fuse, load_model, resolve_device
from ..resources import available_memory_bytes
from .cases import BENCH_FIRST_SEED
from .measure import measure
from .runner import machine_description

__all__ = ["DEFAULT_SPACINGS_MM", "DEFAULT_REFERENCE_SPACING_MM", "STAGES", "SpeedRow", "speed_inputs", "run_speed",
           "format_speed_table"]

#: Working-grid spacings (mm) timed by default, coarse to fine.
DEFAULT_SPACINGS_MM: Tuple[float, ...] = (4.0, 3.0, 2.0, 1.5)
#: Spacing (mm) of the timed pair's reference grid.
DEFAULT_REFERENCE_SPACING_MM = 1.5
#: Pipeline stages of ``report["timings_s"]`` shown per row (``refine``/``affine`` are 0 when not run).
STAGES: Tuple[str, ...] = ("read", "load_model", "header", "affine", "working_grid", "network", "refine", "fusion",
                           "warp", "maps", "total")
_BASE_SIZE = 64
_HEADROOM = 1.2
_RAM_FRACTION = 0.85

Log = Callable[[str], None]


@dataclass
class SpeedRow:
    """One (spacing, device, precision, compiled) measurement of :func:`run_speed`.

    Attributes:
        spacing_mm: requested working-grid spacing (mm).
        working_size: the working grid the pipeline used (voxels per axis, x, y, z; empty if not run).
        working_spacing_mm: its spacing (mm; the pipeline may coarsen it for memory, then the report says so).
        device: ``cpu`` or ``cuda``; precision: ``fp32`` or ``bf16``; compiled: ``torch.compile`` used.
        status: ``ok``, ``skipped`` or ``failed``; reason: why it was skipped/failed.
        timings_s: pipeline stage -> seconds (median run).
        runs_total_s: total seconds of every timed run.
        warmup_s: total seconds of the warm-up run at this spacing (None when none ran here).
        peak_rss_mb, rss_increase_mb: peak RSS during the median run and its increase over the start (MiB).
        cuda_peak_mb: peak CUDA memory allocated by PyTorch (MiB), CUDA only.
        max_diff_fused, max_diff_displacement_mm: bf16 vs fp32 at the same spacing (None otherwise).
    """

    spacing_mm: float
    device: str
    precision: str
    compiled: bool
    working_size: List[int] = field(default_factory=list)
    working_spacing_mm: Optional[float] = None
    status: str = "ok"
    reason: str = ""
    timings_s: Dict[str, float] = field(default_factory=dict)
    runs_total_s: List[float] = field(default_factory=list)
    warmup_s: Optional[float] = None
    peak_rss_mb: float = math.nan
    rss_increase_mb: float = math.nan
    cuda_peak_mb: Optional[float] = None
    max_diff_fused: Optional[float] = None
    max_diff_displacement_mm: Optional[float] = None

    @property
    def voxels(self) -> int:
        """Working-grid voxels (0 when the spacing was not run)."""
        return int(np.prod(self.working_size)) if self.working_size else 0

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["voxels"] = self.voxels
        return d


def speed_inputs(reference_spacing_mm: float = DEFAULT_REFERENCE_SPACING_MM,
                 base: Optional[Any] = None) -> Tuple[sitk.Image, sitk.Image]:
    """The timed (reference, moving) pair (see the module docstring).

    Args:
        reference_spacing_mm: spacing of the reference grid (mm, isotropic; rounded so that a whole number of
            voxels spans the base field of view).
        base: a :class:`~unifuse.data.synthetic.DemoCase` to resample (default: the 64³ benchmark case).

    Returns:
        reference on an S³ grid over the base reference's field of view, S = FOV / ``reference_spacing_mm``;
        moving on the base moving grid refined by the same factor.
    """
    base = base or make_demo_case(_BASE_SIZE, "t1-t2-motion", seed=BENCH_FIRST_SEED)
    extent = base.reference.GetSize()[0] * base.reference.GetSpacing()[0]
    size = max(8, int(round(extent / float(reference_spacing_mm))))
    scale = size / float(base.reference.GetSize()[0])
    ref_grid = geometry.working_grid(base.reference, size)
    reference = sitk.Resample(base.reference, ref_grid, sitk.Transform(), sitk.sitkLinear,
                              float(np.min(sitk.GetArrayViewFromImage(base.reference))), base.reference.GetPixelID())
    mov = base.moving
    mov_size = [max(2, int(round(n * scale))) for n in mov.GetSize()]
    mov_spacing = [s * n / m for s, n, m in zip(mov.GetSpacing(), mov.GetSize(), mov_size)]
    grid = sitk.Image(mov_size, sitk.sitkFloat32)
    grid.SetSpacing(mov_spacing)
    grid.SetDirection(mov.GetDirection())
    # keep the physical centre of the moving scan's box
    centre = geometry.physical_center(mov)
    d = np.asarray(mov.GetDirection()).reshape(3, 3)
    grid.SetOrigin((centre - d @ (np.asarray(mov_spacing) * (np.asarray(mov_size) - 1) / 2.0)).tolist())
    moving = sitk.Resample(mov, grid, sitk.Transform(), sitk.sitkLinear,
                           float(np.min(sitk.GetArrayViewFromImage(mov))), mov.GetPixelID())
    return reference, moving


def _variants(device_type: str, precisions: Optional[Sequence[str]], compile_model: bool) -> List[Tuple[str, bool]]:
    precs = list(precisions) if precisions else (["fp32", "bf16"] if device_type == "cuda" else ["fp32"])
    bad = [p for p in precs if p not in ("fp32", "bf16")]
    if bad:
        raise UniFuseError(f"unknown precision(s) {bad}; use fp32 and/or bf16")
    out = [(p, False) for p in precs]
    if compile_model:
        out += [(p, True) for p in precs]
    return out


def _run_once(reference: sitk.Image, moving: sitk.Image, loaded: Any, device: Any, spacing_mm: float,
              precision: str):
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=(precision == "bf16"))
    with measure(device if device.type == "cuda" else None) as m, autocast:
        result = fuse(reference, moving, degradation="auto", device=str(device), model=loaded,
                      spacing_mm=spacing_mm, map_back=False)
    return result, m


def _predicted_skip(spacing_mm: float, last: Optional[SpeedRow], device: Any, time_limit_s: float) -> str:
    """Reason to skip ``spacing_mm`` from the previous measured spacing (empty string: run it)."""
    if last is None or last.status != "ok":
        return ""
    ratio = (float(last.working_spacing_mm or last.spacing_mm) / float(spacing_mm)) ** 3
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        need = (last.cuda_peak_mb or 0.0) * ratio * _HEADROOM
        if need > _RAM_FRACTION * free / 2**20:
            return (f"would need ~{need / 1024:.1f} GiB of GPU memory (extrapolated from {last.spacing_mm:g} mm), "
                    f"{free / 2**30:.1f} GiB free")
    else:
        need = last.rss_increase_mb * ratio * _HEADROOM
        avail = available_memory_bytes("cpu") / 2**20  # MiB
        if math.isfinite(need) and math.isfinite(avail) and need > _RAM_FRACTION * avail:
            return (f"would need ~{need / 1024:.1f} GiB of RAM (extrapolated from {last.spacing_mm:g} mm), "
                    f"{avail / 1024:.1f} GiB available")
    seconds = last.timings_s.get("total", 0.0) * ratio
    if seconds > time_limit_s:
        return (f"would take ~{seconds:.0f} s per run (extrapolated from {last.spacing_mm:g} mm), over the "
                f"{time_limit_s:.0f} s limit")
    return ""


def run_speed(
    spacings: Sequence[float] = DEFAULT_SPACINGS_MM,
    reference_spacing_mm: float = DEFAULT_REFERENCE_SPACING_MM,
    device: str = "auto",
    precisions: Optional[Sequence[str]] = None,
    compile_model: bool = False,
    weights: Optional[Any] = None,
    config: Optional[str] = None,
    repeats: Optional[int] = None,
    time_limit_s: float = 600.0,
    threads: Optional[int] = None,
    log: Optional[Log] = None,
) -> Tuple[List[SpeedRow], Dict[str, Any]]:
    """Time the pipeline at each working-grid spacing (see the module docstring).

    Args:
        spacings: working-grid spacings in mm (within the pipeline's bounds); run coarse to fine.
        reference_spacing_mm: spacing of the timed pair's reference grid (mm).
        device: ``auto`` (CPU, plus CUDA when present), ``cpu`` or ``cuda``.
        precisions: ``fp32``/``bf16``; default ``fp32`` on CPU, both on CUDA.
        compile_model: also run with ``torch.compile`` (each variant gets its own rows).
        weights, config: the network (as :func:`unifuse.pipeline.load_model`).
        repeats: timed runs per spacing (default 1 on CPU, 3 on CUDA); the median run is reported.
        time_limit_s: skip a spacing whose extrapolated time per run exceeds this.
        threads: CPU threads for torch (default: all cores).
        log: progress lines (default: print).

    Returns:
        (rows, meta): the :class:`SpeedRow` list and a dict with the model, machine, the pair and settings.

    Raises:
        UniFuseError: a spacing outside the pipeline's bounds.
    """
    log = log or (lambda line: print(line, flush=True))
    torch.set_num_threads(int(threads or os.cpu_count() or 1))
    spacings = sorted({float(s) for s in spacings}, reverse=True)
    bad = [s for s in spacings if not MIN_SPACING_MM <= s <= MAX_SPACING_MM]
    if bad or not spacings:
        raise UniFuseError(f"--spacings {bad or list(spacings)} must be working-grid spacings within "
                           f"{MIN_SPACING_MM:g}–{MAX_SPACING_MM:g} mm; e.g. --spacings 4 3 2 1.5")
    if not float(reference_spacing_mm) > 0:
        raise UniFuseError(f"--reference-spacing must be a positive number of mm; got {reference_spacing_mm}")
    if device in (None, "", "auto"):
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    else:
        devices = [resolve_device(device)]
    loaded = load_model(weights, config, "cpu")
    base = make_demo_case(_BASE_SIZE, "t1-t2-motion", seed=BENCH_FIRST_SEED)
    reference, moving = speed_inputs(reference_spacing_mm, base)
    meta = {"model": {"id": loaded.model_id, "config": loaded.config.name, "trained": loaded.trained},
            "machine": machine_description(), "threads": torch.get_num_threads(), "spacings_mm": spacings,
            "pair": {"reference_size": list(reference.GetSize()), "reference_spacing_mm": list(reference.GetSpacing()),
                     "moving_size": list(moving.GetSize()), "moving_spacing_mm": list(moving.GetSpacing())}}
    if not loaded.trained:
        log("note: untrained network (timings do not depend on the weights' values)")
    rows: List[SpeedRow] = []
    for dev in devices:
        fp32_outputs: Dict[float, Tuple[np.ndarray, np.ndarray]] = {}  # spacing -> (fused, displacement)
        runs = repeats if repeats is not None else (3 if dev.type == "cuda" else 1)
        for precision, compiled in _variants(dev.type, precisions, compile_model):
            model = loaded.model.to(dev).eval()
            if compiled:
                model = torch.compile(model)
            variant = LoadedModel(model, loaded.config, loaded.model_id, loaded.trained, loaded.source, loaded.metadata)
            last: Optional[SpeedRow] = None
            warmed = False
            for spacing in spacings:
                row = SpeedRow(spacing_mm=spacing, device=dev.type, precision=precision, compiled=compiled)
                label = f"{dev.type} {precision}{' compiled' if compiled else ''} {spacing:g} mm"
                reason = _predicted_skip(spacing, last, dev, time_limit_s)
                if reason:
                    row.status, row.reason = "skipped", reason
                    log(f"{label}: skipped: {reason}")
                    rows.append(row)
                    continue
                try:
                    if not warmed or compiled:
                        _, mw = _run_once(reference, moving, variant, dev, spacing, precision)
                        row.warmup_s = round(mw.seconds, 3)
                        warmed = True
                    measured = [_run_once(reference, moving, variant, dev, spacing, precision)
                                for _ in range(max(1, runs))]
                except (RuntimeError, MemoryError, UniFuseError) as exc:  # e.g. CUDA out of memory
                    row.status, row.reason = "failed", f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
                    log(f"{label}: failed: {row.reason}")
                    rows.append(row)
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                totals = [r.report["timings_s"]["total"] for r, _ in measured]
                result, m = measured[totals.index(statistics.median_low(totals))]
                grid = result.report["working_grid"]
                row.working_size = [int(v) for v in grid["size"]]
                row.working_spacing_mm = float(grid["spacing_mm"][0])
                row.timings_s = {k: float(result.report["timings_s"].get(k, 0.0)) for k in STAGES}
                row.runs_total_s = [float(t) for t in totals]
                row.peak_rss_mb, row.rss_increase_mb, row.cuda_peak_mb = m.peak_rss_mb, m.rss_increase_mb, m.cuda_peak_mb
                if precision == "bf16":
                    if spacing in fp32_outputs:
                        f32, d32 = fp32_outputs[spacing]
                        row.max_diff_fused = float(np.abs(sitk.GetArrayViewFromImage(result.fused) - f32).max())
                        row.max_diff_displacement_mm = float(np.linalg.norm(
                            sitk.GetArrayViewFromImage(result.displacement) - d32, axis=-1).max())
                elif not compiled:
                    fp32_outputs[spacing] = (sitk.GetArrayFromImage(result.fused),
                                             sitk.GetArrayFromImage(result.displacement).astype(np.float32))
                rows.append(row)
                last = row
                log(format_speed_table([row], header=False))
    return rows, meta


def format_speed_table(rows: Sequence[SpeedRow], header: bool = True) -> str:
    """Markdown table of speed rows: spacing, working grid, device, precision, stage times, memory, status."""
    cols = ["spacing (mm)", "working grid", "voxels", "device", "precision", *[f"{s} (s)" for s in STAGES],
            "peak RSS + (MiB)", "CUDA peak (MiB)", "bf16 vs fp32 (fused / mm)", "note"]
    lines = []
    if header:
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        prec = r.precision + (" +compile" if r.compiled else "")
        grid = "×".join(map(str, r.working_size)) if r.working_size else "–"
        spacing = f"{r.spacing_mm:g}"
        if r.working_spacing_mm is not None and abs(r.working_spacing_mm - r.spacing_mm) > 1e-6:
            spacing += f" (used {r.working_spacing_mm:.3g})"
        if r.status != "ok":
            cells = [spacing, grid, "–", r.device, prec, *["–"] * len(STAGES), "–", "–", "–",
                     f"{r.status}: {r.reason}"]
        else:
            diff = (f"{r.max_diff_fused:.3g} / {r.max_diff_displacement_mm:.3g}"
                    if r.max_diff_fused is not None else "–")
            cells = [spacing, grid, f"{r.voxels:,}", r.device, prec,
                     *[f"{r.timings_s.get(s, math.nan):.2f}" for s in STAGES], f"{r.rss_increase_mb:.0f}",
                     f"{r.cuda_peak_mb:.0f}" if r.cuda_peak_mb is not None else "–", diff,
                     f"warm-up {r.warmup_s:.1f} s" if r.warmup_s is not None else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
