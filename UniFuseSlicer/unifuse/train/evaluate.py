"""Held-out evaluation of a trained UniFuse network against trivial baselines, and the model card.

The held-out set is synthetic (:class:`unifuse.data.synthetic.SyntheticPairs`, split ``"test"``, a seed no
training or validation run uses), on the working grid the weights were trained at. For every case:

* **UniFuse** runs on (reference R, degraded misaligned moving D') with the degradation left to its own
  classifier (``degradation=None``), giving the fused volume F, the field u and the class probabilities p.
* **Baselines** use the same inputs without any registration: ``average`` F = (R + D')/2 and ``max``
  F = max(R, D') (:mod:`unifuse.fusion_rules`).
* **Fusion metrics** (:func:`unifuse.metrics.fusion_metrics`) compare each F with the two *ideal aligned
  sources*: R and the clean moving volume aligned by the true field, ``label = warp(D_fine, u_gt)`` (the
  paper's "high-quality label"). All volumes are on the working grid, intensities in [0, 1].
* **Alignment** (:mod:`unifuse.evaluation`, the same code as ``unifuse demo`` and ``unifuse bench``):
  endpoint error ‖u − u_gt‖ in mm over the evaluation mask (R's foreground where u_gt stays inside the grid)
  next to no registration (u = 0); folding % of det J ≤ 0 over the whole grid; aligned MSE/CC/SSIM of
  warp(D', u) vs warp(D', u_gt); Dice of the moving tissue labels warped (nearest) by u against the reference
  labels (or, without them, the moving labels warped by u_gt) when the dataset provides labels.
* **Degradation**: accuracy and confusion matrix of argmax p against the true class.

:func:`check_targets` compares the means with the project's targets (issue 3) and
:func:`write_model_card` writes ``model_card.json`` and ``MODEL_CARD.md``.
"""

from __future__ import annotations

import json
import math
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .. import __version__
from ..config import DEGRADATION_CLASSES, DEGRADATION_LABELS
from ..errors import UniFuseError
from ..evaluation import (EvaluationCase, displacement_from_voxels, evaluate_alignment, evaluate_fusion,
                          zero_displacement)
from ..fusion_rules import fuse_average, fuse_max
from ..metrics import FUSION_METRIC_KEYS, vif_min_size
from ..model import build_model
from ..pipeline import device_description, resolve_device
from ..procfs import cpu_model
from ..spatial import warp
from ..weights import load_checkpoint
from .trainer import make_dataset

__all__ = [
    "HELDOUT_SEED",
    "HELDOUT_CASES",
    "METHODS",
    "FUSION_KEYS",
    "evaluate_model",
    "evaluate_checkpoint",
    "check_targets",
    "write_model_card",
    "format_report",
]

#: Seed of the held-out test set (distinct from every TrainConfig's train_seed and val_seed).
HELDOUT_SEED = 7_777_777
#: Default number of held-out cases.
HELDOUT_CASES = 32
#: Methods compared, in table order.
METHODS = ("unifuse", "no_registration+average", "no_registration+max")
FUSION_KEYS = FUSION_METRIC_KEYS


def _mean_std(values: Sequence[float]) -> Dict[str, float]:
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(arr.mean()), "std": float(arr.std()), "n": int(arr.size)}


def _case_spacing(case: Dict[str, Any], default: float) -> float:
    sp = case.get("spacing")
    if sp is None:
        return default
    sp = torch.as_tensor(sp).flatten()
    return float(sp[0])


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module,
    cases: Iterable[Dict[str, Any]],
    device: Union[str, torch.device] = "cpu",
    spacing_mm: float = 1.0,
    progress: Optional[Any] = None,
) -> Dict[str, Any]:
    """Evaluate ``model`` and the two no-registration baselines on ``cases``.

    Args:
        model: a UniFuse network (eval mode is set here).
        cases: dataset items (dicts with ``reference``, ``moving``, ``moving_clean`` (1, S, S, S), optionally ``moving_clean_aligned``, ``field``
            (3, S, S, S) pull-back voxels (x, y, z), ``degradation`` (long) and optionally ``labels``
            (moving-space integer tissue labels), ``labels_reference`` and ``spacing`` (working-grid spacing in mm)).
        device: compute device.
        spacing_mm: isotropic working-grid spacing in mm used when a case carries no ``spacing``.
        progress: optional callable ``progress(i, n)``.

    Returns:
        ``{"cases", "fusion": {method: {metric: {mean, std, n}}}, "fusion_by_degradation": {...},
        "alignment": {...}, "degradation": {...}}`` (see the module docstring).
    """
    device = torch.device(device)
    model.eval().to(device)
    cases = list(cases)
    fusion: Dict[str, Dict[str, List[float]]] = {m: {k: [] for k in FUSION_KEYS} for m in METHODS}
    by_deg: Dict[str, Dict[str, Dict[str, List[float]]]] = {}
    epe_after, epe_before, folding = [], [], []
    align_after: Dict[str, List[float]] = {"mse": [], "cc": [], "ssim": []}
    align_before: Dict[str, List[float]] = {"mse": [], "cc": [], "ssim": []}
    dice_after, dice_before = [], []
    n_cls = len(DEGRADATION_CLASSES)
    confusion = np.zeros((n_cls, n_cls), dtype=np.int64)
    t0 = time.perf_counter()
    for i, case in enumerate(cases):
        ref = case["reference"].unsqueeze(0).to(device)
        mov = case["moving"].unsqueeze(0).to(device)
        clean = case["moving_clean"].unsqueeze(0).to(device)
        u_gt = case["field"].unsqueeze(0).to(device).float()
        deg_true = int(torch.as_tensor(case["degradation"]))
        out = model(ref, mov)
        u = out.displacement.float()
        label = (case["moving_clean_aligned"].unsqueeze(0).to(device) if "moving_clean_aligned" in case
                 else warp(clean, u_gt))

        r_np = ref[0, 0].cpu().numpy()
        m_np = mov[0, 0].cpu().numpy()
        label_np = label[0, 0].cpu().numpy()
        fused = {
            "unifuse": out.fused[0, 0].float().cpu().numpy(),
            "no_registration+average": fuse_average(r_np, m_np),
            "no_registration+max": fuse_max(r_np, m_np),
        }
        deg_name = DEGRADATION_CLASSES[deg_true]
        for method, f in fused.items():
            values = evaluate_fusion(None, f, sources=(r_np, label_np))
            for k in FUSION_KEYS:
                fusion[method][k].append(values[k])
                by_deg.setdefault(deg_name, {}).setdefault(method, {}).setdefault(k, []).append(values[k])

        ev_case = EvaluationCase.from_working_grid(
            r_np, m_np, _case_spacing(case, spacing_mm), truth_voxels=u_gt[0],
            reference_labels=case.get("labels_reference"), moving_labels=case.get("labels"))
        after = evaluate_alignment(ev_case, None, displacement_from_voxels(u[0], ev_case.reference))
        before = evaluate_alignment(ev_case, None, zero_displacement(ev_case.reference))
        epe_after.append(after["epe_mm"])
        epe_before.append(before["epe_mm"])
        folding.append(after["folding_percent"])
        for k in align_after:
            align_after[k].append(after[k])
            align_before[k].append(before[k])
        if "dice" in after:
            dice_after.append(after["dice"])
            dice_before.append(before["dice"])

        confusion[deg_true, int(out.probs[0].argmax())] += 1
        if progress is not None:
            progress(i + 1, len(cases))

    result: Dict[str, Any] = {
        "cases": len(cases),
        "seconds": round(time.perf_counter() - t0, 2),
        "fusion": {m: {k: _mean_std(v) for k, v in d.items()} for m, d in fusion.items()},
        "fusion_by_degradation": {
            deg: {m: {k: _mean_std(v)["mean"] for k, v in d.items()} for m, d in methods.items()}
            for deg, methods in by_deg.items()
        },
        "alignment": {
            "endpoint_error_mm": {"unifuse": _mean_std(epe_after), "no_registration": _mean_std(epe_before)},
            "folding_percent": _mean_std(folding),
            "aligned_vs_label": {
                "unifuse": {k: _mean_std(v) for k, v in align_after.items()},
                "no_registration": {k: _mean_std(v) for k, v in align_before.items()},
            },
        },
        "degradation": {
            "classes": list(DEGRADATION_CLASSES),
            "accuracy": float(np.trace(confusion) / max(confusion.sum(), 1)),
            "confusion_true_by_predicted": confusion.tolist(),
        },
    }
    if dice_after:
        result["alignment"]["dice_tissue_labels"] = {"unifuse": _mean_std(dice_after), "no_registration": _mean_std(dice_before)}
    return result


def check_targets(report: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Compare an :func:`evaluate_model` report with the project targets (issue 3); nothing is rounded up.

    Returns ``{target: {"description", "value", "threshold" or "baselines", "met", "gap"}}`` where ``gap``
    says by how much a missed target was missed (0 when met).
    """
    out: Dict[str, Dict[str, Any]] = {}
    epe = report["alignment"]["endpoint_error_mm"]
    after, before = epe["unifuse"]["mean"], epe["no_registration"]["mean"]
    reduction = 100.0 * (1.0 - after / before) if before > 0 else float("nan")
    out["endpoint_error_reduction"] = {
        "description": "mean endpoint error at least 50 % lower than without registration",
        "value_percent": reduction, "unifuse_mm": after, "no_registration_mm": before, "threshold_percent": 50.0,
        "met": bool(reduction >= 50.0), "gap_percent_points": max(0.0, 50.0 - reduction),
    }
    fold = report["alignment"]["folding_percent"]["mean"]
    out["folding"] = {
        "description": "folding (det J <= 0) below 0.5 % of voxels", "value_percent": fold, "threshold_percent": 0.5,
        "met": bool(fold < 0.5), "gap_percent_points": max(0.0, fold - 0.5),
    }
    acc = report["degradation"]["accuracy"]
    out["degradation_accuracy"] = {
        "description": "degradation classification accuracy at least 90 %", "value": acc, "threshold": 0.9,
        "met": bool(acc >= 0.9), "gap": max(0.0, 0.9 - acc),
    }
    fusion = report["fusion"]
    for key in ("q_ssim", "q_psnr", "q_cc"):
        ours = fusion["unifuse"][key]["mean"]
        base = {m: fusion[m][key]["mean"] for m in METHODS[1:]}
        best_base = max(base.values())
        out[f"beats_baselines_{key}"] = {
            "description": f"{key} higher than both no-registration baselines (average, max)",
            "value": ours, "baselines": base, "met": bool(all(ours > b for b in base.values())),
            "gap": max(0.0, best_base - ours),
        }
    return out


def evaluate_checkpoint(
    weights: Union[str, Path],
    cases: int = HELDOUT_CASES,
    seed: int = HELDOUT_SEED,
    device: str = "auto",
    data_options: Optional[Dict[str, Any]] = None,
    progress: Optional[Any] = None,
) -> Dict[str, Any]:
    """Load a checkpoint, build the held-out set at its working size and evaluate it (plus targets).

    Returns the :func:`evaluate_model` report extended with ``checkpoint`` (path, id, config, training
    metadata), ``heldout`` (how the set was made), ``targets`` (:func:`check_targets`) and ``environment``.
    """
    ckpt = load_checkpoint(weights)
    dev = resolve_device(device)
    model = build_model(ckpt.config)
    model.load_state_dict(ckpt.state_dict, strict=True)
    size = int(ckpt.config.working_size)
    train_cfg = ckpt.metadata.get("train_config") or {}
    options = dict(train_cfg.get("data_options") or {}) if data_options is None else dict(data_options)
    seeds_used = {train_cfg.get("train_seed"), train_cfg.get("val_seed")}
    if seed in seeds_used:
        raise UniFuseError(f"held-out seed {seed} was used for training or validation of {weights}; choose another --seed")
    dataset = make_dataset("test", cases, size, seed, options)
    report = evaluate_model(model, (dataset[i] for i in range(len(dataset))), dev, progress=progress)
    report["checkpoint"] = {
        "path": str(ckpt.path),
        "model_id": ckpt.model_id,
        "sha256": ckpt.sha256,
        "config": ckpt.config.to_dict(),
        "parameters": int(sum(p.numel() for p in model.parameters())),  # learned weights, not buffers
        "training": {k: v for k, v in ckpt.metadata.items() if k not in ("validation",)},
        "validation_at_export": ckpt.metadata.get("validation"),
    }
    report["heldout"] = {
        "generator": "unifuse.data.synthetic.SyntheticPairs",
        "split": "test", "cases": cases, "seed": seed, "size": size, "options": options,
        "note": "synthetic cases never seen in training or validation (different seed)",
    }
    report["targets"] = check_targets(report)
    report["environment"] = {
        "device": device_description(dev), "cpu": cpu_model(), "torch": str(torch.__version__),
        "python": platform.python_version(), "unifuse": __version__,
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    return report


# ------------------------------------------------------------------------------------------- reporting
def _fmt(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def format_report(report: Dict[str, Any]) -> str:
    """Plain-text summary of an evaluation report (used by ``unifuse evaluate``)."""
    lines = [f"held-out cases: {report['cases']}"]
    lines.append("method                     " + "".join(f"{k:>10}" for k in FUSION_KEYS))
    for m in METHODS:
        lines.append(f"{m:<27}" + "".join(f"{_fmt(report['fusion'][m][k]['mean']):>10}" for k in FUSION_KEYS))
    al = report["alignment"]
    e = al["endpoint_error_mm"]
    lines.append(f"endpoint error (mm): UniFuse {_fmt(e['unifuse']['mean'], 3)}  no registration {_fmt(e['no_registration']['mean'], 3)}")
    lines.append(f"folding: {_fmt(al['folding_percent']['mean'], 3)} % of voxels")
    if "dice_tissue_labels" in al:
        d = al["dice_tissue_labels"]
        lines.append(f"Dice (tissue labels): UniFuse {_fmt(d['unifuse']['mean'], 3)}  no registration {_fmt(d['no_registration']['mean'], 3)}")
    lines.append(f"degradation accuracy: {_fmt(report['degradation']['accuracy'], 3)}")
    for name, t in report.get("targets", {}).items():
        lines.append(f"target {name:<28} {'MET' if t['met'] else 'NOT MET'}")
    return "\n".join(lines)


def _fmt_mean_std(stat: Dict[str, Any]) -> str:
    mean = stat.get("mean")
    if mean is None or not math.isfinite(mean):
        return "n/a"
    return f"{_fmt(mean)} ± {_fmt(stat.get('std'), 3)}"


def _fmt_gap(x: float) -> str:
    """Gaps keep two significant digits, so a tiny miss is not printed as 0.0000."""
    return f"{x:.2g}"


def stage_wall_time_s(stage: Dict[str, Any]) -> Optional[float]:
    """Training wall time (s) of an earlier stage recorded by ``trainer.describe_source_checkpoint``: its run
    folder's ``summary.json`` (whole run, resumes included) or, for a checkpoint started from outside its run
    folder (e.g. the published ``unifuse_default.pt``), the wall time stored in the checkpoint itself."""
    summary = (stage.get("run_summary") or {}).get("wall_time_s")
    return summary if summary is not None else (stage.get("compute") or {}).get("wall_time_s")


def _model_card_markdown(card: Dict[str, Any]) -> str:
    ev = card["evaluation"]
    ck = ev["checkpoint"]
    tr = ck["training"]
    tc = tr.get("train_config", {})
    comp = tr.get("compute", {})
    cfg = ck["config"]
    L: List[str] = []
    L.append("# UniFuse 3D — shipped weights (`unifuse_default.pt`)\n")
    L.append(f"Model id `{ck['model_id']}`, SHA-256 `{ck['sha256']}`, unifuse {card['unifuse_version']}, "
             f"card written {card['date_utc']}.\n")
    data = tr.get("training_data") or {}
    source = (f"the `{data['dataset'].get('layout')}` dataset folder" + (" and synthetic pairs" if data.get("mix_synthetic") else "")
              if data.get("dataset") else "synthetic brain volumes only")
    L.append(f"**Research software. Not for clinical use.** Trained on {source}.\n")
    L.append("## Model\n")
    L.append(f"UniFuse 3D network (`{cfg['name']}` config): {ck['parameters']:,} parameters, working grid "
             f"{cfg['working_size']}³, encoder C={cfg['enc_channels']}, patch Q={cfg['patch_size']}, tokens M={cfg['embed_dim']}, "
             f"SSM state {cfg['d_state']}, J={cfg['num_regblks']} RegBLKs, U-Net widths {cfg['unet_channels']}, "
             f"LoRA rank {cfg['lora_rank']}, FA encoder skips {'on' if cfg.get('fa_skips') else 'off'}, degradation-statistics "
             f"branch {'on' if cfg.get('degradation_stats') else 'off'}, Ñ={cfg['num_degradations']} degradation classes "
             f"({', '.join(f'{c} = {DEGRADATION_LABELS[c]}' for c in DEGRADATION_CLASSES)}).\n")
    L.append("## Training\n")
    stages = []
    src = tr.get("initialised_from")
    while src:
        stages.append(src)
        src = src.get("initialised_from")
    for i, st in enumerate(reversed(stages), start=1):
        stc, sd, sr = st.get("train_config") or {}, st.get("training_data") or {}, st.get("run_summary") or {}
        L.append(f"- Stage {i} (`{stc.get('name')}`, checkpoint SHA-256 `{str(st.get('sha256'))[:12]}…` at step {st.get('step')}): "
                 f"AdamW, lr {stc.get('lr')} → {stc.get('lr_min')} cosine ({stc.get('warmup_steps')} warm-up steps), batch "
                 f"{stc.get('batch_size')}, {sr.get('step', st.get('step'))} of {stc.get('steps')} steps in "
                 f"{_fmt((stage_wall_time_s(st) or 0) / 60, 1)} min, {sd.get('train', {}).get('cases')} training cases "
                 f"(seed {sd.get('train', {}).get('seed')}), "
                 f"{f'started from stage {i - 1}' if stc.get('init_from') and i > 1 else 'init `' + str(stc.get('init')) + '`'}, loss weights "
                 f"{json.dumps(stc.get('loss_weights') or 'defaults')}, teacher-forced degradation "
                 f"{stc.get('true_degradation_in_training')}{_soft_note(stc)}.")
    if stages:
        L.append(f"- Stage {len(stages) + 1} (the shipped weights) continues from stage {len(stages)}:")
    td = tr.get("training_data", {})
    ds = td.get("dataset")
    if ds:
        tt = td.get("train", {})
        samples = (f"{tt.get('cases')} training samples ({tt.get('dataset_samples')} from the {ds.get('train_cases')} "
                   f"cases of {ds.get('train_subjects')} subjects, {tt.get('synthetic_samples')} synthetic pairs)")
        options = (f"dataset options {json.dumps(ds.get('folder_options') or {})}, "
                   f"options {json.dumps(td.get('options', {}))}")
    else:
        samples = f"{td.get('train', {}).get('cases')} synthetic training cases"
        options = f"options {json.dumps(td.get('options', {}))}"
    L.append(f"- Data: `{td.get('generator', 'SyntheticPairs')}` — {samples} "
             f"(seed {td.get('train', {}).get('seed')}), {td.get('validation', {}).get('cases')} validation cases "
             f"(seed {td.get('validation', {}).get('seed')}) at {cfg['working_size']}³; {options}.")
    L.append(f"- Optimisation: AdamW, lr {tc.get('lr')} → {tc.get('lr_min')} cosine ({tc.get('warmup_steps')} warm-up steps), "
             f"{'lr multiplied by ' + json.dumps(tc['lr_multipliers']) + ' for parameters with those name prefixes, ' if tc.get('lr_multipliers') else ''}"
             f"weight decay {tc.get('weight_decay')}, gradient clipping at L2 norm {tc.get('grad_clip')}, batch {tc.get('batch_size')}, "
             f"{tr.get('step')} of {tc.get('steps')} steps (checkpoint `{tr.get('checkpoint')}`, selected by {tr.get('best_by', 'last step')}); "
             f"loss weights {json.dumps(tc.get('loss_weights') or 'defaults of LossWeights')}; "
             f"{'started from the checkpoint above' if tc.get('init_from') else 'initialisation ' + str(tc.get('init'))}; "
             f"teacher-forced degradation class in training steps: {tc.get('true_degradation_in_training')}"
             f"{_soft_note(tc)}.")
    L.append(f"- Compute: {comp.get('device')} — {comp.get('cpu')}, {comp.get('cpu_threads')} threads, "
             f"AMP {comp.get('amp')}, training wall time {_fmt((comp.get('wall_time_s') or 0) / 60, 1)} min at export, "
             f"torch {comp.get('torch')}; exported {tr.get('date_utc')}.")
    run = tr.get("run_summary")
    if run:
        L.append(f"- Whole run: {run.get('step')} of {run.get('steps')} steps in {_fmt((run.get('wall_time_s') or 0) / 60, 1)} min "
                 f"on {run.get('device')} ({run.get('cpu')}, {run.get('cpu_threads')} threads); best validation loss "
                 f"{_fmt(run.get('best_val_loss'))} at step {run.get('best_step')}.")
    L.append("")
    L.append("## Held-out evaluation\n")
    ho = ev["heldout"]
    L.append(f"{ev['cases']} synthetic cases (split `{ho['split']}`, seed {ho['seed']}, {ho['size']}³), never used in training "
             f"or validation. Fusion metrics compare the fused volume with the reference and the clean moving volume aligned "
             f"by the true field (ideal sources); baselines fuse the reference with the degraded moving volume as given "
             f"(no registration). Means over cases (± standard deviation).\n")
    L.append("| method | " + " | ".join(FUSION_KEYS) + " |")
    L.append("|---|" + "---|" * len(FUSION_KEYS))
    for m in METHODS:
        cells = [_fmt_mean_std(ev["fusion"][m][k]) for k in FUSION_KEYS]
        L.append(f"| {m} | " + " | ".join(cells) + " |")
    vif = ev["fusion"]["unifuse"]["q_vif"]["mean"]
    if not (isinstance(vif, float) and math.isfinite(vif)):
        L.append(f"\nq_vif is n/a: the multi-scale VIF needs every edge ≥ {vif_min_size()} voxels and the volumes are "
                 f"{ho['size']}³ (unifuse.metrics.fusion_metrics reports it as undefined rather than inventing a value).")
    al = ev["alignment"]
    e = al["endpoint_error_mm"]
    L.append("")
    L.append("| alignment | UniFuse | no registration |")
    L.append("|---|---|---|")
    L.append(f"| endpoint error, mm (head) | {_fmt(e['unifuse']['mean'], 3)} ± {_fmt(e['unifuse']['std'], 3)} | "
             f"{_fmt(e['no_registration']['mean'], 3)} ± {_fmt(e['no_registration']['std'], 3)} |")
    for k in ("mse", "cc", "ssim"):
        a = al["aligned_vs_label"]
        L.append(f"| aligned vs label {k} | {_fmt(a['unifuse'][k]['mean'])} | {_fmt(a['no_registration'][k]['mean'])} |")
    if "dice_tissue_labels" in al:
        d = al["dice_tissue_labels"]
        L.append(f"| Dice of tissue labels | {_fmt(d['unifuse']['mean'], 3)} | {_fmt(d['no_registration']['mean'], 3)} |")
    L.append(f"| folding, % voxels | {_fmt(al['folding_percent']['mean'], 3)} | 0 |")
    deg = ev["degradation"]
    L.append(f"\nDegradation classification accuracy: {_fmt(deg['accuracy'], 3)} (confusion matrix, rows = true "
             f"{deg['classes']}, columns = predicted: {deg['confusion_true_by_predicted']}).\n")
    L.append("## Targets (issue 3)\n")
    L.append("| target | result | met |")
    L.append("|---|---|---|")
    for name, t in ev["targets"].items():
        if name == "endpoint_error_reduction":
            res = f"{_fmt(t['value_percent'], 1)} % reduction ({_fmt(t['unifuse_mm'], 3)} vs {_fmt(t['no_registration_mm'], 3)} mm)"
            gap = f"missed by {_fmt(t['gap_percent_points'], 1)} points" if not t["met"] else ""
        elif name == "folding":
            res = f"{_fmt(t['value_percent'], 3)} %"
            gap = f"missed by {_fmt(t['gap_percent_points'], 3)} points" if not t["met"] else ""
        elif name == "degradation_accuracy":
            res = f"{_fmt(t['value'], 3)}"
            gap = f"missed by {_fmt_gap(t['gap'])}" if not t["met"] else ""
        else:
            res = f"{t['value']:.5g} vs " + ", ".join(f"{m} {v:.5g}" for m, v in t["baselines"].items())
            gap = f"short of the best baseline by {_fmt_gap(t['gap'])}" if not t["met"] else ""
        L.append(f"| {t['description']} | {res} | {'yes' if t['met'] else 'NO ' + gap} |")
    L.append("\n## Limitations\n")
    for item in card["limitations"]:
        L.append(f"- {item}")
    L.append("")
    return "\n".join(L)


LIMITATIONS = (
    "Trained on synthetic brain volumes, then fine-tuned twice on crops of the 12 real training cases (6 "
    "subjects) of `unifuse data real`, the second time with residual deformations of up to ~10 mm and soft "
    "degradation-class mixtures. On the real-anatomy validation cases of `unifuse bench --real` (docs/benchmark.md, "
    "2026-12-03) the pipeline's guard rejected this network's deformable field on every case (3 mm working grid "
    "after an MI affine), also on the same cases rebuilt with larger non-rigid deformations, so the alignment "
    "there comes from the affine stage and the guarded MIND-SSC refinement; the fused and restored volumes are "
    "the network's. Its alignment features do not encode the residual misalignment of real crops (a linear "
    "read-out of its field head's input explains none of it, against 91 % on synthetic pairs; docs/training.md).",
    "Not a medical device; not for clinical use or diagnosis.",
    "Trained on CPU for a short schedule on 32³ grids; far less training than the paper (500 epochs at 160³ on a "
    "GPU). The fusion runs at the reference's resolution, but the fused and restored volumes are smoother than "
    "the sharper source (docs/benchmark.md).",
    "Degradation classes are limited to: none, MRI motion, CT metal + noise, low-dose PET noise; other artifacts "
    "are forced into one of these classes. The pipeline decides the class from the moving volume's physical "
    "evidence and, when known, its modality (docs/network.md: 94.1 % on the real-anatomy validation samples with "
    "the modality stated, 87.4 % without); this network's own classifier is reported but not used.",
    "Misalignments larger than those simulated in training (±10°, ±10 mm plus smooth non-rigid) are outside the "
    "training distribution.",
)


def training_limitations(report: Dict[str, Any]) -> List[str]:
    """Limitations that follow from how the evaluated checkpoint was trained (read from its metadata)."""
    train_cfg = (report.get("checkpoint", {}).get("training") or {}).get("train_config") or {}
    items = []
    if (train_cfg.get("loss_weights") or {}).get("inten_target") == "mean":
        items.append(
            "The fused volume was trained towards the mean of the two sources (L_inten's target), not the paper's "
            "voxel-wise maximum: it scores higher on Q_psnr but carries less of each source's own contrast (lower "
            "Q_scd) than a max-target network; see docs/training.md."
        )
    return items


def _soft_note(train_config: Dict[str, Any]) -> str:
    """", soft class mixtures for N % of the samples" when the run softened the teacher-forced class."""
    fraction = train_config.get("soft_degradation_fraction") or 0.0
    return f", soft class mixtures for {100 * fraction:.0f} % of the samples" if fraction else ""


def write_model_card(report: Dict[str, Any], out_dir: Union[str, Path]) -> Tuple[Path, Path]:
    """Write ``model_card.json`` (the full evaluation report + limitations) and ``MODEL_CARD.md`` to ``out_dir``.

    Every number comes from ``report`` (an :func:`evaluate_checkpoint` result); nothing is edited.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    card = {
        "model_card_version": 1,
        "unifuse_version": __version__,
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "intended_use": "research on joint alignment, restoration and fusion of multi-modal brain volumes; not clinical use",
        "limitations": list(LIMITATIONS) + training_limitations(report),
        "evaluation": report,
    }
    json_path = out / "model_card.json"
    md_path = out / "MODEL_CARD.md"
    json_path.write_text(json.dumps(card, indent=2, default=float, allow_nan=True) + "\n", encoding="utf-8")
    md_path.write_text(_model_card_markdown(card), encoding="utf-8")
    return json_path, md_path
