"""Where pretrained weights come from (``model.weights``), always a local file:

- a path: a state dict file (torchvision's layout, an ``mlkd import-caffe`` output, or timm's layout for a
  ``timm/<name>`` backbone);
- ``torchvision:<WEIGHTS>``: torchvision's weights of the backbone (``vgg16``, ``resnet50``, ``resnet101``), e.g.
  ``torchvision:IMAGENET1K_V1``, read from the torch hub cache, where torchvision downloads them:
  ``torch.hub.get_dir()/checkpoints/<file name of the weights' URL>`` (``$TORCH_HOME/hub/checkpoints``);
- ``timm:<arch>.<tag>``: timm's pretrained weights of a ``timm/<arch>`` backbone (e.g. ``timm:resnet50.a1_in1k``;
  ``timm:<arch>`` is timm's default tag), read from the Hugging Face cache where timm downloads them
  (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``), or from the torch hub cache for
  the few timm weights that are only at a URL.

Nothing is downloaded, unless ``MLKD_DOWNLOAD_WEIGHTS=1`` is set: then a missing file is downloaded into the cache
where it is looked for. Otherwise a missing file is an error naming the file expected and both ways to get it.

torchvision's and timm's weights say which input they expect (their mean / std): that convention must be the
model's ``input_convention`` (an error says which to set), as for a local file that records one.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import re
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import torch
import torchvision

from mlkd.errors import BadInput, NotFound
from mlkd.models.backbones import CONVENTIONS, convention_of
from mlkd.models.timm_backbone import PREFIX, is_timm, pretrained_cfg
from mlkd.utils.optional import optional_import

logger = logging.getLogger(__name__)

TORCHVISION, TIMM = "torchvision:", "timm:"
DOWNLOAD_ENV = "MLKD_DOWNLOAD_WEIGHTS"
TORCHVISION_BACKBONES = ("vgg16", "resnet50", "resnet101")  # mlkd backbones named as torchvision's models
# the safetensors file timm prefers on the hub, for the pickle file a pretrained config names
SAFE_ALTERNATIVE = {"pytorch_model.bin": "model.safetensors", "open_clip_pytorch_model.bin": "open_clip_model.safetensors"}


@dataclasses.dataclass(frozen=True)
class Weights:
    """A resolved ``model.weights``: the local ``path``, the input ``convention`` the weights expect (None for a
    plain path: such a file may record its own) and, for timm, the pretrained config ``tag`` (``arch.tag``)."""

    path: Path
    convention: str | None
    tag: str | None = None


def resolve_weights(spec: str, backbone: str, convention: str) -> Weights:
    """The local file of ``model.weights`` = ``spec`` for ``backbone``, checked against the model's input
    ``convention`` (see the module docstring)."""
    if spec.startswith(TORCHVISION):
        return torchvision_weights(spec[len(TORCHVISION):], backbone, convention)
    if spec.startswith(TIMM):
        return timm_weights(spec[len(TIMM):], backbone, convention)
    path = Path(spec)
    if not path.is_file():
        raise NotFound(f"weights file not found: {path} (mlkd never downloads weights; give a local file, "
                       f"{TORCHVISION}<WEIGHTS> or {TIMM}<arch>.<tag>)")
    return Weights(path, None)


def _check_convention(spec: str, expected: str, configured: str) -> None:
    if expected != configured:
        c = CONVENTIONS[expected]
        raise BadInput(f"model.weights {spec} expect input convention {expected!r} (mean {c['mean']}, std "
                       f"{c['std']}), but the model is configured for {configured!r} (set "
                       f"model.input_convention={expected})")


def torchvision_weights(name: str, backbone: str, configured: str) -> Weights:
    """torchvision's weights ``name`` (a member of e.g. ``ResNet50_Weights``) of ``backbone``, from the torch hub
    cache; their convention must be the ``configured`` one."""
    if backbone not in TORCHVISION_BACKBONES:
        other = f" (a timm backbone takes {TIMM}<arch>.<tag>)" if is_timm(backbone) else ""
        raise BadInput(f"model.weights {TORCHVISION}{name}: torchvision weights exist for the backbones "
                       f"{list(TORCHVISION_BACKBONES)}, not {backbone!r}{other}")
    enum = torchvision.models.get_model_weights(backbone)
    try:
        weights = enum[name]
    except KeyError:
        raise BadInput(f"model.weights {TORCHVISION}{name}: {enum.__name__} has {[w.name for w in enum]} "
                       "(or DEFAULT)") from None
    mean, std = _torchvision_mean_std(weights)
    convention = convention_of(mean, std)
    if convention is None:
        raise BadInput(f"model.weights {TORCHVISION}{name} expect RGB 0-1 input with mean {mean}, std {std}: none of "
                       f"mlkd's input conventions {sorted(CONVENTIONS)}; use other weights of {enum.__name__}")
    _check_convention(f"{TORCHVISION}{name}", convention, configured)
    path = Path(torch.hub.get_dir()) / "checkpoints" / _url_file_name(weights.url)
    how = f"python -c \"import torchvision; torchvision.models.{enum.__name__}.{weights.name}.get_state_dict()\""
    return Weights(_cached(path, lambda: _download_url(weights.url, path), f"{TORCHVISION}{name}", how), convention)


def _torchvision_mean_std(weights) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean / std of a torchvision weights' preset transform (ImageClassification's defaults unless given)."""
    preset = weights.transforms  # functools.partial(ImageClassification, crop_size=..., [mean=..., std=...])
    defaults = {k: p.default for k, p in inspect.signature(preset.func).parameters.items()}
    kw = {**defaults, **preset.keywords}
    return tuple(kw["mean"]), tuple(kw["std"])


def timm_weights(name: str, backbone: str, configured: str) -> Weights:
    """timm's pretrained weights ``name`` (``arch.tag`` or ``arch``) of ``backbone`` (``timm/<arch>``), from the
    Hugging Face cache (or the torch hub cache for weights only at a URL); their convention must be the
    ``configured`` one."""
    arch = name.split(".", 1)[0]
    if not is_timm(backbone) or backbone[len(PREFIX):] != arch:
        raise BadInput(f"model.weights {TIMM}{name} are weights of the backbone {PREFIX}{arch}; model.backbone is "
                       f"{backbone!r}")
    cfg = pretrained_cfg(name)
    tag = f"{cfg['architecture']}.{cfg['tag']}" if cfg.get("tag") else cfg["architecture"]
    convention = convention_of(cfg["mean"], cfg["std"])
    if convention is None:
        raise BadInput(f"model.weights {TIMM}{tag} expect RGB 0-1 input with mean {cfg['mean']}, std {cfg['std']}: "
                       f"none of mlkd's input conventions {sorted(CONVENTIONS)} (add it to "
                       "mlkd.models.backbones.CONVENTIONS)")
    _check_convention(f"{TIMM}{name}", convention, configured)
    how = f"python -c \"import timm; timm.create_model('{tag}', pretrained=True)\""
    if cfg.get("hf_hub_id"):
        return Weights(_hf_cached(cfg, f"{TIMM}{name}", how), convention, tag)
    if cfg.get("url"):
        path = Path(torch.hub.get_dir()) / "checkpoints" / _url_file_name(cfg["url"])
        return Weights(_cached(path, lambda: _download_url(cfg["url"], path), f"{TIMM}{name}", how), convention, tag)
    raise BadInput(f"model.weights {TIMM}{tag}: timm names no hub or URL for these weights; give a local file")


def _cached(path: Path, download: Callable[[], Path], source: str, how: str) -> Path:
    """``path`` when it is there; else downloaded when :data:`DOWNLOAD_ENV` allows it, or an error saying how."""
    if path.is_file():
        return path
    if os.environ.get(DOWNLOAD_ENV) == "1":
        logger.info(f"downloading {source} to {path} ({DOWNLOAD_ENV}=1)")
        return download()
    raise NotFound(f"model.weights {source}: {path} is not there and mlkd downloads nothing by itself; get it "
                   f"once, online: rerun with {DOWNLOAD_ENV}=1 in the environment, or run {how}")


def _url_file_name(url: str) -> str:
    return os.path.basename(urlparse(url).path)  # how torch.hub names a downloaded file


def _download_url(url: str, path: Path) -> Path:
    """``url`` into ``path`` as torch.hub does (a hash in the name, e.g. ``resnet50-0676ba61.pth``, is checked)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    match = re.search(r"-([a-f0-9]*)\.", path.name)  # torch.hub.HASH_REGEX
    torch.hub.download_url_to_file(url, str(path), match.group(1) if match else None, progress=True)
    return path


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, resolved from the environment now (huggingface_hub reads it once, at import):
    ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``, else
    ``~/.cache/huggingface/hub``."""
    env = os.environ
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return Path(os.path.expanduser(env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or
                                   os.path.join(home, "hub")))


def _hf_cached(cfg: dict, source: str, how: str) -> Path:
    """The file of timm's pretrained config ``cfg`` in the Hugging Face cache (its safetensors form first, as
    timm loads it)."""
    hub = optional_import("huggingface_hub", "timm", "timm's pretrained weights")
    repo, _, revision = cfg["hf_hub_id"].partition("@")
    named = cfg.get("hf_hub_filename") or "pytorch_model.bin"
    files = [f for f in (SAFE_ALTERNATIVE.get(named), named) if f]
    cache = hf_cache_dir()
    for file in files:
        found = hub.try_to_load_from_cache(repo, file, cache_dir=cache, revision=revision or None)
        if isinstance(found, str):
            return Path(found)
    entry = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / "<revision>" / files[0]
    return _cached(entry, lambda: _hf_download(hub, repo, files, revision or None, cache), source, how)


def _hf_download(hub, repo: str, files: list[str], revision: str | None, cache: Path) -> Path:
    for file in files:
        try:
            return Path(hub.hf_hub_download(repo, file, revision=revision, cache_dir=cache))
        except hub.errors.EntryNotFoundError:
            continue
    raise NotFound(f"the Hugging Face repository {repo} has none of {files}")
