"""Training of the UniFuse 3D network: the paper's losses (:mod:`unifuse.train.losses`) and the trainer.

The losses are re-exported here::

    from unifuse.train import UniFuseLoss, LossWeights
    total, parts = UniFuseLoss(LossWeights(smooth=0.1))(logits=..., degradation_target=..., ...)
"""

from __future__ import annotations

from .losses import (
    LossWeights,
    UniFuseLoss,
    gradient3d,
    loss_ce,
    loss_moda,
    loss_reg,
    loss_rf,
    loss_rf_terms,
    loss_smooth,
    ssim3d_torch,
    ssim_loss,
)

__all__ = [
    "LossWeights",
    "UniFuseLoss",
    "gradient3d",
    "loss_ce",
    "loss_moda",
    "loss_reg",
    "loss_rf",
    "loss_rf_terms",
    "loss_smooth",
    "ssim3d_torch",
    "ssim_loss",
]
