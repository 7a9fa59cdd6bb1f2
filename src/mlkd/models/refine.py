"""Online instance classifier refinement (OICR, Tang et al. 2017) on top of the WSDDN teacher.

WSDDN's region scores tend to peak on the most discriminative part of an object. OICR adds ``K`` region
classifiers ("streams") on the same region features phi_r, each over ``C + 1`` classes (column 0 is background),
and trains stream k on labels that stream k-1 gives the regions of its own image (stream 0 is WSDDN's region
scores S). For image i, with the scores ``x (R_i, C)`` of the previous stream:

- every class c with label 1 gets its top-scoring region ``j_c = argmax_r x_{r,c}`` (a "seed") and the weight
  ``w_c = x_{j_c, c}``;
- every region r is assigned to the seed it overlaps most (IoU; on equal IoU the first seed in class order): its
  label is that seed's class when the IoU is at least ``iou`` (0.5), background otherwise, and in both cases its
  weight is that seed's ``w_c``;
- an image with no positive class has no seeds: its regions get weight 0 (no pseudo-labels at all);
- stream k's loss is the weighted cross-entropy ``-(1 / R_i) sum_r w_r log softmax(f_k(phi_r))_{y_r}``, averaged
  over the images of the batch like the WSDDN loss.

Pseudo-labels and weights are computed from detached scores: no gradient reaches the previous stream through its
labels. At test time the region scores are the mean over the K streams of their class probabilities, background
dropped (:func:`refined_region_scores`).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_iou

REFINE_IOU = 0.5  # OICR's I_t: regions at least this close to a seed take its class


@torch.no_grad()
def pseudo_labels(boxes: Tensor, scores: Tensor, index: Tensor, labels: Tensor, iou: float = REFINE_IOU
                  ) -> tuple[Tensor, Tensor]:
    """OICR's labels for one stream from the previous stream's class scores.

    Args:
        boxes (Tensor[N, 4]): the batch's regions (x1, y1, x2, y2). scores (Tensor[N, C]): the previous stream's
            class scores (WSDDN's S, or a refinement stream's probabilities without the background column).
        index (Tensor[N]): image of each row. labels (Tensor[B, C]): image labels; only 1 counts as present.

    Returns:
        targets (Tensor[N] int64): 0 for background, ``c + 1`` for class c. weights (Tensor[N]): each region's
        loss weight, the score of the seed it was assigned to (0 in an image without positive classes).
    """
    targets = torch.zeros(len(boxes), dtype=torch.int64, device=boxes.device)
    weights = scores.new_zeros(len(boxes))
    for i in range(labels.shape[0]):
        rows = (index == i).nonzero().squeeze(1)
        present = (labels[i] == 1).nonzero().squeeze(1)
        if rows.numel() == 0 or present.numel() == 0:
            continue
        mine = scores[rows][:, present]  # (R_i, P)
        seeds = mine.argmax(0)  # (P,) the top region of each present class
        seed_scores = mine.gather(0, seeds[None]).squeeze(0)  # (P,)
        overlap = box_iou(boxes[rows].float(), boxes[rows][seeds].float())  # (R_i, P)
        best, nearest = overlap.max(1)  # first maximum: the lowest class among seeds of equal IoU
        targets[rows] = torch.where(best >= iou, present[nearest] + 1, torch.zeros_like(nearest))
        weights[rows] = seed_scores[nearest]
    return targets, weights


def refine_loss(logits: Tensor, targets: Tensor, weights: Tensor, index: Tensor, num_images: int) -> Tensor:
    """Weighted cross-entropy of one stream's logits ``(N, C + 1)``: averaged over each image's regions, then
    over the ``num_images`` images (an image without pseudo-labels adds 0 and still counts)."""
    per_region = weights * F.cross_entropy(logits, targets, reduction="none")  # (N,)
    per_image = per_region.new_zeros(num_images).index_add(0, index, per_region)
    counts = torch.bincount(index, minlength=num_images).clamp(min=1).to(per_region.dtype)
    return (per_image / counts).sum() / num_images


def refinement_losses(stream_logits: Sequence[Tensor], wsddn_regions: Tensor, boxes: Tensor, index: Tensor,
                      labels: Tensor, iou: float = REFINE_IOU) -> list[Tensor]:
    """The K streams' losses: stream k learns the pseudo-labels of stream k-1 (stream 0: ``wsddn_regions``)."""
    losses, previous = [], wsddn_regions.detach()
    for logits in stream_logits:
        targets, weights = pseudo_labels(boxes, previous, index, labels, iou)
        losses.append(refine_loss(logits, targets, weights, index, labels.shape[0]))
        previous = F.softmax(logits.detach(), dim=1)[:, 1:]
    return losses


def refined_region_scores(stream_logits: Sequence[Tensor], temperature: float = 1.0) -> Tensor:
    """Region scores ``(N, C)`` at test time: the mean over streams of softmax(logits / T), background dropped."""
    return torch.stack([F.softmax(z / temperature, dim=1)[:, 1:] for z in stream_logits]).mean(0)

