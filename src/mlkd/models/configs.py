"""The model configs: everything needed to build a teacher or a student (saved in every checkpoint).

Training recipes (:mod:`mlkd.train_teacher`, :mod:`mlkd.train_student`) hold one of these as their ``model``
section; :func:`mlkd.models.build.model_from_checkpoint` rebuilds a model from the saved dict alone.
"""

from __future__ import annotations

import dataclasses
from typing import Literal


@dataclasses.dataclass
class TeacherModelConfig:
    """The WSDDN teacher (see :class:`mlkd.models.wsddn.WSDDN` for each knob)."""

    backbone: Literal["vgg16", "tiny"] = "vgg16"
    tiny_channels: tuple[int, ...] = (16, 32, 64, 64)  # backbone=tiny only
    tiny_convs_per_block: int = 1  # backbone=tiny only
    weights: str | None = None  # local ImageNet VGG16 file (torchvision layout, or an `mlkd import-caffe` output)
    input_convention: Literal["caffe", "torchvision"] = "caffe"  # must match the weights
    hidden: int = 4096
    roi_size: int = 7
    roi_op: Literal["roi_pool", "roi_align"] = "roi_pool"
    dropout: float = 0.5
    score_scale: float = 1.0
    score_bias: float = 0.0
    cls_temperature: float = 1.0
    det_temperature: float = 1.0
    reg_weight: float = 0.0
    reg_iou: float = 0.6
    reg_top: int = 10


@dataclasses.dataclass
class StudentModelConfig:
    """The student classifier (see :class:`mlkd.models.student.Student`)."""

    backbone: Literal["vgg16", "resnet50", "resnet101", "tiny"] = "vgg16"
    tiny_channels: tuple[int, ...] = (16, 32, 64, 64)
    tiny_convs_per_block: int = 1
    weights: str | None = None  # local ImageNet weights (torchvision layout or an `mlkd import-caffe` output)
    input_convention: Literal["caffe", "torchvision"] = "caffe"
    hidden: int = 4096  # fc6/fc7 width (VGG) or the adapter's (ResNet): must equal the teacher's for L_f
    roi_size: int = 7
    dropout: float = 0.5
    image_size: int = 224  # the student's input: images are warped to image_size x image_size
