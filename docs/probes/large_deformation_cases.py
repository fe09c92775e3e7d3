"""Build the real-anatomy validation cases again with larger non-rigid deformations (measurement script).

The shipped recipe (``unifuse.data.real_cases.CaseSettings``) draws the smooth non-rigid part of each known warp
with a *maximum* length of 2–6 mm, which leaves 0.6–1.1 mm (mean, inside the evaluation mask) that no affine map
can explain: too little for any deformable stage to show what it adds after a good affine. This script rebuilds
the same validation subjects, kinds, seeds and degradations with ``nonrigid_mm`` = (10, 16) mm (maximum length;
the breathing/soft-tissue class of deformation) into a separate cache whose case folders ``unifuse bench
--real --cache`` reads directly (no manifest: the benchmark then reads each ``case.json``):

    .venv/bin/python docs/probes/large_deformation_cases.py --cache real_data --out /tmp/real_large [--split train]
    .venv/bin/unifuse bench --real --cache /tmp/real_large --out bench_large ...

It also prints, per case, the mean length of the true field and of the part no affine map explains (the
residual of a least-squares affine fit to the truth inside the evaluation mask).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from unifuse import geometry
from unifuse.bench.cases import real_cases
from unifuse.data import real
from unifuse.data.real_cases import CaseSettings
from unifuse.data.real_sources import SUBJECTS
from unifuse.evaluation import as_evaluation_case


def non_affine_part(case) -> tuple:
    """(mean |U|, mean |U - best affine fit|) in mm inside the case's evaluation mask."""
    ev = as_evaluation_case(case)
    u = sitk.GetArrayViewFromImage(case.truth_displacement)[ev.mask]
    k, j, i = np.nonzero(ev.mask)
    pts = np.stack((i, j, k), -1) @ geometry.index_to_physical_matrix(case.reference).T + np.asarray(case.reference.GetOrigin())
    x = np.concatenate([pts, np.ones((len(pts), 1))], 1)
    coef, *_ = np.linalg.lstsq(x, u, rcond=None)
    return float(np.linalg.norm(u, axis=1).mean()), float(np.linalg.norm(u - x @ coef, axis=1).mean())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", default="real_data", help="the cache of `unifuse data real` (its volumes are reused)")
    p.add_argument("--out", required=True, help="new cache folder (cases/validation/<case>/)")
    p.add_argument("--nonrigid-mm", type=float, nargs=2, default=(10.0, 16.0), metavar=("MIN", "MAX"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="validation", choices=("train", "validation"))
    args = p.parse_args(argv)
    cache, out = Path(args.cache), Path(args.out)
    (out / "volumes").mkdir(parents=True, exist_ok=True)
    for s in SUBJECTS:
        src, dst = (cache / "volumes" / s.id).resolve(), out / "volumes" / s.id
        if src.is_dir() and not dst.exists():
            dst.symlink_to(src)
    settings = replace(CaseSettings(), nonrigid_mm=tuple(args.nonrigid_mm))
    plan = [entry for entry in real.plan_cases(SUBJECTS, 2) if entry[0].split == args.split
            and (cache / "volumes" / entry[0].id).is_dir()]
    real._build(plan, out, args.seed, settings, False, print, {})
    for case in real_cases(out, args.split):
        total, residual = non_affine_part(case)
        print(f"{case.name:50s} mean |U| {total:6.2f} mm, not affine {residual:5.2f} mm")
    for case in real_cases(cache, args.split):
        total, residual = non_affine_part(case)
        print(f"(shipped recipe) {case.name:50s} mean |U| {total:6.2f} mm, not affine {residual:5.2f} mm")


if __name__ == "__main__":
    main(sys.argv[1:])
