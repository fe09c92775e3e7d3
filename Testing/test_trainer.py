"""The UniFuse trainer, its configs, the held-out evaluation and the train/evaluate command line.

Everything runs the ``tiny`` network on 16³ synthetic cases on CPU. One module-scoped training run (40 steps)
is shared by the tests that only inspect its outputs.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from unifuse.errors import UniFuseError
from unifuse.train import configs
from unifuse.train.configs import TrainConfig, get_train_config
from unifuse.train.trainer import (
    STATE_FILE,
    TRAIN_COLUMNS,
    VAL_COLUMNS,
    EpochPermutationSampler,
    SOFT_MIX_MAX,
    Trainer,
    cosine_lr_factor,
    soft_class_weights,
)


def _tiny(**changes) -> TrainConfig:
    return configs.tiny().replace(**changes)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A complete 40-step tiny run; returns (trainer, result, out_dir)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("tiny_run")
    trainer = Trainer(_tiny(), out, device="cpu", log_stream=None)
    result = trainer.fit()
    return trainer, result, out


def _read_csv(path: Path):
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


# ------------------------------------------------------------------------------------------ training
def test_tiny_training_lowers_validation_loss(tiny_run):
    _, result, out = tiny_run
    _, rows = _read_csv(out / "val_log.csv")
    losses = {int(r["step"]): float(r["val_loss_total"]) for r in rows}
    assert 0 in losses and 40 in losses, "validation must run before training and at the last step"
    assert result.finished and result.step == 40
    # a clear margin, not noise: at least 15 % lower than the untrained network
    assert losses[40] < 0.85 * losses[0], losses
    assert result.best_val_loss == min(v for s, v in losses.items() if s > 0)
    # the two largest terms at initialisation both learn (40 tiny steps are too few for the field and the
    # classifier to move clearly; the shipped run's logs show those)
    first, last = rows[0], rows[-1]
    for term in ("val_loss_rf", "val_loss_moda"):
        assert float(last[term]) < 0.8 * float(first[term]), term


def test_log_files_have_expected_columns(tiny_run):
    _, _, out = tiny_run
    header, rows = _read_csv(out / "train_log.csv")
    assert tuple(header) == TRAIN_COLUMNS
    assert [int(r["step"]) for r in rows] == list(range(1, 41))
    for r in rows:
        for c in ("loss_total", "loss_ce", "loss_moda", "loss_reg", "loss_smooth", "loss_rf", "lr", "grad_norm"):
            assert math.isfinite(float(r[c])), (c, r)
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] == pytest.approx(configs.tiny().lr) and lrs[-1] < lrs[0] / 10  # cosine decay
    header, rows = _read_csv(out / "val_log.csv")
    assert tuple(header) == VAL_COLUMNS
    assert [int(r["step"]) for r in rows] == [0, 10, 20, 30, 40]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sum(r["kind"] == "train" for r in records) == 40 and sum(r["kind"] == "val" for r in records) == 5
    assert json.loads((out / "train_config.json").read_text(encoding="utf-8")) == configs.tiny().to_dict()
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["finished"] and summary["step"] == 40


def test_exported_checkpoint_loads_and_the_pipeline_accepts_it(tiny_run):
    import SimpleITK as sitk

    import unifuse
    from unifuse.model import build_model
    from unifuse.weights import load_checkpoint

    trainer, result, out = tiny_run
    ckpt = load_checkpoint(result.best_checkpoint)
    assert ckpt.metadata["trained"] is True
    assert ckpt.metadata["step"] == result.best_step and ckpt.metadata["checkpoint"] == "best"
    assert ckpt.config == trainer.model_config and ckpt.config.working_size == 16
    model = build_model(ckpt.config)
    model.load_state_dict(ckpt.state_dict, strict=True)
    final = load_checkpoint(result.final_checkpoint)
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(final.state_dict[k], v.cpu())

    rng = np.random.default_rng(0)
    zz, yy, xx = np.mgrid[:20, :20, :20]
    ball = ((zz - 10) ** 2 + (yy - 10) ** 2 + (xx - 9) ** 2 < 49).astype(np.float32)
    ref = sitk.GetImageFromArray(ball * 100 + rng.normal(0, 1, ball.shape).astype(np.float32))
    mov = sitk.GetImageFromArray(np.roll(ball, 1, axis=2) * 50 + 5)
    for img in (ref, mov):
        img.SetSpacing((2.0, 2.0, 2.0))
    res = unifuse.fuse(ref, mov, device="cpu", weights=result.best_checkpoint)
    assert res.report["model"]["trained"] is True
    assert res.fused.GetSize() == ref.GetSize()
    assert np.isfinite(sitk.GetArrayFromImage(res.fused)).all()


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    torch.set_num_threads(1)
    cfg = _tiny(steps=12, val_every=4, checkpoint_every=4)
    full = Trainer(cfg, tmp_path / "full", device="cpu", log_stream=None)
    full.fit()

    part = tmp_path / "part"
    Trainer(cfg, part, device="cpu", log_stream=None).fit(stop_at=4)
    saved_at_4 = part / "state_at_4.pt"
    shutil.copy(part / STATE_FILE, saved_at_4)
    Trainer(cfg, part, device="cpu", resume=True, log_stream=None).fit(stop_at=7)
    # simulate a crash after step 7 whose last checkpoint was step 4: logs hold steps 5-7 that must go
    shutil.copy(saved_at_4, part / STATE_FILE)
    resumed = Trainer(cfg, part, device="cpu", resume=True, log_stream=None)
    assert resumed.step == 4
    resumed.fit()

    for (name, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    _, rows_full = _read_csv(tmp_path / "full" / "train_log.csv")
    _, rows_part = _read_csv(part / "train_log.csv")
    assert [r["step"] for r in rows_part] == [str(s) for s in range(1, 13)]
    for a, b in zip(rows_full, rows_part):
        assert float(a["loss_total"]) == pytest.approx(float(b["loss_total"]), rel=1e-5, abs=1e-7)
    _, val_part = _read_csv(part / "val_log.csv")
    assert [int(r["step"]) for r in val_part] == [0, 4, 8, 12]


def test_fine_tuning_starts_from_the_checkpoint(tiny_run, tmp_path):
    from unifuse.weights import load_checkpoint

    _, result, _ = tiny_run
    ckpt = load_checkpoint(result.best_checkpoint)
    tuned = Trainer(_tiny(init_from=str(result.best_checkpoint), train_seed=5), tmp_path, device="cpu", log_stream=None)
    for k, v in tuned.model.state_dict().items():
        assert torch.equal(v, ckpt.state_dict[k]), k
    with pytest.raises(UniFuseError, match="same network config"):
        Trainer(_tiny(init_from=str(result.best_checkpoint), working_size=32), tmp_path / "other", device="cpu", log_stream=None)


def test_provenance_of_a_checkpoint_copied_out_of_its_run_folder(tiny_run, tmp_path):
    """A published copy has no summary.json beside it: its own step and wall time stand in (model card stages)."""
    import shutil

    from unifuse.train.evaluate import stage_wall_time_s
    from unifuse.train.trainer import describe_source_checkpoint
    from unifuse.weights import load_checkpoint

    _, result, _ = tiny_run
    in_run = describe_source_checkpoint(load_checkpoint(result.best_checkpoint))
    assert "best_step" in in_run["run_summary"]  # inside the run folder: its summary.json
    assert stage_wall_time_s(in_run) == in_run["run_summary"]["wall_time_s"]
    copy = tmp_path / "published.pt"
    shutil.copyfile(result.best_checkpoint, copy)
    copy.with_name("published.pt.sha256").write_text(f"{in_run['sha256']}  published.pt\n", encoding="utf-8")
    ckpt = load_checkpoint(copy)
    info = describe_source_checkpoint(ckpt)
    assert "run_summary" not in info and info["step"] == ckpt.metadata["step"]
    assert stage_wall_time_s(info) == ckpt.metadata["compute"]["wall_time_s"] is not None


def test_refuses_to_overwrite_or_resume_a_different_run(tmp_path):
    cfg = _tiny(steps=2, val_every=2, checkpoint_every=2)
    Trainer(cfg, tmp_path, device="cpu", log_stream=None).fit()
    with pytest.raises(UniFuseError, match="--resume"):
        Trainer(cfg, tmp_path, device="cpu", log_stream=None)
    with pytest.raises(UniFuseError, match="lr"):
        Trainer(cfg.replace(lr=1e-2), tmp_path, device="cpu", resume=True, log_stream=None)
    with pytest.raises(UniFuseError, match="does not exist"):
        Trainer(cfg, tmp_path / "empty", device="cpu", resume=True, log_stream=None)


# ------------------------------------------------------------------------------------ schedule, data
def test_cosine_schedule_endpoints_and_warmup():
    assert cosine_lr_factor(0, 100, 0, 1e-3, 1e-6) == pytest.approx(1.0)
    assert cosine_lr_factor(100, 100, 0, 1e-3, 1e-6) == pytest.approx(1e-3)
    assert cosine_lr_factor(50, 100, 0, 1e-3, 1e-6) == pytest.approx(0.5 * (1 + 1e-3))
    assert cosine_lr_factor(0, 100, 10, 1e-3, 1e-6) == pytest.approx(0.1)
    assert cosine_lr_factor(10, 100, 10, 1e-3, 1e-6) == pytest.approx(1.0)
    values = [cosine_lr_factor(s, 100, 10, 1e-3, 1e-6) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_cosine_schedule_is_the_curve_of_torch_linear_warmup_then_cosine_annealing():
    lr, lr_min, total, warmup = 1e-3, 1e-6, 300, 20
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, end_factor=1.0, total_iters=warmup),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup, eta_min=lr_min)], milestones=[warmup])
    for step in range(total + 1):
        assert opt.param_groups[0]["lr"] == pytest.approx(lr * cosine_lr_factor(step, total, warmup, lr, lr_min),
                                                          rel=1e-12)
        opt.step()
        sched.step()


def test_sampler_is_seeded_epoch_permutation_and_resumable():
    full = EpochPermutationSampler(5, seed=3)
    stream = [i for _, i in zip(range(23), iter(full))]
    for epoch in range(4):
        assert sorted(stream[epoch * 5:(epoch + 1) * 5]) == list(range(5))
    assert stream[:5] != stream[5:10] or stream[5:10] != stream[10:15]
    resumed = EpochPermutationSampler(5, seed=3, start=12)
    assert [i for _, i in zip(range(11), iter(resumed))] == stream[12:23]
    assert stream != [i for _, i in zip(range(23), iter(EpochPermutationSampler(5, seed=4)))]


# --------------------------------------------------------------------------------------------- configs
def test_named_configs_are_valid_and_json_configs_override_a_base(tmp_path):
    for name in ("tiny", "cpu", "cpu_finetune", "cpu_real", "gpu"):
        cfg = get_train_config(name)
        assert cfg.name == name and cfg.grad_clip == 1.0 and cfg.init_from is None
        assert TrainConfig.from_dict(cfg.to_dict()) == cfg
        assert cfg.grid % cfg.model_config().size_multiple == 0
    assert (get_train_config("gpu").lr, get_train_config("gpu").lr_min) == (1e-4, 1e-6)  # the paper's schedule
    assert get_train_config("cpu").lr_min == 1e-6
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"base": "tiny", "steps": 7, "lr": 5e-4}), encoding="utf-8")
    cfg = get_train_config(str(path))
    assert (cfg.steps, cfg.lr, cfg.model, cfg.name) == (7, 5e-4, "tiny", "mine")


def test_a_network_without_degradation_statistics_grows_the_branch(tmp_path):
    from unifuse.model import build_model
    from unifuse.weights import save_checkpoint

    old_cfg = _tiny().model_config().replace(degradation_stats=False)
    torch.manual_seed(0)
    old = build_model(old_cfg).eval()
    path = tmp_path / "old.pt"
    save_checkpoint(path, old_cfg, old.state_dict())
    grown = Trainer(_tiny(init_from=str(path)), tmp_path / "run", device="cpu", log_stream=None).model.eval()
    assert bool(grown.dapl.stats.calibrated) and float(grown.dapl.stats.std.min()) > 0
    reference, moving = torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        before, after = old(reference, moving), grown(reference, moving)
    assert torch.allclose(before.logits, after.logits)  # the new branch starts neutral
    assert torch.allclose(before.fused, after.fused) and torch.allclose(before.displacement, after.displacement)
    with pytest.raises(UniFuseError, match="same network config"):
        Trainer(_tiny(init_from=str(path), working_size=32), tmp_path / "other", device="cpu", log_stream=None)


def test_a_checkpoint_without_the_restoration_output_grows_it_and_keeps_everything_else(tmp_path):
    from unifuse.model import build_model
    from unifuse.weights import save_checkpoint

    old_cfg = _tiny().model_config().replace(restoration_head=False, fa_cell_centred=False)
    torch.manual_seed(0)
    old = build_model(old_cfg).eval()
    path = tmp_path / "old.pt"
    save_checkpoint(path, old_cfg, old.state_dict())
    grown = Trainer(_tiny(init_from=str(path)), tmp_path / "run", device="cpu", log_stream=None).model.eval()
    assert grown.cfg.restoration_head and grown.cfg.fa_cell_centred
    reference, moving = torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        before, after = old(reference, moving), grown(reference, moving)
    assert before.restored is None and after.restored is not None
    assert torch.allclose(before.fused, after.fused, atol=1e-6) and torch.allclose(before.logits, after.logits)


def test_restore_loss_trains_the_restoration_output(tmp_path):
    from unifuse.train.losses import LossWeights, UniFuseLoss, loss_restore

    a = torch.rand(1, 1, 12, 12, 12)
    assert float(loss_restore(a, a)) == pytest.approx(0.0, abs=1e-6)
    assert float(loss_restore(a * 0, a)) > float(loss_restore(a * 0.9, a)) > 0
    with pytest.raises(ValueError, match="restore"):
        UniFuseLoss(LossWeights(ce=0, moda=0, reg=0, rf=0, smooth=0, restore=1.0))(restored=a)
    trainer = Trainer(_tiny(loss_weights={"restore": 1.0}), tmp_path / "run", device="cpu", log_stream=None)
    record = trainer.train_step(next(iter(torch.utils.data.DataLoader(trainer.train_set, batch_size=2))))
    assert record["loss_restore"] > 0


def test_lr_multipliers_scale_the_named_parameters_and_reject_typos(tmp_path):
    trainer = Trainer(_tiny(lr_multipliers={"dapl.stats.": 10.0}), tmp_path / "a", device="cpu", log_stream=None)
    base, stats = trainer.optimizer.param_groups
    assert stats["lr"] == pytest.approx(10.0 * base["lr"])
    branch = {id(p) for p in trainer.model.dapl.stats.parameters()}
    assert {id(p) for p in stats["params"]} == branch and not branch & {id(p) for p in base["params"]}
    with pytest.raises(UniFuseError, match="match no parameter"):
        Trainer(_tiny(lr_multipliers={"dapl.stat_head.": 10.0}), tmp_path / "b", device="cpu", log_stream=None)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"steps": 0}, "steps"),
        ({"lr_multipliers": {"dapl.stats.": 0}}, "lr_multipliers"),
        ({"lr_min": 1.0}, "lr_min"),
        ({"amp": "fp8"}, "amp"),
        ({"val_seed": 1, "train_seed": 1}, "val_seed"),
        ({"working_size": 18}, "multiple"),
        ({"model": "huge"}, "huge"),
        ({"soft_degradation_fraction": 1.5}, "soft_degradation_fraction"),
        ({"soft_degradation_fraction": 0.5}, "true_degradation_in_training"),
    ],
)
def test_invalid_configs_name_the_problem(changes, message):
    with pytest.raises(UniFuseError, match=message):
        _tiny(**changes)


def test_soft_class_weights_are_mixtures_around_the_true_class_drawn_for_the_global_batch():
    classes = torch.tensor([0, 1, 2, 3, 1, 2, 0, 3] * 50)
    weights = soft_class_weights(classes, 4, 0.5, torch.Generator().manual_seed(3))
    assert weights.shape == (400, 4) and bool((weights >= 0).all())
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(400))
    one_hot = torch.nn.functional.one_hot(classes, 4).float()
    soft = (weights - one_hot).abs().sum(dim=1) > 1e-6
    assert 0.4 < soft.float().mean().item() < 0.6  # about the fraction asked for
    true_weight = weights[torch.arange(400), classes]
    assert bool((true_weight >= 1.0 - SOFT_MIX_MAX - 1e-6).all())
    assert bool((weights.argmax(dim=1) != classes).any())  # sometimes another class wins, as calibrated p can
    assert torch.equal(soft_class_weights(classes, 4, 0.0, torch.Generator().manual_seed(3)), one_hot)
    # a data-parallel rank draws the global batch's numbers and takes its slice
    whole = soft_class_weights(classes[:8], 4, 0.5, torch.Generator().manual_seed(9))
    second = soft_class_weights(classes[4:8], 4, 0.5, torch.Generator().manual_seed(9), batch_slice=(4, 8))
    torch.testing.assert_close(second, whole[4:8])


def test_soft_mixtures_change_what_the_prompts_see_and_only_when_asked(tmp_path):
    torch.set_num_threads(1)
    base = _tiny(steps=2, val_every=2, checkpoint_every=2, true_degradation_in_training=True)
    losses = {}
    for name, fraction in (("one_hot", 0.0), ("soft", 1.0)):
        trainer = Trainer(base.replace(soft_degradation_fraction=fraction), tmp_path / name, device="cpu",
                          log_stream=None)
        batch = next(iter(trainer.val_batches))
        seen = {}

        def record(module, args, kwargs):
            seen["p"] = kwargs.get("degradation")

        handle = trainer.model.register_forward_pre_hook(record, with_kwargs=True)
        total, _, _ = trainer.compute_loss(batch, torch.Generator().manual_seed(0), teacher_forcing=True)
        handle.remove()
        losses[name] = float(total)
        if fraction == 0.0:
            assert torch.equal(seen["p"], batch["degradation"])  # class ids: one-hot teacher forcing
        else:
            assert seen["p"].shape == (batch["degradation"].shape[0], 4) and seen["p"].is_floating_point()
            assert not torch.equal(seen["p"], torch.nn.functional.one_hot(batch["degradation"], 4).float())
    assert losses["one_hot"] != losses["soft"]


def test_unknown_config_name_and_bad_json(tmp_path):
    with pytest.raises(UniFuseError, match="unknown training config"):
        get_train_config("nope")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(UniFuseError, match="not valid JSON"):
        get_train_config(str(bad))
    bad.write_text(json.dumps({"base": "tiny", "colour": 3}), encoding="utf-8")
    with pytest.raises(UniFuseError, match="colour"):
        get_train_config(str(bad))


# ------------------------------------------------------------------------------------------ evaluation
def test_evaluation_reports_model_and_baselines_and_the_card(tiny_run, tmp_path):
    from unifuse.train.evaluate import METHODS, check_targets, evaluate_checkpoint, write_model_card

    _, result, _ = tiny_run
    report = evaluate_checkpoint(result.best_checkpoint, cases=3, seed=99, device="cpu")
    assert report["cases"] == 3
    for m in METHODS:
        for k in ("q_ssim", "q_psnr", "q_cc", "q_mse"):
            assert math.isfinite(report["fusion"][m][k]["mean"]), (m, k)
    # the baselines are deterministic functions of the inputs: max >= average voxel-wise means a larger
    # mean intensity; and no registration has exactly zero folding / the full misalignment as EPE
    epe = report["alignment"]["endpoint_error_mm"]
    assert epe["no_registration"]["mean"] > 0
    assert 0 <= report["alignment"]["folding_percent"]["mean"] <= 100
    assert 0 <= report["degradation"]["accuracy"] <= 1
    assert set(report["targets"]) == {"endpoint_error_reduction", "folding", "degradation_accuracy",
                                      "beats_baselines_q_ssim", "beats_baselines_q_psnr", "beats_baselines_q_cc"}
    assert report["targets"] == check_targets(report)
    json_path, md_path = write_model_card(report, tmp_path)
    card = json.loads(json_path.read_text(encoding="utf-8"))
    assert card["evaluation"]["checkpoint"]["sha256"] == report["checkpoint"]["sha256"]
    md = md_path.read_text(encoding="utf-8")
    assert "Not for clinical use" in md and f"{report['fusion']['unifuse']['q_ssim']['mean']:.4f}" in md
    assert f"{sum(p.numel() for p in tiny_run[0].model.parameters()):,} parameters" in md  # learned weights only
    assert "mean of the two sources" not in md  # the tiny run keeps the paper's max target
    report["checkpoint"]["training"]["train_config"]["loss_weights"] = {"inten_target": "mean"}
    assert "mean of the two sources" in write_model_card(report, tmp_path / "mean")[1].read_text(encoding="utf-8")


def test_check_targets_decides_honestly():
    from unifuse.train.evaluate import check_targets

    def stat(x):
        return {"mean": x, "std": 0.0, "n": 1}

    report = {
        "alignment": {"endpoint_error_mm": {"unifuse": stat(2.0), "no_registration": stat(5.0)},
                      "folding_percent": stat(0.7)},
        "degradation": {"accuracy": 0.95},
        "fusion": {
            "unifuse": {"q_ssim": stat(1.5), "q_psnr": stat(20.0), "q_cc": stat(0.80)},
            "no_registration+average": {"q_ssim": stat(1.2), "q_psnr": stat(21.0), "q_cc": stat(0.70)},
            "no_registration+max": {"q_ssim": stat(1.1), "q_psnr": stat(18.0), "q_cc": stat(0.85)},
        },
    }
    t = check_targets(report)
    assert t["endpoint_error_reduction"]["met"] and t["endpoint_error_reduction"]["value_percent"] == pytest.approx(60.0)
    assert not t["folding"]["met"] and t["folding"]["gap_percent_points"] == pytest.approx(0.2)
    assert t["degradation_accuracy"]["met"]
    assert t["beats_baselines_q_ssim"]["met"]
    assert not t["beats_baselines_q_psnr"]["met"] and t["beats_baselines_q_psnr"]["gap"] == pytest.approx(1.0)
    assert not t["beats_baselines_q_cc"]["met"] and t["beats_baselines_q_cc"]["gap"] == pytest.approx(0.05)


# ----------------------------------------------------------------------------------------------- CLI
def test_cli_train_then_evaluate(tmp_path, capsys):
    from unifuse.train.cli_train import add_train_parser, run_evaluate, run_train
    from unifuse.weights import load_checkpoint

    parser = argparse.ArgumentParser(prog="unifuse")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "run"
    args = parser.parse_args(["train", "--config", "tiny", "--out", str(out), "--steps", "3", "--device", "cpu"])
    assert run_train(args) == 0
    assert (out / "final.pt").is_file() and (out / "final.pt.sha256").is_file()
    args = parser.parse_args(["train", "--config", "tiny", "--out", str(out), "--steps", "5", "--resume", "--device", "cpu"])
    assert run_train(args) == 0
    _, rows = _read_csv(out / "train_log.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]
    card_dir = tmp_path / "card"
    args = parser.parse_args(["evaluate", "--weights", str(out / "final.pt"), "--out", str(card_dir),
                              "--cases", "2", "--device", "cpu", "--model-card", "--publish"])
    assert run_evaluate(args) == 0
    printed = capsys.readouterr().out
    assert "no_registration+average" in printed and "endpoint error" in printed
    assert (card_dir / "model_card.json").is_file() and (card_dir / "MODEL_CARD.md").is_file()
    published = load_checkpoint(card_dir / "unifuse_default.pt")
    assert published.metadata["trained"] is True and published.metadata["step"] == 5
    card = json.loads((card_dir / "model_card.json").read_text(encoding="utf-8"))
    assert card["evaluation"]["checkpoint"]["sha256"] == published.sha256
    with pytest.raises(UniFuseError, match="need --out"):
        run_evaluate(parser.parse_args(["evaluate", "--weights", str(out / "final.pt"), "--model-card"]))
