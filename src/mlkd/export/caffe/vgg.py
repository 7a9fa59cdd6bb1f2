"""Conversion between VGG-style PyTorch classifiers and Caffe layers (deploy prototxt + caffemodel).

The model contract (mlkd's student; the teacher reuses the naming):

- ``model.features``: ``nn.Sequential`` of ``Conv2d`` / ``ReLU`` / ``MaxPool2d`` in torchvision's ``vgg16().features``
  layout (conv1_1 ... conv5_3 at indices 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28; pool5 at 30);
- ``model.fc6``, ``model.fc7``, ``model.fc8``: ``Linear``; the forward is ``fc6 -> ReLU -> Dropout -> fc7 -> ReLU ->
  Dropout -> fc8`` on the flattened ``(C, H, W)`` output of ``features`` (Caffe's InnerProduct flattens the same way).

Names follow the VGG group's Caffe models: ``conv{block}_{i}``, ``relu{block}_{i}``, ``pool{block}``, then ``fc6``,
``relu6``, ``drop6``, ``fc7``, ``relu7``, ``drop7`` and the classifier (the release calls it ``fc8_<dataset>``).
Which PyTorch parameter prefix goes with which Caffe layer is a plain dict (:func:`vgg_name_map`), so other models
(the teacher's ``fc8_c``/``fc8_d``, the KD prototxt's renamed copies) reuse :func:`import_vgg_weights` with their own.

Pooling rounding: Caffe's pooling output size is ``ceil((n + 2p - k) / s) + 1``, ``nn.MaxPool2d`` floors unless
``ceil_mode=True``. Caffe's rounding field (number 13) is read differently by BVLC Caffe (``round_mode`` enum) and by
OpenCV (``ceil_mode`` bool), so no exported file can ask for floor rounding; instead the export checks, for the
requested input size, that every pooling layer gives the same size both ways and otherwise raises with the nearest
sizes that work (for floor-mode 2x2/2 pools: multiples of 2**pools, e.g. 224 = 7 * 32 for VGG16). A model built with
``MaxPool2d(..., ceil_mode=True)`` agrees with Caffe at every size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Collection, Literal, Mapping

import numpy as np
import torch
from torch import nn

from mlkd.errors import BadInput
from mlkd.export.caffe.io import write_caffemodel, write_prototxt
from mlkd.export.caffe.net import CaffeLayer, CaffeNet, LayerBlobs
from mlkd.export.shapes import conv_padding, feature_sizes, pair

_FEATURE_MODULES = ("Conv2d", "ReLU", "MaxPool2d")
OUTPUT_LAYERS: dict[str, str] = {"sigmoid": "Sigmoid", "softmax": "Softmax"}


# -- names ------------------------------------------------------------------------------------------
def vgg_layer_names(features: nn.Sequential) -> dict[int, str]:
    """Caffe name of each module of ``features``: ``{0: "conv1_1", 1: "relu1_1", ..., 4: "pool1", ...}``.

    A block ends at each MaxPool2d; a ReLU takes the name of the convolution it follows.
    """
    names: dict[int, str] = {}
    block, conv = 1, 0
    for i, module in enumerate(features):
        kind = type(module).__name__
        if isinstance(module, nn.Conv2d):
            conv += 1
            names[i] = f"conv{block}_{conv}"
        elif isinstance(module, nn.ReLU):
            if i == 0 or not isinstance(features[i - 1], nn.Conv2d):
                raise BadInput(f"features.{i} (ReLU) does not follow a Conv2d; VGG-style features are "
                                 "Conv2d, ReLU pairs separated by MaxPool2d")
            names[i] = f"relu{block}_{conv}"
        elif isinstance(module, nn.MaxPool2d):
            names[i] = f"pool{block}"
            block, conv = block + 1, 0
        else:
            raise BadInput(f"features.{i} is a {kind}; VGG-style features may only hold {list(_FEATURE_MODULES)}")
    return names


def vgg_name_map(features: nn.Sequential, heads: Mapping[str, str] | None = None,
                 prefix: str = "features") -> dict[str, str]:
    """PyTorch parameter prefix -> Caffe layer name for every weighted layer.

    ``{"features.0": "conv1_1", ..., "features.28": "conv5_3", "fc6": "fc6", "fc7": "fc7", "fc8": "fc8"}`` for
    VGG16 with the default ``heads`` (``{module attribute: Caffe name}``; e.g. ``{"fc8": "fc8_coco"}`` entries,
    or the teacher's ``{"fc6": "fc6", "fc7": "fc7", "fc8_c": "fc8_c", "fc8_d": "fc8_d"}``).
    """
    heads = {"fc6": "fc6", "fc7": "fc7", "fc8": "fc8"} if heads is None else dict(heads)
    convs = {f"{prefix}.{i}": name for i, name in vgg_layer_names(features).items() if name.startswith("conv")}
    return {**convs, **heads}


# -- sizes ------------------------------------------------------------------------------------------
def check_pool_rounding(features: nn.Sequential, size: tuple[int, int]) -> None:
    """Raise if Caffe's ceil-rounded pooling and the model's pooling give different sizes for input ``size``."""
    caffe, torch_ = feature_sizes(features, size, True), feature_sizes(features, size, False)
    names = vgg_layer_names(features)
    for i, (c, t) in enumerate(zip(caffe, torch_)):
        if c != t:
            bad = size[0] if c[0] != t[0] else size[1]
            ok = [n for n in range(1, 4 * bad + 64) if _agrees(features, n)]
            near = sorted(ok, key=lambda n: (abs(n - bad), n))[:4]
            raise BadInput(f"input size {size[0]}x{size[1]}: {names[i]} (features.{i}) gives {c[0]}x{c[1]} in Caffe "
                             f"(ceil rounding) but {t[0]}x{t[1]} in PyTorch; export at a size where they agree "
                             f"(nearest: {sorted(near)}) or build the model with MaxPool2d(..., ceil_mode=True)")


def _agrees(features: nn.Sequential, n: int) -> bool:
    caffe = feature_sizes(features, (n, n), True)
    return caffe == feature_sizes(features, (n, n), False) and all(h > 0 for h, _ in caffe)


# -- PyTorch -> Caffe -------------------------------------------------------------------------------
def _blobs(module: nn.Conv2d | nn.Linear) -> list[np.ndarray]:
    params = [module.weight] + ([module.bias] if module.bias is not None else [])
    return [p.detach().cpu().float().numpy().copy() for p in params]


_SQUARE_NAMES = {"kernel": "kernel_size", "pad": "pad", "stride": "stride"}


def _hw_param(key: str, value: tuple[int, int], repeated: bool) -> dict[str, object]:
    """Caffe's square form (``kernel_size``; a list in ConvolutionParameter) or its ``kernel_h``/``kernel_w`` form."""
    if value[0] == value[1]:
        return {_SQUARE_NAMES[key]: [value[0]] if repeated else value[0]}
    return {f"{key}_h": value[0], f"{key}_w": value[1]}


def _conv_layer(name: str, conv: nn.Conv2d, bottom: str) -> CaffeLayer:
    param = {"num_output": conv.out_channels, "bias_term": conv.bias is not None,
             **_hw_param("kernel", conv.kernel_size, True)}
    if conv_padding(conv, name) != (0, 0):
        param.update(_hw_param("pad", conv.padding, True))
    if conv.stride != (1, 1):
        param.update(_hw_param("stride", conv.stride, True))
    if conv.dilation != (1, 1):
        param["dilation"] = [conv.dilation[0]] if conv.dilation[0] == conv.dilation[1] else list(conv.dilation)
    if conv.groups != 1:
        param["group"] = conv.groups
    return CaffeLayer(name, "Convolution", [bottom], [name], {"convolution_param": param})


def _pool_layer(name: str, pool: nn.MaxPool2d, bottom: str) -> CaffeLayer:
    if pair(pool.dilation) != (1, 1) or pool.return_indices:
        raise BadInput(f"{name}: Caffe pooling has no dilation or indices output; got {pool!r}")
    param = {"pool": "MAX", **_hw_param("kernel", pair(pool.kernel_size), False),
             **_hw_param("stride", pair(pool.stride), False)}
    if pair(pool.padding) != (0, 0):
        param.update(_hw_param("pad", pair(pool.padding), False))
    return CaffeLayer(name, "Pooling", [bottom], [name], {"pooling_param": param})


def features_to_caffe(features: nn.Sequential,
                      bottom: str = "data") -> tuple[list[CaffeLayer], dict[str, LayerBlobs], str]:
    """Caffe layers and weights of ``features`` reading blob ``bottom``; also returns the name of the last top.

    ReLUs are in place (bottom = top = the convolution's output), as in the VGG group's prototxts.
    """
    layers, blobs, top = [], {}, bottom
    for i, name in vgg_layer_names(features).items():
        module = features[i]
        if isinstance(module, nn.Conv2d):
            layers.append(_conv_layer(name, module, top))
            blobs[name] = LayerBlobs("Convolution", _blobs(module))
            top = name
        elif isinstance(module, nn.ReLU):
            layers.append(CaffeLayer(name, "ReLU", [top], [top]))
        else:
            layers.append(_pool_layer(name, module, top))
            top = name
    return layers, blobs, top


def _fc_layer(name: str, fc: nn.Linear, bottom: str) -> CaffeLayer:
    return CaffeLayer(name, "InnerProduct", [bottom], [name],
                      {"inner_product_param": {"num_output": fc.out_features, "bias_term": fc.bias is not None}})


def _head_modules(model: nn.Module) -> list[nn.Linear]:
    found = [getattr(model, name, None) for name in ("features", "fc6", "fc7", "fc8")]
    expected = [nn.Sequential, nn.Linear, nn.Linear, nn.Linear]
    bad = [f"{n} ({type(m).__name__ if m is not None else 'missing'})" for n, m, t
           in zip(("features", "fc6", "fc7", "fc8"), found, expected) if not isinstance(m, t)]
    if bad:
        raise BadInput(f"model does not follow the VGG contract (features: nn.Sequential; fc6, fc7, fc8: nn.Linear); "
                         f"wrong: {', '.join(bad)}")
    return found[1:]


def vgg_to_caffe(model: nn.Module, input_size: int | tuple[int, int], classifier_name: str = "fc8",
                 output: Literal["sigmoid", "softmax"] | None = None, dropout_ratio: float = 0.5,
                 net_name: str = "mlkd_vgg") -> tuple[CaffeNet, dict[str, LayerBlobs]]:
    """The deploy network (input ``data`` of shape ``(1, 3, H, W)``) and weights of a VGG-style ``model``.

    Layers: conv1_1 ... pool5, fc6, relu6, drop6, fc7, relu7, drop7, ``classifier_name`` and, if ``output`` is
    given, a Sigmoid / Softmax layer ``prob``. Raises if Caffe's pooling would give other sizes than the model's
    at ``input_size`` (see the module docstring) or if fc6 does not fit the feature map at that size.
    """
    size = pair(input_size)
    fc6, fc7, fc8 = _head_modules(model)
    if output is not None and output not in OUTPUT_LAYERS:
        raise BadInput(f"output must be one of {sorted(OUTPUT_LAYERS)} or None, got {output!r}")
    check_pool_rounding(model.features, size)
    layers, blobs, top = features_to_caffe(model.features)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    c = convs[-1].out_channels if convs else 3
    h, w = feature_sizes(model.features, size, caffe=False)[-1] if len(model.features) else size
    if fc6.in_features != c * h * w:
        raise BadInput(f"fc6 takes {fc6.in_features} inputs but at input size {size[0]}x{size[1]} the features are "
                         f"{c}x{h}x{w} = {c * h * w}; export at the size the model was built for")
    for name, fc, relu, drop in (("fc6", fc6, "relu6", "drop6"), ("fc7", fc7, "relu7", "drop7")):
        layers += [_fc_layer(name, fc, top), CaffeLayer(relu, "ReLU", [name], [name]),
                   CaffeLayer(drop, "Dropout", [name], [name], {"dropout_param": {"dropout_ratio": dropout_ratio}})]
        blobs[name] = LayerBlobs("InnerProduct", _blobs(fc))
        top = name
    layers.append(_fc_layer(classifier_name, fc8, top))
    blobs[classifier_name] = LayerBlobs("InnerProduct", _blobs(fc8))
    if output is not None:
        layers.append(CaffeLayer("prob", OUTPUT_LAYERS[output], [classifier_name], ["prob"]))
    return CaffeNet(net_name, {"data": (1, 3, *size)}, layers), blobs


def export_vgg(model: nn.Module, prototxt: str | Path, caffemodel: str | Path, input_size: int | tuple[int, int],
               classifier_name: str = "fc8", output: Literal["sigmoid", "softmax"] | None = None,
               version: int = 2) -> CaffeNet:
    """Write a VGG-style ``model`` as a deploy ``prototxt`` and a ``caffemodel`` (see :func:`vgg_to_caffe`)."""
    net, blobs = vgg_to_caffe(model, input_size, classifier_name, output)
    write_prototxt(prototxt, net, version=version)
    write_caffemodel(caffemodel, blobs, net=net, version=version)
    return net


# -- Caffe -> PyTorch -------------------------------------------------------------------------------
def import_vgg_weights(layers: Mapping[str, LayerBlobs], target_names: Mapping[str, str],
                       expected: Mapping[str, torch.Tensor] | None = None,
                       ignore: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """State-dict entries ``{prefix.weight, prefix.bias}`` from Caffe weights, for ``target_names``
    (PyTorch prefix -> Caffe layer name, e.g. from :func:`vgg_name_map`).

    Strict: every mapped layer must be in ``layers`` and every layer of ``layers`` must be mapped or listed in
    ``ignore`` (e.g. ``{"fc8"}`` to start a K-class model from the ImageNet caffemodel; load the result with
    ``strict=False`` then). With ``expected`` (the model's ``state_dict()``), every produced entry must exist there
    with the same shape. Each violation raises ValueError listing expected vs found. Weights are copied as stored:
    a Caffe model expects BGR, mean-subtracted 0-255 input.
    """
    wanted = set(target_names.values())
    missing = sorted(wanted - set(layers))
    unexpected = sorted(set(layers) - wanted - set(ignore))
    if missing or unexpected:
        raise BadInput(f"Caffe layers do not match: missing {missing}, unexpected {unexpected}; expected "
                         f"{sorted(wanted)} (ignoring {sorted(ignore)}), found {sorted(layers)}")
    state: dict[str, torch.Tensor] = {}
    for prefix, caffe_name in target_names.items():
        blobs = layers[caffe_name].blobs
        if len(blobs) not in (1, 2):
            raise BadInput(f"Caffe layer {caffe_name!r} has {len(blobs)} blobs; expected weights and optional bias")
        for key, arr in zip(("weight", "bias"), blobs):
            state[f"{prefix}.{key}"] = torch.from_numpy(np.array(arr, dtype=np.float32))
    if expected is not None:
        _check_against(state, expected, target_names)
    return state


def _check_against(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                   target_names: Mapping[str, str]) -> None:
    problems = []
    for key, tensor in state.items():
        caffe_name = target_names[key.rsplit(".", 1)[0]]
        if key not in expected:
            problems.append(f"{key} (from Caffe {caffe_name!r}, {tuple(tensor.shape)}) is not in the model")
        elif tuple(expected[key].shape) != tuple(tensor.shape):
            problems.append(f"{key}: Caffe {caffe_name!r} has {tuple(tensor.shape)}, model expects "
                            f"{tuple(expected[key].shape)}")
    for prefix, caffe_name in target_names.items():
        if f"{prefix}.bias" in expected and f"{prefix}.bias" not in state:
            problems.append(f"{prefix}.bias: model has a bias, Caffe {caffe_name!r} has none")
    if problems:
        raise BadInput("Caffe weights do not fit the model: " + "; ".join(problems))
