"""The student S-Cls: a plain multi-label classifier that can also describe proposal regions (for stage 1).

VGG-style students (``vgg16`` as in the release, ``tiny`` for tests and the demo)::

    image:   conv -> pool5 -> (B, C, s, s) -> fc6 -> fc7 -> fc8 -> logits z (B, K)
    regions: conv -> RoIPool(boxes, s x s, 1/stride) -> fc6 -> fc7 -> region features (N, hidden)

The region path reuses the image path's fc6/fc7 (for VGG16 at 224, pool5 is exactly a 7x7 grid, like the
RoI pooling), so stage-1 distillation shapes the same layers that classify.

ResNet students (``resnet50``/``resnet101``; no fc6/fc7 in the network) use an equivalent head: image path
layer4 -> global average pool -> fc (K); region path RoIAlign(layer4, 7x7, 1/32) -> average pool ->
``adapter`` (a linear map 2048 -> the teacher's feature width, as FitNets' regressor), trained by L_f and
dropped at test time. Students on timm backbones (``timm/<name>``: ConvNeXt, EfficientNet, ViT patch-token maps,
...) use this same pooled head on their last feature map (C channels, stride s: 1/s for the RoIAlign).
"""

from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from mlkd.errors import BadInput
from mlkd.models.ops import caffe_xavier_, distinct_regions, pool_regions


class Student(nn.Module):
    """A multi-label classifier with a region-feature path.

    Args:
        backbone: feature extractor with ``out_channels`` and ``stride`` (VGG: without pool5).
        num_classes: K.
        head: ``"vgg"`` (pool5 + fc6/fc7 shared by both paths) or ``"resnet"`` (avgpool + fc; adapter for regions;
            every non-VGG backbone).
        hidden: fc6/fc7 width (VGG head); for the ResNet head, the adapter's output width.
        roi_size: pool5 grid and RoI pooling size (VGG head).
        dropout: after fc6 and fc7 in the image path (VGG head).
        distinct_rois: in the region path (VGG head), pool and run fc6/fc7 once per distinct rounded region
            (regions whose boxes round to the same cells have equal features); False computes every box.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, head: str = "vgg", hidden: int = 4096,
                 roi_size: int = 7, dropout: float = 0.5, distinct_rois: bool = True) -> None:
        super().__init__()
        if head not in ("vgg", "resnet"):
            raise BadInput(f"student head must be 'vgg' or 'resnet', got {head!r}")
        self.backbone, self.head, self.roi_size, self.distinct_rois = backbone, head, roi_size, distinct_rois
        c = backbone.out_channels
        if head == "vgg":
            self.pool5 = nn.MaxPool2d(2, 2)
            self.fc6 = nn.Linear(c * roi_size * roi_size, hidden)
            self.fc7 = nn.Linear(hidden, hidden)
            self.drop = nn.Dropout(dropout)
            self.fc8 = nn.Linear(hidden, num_classes)
            for layer in (self.fc6, self.fc7, self.fc8):
                caffe_xavier_(layer)
        else:
            self.fc = nn.Linear(c, num_classes)
            self.adapter = nn.Linear(c, hidden)
            caffe_xavier_(self.fc)
            caffe_xavier_(self.adapter)

    @property
    def num_classes(self) -> int:
        return (self.fc8 if self.head == "vgg" else self.fc).out_features

    @property
    def region_width(self) -> int:
        """Width of the region features :meth:`forward_regions` returns (``hidden``: fc6/fc7's, or the adapter's)."""
        return (self.fc7 if self.head == "vgg" else self.adapter).out_features

    def forward_logits(self, fmap: Tensor) -> Tensor:
        """Image logits ``(B, K)`` from the backbone map ``(B, C, h, w)``."""
        if self.head == "resnet":
            return self.fc(fmap.mean((2, 3)))
        x = F.adaptive_avg_pool2d(self.pool5(fmap), self.roi_size)  # identity for VGG16 at 224: 7x7 already
        x = self.drop(F.relu(self.fc6(x.flatten(1))))
        return self.fc8(self.drop(F.relu(self.fc7(x))))

    def forward_regions(self, fmap: Tensor, boxes: Tensor, index: Tensor, layers: Sequence[str] = ("fc7",)
                        ) -> dict[str, Tensor]:
        """Region features of ``boxes (N, 4)`` (pixels of the student's input) of images ``index (N,)``.

        Returns ``{layer: (N, D)}`` for the requested ``layers`` (VGG head: ``fc6``/``fc7`` after ReLU, before
        dropout; ResNet head: ``fc7`` = the adapter's output).
        """
        if self.head == "resnet":
            if set(layers) - {"fc7"}:
                raise BadInput(f"a ResNet student has only the 'fc7' (adapter) region features, asked {layers}")
            pooled = pool_regions(fmap, boxes, index, self.roi_size, self.backbone.stride, "roi_align")
            return {"fc7": self.adapter(pooled.mean((2, 3)))}
        inverse = None
        if self.distinct_rois:  # equal rounded cells give equal features: compute each distinct region once
            first, inverse = distinct_regions(boxes, index, self.backbone.stride, fmap.dtype)
            boxes, index = boxes[first], index[first]
        pooled = pool_regions(fmap, boxes, index, self.roi_size, self.backbone.stride)  # (N or U, C, s, s)
        out = {"fc6": F.relu(self.fc6(pooled.flatten(1)))}
        out["fc7"] = F.relu(self.fc7(out["fc6"]))
        return {k: out[k] if inverse is None else out[k][inverse] for k in layers}

    def forward(self, images: Tensor) -> Tensor:
        """Logits z ``(B, K)`` of normalised images ``(B, 3, H, W)``; probabilities are ``sigmoid(z)``."""
        return self.forward_logits(self.backbone(images))


def label_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """L_p: sigmoid cross-entropy of logits ``(B, K)`` against labels ``(B, K)`` in {1, 0, -1 = ignore},
    summed over classes and averaged over images."""
    valid = (labels >= 0).to(logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits, labels.clamp(min=0).to(logits.dtype), reduction="none")
    return (loss * valid).sum() / logits.shape[0]
