"""Measurement script (not a test): does the network's alignment head *see* the misalignment it must predict?

A linear read-out probe. For a checkpoint, the inputs of the FA head (``FeatureAlignment.head``: the finest
RegBLK features of both streams plus their radius-1 local correlation, on the head's grid) are collected on
held-out pairs with a known pull-back field, and a least-squares linear map (per head voxel, channels → the 3
field components, plus a constant) is fitted on the first pairs and scored on the others by R² (fraction of the
true field's variance it explains; 0 = no better than the mean field, negative = worse). The head itself is
one 3³ convolution, a GELU and a 1×1 convolution, so features from which no linear map recovers the field
leave it little to learn from. Two sets of pairs:

* ``synthetic``: held-out synthetic pairs at 32³ (split ``val``, the training distribution of stages 1–3);
* ``real``: 32³ crops of the real **training** cases of ``unifuse data real`` (:class:`RealCrops`, a seed no
  training run used) with the ``cpu_real_deform`` residual (smooth part up to 6 mm per component).

    .venv/bin/python docs/probes/field_information_probe.py --weights UniFuseSlicer/Resources/Models/unifuse_default.pt

About 2 minutes per set on one core. Used for docs/training.md (stage 5).
"""

from __future__ import annotations

import argparse
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from unifuse.model.unifuse import build_model
from unifuse.train.datasets import synthetic_pairs
from unifuse.train.real_crops import RealCrops
from unifuse.weights import load_checkpoint


def head_inputs(model: torch.nn.Module, dataset, n: int) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """Per pair: (head voxels, channels) features and (head voxels, 3) true field in head-grid voxels."""
    seen: Dict[str, torch.Tensor] = {}
    hook = model.fa.head.register_forward_pre_hook(lambda module, args: seen.__setitem__("x", args[0]))
    features, fields = [], []
    try:
        with torch.no_grad():
            for i in range(n):
                sample = dataset[i]
                model(sample["reference"][None], sample["moving"][None])
                x = seen["x"][0]
                size = sample["field"].shape[-1]
                # the field in working-grid voxels, averaged onto the head grid and rescaled to its voxels
                u = F.interpolate(sample["field"][None], size=x.shape[1:], mode="area")[0] * (x.shape[-1] / size)
                features.append(x.flatten(1).T.numpy())
                fields.append(u.flatten(1).T.numpy())
    finally:
        hook.remove()
    return features, fields


def linear_r2(features: List[np.ndarray], fields: List[np.ndarray], n_fit: int) -> float:
    """R² on pairs ``n_fit:`` of the least-squares map fitted on pairs ``:n_fit``."""
    x_fit, y_fit = np.concatenate(features[:n_fit]), np.concatenate(fields[:n_fit])
    x_test, y_test = np.concatenate(features[n_fit:]), np.concatenate(fields[n_fit:])
    w, *_ = np.linalg.lstsq(np.c_[x_fit, np.ones(len(x_fit))], y_fit, rcond=None)
    residual = y_test - np.c_[x_test, np.ones(len(x_test))] @ w
    return float(1.0 - (residual ** 2).sum() / ((y_test - y_test.mean(axis=0)) ** 2).sum())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", required=True, help="a unifuse.weights checkpoint")
    p.add_argument("--cache", default="real_data", help="the cache of `unifuse data real`")
    p.add_argument("--pairs", type=int, default=80, help="pairs per set (the first 3/4 fit, the rest score)")
    p.add_argument("--sets", nargs="+", default=("synthetic", "real"), choices=("synthetic", "real"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    ckpt = load_checkpoint(args.weights)
    model = build_model(ckpt.config)
    model.load_state_dict(ckpt.state_dict)
    model.eval()
    size = ckpt.config.working_size
    for name in args.sets:
        if name == "synthetic":
            dataset = synthetic_pairs("val", args.pairs, size, 4242)
        else:
            dataset = RealCrops(args.cache, "train", size=size, length=args.pairs, seed=777, nonrigid_mm=6.0)
        features, fields = head_inputs(model, dataset, args.pairs)
        true = np.concatenate(fields)
        print(f"{name:9s} {args.pairs} pairs: mean |u_true| {np.linalg.norm(true, axis=1).mean():.3f} head voxels, "
              f"linear R2 of the field from the head's input {linear_r2(features, fields, args.pairs * 3 // 4):+.3f}")


if __name__ == "__main__":
    main()
