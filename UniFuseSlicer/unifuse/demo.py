"""``unifuse demo``: the sample pair with known truth, fused, measured and pictured.

The sample pair is synthesised offline (``unifuse.data.synthetic.make_demo_case``): MNI152 anatomy from
nilearn, a clean reference modality, and a second modality that is degraded (known type) and misaligned by a
known field on a different grid. Because the truth is known, the demo reports how much the pipeline reduced
the misalignment and how the fused volume compares with trivial fusion, next to the same numbers for "do
nothing".
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import SimpleITK as sitk

from .data.synthetic import make_demo_case
from .evaluation import (MASK_RULE, as_evaluation_case, evaluate_alignment, evaluate_fusion, fused_to_unit,
                         reduction_percent, warp_moving, zero_displacement)
from .fusion_rules import fuse_average, fuse_max
from .geometry import resample
from .options import FuseOptions
from .outputs import claim_output_dir, result_files, write_outputs
from .pipeline import OUTPUT_FILES, REPORT_FILE, FusionResult, fuse
from .snapshots import save_montage

DEMO_INPUTS = {"reference": "reference.nii.gz", "moving": "moving.nii.gz",
               "moving_clean": "truth_moving_aligned_clean.nii.gz", "displacement_gt": "truth_displacement.nii.gz"}
METRICS_FILE = "metrics.json"
MONTAGE_FILE = "demo.png"


def evaluate_against_truth(case: Any, result: FusionResult) -> Dict[str, Any]:
    """Compare a pipeline result with the known truth of a demo case, next to no registration.

    Every figure comes from :mod:`unifuse.evaluation` (the same code as ``unifuse evaluate`` and ``unifuse
    bench``): endpoint error in mm over the evaluation mask (mean, median, 95th percentile, max) and its
    reduction against header geometry; Dice of the tissue labels warped by each field; folding; MSE/CC/SSIM of
    the aligned moving volume against the moving volume resampled through the true field; and the fusion metrics
    of the fused volume against (reference, clean aligned label), next to no registration + average / max.
    """
    ev = as_evaluation_case(case)
    identity = zero_displacement(ev.reference)
    pre_aligned = warp_moving(ev, identity)  # header geometry only
    before = evaluate_alignment(ev, pre_aligned, identity)
    after = evaluate_alignment(ev, result.aligned, result.displacement, jacobian=result.jacobian)
    ref_u, before_u = ev.reference_u, ev.moving_u(pre_aligned)
    fused_u = fused_to_unit(ev, result.fused, result.report.get("fused_intensity") == "reference units")
    keys = ("mse", "cc", "ssim")
    return {
        "task": case.task,
        "degradation_true": case.degradation,
        "degradation_predicted": result.report["degradation"]["predicted"],
        "degradation_probabilities": result.probabilities,
        "final_alignment_stage": result.report.get("alignment", {}).get("final_stage"),
        "evaluation_mask": MASK_RULE,
        "endpoint_error_mm": {
            "no_registration": before["epe_mm"], "unifuse": after["epe_mm"],
            "reduction_percent": reduction_percent(before["epe_mm"], after["epe_mm"]),
            "unifuse_median": after["epe_median_mm"], "unifuse_p95": after["epe_p95_mm"],
            "unifuse_max": after["epe_max_mm"],
        },
        "dice": {"no_registration": before.get("dice"), "unifuse": after.get("dice"),
                 "unifuse_per_label": {str(k): v for k, v in after.get("dice_per_label", {}).items()}},
        "aligned_vs_truth": {"no_registration": {k: before[k] for k in keys}, "unifuse": {k: after[k] for k in keys}},
        "folding_percent": after["folding_percent"],
        "fusion": {
            "unifuse": evaluate_fusion(ev, fused_u),
            "no_registration+average": evaluate_fusion(ev, fuse_average(ref_u, before_u)),
            "no_registration+max": evaluate_fusion(ev, fuse_max(ref_u, before_u)),
        },
        "trained_weights": bool(result.report["model"]["trained"]),
    }


def format_metrics(m: Dict[str, Any]) -> str:
    """Plain-text table of :func:`evaluate_against_truth`'s output."""
    lines = [f"task {m['task']}: degradation true={m['degradation_true']} predicted={m['degradation_predicted']}"
             + (f"; final alignment stage: {m['final_alignment_stage']}" if m.get("final_alignment_stage") else "")]
    e = m["endpoint_error_mm"]
    lines.append(f"endpoint error (mm)      no registration {e['no_registration']:.3f}   UniFuse {e['unifuse']:.3f}"
                 f"   ({e['reduction_percent']:+.1f} % reduction; UniFuse median {e['unifuse_median']:.3f}, "
                 f"p95 {e['unifuse_p95']:.3f}, max {e['unifuse_max']:.3f})")
    d = m.get("dice") or {}
    if d.get("unifuse") is not None:
        lines.append(f"Dice of tissue labels    no registration {d['no_registration']:.4f}   UniFuse {d['unifuse']:.4f}")
    a0, a1 = m["aligned_vs_truth"]["no_registration"], m["aligned_vs_truth"]["unifuse"]
    for k in a0:
        lines.append(f"aligned vs truth {k:<8} no registration {a0[k]:.4f}   UniFuse {a1[k]:.4f}")
    lines.append(f"folding                  {m['folding_percent']:.3f} % of voxels")
    f = m["fusion"]
    keys = list(next(iter(f.values())).keys())
    lines.append("fusion metric            " + "".join(f"{k:>10}" for k in keys))
    for name, vals in f.items():
        lines.append(f"{name:<25}" + "".join(f"{vals[k]:>10.4f}" for k in keys))
    lines.append(f"(evaluation mask: {m.get('evaluation_mask', 'reference foreground')}; 'aligned vs truth' compares "
                 "with the moving volume resampled through the true field)")
    if not m["trained_weights"]:
        lines.append("NOTE: the network weights are UNTRAINED (random initialisation): these numbers show the "
                     "pipeline runs, not what UniFuse can do.")
    return "\n".join(lines)


def run_demo(
    out_dir: Union[str, Path] = "demo_output",
    task: str = "t1-t2-motion",
    size: Optional[int] = None,
    seed: int = 0,
    options: Optional[FuseOptions] = None,
    overwrite: bool = False,
    progress: Optional[Callable[[float, str], None]] = None,
    stream=None,
) -> Dict[str, Any]:
    """Build the demo case, run :func:`~unifuse.pipeline.fuse` with ``options`` (default: the best settings),
    write inputs/outputs/metrics/PNG, print metrics.

    ``out_dir`` is claimed (checked and locked, :mod:`unifuse.outputs`) before the case is built, and every
    file is written at the end in one verified, all-or-nothing step.
    """
    names = [*DEMO_INPUTS.values(), *OUTPUT_FILES.values(), REPORT_FILE, METRICS_FILE, MONTAGE_FILE]
    with claim_output_dir(out_dir, names, overwrite) as claim:
        return _demo_into(claim, task, size, seed, options, progress, stream or sys.stdout)


def _demo_into(claim: Any, task: str, size: Optional[int], seed: int, options: Optional[FuseOptions],
               progress: Optional[Callable[[float, str], None]], stream: Any) -> Dict[str, Any]:
    """The demo into a claimed output folder (see :func:`run_demo`)."""
    out = claim.folder
    kwargs = {"task": task, "seed": seed}
    if size is not None:
        kwargs["size"] = size
    case = make_demo_case(**kwargs)
    result = fuse(case.reference, case.moving, options, progress=progress)
    metrics = evaluate_against_truth(case, result)

    files: Dict[str, Any] = {fname: getattr(case, attr) for attr, fname in DEMO_INPUTS.items()}
    files.update(result_files(result))
    files[METRICS_FILE] = metrics
    files[MONTAGE_FILE] = lambda path: save_montage(
        [
            ("reference", case.reference, None),
            ("moving (input)", geometry_resample_like(case.moving, case.reference), None),
            ("aligned", result.aligned, None),
            ("fused", result.fused, None),
            ("error before", result.error_map_before, {"cmap": "inferno", "vmin": 0.0, "vmax": 1.0}),
            ("error after", result.error_map, {"cmap": "inferno", "vmin": 0.0, "vmax": 1.0}),
            ("Jacobian det", result.jacobian, {"cmap": "coolwarm", "vmin": 0.0, "vmax": 2.0}),
        ],
        path,
        title=f"UniFuse demo — {task} — model {result.report['model']['id']}"
        + ("" if result.report["model"]["trained"] else " (UNTRAINED)"),
    )
    claim.write(files)
    print(format_metrics(metrics), file=stream)
    print(f"outputs in {out} (report.json, metrics.json, {MONTAGE_FILE})", file=stream)
    return metrics


def write_sample_data(
    out_dir: Union[str, Path], task: str = "t1-t2-motion", size: int = 64, seed: int = 0, overwrite: bool = False
) -> Dict[str, Path]:
    """Write the sample pair (``reference.nii.gz``, ``moving.nii.gz``) that ships with the Slicer module.

    Deterministic: the same arguments give the same voxels, so the shipped files can be regenerated and
    checked (``Testing/test_sample_data.py``).
    """
    case = make_demo_case(size=size, task=task, seed=seed)
    written = write_outputs(out_dir, {"reference.nii.gz": case.reference, "moving.nii.gz": case.moving}, overwrite)
    return {"reference": written["reference.nii.gz"], "moving": written["moving.nii.gz"]}


def geometry_resample_like(image: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """The moving input shown on the reference grid by header geometry only (what a viewer shows)."""
    return resample(image, reference)
