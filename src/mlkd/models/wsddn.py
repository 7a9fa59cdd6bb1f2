"""The teacher T-WDet: a WSDDN-style weakly-supervised detector (Bilen & Vedaldi 2016, as the release ran it).

For an image with proposals ``b_r`` (r = 1..R) and a K-class problem::

    phi_r   = fc7(fc6(RoIPool(conv(x), b_r) * (score_scale * s_r + score_bias)))    region features (R, D)
    S^c     = softmax over classes k of fc8_c(phi_r) / T_c                           classification stream
    S^d     = softmax over regions r of fc8_d(phi_r) / T_d                           detection stream
    S       = S^c * S^d                                                              region scores (R, K)
    p_k     = sum_r S_{r,k}  in (0, 1)                                               image scores (K,)
    s'_r    = sum_k S_{r,k}                                                          objectness (mlkd's choice)
    L_cls   = mean over images of sum_k BCE(clamp(p_k, 1e-4, 1 - 1e-4), y_k)   (y_k = -1 ignored)

The region head is fc6/fc7 (the release's VGG16) or a given module: Faster R-CNN C4's ``layer4`` + average pool
(:class:`mlkd.models.backbones.Res5Head`) gives ``phi_r = mean(layer4(RoIAlign(layer3(x), b_r) * factor_r))``.

Optional spatial regulariser (original WSDDN), for each image and each positive class k: with r* the best
region of k and N the other regions among k's top ``reg_top`` whose IoU with r* exceeds ``reg_iou``, the
gradient is that of::

    L_reg = reg_weight * mean over images of sum_k sum_{r in N} 0.5 * S_{r,k} * ||phi_r - phi_r*||^2

with S treated as a constant (the released MatConvNet layer's backward, summed over classes), while its value
is the one that layer computes and logs, S squared: ``0.5 * S_{r,k}^2 * ||phi_r - phi_r*||^2``
(:func:`spatial_regulariser`).

OICR refinement (``refine > 0`` streams, :mod:`mlkd.models.refine`): each stream is a (K+1)-way region classifier
on the same phi_r (column 0 background), trained on the previous stream's pseudo-labels (stream 0 = S), its
loss added to L_cls. At test time the streams replace S: the region scores are the mean of their class
probabilities, and the image scores stay WSDDN's p (``image_scores="wsddn"``) or are each class's best refined
region score (``"refined"``).

Several images of different R are processed together: the detection softmax and the sum over regions run per
image (segment operations over a flat ``(sum R_i, K)`` layout), never over padding.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, box_iou

from mlkd.errors import BadInput
from mlkd.models.ops import (caffe_xavier_, distinct_regions, flatten_proposals, pool_regions, segment_max,
                             segment_softmax)
from mlkd.models.refine import REFINE_IOU, refined_region_scores, refinement_losses
from mlkd.utils import autotune

P_CLAMP = 1e-4  # image scores are clamped to [P_CLAMP, 1 - P_CLAMP] in the loss (the release's value)


def wsddn_scores(cls_logits: Tensor, det_logits: Tensor, index: Tensor, num_images: int,
                 cls_temperature: float = 1.0, det_temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Region scores S ``(N, K)`` and image scores p ``(B, K)`` from the two streams' logits ``(N, K)``.

    Logits are divided by their temperature (T = 0.5 doubles them, as the release does for distillation).
    """
    s_cls = F.softmax(cls_logits / cls_temperature, dim=1)  # over classes, per region
    s_det = segment_softmax(det_logits / det_temperature, index, num_images)  # over regions, per image
    regions = s_cls * s_det
    return regions, regions.new_zeros((num_images, regions.shape[1])).index_add(0, index, regions)


def wsddn_loss(image_scores: Tensor, labels: Tensor) -> Tensor:
    """Binary log loss of image scores ``(B, K)`` against labels ``(B, K)`` in {1, 0, -1 = ignore}:
    clamped to [1e-4, 1 - 1e-4], summed over classes, averaged over images."""
    p = image_scores.clamp(P_CLAMP, 1 - P_CLAMP)
    y = labels.clamp(min=0).to(p.dtype)
    # Written out: F.binary_cross_entropy raises inside CUDA autocast ("unsafe to autocast"), even on float32.
    loss = -(y * p.log() + (1 - y) * (1 - p).log())  # (B, K)
    return (loss * (labels >= 0)).sum() / image_scores.shape[0]


def spatial_regulariser(features: Tensor, boxes: Tensor, regions: Tensor, index: Tensor, labels: Tensor,
                        iou: float = 0.6, top: int = 10) -> Tensor:
    """The WSDDN spatial regulariser, summed over images' positive classes and averaged over images.

    Its value is what the original MatConvNet layer (``LossTopBoxSmoothProb``) computes and logs, and its
    gradient is the layer's backward; the two do not belong to one function. For each positive class k
    (r* its best region, N its neighbours):
    - value: the layer squares the S-weighted difference, ``0.5 * sum_{r in N} ||S_{r,k} (phi_r - phi_r*)||^2``,
      and sums it over classes;
    - gradient: ``S_{r,k} (phi_r - phi_r*)`` at each r in N, minus their sum at r*, the gradient of
      ``0.5 * sum_{r in N} S_{r,k} ||phi_r - phi_r*||^2`` with S constant. Over classes it is summed here; the
      layer assigns class after class, so where two positive classes share a region the last one wins.
    Returned as ``grad_path + (value - grad_path).detach()``: the value of the first, the gradient of the second.

    Args:
        features (Tensor[N, D]): region features phi (fc7). boxes (Tensor[N, 4]): their proposals (x1, y1, x2, y2).
        regions (Tensor[N, K]): region scores S (used as constant weights). index (Tensor[N]): image of each row.
        labels (Tensor[B, K]): image labels; only 1 counts as positive.
    """
    weights = regions.detach()
    grad_path, value = features.new_zeros(()), features.new_zeros(())
    for i in range(labels.shape[0]):
        rows = (index == i).nonzero().squeeze(1)
        classes = (labels[i] == 1).nonzero().squeeze(1)
        if rows.numel() < 2 or classes.numel() == 0:
            continue
        scores, ranked = weights[rows][:, classes].topk(min(top, rows.numel()), dim=0)  # (T, P) each
        best = rows[ranked[0]]  # (P,) r* of each positive class
        others = rows[ranked[1:]]  # (T-1, P)
        overlap = box_iou(boxes[best], boxes[rows]).gather(1, ranked[1:].T).T  # (T-1, P) IoU with r*
        near = (overlap > iou).to(features.dtype) * scores[1:]
        dist = (features[others] - features[best][None]).pow(2).sum(-1)  # (T-1, P)
        grad_path = grad_path + 0.5 * (near * dist).sum()
        value = value + 0.5 * (near * scores[1:] * dist).sum().detach()
    return (grad_path + (value - grad_path).detach()) / labels.shape[0]


class WSDDN(nn.Module):
    """Backbone + RoI pooling + region head (fc6/fc7, or ``head``) + two K-way streams (fc8_c, fc8_d) + optional
    (K+1)-way OICR refinement streams (``refine``).

    Args:
        backbone: a module with ``out_channels`` and ``stride`` (see :mod:`mlkd.models.backbones`).
        num_classes: K.
        hidden: width of the region features the streams read: fc6/fc7's (4096 for VGG16), or ``head``'s.
        roi_size: RoI pooling output (7 for VGG16's fc6); roi_op: ``"roi_pool"`` (Fast R-CNN, the release)
            or ``"roi_align"``.
        dropout: after fc6 and fc7 (0.5).
        score_scale, score_bias: pooled features are multiplied by ``score_scale * s_r + score_bias``
            (release (1, 0); original WSDDN (10, 1)).
        cls_temperature, det_temperature: the streams' logits are divided by these (WSDDN preset: T_d = 2).
        reg_weight, reg_iou, reg_top: spatial regulariser (off when ``reg_weight == 0``).
        distinct_rois: compute RoI pooling and fc6's product once per distinct rounded region (see
            :meth:`region_layers`); False runs every proposal through them.
        head: None for fc6/fc7 (the release), or a module with ``out_features`` mapping pooled regions
            ``(N, C, roi_size, roi_size)`` to features ``(N, hidden)`` (Faster R-CNN C4:
            :class:`~mlkd.models.backbones.Res5Head`).
        refine: number K of OICR refinement streams (0: plain WSDDN); refine_iou: the IoU that joins a region to
            a seed (0.5); refine_weight: weight of each stream's loss (1); image_scores: ``"wsddn"`` or
            ``"refined"``, the image scores of a refined teacher (see :meth:`scores`).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, hidden: int = 4096, roi_size: int = 7,
                 roi_op: str = "roi_pool", dropout: float = 0.5, score_scale: float = 1.0, score_bias: float = 0.0,
                 cls_temperature: float = 1.0, det_temperature: float = 1.0, reg_weight: float = 0.0,
                 reg_iou: float = 0.6, reg_top: int = 10, distinct_rois: bool = True,
                 head: nn.Module | None = None, refine: int = 0, refine_iou: float = REFINE_IOU,
                 refine_weight: float = 1.0, image_scores: str = "wsddn") -> None:
        super().__init__()
        if roi_op not in ("roi_pool", "roi_align"):
            raise BadInput(f"roi_op must be 'roi_pool' or 'roi_align', got {roi_op!r}")
        self.backbone = backbone
        self.roi_op, self.roi_size = roi_op, roi_size
        if head is None:
            self.fc6 = nn.Linear(backbone.out_channels * roi_size * roi_size, hidden)
            self.fc7 = nn.Linear(hidden, hidden)
        elif head.out_features != hidden:
            raise BadInput(f"hidden (model.hidden) is the width of the region features: {head.out_features} for a "
                           f"{type(head).__name__} region head, got {hidden} (set model.hidden: {head.out_features})")
        self.head = head
        self.drop = nn.Dropout(dropout)
        self.fc8_c = nn.Linear(hidden, num_classes)
        self.fc8_d = nn.Linear(hidden, num_classes)
        for layer in ((self.fc6, self.fc7) if head is None else ()) + (self.fc8_c, self.fc8_d):
            caffe_xavier_(layer)
        self.score_scale, self.score_bias = score_scale, score_bias
        self.cls_temperature, self.det_temperature = cls_temperature, det_temperature
        self.reg_weight, self.reg_iou, self.reg_top = reg_weight, reg_iou, reg_top
        self.distinct_rois = distinct_rois
        if image_scores not in ("wsddn", "refined") or (image_scores == "refined" and not refine):
            raise BadInput(f"image_scores must be 'wsddn' or, with refinement streams (refine > 0), 'refined'; got "
                           f"{image_scores!r} with refine {refine}")
        self.refine = nn.ModuleList(nn.Linear(hidden, num_classes + 1) for _ in range(refine))  # after fc8: same RNG
        for layer in self.refine:
            caffe_xavier_(layer)
        self.refine_iou, self.refine_weight, self.image_scores = refine_iou, refine_weight, image_scores

    @property
    def num_classes(self) -> int:
        return self.fc8_c.out_features

    @property
    def feature_width(self) -> int:
        """Width D of the region features phi that the streams read (``hidden``)."""
        return self.fc8_c.in_features

    @property
    def region_layer_names(self) -> tuple[str, ...]:
        """The keys of :meth:`region_layers`: ``fc6``, ``fc7`` for the fc head; only ``fc7`` for a ``head``."""
        return ("fc6", "fc7") if self.head is None else ("fc7",)

    def pool(self, fmap: Tensor, boxes: Tensor, index: Tensor) -> Tensor:
        """RoI features ``(N, C, s, s)`` of ``boxes (N, 4)`` (image pixels) on ``fmap (B, C, h, w)``."""
        return pool_regions(fmap, boxes, index, self.roi_size, self.backbone.stride, self.roi_op)

    def region_layers(self, fmap: Tensor, boxes: Tensor, scores: Tensor, index: Tensor) -> dict[str, Tensor]:
        """Region features ``(N, hidden)`` by layer: ``fc6`` and ``fc7`` after ReLU (fc7's input is the dropped-out
        fc6); with a ``head``, only ``fc7``, the head's output. ``fc7`` always names the features the streams read
        (before dropout), which is what distillation's L_f matches by default.

        With ``distinct_rois`` (and RoI max pooling), boxes that round to the same feature-map cells are pooled
        and multiplied by fc6's weight once: since fc6 is linear, ``fc6(c_r * x) = c_r * (W x) + b`` for each
        proposal's score factor ``c_r``, and the gradient flows back through the same index. Equal to the
        per-region computation up to float rounding (about 1e-7 relative). A ``head`` is not linear: see
        :meth:`head_features`.
        """
        factor = (self.score_scale * scores + self.score_bias)[:, None]  # (N, 1): the proposal score scaling
        if self.head is not None:
            return {"fc7": self.head_features(fmap, boxes, factor, index)}
        distinct = self.distinct_rois and self.roi_op == "roi_pool" and self._distinct_pays(fmap, boxes, factor, index)
        fc6 = F.relu(self._fc6(fmap, boxes, factor, index, distinct))
        return {"fc6": fc6, "fc7": F.relu(self.fc7(self.drop(fc6)))}

    def _fc6(self, fmap: Tensor, boxes: Tensor, factor: Tensor, index: Tensor, distinct: bool) -> Tensor:
        """fc6 before its ReLU ``(N, hidden)`` of the regions scaled by ``factor (N, 1)``: per region, or with
        ``distinct`` pooled and multiplied by W once per distinct rounded region (``c_r * (W x) + b``)."""
        if distinct:
            first, inverse = distinct_regions(boxes, index, self.backbone.stride, fmap.dtype)
            pooled = self.pool(fmap, boxes[first], index[first])  # (U, C, s, s), U distinct regions
            wx = pooled.flatten(1) @ self.fc6.weight.to(pooled.dtype).T  # (U, hidden): W x, once per region
            return factor.to(wx.dtype) * wx[inverse] + self.fc6.bias.to(wx.dtype)  # (N, hidden)
        pooled = self.pool(fmap, boxes, index)  # (N, C, s, s)
        return self.fc6((pooled * factor.to(pooled.dtype)[:, :, None, None]).flatten(1))

    def _distinct_pays(self, fmap: Tensor, boxes: Tensor, factor: Tensor, index: Tensor) -> bool:
        """Whether the distinct-region fc6 is the faster one here. Its bookkeeping (rounding every box, finding the
        distinct ones, gathering back) costs more than it saves when few regions repeat or fc6 is cheap: at 500
        proposals on an AVX2 CPU it was slower than the plain path. Timed once per (machine, map size, proposal
        count class) by :func:`mlkd.utils.autotune.fastest`; both give the same values up to float rounding."""
        train = torch.is_grad_enabled() and self.fc6.weight.requires_grad
        shape = (f"{autotune.size_class(fmap.shape[2] * fmap.shape[3] * self.backbone.stride ** 2)} "
                 f"R~2^{max(len(boxes), 1).bit_length() - 1} {'train' if train else 'eval'}")

        def cost(distinct: bool) -> None:
            with torch.set_grad_enabled(train):
                x = fmap.detach().requires_grad_(train)
                out = self._fc6(x, boxes, factor.detach(), index, distinct)
                if train:
                    torch.autograd.grad(out.sum(), [x, self.fc6.weight])

        name = f"wsddn fc6 {tuple(self.fc6.weight.shape)} roi {self.roi_size}"
        return autotune.fastest(name, shape, {"distinct": lambda: cost(True), "per-region": lambda: cost(False)},
                                "distinct", fmap.device) == "distinct"

    def head_features(self, fmap: Tensor, boxes: Tensor, factor: Tensor, index: Tensor) -> Tensor:
        """``head(RoIPool(fmap, b_r) * c_r)`` ``(N, hidden)`` for score factors ``factor (N, 1)``.

        The head is not linear (ReLUs, biases), so ``c_r`` cannot be applied after it as after fc6. With
        ``distinct_rois`` and RoI max pooling, regions whose rounded cells AND factors are equal have equal inputs:
        the head runs once per such group (proposal scores that all differ leave nothing to share). RoIAlign
        samples each exact box, so every region runs. Proposal scores are inputs, never trained: in a shared group
        only the first region's score would receive a gradient.
        """
        if self.distinct_rois and self.roi_op == "roi_pool":
            bits = factor.to(torch.float64).contiguous().view(torch.int64)  # (N, 1): equal factors, equal bits
            first, inverse = distinct_regions(boxes, index, self.backbone.stride, fmap.dtype, bits)
            pooled = self.pool(fmap, boxes[first], index[first])  # (U, C, s, s)
            return self.head(pooled * factor[first].to(pooled.dtype)[:, :, None, None])[inverse]
        pooled = self.pool(fmap, boxes, index)  # (N, C, s, s)
        return self.head(pooled * factor.to(pooled.dtype)[:, :, None, None])

    def forward_regions(self, fmap: Tensor, boxes: Tensor, scores: Tensor, index: Tensor) -> Tensor:
        """Region features phi ``(N, hidden)`` (fc7 or the head's output, after dropout)."""
        return self.drop(self.region_layers(fmap, boxes, scores, index)["fc7"])

    def forward_streams(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """Logits of the classification and detection streams, each ``(N, K)``."""
        return self.fc8_c(features), self.fc8_d(features)

    def forward(self, images: Tensor, proposals: Sequence[Tensor], proposal_scores: Sequence[Tensor] | None = None,
                labels: Tensor | None = None) -> dict[str, Any] | list[dict[str, Tensor]]:
        """Training (``self.training``, ``labels (B, K)`` given): a dict of named losses.
        Eval: per image a dict with ``region_scores (R_i, K)``, ``image_scores (K,)``, ``objectness (R_i,)``.

        Args:
            images (Tensor[B, 3, H, W]): normalised input. proposals: B tensors ``(R_i, 4)``, pixels of ``images``.
            proposal_scores: B tensors ``(R_i,)`` or None (every s_r = 1).
        """
        if len(proposals) != images.shape[0]:
            raise BadInput(f"got {len(proposals)} proposal tensors for a batch of {images.shape[0]} images")
        boxes, scores, index = flatten_proposals(proposals, proposal_scores)
        features = self.forward_regions(self.backbone(images), boxes, scores, index)  # (N, D)
        if not self.training:
            regions, image_scores = self.scores(features, index, images.shape[0])
            return [{"region_scores": r, "image_scores": p, "objectness": r.sum(1)}
                    for r, p in zip(regions.split([len(b) for b in proposals]), image_scores)]
        if labels is None:
            raise BadInput("training needs labels (B, K)")
        cls_logits, det_logits, streams = self.stream_logits(features)
        regions, image_scores = wsddn_scores(cls_logits, det_logits, index, images.shape[0], self.cls_temperature,
                                             self.det_temperature)
        losses = {"loss_cls": wsddn_loss(image_scores, labels)}
        if self.reg_weight > 0:
            reg = spatial_regulariser(features.to(regions.dtype), boxes, regions, index, labels, self.reg_iou,
                                      self.reg_top)
            losses["loss_reg"] = self.reg_weight * reg
        for k, loss in enumerate(refinement_losses(streams, regions, boxes, index, labels, self.refine_iou)):
            losses[f"loss_refine{k + 1}"] = self.refine_weight * loss
        return losses

    def stream_logits(self, features: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Logits of every stream on region features ``(N, D)``, in float32 at least (scores and losses are):
        fc8_c and fc8_d ``(N, K)`` each, and the refinement streams' ``(N, K + 1)`` (none for plain WSDDN)."""
        up = torch.promote_types(features.dtype, torch.float32)
        cls_logits, det_logits = self.forward_streams(features)
        return cls_logits.to(up), det_logits.to(up), [stream(features).to(up) for stream in self.refine]

    def scores(self, features: Tensor, index: Tensor, num_images: int, temperature: float | None = None
               ) -> tuple[Tensor, Tensor]:
        """Test-time region scores ``(N, K)`` and image scores ``(B, K)`` of region features ``(N, D)``
        (:meth:`scores_of` their :meth:`stream_logits`)."""
        return self.scores_of(self.stream_logits(features), index, num_images, temperature)

    def scores_of(self, logits: tuple[Tensor, Tensor, list[Tensor]], index: Tensor, num_images: int,
                  temperature: float | None = None) -> tuple[Tensor, Tensor]:
        """Test-time region scores ``(N, K)`` and image scores ``(B, K)`` from :meth:`stream_logits`. ``temperature``
        divides every stream's logits (None: each stream's own, 1 for the refinement streams), as distillation's
        soft targets ask.

        Plain WSDDN: S and p. Refined: the mean of the refinement streams' class probabilities, and as image scores
        WSDDN's p (``image_scores="wsddn"``: the scores its image-level loss trains) or, per class, the best
        region's refined score (``"refined"``)."""
        cls_logits, det_logits, streams = logits
        temps = (self.cls_temperature, self.det_temperature) if temperature is None else (temperature,) * 2
        regions, image_scores = wsddn_scores(cls_logits, det_logits, index, num_images, *temps)
        if not streams:
            return regions, image_scores
        refined = refined_region_scores(streams, temperature or 1.0)
        return refined, image_scores if self.image_scores == "wsddn" else segment_max(refined, index, num_images)


# -- post-processing: detections and localisation from region scores ------------------------------------------
NMS_IOU = 0.4  # per-class NMS on region scores before detection AP (WSDDN's evaluation)


def class_detections(proposals: np.ndarray, regions: np.ndarray, nms_iou: float = NMS_IOU,
                     max_per_class: int = 100, score_threshold: float = 0.0, max_detections: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Detections of one image: every (proposal, class) scored by ``regions`` ``(R, K)``, per-class NMS, the
    best ``max_per_class`` of each class kept, then those scoring at least ``score_threshold``, at most
    ``max_detections`` in all (the best; None: all). Returns boxes ``(D, 4)``, scores ``(D,)``, labels ``(D,)``,
    best first. Evaluation (detection AP) keeps every detection: the defaults."""
    r, k = regions.shape
    boxes = torch.from_numpy(np.repeat(proposals[None], k, 0).reshape(-1, 4))  # (K * R, 4), class-major
    scores = torch.from_numpy(np.ascontiguousarray(regions.T).reshape(-1))
    labels = torch.arange(k).repeat_interleave(r)
    kept = batched_nms(boxes, scores, labels, nms_iou)  # sorted by score
    per_class_rank = _rank_within(labels[kept])
    kept = kept[(per_class_rank < max_per_class) & (scores[kept] >= score_threshold)][:max_detections]
    return boxes[kept].numpy(), scores[kept].numpy(), labels[kept].numpy()


def _rank_within(labels: Tensor) -> Tensor:
    """Position of each entry among the earlier entries of the same label (0 for the first of each label)."""
    order = torch.argsort(labels, stable=True)
    sorted_labels = labels[order]
    starts = torch.searchsorted(sorted_labels, sorted_labels, right=False)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(labels)) - starts
    return rank


def top_boxes(proposals: Sequence[np.ndarray], regions: Sequence[np.ndarray]) -> np.ndarray:
    """The best proposal of every class in every image: ``(N, K, 4)`` (CorLoc's input)."""
    return np.stack([p[r.argmax(0)] for p, r in zip(proposals, regions)])
