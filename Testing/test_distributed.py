"""Data-parallel training (unifuse.train.distributed): sharding, L_moda's global negatives, and a real
2-process gloo run under torchrun on CPU compared step by step with one process on the same global batch.

The end-to-end test trains the ``tiny`` network at 16³ on a fake BraTS tree (``test_train_folders``), so no
process spends time synthesising anatomy; it needs ~25 s of CPU time (40–55 s wall on the shared,
oversubscribed 2-core development machine, mostly three Python processes importing torch).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
import torch

from unifuse.errors import UniFuseError
from unifuse.train.distributed import DistContext, DistributedError, init_distributed, rank_seed, rank_slice
from unifuse.train.losses import loss_moda
from unifuse.train.trainer import EpochPermutationSampler

from test_train_folders import make_brats_tree, tiny_folder_config

pytestmark = pytest.mark.usefixtures("single_thread")


def _ctx(rank: int, world: int) -> DistContext:
    return DistContext(rank, world, rank, world, "gloo", torch.device("cpu"))


def _take(sampler: EpochPermutationSampler, n: int) -> List[int]:
    it = iter(sampler)
    return [next(it) for _ in range(n)]


# ------------------------------------------------------------------------------------------- pieces
def test_rank_slices_of_every_global_batch_make_the_one_process_stream():
    n, seed, batch, steps = 7, 3, 4, 9
    one = _take(EpochPermutationSampler(n, seed), batch * steps)
    for world in (2, 4):
        local = batch // world
        ranks = [_take(EpochPermutationSampler(n, seed, batch_size=batch, rank=r, world_size=world), local * steps)
                 for r in range(world)]
        rebuilt = [i for k in range(steps) for r in range(world) for i in ranks[r][k * local:(k + 1) * local]]
        assert rebuilt == one
        # resuming at step 5 on another world size continues the same stream
        start = 5 * batch
        resumed = _take(EpochPermutationSampler(n, seed, start=start, batch_size=batch, rank=1, world_size=world), local)
        assert resumed == one[start + local:start + 2 * local]
    with pytest.raises(ValueError, match="batch boundary"):
        EpochPermutationSampler(n, seed, start=3, batch_size=4, rank=0, world_size=2)


def test_loss_moda_on_rank_slices_averages_to_the_global_batch_loss():
    torch.manual_seed(0)
    a, b = torch.randn(4, 10, 8), torch.randn(4, 10, 8)
    full = loss_moda(a, b, generator=torch.Generator().manual_seed(5))
    parts = [loss_moda(a[o:o + 2], b[o:o + 2], generator=torch.Generator().manual_seed(5), batch_slice=(o, 4))
             for o in (0, 2)]
    torch.testing.assert_close(sum(parts) / 2, full, rtol=1e-6, atol=1e-7)
    # without a slice the draw is the one-process draw (unchanged behaviour)
    same = loss_moda(a, b, generator=torch.Generator().manual_seed(5), batch_slice=(0, 4))
    assert torch.equal(same, full)
    with pytest.raises(ValueError, match="batch_slice"):
        loss_moda(a, b, batch_slice=(2, 4))


def test_batch_split_seeds_and_the_plain_launch():
    assert rank_slice(4, _ctx(1, 2)) == (2, 2)
    with pytest.raises(DistributedError, match="multiple of 2") as info:
        rank_slice(3, _ctx(0, 2))
    assert isinstance(info.value, UniFuseError)
    assert rank_seed(5, 0) == 5 and len({rank_seed(5, r) for r in range(8)}) == 8
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        assert key not in os.environ
    ctx = init_distributed("cpu")  # no torchrun: one process, no process group
    assert not ctx.enabled and ctx.is_main and ctx.world_size == 1


# ---------------------------------------------------------------------------------------- end to end
def _losses(path: Path) -> List[float]:
    with open(path, newline="", encoding="utf-8") as f:
        return [float(r["loss_total"]) for r in csv.DictReader(f)]


def _steps(path: Path) -> List[int]:
    with open(path, newline="", encoding="utf-8") as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


def test_two_process_gloo_run_matches_one_process_and_resumes_on_one(tmp_path: Path):
    from unifuse.train.configs import get_train_config
    from unifuse.train.trainer import STATE_FILE, Trainer

    root = make_brats_tree(tmp_path / "data").resolve()
    config_file = tiny_folder_config(tmp_path / "cfg.json", steps=15, checkpoint_every=5, log_every=5)
    ddp = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "unifuse.train", "--config", str(config_file), "--out", str(ddp), "--device", "cpu",
           "--data", str(root), "--layout", "brats2020", "--stop-at", "10"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, encoding="utf-8")

    # meanwhile: one process, the same global batch (2), all 15 steps
    config = get_train_config(str(config_file)).replace(data_root=str(root), data_layout="brats2020")
    assert config.batch_size == 2
    Trainer(config, tmp_path / "one", device="cpu", log_stream=None).fit()
    reference = _losses(tmp_path / "one" / "train_log.csv")
    assert len(reference) == 15

    output, _ = launch.communicate(timeout=300)
    assert launch.returncode == 0, output[-3000:]
    assert "batch 2 (2 processes × 1, gloo)" in output
    assert _steps(ddp / "train_log.csv") == list(range(1, 11))  # rank 0 alone logs: each step once
    assert (ddp / STATE_FILE).is_file() and not (ddp / "final.pt").exists()
    two = _losses(ddp / "train_log.csv")
    for step, (a, b) in enumerate(zip(two, reference[:10]), start=1):
        assert a == pytest.approx(b, rel=1e-4), f"step {step}: 2 processes {a} vs 1 process {b}"

    # the 2-process checkpoint resumes on one process and continues the one-process curve
    resumed = Trainer(config, ddp, device="cpu", resume=True, log_stream=None)
    assert resumed.step == 10
    result = resumed.fit()
    assert result.finished and (ddp / "final.pt").is_file()
    assert _steps(ddp / "train_log.csv") == list(range(1, 16))
    continued = _losses(ddp / "train_log.csv")[10:]
    for step, (a, b) in enumerate(zip(continued, reference[10:]), start=11):
        assert a == pytest.approx(b, rel=1e-4), f"step {step}: resumed {a} vs 1 process {b}"
