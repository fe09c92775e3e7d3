"""Measurement script (not a test): which fused volume does each variant of L_rf prefer, and its Q_psnr?

For held-out synthetic cases (split ``test``, seed 7 777 777, 32³; every third of the first 32) the fused
volume F is optimised *directly*, voxel by voxel, against the ideal sources (the reference R and the clean
moving volume aligned by the true field A): Adam on logit(F), lr 0.05, 300 steps, starting from (A + R) / 2.
The result is the best any network could do for that loss; its Q_psnr / Q_ssim / Q_cc are printed next to
the no-registration average baseline and the ideal average and max. Used for docs/training.md
("Why Q_psnr stays below plain averaging"). Run from the repository root (about 15 minutes on one core):

    .venv/bin/python docs/probes/rf_loss_optimum.py
"""

from __future__ import annotations

import numpy as np
import torch

from unifuse import metrics
from unifuse.data.synthetic import SyntheticPairs
from unifuse.train.losses import loss_rf_terms

# (λ_ssim, λ_inten, λ_grad, L_inten target)
VARIANTS = [
    (1, 1, 1, "max"), (1, 0.5, 1, "max"), (1, 0.25, 1, "max"), (1, 0, 1, "max"),
    (1, 0.5, 0.5, "max"), (1, 0.25, 0.5, "max"), (1, 0, 0, "max"), (1, 1, 1, "mean"),
]


def optimum(a: torch.Tensor, r: torch.Tensor, variant) -> np.ndarray:
    w_ssim, w_inten, w_grad, target = variant
    z = torch.logit((0.5 * (a + r)).clamp(1e-3, 1 - 1e-3)).clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=0.05)
    for _ in range(300):
        terms = loss_rf_terms(torch.sigmoid(z), a, r, inten_target=target)
        loss = w_ssim * terms["ssim"] + w_inten * terms["inten"] + w_grad * terms["grad"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.sigmoid(z).detach()[0, 0].numpy()


def main() -> None:
    torch.set_num_threads(1)
    cases = SyntheticPairs(split="test", size=32, length=32, seed=7_777_777)
    rows = {v: [] for v in VARIANTS}
    base = {"no registration + average": [], "ideal average": [], "ideal max": []}
    for i in range(0, 32, 3):
        s = cases[i]
        r, a, moving = s["reference"][None], s["moving_clean_aligned"][None], s["moving"][None]
        rn, an = r[0, 0].numpy(), a[0, 0].numpy()
        base["no registration + average"].append(metrics.q_psnr(rn, an, 0.5 * (rn + moving[0, 0].numpy())))
        base["ideal average"].append(metrics.q_psnr(rn, an, 0.5 * (rn + an)))
        base["ideal max"].append(metrics.q_psnr(rn, an, np.maximum(rn, an)))
        for v in VARIANTS:
            f = optimum(a, r, v)
            rows[v].append((metrics.q_psnr(rn, an, f), metrics.q_ssim(rn, an, f), metrics.q_cc(rn, an, f)))
    for name, values in base.items():
        print(f"{name}: Q_psnr {np.mean(values):.2f}")
    print("λ_ssim λ_inten λ_grad target | Q_psnr Q_ssim Q_cc")
    for v, values in rows.items():
        q = np.mean(values, axis=0)
        print(f"{v[0]} {v[1]} {v[2]} {v[3]} | {q[0]:.2f} {q[1]:.3f} {q[2]:.3f}")


if __name__ == "__main__":
    main()
