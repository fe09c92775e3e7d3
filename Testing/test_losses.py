"""Tests of unifuse.train.losses: known answers, agreement with the numpy metrics, differentiability."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unifuse import metrics
from unifuse.errors import InputImageError
from unifuse.train import losses
from unifuse.train.losses import LossWeights, UniFuseLoss


def rand_volume(shape=(2, 1, 16, 16, 16), seed=0, dtype=torch.float32) -> torch.Tensor:
    """Smooth random volume in [0, 1] (average-pooled noise)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.rand(shape, generator=g, dtype=dtype)
    v = F.avg_pool3d(v, 3, stride=1, padding=1, count_include_pad=False)
    return (v - v.amin()) / (v.amax() - v.amin())


# ------------------------------------------------------------------------------------------------ SSIM
def test_ssim_loss_of_identical_volumes_is_zero():
    x = rand_volume()
    assert float(losses.ssim_loss(x, x)) == pytest.approx(0.0, abs=1e-6)


def test_ssim3d_torch_equals_numpy_metric_per_item():
    x = rand_volume((2, 1, 18, 16, 20), seed=1, dtype=torch.float64)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = (x + 0.1 * noise).clamp(0, 1)
    s = losses.ssim3d_torch(x, y)
    assert s.shape == (2,)
    for i in range(2):
        assert float(s[i]) == pytest.approx(metrics.ssim3d(x[i, 0].numpy(), y[i, 0].numpy()), abs=1e-10)
    assert float(losses.ssim_loss(x, y)) == pytest.approx(1.0 - float(s.mean()), abs=1e-12)
    # small volume: the truncated window matches the metric's truncation too
    xs, ys = x[..., :8, :9, :7], y[..., :8, :9, :7]
    assert float(losses.ssim3d_torch(xs, ys)[0]) == pytest.approx(metrics.ssim3d(xs[0, 0].numpy(), ys[0, 0].numpy()), abs=1e-10)


# ------------------------------------------------------------------------------------------- gradient
def test_gradient_of_a_linear_ramp_is_constant():
    d, h, w = 6, 7, 8
    z, y, x = torch.meshgrid(torch.arange(d), torch.arange(h), torch.arange(w), indexing="ij")
    ramp = (0.5 * x - 0.25 * y + 2.0 * z).double()[None, None]
    g = losses.gradient3d(ramp)
    assert g.shape == (1, 3, d, h, w)
    for channel, slope in enumerate((0.5, -0.25, 2.0)):  # channels (d/dx, d/dy, d/dz)
        torch.testing.assert_close(g[0, channel], torch.full((d, h, w), slope, dtype=torch.float64))


def test_gradient_channel_layout_for_multichannel_input():
    d = 5
    z, y, x = torch.meshgrid(torch.arange(d), torch.arange(d), torch.arange(d), indexing="ij")
    two = torch.stack((x.double(), 3.0 * z.double()))[None]  # channel 0 = x ramp, channel 1 = 3 z
    g = losses.gradient3d(two)
    assert g.shape == (1, 6, d, d, d)
    expected = [1.0, 0.0, 0.0, 0.0, 0.0, 3.0]
    for c, value in enumerate(expected):
        assert torch.allclose(g[0, c], torch.full((d, d, d), value, dtype=torch.float64))


# ---------------------------------------------------------------------------------- L_reg, L_smooth
def test_loss_reg_known_values():
    g = torch.Generator().manual_seed(3)
    u = torch.randn(2, 3, 6, 6, 6, generator=g)
    assert float(losses.loss_reg(u, u)) == 0.0
    c = 0.7
    assert float(losses.loss_reg(u + c, u)) == pytest.approx(c * c, rel=1e-5)
    with pytest.raises(InputImageError, match=r"\(B, 3, D, H, W\)"):
        losses.loss_reg(u[:, :2], u[:, :2])


def test_loss_smooth_known_values():
    const = torch.full((1, 3, 6, 6, 6), 2.5)
    assert float(losses.loss_smooth(const)) == 0.0
    # u_x = a * x: one of the nine derivatives equals a everywhere -> a² / 9
    a = 0.3
    x = torch.arange(6, dtype=torch.float64).view(1, 1, 6).expand(6, 6, 6)
    u = torch.zeros(1, 3, 6, 6, 6, dtype=torch.float64)
    u[0, 0] = a * x
    assert float(losses.loss_smooth(u)) == pytest.approx(a * a / 9, rel=1e-12)


def test_loss_smooth_relates_to_monai_diffusion_loss():
    losses_monai = pytest.importorskip("monai.losses")  # test extra: MONAI's diffusion regulariser
    u = torch.randn(2, 3, 7, 8, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    interior = 3.0 * torch.mean(losses.gradient3d(u)[..., 1:-1, 1:-1, 1:-1] ** 2)
    assert float(losses_monai.DiffusionLoss()(u)) == pytest.approx(float(interior), rel=1e-12)


def test_ssim3d_torch_equals_monai_ssim_metric():
    metrics_monai = pytest.importorskip("monai.metrics")  # test extra: MONAI's SSIM (float32)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 2, 14, 15, 16, dtype=torch.float64, generator=gen)
    y = (x + 0.2 * torch.rand(x.shape, dtype=torch.float64, generator=gen)).clamp(0, 1)
    theirs = metrics_monai.SSIMMetric(spatial_dims=3, data_range=1.0, kernel_type="gaussian", win_size=11,
                                      kernel_sigma=1.5, k1=0.01, k2=0.03)(x, y).flatten().double()
    torch.testing.assert_close(losses.ssim3d_torch(x, y), theirs, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ L_ce
def test_loss_ce_matches_torch_cross_entropy():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 4, generator=g)
    target = torch.tensor([0, 3, 1, 2, 3])
    assert torch.allclose(losses.loss_ce(logits, target), F.cross_entropy(logits, target))
    probs = torch.softmax(torch.randn(5, 4, generator=g), dim=1)
    assert torch.allclose(losses.loss_ce(logits, probs), F.cross_entropy(logits, probs))
    # hand value: uniform logits over 4 classes -> log 4
    assert float(losses.loss_ce(torch.zeros(2, 4), torch.tensor([1, 2]))) == pytest.approx(math.log(4), rel=1e-6)
    with pytest.raises(ValueError, match=r"class ids must lie in \[0, 3\]"):
        losses.loss_ce(logits, torch.tensor([0, 4, 1, 2, 3]))


# ---------------------------------------------------------------------------------------------- L_moda
def test_loss_moda_prefers_matched_tokens_and_is_deterministic():
    g = torch.Generator().manual_seed(5)
    tokens = torch.randn(2, 64, 16, generator=g)
    same = losses.loss_moda(tokens, tokens.clone(), tau=0.1, num_negatives=8, generator=torch.Generator().manual_seed(0))
    perm = torch.randperm(64, generator=g)
    shuffled = losses.loss_moda(tokens, tokens[:, perm], tau=0.1, num_negatives=8, generator=torch.Generator().manual_seed(0))
    assert float(same) < float(shuffled)
    again = losses.loss_moda(tokens, tokens.clone(), tau=0.1, num_negatives=8, generator=torch.Generator().manual_seed(0))
    assert float(same) == float(again)


def test_loss_moda_hand_value_with_orthogonal_tokens():
    # one-hot tokens: sim(positive) = 1, sim(negative) = 0 at every other position, so with K negatives
    # L = -log(e^{1/τ} / (e^{1/τ} + K)) exactly, whichever negatives are drawn
    n, k, tau = 8, 5, 0.5
    tokens = torch.eye(n, dtype=torch.float64)[None]
    value = losses.loss_moda(tokens, tokens, tau=tau, num_negatives=k, generator=torch.Generator().manual_seed(1))
    expected = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + k))
    assert float(value) == pytest.approx(expected, rel=1e-12)
    # negatives never hit the anchor's own position: if they did, some terms would have sim = 1
    many = losses.loss_moda(tokens, tokens, tau=tau, num_negatives=200, generator=torch.Generator().manual_seed(2))
    assert float(many) == pytest.approx(-math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 200)), rel=1e-12)


# ------------------------------------------------------------------------------------------------ L_rf
def test_loss_rf_of_max_fusion_has_zero_intensity_term():
    a = rand_volume(seed=6)
    r = rand_volume(seed=7)
    terms = losses.loss_rf_terms(torch.maximum(a, r), a, r)
    assert float(terms["inten"]) == 0.0
    assert float(terms["ssim"]) > 0.0
    assert float(losses.loss_rf(torch.maximum(a, r), a, r)) == pytest.approx(
        float(terms["ssim"] + terms["inten"] + terms["grad"]), rel=1e-6
    )


def test_loss_rf_mean_intensity_target_is_zero_for_average_fusion():
    a = rand_volume(seed=6)
    r = rand_volume(seed=7)
    mean = losses.loss_rf_terms(0.5 * (a + r), a, r, inten_target="mean")
    assert float(mean["inten"]) == pytest.approx(0.0, abs=1e-7)
    paper = losses.loss_rf_terms(0.5 * (a + r), a, r)  # the paper's max target: |avg − max| = |a − r| / 2
    assert float(paper["inten"]) == pytest.approx(float(torch.mean(torch.abs(a - r))) / 2, rel=1e-5)
    assert float(mean["ssim"]) == float(paper["ssim"]) and float(mean["grad"]) == float(paper["grad"])
    with pytest.raises(ValueError, match="inten_target"):
        losses.loss_rf_terms(a, a, r, inten_target="median")
    with pytest.raises(ValueError, match="inten_target"):
        losses.LossWeights(inten_target="min")
    fn = losses.UniFuseLoss(losses.LossWeights(ce=0, moda=0, reg=0, smooth=0, inten_target="mean"))
    _, parts = fn(fused=0.5 * (a + r), aligned_fine=a, reference=r)
    assert parts["rf_inten"] == pytest.approx(0.0, abs=1e-7)


def test_loss_rf_gradient_term_uses_magnitudes():
    # F = -A has |∇F| = |∇A|; with R constant the gradient term is zero although ∇F = -∇A
    a = rand_volume(seed=8)
    r = torch.full_like(a, 0.5)
    assert float(losses.loss_rf_terms(-a, a, r)["grad"]) == pytest.approx(0.0, abs=1e-7)
    assert float(losses.loss_rf_terms(torch.zeros_like(a), a, r)["grad"]) > 0.0


def test_loss_rf_is_zero_only_for_a_perfect_fusion_of_identical_sources():
    a = rand_volume(seed=9)
    terms = losses.loss_rf_terms(a, a, a)
    assert all(float(v) == pytest.approx(0.0, abs=1e-6) for v in terms.values())


# -------------------------------------------------------------------------------------------- combined
def _inputs(requires_grad: bool = True):
    g = torch.Generator().manual_seed(10)
    fused = torch.rand(2, 1, 16, 16, 16, generator=g).requires_grad_(requires_grad)
    disp = (0.5 * torch.randn(2, 3, 16, 16, 16, generator=g)).requires_grad_(requires_grad)
    logits = torch.randn(2, 4, generator=g).requires_grad_(requires_grad)
    tokens = torch.randn(2, 64, 16, generator=g).requires_grad_(requires_grad)
    return dict(
        logits=logits,
        degradation_target=torch.tensor([1, 3]),
        token_pairs=[(tokens, torch.randn(2, 64, 16, generator=g)), (torch.randn(2, 64, 16, generator=g), tokens)],
        displacement=disp,
        displacement_gt=torch.randn(2, 3, 16, 16, 16, generator=g),
        fused=fused,
        aligned_fine=rand_volume(seed=11),
        reference=rand_volume(seed=12),
    )


def test_unifuse_loss_combines_weighted_terms_and_backpropagates():
    inputs = _inputs()
    weights = LossWeights(ce=1.0, moda=0.5, reg=2.0, rf=1.0, smooth=0.1, num_negatives=8)
    total, parts = UniFuseLoss(weights)(generator=torch.Generator().manual_seed(0), **inputs)
    expected = parts["ce"] + 0.5 * parts["moda"] + 2.0 * parts["reg"] + parts["rf"] + 0.1 * parts["smooth"]
    assert parts["total"] == pytest.approx(expected, rel=1e-6)
    assert parts["rf"] == pytest.approx(parts["rf_ssim"] + parts["rf_inten"] + parts["rf_grad"], rel=1e-6)
    gen = torch.Generator().manual_seed(0)  # one generator consumed pair after pair, as inside the loss
    with torch.no_grad():
        moda = sum(float(losses.loss_moda(a, b, num_negatives=8, generator=gen)) for a, b in inputs["token_pairs"])
    assert parts["moda"] == pytest.approx(moda, rel=1e-6)  # sum over the two pairs of eq. (4)
    total.backward()
    for name in ("fused", "displacement", "logits"):
        grad = inputs[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    assert torch.isfinite(inputs["token_pairs"][0][0].grad).all()


def test_unifuse_loss_skips_zero_weight_terms_and_names_missing_inputs():
    inputs = _inputs(requires_grad=False)
    rf_only = LossWeights(ce=0, moda=0, reg=0, smooth=0, rf=1)
    total, parts = UniFuseLoss(rf_only)(fused=inputs["fused"], aligned_fine=inputs["aligned_fine"], reference=inputs["reference"])
    assert set(parts) == {"rf", "rf_ssim", "rf_inten", "rf_grad", "total"}
    assert float(total) == pytest.approx(parts["rf"])
    with pytest.raises(ValueError, match="displacement_gt"):
        UniFuseLoss(LossWeights(ce=0, moda=0, rf=0, smooth=0))(displacement=inputs["displacement"])
    with pytest.raises(ValueError, match="must be a finite number"):
        LossWeights(reg=-1.0)


def test_ssim_loss_gradient_is_finite_on_flat_volumes():
    x = torch.full((1, 1, 12, 12, 12), 0.4, requires_grad=True)
    y = torch.full((1, 1, 12, 12, 12), 0.4)
    losses.ssim_loss(x, y).backward()
    assert torch.isfinite(x.grad).all()
