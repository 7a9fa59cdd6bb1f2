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


def teacher_view(dataset: MultiLabelDataset, scale: int, flipped: bool = False,
                 max_proposals: int | None = None) -> MultiLabelDataset:
    """``dataset`` as the teacher sees it at test time: the first ``max_proposals`` proposals, optionally
    mirrored, warped to ``scale`` x ``scale``."""
    keep = [KeepTopProposals(max_proposals)] if max_proposals else []
    return dataset.view(transform=Compose(keep + [RandomHorizontalFlip(float(flipped)), Warp(scale)]))


@torch.no_grad()
def predict_teacher(model: WSDDN, dataset: MultiLabelDataset, convention: str, device: torch.device,
                    scales: Sequence[int] = (672,), flip: bool = False, max_proposals: int | None = None,
                    workers: int = 0, progress: bool = True) -> dict[str, Any]:
    """Teacher outputs for every image of ``dataset`` (which must have proposals attached).

    With several ``scales`` and/or ``flip`` the region scores of all views are averaged per proposal (a flip
    keeps the proposals' order) and the image scores are the sums of the averaged region scores.

    Returns ``image_ids``; ``image_scores`` ``(N, K)`` float32; per image ``region_scores`` ``(R_i, K)`` and
    ``proposals`` ``(R_i, 4)`` in pixels of the image file (x1, y1, x2, y2).
    """
    if dataset.proposals is None:
        raise BadInput(f"dataset {dataset.name}/{dataset.split} has no proposals: attach its proposal cache")
    model.eval()
    views = [(s, f) for s in scales for f in ((False, True) if flip else (False,))]
    sums: list[torch.Tensor | None] = [None] * len(dataset)
    for scale, flipped in views:
        loader = make_loader(teacher_view(dataset, scale, flipped, max_proposals), 1, workers, collate, train=False)
        desc = f"teacher @{scale}{' flip' if flipped else ''}"
        for i, (images, targets) in enumerate(tqdm(loader, desc=desc, unit="img", disable=not progress)):
            out = model(**teacher_inputs(images, targets, device, convention, with_labels=False))[0]
            r = out["region_scores"].float().cpu()
            sums[i] = r if sums[i] is None else sums[i] + r
    regions = [s / len(views) for s in sums]
    proposals = [dataset.proposals.get(r.image_id)[0][: max_proposals or None] for r in dataset.records]
    return {"image_ids": [r.image_id for r in dataset.records],
            "image_scores": torch.stack([r.sum(0) for r in regions]).numpy() if regions else np.zeros((0, 0)),
            "region_scores": [r.numpy() for r in regions], "proposals": proposals}


@torch.no_grad()
def predict_student(model: nn.Module, dataset: MultiLabelDataset, convention: str, image_size: int,
                    device: torch.device, workers: int = 0, batch_size: int = 32, progress: bool = True) -> np.ndarray:
    """Sigmoid probabilities ``(N, K)`` float32 of the student on every image (warped to ``image_size``)."""
    model.eval()
    loader = make_loader(dataset.view(transform=Warp(image_size)), batch_size, workers, collate, train=False)
    scores = [torch.sigmoid(model(normalize(images.to(device), convention)).float()).cpu()
              for images, _ in tqdm(loader, desc="student", unit="batch", disable=not progress)]
    return torch.cat(scores).numpy() if scores else np.zeros((0, dataset.num_classes), np.float32)
