"""The training loop, written out: one epoch of forward -> named losses -> backward -> step, and the run over
stages that both recipes use (the teacher's run is one stage; the student's one or more).

An objective (the teacher itself, or :class:`mlkd.distill.StudentObjective`) returns a dict of named losses in
training; ``prepare`` turns a DataLoader batch into its keyword arguments on the right device. The loop is the
same for all of them, single-process or under DDP. After every epoch rank 0 evaluates (optionally), writes
``last.pt`` through :func:`mlkd.checkpoint.save_checkpoint` and logs; every epoch starts by reseeding from
(seed, epoch, rank), so a resumed run ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from mlkd.checkpoint import load_checkpoint, save_checkpoint
from mlkd.device import autocast, resolve_amp
from mlkd.distributed import DistInfo, barrier, cleanup, init_distributed
from mlkd.errors import BadInput, RunStopped
from mlkd.runlog import RunLog

logger = logging.getLogger(__name__)

Prepare = Callable[[Any, list[dict[str, Any]]], dict[str, Any]]


def check_finite(losses: dict[str, torch.Tensor], where: str) -> None:
    """Stop the run on a NaN/inf loss, showing every named loss (the usual first clue to the culprit)."""
    values = {k: float(v.detach()) for k, v in losses.items()}
    if not all(math.isfinite(v) for v in values.values()):
        raise RunStopped(f"non-finite loss {where}: {values}")


class _LossWatch:
    """Running sums of the named losses and the first non-finite iteration, kept on the device: nothing is
    copied to the host until :meth:`read` (once per log line), so a GPU never waits on the CPU mid-epoch."""

    def __init__(self) -> None:
        self.names: list[str] | None = None
        self.totals: torch.Tensor | None = None
        self.first_bad: torch.Tensor | None = None  # iteration of the first non-finite loss, -1 = none yet
        self.bad: torch.Tensor | None = None  # the losses at that iteration

    def add(self, step: int, losses: dict[str, torch.Tensor]) -> None:
        values = torch.stack([v.detach().float() for v in losses.values()])
        if self.names is None:
            self.names = list(losses)
            self.totals = torch.zeros_like(values)
            self.first_bad = torch.full((), -1, dtype=torch.int64, device=values.device)
            self.bad = torch.zeros_like(values)
        new_bad = (self.first_bad < 0) & ~torch.isfinite(values).all()
        self.first_bad = torch.where(new_bad, step, self.first_bad)
        self.bad = torch.where(new_bad, values, self.bad)
        self.totals += values

    def read(self, epoch: int) -> dict[str, float]:
        """The sums so far (one host copy); raises RunStopped naming the first iteration with a NaN/inf loss."""
        if self.names is None:
            return {}
        first_bad, *rest = torch.cat([self.first_bad[None].to(self.totals.dtype), self.bad, self.totals]).tolist()
        n = len(self.names)
        if first_bad >= 0:
            check_finite(dict(zip(self.names, torch.tensor(rest[:n]))), f"at epoch {epoch + 1}, iteration "
                                                                        f"{int(first_bad) + 1}")
        return dict(zip(self.names, rest[n:]))


def train_one_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, prepare: Prepare, *,
                    epoch: int, device: torch.device, accumulate: int = 1, amp: str = "none",
                    clip_grad: float | None = None, scaler: torch.amp.GradScaler | None = None,
                    log: RunLog | None = None, log_every: int = 20, progress: bool = True,
                    lr_group: int = 0) -> dict[str, float]:
    """Train ``model`` for one pass over ``loader``; return the mean of each named loss.

    Gradients of ``accumulate`` consecutive batches are summed (each loss divided by ``accumulate``) before
    one optimizer step; under DDP the gradient all-reduce happens only on that last micro-batch. The logged
    ``lr`` is that of ``optimizer.param_groups[lr_group]``. Losses reach the host only at log lines (every
    ``log_every`` iterations and the last): a NaN/inf loss stops the run there, naming the iteration it first
    appeared at; the weights it touched are never checkpointed.
    """
    model.train()
    watch = _LossWatch()
    num_batches = len(loader)  # type: ignore[arg-type]
    bar = tqdm(loader, desc=f"epoch {epoch + 1}", unit="batch", disable=not progress, leave=False)
    optimizer.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    seen: dict[str, float] = {}
    for step, (images, targets) in enumerate(bar):
        last_micro = (step + 1) % accumulate == 0 or step + 1 == num_batches
        sync = contextlib.nullcontext() if last_micro or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast(device, amp):
                losses = model(**prepare(images, targets))
            loss = sum(losses.values()) / accumulate
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if last_micro:
            _step(model, optimizer, scaler, clip_grad)
        watch.add(step, losses)
        if step % log_every == 0 or step + 1 == num_batches:
            sums = watch.read(epoch)  # the one host sync of these iterations
            current = {k: float(v.detach()) for k, v in losses.items()}
            bar.set_postfix({k: f"{v:.4f}" for k, v in current.items()})
            seen = sums
            if log is not None:
                log.write({"type": "iter", "epoch": epoch, "iteration": epoch * num_batches + step,
                           "lr": optimizer.param_groups[lr_group]["lr"], "time": round(time.perf_counter() - t0, 3),
                           **current})
    return {k: v / max(num_batches, 1) for k, v in seen.items()}


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
    """SGD with momentum (the release's solver) or AdamW over :func:`param_groups` (each group has its lr/decay).

    Both use PyTorch's fused kernel where every parameter allows it (floating point, on the CPU or CUDA): one
    pass over each parameter instead of a temporary per term. The updates equal the per-parameter loop's up to
    the last bit of an occasional element (a multiply-add rounded once); on VGG16 the CPU step drops from about 0.2 s to 0.03 s (most of it the temporaries of fc6's 103 M
    weights: ``benchmarks/bench_teacher.py``).
    """
    if name not in ("sgd", "adamw"):
        raise BadInput(f"unknown optimizer {name!r}; choose 'sgd' or 'adamw'")
    fused = _fusable(groups)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, fused=fused)
    return torch.optim.AdamW(groups, lr=lr, fused=fused)


def _fusable(groups: list[dict[str, Any]]) -> bool | None:
    params = [p for g in groups for p in g["params"]]
    ok = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return True if ok else None  # None: PyTorch's own choice (foreach on CUDA, the loop elsewhere)


def restore_optimizer(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load an optimizer's state dict, keeping the kernel choice of the optimizer as built (a checkpoint stores
    ``fused`` / ``foreach`` per group; one written before mlkd fused its optimizers would turn fusing off)."""
    kernels = [{k: g.get(k) for k in ("fused", "foreach")} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, kernel in zip(optimizer.param_groups, kernels):
        group.update(kernel)


def seed_epoch(seed: int, epoch: int, rank: int = 0) -> None:
    """Reseed torch and numpy for an epoch, so epoch e draws the same numbers whether or not the run resumed.

    Each DDP rank gets its own stream (flips and dropout differ between ranks); rank 0 draws what a single
    process draws.
    """
    state = np.random.SeedSequence([seed, epoch] + ([rank] if rank else [])).generate_state(2)
    torch.manual_seed(int(state[0]))
    np.random.seed(int(state[1]))


def _last_good(out: Path) -> str:
    """Where a stopped run can restart from."""
    if not (out / "last.pt").is_file():
        return f"No checkpoint was written yet in {out}; lower optim.lr or check the data, then start again."
    epoch = load_checkpoint(out / "last.pt")["train_state"]["epoch"]
    return (f"The last good checkpoint is {out / 'last.pt'} (after epoch {epoch + 1}): lower optim.lr or check the "
            f"data, then continue it with --resume.")


def launch(train: Callable[..., Path], cfg: Any, resume: bool, explicit: Sequence[str] = ()) -> Path:
    """Run ``train(cfg, resume, info, explicit)`` in the process group ``torchrun`` describes (or alone), with
    ``run.threads`` applied, then leave the group."""
    info = init_distributed(cfg.run.device, cfg.run.dist_timeout_min)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    try:
        return train(cfg, resume, info, explicit)
    finally:
        cleanup(info)


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """``model`` in DistributedDataParallel when the run has several processes, else unchanged."""
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)


def format_record(record: dict[str, Any]) -> str:
    """One line of an epoch record for the console."""
    return " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items() if k != "type")


# -- the run: stages of epochs ---------------------------------------------------------------------------------
@dataclass
class StageParts:
    """What one stage trains with, built when the stage starts."""

    objective: nn.Module  # forward(**prepare(images, targets)) -> {name: loss}
    lr: float  # the stage's base learning rate (logged as "lr"; biases and the scale a of L_p' have multiples)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: Any  # a DataLoader; its collate_fn and sampler get set_epoch(epoch) when they have it
    prepare: Prepare
    extra: dict[str, nn.Parameter] = field(default_factory=dict)  # objective parameters saved for resuming


@dataclass
class Stage:
    """``epochs`` epochs of the parts that ``build()`` returns."""

    name: str
    epochs: int
    build: Callable[[], StageParts]


def run_stages(stages: list[Stage], cfg: Any, info: DistInfo, out: Path, log: RunLog,
               checkpoint: Callable[[dict[str, Any]], dict[str, Any]],
               validate: Callable[[], dict[str, float]] | None = None,
               state: dict[str, Any] | None = None,
               stage_end: Callable[[int, str, dict[str, Any] | None], None] | None = None) -> Path:
    """Train ``stages`` in order (``cfg.run`` / ``cfg.optim`` give seed, precision, logging and accumulation);
    resume from a checkpoint's ``train_state`` when given. After each epoch every rank runs ``validate`` (a
    collective: each rank scores its share) every ``run.eval_every`` epochs and, when there is a ``stage_end``,
    after each stage's last epoch; rank 0 writes ``out/last.pt`` = ``checkpoint(train_state)`` and, after a
    stage's last epoch, calls ``stage_end(index, name, that epoch's record)`` (with the held-out metrics).
    Returns the path of ``last.pt``."""
    offset, amp = 0, resolve_amp(cfg.run.amp, info.device)
    for index, stage in enumerate(stages):
        if state is not None and index < state["stage"]:
            offset += stage.epochs
            continue
        parts = stage.build()
        start = 0
        if state is not None and index == state["stage"]:
            restore_optimizer(parts.optimizer, state["optimizer"])
            parts.scheduler.load_state_dict(state["scheduler"])
            for name, p in parts.extra.items():
                p.data.copy_(state["extra"][name])
            start = state["stage_epoch"] + 1
        wrapped = wrap_ddp(parts.objective, info)
        scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None  # fp16 gradients need loss scaling
        lr_group = next((i for i, g in enumerate(parts.optimizer.param_groups) if g.get("initial_lr") == parts.lr), 0)
        record: dict[str, Any] | None = None
        for stage_epoch in range(start, stage.epochs):
            epoch = offset + stage_epoch
            seed_epoch(cfg.run.seed, epoch, info.rank)
            for hook in (parts.loader.collate_fn, parts.loader.sampler):
                if hasattr(hook, "set_epoch"):
                    hook.set_epoch(epoch)
            try:
                losses = train_one_epoch(wrapped, parts.loader, parts.optimizer, parts.prepare, epoch=epoch,
                                         device=info.device, accumulate=cfg.optim.accumulate, amp=amp,
                                         clip_grad=cfg.optim.clip_grad, scaler=scaler, log=log,
                                         log_every=cfg.run.log_every, progress=cfg.run.progress and info.is_main,
                                         lr_group=lr_group)
            except RunStopped as e:
                raise RunStopped(f"{e} (stage {stage.name!r}). {_last_good(out)}") from None
            parts.scheduler.step()
            record = {"type": "epoch", "epoch": epoch, "stage": stage.name,
                      **{f"train_{k}": v for k, v in losses.items()}}
            due = cfg.run.eval_every and (epoch + 1) % cfg.run.eval_every == 0
            if validate is not None and (due or (stage_end is not None and stage_epoch + 1 == stage.epochs)):
                record.update(validate())  # every rank: validation is sharded
            if info.is_main:
                train_state = {"epoch": epoch, "stage": index, "stage_epoch": stage_epoch,
                               "optimizer": parts.optimizer.state_dict(), "scheduler": parts.scheduler.state_dict(),
                               "extra": {k: p.detach().cpu() for k, p in parts.extra.items()}}
                save_checkpoint(out / "last.pt", checkpoint(train_state))
                log.write(record)
                log.plot()
                logger.info(format_record(record))
            barrier(info)
        if stage_end is not None:
            if record is None and validate is not None:  # resumed right after the stage's last epoch
                record = validate()
            if info.is_main:
                stage_end(index, stage.name, record)
        barrier(info)
        offset += stage.epochs
    return out / "last.pt"

