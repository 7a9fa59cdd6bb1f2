"""The training loop, written out: one epoch of forward -> named losses -> backward -> step.

Models (the teacher, the student, the distiller that wraps both) return a dict of named losses in training;
``prepare`` turns a DataLoader batch into the model's keyword arguments on the right device. The loop is the
same for all of them, single-process or under DDP.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from typing import Any, Callable, Iterable

import torch
from torch import nn
from tqdm import tqdm

from mlkd.runlog import RunLog

Prepare = Callable[[Any, list[dict[str, Any]]], dict[str, Any]]


def autocast(device: torch.device, amp: str):
    """``torch.autocast`` for ``amp`` in {"none", "bf16", "fp16"} (fp16 only on CUDA)."""
    if amp == "none":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("run.amp=fp16 needs a CUDA device; use bf16 on the CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def check_finite(losses: dict[str, torch.Tensor], where: str) -> None:
    """Stop the run on a NaN/inf loss, showing every named loss (the usual first clue to the culprit)."""
    values = {k: float(v.detach()) for k, v in losses.items()}
    if not all(math.isfinite(v) for v in values.values()):
        raise FloatingPointError(f"non-finite loss {where}: {values}")


def train_one_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, prepare: Prepare, *,
                    epoch: int, device: torch.device, accumulate: int = 1, amp: str = "none",
                    clip_grad: float | None = None, scaler: torch.amp.GradScaler | None = None,
                    log: RunLog | None = None, log_every: int = 20, progress: bool = True) -> dict[str, float]:
    """Train ``model`` for one pass over ``loader``; return the mean of each named loss.

    Gradients of ``accumulate`` consecutive batches are summed (each loss divided by ``accumulate``) before
    one optimizer step; under DDP the gradient all-reduce happens only on that last micro-batch.
    """
    model.train()
    totals: dict[str, float] = defaultdict(float)
    num_batches = len(loader)  # type: ignore[arg-type]
    bar = tqdm(loader, desc=f"epoch {epoch + 1}", unit="batch", disable=not progress, leave=False)
    optimizer.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    for step, (images, targets) in enumerate(bar):
        last_micro = (step + 1) % accumulate == 0 or step + 1 == num_batches
        sync = contextlib.nullcontext() if last_micro or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast(device, amp):
                losses = model(**prepare(images, targets))
            check_finite(losses, f"at epoch {epoch + 1}, iteration {step + 1}")
            loss = sum(losses.values()) / accumulate
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if last_micro:
            _step(model, optimizer, scaler, clip_grad)
        for k, v in losses.items():
            totals[k] += float(v.detach())
        bar.set_postfix({k: f"{v.item():.4f}" for k, v in losses.items()})
        if log is not None and (step % log_every == 0 or step + 1 == num_batches):
            log.write({"type": "iter", "epoch": epoch, "iteration": epoch * num_batches + step,
                       "lr": optimizer.param_groups[0]["lr"], "time": round(time.perf_counter() - t0, 3),
                       **{k: float(v.detach()) for k, v in losses.items()}})
    return {k: v / max(num_batches, 1) for k, v in totals.items()}


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
          clip_grad: float | None) -> None:
    if scaler is not None:
        scaler.unscale_(optimizer)
    if clip_grad is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def param_groups(model: nn.Module, lr: float, weight_decay: float, bias_lr_mult: float = 2.0,
                 bias_decay: bool = False, lr_mults: dict[str, float] | None = None,
                 no_decay: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Caffe-style SGD groups: weights at ``lr`` with decay, biases at ``lr * bias_lr_mult`` (decay only if
    ``bias_decay``); parameters whose name starts with a key of ``lr_mults`` get that multiplier, and those
    named in ``no_decay`` no weight decay. Frozen parameters (``requires_grad=False``) are left out."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = defaultdict(list)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        mult = next((m for prefix, m in (lr_mults or {}).items() if name.startswith(prefix)), 1.0)
        is_bias = name.endswith(".bias")
        decay = 0.0 if (is_bias and not bias_decay) or name.startswith(no_decay) else weight_decay
        groups[(lr * mult * (bias_lr_mult if is_bias else 1.0), decay)].append(p)
    return [{"params": ps, "lr": g_lr, "initial_lr": g_lr, "weight_decay": wd} for (g_lr, wd), ps in groups.items()]


def build_optimizer(groups: list[dict[str, Any]], name: str, lr: float, momentum: float = 0.9) -> torch.optim.Optimizer:
    """SGD with momentum (the release's solver) or AdamW over :func:`param_groups` (each group has its lr/decay)."""
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; choose 'sgd' or 'adamw'")
