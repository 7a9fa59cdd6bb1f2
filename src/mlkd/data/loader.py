"""The DataLoader around a dataset, for training or evaluation (single process or DDP)."""

from __future__ import annotations

from typing import Callable

import cv2
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from mlkd.data.base import MultiLabelDataset


def make_loader(dataset: MultiLabelDataset, batch_size: int, workers: int, collate_fn: Callable, *, train: bool,
                seed: int = 0, rank: int = 0, world_size: int = 1) -> DataLoader:
    """A DataLoader that shuffles (train) with a per-epoch seed, sharded over ``world_size`` processes.

    Call ``loader.sampler.set_epoch(epoch)`` (DDP) or reseed torch before each epoch: the order is a function
    of (seed, epoch) only, which makes resumed runs identical to uninterrupted ones.
    """
    if world_size > 1:
        sampler = DistributedSampler(dataset, world_size, rank, shuffle=train, seed=seed)
    else:
        sampler = RandomSampler(dataset) if train else SequentialSampler(dataset)
    if workers > 0:
        # Forked workers inherit OpenCV's thread pool without its threads and deadlock in the first cv2 call
        # that uses it; with one thread OpenCV never touches the pool. Workers give the parallelism instead.
        cv2.setNumThreads(1)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_fn,
                      persistent_workers=False, drop_last=False)
