"""Running a trained model over a whole dataset: the teacher's image and region scores, the student's
probabilities. Evaluation, validation during training, the teacher's cached targets and figures build on these.

Each function builds its own view of the dataset with the transform it needs (:meth:`MultiLabelDataset.view`);
the dataset passed in is never changed.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from mlkd.data.base import MultiLabelDataset, collate
from mlkd.data.loader import make_loader
from mlkd.data.transforms import Compose, KeepTopProposals, RandomHorizontalFlip, Warp
from mlkd.errors import BadInput
from mlkd.models.backbones import normalize
from mlkd.models.inputs import teacher_inputs
from mlkd.models.wsddn import WSDDN
from mlkd.utils.distributed import DistInfo, all_gather, shard, unshard


def teacher_view(dataset: MultiLabelDataset, scale: int, flipped: bool = False,
                 max_proposals: int | None = None) -> MultiLabelDataset:
    """``dataset`` as the teacher sees it at test time: the first ``max_proposals`` proposals, optionally
    mirrored, warped to ``scale`` x ``scale``."""
    keep = [KeepTopProposals(max_proposals)] if max_proposals else []
    return dataset.view(transform=Compose(keep + [RandomHorizontalFlip(float(flipped)), Warp(scale)]))


@torch.no_grad()
def predict_teacher(model: WSDDN, dataset: MultiLabelDataset, convention: str, device: torch.device,
                    scales: Sequence[int] = (672,), flip: bool = False, max_proposals: int | None = None,
                    workers: int = 0, progress: bool = True, batch_size: int = 4,
                    info: DistInfo | None = None) -> dict[str, Any]:
    """Teacher outputs for every image of ``dataset`` (which must have proposals attached).

    With several ``scales`` and/or ``flip`` the region scores of all views are averaged per proposal (a flip
    keeps the proposals' order) and the image scores per class (for WSDDN, whose image scores are sums of its
    region scores, the same as summing the averaged region scores; a refined teacher's are those its
    ``model.image_scores`` names, see :meth:`mlkd.models.wsddn.WSDDN.scores`). Images go
    through the network ``batch_size`` at a time (all are warped to the same square, so they stack; each keeps
    its own proposals). Under ``torchrun`` (``info`` of several ranks) each rank predicts its share and every
    rank gets the whole result.

    Returns ``image_ids``; ``image_scores`` ``(N, K)`` float32; per image ``region_scores`` ``(R_i, K)`` and
    ``proposals`` ``(R_i, 4)`` in pixels of the image file (x1, y1, x2, y2).
    """
    if dataset.proposals is None:
        raise BadInput(f"dataset {dataset.name}/{dataset.split} has no proposals: attach its proposal cache")
    info = info or DistInfo(device=device)
    part = dataset.view(indices=shard(len(dataset), info))
    model.eval()
    views = [(s, f) for s in scales for f in ((False, True) if flip else (False,))]
    sums: list[list[torch.Tensor]] = []  # per image of this rank: [region scores, image scores] summed over views
    for scale, flipped in views:
        loader = make_loader(teacher_view(part, scale, flipped, max_proposals), batch_size, workers, collate,
                             train=False)
        desc = f"teacher @{scale}{' flip' if flipped else ''}"
        i = 0
        bar = tqdm(total=len(part), desc=desc, unit="img", disable=not progress or not info.is_main)
        for images, targets in loader:
            for out in model(**teacher_inputs(images, targets, device, convention, with_labels=False)):
                r, p = out["region_scores"].float().cpu(), out["image_scores"].float().cpu()
                if len(sums) <= i:
                    sums.append([r, p])
                else:
                    sums[i][0] += r
                    sums[i][1] += p
                i += 1
            bar.update(len(targets))
        bar.close()
    mine = [((r / len(views)).numpy(), (p / len(views)).numpy()) for r, p in sums]
    both = unshard(all_gather(mine, info), len(dataset))
    proposals = [dataset.proposals.get(r.image_id)[0][: max_proposals or None] for r in dataset.records]
    return {"image_ids": [r.image_id for r in dataset.records],
            "image_scores": np.stack([p for _, p in both]) if both else np.zeros((0, 0), np.float32),
            "region_scores": [r for r, _ in both], "proposals": proposals}

@torch.no_grad()
def predict_student(model: nn.Module, dataset: MultiLabelDataset, convention: str, image_size: int,
                    device: torch.device, workers: int = 0, batch_size: int = 32, progress: bool = True,
                    info: DistInfo | None = None) -> np.ndarray:
    """Sigmoid probabilities ``(N, K)`` float32 of the student on every image (warped to ``image_size``); under
    ``torchrun`` each rank predicts its share and every rank gets them all."""
    info = info or DistInfo(device=device)
    model.eval()
    part = dataset.view(transform=Warp(image_size), indices=shard(len(dataset), info))
    loader = make_loader(part, batch_size, workers, collate, train=False)
    scores = [torch.sigmoid(model(normalize(images.to(device), convention)).float()).cpu()
              for images, _ in tqdm(loader, desc="student", unit="batch", disable=not progress or not info.is_main)]
    mine = torch.cat(scores).numpy() if scores else np.zeros((0, dataset.num_classes), np.float32)
    if not info.enabled:
        return mine
    rows = unshard([list(p) for p in all_gather(mine, info)], len(dataset))
    return np.stack(rows) if rows else mine
