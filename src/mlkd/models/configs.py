"""The model configs: everything needed to build a teacher or a student (saved in every checkpoint).

Training recipes (:mod:`mlkd.training.teacher`, :mod:`mlkd.training.student`) hold one of these as their ``model``
section; :func:`mlkd.models.build.model_from_checkpoint` rebuilds a model from the saved dict alone.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from mlkd.errors import BadInput
from mlkd.models.timm_backbone import PREFIX as TIMM
from mlkd.utils.config import SIZE, bounded

BACKBONES = ("vgg16", "resnet50", "resnet101", "tiny")  # the student's own (mlkd.models.backbones)
RELEASE_TEST_SCALE = 672  # the release's teacher input size (its test scale), the default where none is given
CHANNELS = (1, 65_536)  # feature widths: 0 leaves no layer, more is a typo that would exhaust memory


@dataclasses.dataclass
class TeacherModelConfig:
    """The WSDDN teacher (see :class:`mlkd.models.wsddn.WSDDN` for each knob)."""

    # resnet50_c4: Faster R-CNN C4 (ResNet-50 stem..layer3, frozen BatchNorm; layer4 + average pool as region head)
    backbone: Literal["vgg16", "tiny", "resnet50_c4"] = "vgg16"
    tiny_channels: tuple[int, ...] = bounded((16, 32, 64, 64), *CHANNELS)  # backbone=tiny only
    tiny_convs_per_block: int = bounded(1, 1, 16)  # backbone=tiny only
    # OICR's VGG16: the pool before the last block an identity, the last block's convolutions dilated by 2, the
    # stride halved (VGG16 conv5 at stride 8; vgg16 and tiny, mlkd.models.backbones.dilate_last_block)
    dilate_last_block: bool = False
    # ImageNet weights: VGG16 (a local file in torchvision layout or an `mlkd import-caffe` output) or, for
    # resnet50_c4, ResNet-50 (a local torchvision state dict); or torchvision:IMAGENET1K_V1 from the torch hub cache
    # (mlkd.models.weights)
    weights: str | None = None
    input_convention: Literal["caffe", "torchvision"] = "caffe"  # must match the weights
    hidden: int = bounded(4096, *CHANNELS)  # region feature width: fc6/fc7's (VGG16 4096); resnet50_c4: 2048
    roi_size: int = bounded(7, 1, 64)
    roi_op: Literal["roi_pool", "roi_align"] = "roi_pool"
    dropout: float = bounded(0.5, 0, 1)
    score_scale: float = 1.0
    score_bias: float = 0.0
    cls_temperature: float = bounded(1.0, 0, None, above=True)
    det_temperature: float = bounded(1.0, 0, None, above=True)
    reg_weight: float = bounded(0.0, 0, None)
    reg_iou: float = bounded(0.6, 0, 1)
    reg_top: int = bounded(10, 2, 10_000)
    # pool and run fc6 once per distinct rounded region (equal to 1e-7; False: all); resnet50_c4: its layer4 head
    # once per region of equal rounded cells and equal score factor, with roi_pool only (roi_align: every region)
    distinct_rois: bool = True
    # backbone blocks whose weights stay fixed: VGG [conv1, conv2] (Fast R-CNN's recipe); resnet50_c4 stages
    # stem, layer1 .. layer3 ([stem, layer1] is Faster R-CNN C4's)
    freeze: tuple[str, ...] = ()
    # OICR instance refinement (mlkd.models.refine): K streams on fc7, each trained on the previous one's
    # pseudo-labels (0: plain WSDDN; OICR's published K is 3); a region joins a class's top region at IoU >= refine_iou
    refine: int = bounded(0, 0, 16)
    refine_iou: float = bounded(0.5, 0, 1)
    refine_weight: float = bounded(1.0, 0, None)  # weight of each stream's loss beside WSDDN's (OICR: 1)
    # a refined teacher's image scores (classification, distillation's soft targets): WSDDN's p = sum_r S_r, the
    # scores its image-level loss trains ("wsddn"), or per class the best region's refined score ("refined")
    image_scores: Literal["wsddn", "refined"] = "wsddn"

    def validate(self) -> None:
        if self.dilate_last_block and self.backbone == "resnet50_c4":
            raise BadInput("model.dilate_last_block dilates a VGG-style backbone's last block (vgg16, tiny); "
                           "model.backbone is resnet50_c4: set model.dilate_last_block: false")
        if self.image_scores == "refined" and not self.refine:
            raise BadInput("model.image_scores: 'refined' takes the refinement streams' scores, but model.refine is "
                           "0 (no streams): set model.refine (e.g. 3) or model.image_scores: wsddn")


@dataclasses.dataclass
class StudentModelConfig:
    """The student classifier (see :class:`mlkd.models.student.Student`)."""

    backbone: str = "vgg16"  # one of BACKBONES, or timm/<timm model name> (the [timm] extra), e.g. timm/convnext_tiny
    tiny_channels: tuple[int, ...] = bounded((16, 32, 64, 64), *CHANNELS)
    tiny_convs_per_block: int = bounded(1, 1, 16)
    weights: str | None = None  # a local file, torchvision:<WEIGHTS> or timm:<arch>.<tag> (mlkd.models.weights)
    input_convention: Literal["caffe", "torchvision", "inception", "clip", "unit"] = "caffe"  # must match the weights
    hidden: int = bounded(4096, *CHANNELS)  # fc6/fc7 width (VGG) or the adapter's (ResNet): = the teacher's for L_f
    roi_size: int = bounded(7, 1, 64)
    dropout: float = bounded(0.5, 0, 1)
    image_size: int = bounded(224, *SIZE)  # the student's input: images are warped to image_size x image_size
    distinct_rois: bool = True  # region path: pool and run fc6/fc7 once per distinct rounded region
    freeze: tuple[str, ...] = ()  # backbone blocks whose weights stay fixed (VGG-style backbones: conv1 .. conv5)

    def validate(self) -> None:
        """The backbone's name: one mlkd builds, or ``timm/<name>`` (that timm knows the name is checked when the
        model is built, which imports timm)."""
        if self.backbone not in BACKBONES and not (self.backbone.startswith(TIMM) and len(self.backbone) > len(TIMM)):
            raise BadInput(f"model.backbone: {self.backbone!r} is not one of {list(BACKBONES)} or {TIMM}<timm model "
                           "name> (e.g. timm/convnext_tiny)")
