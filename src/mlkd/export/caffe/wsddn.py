"""The teacher (WSDDN) as Caffe layers named as in the release, and the teacher's settings read back.

The release's teacher network (``wsddn/wsddn_{train,deploy}.prototxt`` of Yochengliu/MLIC-KD-WSD), image of R
proposals, K classes::

    roi                   WsdRoigen (fork)      proposaldata (N, 5R, 1, 1) -> rois (N*R, 6):
                                                image, x1, y1, x2, y2, score
    conv1_1 ... conv5_3   Convolution / ReLU / Pooling (no pool5)
    roi_pooling           ROIPooling (fork)     Fast R-CNN max pooling of conv5_3, each value times
                                                (score_scale * score + score_bias) (roi_pooling_param, field 149)
    fc6 relu6 drop6 fc7 relu7 drop7             InnerProduct / ReLU / Dropout
    fc8_c -> reshape_branch1 (-1, R, K, 1) -> class_score      Softmax axis 2: over classes, per region
    fc8_d -> reshape_branch2 (-1, R, K, 1) -> proposal_score   Softmax axis 1: over the R regions, per class
    proposal_class_score  Eltwise PROD          region scores S (1, R, K, 1)
    image_level_score     Convolution 1x1       weights fixed to 1, no bias: the sum over regions, p (1, 1, K, 1)

Only ``roi`` and ``roi_pooling`` need the fork (BVLC Caffe has no RoI pooling; Fast R-CNN's and OpenCV's lack
the score scaling). The softmax over regions, the product and the sum are standard layers, for a fixed R that
the Reshape layers bake in. mlkd's export (:func:`wsddn_to_caffe`) therefore writes every layer but those two
and makes the pooled, score-scaled regions an input blob named ``roi_pooling`` of shape (R, C, s, s); with
it, OpenCV's DNN module runs the whole teacher head. Temperatures other than 1 become Power layers
``temp_branch1`` / ``temp_branch2`` (scale 1/T) after the reshapes, where the KD prototxts put their learnable
Scale layers ``temp_branch1_learn`` / ``temp_branch2_learn``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
from torch import nn

from mlkd.errors import BadInput
from mlkd.export.caffe.io import write_caffemodel, write_prototxt
from mlkd.export.caffe.layout import RELEASE, Naming
from mlkd.export.caffe.net import CaffeLayer, CaffeNet, LayerBlobs
from mlkd.export.caffe.vgg import check_pool_rounding, features_to_caffe

SUM_LAYER = "image_level_score"
TEMPERATURE_LAYERS = ("temp_branch1", "temp_branch2")  # Power layers of mlkd's export (classification, detection)


def _blobs(module: nn.Linear) -> list[np.ndarray]:
    return [module.weight.detach().cpu().float().numpy().copy(), module.bias.detach().cpu().float().numpy().copy()]


def _fc(name: str, bottom: str, fc: nn.Linear) -> CaffeLayer:
    return CaffeLayer(name, "InnerProduct", [bottom], [name], {"inner_product_param": {"num_output": fc.out_features}})


def _stream(fc_name: str, reshape: str, temp: str, temperature: float, regions: int, k: int) -> list[CaffeLayer]:
    """fc8_x -> Reshape (-1, R, K, 1) [-> Power 1/T]."""
    layers = [CaffeLayer(reshape, "Reshape", [fc_name], [reshape],
                         {"reshape_param": {"shape": {"dim": [-1, regions, k, 1]}}})]
    if temperature != 1.0:
        layers.append(CaffeLayer(temp, "Power", [reshape], [temp], {"power_param": {"scale": 1.0 / temperature}}))
    return layers


def wsddn_to_caffe(model: nn.Module, input_size: int, regions: int,
                   net_name: str = "mlkd_wsddn") -> tuple[CaffeNet, dict[str, LayerBlobs]]:
    """The teacher as a network with inputs ``data`` (1, 3, S, S) and ``roi_pooling`` (R, C, s, s), and its weights.

    ``model`` is mlkd's :class:`~mlkd.models.wsddn.WSDDN` with a VGG-style backbone (``backbone.features``) and the
    Fast R-CNN RoI pooling (``roi_op="roi_pool"``). Outputs: the last convolution (e.g. ``conv5_3``), ``fc8_c``,
    ``fc8_d`` (R, K), ``proposal_class_score`` (1, R, K, 1) and ``image_level_score`` (1, 1, K, 1).
    """
    if getattr(model, "roi_op", "roi_pool") != "roi_pool":
        raise BadInput(f"the teacher uses {model.roi_op}; the release's Caffe network (and mlkd's export) has Fast "
                         "R-CNN RoI max pooling only (roi_op=roi_pool)")
    if regions < 1:
        raise BadInput(f"the number of regions R baked into the Reshape layers must be >= 1, got {regions}")
    features = model.backbone.features
    check_pool_rounding(features, (input_size, input_size))
    layers, blobs, top = features_to_caffe(features)
    if top == "data":
        raise BadInput("the teacher's backbone has no convolution")
    k, s, c = model.fc8_c.out_features, model.roi_size, model.backbone.out_channels
    layers += [_fc("fc6", "roi_pooling", model.fc6), CaffeLayer("relu6", "ReLU", ["fc6"], ["fc6"]),
               CaffeLayer("drop6", "Dropout", ["fc6"], ["fc6"], {"dropout_param": {"dropout_ratio": model.drop.p}}),
               _fc("fc7", "fc6", model.fc7), CaffeLayer("relu7", "ReLU", ["fc7"], ["fc7"]),
               CaffeLayer("drop7", "Dropout", ["fc7"], ["fc7"], {"dropout_param": {"dropout_ratio": model.drop.p}}),
               _fc("fc8_c", "fc7", model.fc8_c)]
    layers += _stream("fc8_c", "reshape_branch1", TEMPERATURE_LAYERS[0], model.cls_temperature, regions, k)
    layers += [_fc("fc8_d", "fc7", model.fc8_d)]
    layers += _stream("fc8_d", "reshape_branch2", TEMPERATURE_LAYERS[1], model.det_temperature, regions, k)
    cls_in, det_in = (TEMPERATURE_LAYERS[0] if model.cls_temperature != 1.0 else "reshape_branch1",
                      TEMPERATURE_LAYERS[1] if model.det_temperature != 1.0 else "reshape_branch2")
    layers += [
        CaffeLayer("class_score", "Softmax", [cls_in], ["class_score"], {"softmax_param": {"axis": 2}}),
        CaffeLayer("proposal_score", "Softmax", [det_in], ["proposal_score"], {"softmax_param": {"axis": 1}}),
        CaffeLayer("proposal_class_score", "Eltwise", ["class_score", "proposal_score"], ["proposal_class_score"],
                   {"eltwise_param": {"operation": "PROD"}}),
        CaffeLayer(SUM_LAYER, "Convolution", ["proposal_class_score"], [SUM_LAYER],
                   {"convolution_param": {"num_output": 1, "kernel_size": [1], "bias_term": False}}),
    ]
    for name in ("fc6", "fc7", "fc8_c", "fc8_d"):
        blobs[name] = LayerBlobs("InnerProduct", _blobs(getattr(model, name)))
    blobs[SUM_LAYER] = LayerBlobs("Convolution", [np.ones((1, regions, 1, 1), np.float32)])
    inputs = {"data": (1, 3, input_size, input_size), "roi_pooling": (regions, c, s, s)}
    return CaffeNet(net_name, inputs, layers), blobs


def export_wsddn(model: nn.Module, prototxt: str | Path, caffemodel: str | Path, input_size: int,
                 regions: int) -> CaffeNet:
    """Write the teacher as a V2 prototxt + caffemodel (see :func:`wsddn_to_caffe`)."""
    net, blobs = wsddn_to_caffe(model, input_size, regions)
    write_prototxt(prototxt, net)
    write_caffemodel(caffemodel, blobs, net=net)
    return net


def check_sum_layer(weights: Mapping[str, LayerBlobs], name: str = SUM_LAYER) -> None:
    """The release's sum over regions is a 1x1 convolution whose weights must all be 1 (and no bias)."""
    lb = weights[name]
    w = lb.blobs[0] if lb.blobs else np.zeros(0)
    if lb.type != "Convolution" or len(lb.blobs) != 1 or w.ndim != 4 or w.shape[0] != 1 or not np.all(w == 1):
        raise BadInput(f"caffemodel layer {name!r} should be the sum over regions: a Convolution with one weight "
                         f"blob (1, R, 1, 1) of ones and no bias; found {lb.type} with blobs "
                         f"{[tuple(b.shape) for b in lb.blobs]} (min {w.min() if w.size else None}, "
                         f"max {w.max() if w.size else None})")


def head_settings(net: CaffeNet, last_conv: str, stride: int, naming: Naming = RELEASE) -> dict[str, Any]:
    """Teacher settings the prototxt states: from the ROIPooling layer on ``last_conv`` (if any) ``roi_size``,
    ``score_scale``, ``score_bias``; from mlkd's Power layers the temperatures. Checks spatial_scale = 1/stride."""
    out: dict[str, Any] = {}
    pools = [l for l in net.layers if l.type == "ROIPooling" and l.bottoms[:1] == [last_conv]]
    if len(pools) > 1:
        raise BadInput(f"the prototxt has {len(pools)} ROIPooling layers on {last_conv!r}: {[l.name for l in pools]}")
    if pools:
        p = pools[0].params.get("roi_pooling_param", {})
        size = (p.get("pooled_h", 0), p.get("pooled_w", 0))
        if size[0] != size[1] or size[0] < 1:
            raise BadInput(f"ROIPooling {pools[0].name!r} pools to {size[0]}x{size[1]}; mlkd needs a square grid")
        if abs(p.get("spatial_scale", 1.0) - 1.0 / stride) > 1e-6:
            raise BadInput(f"ROIPooling {pools[0].name!r} has spatial_scale {p.get('spatial_scale', 1.0)}, but "
                             f"{last_conv} has stride {stride}: expected {1.0 / stride}")
        out.update(roi_size=size[0], score_scale=float(p.get("score_scale", 1.0)),
                   score_bias=float(p.get("score_bias", 0.0)))
    for key, name in zip(("cls_temperature", "det_temperature"), TEMPERATURE_LAYERS):
        layer = next((l for l in net.layers if l.name == name), None)
        if layer is not None and naming is RELEASE:
            p = layer.params.get("power_param", {})
            if layer.type != "Power" or p.get("power", 1.0) != 1.0 or p.get("shift", 0.0) != 0.0 or not p.get("scale"):
                raise BadInput(f"prototxt layer {name!r} should be a Power layer with scale 1/T (power 1, shift 0) "
                                 f"as mlkd writes it; found {layer.type} {p}")
            out[key] = float(np.float32(1.0) / np.float32(p["scale"]))
    return out
