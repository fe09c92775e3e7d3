"""Benchmark reports: Markdown tables (paper Tables 1–3 and 6 layout), a JSON file with every number, PNG figures.

Files written into the output folder by :func:`write_reports`:

* ``bench.md`` — per task a fusion table (methods × Q_mse, Q_cc, Q_psnr, Q_ssim, Q_vif, Q_scd, time, memory)
  and an alignment table (registrations × EPE, Dice, folding, MSE/CC/SSIM vs label, MIND, time, memory);
  mean ± standard deviation over the task's cases; the best value of each column in bold.
* ``bench.json`` — meta (machine, date, options, model), unavailable methods with reasons, the per-task
  summary and every per-case record.
* ``metrics_<task>.png`` — bar charts of the main metrics per method; ``time_vs_quality.png`` — mean wall time
  (log scale) against Q_ssim (UniFuse and each registration + Laplacian pyramid) and against endpoint error
  (registrations);
  ``examples_<task>.png`` — central axial slices of the first case: reference, label, moving input, then the
  aligned and fused volume of every registration.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..outputs import write_outputs

__all__ = [
    "REPORT_MD",
    "REPORT_JSON",
    "TASK_TITLES",
    "FUSION_COLUMNS",
    "ALIGNMENT_COLUMNS",
    "summarize",
    "format_markdown",
    "write_reports",
    "json_safe",
]

REPORT_MD = "bench.md"
REPORT_JSON = "bench.json"
#: Table titles of the synthetic tasks (paper §4.1 wording).
TASK_TITLES: Dict[str, str] = {
    "t1-t2-motion": "T1 reference + motion-degraded T2 (paper Table 1 setting)",
    "mr-ct-metal": "MR reference + CT with metal artefacts and noise (paper Table 2 setting)",
    "ct-pet-lowdose": "CT reference + low-dose PET (paper Table 3 setting)",
    "pairs": "user pairs (--pairs)",
    "full": "real anatomy, full field of view (--real)",
    "partial": "real anatomy, partial field of view (--real)",
}
#: (key, header, higher-is-better, format) of the fusion table's metric columns.
FUSION_COLUMNS: Tuple[Tuple[str, str, bool, str], ...] = (
    ("q_mse", "Q_mse ↓", False, "{:.4f}"),
    ("q_cc", "Q_cc ↑", True, "{:.3f}"),
    ("q_psnr", "Q_psnr ↑ (dB)", True, "{:.2f}"),
    ("q_ssim", "Q_ssim ↑", True, "{:.3f}"),
    ("q_vif", "Q_vif ↑", True, "{:.3f}"),
    ("q_scd", "Q_scd ↑", True, "{:.3f}"),
)
#: (key, header, higher-is-better, format) of the alignment table's metric columns.
ALIGNMENT_COLUMNS: Tuple[Tuple[str, str, bool, str], ...] = (
    ("epe_mm", "EPE ↓ (mm)", False, "{:.2f}"),
    ("epe_median_mm", "EPE median (mm)", False, "{:.2f}"),
    ("epe_p95_mm", "EPE p95 (mm)", False, "{:.2f}"),
    ("epe_max_mm", "EPE max (mm)", False, "{:.1f}"),
    ("epe_reduction_percent", "EPE reduction vs header ↑ (%)", True, "{:.1f}"),
    ("dice", "Dice ↑", True, "{:.3f}"),
    ("folding_percent", "folding ↓ (%)", False, "{:.3f}"),
    ("mse", "MSE ↓", False, "{:.4f}"),
    ("cc", "CC ↑", True, "{:.3f}"),
    ("ssim", "SSIM ↑", True, "{:.3f}"),
    ("mind", "MIND ↓", False, "{:.3f}"),
)
_COST_COLUMNS = (("seconds", "time (s)", "{:.2f}"), ("rss_increase_mb", "peak RSS + (MiB)", "{:.0f}"))


# ------------------------------------------------------------------------------------------------ summary


def _stats(values: Sequence[float]) -> Dict[str, Any]:
    """Mean and population std over the finite values; n counts them; ``nan`` when none is finite."""
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    if finite.size == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    return {"mean": float(finite.mean()), "std": float(finite.std()), "n": int(finite.size)}


def _ordered(rows: List[Dict[str, Any]]) -> List[str]:
    seen: List[str] = []
    for r in rows:
        if r["method"] not in seen:
            seen.append(r["method"])
    return seen


def summarize(results: Any) -> Dict[str, Any]:
    """Per task and method: mean/std/n of every metric, the wall time and the peak-memory increase.

    Returns:
        ``{task: {"cases": [...], "fusion": {method: {key: stats}}, "alignment": {method: {key: stats}}}}``
        with ``stats = {"mean", "std", "n"}`` (``n`` = cases with a finite value).
    """
    out: Dict[str, Any] = {}
    tasks: List[str] = []
    for r in [*results.alignment, *results.fusion]:
        if r["task"] not in tasks:
            tasks.append(r["task"])
    for task in tasks:
        entry: Dict[str, Any] = {"cases": sorted({r["case"] for r in results.alignment + results.fusion if r["task"] == task})}
        for kind, rows_all, keys in (("fusion", results.fusion, [c[0] for c in FUSION_COLUMNS]),
                                     ("alignment", results.alignment, [c[0] for c in ALIGNMENT_COLUMNS])):
            rows = [r for r in rows_all if r["task"] == task]
            table: Dict[str, Any] = {}
            for method in _ordered(rows):
                mine = [r for r in rows if r["method"] == method]
                stats = {k: _stats([r["metrics"].get(k, math.nan) for r in mine]) for k in keys}
                stats = {k: v for k, v in stats.items() if v["n"] > 0 or any(k in r["metrics"] for r in mine)}
                stats["seconds"] = _stats([r["seconds"] for r in mine])
                stats["rss_increase_mb"] = _stats([r.get("rss_increase_mb", math.nan) for r in mine])
                cuda = [r.get("cuda_peak_mb") for r in mine if r.get("cuda_peak_mb") is not None]
                if cuda:
                    stats["cuda_peak_mb"] = _stats(cuda)
                table[method] = stats
            entry[kind] = table
        out[task] = entry
    return out


# ----------------------------------------------------------------------------------------------- markdown


def _cell(stats: Optional[Dict[str, Any]], fmt: str, bold: bool = False) -> str:
    if not stats or stats["n"] == 0:
        return "n/a"
    text = fmt.format(stats["mean"])
    if stats["n"] > 1:
        text += " ± " + fmt.format(stats["std"])
    return f"**{text}**" if bold else text


def _best(table: Dict[str, Any], key: str, higher: bool, exclude: Sequence[str]) -> Optional[str]:
    candidates = [(m, s[key]["mean"]) for m, s in table.items()
                  if m not in exclude and key in s and s[key]["n"] > 0 and math.isfinite(s[key]["mean"])]
    if not candidates:
        return None
    return (max if higher else min)(candidates, key=lambda mv: mv[1])[0]


#: Table labels of the UniFuse pipeline runs (``runner.PIPELINE_VARIANTS``).
PIPELINE_LABELS: Dict[str, str] = {
    "unifuse": "**UniFuse**",
    "unifuse-refine-none": "UniFuse, no refinement",
    "unifuse-refine-full": "UniFuse, refine full",
    "affine+refine-fast": "affine + refine fast (no network)",
    "affine+refine-full": "affine + refine full (no network)",
    "affine-only": "affine only (no network, no refine)",
}


def _label(method: str) -> str:
    if method in PIPELINE_LABELS:
        return PIPELINE_LABELS[method]
    if method.startswith("truth"):
        return method.replace("truth", "truth (oracle field)", 1)
    if method == "none" or method.startswith("none+"):
        return method.replace("none", "no registration", 1)
    return method


def _table(table: Dict[str, Any], columns: Sequence[Tuple[str, str, bool, str]], first: str) -> List[str]:
    present = [c for c in columns if any(c[0] in s for s in table.values())]
    oracle = [m for m in table if m.startswith("truth")]
    best = {key: _best(table, key, higher, oracle) for key, _, higher, _ in present}
    lines = ["| " + " | ".join([first, *[c[1] for c in present], *[c[1] for c in _COST_COLUMNS]]) + " |",
             "|" + "---|" * (1 + len(present) + len(_COST_COLUMNS))]
    for method, stats in table.items():
        cells = [_label(method)]
        cells += [_cell(stats.get(key), fmt, best[key] == method) for key, _, _, fmt in present]
        cells += [_cell(stats.get(key), fmt) for key, _, fmt in _COST_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _preamble(results: Any, title: str) -> List[str]:
    """Title, machine, model, cases, unavailable methods and failures (both report layouts)."""
    meta = results.meta
    mach = meta["machine"]
    lines = [f"# {title}", ""]
    lines.append(f"Measured {meta['date_utc']} on {mach['cpu']} ({mach['cpu_count']} cores, {mach['ram_gib']} GiB RAM"
                 + (f", GPU {mach['gpu']}" if mach.get("gpu") else ", no GPU") + f"); {meta['threads']} thread(s); "
                 f"UniFuse device {meta['device']}; torch {mach['torch']}, SimpleITK {mach['simpleitk']}, unifuse "
                 f"{mach['unifuse']}. Total run time {meta.get('total_seconds', math.nan):.0f} s"
                 + (" (`--quick`: tiny inputs and cheap baseline settings, a smoke test, not a measurement)." if meta["quick"] else "."))
    lines.append("")
    model = meta.get("model")
    if model:
        lines.append(f"UniFuse model: `{model['id']}` (config `{model['config']}`, working-grid spacing "
                     f"{model.get('spacing_mm', math.nan):g} mm, "
                     f"{'trained' if model['trained'] else 'UNTRAINED'}; from {model['source']}).")
        if not model["trained"]:
            lines += ["", f"> **{model['warning']}** The UniFuse rows below show that the pipeline runs, "
                      "not what UniFuse can do."]
        lines.append("")
    syn = meta.get("synthetic")
    if syn:
        lines.append(f"Synthetic held-out cases: {syn['cases_per_task']} per task at {syn['size']}³ "
                     f"(`make_demo_case` seeds {', '.join(map(str, syn['seeds']))}; the demo random stream, never used "
                     "in training).")
    if meta.get("pairs"):
        lines.append(f"User pairs: `{meta['pairs']}`.")
    if results.unavailable:
        lines += ["", "Unavailable methods (not run, not faked):"]
        lines += [f"* `{name}`: unavailable: {reason}" for name, reason in results.unavailable.items()]
    if results.failures:
        lines += ["", "Failures (method raised on a case; that case is missing from its row):"]
        lines += [f"* `{f['method']}` on `{f['case']}`: {f['error']}" for f in results.failures]
    lines.append("")
    return lines


def format_markdown(results: Any, summary: Optional[Dict[str, Any]] = None) -> str:
    """The ``bench.md`` report (see the module docstring; ``--real`` runs: :func:`format_real_markdown`)."""
    summary = summary if summary is not None else summarize(results)
    if results.meta.get("real"):
        return format_real_markdown(results, summary)
    lines = _preamble(results, "UniFuse benchmark")
    lines += _body(results, summary)
    lines += _notes(results, summary)
    return "\n".join(lines) + "\n"


def _body(results: Any, summary: Dict[str, Any]) -> List[str]:
    """Per task: the fusion and alignment tables (mean ± std over cases)."""
    lines: List[str] = []
    for task, entry in summary.items():
        n = len(entry["cases"])
        lines += [f"## {task}: {TASK_TITLES.get(task, task)}", "", f"{n} case(s). Mean ± std over cases; best "
                  "non-oracle value per column in bold.", ""]
        if entry["fusion"]:
            if any(any(k in s for k, *_ in FUSION_COLUMNS) for s in entry["fusion"].values()):
                lines += ["### Fusion quality (fused vs reference and clean aligned label)", ""]
                lines += _table(entry["fusion"], FUSION_COLUMNS, "method")
            else:
                lines += ["Fusion metrics need `truth_moving_aligned_clean` (the clean aligned label); none here.", ""]
                lines += ["### Cost of the fusion rows", ""]
                lines += _table(entry["fusion"], (), "method")
            lines.append("")
        if entry["alignment"]:
            lines += ["### Alignment (paper Table 6 layout, plus endpoint error, Dice and folding)", ""]
            lines += _table(entry["alignment"], ALIGNMENT_COLUMNS, "registration")
            lines.append("")
    return lines


def _notes(results: Any, summary: Dict[str, Any]) -> List[str]:
    """The notes under the tables: what each row and metric is."""
    meta = results.meta
    lines = ["## Notes", ""]
    lines.append("* Fusion rows: UniFuse is one network; every other row is a registration baseline followed by a "
                 "fusion rule (`average`, `max`, `laplacian` = 3-level Laplacian pyramid). Their time is registration + "
                 "rule.")
    lines.append("* Metrics as in DESIGN §7 / docs/metrics.md: Q_mse and Q_cc averaged over the two sources, Q_ssim and "
                 "Q_vif summed (so Q_ssim can exceed 1), Q_scd = r(A, F−B) + r(B, F−A); all on [0, 1] intensities.")
    if any(any("q_vif" in s and s["q_vif"]["n"] == 0 for s in e["fusion"].values()) for e in summary.values()):
        lines.append("* Q_vif is n/a here: the 4-scale pixel VIF needs at least 41 voxels along every axis and these "
                     "volumes are smaller.")
    lines.append(f"* All alignment figures come from `unifuse.evaluation` (also used by `unifuse demo` and the model card). "
                 f"EPE: ‖U − U_true‖ in mm (mean, median, 95th percentile, max) over the evaluation mask: "
                 f"{meta.get('evaluation_mask', 'the reference foreground')}; reduction = 100 (1 − EPE / EPE of `none`) "
                 "on the same case. Dice: mean over the reference's labels of the moving-pose labels warped (nearest "
                 "neighbour) by the method, where the true field maps into the moving field of view. Folding: % of "
                 "reference-grid voxels with det J ≤ 0. MSE/CC/SSIM: aligned moving vs the moving volume resampled "
                 "through the true field (both in [0, 1] by the moving input's rule). MIND: mean local MIND dissimilarity "
                 "of the aligned moving to the reference inside the reference's foreground dilated by 5 mm (no truth "
                 "needed).")
    lines.append("* The `truth (oracle field)` rows warp with the exact field: the ceiling of registration + rule "
                 "(Dice < 1 there comes from nearest-neighbour label resampling on grids of different spacing).")
    variants = meta.get("pipeline_variants") or {}
    for name, info in variants.items():
        lines.append(f"* `{name}`: `fuse(..., {', '.join(f'{k}={v!r}' for k, v in info['options'].items()) or 'defaults'})`"
                     f" — {info['description']}.")
    lines.append(f"* Memory: {meta['memory_method']}. Registration baselines other than `none` run each in a fresh "
                 "child process (one per case and method), where their time and memory are measured around the "
                 "registration; their time also includes the one warp of the moving volume in the benchmark process.")
    descriptions = meta.get("registration_descriptions") or {}
    for name, text in descriptions.items():
        lines.append(f"* `{name}`: {text}.")
    interpreters = {n: p for n, p in (meta.get("interpreters") or {}).items() if n == "ants-syn"}
    for name, path in interpreters.items():
        lines.append(f"* `{name}` ran with the interpreter `{path}` (its own environment: antspyx pins older "
                     "numpy/scipy than this one; `make bench-deps`).")
    return lines


# ------------------------------------------------------------------------------------------ --real layout

#: (key, header, format) of the ``--real`` tables' metric columns (all from :mod:`unifuse.evaluation`).
REAL_COLUMNS: Tuple[Tuple[str, str, str], ...] = (
    ("epe_mm", "EPE mean (mm)", "{:.2f}"),
    ("epe_reduction_percent", "EPE reduction vs header (%)", "{:.1f}"),
    ("dice", "Dice", "{:.3f}"),
    ("folding_percent", "folding (%)", "{:.3f}"),
)
REFERENCE_TIME_METHOD = "ants-syn"


def _ratio(value: float, reference: Optional[float]) -> str:
    if reference is None or not math.isfinite(value) or not math.isfinite(reference) or reference <= 0:
        return "n/a"
    return f"{value / reference:.2f}×"


def _category_table(entry: Dict[str, Any]) -> List[str]:
    """Methods × (EPE, reduction, Dice, folding, time, time / ANTs SyN, peak memory): mean ± std over cases."""
    table = entry["alignment"]
    ants = table.get(REFERENCE_TIME_METHOD, {}).get("seconds", {}).get("mean")
    header = ["method", *[c[1] for c in REAL_COLUMNS], "time (s)", "time / ANTs SyN", "peak RSS + (MiB)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, stats in table.items():
        cells = [_label(method), *[_cell(stats.get(key), fmt) for key, _, fmt in REAL_COLUMNS],
                 _cell(stats.get("seconds"), "{:.1f}"), _ratio(stats["seconds"]["mean"], ants),
                 _cell(stats.get("rss_increase_mb"), "{:.0f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _fmt(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return fmt.format(value)


def guard_text(guard: Optional[Dict[str, Any]]) -> str:
    """A UniFuse run's guard decisions (``report["alignment"]``) in one cell: kept ✓ / rejected ✗ per stage,
    then the final stage."""
    if not guard:
        return "–"
    stages = ", ".join(f"{name} {'✓' if info.get('kept') else '✗'}" for name, info in guard.get("stages", {}).items())
    return f"{stages} → {guard.get('final_stage', '?')}" if stages else f"→ {guard.get('final_stage', '?')}"


def _case_table(rows: List[Dict[str, Any]]) -> List[str]:
    """One case: every method's EPE (mean, median, p95), reduction, Dice, folding, cost and guard decisions."""
    ants = next((r["seconds"] for r in rows if r["method"] == REFERENCE_TIME_METHOD), None)
    header = ["method", "EPE mean (mm)", "EPE median (mm)", "EPE p95 (mm)", "EPE reduction vs header (%)", "Dice",
              "folding (%)", "time (s)", "time / ANTs SyN", "peak RSS + (MiB)", "guard (UniFuse runs)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        m = r["metrics"]
        cells = [_label(r["method"]), _fmt(m.get("epe_mm"), "{:.2f}"), _fmt(m.get("epe_median_mm"), "{:.2f}"),
                 _fmt(m.get("epe_p95_mm"), "{:.2f}"), _fmt(m.get("epe_reduction_percent"), "{:.1f}"),
                 _fmt(m.get("dice"), "{:.3f}"), _fmt(m.get("folding_percent"), "{:.3f}"), _fmt(r["seconds"], "{:.1f}"),
                 _ratio(r["seconds"], ants), _fmt(r.get("rss_increase_mb"), "{:.0f}"), guard_text(r.get("guard"))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def format_real_markdown(results: Any, summary: Optional[Dict[str, Any]] = None) -> str:
    """The ``bench.md`` of ``unifuse bench --real``: per category (full / partial field of view) and per case,
    every method's endpoint error and its reduction against header-only, Dice, folding, time (and its ratio to
    ANTs SyN's) and peak memory; UniFuse runs also show their guard decisions."""
    summary = summary if summary is not None else summarize(results)
    meta = results.meta
    real = meta["real"]
    lines = _preamble(results, "UniFuse benchmark on real anatomy (`unifuse bench --real`)")
    lines += [f"Cases: split `{real['split']}` of the cache `{real['cache']}` (`unifuse data real`).", ""]
    lines += ["| case | category | subject | body part | degradation |", "|---|---|---|---|---|"]
    for c in real["cases"]:
        lines.append(f"| {c['case']} | {c.get('category')} | {c.get('subject')} | {c.get('body_part')} | "
                     f"{c.get('degradation')} |")
    lines += ["", "## Per category", "", "Mean ± std over the category's cases; time / ANTs SyN = mean time over mean "
              "ANTs SyN time of the same cases.", ""]
    for category, entry in summary.items():
        if not entry["alignment"]:
            continue
        lines += [f"### {category}: {TASK_TITLES.get(category, category)} ({len(entry['cases'])} case(s))", ""]
        lines += _category_table(entry)
        lines.append("")
    lines += ["## Per case", ""]
    for c in real["cases"]:
        rows = [r for r in results.alignment if r["case"] == c["case"]]
        if not rows:
            continue
        lines += [f"### {c['case']} ({c.get('category')}, {c.get('body_part')}, subject {c.get('subject')})", ""]
        lines += _case_table(rows)
        lines.append("")
    if any(e["fusion"] for e in summary.values()):
        lines += ["## Fusion rows", ""]
        for category, entry in summary.items():
            if entry["fusion"]:
                lines += [f"### {category}", ""] + _table(entry["fusion"], FUSION_COLUMNS, "method") + [""]
    lines += _notes(results, summary)
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ figures


def _plt():
    import matplotlib  # lazy: choosing the Agg backend must not happen on import (Slicer has its own backend)

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _metric_bars(task: str, entry: Dict[str, Any], path: Path) -> Optional[Path]:
    plt = _plt()
    panels = [("fusion", k, h) for k, h, _, _ in FUSION_COLUMNS if k in ("q_ssim", "q_psnr", "q_cc", "q_scd")]
    panels += [("alignment", k, h) for k, h, _, _ in ALIGNMENT_COLUMNS if k in ("epe_mm", "dice")]
    panels = [p for p in panels if any(p[1] in s and s[p[1]]["n"] > 0 for s in entry[p[0]].values())]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 4.2), squeeze=False)
    for ax, (kind, key, header) in zip(axes[0], panels):
        methods = [m for m, s in entry[kind].items() if key in s and s[key]["n"] > 0]
        means = [entry[kind][m][key]["mean"] for m in methods]
        stds = [entry[kind][m][key]["std"] for m in methods]
        colours = ["tab:red" if m in PIPELINE_LABELS else ("tab:gray" if m.startswith("truth") else "tab:blue")
                   for m in methods]
        ax.barh(range(len(methods)), means, xerr=stds, color=colours)
        ax.set_yticks(range(len(methods)))
        ax.set_yticklabels(methods, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(header, fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"{task}: mean ± std over cases (red: UniFuse, grey: oracle field)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _time_vs_quality(summary: Dict[str, Any], path: Path) -> Optional[Path]:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    markers = ["o", "s", "^", "D", "v"]
    used = [False, False]
    for (task, entry), marker in zip(summary.items(), markers * 4):
        for i, (ax, kind, key) in enumerate(((axes[0], "fusion", "q_ssim"), (axes[1], "alignment", "epe_mm"))):
            for method, s in entry[kind].items():
                if key not in s or s[key]["n"] == 0 or s["seconds"]["n"] == 0:
                    continue
                if kind == "fusion" and method not in PIPELINE_LABELS and not method.endswith("+laplacian"):
                    continue  # one rule per registration keeps the plot readable (all rules: metrics_<task>.png)
                colour = ("tab:red" if method in PIPELINE_LABELS
                          else ("tab:gray" if method.startswith("truth") else "tab:blue"))
                ax.scatter(max(s["seconds"]["mean"], 1e-3), s[key]["mean"], marker=marker, color=colour, s=30)
                ax.annotate(method, (max(s["seconds"]["mean"], 1e-3), s[key]["mean"]), fontsize=6,
                            xytext=(3, 2), textcoords="offset points")
                used[i] = True
        for ax in axes:
            ax.scatter([], [], marker=marker, color="k", label=task)
    if not any(used):
        plt.close(fig)
        return None
    axes[0].set_ylabel("Q_ssim (higher is better)")
    axes[1].set_ylabel("endpoint error, mm (lower is better)")
    axes[0].set_title("UniFuse vs registration + Laplacian-pyramid fusion", fontsize=10)
    axes[1].set_title("UniFuse runs (red) and registrations", fontsize=10)
    for ax, has_data in zip(axes, used):
        if has_data:
            ax.set_xscale("log")
            ax.set_xlabel("wall time per case (s, log)")
            ax.legend(fontsize=7)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.text(0.5, 0.5, "no rows of this kind in this run", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _examples(task: str, example: Dict[str, Any], path: Path) -> Path:
    plt = _plt()
    head = [("reference", example["reference"]), ("moving input\n(header geometry)", example["moving"])]
    if example.get("label") is not None:
        head.append(("clean aligned label", example["label"]))
    registrations = list(example["aligned"])
    cols = max(len(head), len(registrations))
    fig, axes = plt.subplots(3, cols, figsize=(2.2 * cols, 7.0), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for col, (title, sl) in enumerate(head):
        axes[0, col].imshow(sl, cmap="gray", vmin=0, vmax=1)
        axes[0, col].set_title(title, fontsize=8)
    for col, reg in enumerate(registrations):
        axes[1, col].imshow(example["aligned"][reg], cmap="gray", vmin=0, vmax=1)
        axes[1, col].set_title(f"aligned: {reg}", fontsize=8)
        fused_key = next((k for k in (reg, f"{reg}+laplacian", f"{reg}+average", f"{reg}+max")
                          if k in example["fused"]), None)
        if fused_key is not None:
            axes[2, col].imshow(example["fused"][fused_key], cmap="gray", vmin=0, vmax=1)
            axes[2, col].set_title(f"fused: {fused_key}", fontsize=8)
    fig.suptitle(f"{task} — {example['case']} — central axial slice", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ writing


def json_safe(obj: Any) -> Any:
    """JSON-safe copy: non-finite floats become None (``null`` = undefined, e.g. Q_vif on small volumes, or
    Q_psnr of identical volumes), numpy scalars become Python numbers, tuples become lists."""
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_reports(results: Any, out_dir: Union[str, Path], overwrite: bool = False) -> Dict[str, Path]:
    """Write ``bench.md``, ``bench.json`` and the PNG figures into ``out_dir``, all or nothing and verified
    (:mod:`unifuse.outputs`; joins the claim ``unifuse bench`` holds on the folder).

    Raises:
        OutputExistsError: a report file exists and ``overwrite`` is False.

    Returns:
        ``{short name: path}`` of every file written (a figure without data is not written).
    """
    summary = summarize(results)
    files: Dict[str, Any] = {REPORT_JSON: json_safe(results.to_json()), REPORT_MD: format_markdown(results, summary)}
    short = {REPORT_JSON: "json", REPORT_MD: "markdown"}
    for task, entry in summary.items():
        safe = task.replace("/", "_")
        files[f"metrics_{safe}.png"] = lambda path, task=task, entry=entry: _metric_bars(task, entry, path)
        short[f"metrics_{safe}.png"] = f"metrics_{safe}"
    for task, example in results.examples.items():
        safe = task.replace("/", "_")
        files[f"examples_{safe}.png"] = lambda path, task=task, example=example: _examples(task, example, path)
        short[f"examples_{safe}.png"] = f"examples_{safe}"
    files["time_vs_quality.png"] = lambda path: _time_vs_quality(summary, path)
    short["time_vs_quality.png"] = "time_vs_quality"
    written = write_outputs(out_dir, files, overwrite=overwrite)
    return {short[name]: path for name, path in written.items()}
