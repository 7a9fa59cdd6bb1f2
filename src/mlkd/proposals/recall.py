"""How well a proposal cache covers the ground-truth objects of a dataset (datasets with boxes only)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torchvision.ops import box_iou

from mlkd.data.base import MultiLabelDataset
from mlkd.errors import BadInput


def proposal_recall(dataset: MultiLabelDataset, cache, ious: Sequence[float] = (0.5, 0.7),
                    top_n: Sequence[int | None] = (None,)) -> dict[str, Any]:
    """Fraction of ground-truth boxes covered by some proposal at IoU >= t, for each t and proposal budget.

    Uses the first ``n`` proposals of each image (the cache keeps them ranked by score) for each ``n`` in
    ``top_n`` (``None`` = all). Also reports the mean number of proposals per image and the count of images
    with no proposal at all. Returns ``{"recall": {"all"|"top{n}": {"0.5": r, ...}}, "mean_proposals",
    "images_without_proposals", "num_gt"}``.
    """
    best: dict[str, list[np.ndarray]] = {_key(n): [] for n in top_n}
    counts, empty = [], 0
    for r in dataset.records:
        if r.boxes is None:
            raise BadInput(f"dataset {dataset.name!r} has no boxes (image {r.image_id!r}); recall needs them")
        boxes, _ = cache.get(r.image_id)
        counts.append(len(boxes))
        empty += len(boxes) == 0
        gt = torch.from_numpy(np.asarray(r.boxes, np.float32).reshape(-1, 4))
        for n in top_n:
            props = torch.from_numpy(boxes[:n] if n else boxes)
            if len(gt) and len(props):
                best[_key(n)].append(box_iou(gt, props).max(dim=1).values.numpy())  # (M,) best IoU per GT
            else:
                best[_key(n)].append(np.zeros(len(gt), np.float32))
    recall = {}
    for k, v in best.items():
        all_best = np.concatenate(v) if v else np.zeros(0)
        recall[k] = {f"{t:g}": float((all_best >= t).mean()) if all_best.size else float("nan") for t in ious}
    num_gt = int(sum(len(np.asarray(r.boxes).reshape(-1, 4)) for r in dataset.records))
    return {"recall": recall, "mean_proposals": float(np.mean(counts)) if counts else 0.0,
            "images_without_proposals": int(empty), "num_gt": num_gt}


def _key(n: int | None) -> str:
    return "all" if n is None else f"top{n}"
