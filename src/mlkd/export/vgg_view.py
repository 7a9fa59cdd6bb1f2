"""A VGG-head student as a plain VGG classifier, the form both the Caffe and the ONNX export write."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mlkd.errors import BadInput
from mlkd.export.shapes import feature_sizes


class VggDeployView(nn.Module):
    """A VGG-head :class:`~mlkd.models.student.Student` as a plain VGG classifier (the converter's contract):
    ``features`` = backbone + pool5; the student's adaptive average pooling to ``roi_size`` folded into ``fc6``
    (both are linear, so the product is exact up to float rounding; identity when pool5 is already roi_size)."""

    def __init__(self, student: nn.Module, image_size: int) -> None:
        super().__init__()
        self.features = nn.Sequential(*student.backbone.features, student.pool5)
        h, w = feature_sizes(self.features, (image_size, image_size), caffe=False)[-1]
        self.fc6 = fold_adaptive_pool(student.fc6, student.backbone.out_channels, (h, w), student.roi_size)
        self.fc7, self.fc8, self.drop = student.fc7, student.fc8, student.drop
        self.grid = (h, w)  # pool5's output at image_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.drop(F.relu(self.fc6(self.features(images).flatten(1))))  # (B, hidden)
        return self.fc8(self.drop(F.relu(self.fc7(x))))


def fold_adaptive_pool(fc: nn.Linear, channels: int, hw: tuple[int, int], side: int) -> nn.Linear:
    """``fc`` reading ``adaptive_avg_pool2d(x, side)`` of ``x (C, h, w)`` as one Linear reading ``x`` itself."""
    h, w = hw
    if (h, w) == (side, side):
        return fc
    if h < 1 or w < 1:
        raise BadInput(f"pool5 gives a {h}x{w} map at this input size; the student needs at least 1x1")
    basis = torch.eye(h * w, dtype=torch.float64).view(h * w, 1, h, w)
    pool = F.adaptive_avg_pool2d(basis, side).view(h * w, side * side)  # (hw, ss): input cell -> output cell weight
    weight = fc.weight.detach().double().view(fc.out_features, channels, side * side) @ pool.T  # (D, C, hw)
    folded = nn.Linear(channels * h * w, fc.out_features)
    with torch.no_grad():
        folded.weight.copy_(weight.reshape(fc.out_features, -1).float())
        folded.bias.copy_(fc.bias.detach())
    return folded
