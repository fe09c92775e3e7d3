"""``unifuse demo``: the sample pair with known truth, fused, measured and pictured.

The sample pair is synthesised offline (``unifuse.data.synthetic.make_demo_case``): MNI152 anatomy from
nilearn, a clean reference modality, and a second modality that is degraded (known type) and misaligned by a
known field on a different grid. Because the truth is known, the demo reports how much the pipeline reduced
the misalignment and how the fused volume compares with trivial fusion, next to the same numbers for "do
nothing".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import numpy as np
import SimpleITK as sitk

from .errors import OutputExistsError
from .pipeline import OUTPUT_FILES, REPORT_FILE, FusionResult, fuse

DEMO_INPUTS = {"reference": "reference.nii.gz", "moving": "moving.nii.gz",
               "moving_clean": "truth_moving_aligned_clean.nii.gz", "displacement_gt": "truth_displacement.nii.gz"}
METRICS_FILE = "metrics.json"
MONTAGE_FILE = "demo.png"


def _unit(image: sitk.Image, like: sitk.Image) -> np.ndarray:
    """Array of ``image`` normalised to [0, 1] with the robust rule of the pipeline (same as ``like``'s mode)."""
    from .intensity import normalize_image

    arr, _ = normalize_image(image)
    return arr


def evaluate_against_truth(case: Any, result: FusionResult) -> Dict[str, Any]:
    """Compare a pipeline result with the known truth of a demo case.

    Returns alignment metrics (endpoint error in mm over the head, aligned-vs-label MSE/CC/SSIM, folding)
    and fusion metrics of the fused volume against (reference, clean moving label), each next to the
    no-registration baseline, plus the degradation diagnosis.
    """
    from . import geometry, metrics
    from .fusion_rules import fuse_average, fuse_max

    ref = case.reference
    gt = sitk.GetArrayFromImage(case.displacement_gt).astype(np.float64)  # (z, y, x, 3) LPS mm
    est = sitk.GetArrayFromImage(result.displacement).astype(np.float64)
    ref_u = _unit(ref, ref)
    mask = ref_u > 0.05
    epe_before = float(np.linalg.norm(gt, axis=-1)[mask].mean())
    epe_after = float(np.linalg.norm(est - gt, axis=-1)[mask].mean())

    label = _unit(case.moving_clean, case.moving_clean)
    pre_aligned = geometry.warp_image(case.moving, sitk.Transform(3, sitk.sitkIdentity), ref)
    before_u = _unit(pre_aligned, pre_aligned)
    aligned_u = _unit(result.aligned, result.aligned)
    fused_u = _unit(result.fused, result.fused)

    jac = sitk.GetArrayFromImage(result.jacobian)
    out: Dict[str, Any] = {
        "task": case.task,
        "degradation_true": case.degradation,
        "degradation_predicted": result.report["degradation"]["predicted"],
        "degradation_probabilities": result.probabilities,
        "endpoint_error_mm": {"no_registration": epe_before, "unifuse": epe_after,
                              "reduction_percent": 100.0 * (1 - epe_after / epe_before) if epe_before > 0 else 0.0},
        "alignment_vs_label": {"no_registration": metrics.alignment_metrics(before_u, label),
                               "unifuse": metrics.alignment_metrics(aligned_u, label)},
        "folding_percent": metrics.folding_percent(jac),
        "fusion": {
            "unifuse": metrics.fusion_metrics(ref_u, label, fused_u),
            "no_registration+average": metrics.fusion_metrics(ref_u, label, fuse_average(ref_u, before_u)),
            "no_registration+max": metrics.fusion_metrics(ref_u, label, fuse_max(ref_u, before_u)),
        },
        "trained_weights": bool(result.report["model"]["trained"]),
    }
    return out


def format_metrics(m: Dict[str, Any]) -> str:
    """Plain-text table of :func:`evaluate_against_truth`'s output."""
    lines = [f"task {m['task']}: degradation true={m['degradation_true']} predicted={m['degradation_predicted']}"]
    e = m["endpoint_error_mm"]
    lines.append(f"endpoint error (mm)      no registration {e['no_registration']:.3f}   UniFuse {e['unifuse']:.3f}"
                 f"   ({e['reduction_percent']:+.1f} % reduction)")
    a0, a1 = m["alignment_vs_label"]["no_registration"], m["alignment_vs_label"]["unifuse"]
    for k in a0:
        lines.append(f"aligned vs label {k:<8} no registration {a0[k]:.4f}   UniFuse {a1[k]:.4f}")
    lines.append(f"folding                  {m['folding_percent']:.3f} % of voxels")
    f = m["fusion"]
    keys = list(next(iter(f.values())).keys())
    lines.append("fusion metric            " + "".join(f"{k:>10}" for k in keys))
    for name, vals in f.items():
        lines.append(f"{name:<25}" + "".join(f"{vals[k]:>10.4f}" for k in keys))
    if not m["trained_weights"]:
        lines.append("NOTE: the network weights are UNTRAINED (random initialisation): these numbers show the "
                     "pipeline runs, not what UniFuse can do.")
    return "\n".join(lines)


def run_demo(
    out_dir: Union[str, Path] = "demo_output",
    task: str = "t1-t2-motion",
    size: Optional[int] = None,
    seed: int = 0,
    degradation: str = "auto",
    device: str = "auto",
    weights: Optional[Union[str, Path]] = None,
    working_size: Optional[int] = None,
    config: Optional[str] = None,
    init: str = "geometry",
    overwrite: bool = False,
    progress: Optional[Callable[[float, str], None]] = None,
    stream=None,
) -> Dict[str, Any]:
    """Build the demo case, run :func:`~unifuse.pipeline.fuse`, write inputs/outputs/metrics/PNG, print metrics."""
    from .data.synthetic import make_demo_case
    from .io import write_image, write_json
    from .snapshots import save_montage

    stream = stream or sys.stdout
    out = Path(out_dir)
    names = [*DEMO_INPUTS.values(), *OUTPUT_FILES.values(), REPORT_FILE, METRICS_FILE, MONTAGE_FILE]
    if not overwrite:
        existing = [str(out / n) for n in names if (out / n).exists()]
        if existing:
            raise OutputExistsError(f"demo output(s) already exist: {', '.join(existing[:3])}…; pass --overwrite or another --out")

    kwargs = {"task": task, "seed": seed}
    if size is not None:
        kwargs["size"] = size
    case = make_demo_case(**kwargs)
    result = fuse(case.reference, case.moving, degradation=degradation, device=device, weights=weights,
                  progress=progress, working_size=working_size, config=config, init=init)
    metrics = evaluate_against_truth(case, result)

    out.mkdir(parents=True, exist_ok=True)
    for attr, fname in DEMO_INPUTS.items():
        write_image(getattr(case, attr), out / fname, overwrite=True)
    result.save(out, overwrite=True)
    write_json(metrics, out / METRICS_FILE, overwrite=True)
    save_montage(
        [
            ("reference", case.reference, None),
            ("moving (input)", geometry_resample_like(case.moving, case.reference), None),
            ("aligned", result.aligned, None),
            ("fused", result.fused, None),
            ("error before", result.error_map_before, {"cmap": "inferno", "vmin": 0.0, "vmax": 1.0}),
            ("error after", result.error_map, {"cmap": "inferno", "vmin": 0.0, "vmax": 1.0}),
            ("Jacobian det", result.jacobian, {"cmap": "coolwarm", "vmin": 0.0, "vmax": 2.0}),
        ],
        out / MONTAGE_FILE,
        title=f"UniFuse demo — {task} — model {result.report['model']['id']}"
        + ("" if result.report["model"]["trained"] else " (UNTRAINED)"),
    )
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
    from .data.synthetic import make_demo_case
    from .io import write_image

    case = make_demo_case(size=size, task=task, seed=seed)
    out = Path(out_dir)
    paths = {"reference": out / "reference.nii.gz", "moving": out / "moving.nii.gz"}
    for attr, path in paths.items():
        write_image(getattr(case, attr), path, overwrite=overwrite)
    return paths


def geometry_resample_like(image: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """The moving input shown on the reference grid by header geometry only (what a viewer shows)."""
    from .geometry import resample

    return resample(image, reference)
