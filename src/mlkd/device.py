"""Where and in which precision models run: the device choice and the autocast context."""

from __future__ import annotations

import contextlib

import torch

from mlkd.errors import BadInput


def pick_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: the local GPU if there is one, else the CPU; ``cuda`` without a GPU is an error."""
    if preference not in ("auto", "cpu", "cuda"):
        raise BadInput(f"device must be auto, cpu or cuda, got {preference!r}")
    if preference == "cuda" and not torch.cuda.is_available():
        raise BadInput("device cuda asked for, but no CUDA device is available (use cpu or auto)")
    if preference in ("cuda", "auto") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def autocast(device: torch.device, amp: str):
    """``torch.autocast`` for ``amp`` in {"none", "bf16", "fp16"} (fp16 only on CUDA)."""
    if amp == "none":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise BadInput("run.amp=fp16 needs a CUDA device; use bf16 on the CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
