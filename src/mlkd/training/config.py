"""The config sections every training run has: its data (:class:`DataConfig`; the teacher adds its multi-scale
keys in :class:`mlkd.training.teacher.TeacherDataConfig`), its optimizer (:class:`OptimConfig`) and how it runs
(:class:`RunConfig`). The model sections are in :mod:`mlkd.models.configs`, the student's distillation and stages
in :mod:`mlkd.distill.config`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from mlkd.errors import BadInput
from mlkd.utils.config import bounded

_TEACHER_ONLY = "is a teacher's key (the teacher's multi-scale input); the student's input size is model.image_size"


@dataclasses.dataclass
class DataConfig:
    """Datasets, proposals and the input pipeline of a run."""

    # keys of the teacher's data section that a student does not read: asked for on a student, they are refused
    # saying so (mlkd.utils.config.from_dict)
    ELSEWHERE: ClassVar[dict[str, str]] = {
        "scales": _TEACHER_ONLY, "test_scale": _TEACHER_ONLY, "resize": _TEACHER_ONLY, "max_size": _TEACHER_ONLY,
        "val_proposals": "is a teacher's key (its held-out split's proposals); a student's validation needs none"}

    train: str = ""  # dataset spec of the training split (see `mlkd data info --help`)
    val: str | None = None  # held-out split evaluated after each epoch (for the log; never the test split)
    options: dict = dataclasses.field(default_factory=dict)  # dataset options, e.g. {difficult: ignore}
    train_proposals: str | None = None  # proposal cache of the training split (teacher, distillation)
    max_proposals: int | None = bounded(None, 1, 100_000)  # use at most this many per image (None = all)
    flip: bool = True  # random horizontal flip in training
    batch_size: int = bounded(1, 1, 4096)  # images per iteration per process
    workers: int = bounded(2, 0, 256)  # DataLoader worker processes
    # decoded images kept in memory per process (MB, 0 = none): a small dataset read every epoch is decoded once
    image_cache_mb: float = bounded(0.0, 0, None)


@dataclasses.dataclass
class OptimConfig:
    """SGD with momentum (the release) or AdamW, step decay, Caffe-style parameter groups (biases: lr x2, no
    decay)."""

    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = bounded(5e-5, 0, 10, above=True)
    momentum: float = bounded(0.9, 0, 1)  # SGD momentum (AdamW uses betas (0.9, 0.999))
    weight_decay: float = bounded(5e-4, 0, 1)
    epochs: int = bounded(20, 1, 100_000)
    lr_steps: tuple[int, ...] = bounded((10,), 1, 100_000)  # epochs after which the lr is multiplied by gamma
    gamma: float = bounded(0.1, 0, 1, above=True)
    accumulate: int = bounded(1, 1, 4096)  # micro-batches per optimizer step (batch = batch_size x accumulate x GPUs)
    bias_lr_mult: float = bounded(2.0, 0, 100)  # Caffe's VGG convention
    bias_decay: bool = False
    clip_grad: float | None = bounded(None, 0, None, above=True)  # max gradient norm (None = off)


@dataclasses.dataclass
class RunConfig:
    """Where outputs go and how the run executes."""

    out: str = "runs/run"  # run folder: config.yaml, log.jsonl, curves.png, checkpoints
    seed: int = bounded(0, 0, 2**32 - 1)  # numpy's seeds are non-negative 32-bit numbers
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # autocast: auto = bf16 where the hardware has it natively (GPUs, CPUs with AVX512-BF16/AMX), fp16 on older
    # GPUs, else float32; bf16 on a CPU without native support is refused (it would be ~20x slower)
    amp: Literal["auto", "none", "bf16", "fp16"] = "auto"
    threads: int | None = bounded(None, 1, 1024)  # torch intra-op threads (None = torch's default)
    # under torchrun: minutes a collective (a barrier, a gather) may wait before the run aborts; the longest wait is
    # one rank's share of a sharded phase (soft targets, region features, validation) or rank 0's checkpoint write
    dist_timeout_min: float = bounded(60.0, 1, None)
    log_every: int = bounded(20, 1, None)  # iterations between log lines
    eval_every: int = bounded(1, 0, None)  # epochs between evaluations of data.val (0 = never)
    progress: bool = True  # tqdm bars
    tensorboard: bool = False  # also write the logged scalars for TensorBoard into run.out/tensorboard

    def validate(self) -> None:
        if not self.out.strip():
            raise BadInput("run.out is empty; name the run folder (an empty value would write into the current "
                           "folder)")
