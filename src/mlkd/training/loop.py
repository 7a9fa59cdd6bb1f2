"""The training loop, written out: one epoch of forward -> named losses -> backward -> step, and the run over
stages that both recipes use (the teacher's run is one stage; the student's one or more).

An objective (the teacher itself, or :class:`mlkd.distill.objective.StudentObjective`) returns a dict of named
losses in training; a stage's ``prepare`` turns a DataLoader batch into its keyword arguments on the right device.
The loop is the same for all of them, single-process or under DDP: it takes its numbers in a
:class:`LoopSettings` and what a recipe adds (the checkpoint's contents, validation, a report after each stage) in
a :class:`Hooks` object. After every epoch it validates (optionally), rank 0 writes ``last.pt`` through
:func:`mlkd.utils.checkpoint.save_checkpoint` and logs; every epoch starts by reseeding from (seed, epoch, rank),
so a resumed run ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from mlkd.errors import RunStopped
from mlkd.training.config import OptimConfig, RunConfig
from mlkd.training.optim import restore_optimizer
from mlkd.training.run_folder import RunFolder
from mlkd.utils.checkpoint import load_checkpoint, save_checkpoint
from mlkd.utils.device import autocast, resolve_amp
from mlkd.utils.distributed import DistInfo, barrier, cleanup, init_distributed
from mlkd.utils.runlog import RunLog

logger = logging.getLogger(__name__)

Prepare = Callable[[Any, list[dict[str, Any]]], dict[str, Any]]
PLOT_EVERY = 60.0  # seconds between redrawings of curves.png during a stage (and always at its end)


@dataclass(frozen=True)
class LoopSettings:
    """The loop's numbers, whatever it trains (a recipe builds them from its ``optim`` and ``run`` sections)."""

    seed: int = 0
    amp: str = "none"  # autocast: "none", "bf16" or "fp16" (resolved for the device), or "auto"
    accumulate: int = 1  # micro-batches per optimizer step
    clip_grad: float | None = None  # max gradient norm (None = off)
    log_every: int = 20  # iterations between log lines
    eval_every: int = 1  # epochs between validations (0 = never)
    progress: bool = True  # tqdm bars

    @classmethod
    def from_config(cls, optim: OptimConfig, run: RunConfig) -> "LoopSettings":
        return cls(seed=run.seed, amp=run.amp, accumulate=optim.accumulate, clip_grad=optim.clip_grad,
                   log_every=run.log_every, eval_every=run.eval_every, progress=run.progress)

    def resolved(self, device: torch.device) -> "LoopSettings":
        """These settings with ``amp`` resolved for ``device`` (:func:`~mlkd.utils.device.resolve_amp`): a recipe
        calls it before it writes anything, so that a setting this device cannot run refuses the start cleanly."""
        return dataclasses.replace(self, amp=resolve_amp(self.amp, device))


class Hooks:
    """What a recipe adds to the loop (detectron2's ``HookBase``, cut to what mlkd's recipes need): subclass it and
    override what you use. Every rank holds the same hooks; :meth:`validate` runs on every rank (it is sharded),
    :meth:`checkpoint` and :meth:`after_stage` on rank 0 only."""

    validates: bool = False  # validate() measures a held-out split (every run.eval_every epochs)
    validates_stages: bool = False  # ... and after every stage's last epoch, for after_stage's record

    def checkpoint(self, train_state: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint to save as ``last.pt``, holding ``train_state`` (to resume from)."""
        raise NotImplementedError

    def validate(self) -> dict[str, float]:
        """Held-out metrics for the epoch's log record (``val_*``)."""
        return {}

    def after_stage(self, index: int, name: str, record: dict[str, Any] | None) -> None:
        """Called after stage ``index``'s last epoch with that epoch's record."""


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


def train_one_epoch(model: nn.Module, parts: "StageParts", epoch: int, settings: LoopSettings,
                    device: torch.device, log: RunLog | None = None,
                    scaler: torch.amp.GradScaler | None = None) -> dict[str, float]:
    """Train ``model`` (the stage's objective, maybe wrapped in DDP) for one pass over ``parts.loader``; return the
    mean of each named loss.

    Gradients of ``settings.accumulate`` consecutive batches are summed (each loss divided by it) before one
    optimizer step; under DDP the gradient all-reduce happens only on that last micro-batch. The logged ``lr`` is
    the stage's base learning rate as its scheduler has it now. Losses reach the host only at log lines (every
    ``settings.log_every`` iterations and the last): a NaN/inf loss stops the run there, naming the iteration it
    first appeared at; the weights it touched are never checkpointed.
    """
    model.train()
    watch, optimizer = _LossWatch(), parts.optimizer
    lr_group = next((i for i, g in enumerate(optimizer.param_groups) if g.get("initial_lr") == parts.lr), 0)
    num_batches = len(parts.loader)
    bar = tqdm(parts.loader, desc=f"epoch {epoch + 1}", unit="batch", disable=not settings.progress, leave=False)
    optimizer.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    seen: dict[str, float] = {}
    for step, (images, targets) in enumerate(bar):
        last_micro = (step + 1) % settings.accumulate == 0 or step + 1 == num_batches
        sync = contextlib.nullcontext() if last_micro or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast(device, settings.amp):
                losses = model(**parts.prepare(images, targets))
            loss = sum(losses.values()) / settings.accumulate
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if last_micro:
            _step(model, optimizer, scaler, settings.clip_grad)
        watch.add(step, losses)
        if step % settings.log_every == 0 or step + 1 == num_batches:
            seen = watch.read(epoch)  # the one host sync of these iterations
            current = {k: float(v.detach()) for k, v in losses.items()}
            bar.set_postfix({k: f"{v:.4f}" for k, v in current.items()})
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


@contextlib.contextmanager
def process_group(run: RunConfig) -> Iterator[DistInfo]:
    """The process group ``torchrun`` describes (or this process alone) with ``run.threads`` applied; left on
    exit. A recipe trains inside it: ``with process_group(cfg.run) as info: ...``."""
    info = init_distributed(run.device, run.dist_timeout_min)
    if run.threads:
        torch.set_num_threads(run.threads)
    try:
        yield info
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


def run_stages(stages: list[Stage], settings: LoopSettings, hooks: Hooks, run: RunFolder, info: DistInfo,
               state: dict[str, Any] | None = None) -> Path:
    """Train ``stages`` in order into the started run folder ``run``, resuming from a checkpoint's ``train_state``
    when given. After each epoch every rank validates when ``hooks.validates`` and the epoch is due (every
    ``settings.eval_every`` epochs; with ``hooks.validates_stages`` also each stage's last); rank 0 writes
    ``last.pt`` = ``hooks.checkpoint(train_state)``, logs the epoch and, after a stage's last epoch, calls
    ``hooks.after_stage``. Returns the path of ``last.pt``."""
    settings = settings.resolved(info.device)
    offset = 0
    for index, stage in enumerate(stages):
        if state is not None and index < state["stage"]:
            offset += stage.epochs
            continue
        parts = stage.build()
        start = _restore(parts, state) if state is not None and index == state["stage"] else 0
        current = _Running(stage, parts, index, offset, wrap_ddp(parts.objective, info),
                           torch.amp.GradScaler(info.device.type) if settings.amp == "fp16" else None)  # fp16: loss scaling
        record = None
        for stage_epoch in range(start, stage.epochs):
            record = _epoch(current, stage_epoch, settings, hooks, run, info)
        if hooks.validates_stages and hooks.validates and record is None:  # resumed after the stage's last epoch
            record = hooks.validate()
        if info.is_main:
            run.log.plot()  # the curves up to the stage's end, whenever they were last drawn
            hooks.after_stage(index, stage.name, record)
        barrier(info)
        offset += stage.epochs
    return run.out / "last.pt"


@dataclass
class _Running:
    """A stage being trained: its parts, its position in the run, its (DDP-wrapped) objective and loss scaler."""

    stage: Stage
    parts: StageParts
    index: int  # of the stage
    offset: int  # epochs of the stages before it
    model: nn.Module
    scaler: torch.amp.GradScaler | None


def _restore(parts: StageParts, state: dict[str, Any]) -> int:
    """Load a stage's optimizer, scheduler and extra parameters from ``train_state``; the epoch to start at."""
    restore_optimizer(parts.optimizer, state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    for name, p in parts.extra.items():
        p.data.copy_(state["extra"][name])
    return state["stage_epoch"] + 1


def _epoch(current: _Running, stage_epoch: int, settings: LoopSettings, hooks: Hooks, run: RunFolder,
           info: DistInfo) -> dict[str, Any]:
    """One epoch of a stage: train, validate when due, checkpoint and log (rank 0); its record."""
    stage, parts, epoch = current.stage, current.parts, current.offset + stage_epoch
    seed_epoch(settings.seed, epoch, info.rank)
    for hook in (parts.loader.collate_fn, parts.loader.sampler):
        if hasattr(hook, "set_epoch"):
            hook.set_epoch(epoch)
    shown = dataclasses.replace(settings, progress=settings.progress and info.is_main)
    try:
        losses = train_one_epoch(current.model, parts, epoch, shown, info.device, run.log, current.scaler)
    except RunStopped as e:
        raise RunStopped(f"{e} (stage {stage.name!r}). {_last_good(run.out)}") from None
    parts.scheduler.step()
    record = {"type": "epoch", "epoch": epoch, "stage": stage.name, **{f"train_{k}": v for k, v in losses.items()}}
    due = settings.eval_every and (epoch + 1) % settings.eval_every == 0
    if hooks.validates and (due or (hooks.validates_stages and stage_epoch + 1 == stage.epochs)):
        record.update(hooks.validate())  # every rank: validation is sharded
    if info.is_main:
        train_state = {"epoch": epoch, "stage": current.index, "stage_epoch": stage_epoch,
                       "optimizer": parts.optimizer.state_dict(), "scheduler": parts.scheduler.state_dict(),
                       "extra": {k: p.detach().cpu() for k, p in parts.extra.items()}}
        save_checkpoint(run.out / "last.pt", hooks.checkpoint(train_state))
        run.log.write(record)
        run.log.plot(every=PLOT_EVERY)
        logger.info(format_record(record))
    barrier(info)
    return record
