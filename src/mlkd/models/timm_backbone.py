"""Student backbones from timm: ``model.backbone: timm/<name>`` (needs the ``[timm]`` extra).

The backbone is the model's last feature map, through timm's feature API (``features_only=True,
out_indices=(-1,)``): for a convnet its last stage (stride 32 for ResNets, ConvNeXts, EfficientNets); for a ViT
the last block's patch tokens, class and other prefix tokens dropped, reshaped to a ``(B, C, H / p, W / p)`` map
(timm's ``FeatureGetterNet`` over ``forward_intermediates``). Maps timm gives channels-last (Swin) are permuted to
``(B, C, h, w)``. A model with a fixed input size (ViTs, Swin) is built for the student's ``image_size`` through
timm's ``img_size`` argument; timm resamples pretrained position embeddings to it.

timm is imported only here, and only when such a backbone is built: ``import mlkd`` and non-timm models never
import it. The module names inside ``features`` are timm's, so a checkpoint rebuilds with the timm release that
wrote it (a release that renamed modules is an error listing the differing keys, from
:func:`mlkd.models.build.model_from_checkpoint`).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from mlkd.errors import BadInput
from mlkd.utils.optional import optional_import

PREFIX = "timm/"  # model.backbone: timm/<timm model name>
FIND_NAMES = "python -c \"import timm; print(timm.list_models('*convnext*'))\" (any pattern; list_pretrained lists weights)"


def is_timm(backbone: str) -> bool:
    return backbone.startswith(PREFIX)


def timm_module() -> ModuleType:
    """timm, or an error naming the ``[timm]`` extra."""
    return optional_import("timm", "timm", f"model.backbone {PREFIX}<name>")


def check_model_name(name: str) -> None:
    """An unknown timm architecture is an error naming the closest ones and how to list them all."""
    timm = timm_module()
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"closest: {close}; " if close else ""
        raise BadInput(f"model.backbone: {PREFIX + name!r} names no model of timm {timm.__version__} ({hint}list "
                       f"the names with {FIND_NAMES})")


def pretrained_cfg(name: str) -> dict[str, Any]:
    """timm's pretrained config of ``arch`` (its default tag) or ``arch.tag`` as a dict (mean, std, input_size,
    hf_hub_id, url, ...); an unknown tag is an error listing the architecture's tags."""
    timm = timm_module()
    arch = name.split(".", 1)[0]
    check_model_name(arch)
    try:
        cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=False)
    except RuntimeError:
        cfg = None
    if cfg is None:
        tags = timm.list_pretrained(f"{arch}.*")
        raise BadInput(f"timm has no pretrained weights {name!r}; {arch} has {tags or 'none'}")
    return cfg.to_dict()


class TimmBackbone(nn.Module):
    """A timm feature extractor with ``out_channels`` and ``stride``: ``(B, 3, H, W) -> (B, C, H / s, W / s)``."""

    def __init__(self, features: nn.Module, channels_last: bool) -> None:
        super().__init__()
        info = features.feature_info
        self.features, self.channels_last = features, channels_last
        self.out_channels, self.stride = info.channels()[-1], info.reduction()[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (fmap,) = self.features(x)  # the one feature map of out_indices=(-1,)
        return fmap.permute(0, 3, 1, 2) if self.channels_last else fmap  # (B, h, w, C) -> (B, C, h, w)


def timm_backbone(backbone: str, image_size: int, weights: Path | None = None, tag: str | None = None
                  ) -> TimmBackbone:
    """The timm backbone ``backbone`` (``timm/<arch>``) for ``image_size`` inputs, random weights, or the
    pretrained ``weights`` file (timm's layout) loaded by timm for the pretrained config ``tag`` (``arch.tag``;
    None: the architecture's default), so timm's own adaptation (position embeddings) applies."""
    timm, arch = timm_module(), backbone[len(PREFIX):]
    check_model_name(arch)
    cfg = timm.models.get_pretrained_cfg(arch, allow_unregistered=True)
    kwargs: dict[str, Any] = {"features_only": True, "out_indices": (-1,)}
    if cfg is not None and cfg.fixed_input_size:
        kwargs["img_size"] = image_size
    if weights is not None:  # a local file only: timm's own sources (url, Hugging Face hub) are never used
        kwargs["pretrained_cfg_overlay"] = {"file": str(weights), "custom_load": weights.suffix == ".npz"}
    try:
        features = timm.create_model(tag or arch, pretrained=weights is not None, **kwargs)
    except TypeError as e:  # a fixed-size model that does not take img_size
        raise BadInput(f"model.backbone {backbone}: timm cannot build it for image_size {image_size} ({e})") from e
    except RuntimeError as e:  # no feature API for this model, or pretrained weights that do not fit it
        where = f" with weights {weights}" if weights is not None else ""
        raise BadInput(f"model.backbone {backbone}{where}: {e}") from e
    return TimmBackbone(features, channels_last=getattr(features, "output_fmt", "NCHW") == "NHWC")
