"""Region operations shared by the teacher and the student: per-image (segment) softmax over a flat
``(sum R_i, K)`` layout, RoI pooling of boxes given in pixels, and the flattening of per-image proposals.

Several images with different numbers of regions ``R_i`` are processed together as one flat tensor of
``N = sum_i R_i`` rows plus an image ``index (N,)``; nothing is padded.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align, roi_pool

from mlkd.errors import BadInput


def segment_softmax(logits: Tensor, index: Tensor, num_segments: int) -> Tensor:
    """Softmax over the rows of each segment, separately for every column.

    Args:
        logits (Tensor[N, K]): rows of all segments, concatenated.
        index (Tensor[N] int64): segment (image) of each row, values in [0, num_segments).
        num_segments: number of segments B.

    Returns:
        Tensor[N, K]: each column sums to 1 within each non-empty segment.
    """
    e = (logits - segment_max(logits, index, num_segments)[index]).exp()  # (N, K), <= 1: no overflow
    total = logits.new_zeros((num_segments, logits.shape[1])).index_add(0, index, e)
    return e / total[index]


def segment_max(values: Tensor, index: Tensor, num_segments: int) -> Tensor:
    """Column-wise maximum of the rows of each segment ``(num_segments, K)`` (0 for an empty segment)."""
    idx = index[:, None].expand(-1, values.shape[1])
    return values.new_zeros((num_segments, values.shape[1])).scatter_reduce(0, idx, values, "amax",
                                                                            include_self=False)


def pool_regions(fmap: Tensor, boxes: Tensor, index: Tensor, size: int, stride: int, op: str = "roi_pool") -> Tensor:
    """RoI features ``(N, C, size, size)`` of ``boxes (N, 4)`` (pixels) of images ``index (N,)`` on ``fmap``.

    ``op`` is ``"roi_pool"`` (Fast R-CNN max pooling, the release) or ``"roi_align"`` (aligned, 2 samples per
    bin). Computed in at least float32: torchvision's CPU kernels have no bfloat16, and box coordinates rounded
    to bfloat16 would move by up to 4 pixels at 832. The result has ``fmap``'s dtype.
    """
    dtype = torch.promote_types(fmap.dtype, torch.float32)
    rois = torch.cat([index[:, None].to(dtype), boxes.to(dtype)], dim=1)  # (N, 5) = (image, x1, y1, x2, y2)
    if op == "roi_pool":
        pooled = roi_pool(fmap.to(dtype), rois, size, 1.0 / stride)
    else:
        pooled = roi_align(fmap.to(dtype), rois, size, 1.0 / stride, sampling_ratio=2, aligned=True)
    return pooled.to(fmap.dtype)


def caffe_xavier_(layer: nn.Linear) -> None:
    """Caffe's "xavier" filler (uniform in +-sqrt(3 / fan_in)), zero bias: how the release initialised new layers."""
    bound = math.sqrt(3.0 / layer.in_features)
    nn.init.uniform_(layer.weight, -bound, bound)
    nn.init.zeros_(layer.bias)


def flatten_proposals(proposals: Sequence[Tensor], scores: Sequence[Tensor] | None) -> tuple[Tensor, Tensor, Tensor]:
    """Concatenate per-image proposals: boxes ``(N, 4)``, scores ``(N,)`` (1 where absent), image index ``(N,)``.

    Raises ``ValueError`` for an image with zero proposals: its detection softmax would be empty and its image
    scores 0, so the loss would be silently meaningless.
    """
    for i, b in enumerate(proposals):
        if b.ndim != 2 or b.shape[1] != 4:
            raise BadInput(f"proposals[{i}] must be Tensor[R, 4] (x1, y1, x2, y2), got shape {tuple(b.shape)}")
        if b.shape[0] == 0:
            raise BadInput(f"image {i} of the batch has zero proposals; WSDDN needs at least one region per "
                             "image (drop the image or regenerate its proposals)")
    boxes = torch.cat(list(proposals))
    if scores is None:
        flat_scores = boxes.new_ones(boxes.shape[0])
    else:
        if len(scores) != len(proposals) or any(s.shape != (b.shape[0],) for s, b in zip(scores, proposals)):
            raise BadInput("proposal_scores must be one Tensor[R_i] per image, matching the proposals")
        flat_scores = torch.cat(list(scores)).to(boxes.dtype)
    index = torch.cat([torch.full((b.shape[0],), i, dtype=torch.int64, device=boxes.device)
                       for i, b in enumerate(proposals)])
    return boxes, flat_scores, index


def roi_pool_cells(boxes: Tensor, index: Tensor, stride: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The feature-map cells ``torchvision.ops.roi_pool`` reads for each box: ``(N, 5)`` int64 rows (image,
    x1, y1, x2, y2), each coordinate times ``1 / stride`` in ``dtype`` (that of the pooling: see
    :func:`pool_regions`) and rounded half away from zero, exactly as its kernels do. Boxes with equal rows give
    equal pooled features."""
    scaled = boxes.to(dtype) * torch.tensor(1.0 / stride, dtype=dtype, device=boxes.device)  # (N, 4)
    rounded = torch.round(scaled)  # half to even: fix the exact halves to C's round (half away from zero)
    half = (scaled - torch.trunc(scaled)).abs() == 0.5
    rounded = torch.where(half, torch.trunc(scaled) + torch.sign(scaled), rounded)
    return torch.cat([index[:, None], rounded.long()], dim=1)


def distinct_regions(boxes: Tensor, index: Tensor, stride: int, fmap_dtype: torch.dtype,
                     extra: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(first, inverse)`` (:func:`distinct_rows`) over the regions that ``roi_pool`` reads identically from a map
    of ``fmap_dtype``: equal rounded cells (:func:`roi_pool_cells`, in the pooling's dtype, float32 at least) and,
    when given, equal ``extra (N, E)`` int64 columns."""
    cells = roi_pool_cells(boxes, index, stride, torch.promote_types(fmap_dtype, torch.float32))
    return distinct_rows(cells if extra is None else torch.cat([cells, extra], 1))


def distinct_rows(rows: Tensor) -> tuple[Tensor, Tensor]:
    """``(first, inverse)`` for ``rows (N, D)``: ``rows[first]`` are the distinct rows (one representative
    each, ``(U,)`` indices) and ``rows[first][inverse]`` equals ``rows``. On a GPU, ``torch.unique`` is the one
    host synchronisation of the distinct-region paths: the number of distinct rows sizes what follows."""
    unique, inverse = torch.unique(rows, dim=0, return_inverse=True)
    first = torch.empty(len(unique), dtype=torch.int64, device=rows.device)
    first.scatter_(0, inverse, torch.arange(len(rows), device=rows.device))
    return first, inverse
