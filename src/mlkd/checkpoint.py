"""Checkpoints written atomically, with everything needed to rebuild the model and resume the run.

A checkpoint is a dict: ``model`` (state dict), ``optimizer``, ``scheduler``, ``epoch`` (last finished, 0-based),
``config`` (the resolved config dict), ``classes`` (class names in order), ``input_convention``, ``kind``
("teacher" / "student"), ``dataset`` (identity dict of the training split) and ``mlkd_version``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from mlkd import __version__


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a crash mid-write leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({**state, "mlkd_version": __version__}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, kind: str | None = None) -> dict[str, Any]:
    """Read a checkpoint on the CPU; ``kind`` checks it is a teacher or a student checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: say which file
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    missing = [k for k in ("model", "config", "classes", "kind") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{path} is not an mlkd checkpoint (missing {missing})")
    if kind is not None and ckpt["kind"] != kind:
        raise ValueError(f"{path} is a {ckpt['kind']} checkpoint; expected a {kind} checkpoint")
    return ckpt
