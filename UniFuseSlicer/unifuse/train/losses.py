"""Training losses of UniFuse 3D (paper eqs. 1, 4–6, 11–15), differentiable, in PyTorch.

Tensors are (B, C, D, H, W) = (batch, channel, z, y, x); volumes have C = 1 and intensities in [0, 1];
displacement fields are (B, 3, D, H, W) pull-back fields in voxels of the working grid with channels
(x, y, z) (``aligned(p) = moving(p + u(p))``, see :mod:`unifuse.spatial`); token sets are (B, N, M).

Total loss (eq. 15 plus a smoothness regulariser, DESIGN §4)::

    L = w_ce L_ce + w_moda L_moda + w_reg L_reg + w_rf L_rf + λ_smooth L_smooth

Readings of the paper that the code makes explicit:

* L_reg (eq. 6) is the *mean* squared error of the fields, not the Frobenius sum, so its scale does not
  depend on the grid size.
* L_ssim (eq. 11) is written with SSIM terms in the paper; a loss must decrease as the images agree, so
  the code uses ``(1 − SSIM)`` terms.
* L_grad (eq. 12) compares gradient *magnitudes* per component, ``| |∂_k F| − max(|∂_k A|, |∂_k R|) |``,
  as in the infrared/visible and medical fusion literature; a signed max would prefer positive edges.
* L_crcb (eq. 13) supervises the chroma of colour images; the volumes here are scalar, so it does not apply
  and L_rf = L_ssim + L_inten + L_grad.
* L_inten's target is max(A, R) as in eq. (12) unless ``LossWeights.inten_target = "mean"`` (used for the
  shipped weights' last stage; why: ``docs/training.md``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..errors import InputImageError
from ..metrics import SSIM_K1, SSIM_K2, SSIM_RADIUS, SSIM_SIGMA, ssim_window_radius

__all__ = [
    "SSIM_SIGMA",
    "SSIM_RADIUS",
    "SSIM_K1",
    "SSIM_K2",
    "gaussian_kernel1d",
    "ssim3d_torch",
    "ssim_loss",
    "loss_restore",
    "gradient3d",
    "loss_ce",
    "loss_moda",
    "loss_reg",
    "loss_smooth",
    "INTENSITY_TARGETS",
    "loss_rf_terms",
    "loss_rf",
    "LossWeights",
    "UniFuseLoss",
]

# SSIM window and constants come from :mod:`unifuse.metrics` so the loss equals 1 − the metric.


def _check_volume(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 5:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputImageError(f"{name} must be a (B, C, D, H, W) tensor ordered (batch, channel, z, y, x); got {shape}")


def _check_pair(x: torch.Tensor, y: torch.Tensor, names: Tuple[str, str]) -> None:
    _check_volume(x, names[0])
    _check_volume(y, names[1])
    if x.shape != y.shape:
        raise InputImageError(f"{names[0]} {tuple(x.shape)} and {names[1]} {tuple(y.shape)} must have one shape")


# ----------------------------------------------------------------------------------------------- SSIM
def gaussian_kernel1d(radius: int, sigma: float, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Normalised sampled Gaussian ``exp(-k² / 2σ²) / Σ`` for k = -radius..radius, shape (2 radius + 1,)."""
    k = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (k / sigma) ** 2)
    return (w / w.sum()).to(dtype=dtype, device=device)


def _blur_valid(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' Gaussian filtering of (N, 1, D, H, W) along z, y and x."""
    k = kernel.numel()
    x = F.conv3d(x, kernel.view(1, 1, k, 1, 1))
    x = F.conv3d(x, kernel.view(1, 1, 1, k, 1))
    return F.conv3d(x, kernel.view(1, 1, 1, 1, k))


def ssim3d_torch(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Mean 3D SSIM per batch item and channel, differentiable (Wang et al. 2004).

    Same definition as :func:`unifuse.metrics.ssim3d`: Gaussian window σ = 1.5 voxels, 11³ taps (truncated to
    ``(min edge − 1) // 2`` on smaller volumes), population moments, C1 = (0.01 L)², C2 = (0.03 L)², averaged
    over the voxels whose window lies inside the volume ('valid' filtering).

    Args:
        x, y: (B, C, D, H, W) tensors of one shape.
        data_range: intensity range L.

    Returns:
        (B,) tensor: SSIM averaged over channels and valid voxels (1 for identical inputs).

    Equals ``monai.metrics.SSIMMetric(3, gaussian, 11, 1.5)`` to 1e-6 (the test compares them) but is kept:
    ``unifuse train`` must run without MONAI (a test extra), and MONAI computes in float32 and does not shrink
    the window for volumes under 11 voxels.
    """
    _check_pair(x, y, ("x", "y"))
    b, c = x.shape[:2]
    radius = ssim_window_radius(x.shape[2:])
    kernel = gaussian_kernel1d(radius, SSIM_SIGMA, dtype=x.dtype, device=x.device)
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    xs = x.reshape(b * c, 1, *x.shape[2:])
    ys = y.reshape(b * c, 1, *y.shape[2:])
    # one filtering pass over the five moment images, stacked along the batch axis
    stats = _blur_valid(torch.cat((xs, ys, xs * xs, ys * ys, xs * ys), dim=0), kernel)
    mu_x, mu_y, ex2, ey2, exy = stats.chunk(5, dim=0)
    var_x = ex2 - mu_x * mu_x
    var_y = ey2 - mu_y * mu_y
    cov = exy - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2))
    return ssim_map.reshape(b, c, -1).mean(dim=(1, 2))


def ssim_loss(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """``1 − SSIM3D(x, y)`` averaged over the batch (scalar); 0 for identical inputs."""
    return 1.0 - ssim3d_torch(x, y, data_range).mean()


# ------------------------------------------------------------------------------------------- gradients
def gradient3d(x: torch.Tensor) -> torch.Tensor:
    """Spatial gradient of every channel, in intensity units per voxel.

    Central differences ``(x[i+1] − x[i−1]) / 2`` inside and one-sided differences on the faces
    (:func:`torch.gradient`, unit voxel spacing), so a linear ramp has the exact constant gradient everywhere.

    Args:
        x: (B, C, D, H, W) tensor; every spatial axis needs at least 2 voxels.

    Returns:
        (B, 3 C, D, H, W): for each input channel c the three derivatives ``(∂/∂x, ∂/∂y, ∂/∂z)`` at channels
        ``3c, 3c+1, 3c+2`` — the (x, y, z) order of displacement fields.
    """
    _check_volume(x, "x")
    if min(x.shape[2:]) < 2:
        raise InputImageError(f"gradient3d needs at least 2 voxels along every axis; got {tuple(x.shape[2:])}")
    dz, dy, dx = torch.gradient(x, dim=(2, 3, 4))
    b, c = x.shape[:2]
    return torch.stack((dx, dy, dz), dim=2).reshape(b, 3 * c, *x.shape[2:])


# -------------------------------------------------------------------------------------------- L_ce
def loss_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Degradation-classification cross entropy, eq. (1): ``CE(p, p_GT)`` averaged over the batch.

    Args:
        logits: (B, Ñ) unnormalised class scores (p = softmax(logits)).
        target: (B,) long class ids (:data:`unifuse.config.DEGRADATION_CLASSES`) or (B, Ñ) class probabilities.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (B, num_classes); got {tuple(logits.shape)}")
    if target.dim() == 1:
        if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"1-D target must hold integer class ids; got dtype {target.dtype}")
        if target.shape[0] != logits.shape[0]:
            raise ValueError(f"target has {target.shape[0]} items but logits {logits.shape[0]}")
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= logits.shape[1]):
            raise ValueError(f"class ids must lie in [0, {logits.shape[1] - 1}]; got {target.tolist()}")
        return F.cross_entropy(logits, target.long())
    if target.shape != logits.shape:
        raise ValueError(f"probability target {tuple(target.shape)} must match logits {tuple(logits.shape)}")
    return F.cross_entropy(logits, target.to(logits.dtype))


# ------------------------------------------------------------------------------------------ L_moda
def loss_moda(
    tokens_a: torch.Tensor,
    tokens_b: torch.Tensor,
    tau: float = 0.1,
    num_negatives: int = 32,
    generator: Optional[torch.Generator] = None,
    batch_slice: Optional[Tuple[int, int]] = None,
) -> torch.Tensor:
    """Contrastive InfoNCE loss L_cont(F1, F2) of eq. (5), averaged over all positions and the batch.

    For every position i: anchor ``f_i = tokens_a[:, i]``, positive ``f_i⁺ = tokens_b[:, i]`` (same position),
    and K negatives ``tokens_b[:, j]`` at positions j ≠ i drawn uniformly with replacement::

        L = −log( exp(sim(f_i, f_i⁺)/τ) / (exp(sim(f_i, f_i⁺)/τ) + Σ_k exp(sim(f_i, f_k⁻)/τ)) )

    with cosine similarity ``sim``. Eq. (4)'s L_moda is the sum of this over the two position-matched token
    pairs (see :class:`UniFuseLoss`).

    Args:
        tokens_a, tokens_b: (B, N, M) token sets with position correspondence; N ≥ 2.
        tau: temperature τ (paper: 0.1).
        num_negatives: K, negatives per anchor.
        generator: CPU :class:`torch.Generator` for the negative sampling; the same seed gives the same loss.
        batch_slice: ``(offset, global_batch)`` when these B items are items ``offset … offset + B − 1`` of a
            larger batch split across processes (data-parallel training): the negatives are drawn for the
            whole ``global_batch`` and this slice is used, so every item gets the negatives it would get in
            one process and the generator advances identically in every process. None = ``(0, B)``.

    Returns:
        Scalar loss (≥ 0).
    """
    if tokens_a.dim() != 3 or tokens_a.shape != tokens_b.shape:
        raise ValueError(
            f"tokens must be two (B, N, M) tensors of one shape; got {tuple(tokens_a.shape)} and {tuple(tokens_b.shape)}"
        )
    b, n, _ = tokens_a.shape
    if n < 2:
        raise ValueError(f"InfoNCE needs at least 2 token positions to draw negatives from; got N = {n}")
    if not tau > 0:
        raise ValueError(f"temperature tau must be positive; got {tau}")
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be at least 1; got {num_negatives}")
    za = F.normalize(tokens_a, dim=-1)
    zb = F.normalize(tokens_b, dim=-1)
    positive = (za * zb).sum(dim=-1, keepdim=True)  # (B, N, 1)
    # j uniform over the N-1 positions other than i: draw r in [0, N-2], skip i
    offset, total = (0, b) if batch_slice is None else (int(batch_slice[0]), int(batch_slice[1]))
    if not 0 <= offset <= total - b:
        raise ValueError(f"batch_slice {batch_slice} does not hold a slice of {b} items")
    r = torch.randint(0, n - 1, (total, n, num_negatives), generator=generator)[offset:offset + b].to(tokens_a.device)
    anchor_pos = torch.arange(n, device=tokens_a.device).view(1, n, 1)
    neg_idx = r + (r >= anchor_pos).long()
    negatives_b = torch.gather(
        zb, 1, neg_idx.reshape(b, n * num_negatives, 1).expand(-1, -1, zb.shape[-1])
    ).reshape(b, n, num_negatives, -1)
    negative = (za.unsqueeze(2) * negatives_b).sum(dim=-1)  # (B, N, K)
    logits = torch.cat((positive, negative), dim=-1) / tau
    target = torch.zeros(b * n, dtype=torch.long, device=tokens_a.device)
    return F.cross_entropy(logits.reshape(b * n, -1), target)


# ------------------------------------------------------------------------------- L_reg and L_smooth
def _check_field(u: torch.Tensor, name: str) -> None:
    if not isinstance(u, torch.Tensor) or u.dim() != 5 or u.shape[1] != 3:
        shape = tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__
        raise InputImageError(f"{name} must be a (B, 3, D, H, W) displacement field (voxels, channels x, y, z); got {shape}")


def loss_reg(u: torch.Tensor, u_gt: torch.Tensor) -> torch.Tensor:
    """Field supervision, eq. (6): ``mean((u_gt − u)²)`` over batch, channels and voxels (voxels²).

    The paper writes the squared Frobenius norm (a sum); the mean keeps the loss scale independent of the
    grid size and batch size. A constant offset of c voxels in every component gives exactly c².
    """
    _check_field(u, "u")
    _check_field(u_gt, "u_gt")
    if u.shape != u_gt.shape:
        raise InputImageError(f"u {tuple(u.shape)} and u_gt {tuple(u_gt.shape)} must have one shape")
    return torch.mean((u_gt - u) ** 2)


def loss_smooth(u: torch.Tensor) -> torch.Tensor:
    """Diffusion regulariser ``mean_{p, c, k} (∂u_c/∂x_k)²`` with :func:`gradient3d` (voxels/voxel, squared).

    The mean runs over the batch, the 3 field components, the 3 derivative directions and all voxels, so a
    field with a single non-zero derivative ``∂u_x/∂x = a`` everywhere gives ``a² / 9``; constant fields give 0.
    ``monai.losses.DiffusionLoss`` is 3× this mean over the interior only (it skips the faces, 18% of a 32³
    grid), a different loss than the shipped weights were trained with; kept (the test relates the two).
    """
    _check_field(u, "u")
    return torch.mean(gradient3d(u) ** 2)


# -------------------------------------------------------------------------------------------- L_rf
#: Targets of L_inten: the paper's voxel-wise ``max`` of the two sources, or their ``mean``.
INTENSITY_TARGETS = ("max", "mean")


def loss_rf_terms(
    fused: torch.Tensor,
    aligned_fine: torch.Tensor,
    reference: torch.Tensor,
    data_range: float = 1.0,
    inten_target: str = "max",
) -> Dict[str, torch.Tensor]:
    """The three terms of the restoration-and-fusion loss, eqs. (11)–(12), as scalar tensors.

    With F = ``fused``, A = ``aligned_fine`` = W(I'_fine, φ) (the clean moving volume warped by the
    *predicted* field, so these terms also train the field) and R = ``reference``:

    * ``ssim``  = (1 − SSIM(F, A)) + (1 − SSIM(F, R))                      (eq. 11, as a decreasing loss)
    * ``inten`` = mean |F − max(A, R)|                                       (eq. 12, L1 as a mean)
      or, with ``inten_target="mean"``, mean |F − (A + R) / 2| (our option, not the paper's: on held-out
      cases the best fused volume for the max-target loss scores 0.8 dB below plain averaging on Q_psnr;
      ``docs/training.md``)
    * ``grad``  = mean over voxels and k ∈ {x, y, z} of | |∂_k F| − max(|∂_k A|, |∂_k R|) |   (eq. 12)

    The CrCb colour term of eq. (13) is not applicable to scalar 3D volumes and is omitted.

    Args:
        fused, aligned_fine, reference: (B, 1, D, H, W) tensors of one shape, intensities in [0, data_range].
    """
    _check_pair(fused, aligned_fine, ("fused", "aligned_fine"))
    _check_pair(fused, reference, ("fused", "reference"))
    if inten_target not in INTENSITY_TARGETS:
        raise ValueError(f"inten_target must be one of {INTENSITY_TARGETS}; got {inten_target!r}")
    target = torch.maximum(aligned_fine, reference) if inten_target == "max" else 0.5 * (aligned_fine + reference)
    ssim_term = ssim_loss(fused, aligned_fine, data_range) + ssim_loss(fused, reference, data_range)
    inten = torch.mean(torch.abs(fused - target))
    grad_target = torch.maximum(gradient3d(aligned_fine).abs(), gradient3d(reference).abs())
    grad = torch.mean(torch.abs(gradient3d(fused).abs() - grad_target))
    return {"ssim": ssim_term, "inten": inten, "grad": grad}


def loss_rf(
    fused: torch.Tensor,
    aligned_fine: torch.Tensor,
    reference: torch.Tensor,
    data_range: float = 1.0,
) -> torch.Tensor:
    """Restoration-and-fusion loss L_rf = L_ssim + L_inten + L_grad (eq. 14 without L_crcb); see
    :func:`loss_rf_terms` for the terms."""
    terms = loss_rf_terms(fused, aligned_fine, reference, data_range)
    return terms["ssim"] + terms["inten"] + terms["grad"]


def loss_restore(restored: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_res = mean |Â − A| + (1 − SSIM(Â, A)): the restored aligned moving volume Â against the clean moving
    volume aligned with the reference A (both (B, 1, D, H, W) in [0, 1]). Not in the paper, whose UFR&F
    outputs the fused volume only; it trains the restoration output (``ModelConfig.restoration_head``)."""
    _check_pair(restored, target, ("restored", "target"))
    return (restored - target).abs().mean() + ssim_loss(restored, target)


# ------------------------------------------------------------------------------------------ combined
@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms; the paper's eq. (15) weights every term by 1.

    Attributes:
        ce, moda, reg, rf: weights of L_ce, L_moda, L_reg, L_rf.
        smooth: λ_smooth of the diffusion regulariser on the predicted field (not in the paper; keeps the
            field free of folding where L_reg alone does not).
        tau: InfoNCE temperature of L_moda.
        num_negatives: K negatives per anchor in L_moda.
        inten_target: target of L_inten: ``"max"`` (the paper's eq. 12, max(A, R)) or ``"mean"`` ((A + R) / 2;
            see :func:`loss_rf_terms`).
        restore: weight of :func:`loss_restore` (0: networks without the restoration output).
    """

    ce: float = 1.0
    moda: float = 1.0
    reg: float = 1.0
    rf: float = 1.0
    smooth: float = 0.1
    tau: float = 0.1
    num_negatives: int = 32
    inten_target: str = "max"
    restore: float = 0.0

    def __post_init__(self) -> None:
        for name in ("ce", "moda", "reg", "rf", "smooth", "restore"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"loss weight {name} must be a finite number ≥ 0; got {value}")
        if not self.tau > 0:
            raise ValueError(f"tau must be positive; got {self.tau}")
        if self.num_negatives < 1:
            raise ValueError(f"num_negatives must be at least 1; got {self.num_negatives}")
        if self.inten_target not in INTENSITY_TARGETS:
            raise ValueError(f"inten_target must be one of {INTENSITY_TARGETS}; got {self.inten_target!r}")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


class UniFuseLoss(torch.nn.Module):
    """Total training loss ``L = w_ce L_ce + w_moda L_moda + w_reg L_reg + w_rf L_rf + λ_smooth L_smooth``.

    A term whose weight is 0 is skipped and its inputs may be ``None``; a term with a positive weight needs
    its inputs (a missing one raises ``ValueError`` naming it).
    """

    def __init__(self, weights: Optional[LossWeights] = None) -> None:
        super().__init__()
        self.weights = weights if weights is not None else LossWeights()

    def forward(
        self,
        *,
        logits: Optional[torch.Tensor] = None,
        degradation_target: Optional[torch.Tensor] = None,
        token_pairs: Optional[Sequence[Tuple[torch.Tensor, torch.Tensor]]] = None,
        displacement: Optional[torch.Tensor] = None,
        displacement_gt: Optional[torch.Tensor] = None,
        fused: Optional[torch.Tensor] = None,
        aligned_fine: Optional[torch.Tensor] = None,
        reference: Optional[torch.Tensor] = None,
        restored: Optional[torch.Tensor] = None,
        restored_target: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
        batch_slice: Optional[Tuple[int, int]] = None,
    ) -> Tuple[torch.Tensor, Dict[str, float]]:
        """Compute the weighted total and the unweighted components.

        Args:
            logits: (B, Ñ) degradation logits; degradation_target: (B,) class ids or (B, Ñ) probabilities.
            token_pairs: position-matched (B, N, M) token pairs of eq. (4), e.g.
                ``[(F̄_D, F̄_R), (F̄'_D, F̄'_R)]``; L_moda is the sum of :func:`loss_moda` over them.
            displacement, displacement_gt: (B, 3, D, H, W) predicted / ground-truth fields (voxels, x, y, z).
            fused, aligned_fine, reference: (B, 1, D, H, W) volumes of :func:`loss_rf`.
            restored, restored_target: (B, 1, D, H, W) volumes of :func:`loss_restore`.
            generator: CPU generator for L_moda's negative sampling.
            batch_slice: ``(offset, global_batch)`` of these items in a batch split across processes
                (see :func:`loss_moda`); None = the whole batch is here.

        Returns:
            ``(total, components)``: ``total`` is a scalar tensor to back-propagate; ``components`` maps
            ``"ce"``, ``"moda"``, ``"reg"``, ``"smooth"``, ``"rf"``, ``"rf_ssim"``, ``"rf_inten"``,
            ``"rf_grad"``, ``"restore"`` (those computed) and ``"total"`` to floats for logging.
        """
        w = self.weights
        terms: Dict[str, torch.Tensor] = {}
        weighted = []

        def need(name: str, **inputs: Optional[object]) -> None:
            missing = [k for k, v in inputs.items() if v is None]
            if missing:
                raise ValueError(f"loss term {name} has weight > 0 but {', '.join(missing)} not given; pass it or set its weight to 0")

        if w.ce > 0:
            need("ce", logits=logits, degradation_target=degradation_target)
            terms["ce"] = loss_ce(logits, degradation_target)
            weighted.append(w.ce * terms["ce"])
        if w.moda > 0:
            need("moda", token_pairs=token_pairs)
            if len(token_pairs) == 0:
                raise ValueError("loss term moda has weight > 0 but token_pairs is empty")
            terms["moda"] = sum(
                loss_moda(ta, tb, tau=w.tau, num_negatives=w.num_negatives, generator=generator, batch_slice=batch_slice)
                for ta, tb in token_pairs
            )
            weighted.append(w.moda * terms["moda"])
        if w.reg > 0:
            need("reg", displacement=displacement, displacement_gt=displacement_gt)
            terms["reg"] = loss_reg(displacement, displacement_gt)
            weighted.append(w.reg * terms["reg"])
        if w.smooth > 0:
            need("smooth", displacement=displacement)
            terms["smooth"] = loss_smooth(displacement)
            weighted.append(w.smooth * terms["smooth"])
        if w.rf > 0:
            need("rf", fused=fused, aligned_fine=aligned_fine, reference=reference)
            rf_terms = loss_rf_terms(fused, aligned_fine, reference, inten_target=w.inten_target)
            terms["rf"] = rf_terms["ssim"] + rf_terms["inten"] + rf_terms["grad"]
            for key, value in rf_terms.items():
                terms[f"rf_{key}"] = value
            weighted.append(w.rf * terms["rf"])
        if w.restore > 0:
            need("restore", restored=restored, restored_target=restored_target)
            terms["restore"] = loss_restore(restored, restored_target)
            weighted.append(w.restore * terms["restore"])
        if not weighted:
            raise ValueError("every loss weight is 0; enable at least one term in LossWeights")
        total = sum(weighted[1:], weighted[0])
        components = {k: float(v.detach()) for k, v in terms.items()}
        components["total"] = float(total.detach())
        return total, components
