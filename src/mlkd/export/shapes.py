"""Spatial sizes through a VGG-style ``features`` stack, computed PyTorch's way or Caffe's (which always rounds
pooling up). Plain arithmetic, no Caffe files: the Caffe export checks that both agree, and every export uses the
PyTorch sizes (e.g. the pool5 grid of a student at its input size).
"""

from __future__ import annotations

import math

from torch import nn

from mlkd.errors import BadInput


def pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv_padding(conv: nn.Conv2d, where: str) -> tuple[int, int]:
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        raise BadInput(f"{where}: only zero padding given as numbers converts to Caffe, got padding={conv.padding!r} "
                         f"padding_mode={conv.padding_mode!r}")
    return pair(conv.padding)


def _conv_out(n: int, k: int, s: int, p: int, d: int) -> int:
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def _pool_out(n: int, k: int, s: int, p: int, ceil: bool, caffe: bool) -> int:
    """Pooled size, Caffe's way (always ceil; last window dropped if it starts in the padding, padded pools
    only) or PyTorch's (floor, or ceil with the same drop for any padding)."""
    out = (math.ceil if ceil else math.floor)((n + 2 * p - k) / s) + 1
    if ceil and (p > 0 or not caffe) and (out - 1) * s >= n + p:
        out -= 1
    return out


def feature_sizes(features: nn.Sequential, size: tuple[int, int], caffe: bool) -> list[tuple[int, int]]:
    """Spatial ``(H, W)`` after each module of ``features`` for input ``size``, computed Caffe's or PyTorch's way."""
    sizes, (h, w) = [], size
    for i, module in enumerate(features):
        if isinstance(module, nn.Conv2d):
            (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
            (ph, pw) = conv_padding(module, f"features.{i}")
            h, w = _conv_out(h, kh, sh, ph, dh), _conv_out(w, kw, sw, pw, dw)
        elif isinstance(module, nn.MaxPool2d):
            (kh, kw), (sh, sw), (ph, pw) = pair(module.kernel_size), pair(module.stride), pair(module.padding)
            ceil = caffe or module.ceil_mode
            h, w = _pool_out(h, kh, sh, ph, ceil, caffe), _pool_out(w, kw, sw, pw, ceil, caffe)
        sizes.append((h, w))
    return sizes
