"""Tests of the UniFuse 3D network (unifuse.model) on the ``tiny`` config, 16³–32³ volumes.

Covers the output contract (docs/architecture.md), value ranges, the untrained identity field, the degradation
override, determinism, input validation, the pieces whose behaviour the paper fixes (token orders, state
restoration, LoRA mixing, local correlation, field integration) and a short real optimisation.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from unifuse.config import DEGRADATION_CLASSES, ModelConfig, default, paper, tiny
from unifuse.errors import InputImageError
from unifuse.model import UniFuse, UniFuseOutput, build_model
from unifuse.model.alignment import FeatureAlignment, integrate_velocity, local_correlation, regblk_schedule
from unifuse.model.dapl import bidirectional_order
from unifuse.model.fusion import LoRABranches
from unifuse.spatial import identity_grid, jacobian_determinant, warp

N_CLASSES = len(DEGRADATION_CLASSES)


pytestmark = pytest.mark.usefixtures("single_thread")


def make_model(seed: int = 0, cfg: ModelConfig = None) -> UniFuse:
    torch.manual_seed(seed)
    return build_model(cfg or tiny()).eval()


def pair(size=16, batch=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, 1, size, size, size) if isinstance(size, int) else (batch, 1, *size)
    return torch.rand(shape, generator=gen), torch.rand(shape, generator=gen)


def perturb_zero_initialised(model: UniFuse, seed: int = 0, scale: float = 0.3) -> None:
    """Give every parameter a random offset, as training would: the zero-initialised layers (field head,
    FiLM, prompt matrices, LoRA up-projections) otherwise hide the paths they gate."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            spread = float(p.std()) if p.numel() > 1 and float(p.std()) > 0 else 1.0
            p.add_(torch.randn(p.shape, generator=gen) * scale * spread)


# ------------------------------------------------------------------------------------------- contract
@pytest.mark.parametrize("size, batch", [(16, 1), (16, 2), (32, 2), (20, 1)])
def test_output_contract(size, batch):
    cfg = tiny()
    model = make_model()
    reference, moving = pair(size, batch)
    with torch.no_grad():
        out = model(reference, moving)
    assert isinstance(out, UniFuseOutput)
    n_tokens = (size // cfg.patch_size) ** 3
    expected = {
        "fused": (batch, 1, size, size, size),
        "displacement": (batch, 3, size, size, size),
        "aligned": (batch, 1, size, size, size),
        "logits": (batch, N_CLASSES),
        "probs": (batch, N_CLASSES),
        "prompt": (batch, N_CLASSES, cfg.prompt_len, cfg.embed_dim),
        "tokens_ref": (batch, n_tokens, cfg.embed_dim),
        "tokens_mov": (batch, n_tokens, cfg.embed_dim),
    }
    for name, shape in expected.items():
        value = getattr(out, name)
        assert tuple(value.shape) == shape, name
        assert value.dtype == torch.float32, name
        assert torch.isfinite(value).all(), name
    assert len(out.dapl_states) == 3
    assert all(tuple(h.shape) == (batch, n_tokens, cfg.embed_dim) for h in out.dapl_states)
    assert out.fused.min() >= 0 and out.fused.max() <= 1
    torch.testing.assert_close(out.probs.sum(dim=1), torch.ones(batch))
    torch.testing.assert_close(out.probs, torch.softmax(out.logits, dim=1))


def test_untrained_model_predicts_exactly_the_identity_field():
    model = make_model()
    reference, moving = pair(16, 2)
    with torch.no_grad():
        out = model(reference, moving)
    assert torch.equal(out.displacement, torch.zeros_like(out.displacement))
    torch.testing.assert_close(out.aligned, moving, atol=1e-5, rtol=0)  # trilinear sampling at the voxels


def test_aligned_is_the_moving_volume_warped_by_the_displacement():
    model = make_model()
    perturb_zero_initialised(model, scale=1.0)
    reference, moving = pair(16, 2)
    with torch.no_grad():
        out = model(reference, moving)
    assert out.displacement.abs().max() > 0.05
    torch.testing.assert_close(out.aligned, warp(moving, out.displacement))


@pytest.mark.parametrize("steps", [0, 4])
def test_field_is_bounded_by_max_displacement(steps):
    cfg = tiny().replace(integration_steps=steps, max_displacement=0.1)
    model = make_model(cfg=cfg)
    with torch.no_grad():
        model.fa.head_out.weight.normal_(0, 50.0)  # saturate the tanh
        model.fa.head_out.bias.fill_(20.0)
        out = model(*pair(16, 1))
    bound = 0.1 * 16
    assert out.displacement.abs().max() <= bound + 1e-4
    assert out.displacement.abs().max() > 0.9 * bound  # the bound is reached, not just respected


def test_fused_stays_in_unit_range_for_extreme_inputs():
    model = make_model()
    perturb_zero_initialised(model, scale=1.0)
    reference = torch.full((1, 1, 16, 16, 16), 50.0)
    moving = -torch.full((1, 1, 16, 16, 16), 50.0)
    with torch.no_grad():
        out = model(reference, moving)
    assert out.fused.min() >= 0 and out.fused.max() <= 1


def test_sizes_other_than_the_working_size_and_non_cubic_grids():
    model = make_model()
    reference, moving = pair((16, 20, 24), 1)
    with torch.no_grad():
        out = model(reference, moving)
    assert out.fused.shape == (1, 1, 16, 20, 24)
    assert out.displacement.shape == (1, 3, 16, 20, 24)
    assert out.tokens_ref.shape[1] == 4 * 5 * 6


# ------------------------------------------------------------------------------------------- degradation override
def test_degradation_override_changes_the_outputs_and_none_uses_the_classifier():
    model = make_model()
    perturb_zero_initialised(model, seed=3)
    reference, moving = pair(16, 2, seed=1)
    with torch.no_grad():
        auto = model(reference, moving)
        same = model(reference, moving, degradation=auto.probs)
        motion = model(reference, moving, degradation=torch.tensor([1, 1]))
        metal = model(reference, moving, degradation=torch.tensor([2, 2]))
        metal_probs = model(reference, moving, degradation=F.one_hot(torch.tensor([2, 2]), N_CLASSES).float())
        as_int = model(reference, moving, degradation=2)
    torch.testing.assert_close(same.fused, auto.fused)
    torch.testing.assert_close(same.displacement, auto.displacement)
    # the override replaces p in the prompt weighting (FA) and in the LoRA mixing (UFR&F)
    assert (motion.fused - metal.fused).abs().max() > 1e-4
    assert (motion.displacement - metal.displacement).abs().max() > 1e-4
    torch.testing.assert_close(metal_probs.fused, metal.fused)
    torch.testing.assert_close(as_int.fused, metal.fused)
    # the diagnosis itself is always the classifier's
    torch.testing.assert_close(motion.probs, auto.probs)


@pytest.mark.parametrize(
    "degradation, match",
    [
        (torch.tensor([0, 7]), "class ids"),
        (torch.tensor([1]), "shape"),
        (torch.tensor([[0.5, 0.5, 0.5, 0.5]] * 2), "sum to 1"),
        (torch.tensor([[0.2, 0.8]] * 2), "shape"),
        ("motion", "degradation"),
    ],
)
def test_bad_degradation_raises(degradation, match):
    model = make_model()
    with pytest.raises(InputImageError, match=match):
        model(*pair(16, 2), degradation=degradation)


# ------------------------------------------------------------------------------------------- determinism, batch
def test_determinism_under_a_fixed_seed():
    reference, moving = pair(16, 1, seed=4)
    model_a, model_b = make_model(seed=7), make_model(seed=7)
    perturb_zero_initialised(model_a, seed=1)
    perturb_zero_initialised(model_b, seed=1)
    with torch.no_grad():
        out_a, out_b, out_a2 = model_a(reference, moving), model_b(reference, moving), model_a(reference, moving)
    for name in ("fused", "displacement", "logits", "prompt", "tokens_ref"):
        assert torch.equal(getattr(out_a, name), getattr(out_b, name)), name
        assert torch.equal(getattr(out_a, name), getattr(out_a2, name)), name
    different = make_model(seed=8)
    perturb_zero_initialised(different, seed=1)
    with torch.no_grad():
        assert not torch.allclose(different(reference, moving).fused, out_a.fused)


def test_batch_items_are_independent():
    model = make_model()
    perturb_zero_initialised(model)
    reference, moving = pair(16, 2, seed=5)
    with torch.no_grad():
        both = model(reference, moving)
        second = model(reference[1:], moving[1:])
    torch.testing.assert_close(both.fused[1:], second.fused, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(both.displacement[1:], second.displacement, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(both.probs[1:], second.probs, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "reference_shape, moving_shape, match",
    [
        ((1, 1, 18, 18, 18), (1, 1, 18, 18, 18), "multiple of 4"),
        ((1, 1, 16, 16, 18), (1, 1, 16, 16, 18), "multiple of 4"),
        ((1, 1, 16, 16, 16), (1, 1, 20, 20, 20), "differ"),
        ((1, 2, 16, 16, 16), (1, 2, 16, 16, 16), r"\(B, 1, S, S, S\)"),
        ((16, 16, 16), (16, 16, 16), r"\(B, 1, S, S, S\)"),
        ((2, 1, 16, 16, 16), (1, 1, 16, 16, 16), "differ"),
    ],
)
def test_wrong_inputs_raise_value_errors(reference_shape, moving_shape, match):
    model = make_model()
    with pytest.raises(ValueError, match=match) as info:
        model(torch.rand(reference_shape), torch.rand(moving_shape))
    assert isinstance(info.value, InputImageError)


def test_wrong_size_message_names_the_fix():
    model = make_model()
    with pytest.raises(InputImageError, match=r"resample the volumes to e\.g\. 20³"):
        model(torch.rand(1, 1, 18, 18, 18), torch.rand(1, 1, 18, 18, 18))


def test_integer_volumes_are_rejected():
    model = make_model()
    vol = torch.zeros(1, 1, 16, 16, 16, dtype=torch.int64)
    with pytest.raises(InputImageError, match="float32"):
        model(vol, vol)


def test_unusable_config_raises():
    with pytest.raises(ValueError, match="fa_stride"):
        build_model(tiny().replace(fa_stride=3))
    with pytest.raises(ValueError, match="max_displacement"):
        build_model(tiny().replace(max_displacement=0.0))


def test_config_round_trip_with_new_fields():
    for cfg in (tiny(), default(), paper()):
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert {"fa_stride", "corr_radius", "integration_steps", "fa_skips"} <= set(default().to_dict())


def test_checkpoint_configs_from_before_fa_skips_build_the_token_only_network():
    old = tiny().to_dict()
    del old["fa_skips"]  # a config saved before the option existed
    cfg = ModelConfig.from_dict(old)
    assert cfg.fa_skips is False
    model = build_model(cfg)
    assert len(model.fa.laterals) == 0 and model.fa.head_corr_proj is None
    width = model.fa.schedule[-1].out_channels
    assert model.fa.head[0].in_channels == 2 * width
    with torch.no_grad():
        out = model(*pair(16))
    assert out.displacement.shape == (1, 3, 16, 16, 16)


# ------------------------------------------------------------------------------------------- DAPL
def test_bidirectional_order_follows_the_paper_formula():
    # N = 10, ⌊N/2⌋ = 5: [f1, f2, f3, f4, f10, f9, f8, f7, f6, f5] (1-based)
    assert bidirectional_order(10).tolist() == [0, 1, 2, 3, 9, 8, 7, 6, 5, 4]
    assert bidirectional_order(7).tolist() == [0, 1, 6, 5, 4, 3, 2]
    for n in range(1, 40):
        assert sorted(bidirectional_order(n).tolist()) == list(range(n))


def test_dapl_states_are_restored_to_raster_token_order():
    """With the second Mamba block replaced by the identity, all three reorderings must restore to F_for."""
    model = make_model()
    model.dapl.mamba2 = torch.nn.Identity()
    reference, moving = pair(16, 2)
    with torch.no_grad():
        feat_mov, feat_ref = model.encoder(moving), model.encoder(reference)
        out = model.dapl(feat_mov, feat_ref, moving=moving)
        tokens, _ = model.dapl.patch(model.dapl.fuse(torch.cat([feat_mov, feat_ref], dim=1)))
        f_for = model.dapl.state_norm(model.dapl.mamba1(tokens))
    for h in out.states:
        torch.testing.assert_close(h, f_for)
    assert out.selection.min() > 0 and out.selection.max() < 1
    torch.testing.assert_close(out.prompt, model.dapl.prompts.unsqueeze(0) * out.selection)


def test_dapl_states_depend_on_the_scan_direction():
    model = make_model()
    with torch.no_grad():
        out = model(*pair(16, 1))
    h1, h2, h3 = out.dapl_states
    assert not torch.allclose(h1, h2) and not torch.allclose(h1, h3) and not torch.allclose(h2, h3)


# ------------------------------------------------------------------------------------------- OUFR
def test_encode_unified_reproduces_the_forward_tokens_and_uses_the_states():
    model = make_model()
    reference, moving = pair(16, 2, seed=2)
    with torch.no_grad():
        out = model(reference, moving)
        tok_mov, tok_ref = model.encode_unified(moving, reference, out.dapl_states)
        own_mov, _ = model.encode_unified(moving, reference)  # states from DAPL on the same pair
        other_mov, _ = model.encode_unified(moving, reference, [h.flip(1) for h in out.dapl_states])
    torch.testing.assert_close(tok_mov, out.tokens_mov)
    torch.testing.assert_close(tok_ref, out.tokens_ref)
    torch.testing.assert_close(own_mov, out.tokens_mov)
    assert (other_mov - out.tokens_mov).abs().max() > 1e-4  # the injected states matter


def test_encode_unified_rejects_mismatched_states():
    model = make_model()
    reference, moving = pair(16, 1)
    bad = [torch.zeros(1, 7, tiny().embed_dim)] * 3
    with pytest.raises(ValueError, match="h1"):
        model.encode_unified(moving, reference, bad)


# ------------------------------------------------------------------------------------------- FA pieces
def test_local_correlation_finds_a_known_shift():
    torch.manual_seed(0)
    f = torch.randn(1, 8, 10, 10, 10)
    shifted = torch.roll(f, shifts=1, dims=4)  # shifted(p) = f(p - e_x): f_ref(p) matches f_mov(p + e_x)
    corr = local_correlation(f, shifted, radius=1)
    assert corr.shape == (1, 27, 10, 10, 10)
    interior = corr[..., 1:-1, 1:-1, 1:-1]
    best = interior.argmax(dim=1)
    k = (0 + 1) * 9 + (0 + 1) * 3 + (1 + 1)  # offset (oz, oy, ox) = (0, 0, +1)
    assert (best == k).all()
    torch.testing.assert_close(interior[:, k], torch.ones_like(interior[:, k]))


def test_regblk_schedules_for_q4_and_q8():
    q4 = regblk_schedule(4, patch_size=4, fa_stride=2, embed_dim=64, corr_radius=2)
    assert [s.upsample for s in q4] == [False, False, False, True]
    assert [s.out_channels for s in q4] == [64, 64, 64, 32]
    assert [s.radius for s in q4] == [2, 1, 1, 1]
    q8 = regblk_schedule(4, patch_size=8, fa_stride=2, embed_dim=128, corr_radius=2)
    assert [s.upsample for s in q8] == [False, False, True, True]
    assert [s.out_channels for s in q8] == [128, 128, 64, 32]
    assert [s.level for s in q8] == [0, 0, 0, 1]
    full = regblk_schedule(2, patch_size=8, fa_stride=1, embed_dim=16, corr_radius=2)
    assert [s.upsample for s in full] == [True, True] and full[-1].out_channels == 8


def _fa(skip_channels: int) -> FeatureAlignment:
    torch.manual_seed(0)
    fa = FeatureAlignment(embed_dim=16, patch_size=4, num_blocks=2, fa_stride=1, corr_radius=1, num_classes=N_CLASSES,
                          prompt_len=2, max_displacement=0.25, integration_steps=2, skip_channels=skip_channels)
    perturb_zero_initialised(fa)
    return fa


def _fa_inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    tokens = [torch.randn(1, 64, 16, generator=gen) for _ in range(2)]  # 4³ token grid of a 16³ volume
    prompt, p = torch.randn(1, N_CLASSES, 2, 16, generator=gen), torch.full((1, N_CLASSES), 1.0 / N_CLASSES)
    return tokens, prompt, p


def test_fa_skips_feed_the_encoder_features_into_every_upsampled_level_and_the_head():
    fa = _fa(skip_channels=4)
    assert len(fa.laterals) == 2  # Q = 4 -> full resolution: two upsamplings
    assert fa.head[0].in_channels == 2 * fa.schedule[-1].out_channels + 27
    (t_d, t_r), prompt, p = _fa_inputs()
    gen = torch.Generator().manual_seed(1)
    skip_d, skip_r = torch.randn(1, 4, 16, 16, 16, generator=gen), torch.randn(1, 4, 16, 16, 16, generator=gen)
    with torch.no_grad():
        u = fa(t_d, t_r, (4, 4, 4), (16, 16, 16), prompt, p, skip_mov=skip_d, skip_ref=skip_r)
        # the same tokens with a voxel-level change inside one patch: the token-only path cannot see it
        skip_d2 = skip_d.clone()
        skip_d2[..., 5, 5, 5] += 3.0
        u2 = fa(t_d, t_r, (4, 4, 4), (16, 16, 16), prompt, p, skip_mov=skip_d2, skip_ref=skip_r)
    assert u.shape == (1, 3, 16, 16, 16)
    change = (u2 - u).abs().sum(dim=1)[0]
    assert float(change.max()) > 1e-4
    assert int(change.argmax()) in {z * 256 + y * 16 + x for z in range(3, 8) for y in range(3, 8) for x in range(3, 8)}
    with pytest.raises(ValueError, match="skip_mov and skip_ref"):
        fa(t_d, t_r, (4, 4, 4), (16, 16, 16), prompt, p)


def test_fa_without_skips_reads_the_tokens_alone():
    fa = _fa(skip_channels=0)
    (t_d, t_r), prompt, p = _fa_inputs()
    with torch.no_grad():
        u = fa(t_d, t_r, (4, 4, 4), (16, 16, 16), prompt, p)
        u_ignored = fa(t_d, t_r, (4, 4, 4), (16, 16, 16), prompt, p,
                       skip_mov=torch.ones(1, 4, 16, 16, 16), skip_ref=torch.zeros(1, 4, 16, 16, 16))
    torch.testing.assert_close(u, u_ignored, rtol=0, atol=0)


def test_integrate_velocity_of_a_constant_field_is_a_translation():
    v = torch.zeros(1, 3, 8, 8, 8)
    v[:, 0] = 0.6
    v[:, 2] = -0.3
    u = integrate_velocity(v, steps=5)
    torch.testing.assert_close(u, v, atol=1e-5, rtol=0)


@pytest.mark.parametrize("steps", [1, 4, 7])
def test_integrate_velocity_equals_monai_dvf2ddf_with_channels_reversed(steps):
    monai_blocks = pytest.importorskip("monai.networks.blocks")  # test extra: the oracle of scaling and squaring
    v = 3.0 * torch.randn(2, 3, 9, 11, 13, generator=torch.Generator().manual_seed(0))
    theirs = monai_blocks.DVF2DDF(num_steps=steps, mode="bilinear", padding_mode="border")(v.flip(1)).flip(1)
    torch.testing.assert_close(integrate_velocity(v, steps), theirs, atol=1e-4, rtol=0)


def test_integrated_smooth_field_does_not_fold():
    gen = torch.Generator().manual_seed(0)
    v = F.interpolate(torch.randn(1, 3, 4, 4, 4, generator=gen) * 2.0, size=(16, 16, 16), mode="trilinear",
                      align_corners=True)
    assert (jacobian_determinant(v) <= 0).float().mean() > 0.01  # used directly as a displacement, it folds
    assert (jacobian_determinant(integrate_velocity(v, steps=4)) > 0).all()


# ------------------------------------------------------------------------------------------- ALSN
def test_lora_branches_equal_the_explicit_sum_over_classes():
    torch.manual_seed(0)
    lora = LoRABranches(channels=6, num_classes=3, rank=2)
    torch.nn.init.normal_(lora.up.weight)
    x = torch.randn(2, 6, 5, 5, 5)
    p = torch.softmax(torch.randn(2, 3), dim=1)
    expected = torch.zeros_like(x)
    for j in range(3):
        down_j = F.conv3d(x, lora.down.weight[2 * j : 2 * j + 2], padding=1)
        up_j = F.conv3d(down_j, lora.up.weight[:, 2 * j : 2 * j + 2])
        expected += p[:, j, None, None, None, None] * up_j
    torch.testing.assert_close(lora(x, p), expected, atol=1e-5, rtol=1e-5)
    fresh = LoRABranches(channels=6, num_classes=3, rank=2)
    assert torch.equal(fresh(x, p), torch.zeros_like(x))  # B zero-initialised as in LoRA


# ------------------------------------------------------------------------------------------- training
def test_every_parameter_receives_a_gradient():
    model = make_model()
    perturb_zero_initialised(model)
    model.train()
    out = model(*pair(16, 2, seed=6))
    loss = out.fused.mean() + out.restored.mean() + out.displacement.square().mean() + out.logits.square().mean()
    loss = loss + out.tokens_ref.square().mean() + out.tokens_mov.square().mean()
    loss.backward()
    dead = [name for name, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert dead == []


def _blob(size: int, centre, sigma: float = 3.0) -> torch.Tensor:
    coords = identity_grid((size, size, size))[0]  # (3, S, S, S), channels (x, y, z)
    c = torch.tensor(centre, dtype=torch.float32).view(3, 1, 1, 1)
    return torch.exp(-((coords - c) ** 2).sum(0) / (2 * sigma**2))[None, None]


def test_a_short_optimisation_learns_a_known_translation():
    """40 AdamW steps on one pair: a blob and its copy moved by t = (2, -1, 1) voxels (x, y, z).

    moving(p) = reference(p - t), so the pull-back field must approach u = +t; the fused volume is trained
    towards the reference and the classifier towards class 2. Every loss term must drop clearly.
    """
    torch.manual_seed(0)
    size, shift = 16, (2.0, -1.0, 1.0)
    reference = _blob(size, (7.5, 7.5, 7.5))
    moving = _blob(size, tuple(7.5 + s for s in shift))
    label = torch.tensor([2])
    model = build_model(tiny()).train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def losses():
        out = model(reference, moving)
        return out, (F.mse_loss(out.aligned, reference), F.mse_loss(out.fused, reference),
                     F.cross_entropy(out.logits, label))

    with torch.no_grad():
        _, start = losses()
    for _ in range(40):
        _, parts = losses()
        optimiser.zero_grad()
        sum(parts).backward()
        optimiser.step()
    with torch.no_grad():
        out, end = losses()
    start_v = [float(v) for v in start]
    end_v = [float(v) for v in end]
    assert sum(end_v) < 0.5 * sum(start_v)
    assert end_v[0] < 0.3 * start_v[0], "alignment loss"
    assert end_v[1] < 0.5 * start_v[1], "fusion loss"
    assert end_v[2] < 0.5 * start_v[2], "classification loss"
    u_centre = out.displacement[0, :, 6:10, 6:10, 6:10].mean(dim=(1, 2, 3))
    assert torch.linalg.norm(u_centre - torch.tensor(shift)) < 0.8, u_centre


def test_a_shift_of_one_patch_is_exactly_one_token():
    """The token-map warp: a uniform field of Q voxels moves the token maps by exactly one token (issue 11:
    the old align_corners=True resize turned 8 voxels on a 32³ grid into 0.77 token)."""
    from unifuse.model.unifuse import field_to_token_grid
    from unifuse.spatial import warp

    q = 8
    u = torch.zeros(1, 3, 32, 32, 32)
    u[:, 0] = float(q)  # +8 voxels along x
    u_tokens = field_to_token_grid(u, q)
    assert u_tokens.shape == (1, 3, 4, 4, 4)
    assert torch.allclose(u_tokens[:, 0], torch.ones(1, 4, 4, 4)) and torch.all(u_tokens[:, 1:] == 0)
    tokens = torch.arange(4.0).view(1, 1, 1, 1, 4).expand(1, 1, 4, 4, 4)  # value = token index along x
    moved = warp(tokens, u_tokens)
    assert torch.allclose(moved[..., :3], tokens[..., 1:]), moved[0, 0, 0, 0]


def test_fusion_uses_the_field_it_is_given():
    """restore_and_fuse with an external field differs from the network's own field (the pipeline fuses with
    the final, guarded field), and forward() equals analyse + predict_field + restore_and_fuse."""
    torch.manual_seed(0)
    model = build_model(tiny()).eval()
    ref, mov = torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        out = model(ref, mov)
        a = model.analyse(ref, mov)
        p = model.resolve_degradation(None, a.dapl.probs)
        u = model.predict_field(a, p)
        assert torch.allclose(u, out.displacement, atol=1e-6)
        both = model.restore_and_fuse(a, u, p)
        assert torch.allclose(both[:, :1], out.fused, atol=1e-6) and torch.allclose(both[:, 1:], out.restored, atol=1e-6)
        shifted = model.restore_and_fuse(a, u + 2.0, p)[:, :1]
    assert not torch.allclose(shifted, out.fused, atol=1e-4)
