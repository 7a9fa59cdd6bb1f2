"""The Caffe exports of :mod:`mlkd.export.exporter`: a VGG-head student as deploy prototxt + caffemodel, the
teacher as the release's network without its RoI pooling; each checked with OpenCV's DNN module. Needs protobuf
(the ``[caffe]`` extra), so the exporter imports this module only for ``--format caffe``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import torch
from torch import nn

from mlkd.errors import BadInput
from mlkd.export.caffe import (import_vgg_weights, read_caffemodel, read_prototxt, vgg_layer_names, vgg_to_caffe,
                               write_caffemodel, write_prototxt)
from mlkd.export.caffe.importer import plan_teacher
from mlkd.export.caffe.wsddn import export_wsddn
from mlkd.export.verify import Check, compare, random_boxes
from mlkd.export.vgg_view import VggDeployView


# -- student -----------------------------------------------------------------------------------------
def export_student_caffe(student: nn.Module, out: Path, image_size: int, classifier: str, tolerance: float,
                         x: torch.Tensor) -> dict[str, Any]:
    """Write ``student.prototxt`` / ``student.caffemodel`` and check them with OpenCV; the export record's parts."""
    if getattr(student, "head", None) != "vgg":
        raise BadInput("a ResNet-head student cannot be written as Caffe layers by mlkd (its converter covers "
                         "VGG-style networks: Conv / ReLU / MaxPool + fc layers; no BatchNorm, residual sums or "
                         "global pooling); export it with --format onnx")
    view = VggDeployView(student, image_size).eval()
    prototxt, caffemodel = out / "student.prototxt", out / "student.caffemodel"
    net, blobs = vgg_to_caffe(view, image_size, classifier, output="sigmoid", dropout_ratio=student.drop.p,
                              net_name="mlkd_student")
    write_prototxt(prototxt, net)
    write_caffemodel(caffemodel, blobs, net=net)
    cv = cv2.dnn.readNetFromCaffe(str(prototxt), str(caffemodel))
    cv.setInput(x.numpy())
    logits, prob = cv.forward([classifier, "prob"])
    with torch.no_grad():
        ref = student(x)
    scale = float(ref.abs().max())
    checks = [compare(classifier, logits, ref, tolerance), compare("prob", prob, torch.sigmoid(ref), tolerance, scale)]
    (h, w), s = view.grid, student.roi_size
    notes = ["the prototxt declares a batch of 1; OpenCV, and Caffe after net.blobs['data'].reshape(N, ...), take "
             "any batch N"]
    if (h, w) != (s, s):
        notes.append(f"at {image_size}x{image_size} the student's pool5 gives a {h}x{w} grid that it pools to roi_size "
                     f"{s}x{s} (adaptive average): that pooling is folded into fc6, which reads {h}x{w} (exact up to "
                     "float rounding)")
    return {"files": {"prototxt": prototxt.name, "caffemodel": caffemodel.name},
            "inputs": ["data"], "runtime": f"OpenCV {cv2.__version__} DNN", "checks": checks, "notes": notes,
            "outputs": {classifier: "logits z (N, K), classes in the order of `classes`",
                        "prob": "sigmoid(z) (N, K): independent per-class probabilities (multi-label)"}}


# -- teacher ----------------------------------------------------------------------------------------
def _teacher_reference(teacher: nn.Module, image: torch.Tensor, regions: int) -> tuple[torch.Tensor, dict]:
    """Pooled, score-scaled regions of ``regions`` random proposals on ``image`` (1, 3, S, S), and the teacher's
    outputs on them keyed by the Caffe layer that gives each."""
    boxes, scores = random_boxes(regions, image.shape[-1], seed=0)
    index = torch.zeros(regions, dtype=torch.int64)
    fmap = teacher.backbone(image)  # (1, C, S / stride, S / stride)
    factor = teacher.score_scale * scores + teacher.score_bias  # (R,)
    pooled = teacher.pool(fmap, boxes, index) * factor[:, None, None, None]  # (R, C, s, s)
    cls_logits, det_logits = teacher.forward_streams(teacher.forward_regions(fmap, boxes, scores, index))
    result = teacher(image, [boxes], [scores])[0]
    names = vgg_layer_names(teacher.backbone.features)
    return pooled, {names[max(names)]: fmap, "fc8_c": cls_logits, "fc8_d": det_logits,
                    "proposal_class_score": result["region_scores"], "image_level_score": result["image_scores"]}


def _round_trip(teacher: nn.Module, prototxt: Path, caffemodel: Path) -> Check:
    """Import the written files the way ``mlkd import-caffe --arch wsddn`` does; compare every tensor."""
    weights = read_caffemodel(caffemodel)
    _, names, _ = plan_teacher(read_prototxt(prototxt, supported=None), weights)
    back = import_vgg_weights(weights, names, expected=teacher.state_dict(), ignore={"image_level_score"})
    state = teacher.state_dict()
    same_keys = back.keys() == state.keys()
    diff = max((float((back[k] - state[k]).abs().max()) for k in state), default=0.0) if same_keys else float("inf")
    return Check("weights", diff, 0.0, "max |imported from the files - teacher| (every tensor)")


@torch.no_grad()
def export_teacher_caffe(teacher: nn.Module, out: Path, image_size: int, regions: int, tolerance: float,
                         x: torch.Tensor) -> dict[str, Any]:
    """Write ``teacher.prototxt`` / ``teacher.caffemodel``; check OpenCV on PyTorch-pooled regions of the first
    image of ``x``, and that importing the files gives the teacher's tensors bit for bit."""
    prototxt, caffemodel = out / "teacher.prototxt", out / "teacher.caffemodel"
    export_wsddn(teacher, prototxt, caffemodel, image_size, regions)
    pooled, refs = _teacher_reference(teacher, x[:1], regions)
    cv = cv2.dnn.readNetFromCaffe(str(prototxt), str(caffemodel))
    cv.setInput(x[:1].numpy(), "data")
    cv.setInput(pooled.numpy(), "roi_pooling")
    got = cv.forward(list(refs))
    logits = max(float(refs["fc8_c"].abs().max()), float(refs["fc8_d"].abs().max()))
    checks = [compare(name, g, ref, tolerance, logits if name.endswith("score") else None)
              for (name, ref), g in zip(refs.items(), got)]
    checks.append(_round_trip(teacher, prototxt, caffemodel))
    c, s, last_relu = teacher.backbone.out_channels, teacher.roi_size, next(iter(refs))
    pooling = {"shape": [regions, c, s, s], "op": "roi_pool", "spatial_scale": 1.0 / teacher.backbone.stride,
               "score_scale": teacher.score_scale, "score_bias": teacher.score_bias}
    return {"files": {"prototxt": prototxt.name, "caffemodel": caffemodel.name}, "inputs": ["data", "roi_pooling"],
            "runtime": f"OpenCV {cv2.__version__} DNN", "checks": checks, "roi_pooling": pooling,
            "outputs": {last_relu.replace("relu", "conv"): f"feature map of `data` (N, C, S/stride, S/stride) after "
                        f"{last_relu} (in place; in OpenCV ask for layer {last_relu}): pool regions of it into "
                        "`roi_pooling`",
                        "proposal_class_score": "region scores S (1, R, K, 1): softmax over classes times softmax "
                                                "over regions",
                        "image_level_score": "image scores p (1, 1, K, 1) = sum over regions of S, in (0, 1)"},
            "notes": teacher_notes(teacher, regions)}


def teacher_notes(teacher: nn.Module, regions: int) -> list[str]:
    """What the teacher needs outside standard Caffe, and how the release names it."""
    s, stride = teacher.roi_size, teacher.backbone.stride
    return [
        f"input `roi_pooling` (R={regions}, C, {s}, {s}): RoI max pooling of the last convolution (Fast R-CNN "
        f"rounding, spatial_scale 1/{stride}: torchvision.ops.roi_pool) for R proposals (x1, y1, x2, y2) in pixels "
        f"of `data`, each pooled region multiplied by ({teacher.score_scale:g} * proposal score + "
        f"{teacher.score_bias:g}); exactly R regions per image: the Reshape layers fix R (padding would change "
        "the softmax over regions; for another count edit their dim R or export again with --regions)",
        "not expressible in standard Caffe: the release computes it with two layers of its fork, `roi` (WsdRoigen: "
        "(N, 5R) proposals -> (N*R, 6) rois image, x1, y1, x2, y2, score) and `roi_pooling` (ROIPooling with "
        "roi_pooling_param {pooled_h, pooled_w, spatial_scale, score_scale, score_bias}, field 149 of its "
        "caffe.proto); BVLC Caffe has no RoI pooling and Fast R-CNN's / OpenCV's ROIPooling has no score scaling",
        "standard Caffe, as in the release: reshape_branch1/2 (Reshape -1, R, K, 1), class_score (Softmax axis 2, "
        "over classes), proposal_score (Softmax axis 1, over regions), proposal_class_score (Eltwise PROD), "
        "image_level_score (1x1 Convolution with weights fixed to 1, no bias: the sum over regions)",
        "mlkd's objectness s'_r = sum over classes of S (its own definition) is not a layer: sum "
        "proposal_class_score over K",
    ]
