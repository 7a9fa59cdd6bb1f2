"""Convolutional backbones, the input conventions they expect, and ImageNet weights from local files.

A backbone is an ``nn.Module`` mapping normalised images ``(B, 3, H, W)`` to a feature map
``(B, out_channels, H / stride, W / stride)``, with attributes ``out_channels`` and ``stride``.

- ``vgg16``: torchvision's VGG16 ``features`` without pool5 (conv1_1 .. conv5_3 + ReLU, stride 16), the
  teacher's and student's backbone in the release. Module indices are torchvision's, so a torchvision
  ``vgg16`` state dict loads as it is.
  With ``model.dilate_last_block`` (:func:`dilate_last_block`): OICR's VGG16, pool4 an identity and conv5
  dilated, stride 8.
- ``tiny``: a VGG-style stack for tests and the demo, ``len(channels)`` blocks of ``convs_per_block`` 3x3
  conv + ReLU with a 2x2 max pool between blocks (stride ``2 ** (len(channels) - 1)``).
- ``resnet50`` / ``resnet101``: torchvision ResNets up to layer4 (stride 32), for students.
- ``timm/<name>``: any timm model's last feature map (:mod:`mlkd.models.timm_backbone`, the ``[timm]`` extra).
- ``resnet50_c4`` (teacher only, :func:`resnet50_c4`): Faster R-CNN's "C4" split of torchvision's ResNet-50 with
  frozen BatchNorm: stem .. layer3 as the backbone (stride 16, 1024 channels), layer4 as the region head.

Weights are never downloaded: ``weights`` is a local file (see :func:`load_imagenet_weights`) or a file found in
torchvision's / timm's local caches (:mod:`mlkd.models.weights`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from mlkd.errors import BadInput, NotFound
from mlkd.utils import autotune

# Input conventions (docs/conventions.md): how uint8 RGB images become network input.
#  caffe: BGR, 0-255, minus the per-channel mean (B, G, R order), no std (the release's VGG16 caffemodel)
#  torchvision: RGB, 0-1, ImageNet mean/std (torchvision's pretrained weights, most of timm's)
#  inception, clip, unit: RGB, 0-1, the other mean/std pairs timm's pretrained weights use (ViTs, BEiT, CLIP
#  towers, MobileCLIP); see convention_of
CONVENTIONS = {
    "caffe": {"bgr": True, "scale": 1.0, "mean": (103.52, 116.28, 123.675), "std": (1.0, 1.0, 1.0)},
    "torchvision": {"bgr": False, "scale": 1 / 255, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
    "inception": {"bgr": False, "scale": 1 / 255, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
    "clip": {"bgr": False, "scale": 1 / 255, "mean": (0.48145466, 0.4578275, 0.40821073),
             "std": (0.26862954, 0.26130258, 0.27577711)},
    "unit": {"bgr": False, "scale": 1 / 255, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)},
}


def convention_of(mean: Sequence[float], std: Sequence[float]) -> str | None:
    """The named convention of RGB 0-1 input normalised by ``mean`` / ``std`` (what timm's and torchvision's
    pretrained configs give), or None when no named convention has these values."""
    given = (*mean, *std)
    for name, c in CONVENTIONS.items():
        ref = (*c["mean"], *c["std"])
        if not c["bgr"] and c["scale"] == 1 / 255 and len(given) == len(ref) and \
                all(abs(a - b) < 1e-6 for a, b in zip(given, ref)):
            return name
    return None


def normalize(images: torch.Tensor, convention: str) -> torch.Tensor:
    """uint8 (or 0-255 float) RGB ``(B, 3, H, W)`` -> float32 network input in ``convention``."""
    if convention not in CONVENTIONS:
        raise BadInput(f"unknown input convention {convention!r}; choose one of {sorted(CONVENTIONS)}")
    c = CONVENTIONS[convention]
    x = images.float()
    if c["bgr"]:
        x = x.flip(1)
    mean = torch.tensor(c["mean"], device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(c["std"], device=x.device).view(1, 3, 1, 1)
    return (x * c["scale"] - mean) / std


class ConvBackbone(nn.Module):
    """A plain ``features`` stack (VGG-like) with ``out_channels`` and ``stride``.

    ``cpu_channels_last_blocks``: on the CPU, run the first that many blocks (up to their max pool) in the
    channels_last layout and the rest in the default one, when the input comes in the default layout. oneDNN's
    3x3 convolutions with few channels on large maps can be faster channels_last and those with many channels
    slower, but which wins depends on the CPU: VGG16's conv1-conv2 channels_last made forward + backward at 480 px
    7 % faster on an AVX-512 EPYC and 30 % slower on an AVX2 one. So it is a candidate, and
    :func:`mlkd.utils.autotune.fastest` times it against the default layout the first time a (machine, input
    shape, training or not) is met and remembers the winner; ``MLKD_AUTOTUNE=0`` always takes
    ``cpu_channels_last_blocks``. Both layouts give the same values up to float rounding. An input already in
    channels_last (a caller that chose that layout for the whole network) keeps it throughout; CUDA, tracing and
    ONNX export see the plain stack.
    """

    def __init__(self, features: nn.Sequential, out_channels: int, stride: int,
                 cpu_channels_last_blocks: int = 0) -> None:
        super().__init__()
        self.features, self.out_channels, self.stride = features, out_channels, stride
        pools = [i for i, layer in enumerate(features) if isinstance(layer, nn.MaxPool2d)]
        self.layout_switch = pools[cpu_channels_last_blocks - 1] \
            if 0 < cpu_channels_last_blocks <= len(pools) else None  # the first layer run in the default layout
        widths = [str(m.out_channels) for m in features if isinstance(m, nn.Conv2d)]
        self.signature = f"conv {'-'.join(widths)}"  # names the stack in the autotune decisions

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, C, H / s, W / s)
        if self.layout_switch is None or x.device.type != "cpu" or x.dim() != 4 or torch.jit.is_tracing() \
                or torch.onnx.is_in_onnx_export() or x.is_contiguous(memory_format=torch.channels_last):
            return self.features(x)
        return self._run(x, self._switch(x))

    def _run(self, x: torch.Tensor, switch: int | None) -> torch.Tensor:
        """The stack with its layers before ``switch`` channels_last (None: all in the default layout)."""
        if switch is None:
            return self.features(x)
        x = x.contiguous(memory_format=torch.channels_last)
        for i, layer in enumerate(self.features):
            if i == switch:
                x = x.contiguous()
            x = layer(x)
        return x

    def _switch(self, x: torch.Tensor) -> int | None:
        """Where this input switches layout: the faster of the default layout and ``layout_switch`` here."""
        train = torch.is_grad_enabled() and any(p.requires_grad for p in self.features.parameters())
        shape = f"batch {x.shape[0]} {autotune.size_class(x.shape[2] * x.shape[3])} {'train' if train else 'eval'}"
        candidates = {"channels_last": lambda: self._cost(x, self.layout_switch, train),
                      "default": lambda: self._cost(x, None, train)}
        choice = autotune.fastest(f"{self.signature} layout", shape, candidates, "channels_last", x.device)
        return self.layout_switch if choice == "channels_last" else None

    def _cost(self, x: torch.Tensor, switch: int | None, train: bool) -> None:
        """What one step does with the stack: forward, and backward into the parameters when training (their
        gradients are returned, not accumulated)."""
        params = [p for p in self.features.parameters() if p.requires_grad]
        with torch.set_grad_enabled(train):
            y = self._run(x.detach(), switch)
            if train:
                torch.autograd.grad(y.sum(), params)


def vgg16() -> ConvBackbone:
    """conv1_1 .. conv5_3 of torchvision's VGG16 (pool5 removed): 512 channels, stride 16. On the CPU, conv1 and
    conv2 run channels_last where that is faster (:class:`ConvBackbone`; on an AVX-512 EPYC forward + backward of
    the stack was 7 % faster at 480 px, batch 1, 11 % at 224 px, batch 16, inference 17 %; on an AVX2 one 30 %
    slower)."""
    features = torchvision.models.vgg16().features[:30]
    return ConvBackbone(features, 512, 16, cpu_channels_last_blocks=2)


def tiny(channels: Sequence[int] = (16, 32, 64, 64), convs_per_block: int = 1) -> ConvBackbone:
    """A small VGG-style backbone: stride ``2 ** (len(channels) - 1)``, ``channels[-1]`` output channels.

    It trains from scratch, so its convolutions start as torchvision's VGG does: He-normal weights (fan out,
    ReLU gain) and zero biases. PyTorch's default initialisation shrinks the variance about 6x per layer; the
    demo's WSDDN teacher then sat at the class prior for epochs (on the badges look, seed 0 never left it in 16
    epochs: held-out mAP 21.5, where He init gives 99.2; on shapes, the mean over 3 seeds went from 83.9 to 94.7).
    """
    if not channels or any(c < 1 for c in channels) or convs_per_block < 1:
        raise BadInput(f"tiny backbone needs positive channels and convs_per_block, got {channels}, "
                         f"{convs_per_block}")
    layers: list[nn.Module] = []
    in_ch = 3
    for block, out_ch in enumerate(channels):
        if block:
            layers.append(nn.MaxPool2d(2, 2))
        for _ in range(convs_per_block):
            conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.ReLU(inplace=True)]
            in_ch = out_ch
    return ConvBackbone(nn.Sequential(*layers), channels[-1], 2 ** (len(channels) - 1))


def dilate_last_block(backbone: ConvBackbone) -> ConvBackbone:
    """The backbone with its last block at twice the resolution, as OICR's VGG16 (conv5 dilated, stride 8).

    The max pool before the last block becomes a 1x1 / stride 1 one (an identity that keeps the module indices, so
    ImageNet weights and the Caffe layer names stay as they are) and the block's 3x3 convolutions take dilation 2
    and padding 2, so each kernel still spans the extent of image it spanned after the pool (its taps two positions
    apart) and is evaluated at every position. The stride halves (VGG16: 16 -> 8); the weights are unchanged.
    """
    pools = [i for i, layer in enumerate(backbone.features) if isinstance(layer, nn.MaxPool2d)]
    if not pools:
        raise BadInput("model.dilate_last_block needs a backbone with a max pool before its last block; this one "
                       "has a single block (tiny with one channel width)")
    last = pools[-1]
    backbone.features[last] = nn.MaxPool2d(1, 1)
    for layer in list(backbone.features)[last + 1:]:
        if isinstance(layer, nn.Conv2d):
            layer.dilation = tuple(2 * d for d in layer.dilation)
            layer.padding = tuple(d * (k - 1) // 2 for d, k in zip(layer.dilation, layer.kernel_size))
    backbone.stride //= 2
    backbone.signature += " dilated"
    return backbone


def conv_blocks(backbone: nn.Module) -> dict[str, list[nn.Module]]:
    """The layers of a VGG-style backbone by block: ``conv1`` = everything before the first max pool, ``conv2``
    up to the second, ... (VGG16: conv1_1..conv1_2, conv2_1..conv2_2, ..., conv5_1..conv5_3)."""
    if not isinstance(backbone, ConvBackbone):
        raise BadInput(f"model.freeze names blocks of a VGG-style backbone (vgg16, tiny) or stages of resnet50_c4, "
                       f"not of {type(backbone).__name__}")
    blocks: dict[str, list[nn.Module]] = {"conv1": []}
    for layer in backbone.features:
        if isinstance(layer, nn.MaxPool2d):
            blocks[f"conv{len(blocks) + 1}"] = []
        else:
            blocks[f"conv{len(blocks)}"].append(layer)
    return blocks


def freeze(backbone: nn.Module, names: Sequence[str]) -> None:
    """Fix the weights of the named blocks (:func:`conv_blocks`; resnet50_c4: :meth:`ResNetC4.stages`): no gradient,
    never updated. Freezing a prefix (conv1, conv2 as in Fast R-CNN's VGG16 recipe; stem, layer1 as in Faster
    R-CNN C4's) also saves the backward pass through those blocks, since nothing below them needs a gradient."""
    if not names:
        return
    blocks = backbone.stages() if isinstance(backbone, ResNetC4) else conv_blocks(backbone)
    unknown = sorted(set(names) - set(blocks))
    if unknown:
        raise BadInput(f"model.freeze: unknown block(s) {unknown}; this backbone has {list(blocks)}")
    for name in names:
        for layer in blocks[name]:
            layer.requires_grad_(False)


class ResNetBackbone(nn.Module):
    """torchvision ResNet stem .. layer4 (stride 32); module names are torchvision's."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        net = {50: torchvision.models.resnet50, 101: torchvision.models.resnet101}[depth]()
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.out_channels, self.stride = 2048, 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 2048, H / 32, W / 32)


class ResNetC4(nn.Module):
    """Faster R-CNN's "C4" backbone: torchvision ResNet-50 stem .. layer3 (stride 16, 1024 channels), module names
    torchvision's. Its BatchNorm layers are :class:`torchvision.ops.FrozenBatchNorm2d`: the ImageNet statistics
    and affine are buffers, never trained, and the same in train and eval mode (as in Detectron's C4 recipe,
    where a batch of 1-2 images could not estimate statistics)."""

    def __init__(self, net: torchvision.models.ResNet) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3
        self.out_channels, self.stride = 1024, 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))  # (B, 1024, H / 16, W / 16)

    def stages(self) -> dict[str, list[nn.Module]]:
        """What ``model.freeze`` names: ``stem`` (conv1 + bn1), ``layer1`` .. ``layer3`` (Detectron's res2..res4)."""
        return {"stem": [self.conv1, self.bn1], "layer1": [self.layer1], "layer2": [self.layer2],
                "layer3": [self.layer3]}


class Res5Head(nn.Module):
    """Faster R-CNN C4's region head: ResNet-50 ``layer4`` (Detectron's res5; stride 2 in its first block) on pooled
    regions ``(N, 1024, s, s)``, then the mean over space: region features ``(N, 2048)``, >= 0 (layer4 ends in a
    ReLU)."""

    def __init__(self, layer4: nn.Sequential) -> None:
        super().__init__()
        self.layer4 = layer4
        self.out_features = 2048

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer4(x).mean((2, 3))  # (N, 1024, s, s) -> (N, 2048, ceil(s / 2), ceil(s / 2)) -> (N, 2048)


def resnet50_c4() -> tuple[ResNetC4, Res5Head]:
    """torchvision's ResNet-50 with frozen BatchNorm, split as Faster R-CNN C4 splits it: the backbone (stem ..
    layer3) and the region head (layer4 + average pool). Its 1000-way ``fc`` is dropped."""
    net = torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d)
    return ResNetC4(net), Res5Head(net.layer4)


BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "vgg16": lambda **kw: vgg16(),
    "tiny": lambda channels=(16, 32, 64, 64), convs_per_block=1, **kw: tiny(channels, convs_per_block),
    "resnet50": lambda **kw: ResNetBackbone(50),
    "resnet101": lambda **kw: ResNetBackbone(101),
}


def build_backbone(name: str, **kwargs) -> nn.Module:
    """A backbone by name (``vgg16``, ``tiny``, ``resnet50``, ``resnet101``); ``kwargs`` for ``tiny``. timm
    backbones (``timm/<name>``) are built by :func:`mlkd.models.timm_backbone.timm_backbone`."""
    if name not in BACKBONES:
        raise BadInput(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)} or timm/<timm model name>")
    return BACKBONES[name](**kwargs)


def read_state_dict(path: str | Path, convention: str | None = None) -> dict[str, torch.Tensor]:
    """A state dict from a local file: a plain state dict, or an mlkd checkpoint / converted file (its
    ``model``). Such a file records the input convention its weights expect; with ``convention`` given, a
    different recorded one is an error rather than a silent mismatch."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"weights file not found: {path} (mlkd never downloads weights; give a local file)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file; name the file instead
        raise BadInput(f"cannot read weights from {path}: {type(e).__name__}: {e}") from e
    recorded = obj.get("input_convention") if isinstance(obj, dict) else None
    if convention is not None and recorded is not None and recorded != convention:
        raise BadInput(f"{path} holds weights for input convention {recorded!r}, but the model is configured "
                         f"for {convention!r} (set model.input_convention={recorded})")
    obj = obj.get("model", obj) if isinstance(obj, dict) else obj
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BadInput(f"{path} does not hold a state dict (name -> tensor)")
    return obj


def load_imagenet_weights(model: nn.Module, path: str | Path, mapping: dict[str, str],
                          convention: str | None = None) -> list[str]:
    """Copy ImageNet weights from a local torchvision-layout file into ``model``.

    ``mapping`` maps a key prefix of the file (e.g. ``"features."``, ``"classifier.0."``) to a prefix of
    ``model`` (e.g. ``"backbone.features."``, ``"fc6."``). Keys of the file with no matching prefix are ignored
    (e.g. the 1000-way classifier). Every mapped key must exist in the model with the same shape, and every
    model key under a mapped prefix must be provided: otherwise a ``ValueError`` lists the differences.
    ``convention`` is checked against the one the file records (see :func:`read_state_dict`).
    Returns the model keys that were loaded.
    """
    src = read_state_dict(path, convention)
    own = model.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    problems = []
    for key, value in src.items():
        for old, new in mapping.items():
            if key.startswith(old):
                target = new + key[len(old):]
                if target not in own and key.endswith("num_batches_tracked"):
                    continue  # BatchNorm's update counter: frozen BatchNorm has none, and nothing reads it
                if target not in own:
                    problems.append(f"{key} -> {target}: not a parameter of the model")
                elif own[target].shape != value.shape:
                    problems.append(f"{key} -> {target}: shape {tuple(value.shape)} in the file, "
                                    f"{tuple(own[target].shape)} in the model")
                else:
                    loaded[target] = value
    expected = [k for k in own if any(k.startswith(new) for new in mapping.values())]
    problems += [f"{k}: missing from {path}" for k in expected if k not in loaded and "num_batches" not in k]
    if problems:
        raise BadInput(f"weights in {path} do not fit the model:\n  " + "\n  ".join(problems[:20]))
    model.load_state_dict(loaded, strict=False)
    return sorted(loaded)
