"""Building models: a teacher or a student from its config, ImageNet weights mapped onto it, and any model
rebuilt from a checkpoint alone (:func:`model_from_checkpoint`)."""

from __future__ import annotations

from typing import Any

from torch import nn

from mlkd.errors import BadInput
from mlkd.models.backbones import build_backbone, dilate_last_block, freeze, load_imagenet_weights, resnet50_c4
from mlkd.models.configs import StudentModelConfig, TeacherModelConfig
from mlkd.models.student import Student
from mlkd.models.timm_backbone import is_timm, timm_backbone
from mlkd.models.weights import resolve_weights
from mlkd.models.wsddn import WSDDN
from mlkd.utils.config import from_dict

# torchvision VGG16 state-dict prefixes -> teacher / student prefixes (the 1000-way classifier.6 is not used)
VGG16_IMAGENET = {"features.": "backbone.features.", "classifier.0.": "fc6.", "classifier.3.": "fc7."}
# torchvision ResNet prefixes -> student prefixes (the 1000-way fc is not used)
RESNET_IMAGENET = {"conv1.": "backbone.conv1.", "bn1.": "backbone.bn1.", **{
    f"layer{i}.": f"backbone.layer{i}." for i in range(1, 5)}}
# torchvision ResNet-50 prefixes -> the resnet50_c4 teacher's: layer4 is its region head (the fc is not used)
RESNET50_C4_IMAGENET = {**{k: v for k, v in RESNET_IMAGENET.items() if k != "layer4."}, "layer4.": "head.layer4."}

MODEL_CONFIGS = {"teacher": TeacherModelConfig, "student": StudentModelConfig}


def build_teacher(cfg: TeacherModelConfig, num_classes: int) -> WSDDN:
    """A WSDDN from its config; ImageNet weights (VGG16: backbone, fc6, fc7; resnet50_c4: backbone and the layer4
    region head) from ``cfg.weights`` when given."""
    if cfg.backbone == "resnet50_c4":
        backbone, head = resnet50_c4()
    else:
        backbone = build_backbone(cfg.backbone, channels=cfg.tiny_channels, convs_per_block=cfg.tiny_convs_per_block)
        head = None
        if cfg.dilate_last_block:
            backbone = dilate_last_block(backbone)
    model = WSDDN(backbone, num_classes, hidden=cfg.hidden, roi_size=cfg.roi_size, roi_op=cfg.roi_op,
                  dropout=cfg.dropout, score_scale=cfg.score_scale, score_bias=cfg.score_bias,
                  cls_temperature=cfg.cls_temperature, det_temperature=cfg.det_temperature,
                  reg_weight=cfg.reg_weight, reg_iou=cfg.reg_iou, reg_top=cfg.reg_top, distinct_rois=cfg.distinct_rois,
                  head=head, refine=cfg.refine, refine_iou=cfg.refine_iou, refine_weight=cfg.refine_weight,
                  image_scores=cfg.image_scores)
    if cfg.weights:
        if cfg.backbone == "tiny":
            raise BadInput("model.weights are ImageNet weights (VGG16, or ResNet-50 for resnet50_c4); the tiny "
                           "backbone has none")
        if head is not None and cfg.input_convention != "torchvision":
            raise BadInput(f"model.weights of a resnet50_c4 teacher are torchvision's ImageNet ResNet-50, which reads "
                           f"RGB images scaled to 0-1 and normalised by ImageNet mean/std: model.input_convention "
                           f"must be 'torchvision', got {cfg.input_convention!r}")
        # resnet50_c4 takes ResNet-50's weights: torchvision:<WEIGHTS> names a member of ResNet50_Weights
        weights = resolve_weights(cfg.weights, "vgg16" if head is None else "resnet50", cfg.input_convention)
        mapping = VGG16_IMAGENET if head is None else RESNET50_C4_IMAGENET
        load_imagenet_weights(model, weights.path, mapping, cfg.input_convention)
    freeze(model.backbone, cfg.freeze)
    return model


def build_student(cfg: StudentModelConfig, num_classes: int) -> Student:
    """A student from its config; ImageNet weights of its backbone (and VGG fc6/fc7) from ``cfg.weights``.
    VGG-style backbones get the VGG head, the others (torchvision ResNets, timm models) the pooled ``resnet`` head."""
    if cfg.weights and cfg.backbone == "tiny":
        raise BadInput("model.weights are ImageNet weights; the tiny backbone has none")
    weights = resolve_weights(cfg.weights, cfg.backbone, cfg.input_convention) if cfg.weights else None
    if is_timm(cfg.backbone):  # timm loads its own weights (it adapts them: position embeddings, ...)
        backbone = timm_backbone(cfg.backbone, cfg.image_size, weights and weights.path, weights and weights.tag)
    else:
        backbone = build_backbone(cfg.backbone, channels=cfg.tiny_channels, convs_per_block=cfg.tiny_convs_per_block)
    head = "vgg" if cfg.backbone in ("vgg16", "tiny") else "resnet"
    model = Student(backbone, num_classes, head=head, hidden=cfg.hidden, roi_size=cfg.roi_size, dropout=cfg.dropout,
                    distinct_rois=cfg.distinct_rois)
    if weights is not None and not is_timm(cfg.backbone):
        mapping = VGG16_IMAGENET if head == "vgg" else RESNET_IMAGENET
        load_imagenet_weights(model, weights.path, mapping, cfg.input_convention)
    freeze(model.backbone, cfg.freeze)
    return model


def model_config(ckpt: dict[str, Any]) -> TeacherModelConfig | StudentModelConfig:
    """The model config of a teacher or student checkpoint (its ``weights`` dropped: the checkpoint has them),
    checked like a config file: unknown keys, wrong types and out-of-range values are errors naming the file."""
    kind, where = ckpt["kind"], ckpt.get("file", "the checkpoint")
    if kind not in MODEL_CONFIGS:
        raise BadInput(f"{where} holds {kind}, not a teacher or student model")
    other = _heads_of(ckpt["model"])
    if other is not None and other[0] != kind:  # else its config would be refused key by key for the wrong kind
        raise BadInput(f"{where}: kind is {kind!r}, but the weights do not fit a {kind}: they have {other[1]}, as a "
                       f"{other[0]} has; expected a {kind}'s weights, or kind {other[0]!r}")
    try:
        return from_dict(MODEL_CONFIGS[kind], {**ckpt["model_config"], "weights": None}, prefix="model_config.")
    except BadInput as e:
        raise BadInput(f"{where}: {e}") from None


def _heads_of(state: dict[str, Any]) -> tuple[str, str] | None:
    """Which kind the class heads of ``state`` belong to, and the heads in words: a teacher (WSDDN) has two class
    streams fc8_c and fc8_d, a student one head (fc8 after fc7, fc after a pooled backbone); None if unclear."""
    def shape(name: str) -> tuple[int, ...]:
        return tuple(state[f"{name}.weight"].shape)

    if "fc8_c.weight" in state and "fc8_d.weight" in state:
        return "teacher", f"two class streams fc8_c {shape('fc8_c')} and fc8_d {shape('fc8_d')}"
    head = next((h for h in ("fc8", "fc") if f"{h}.weight" in state), None)
    return ("student", f"one class head {head} {shape(head)}") if head else None


def model_from_checkpoint(ckpt: dict[str, Any]) -> nn.Module:
    """Rebuild the teacher (:class:`WSDDN`) or student of a checkpoint from its dict alone, in eval mode on the
    CPU. A state dict that does not fit the config is an error listing the differences."""
    cfg = model_config(ckpt)
    builder = build_teacher if ckpt["kind"] == "teacher" else build_student
    model = builder(cfg, len(ckpt["classes"]))
    own = model.state_dict()
    saved = ckpt["model"]
    problems = [f"missing {k}" for k in own if k not in saved] + [f"unexpected {k}" for k in saved if k not in own]
    problems += [f"{k}: shape {tuple(saved[k].shape)} in the checkpoint, {tuple(v.shape)} for its config"
                 for k, v in own.items() if k in saved and saved[k].shape != v.shape]
    if problems:
        raise BadInput(f"the {ckpt['kind']} weights in {ckpt.get('file', 'the checkpoint')} do not fit its "
                       f"model_config and {len(ckpt['classes'])} classes:\n  " + "\n  ".join(problems[:20]))
    model.load_state_dict(saved)
    return model.eval()
