"""Fusion across processes with ``torch.distributed`` (torchrun; gloo on CPU, NCCL on GPUs).

Every statistic fxfuse reads is a sum over samples (the Gram matrices G, C, K,
alignment costs, importance sums, level errors), so when ``fxfuse.fuse`` runs inside a
process group each process streams its own shard and the shards join with one
all-reduce per statistic; grouping and solving then run on the same matrices in every
process, which therefore all return the same model. Nothing here starts processes:
``torchrun`` (or the caller) does, and :func:`init_from_env` joins its group.
"""

from __future__ import annotations

import datetime
import os
import zlib

import torch
from torch import Tensor, nn

from ._errors import FxFuseError

__all__ = ["DistributedError", "all_gather_rows", "all_reduce_", "all_reduce_number", "barrier", "shutdown",
           "check_same_across_ranks", "init_from_env", "is_distributed", "rank_prefix", "world"]

# seconds a collective or a level-boundary barrier waits for the other ranks before failing
TIMEOUT_S = float(os.environ.get("FXFUSE_DIST_TIMEOUT", "60"))


class DistributedError(FxFuseError):
    """The ranks of a distributed fusion disagree (models, data shapes, results) or one of them failed."""


def world() -> tuple[int, int]:
    """``(rank, world size)`` of the current process group, or ``(0, 1)`` outside one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return world()[1] > 1


def rank_prefix() -> str:
    rank, size = world()
    return f"rank {rank} of {size}: " if size > 1 else ""


def _backend_device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_(t: Tensor) -> Tensor:
    """Sum ``t`` over all ranks, in place (a no-op outside a process group); returns ``t``.

    The sum is in ``t``'s own dtype (float64 statistics stay float64). Every rank gets
    the same result, so later choices (groupings, ridges) agree across ranks.
    """
    if not is_distributed():
        return t
    import torch.distributed as dist

    dev = _backend_device()
    buf = t if t.device == dev else t.to(dev)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    if buf is not t:
        t.copy_(buf.to(t.device))
    return t


def all_reduce_number(x: float | int) -> float | int:
    """A Python number summed over all ranks."""
    if not is_distributed():
        return x
    t = torch.tensor([x], dtype=torch.float64 if isinstance(x, float) else torch.int64)
    return type(x)(all_reduce_(t).item())


def all_gather_rows(t: Tensor) -> Tensor:
    """Every rank's rows of ``t`` (shapes may differ in dim 0), concatenated in rank order."""
    if not is_distributed():
        return t
    import torch.distributed as dist

    rank, size = world()
    dev = _backend_device()
    n = torch.zeros(size, dtype=torch.int64, device=dev)
    n[rank] = t.shape[0]
    dist.all_reduce(n)
    most = int(n.max())
    pad = torch.zeros((most, *t.shape[1:]), dtype=t.dtype, device=dev)
    pad[: t.shape[0]] = t.to(dev)
    parts = [torch.empty_like(pad) for _ in range(size)]
    dist.all_gather(parts, pad)
    return torch.cat([p[: int(k)] for p, k in zip(parts, n)]).to(t.device)


def check_same_across_ranks(what: str, value: Tensor | float, rtol: float = 0.0) -> None:
    """Raise :class:`DistributedError` on every rank unless ``value`` is the same on all of them.

    Compares the minimum and the maximum over ranks of each entry (float64), to ``rtol`` of its size.
    """
    if not is_distributed():
        return
    import torch.distributed as dist

    v = torch.as_tensor(value, dtype=torch.float64).reshape(-1).to(_backend_device())
    lo, hi = v.clone(), v.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if bool(((hi - lo).abs() > rtol * torch.maximum(hi.abs(), lo.abs())).any()):
        raise DistributedError(
            f"{rank_prefix()}{what} differ across ranks (this rank {v.tolist()[:4]}, range over ranks "
            f"{lo.tolist()[:4]} .. {hi.tolist()[:4]}); every rank must fuse the same models with data of the same shape"
        )


def model_checksum(model: nn.Module) -> Tensor:
    """A float64 fingerprint of a model's parameters and buffers: per tensor, its sum and sum of squares,
    weighted by a hash of its name (so swapped tensors differ)."""
    total = torch.zeros(3, dtype=torch.float64)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if not t.is_floating_point():
            continue
        w = 1.0 + (zlib.crc32(name.encode()) % 9973) / 9973.0
        d = t.detach().to(torch.float64)
        total += torch.stack([d.sum() * w, (d * d).sum() * w, torch.tensor(float(d.numel()) * w,
                                                                            dtype=torch.float64)]).cpu()
    return total


def barrier(where: str) -> None:
    """Wait for every rank at a level boundary; a rank that does not arrive within ``TIMEOUT_S`` (it raised, or
    hangs) makes the others raise :class:`DistributedError` naming it (gloo's monitored barrier)."""
    if not is_distributed():
        return
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=TIMEOUT_S)
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=timeout, wait_all_ranks=True)
        else:
            dist.barrier()
    except RuntimeError as e:
        raise DistributedError(f"{rank_prefix()}{where}: another rank stopped ({str(e).strip().splitlines()[0]}); "
                               "see that rank's own error") from e


def init_from_env(device: str | None = None) -> bool:
    """Join the process group torchrun describes in the environment (``WORLD_SIZE`` > 1), once.

    NCCL when CUDA is available with a device for each local rank (``cuda:LOCAL_RANK``
    becomes the default device), gloo otherwise. Collectives time out after
    ``FXFUSE_DIST_TIMEOUT`` seconds (default 60). Returns whether a group of more than
    one process is initialised.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    local = int(os.environ.get("LOCAL_RANK", "0"))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= local_size and device != "cpu"
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=TIMEOUT_S))
    return dist.get_world_size() > 1


def broadcast_seed(cfg):
    """``cfg`` with rank 0's seed on every rank (k-means seeding, gradient-fit initialisation)."""
    import dataclasses

    import torch.distributed as dist

    t = torch.tensor([cfg.seed], dtype=torch.int64, device=_backend_device())
    dist.broadcast(t, src=0)
    seed = int(t.item())
    return dataclasses.replace(cfg, seed=seed, train=cfg.train.replace(seed=seed))


def shutdown() -> None:
    """Leave the process group after a successful run: wait for every rank, then destroy it (a no-op outside one).

    Without the wait, a rank that tears its connections down while another still uses them can make gloo abort at
    exit.
    """
    if not is_distributed():
        return
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
