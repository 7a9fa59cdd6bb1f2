"""The architecture of a VGG-style network read from its Caffe files, checked against what mlkd can build.

A Caffe model is only importable into one of mlkd's backbones (``vgg16``, or ``tiny`` with the same number of
convolutions in every block) if every convolution is 3x3 / pad 1 / stride 1 and the blocks are separated by
2x2 / stride 2 max pooling. A teacher's last block may instead be dilated as OICR's conv5 (``model.dilate_last_block``):
the pool before it 1x1 / stride 1, its convolutions dilation 2 / pad 2. :func:`vgg_layout` checks exactly that,
from both files: which convolutions exist and their shapes (``.caffemodel``), their parameters and the pooling
layers (``.prototxt``).

Layer names (:class:`Naming`) follow the release: ``conv{block}_{i}`` / ``pool{block}`` / ``fc6`` ... in its
``wsddn`` and student networks and in the ImageNet VGG16 model; its KD prototxts hold a frozen copy of the
teacher named ``conv_wsd_{block}_{i}`` / ``pool_wsd_{block}`` / ``fc_wsd_6`` / ``fc_wsd_8_c`` ...
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

from mlkd.errors import BadInput
from mlkd.export.caffe.net import CaffeLayer, CaffeNet, LayerBlobs


@dataclass(frozen=True)
class Naming:
    """How one network names its layers: ``conv`` (regex with groups block, index), ``pool`` (format with ``b``)
    and ``fc`` (mlkd module name -> Caffe layer name)."""

    conv: str
    pool: str
    fc: Mapping[str, str]


RELEASE = Naming(r"conv(\d+)_(\d+)", "pool{b}", {"fc6": "fc6", "fc7": "fc7", "fc8_c": "fc8_c", "fc8_d": "fc8_d"})
KD_TEACHER = Naming(r"conv_wsd_(\d+)_(\d+)", "pool_wsd_{b}",
                    {"fc6": "fc_wsd_6", "fc7": "fc_wsd_7", "fc8_c": "fc_wsd_8_c", "fc8_d": "fc_wsd_8_d"})

# (output channels, convolutions) of each block of VGG16 (configuration D)
VGG16_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))


@dataclass(frozen=True)
class VggLayout:
    """Convolution layer names per block and the blocks' output channels."""

    convs: tuple[tuple[str, ...], ...]
    channels: tuple[int, ...]
    dilated_last: bool = False  # the last block dilated by 2 after a 1x1 / stride 1 pool (OICR's conv5)

    @property
    def stride(self) -> int:
        """Stride of the last convolution's output (no pooling after the last block)."""
        return 2 ** (len(self.convs) - 1 - self.dilated_last)

    def backbone_config(self) -> dict[str, Any]:
        """The mlkd model-config keys of the backbone with this layout (``vgg16`` or ``tiny``)."""
        blocks = tuple((c, len(names)) for c, names in zip(self.channels, self.convs))
        dilated = {"dilate_last_block": True} if self.dilated_last else {}
        if blocks == VGG16_BLOCKS:
            return {"backbone": "vgg16", **dilated}
        counts = {len(names) for names in self.convs}
        if len(counts) == 1:
            return {"backbone": "tiny", "tiny_channels": list(self.channels), "tiny_convs_per_block": counts.pop(),
                    **dilated}
        raise BadInput(f"the Caffe network's blocks (channels, convolutions) are {list(blocks)}: neither VGG16 "
                         f"{list(VGG16_BLOCKS)} nor mlkd's tiny backbone (the same number of convolutions in every "
                         "block)")

    def name_map(self, prefix: str, last_pool: bool = False) -> dict[str, str]:
        """PyTorch prefix -> Caffe convolution name, with torchvision's ``features`` indices (conv, ReLU pairs;
        a pool after each block but the last, and after the last too with ``last_pool``)."""
        out, index = {}, 0
        for block, names in enumerate(self.convs):
            for name in names:
                out[f"{prefix}.{index}"] = name
                index += 2
            index += 1 if block < len(self.convs) - 1 or last_pool else 0
        return out


def vgg_layout(weights: Mapping[str, LayerBlobs], net: CaffeNet, naming: Naming = RELEASE,
               last_pool: bool = False) -> VggLayout:
    """Read and check the convolutional part of a network: the convolutions matching ``naming.conv`` in both
    files, numbered ``{1..B}_{1..n_b}``, each 3x3 / pad 1 / stride 1 with weights ``(OUT, IN, 3, 3)`` chained from
    3 input channels, one output width per block, and a 2x2 / stride 2 max pooling ``naming.pool`` after each block
    but the last (and after the last with ``last_pool``, as the student's pool5). Without ``last_pool`` (a teacher)
    the pool before the last block may be 1x1 / stride 1 with that block's convolutions dilation 2 / pad 2 (OICR's
    conv5). BadInput names what differs.
    """
    pattern = re.compile(naming.conv)
    in_model = {n for n in weights if pattern.fullmatch(n)}
    in_net = {l.name for l in net.layers if l.type == "Convolution" and pattern.fullmatch(l.name)}
    if not in_model or in_model != in_net:
        raise BadInput(f"convolutions named like {naming.conv!r}: the caffemodel has {_sorted(in_model)}, the "
                         f"prototxt has {_sorted(in_net)}; they must be the same, non-empty set")
    blocks: dict[int, dict[int, str]] = {}
    for name in in_model:
        b, i = (int(g) for g in pattern.fullmatch(name).groups())
        blocks.setdefault(b, {})[i] = name
    if sorted(blocks) != list(range(1, len(blocks) + 1)) or any(
            sorted(convs) != list(range(1, len(convs) + 1)) for convs in blocks.values()):
        raise BadInput(f"convolutions must be numbered block 1.. and index 1.. without gaps; found "
                         f"{_sorted(in_model)}")
    convs = tuple(tuple(blocks[b][i] for i in sorted(blocks[b])) for b in sorted(blocks))
    channels = _check_conv_weights(weights, convs)
    pools = [naming.pool.format(b=b) for b in range(1, len(convs) + (1 if last_pool else 0))]
    dilated = not last_pool and len(convs) > 1 and _pool_window(net, pools[-1])[1] == ((1, 1), (1, 1))
    for block, names in enumerate(convs):
        for name in names:
            _check_conv_params(net.layer(name), 2 if dilated and block == len(convs) - 1 else 1)
    for name in pools[:-1] if dilated else pools:
        _check_pool(net, name)
    return VggLayout(convs, channels, dilated)


def _sorted(names: set[str]) -> list[str]:
    return sorted(names, key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)])


def _check_conv_weights(weights: Mapping[str, LayerBlobs], convs: tuple[tuple[str, ...], ...]) -> tuple[int, ...]:
    channels, c_in = [], 3
    for names in convs:
        outs = []
        for name in names:
            lb = weights[name]
            shapes = [tuple(b.shape) for b in lb.blobs]
            c_out = shapes[0][0] if shapes and len(shapes[0]) == 4 else -1
            expected = [(c_out, c_in, 3, 3), (c_out,)]
            if lb.type != "Convolution" or c_out < 1 or shapes != expected:
                raise BadInput(f"caffemodel layer {name!r} ({lb.type}) has blobs {shapes}; expected a Convolution "
                                 f"with {expected} (3x3 over the previous layer's {c_in} channels, with bias)")
            outs.append(c_out)
            c_in = c_out
        if len(set(outs)) != 1:
            raise BadInput(f"block {list(names)} has output channels {outs}; mlkd's backbones use one width per "
                             "block")
        channels.append(outs[0])
    return tuple(channels)


def _hw(p: Mapping[str, Any], key: str, default: int) -> tuple[int, int]:
    """A (h, w) pair from ConvolutionParameter / PoolingParameter: ``key`` (scalar or list) or ``key_h``/``key_w``."""
    square = {"kernel": "kernel_size"}.get(key, key)
    v = p.get(square)
    if isinstance(v, list):
        v = v[0] if len(v) == 1 else (tuple(v) if len(v) == 2 else None)
    if isinstance(v, tuple):
        return v
    base = default if v is None else int(v)
    return int(p.get(f"{key}_h", base)), int(p.get(f"{key}_w", base))


def _check_conv_params(layer: CaffeLayer, dilation: int = 1) -> None:
    p = layer.params.get("convolution_param", {})
    got = {"kernel": _hw(p, "kernel", 0), "pad": _hw(p, "pad", 0), "stride": _hw(p, "stride", 1),
           "dilation": _hw(p, "dilation", 1), "group": p.get("group", 1), "bias_term": p.get("bias_term", True)}
    want = {"kernel": (3, 3), "pad": (dilation,) * 2, "stride": (1, 1), "dilation": (dilation,) * 2, "group": 1,
            "bias_term": True}
    if got != want:
        where = " (the last block after a 1x1 / stride 1 pool: dilated, as OICR's conv5)" if dilation > 1 else ""
        raise BadInput(f"prototxt layer {layer.name!r}: mlkd's VGG backbones need {want}{where}, the prototxt gives "
                       f"{got}")


def _pool_window(net: CaffeNet, name: str) -> tuple[CaffeLayer | None, tuple | None]:
    """Pooling layer ``name`` (None if there is none) and its (kernel, stride) when it is MAX pooling without
    padding (None for anything else)."""
    layer = next((l for l in net.layers if l.name == name and l.type == "Pooling"), None)
    p = layer.params.get("pooling_param", {}) if layer is not None else None
    if p is None or p.get("pool", "MAX") != "MAX" or p.get("global_pooling") or _hw(p, "pad", 0) != (0, 0):
        return layer, None
    return layer, (_hw(p, "kernel", 0), _hw(p, "stride", 1))


def _check_pool(net: CaffeNet, name: str) -> None:
    layer, window = _pool_window(net, name)
    if layer is None:
        found = next((l.type for l in net.layers if l.name == name), "nothing")
        raise BadInput(f"the prototxt has no Pooling layer {name!r} (found {found}); "
                         "VGG blocks are separated by 2x2 / stride 2 max pooling layers named like the release's")
    if window != ((2, 2), (2, 2)):
        raise BadInput(f"prototxt layer {name!r} is {layer.params.get('pooling_param', {})}; mlkd's VGG backbones "
                         "need MAX pooling, kernel 2, stride 2, no padding")


def fc_input_side(weights: Mapping[str, LayerBlobs], name: str, channels: int) -> int:
    """Side ``s`` of the ``channels x s x s`` map that InnerProduct layer ``name`` reads (its inputs = C * s * s)."""
    lb = weights[name]
    shape = tuple(lb.blobs[0].shape) if lb.blobs else ()
    side = math.isqrt(shape[1] // channels) if len(shape) == 2 and shape[1] % channels == 0 else 0
    if lb.type != "InnerProduct" or side < 1 or channels * side * side != shape[1]:
        raise BadInput(f"caffemodel layer {name!r} ({lb.type}) has weights {shape}; expected an InnerProduct over a "
                         f"{channels} x s x s map (inputs = {channels} * s * s)")
    return side


def fc_shapes(weights: Mapping[str, LayerBlobs], names: list[str], first_in: int) -> list[int]:
    """Check a chain of InnerProduct layers with biases (the first taking ``first_in`` inputs); their outputs."""
    outs, n_in = [], first_in
    for name in names:
        lb = weights.get(name)
        shapes = [tuple(b.shape) for b in lb.blobs] if lb else []
        n_out = shapes[0][0] if shapes and len(shapes[0]) == 2 else -1
        if lb is None or lb.type != "InnerProduct" or shapes != [(n_out, n_in), (n_out,)]:
            found = f"{lb.type} with blobs {shapes}" if lb else "nothing"
            raise BadInput(f"caffemodel layer {name!r}: expected an InnerProduct with weights (OUT, {n_in}) and bias "
                             f"(OUT,), found {found}")
        outs.append(n_out)
        n_in = n_out
    return outs
