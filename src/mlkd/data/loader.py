"""Opening a split for training or evaluation, and the DataLoader around it (single process or DDP)."""

from __future__ import annotations

from typing import Any, Callable

import cv2
import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from mlkd.data.base import MultiLabelDataset, Transform
from mlkd.data.transforms import Target


class KeepTopProposals:
    """Keep the first ``n`` proposals (caches store them best first); a transform, so it runs in the workers."""

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"max_proposals must be >= 1, got {n}")
        self.n = n

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        target = dict(target)
        for key in ("proposals", "proposal_scores"):
            if key in target:
                target[key] = target[key][: self.n]
        return image, target

    def __repr__(self) -> str:
        return f"KeepTopProposals({self.n})"


def open_split(spec: str, options: dict[str, Any] | None = None, proposals: str | None = None,
               transform: Transform | None = None) -> MultiLabelDataset:
    """Build the dataset of ``spec`` and attach the proposal cache at ``proposals`` (its identity is checked)."""
    from mlkd.data import build_dataset  # the package imports this module
    from mlkd.proposals.cache import ProposalCache

    dataset = build_dataset(spec, transform=transform, **(options or {}))
    if proposals is not None:
        dataset.attach_proposals(ProposalCache.open(proposals))
    return dataset


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
