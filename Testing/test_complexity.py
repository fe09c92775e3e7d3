"""Tests of unifuse.model.complexity: parameter counts per module and meta-device FLOP counting."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from unifuse.config import default, paper, tiny
from unifuse.model import build_model
from unifuse.model.complexity import MODULES, flop_report, format_info, forward_flops, parameter_counts
from unifuse.model.mamba import SCAN_FLOPS_PER_ELEMENT, SCAN_INJECT_FLOPS_PER_ELEMENT


pytestmark = pytest.mark.usefixtures("single_thread")


def test_parameter_counts_cover_the_whole_model():
    torch.manual_seed(0)
    model = build_model(tiny())
    counts = parameter_counts(model)
    assert list(counts) == [*MODULES, "total"]
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert sum(counts[name] for name in MODULES) == counts["total"]  # nothing outside the five modules
    assert all(counts[name] > 0 for name in MODULES)
    # the shared encoder: conv 1 -> C and conv C -> C, 3×3×3, with biases
    c = tiny().enc_channels
    assert counts["encoder"] == (27 * c + c) + (27 * c * c + c)


def test_configs_grow_in_size():
    with torch.device("meta"):
        sizes = [parameter_counts(build_model(cfg))["total"] for cfg in (tiny(), default(), paper())]
    assert sizes[0] < sizes[1] < sizes[2]


def test_encoder_flops_match_the_hand_count():
    cfg, s = tiny(), 16
    report = flop_report(cfg, s)
    c = cfg.enc_channels
    per_volume = 2 * 27 * (1 * c + c * c) * s**3  # 2 FLOPs per multiply-accumulate
    assert report.per_module["encoder"] == 2 * per_volume  # reference and moving


def test_scan_flops_are_counted_analytically():
    cfg, s = tiny(), 16
    report = flop_report(cfg, s)
    n = (s // cfg.patch_size) ** 3
    elements = cfg.expand * cfg.embed_dim * cfg.d_state
    dapl = 4 * n * elements * SCAN_FLOPS_PER_ELEMENT  # block 1 once, block 2 on three orders
    oufr = 3 * 2 * n * elements * (SCAN_FLOPS_PER_ELEMENT + SCAN_INJECT_FLOPS_PER_ELEMENT)  # 3 blocks on 2N tokens
    assert report.scan == dapl + oufr
    assert report.total == report.counted + report.scan
    assert report.per_module["dapl"] > dapl and report.per_module["oufr"] > oufr


def test_meta_count_equals_a_real_cpu_count():
    cfg, s = tiny(), 16
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.rand(1, 1, s, s, s), torch.rand(1, 1, s, s, s))
    assert flop_report(cfg, s).counted == counter.get_total_flops()


def test_flops_scale_with_the_volume():
    small, large = forward_flops(tiny(), 16), forward_flops(tiny(), 32)
    assert 6.0 < large / small < 9.0  # O(S³) everywhere except the fixed-size prompt MLPs


def test_paper_config_at_256_is_counted_without_allocating():
    cfg, s = paper(), 256
    report = flop_report(cfg, s)  # counted on the meta device: 256³ at paper widths would not fit in memory
    c = cfg.enc_channels
    assert report.per_module["encoder"] == 2 * 2 * 27 * (1 * c + c * c) * s**3  # the hand count, as at 16³
    assert set(report.per_module) == set(MODULES)
    assert sum(report.per_module.values()) == report.total == report.counted + report.scan
    # every selective scan runs over the (S / patch)³ tokens: its work grows exactly with S³
    assert report.scan == 8 * flop_report(cfg, s // 2).scan


def test_bad_size_raises():
    with pytest.raises(ValueError, match="multiple"):
        flop_report(default(), 100)


def test_format_info_lists_modules_and_sizes():
    text = format_info(tiny())
    for name in MODULES:
        assert name in text
    assert "160³" in text and "256³" in text and "GFLOPs" in text
    total = parameter_counts(build_model(tiny()))["total"]
    assert f"{total:,}" in text
