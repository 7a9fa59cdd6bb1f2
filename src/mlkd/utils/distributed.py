"""torch.distributed set-up: one process per device, launched with ``torchrun`` (NCCL on GPUs, gloo on CPU).

Without the ``torchrun`` environment (``WORLD_SIZE`` unset or 1) everything runs in one plain process.
Rank 0 alone writes logs and checkpoints. The long passes over a dataset outside training (validation, the
teacher's soft targets and region features) are sharded: each rank takes every ``world_size``-th image
(:func:`shard`) and the results are gathered (:func:`all_gather`), so no rank waits at a barrier for longer than
its own share takes. The collective timeout is ``run.dist_timeout_min``.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from mlkd.utils.device import pick_device


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


T = TypeVar("T")


def init_distributed(preference: str = "auto", timeout_min: float | None = None) -> DistInfo:
    """Join the process group ``torchrun`` describes (if any) and pick this process's device; collectives
    (barriers included) give up after ``timeout_min`` minutes (None: torch's default, 10 min under NCCL)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(preference, local_rank)
    if world <= 1:
        return DistInfo(device=device)
    if not dist.is_initialized():
        timeout = None if timeout_min is None else datetime.timedelta(minutes=timeout_min)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def shard(n: int, info: DistInfo) -> list[int]:
    """This rank's share of ``n`` items: positions ``rank, rank + world_size, ...`` (all of them alone)."""
    return list(range(info.rank, n, info.world_size))


def all_gather(value: T, info: DistInfo) -> list[T]:
    """Every rank's ``value`` (picklable), in rank order, on every rank; ``[value]`` in a single process."""
    if not info.enabled:
        return [value]
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def unshard(parts: list[list[T]], n: int) -> list[T]:
    """Put per-rank lists (rank r holds items ``r, r + W, ...``, as :func:`shard` split them) back in order."""
    out: list[Any] = [None] * n
    for rank, items in enumerate(parts):
        out[rank::len(parts)] = items
    return out


def broadcast(value: T, info: DistInfo) -> T:
    """Rank 0's ``value`` on every rank."""
    if not info.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
