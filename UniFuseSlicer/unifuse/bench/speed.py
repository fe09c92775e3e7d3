"""``unifuse bench --speed``: the UniFuse pipeline alone at growing working grids, per stage, with peak memory.

Input: one synthetic pair (``make_demo_case(64, "t1-t2-motion", seed=BENCH_FIRST_SEED)``) resampled (linear)
onto an S³ reference grid over the same field of view and onto a moving grid with S/64 times as many voxels
per axis, so every stage (resampling, network, warp, maps) works on S³-sized volumes; the working grid is S³.
For each device (CPU; CUDA when present) and precision (``fp32``; on CUDA also ``bf16`` =
``torch.autocast(dtype=torch.bfloat16)`` around the pipeline, which reaches the network's matrix products
and convolutions only) and optionally ``torch.compile``:

* one warm-up run at the first size (library initialisation, CUDA context, kernel selection; with
  ``--compile`` a warm-up at every size, because each new shape is compiled once), then ``repeats`` timed
  runs; the row shows the run with the median total time;
* per-stage times from the pipeline report (``read``, ``load_model``, ``prepare``, ``network``, ``warp``,
  ``maps``, ``total``), peak RSS increase (:mod:`unifuse.bench.measure`) and, on CUDA, the peak memory
  PyTorch allocated;
* a size is **skipped with the reason printed** when the memory extrapolated from the previous size
  (∝ voxels, +20 %) exceeds 85 % of the available RAM (or of the free GPU memory), or when the time
  extrapolated the same way exceeds ``time_limit_s``;
* bf16 rows report the largest difference to the fp32 run of the same size (fused volume in [0, 1];
  displacement in mm).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from ..errors import UniFuseError
from ..resources import available_memory_bytes
from .measure import measure

__all__ = ["DEFAULT_SIZES", "STAGES", "SpeedRow", "speed_inputs", "run_speed", "format_speed_table"]

DEFAULT_SIZES: Tuple[int, ...] = (64, 96, 128, 160, 256)
STAGES: Tuple[str, ...] = ("read", "load_model", "prepare", "network", "warp", "maps", "total")
_BASE_SIZE = 64
_HEADROOM = 1.2
_RAM_FRACTION = 0.85

Log = Callable[[str], None]


@dataclass
class SpeedRow:
    """One (size, device, precision, compiled) measurement of :func:`run_speed`.

    Attributes:
        size: working-grid edge S (the reference grid is S³ too).
        device: ``cpu`` or ``cuda``; precision: ``fp32`` or ``bf16``; compiled: ``torch.compile`` used.
        status: ``ok``, ``skipped`` or ``failed``; reason: why it was skipped/failed.
        timings_s: pipeline stage -> seconds (median run).
        runs_total_s: total seconds of every timed run.
        warmup_s: total seconds of the warm-up run at this size (None when none ran here).
        peak_rss_mb, rss_increase_mb: peak RSS during the median run and its increase over the start (MiB).
        cuda_peak_mb: peak CUDA memory allocated by PyTorch (MiB), CUDA only.
        max_diff_fused, max_diff_displacement_mm: bf16 vs fp32 at the same size (None otherwise).
    """

    size: int
    device: str
    precision: str
    compiled: bool
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
        return int(self.size) ** 3

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["voxels"] = self.voxels
        return d


def speed_inputs(size: int, base: Optional[Any] = None) -> Tuple[sitk.Image, sitk.Image]:
    """The (reference, moving) pair at S = ``size`` (see the module docstring).

    Args:
        size: S.
        base: a :class:`~unifuse.data.synthetic.DemoCase` to resample (default: the 64³ benchmark case).

    Returns:
        reference on an S³ grid over the base reference's FOV; moving on the base moving grid refined by S/64.
    """
    from .. import geometry
    from ..data.synthetic import make_demo_case
    from .cases import BENCH_FIRST_SEED

    base = base or make_demo_case(_BASE_SIZE, "t1-t2-motion", seed=BENCH_FIRST_SEED)
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


def _run_once(reference: sitk.Image, moving: sitk.Image, loaded: Any, device: Any, size: int, precision: str):
    import torch

    from ..pipeline import fuse

    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=(precision == "bf16"))
    with measure(device if device.type == "cuda" else None) as m, autocast:
        result = fuse(reference, moving, degradation="auto", device=str(device), model=loaded,
                      working_size=size, map_back=False)
    return result, m


def _predicted_skip(size: int, last: Optional[SpeedRow], device: Any, time_limit_s: float) -> str:
    """Reason to skip ``size`` from the previous measured size (empty string: run it)."""
    if last is None or last.status != "ok":
        return ""
    ratio = (size / last.size) ** 3
    if device.type == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(device)
        need = (last.cuda_peak_mb or 0.0) * ratio * _HEADROOM
        if need > _RAM_FRACTION * free / 2**20:
            return (f"would need ~{need / 1024:.1f} GiB of GPU memory (extrapolated from {last.size}³), "
                    f"{free / 2**30:.1f} GiB free")
    else:
        need = last.rss_increase_mb * ratio * _HEADROOM
        avail = available_memory_bytes("cpu") / 2**20  # MiB
        if math.isfinite(need) and math.isfinite(avail) and need > _RAM_FRACTION * avail:
            return (f"would need ~{need / 1024:.1f} GiB of RAM (extrapolated from {last.size}³), "
                    f"{avail / 1024:.1f} GiB available")
    seconds = last.timings_s.get("total", 0.0) * ratio
    if seconds > time_limit_s:
        return f"would take ~{seconds:.0f} s per run (extrapolated from {last.size}³), over the {time_limit_s:.0f} s limit"
    return ""


def run_speed(
    sizes: Sequence[int] = DEFAULT_SIZES,
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
    """Time the pipeline at each working-grid size (see the module docstring).

    Args:
        sizes: working-grid edges, each a multiple of the network's ``size_multiple``; run in increasing order.
        device: ``auto`` (CPU, plus CUDA when present), ``cpu`` or ``cuda``.
        precisions: ``fp32``/``bf16``; default ``fp32`` on CPU, both on CUDA.
        compile_model: also run with ``torch.compile`` (each variant gets its own rows).
        weights, config: the network (as :func:`unifuse.pipeline.load_model`).
        repeats: timed runs per size (default 1 on CPU, 3 on CUDA); the median run is reported.
        time_limit_s: skip a size whose extrapolated time per run exceeds this.
        threads: CPU threads for torch (default: all cores).
        log: progress lines (default: print).

    Returns:
        (rows, meta): the :class:`SpeedRow` list and a dict with the model, machine and settings.
    """
    import os

    import torch

    from ..data.synthetic import make_demo_case
    from ..pipeline import LoadedModel, load_model, resolve_device
    from .cases import BENCH_FIRST_SEED
    from .runner import machine_description

    log = log or (lambda line: print(line, flush=True))
    torch.set_num_threads(int(threads or os.cpu_count() or 1))
    sizes = sorted({int(s) for s in sizes})
    if device in (None, "", "auto"):
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    else:
        devices = [resolve_device(device)]
    loaded = load_model(weights, config, "cpu")
    bad = [s for s in sizes if s <= 0 or s % loaded.config.size_multiple]
    if bad:
        raise UniFuseError(f"--sizes {bad} are not positive multiples of {loaded.config.size_multiple} (required by the "
                           f"'{loaded.config.name}' network)")
    meta = {"model": {"id": loaded.model_id, "config": loaded.config.name, "trained": loaded.trained},
            "machine": machine_description(), "threads": torch.get_num_threads(), "sizes": sizes}
    if not loaded.trained:
        log("note: untrained network (timings do not depend on the weights' values)")
    base = make_demo_case(_BASE_SIZE, "t1-t2-motion", seed=BENCH_FIRST_SEED)
    rows: List[SpeedRow] = []
    for dev in devices:
        fp32_outputs: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}  # size -> (fused, displacement) of this device
        runs = repeats if repeats is not None else (3 if dev.type == "cuda" else 1)
        for precision, compiled in _variants(dev.type, precisions, compile_model):
            model = loaded.model.to(dev).eval()
            if compiled:
                model = torch.compile(model)
            variant = LoadedModel(model, loaded.config, loaded.model_id, loaded.trained, loaded.source, loaded.metadata)
            last: Optional[SpeedRow] = None
            warmed = False
            for size in sizes:
                row = SpeedRow(size=size, device=dev.type, precision=precision, compiled=compiled)
                reason = _predicted_skip(size, last, dev, time_limit_s)
                if reason:
                    row.status, row.reason = "skipped", reason
                    log(f"{dev.type} {precision}{' compiled' if compiled else ''} {size}³: skipped: {reason}")
                    rows.append(row)
                    continue
                reference, moving = speed_inputs(size, base)
                try:
                    if not warmed or compiled:
                        _, mw = _run_once(reference, moving, variant, dev, size, precision)
                        row.warmup_s = round(mw.seconds, 3)
                        warmed = True
                    measured = [_run_once(reference, moving, variant, dev, size, precision) for _ in range(max(1, runs))]
                except (RuntimeError, MemoryError, UniFuseError) as exc:  # e.g. CUDA out of memory
                    row.status, row.reason = "failed", f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
                    log(f"{dev.type} {precision} {size}³: failed: {row.reason}")
                    rows.append(row)
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                totals = [r.report["timings_s"]["total"] for r, _ in measured]
                result, m = measured[totals.index(statistics.median_low(totals))]
                row.timings_s = {k: float(result.report["timings_s"].get(k, math.nan)) for k in STAGES}
                row.runs_total_s = [float(t) for t in totals]
                row.peak_rss_mb, row.rss_increase_mb, row.cuda_peak_mb = m.peak_rss_mb, m.rss_increase_mb, m.cuda_peak_mb
                if precision == "bf16":
                    if size in fp32_outputs:
                        f32, d32 = fp32_outputs[size]
                        row.max_diff_fused = float(np.abs(sitk.GetArrayViewFromImage(result.fused) - f32).max())
                        row.max_diff_displacement_mm = float(np.linalg.norm(
                            sitk.GetArrayViewFromImage(result.displacement) - d32, axis=-1).max())
                elif not compiled:
                    fp32_outputs[size] = (sitk.GetArrayFromImage(result.fused),
                                          sitk.GetArrayFromImage(result.displacement).astype(np.float32))
                rows.append(row)
                last = row
                log(format_speed_table([row], header=False))
    return rows, meta


def format_speed_table(rows: Sequence[SpeedRow], header: bool = True) -> str:
    """Markdown table of speed rows: size, voxels, device, precision, stage times, total, memory, status."""
    cols = ["S³", "voxels", "device", "precision", *[f"{s} (s)" for s in STAGES], "peak RSS + (MiB)",
            "CUDA peak (MiB)", "bf16 vs fp32 (fused / mm)", "note"]
    lines = []
    if header:
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        prec = r.precision + (" +compile" if r.compiled else "")
        if r.status != "ok":
            cells = [f"{r.size}³", f"{r.voxels:,}", r.device, prec, *["–"] * len(STAGES), "–", "–", "–",
                     f"{r.status}: {r.reason}"]
        else:
            diff = (f"{r.max_diff_fused:.3g} / {r.max_diff_displacement_mm:.3g}"
                    if r.max_diff_fused is not None else "–")
            cells = [f"{r.size}³", f"{r.voxels:,}", r.device, prec,
                     *[f"{r.timings_s.get(s, math.nan):.2f}" for s in STAGES], f"{r.rss_increase_mb:.0f}",
                     f"{r.cuda_peak_mb:.0f}" if r.cuda_peak_mb is not None else "–", diff,
                     f"warm-up {r.warmup_s:.1f} s" if r.warmup_s is not None else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
