"""Tests of the degradation-statistics branch of DAPL (unifuse.model.degradation_stats)."""

from __future__ import annotations

import math

import pytest
import torch

from unifuse.config import ModelConfig, get_config
from unifuse.model import build_model
from unifuse.model.degradation_stats import NUM_STATISTICS, DegradationStatistics, volume_statistics

# indices of volume_statistics' columns (module docstring order)
FG_RESIDUAL, FG_MEAN, BG_RESIDUAL, ALL_MEAN = 0, 1, 3, 7
RADIAL_HIGHEST = 16
Y_HIGH, X_HIGH = 18, 20


def _head(size: int = 24) -> torch.Tensor:
    """A smooth ellipsoid 'head' (1, 1, S, S, S) in [0, 1] with an empty background."""
    z, y, x = torch.meshgrid(*(torch.linspace(-1, 1, size),) * 3, indexing="ij")
    r = (z / 0.7) ** 2 + (y / 0.8) ** 2 + (x / 0.75) ** 2
    return (0.8 * torch.clamp(1.0 - r, min=0.0) ** 0.5)[None, None]


def test_statistics_shape_dtype_and_batch_independence():
    head = _head()
    batch = torch.cat([head, torch.rand_like(head)], dim=0)
    stats = volume_statistics(batch)
    assert stats.shape == (2, NUM_STATISTICS) and stats.dtype == torch.float32
    assert torch.isfinite(stats).all()
    assert torch.allclose(stats[:1], volume_statistics(head), atol=1e-5)  # row i depends on volume i only


def test_constant_volume_has_no_residual_energy_and_the_known_mean():
    stats = volume_statistics(torch.full((1, 1, 16, 16, 16), 0.5))
    assert stats[0, FG_RESIDUAL] == pytest.approx(math.log(1e-8), abs=1e-3)  # r = x − local mean = 0
    assert stats[0, FG_MEAN] == pytest.approx(math.log(0.5), abs=1e-5)
    assert stats[0, ALL_MEAN] == pytest.approx(math.log(0.5), abs=1e-5)
    assert stats[0, RADIAL_HIGHEST] == pytest.approx(math.log(1e-8), abs=1e-3)  # all power at f = 0


def test_noise_raises_high_frequency_statistics():
    torch.manual_seed(0)
    head = _head()
    noisy = (head + 0.03 * torch.randn_like(head)).clamp(0, 1)
    clean, degraded = volume_statistics(head)[0], volume_statistics(noisy)[0]
    assert degraded[FG_RESIDUAL] > clean[FG_RESIDUAL]  # inside the head the edges dominate the residual
    assert degraded[BG_RESIDUAL] > clean[BG_RESIDUAL] + 1.0  # noise around the head: e ≈ 6× the energy
    assert degraded[RADIAL_HIGHEST] > clean[RADIAL_HIGHEST] + 0.5


def test_ghosting_along_y_shows_in_the_y_phase_encode_band_only():
    head = _head()
    y = torch.arange(head.shape[3], dtype=torch.float32).view(1, 1, 1, -1, 1)
    ghosted = head * (1.0 + 0.3 * torch.cos(math.pi * y))  # modulation at 0.5 cycles/voxel along y
    before, after = volume_statistics(head)[0], volume_statistics(ghosted)[0]
    assert after[Y_HIGH] - before[Y_HIGH] > 1.0
    assert abs(after[X_HIGH] - before[X_HIGH]) < 0.2


def test_branch_starts_neutral_and_calibration_standardises():
    torch.manual_seed(0)
    branch = DegradationStatistics(num_classes=4, hidden=8)
    volumes = [(_head() + s * torch.randn_like(_head())).clamp(0, 1) for s in (0.0, 0.01, 0.02, 0.05)]
    assert torch.equal(branch(volumes[1]), torch.zeros(1, 4))  # zero-initialised last layer
    assert not bool(branch.calibrated)
    assert branch.calibrate(volumes) == 4
    standardised = (torch.cat([volume_statistics(v) for v in volumes]) - branch.mean) / branch.std
    assert bool(branch.calibrated)
    varying = branch.std > 1e-3
    assert torch.allclose(standardised.mean(0), torch.zeros(NUM_STATISTICS), atol=1e-4)
    assert torch.allclose(standardised[:, varying].std(0), torch.ones(int(varying.sum())), atol=1e-4)
    with pytest.raises(ValueError, match="at least 2"):
        branch.calibrate([volumes[0]])


def test_model_with_the_branch_needs_the_moving_volume_and_old_configs_lack_it():
    cfg = get_config("tiny")
    assert cfg.degradation_stats and all(get_config(n).degradation_stats for n in ("default", "cpu", "paper"))
    model = build_model(cfg).eval()
    x = torch.rand(1, 1, 16, 16, 16)
    feats = model.encoder(x)
    with pytest.raises(ValueError, match="moving"):
        model.dapl(feats, feats)
    old = cfg.to_dict()
    del old["degradation_stats"]  # a config saved before the option existed
    old_cfg = ModelConfig.from_dict(old)
    assert old_cfg.degradation_stats is False
    old_model = build_model(old_cfg)
    assert old_model.dapl.stats is None and not any(k.startswith("dapl.stats.") for k in old_model.state_dict())
    assert old_model(x, x).logits.shape == (1, cfg.num_degradations)


def test_the_branch_trains_a_separable_problem():
    """A few hundred steps on noisy vs clean heads: the branch alone learns to tell them apart."""
    torch.manual_seed(0)
    branch = DegradationStatistics(num_classes=2, hidden=16)
    head = _head(16)

    def batch(n: int):
        labels = torch.randint(0, 2, (n,))
        sigma = 0.02 + 0.03 * torch.rand(n)
        vols = torch.cat([(head + labels[i] * sigma[i] * torch.randn_like(head)).clamp(0, 1) for i in range(n)])
        return vols, labels

    branch.calibrate([batch(8)[0]])
    opt = torch.optim.Adam(branch.parameters(), lr=1e-2)
    for _ in range(150):
        vols, labels = batch(8)
        loss = torch.nn.functional.cross_entropy(branch(vols), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    vols, labels = batch(64)
    assert (branch(vols).argmax(1) == labels).float().mean() > 0.95
