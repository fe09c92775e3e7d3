"""Data-parallel training across processes, GPUs and machines on :mod:`torch.distributed`.

Launch any number of trainer processes with ``torchrun`` (it sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``)::

    torchrun --nproc_per_node 4 -m unifuse.train --config gpu --out runs/ddp            # one machine, 4 GPUs
    torchrun --nnodes 2 --nproc_per_node 4 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
             -m unifuse.train --config gpu --out /shared/runs/ddp                       # two machines

:func:`init_distributed` turns that environment into a :class:`DistContext`: NCCL and ``cuda:LOCAL_RANK`` on
GPUs, gloo on CPU; without torchrun it returns the one-process context and initialises nothing.

How the trainer uses it (:class:`unifuse.train.trainer.Trainer`) — the contract is that N processes with a
global batch B give the same updates as one process with batch B:

* **data**: ``TrainConfig.batch_size`` is the *global* batch; it must be divisible by the world size W.
  The seeded epoch permutation is the same in every process; global batch k holds stream positions
  ``k·B … k·B + B − 1`` and rank r takes the contiguous slice ``r·B/W … (r + 1)·B/W − 1``
  (:func:`rank_slice`). A sample is a pure function of its index (its augmentation is seeded per sample), so
  the global batch, and everything in it, does not depend on W.
* **gradients**: the network is wrapped in ``DistributedDataParallel``, which averages the gradients over
  the ranks; every loss term is a mean over equal-sized per-rank batches, so the average equals the
  gradient of the global batch. L_moda's negative sampling draws for the whole global batch from a
  generator that advances identically in every rank and uses the rank's slice.
* **seeds**: the network initialisation uses the config's seed in every rank (DDP also broadcasts rank 0's
  parameters); afterwards ranks > 0 reseed their global RNGs with :func:`rank_seed` (rank 0 keeps the
  one-process stream).
* **rank 0** alone validates, logs, writes checkpoints and exports; the training state holds no per-rank
  data, so a run resumes on any world size (``start = step · B`` in the data stream).
* the logged training losses are the means over all ranks (:func:`all_reduce_mean`), i.e. the losses of
  the global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from ..errors import UniFuseError
from ..pipeline import resolve_device

__all__ = [
    "DistributedError",
    "DistContext",
    "launched_by_torchrun",
    "init_distributed",
    "single_process",
    "rank_slice",
    "rank_seed",
    "all_reduce_mean",
    "all_gather_objects",
    "barrier",
]

#: Minutes a collective waits for the slowest rank (rank 0's validation and checkpoints included) before
#: the run fails; override with the environment variable ``UNIFUSE_DIST_TIMEOUT_MIN``.
DEFAULT_TIMEOUT_MIN = 60.0


class DistributedError(UniFuseError):
    """The distributed launch is unusable (batch not divisible, too few GPUs, ranks disagree on the data)."""


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in a (possibly one-process) data-parallel run.

    Attributes:
        rank: global rank (0 … world_size − 1); local_rank: rank on this machine (selects the GPU).
        world_size: number of processes; local_world_size: processes on this machine.
        backend: ``"nccl"``, ``"gloo"``, or None when no process group was initialised (plain ``unifuse train``).
        device: this process's compute device.
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    backend: Optional[str]
    device: torch.device

    @property
    def enabled(self) -> bool:
        """True when a process group is initialised (even with one process)."""
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that validates, logs and writes files."""
        return self.rank == 0

    def describe(self) -> Dict[str, Any]:
        """JSON-ready summary for logs and checkpoint metadata."""
        return {"world_size": self.world_size, "backend": self.backend or "none",
                "nodes": max(1, self.world_size // max(self.local_world_size, 1))}

    def close(self) -> None:
        """Destroy the process group (no-op without one)."""
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def launched_by_torchrun() -> bool:
    """True when the environment of a torchrun (or compatible) launcher is present."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def single_process(device: str = "auto") -> DistContext:
    """The context of a plain one-process run on ``device`` (``auto`` | ``cpu`` | ``cuda[:N]``)."""
    return DistContext(0, 1, 0, 1, None, resolve_device(device))


def _env_int(name: str, default: Optional[int] = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise DistributedError(f"the environment variable {name} is not set; launch with torchrun")
        return default
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"the environment variable {name}={value!r} is not an integer; launch with torchrun") from None


def _pick_device(device: str, local_rank: int) -> Tuple[torch.device, str]:
    """(device, backend) of this rank: NCCL on ``cuda:LOCAL_RANK``, gloo on CPU."""
    want = str(device or "auto").lower().replace("gpu", "cuda")
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu"), "gloo"
    if not want.startswith("cuda") and want != "auto":
        raise DistributedError(f"unknown device {device!r}; use auto, cpu or cuda")
    if not torch.cuda.is_available():
        raise DistributedError("device 'cuda' was requested but PyTorch sees no CUDA GPU; use --device cpu (gloo)")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise DistributedError(
            f"local rank {local_rank} needs GPU {local_rank} but this machine has {count}; start at most {count} "
            f"processes per machine (torchrun --nproc_per_node {count})"
        )
    return torch.device("cuda", local_rank), "nccl"


def init_distributed(device: str = "auto", timeout_min: Optional[float] = None) -> DistContext:
    """Join the process group torchrun set up (or return :func:`single_process` without torchrun).

    Args:
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``; under torchrun a CUDA rank always uses
            ``cuda:LOCAL_RANK`` with NCCL, a CPU rank gloo.
        timeout_min: collective timeout in minutes (default ``UNIFUSE_DIST_TIMEOUT_MIN`` or
            :data:`DEFAULT_TIMEOUT_MIN`).

    Raises:
        DistributedError: incomplete environment, or more processes on a machine than GPUs.
    """
    if not launched_by_torchrun():
        return single_process(device)

    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK")
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    dev, backend = _pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    minutes = float(timeout_min if timeout_min is not None else os.environ.get("UNIFUSE_DIST_TIMEOUT_MIN", DEFAULT_TIMEOUT_MIN))
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=minutes))
    return DistContext(rank, world, local_rank, local_world, backend, dev)


def rank_slice(global_batch: int, ctx: DistContext) -> Tuple[int, int]:
    """``(offset, local_batch)``: this rank's contiguous part of every global batch.

    Raises:
        DistributedError: ``global_batch`` is not a multiple of the world size.
    """
    if global_batch % ctx.world_size:
        raise DistributedError(
            f"the global batch_size {global_batch} cannot be split evenly over {ctx.world_size} processes; pass "
            f"--batch-size with a multiple of {ctx.world_size} or start a number of processes that divides it"
        )
    local = global_batch // ctx.world_size
    return ctx.rank * local, local


def rank_seed(seed: int, rank: int) -> int:
    """Seed of rank ``rank``'s global RNGs after the network is built: ``seed`` for rank 0 (the one-process
    stream), a distinct, deterministic value for every other rank."""
    return int(seed) if rank == 0 else (int(seed) * 1_000_003 + 7919 * int(rank)) % (2**63 - 1)


def _comm_device(ctx: DistContext) -> torch.device:
    return ctx.device if ctx.backend == "nccl" else torch.device("cpu")


def all_reduce_mean(values: Dict[str, Optional[float]], ctx: DistContext) -> Dict[str, Optional[float]]:
    """Mean over all ranks of each value (float64; None values stay None). Identity in one process.

    Every rank must pass the same keys.
    """
    if not ctx.enabled or ctx.world_size == 1:
        return dict(values)

    keys = sorted(k for k, v in values.items() if v is not None)
    packed = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_comm_device(ctx))
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    means = (packed / ctx.world_size).tolist()
    out: Dict[str, Optional[float]] = {k: None for k in values}
    out.update(dict(zip(keys, means)))
    return out


def all_gather_objects(obj: Any, ctx: DistContext) -> List[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` in one process)."""
    if not ctx.enabled or ctx.world_size == 1:
        return [obj]

    gathered: List[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op in one process)."""
    if not ctx.enabled or ctx.world_size == 1:
        return

    if ctx.backend == "nccl":
        dist.barrier(device_ids=[ctx.device.index or 0])
    else:
        dist.barrier()
