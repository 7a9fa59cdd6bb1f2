"""The shareable model folder: ``model.safetensors`` (the weights) + ``config.json`` (everything else), no pickle.

``config.json``::

    format          "mlkd-model"
    format_version  1
    mlkd_version    the version that wrote it
    kind            "teacher" | "student"
    model_config    the model's config (as in a checkpoint)
    classes         class names in output order
    input_convention, image_size, max_proposals, proposals   how to feed the model (as a checkpoint's inference)
    dataset         identity of the training split, or null

:func:`write_model_dir` makes one from a checkpoint, :func:`read_model_dir` reads one back as a checkpoint dict
(without training state), so :func:`mlkd.models.build.model_from_checkpoint` and :func:`mlkd.load` take both.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import safetensors.torch

from mlkd.checkpoint import make_checkpoint
from mlkd.version import __version__

FORMAT, FORMAT_VERSION = "mlkd-model", 1
WEIGHTS, CONFIG = "model.safetensors", "config.json"


def is_model_dir(path: str | Path) -> bool:
    """True when ``path`` is a folder holding ``config.json`` (a model folder, or a damaged one)."""
    return Path(path).is_dir() and (Path(path) / CONFIG).is_file()


def write_model_dir(ckpt: dict[str, Any], out: str | Path) -> Path:
    """Write the model of ``ckpt`` (a teacher or student checkpoint dict) into the folder ``out``."""
    if ckpt["kind"] not in ("teacher", "student"):
        raise ValueError(f"only trained teachers and students are written as model folders, not {ckpt['kind']}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    inference = ckpt["inference"]
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "mlkd_version": __version__, "kind": ckpt["kind"],
              "model_config": ckpt["model_config"], "classes": ckpt["classes"],
              "input_convention": ckpt["input_convention"], "image_size": inference["image_size"],
              "max_proposals": inference.get("max_proposals"), "proposals": inference.get("proposals"),
              "dataset": ckpt.get("dataset")}
    state = {k: v.contiguous() for k, v in ckpt["model"].items()}
    safetensors.torch.save_file(state, str(out / (WEIGHTS + ".tmp")), metadata={"format": FORMAT})
    os.replace(out / (WEIGHTS + ".tmp"), out / WEIGHTS)
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def read_model_dir(path: str | Path) -> dict[str, Any]:
    """A model folder as a checkpoint dict (format version 2, no training state); clear errors naming the file."""
    path = Path(path)
    cfg_path, weights = path / CONFIG, path / WEIGHTS
    if not cfg_path.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{path} is not an mlkd model folder: it needs {CONFIG} and {WEIGHTS}")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {cfg_path}: {e}") from e
    if not isinstance(config, dict) or config.get("format") != FORMAT or config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{cfg_path} is not an mlkd model config (format {FORMAT!r} v{FORMAT_VERSION})")
    missing = [k for k in ("kind", "model_config", "classes", "input_convention", "image_size") if k not in config]
    if missing:
        raise ValueError(f"{cfg_path} lacks {missing}")
    try:
        state = safetensors.torch.load_file(str(weights))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise ValueError(f"cannot read weights {weights}: {type(e).__name__}: {e}") from e
    return make_checkpoint(config["kind"], state, input_convention=config["input_convention"],
                           classes=config["classes"], model_config=config["model_config"],
                           image_size=config["image_size"], max_proposals=config.get("max_proposals"),
                           proposals=config.get("proposals"), dataset=config.get("dataset"),
                           source={"model_dir": str(path)})
