"""Training the student S-Cls, with or without distillation from a trained teacher.

A run is a sequence of stages (``stages`` in the config), each with its own epochs, learning rate and loss
weights (L_p ``label_weight``, L_p' ``soft_weight``, L_f ``feature_weight``; see :mod:`mlkd.distill`):

- no distillation: one stage ``{label_weight: 1}``;
- the release's two-stage recipe: stage 1 ``{label_weight: 0, feature_weight: 1}``, then stage 2
  ``{label_weight: 1, soft_weight: 1}``, each with a fresh optimizer (the release trained them as two solvers);
- joint mode: one stage with all three weights.

``mlkd train-student --config configs/student_*.yaml [--set key=value ...] [--resume]`` calls
:func:`train_student`; the run folder gets ``config.yaml``, ``log.jsonl``, ``curves.png``, ``last.pt``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from mlkd.checkpoint import load_checkpoint, save_checkpoint
from mlkd.config import DataConfig, OptimConfig, RunConfig, from_dict, to_dict
from mlkd.data.base import check_class_order, collate
from mlkd.data.loader import KeepTopProposals, make_loader, open_split
from mlkd.data.transforms import Compose, RandomHorizontalFlip, TeacherStudentViews, Warp
from mlkd.distill import Distiller
from mlkd.distributed import DistInfo, barrier, cleanup, init_distributed
from mlkd.engine import build_optimizer, format_record, param_groups, prepare_run, train_one_epoch, wrap_ddp
from mlkd.models.backbones import build_backbone, load_imagenet_weights, normalize
from mlkd.models.student import PlainStudent, Student
from mlkd.runlog import RunLog
from mlkd.teacher import VGG16_IMAGENET, seed_epoch, teacher_from_checkpoint
from mlkd.teacher_targets import TeacherTargets, compute_teacher_targets

RESNET_IMAGENET = {"conv1.": "backbone.conv1.", "bn1.": "backbone.bn1.", **{
    f"layer{i}.": f"backbone.layer{i}." for i in range(1, 5)}}


@dataclasses.dataclass
class StudentModelConfig:
    backbone: Literal["vgg16", "resnet50", "resnet101", "tiny"] = "vgg16"
    tiny_channels: tuple[int, ...] = (16, 32, 64, 64)
    tiny_convs_per_block: int = 1
    weights: str | None = None  # local ImageNet weights (torchvision layout or an `mlkd import-caffe` output)
    input_convention: Literal["caffe", "torchvision"] = "caffe"
    hidden: int = 4096  # fc6/fc7 width (VGG) or the adapter's (ResNet): must equal the teacher's for L_f
    roi_size: int = 7
    dropout: float = 0.5
    image_size: int = 224  # the student's input: images are warped to image_size x image_size


@dataclasses.dataclass
class StageConfig:
    name: str = "plain"
    epochs: int = 20
    lr: float | None = None  # None = optim.lr
    lr_steps: tuple[int, ...] = ()  # epochs of this stage after which the lr is multiplied by optim.gamma
    label_weight: float = 1.0  # L_p
    soft_weight: float = 0.0  # L_p'
    feature_weight: float = 0.0  # L_f


@dataclasses.dataclass
class DistillConfig:
    teacher: str | None = None  # teacher checkpoint; needed by stages with soft_weight or feature_weight
    teacher_scale: int | None = None  # the teacher's input size (None = its training config's test_scale)
    feature_layers: tuple[str, ...] = ("fc7",)  # region layers matched by L_f
    top_k: int | None = None  # L_f on each image's top-k proposals by the teacher's objectness (None = all)
    scale_init: float = 0.2  # the learnable per-class scale a of L_p' (T = 1 / a = 5)
    scale_lr_mult: float = 10.0
    cache_soft_targets: bool = True  # compute the teacher's image scores once per image and flip


@dataclasses.dataclass
class StudentConfig:
    model: StudentModelConfig = dataclasses.field(default_factory=StudentModelConfig)
    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(flip=True))
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=1e-3))
    run: RunConfig = dataclasses.field(default_factory=lambda: RunConfig(out="runs/student"))
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)
    stages: tuple[StageConfig, ...] = (StageConfig(),)

    def validate(self) -> None:
        if not self.data.train:
            raise ValueError("data.train is required: the dataset spec of the training split")
        if not self.stages:
            raise ValueError("stages must list at least one stage")
        needs = [s.name for s in self.stages if s.soft_weight or s.feature_weight]
        if needs and not self.distill.teacher:
            raise ValueError(f"stage(s) {needs} distil from the teacher: set distill.teacher to its checkpoint")


def build_student(cfg: StudentModelConfig, num_classes: int) -> Student:
    backbone = build_backbone(cfg.backbone, channels=cfg.tiny_channels, convs_per_block=cfg.tiny_convs_per_block)
    head = "resnet" if cfg.backbone.startswith("resnet") else "vgg"
    model = Student(backbone, num_classes, head=head, hidden=cfg.hidden, roi_size=cfg.roi_size, dropout=cfg.dropout)
    if cfg.weights:
        if cfg.backbone == "tiny":
            raise ValueError("model.weights are ImageNet weights; the tiny backbone has none")
        mapping = VGG16_IMAGENET if head == "vgg" else RESNET_IMAGENET
        load_imagenet_weights(model, cfg.weights, mapping, cfg.input_convention)
    return model


def student_from_checkpoint(ckpt: dict[str, Any]) -> Student:
    """Rebuild a trained student from its checkpoint alone (eval mode, CPU)."""
    cfg = from_dict(StudentModelConfig, {**ckpt["config"]["model"], "weights": None})
    model = build_student(cfg, len(ckpt["classes"]))
    model.load_state_dict(ckpt["model"])
    return model.eval()


def student_inputs(images: torch.Tensor, targets: list[dict[str, Any]], device: torch.device, convention: str,
                   teacher_convention: str | None = None, soft: TeacherTargets | None = None) -> dict[str, Any]:
    """The forward arguments of a (distilling) student for a DataLoader batch."""
    out: dict[str, Any] = {"images": normalize(images.to(device), convention),
                           "labels": torch.stack([t["labels"] for t in targets]).to(device)}
    if "teacher_image" in targets[0]:
        out["teacher_images"] = normalize(torch.stack([t["teacher_image"] for t in targets]).to(device),
                                          teacher_convention)
        out["proposals"] = [t["proposals"].to(device) for t in targets]
        out["proposal_scores"] = [t["proposal_scores"].to(device) for t in targets]
        out["student_proposals"] = [t["student_proposals"].to(device) for t in targets]
    if soft is not None:
        out["teacher_probs"] = soft.lookup(targets).to(device)
    return out


def _stage_transform(cfg: StudentConfig, stage: StageConfig, teacher_scale: int | None, cached: bool):
    """Teacher + student views when the stage needs the teacher's forward pass; else only the student's."""
    size = cfg.model.image_size
    if stage.feature_weight or (stage.soft_weight and not cached):
        keep = [KeepTopProposals(cfg.data.max_proposals)] if cfg.data.max_proposals else []
        return Compose(keep + [TeacherStudentViews(teacher_scale, size, 0.5 if cfg.data.flip else 0.0)])
    return Compose([RandomHorizontalFlip(0.5 if cfg.data.flip else 0.0), Warp(size)])


def train_student(cfg: StudentConfig, resume: bool = False) -> Path:
    """Train (or resume) the student described by ``cfg``; return the path of the final checkpoint."""
    info = init_distributed(cfg.run.device)
    try:
        return _train(cfg, resume, info)
    finally:
        cleanup(info)


def _load_teacher(cfg: StudentConfig, classes: list[str], device: torch.device) -> tuple[nn.Module, dict]:
    ckpt = load_checkpoint(cfg.distill.teacher, "teacher")
    check_class_order(ckpt["classes"], classes, f"teacher {cfg.distill.teacher} vs the training set")
    return teacher_from_checkpoint(ckpt).to(device), ckpt


def _train(cfg: StudentConfig, resume: bool, info: DistInfo) -> Path:
    out = prepare_run(cfg, resume, info)
    dataset = open_split(cfg.data.train, cfg.data.options, cfg.data.train_proposals)
    torch.manual_seed(cfg.run.seed)
    student = build_student(cfg.model, dataset.num_classes).to(info.device)
    teacher, t_ckpt, soft = None, None, None
    if cfg.distill.teacher and any(s.soft_weight or s.feature_weight for s in cfg.stages):
        teacher, t_ckpt = _load_teacher(cfg, dataset.classes, info.device)
    t_scale = cfg.distill.teacher_scale or (t_ckpt["config"]["data"]["test_scale"] if t_ckpt else None)
    t_conv = t_ckpt["input_convention"] if t_ckpt else None
    if teacher is not None and cfg.distill.cache_soft_targets and any(s.soft_weight for s in cfg.stages):
        soft = compute_teacher_targets(teacher, t_ckpt, cfg.distill.teacher, dataset, t_scale, out, info,
                                       cfg.data.max_proposals, progress=cfg.run.progress)
    state = load_checkpoint(out / "last.pt", "student") if resume else None
    if state is not None:
        student.load_state_dict(state["model"])
    log = RunLog(out, enabled=info.is_main, resume_epoch=state["epoch"] if state else None)
    epoch_offset = 0
    for index, stage in enumerate(cfg.stages):
        if state is not None and index < state["train_state"]["stage"]:
            epoch_offset += stage.epochs
            continue
        dataset.transform = _stage_transform(cfg, stage, t_scale, soft is not None)
        _run_stage(cfg, index, stage, student, teacher, t_conv, soft, dataset, info, log, out, epoch_offset,
                   state if state is not None and index == state["train_state"]["stage"] else None)
        epoch_offset += stage.epochs
    return out / "last.pt"


def _stage_model(cfg: StudentConfig, stage: StageConfig, student: Student, teacher: nn.Module | None) -> nn.Module:
    if not (stage.soft_weight or stage.feature_weight):
        return PlainStudent(student)
    d = cfg.distill
    return Distiller(student, teacher, stage.label_weight, stage.soft_weight, stage.feature_weight,
                     d.feature_layers, d.top_k, d.scale_init)


def _run_stage(cfg: StudentConfig, index: int, stage: StageConfig, student: Student, teacher: nn.Module | None,
               t_conv: str | None, soft: TeacherTargets | None, dataset, info: DistInfo, log: RunLog, out: Path,
               epoch_offset: int, state: dict | None) -> None:
    model = _stage_model(cfg, stage, student, teacher).to(info.device)
    lr = stage.lr or cfg.optim.lr
    groups = param_groups(model, lr, cfg.optim.weight_decay, cfg.optim.bias_lr_mult, cfg.optim.bias_decay,
                          lr_mults={"scale": cfg.distill.scale_lr_mult}, no_decay=("scale",))
    optimizer = build_optimizer(groups, cfg.optim.optimizer, lr, cfg.optim.momentum)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(stage.lr_steps), cfg.optim.gamma)
    start = 0
    if state is not None:
        ts = state["train_state"]
        optimizer.load_state_dict(ts["optimizer"])
        scheduler.load_state_dict(ts["scheduler"])
        if "scale" in ts and isinstance(model, Distiller):
            model.scale.data.copy_(ts["scale"])
        start = ts["stage_epoch"] + 1
    loader = make_loader(dataset, cfg.data.batch_size, cfg.data.workers, collate, train=True, seed=cfg.run.seed,
                         rank=info.rank, world_size=info.world_size)
    wrapped = wrap_ddp(model, info)
    stage_soft = soft if stage.soft_weight else None

    def prepare(images, targets):
        return student_inputs(images, targets, info.device, cfg.model.input_convention, t_conv, stage_soft)

    for stage_epoch in range(start, stage.epochs):
        epoch = epoch_offset + stage_epoch
        seed_epoch(cfg.run.seed, epoch, info.rank)
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        losses = train_one_epoch(wrapped, loader, optimizer, prepare, epoch=epoch, device=info.device,
                                 accumulate=cfg.optim.accumulate, amp=cfg.run.amp, clip_grad=cfg.optim.clip_grad,
                                 log=log, log_every=cfg.run.log_every, progress=cfg.run.progress and info.is_main)
        scheduler.step()
        if info.is_main:
            _end_epoch(cfg, index, stage, stage_epoch, epoch, student, model, optimizer, scheduler, dataset, losses,
                       log, out, info.device)
        barrier(info)


def _end_epoch(cfg: StudentConfig, index: int, stage: StageConfig, stage_epoch: int, epoch: int, student: Student,
               model: nn.Module, optimizer, scheduler, dataset, losses: dict[str, float], log: RunLog, out: Path,
               device: torch.device) -> None:
    record: dict[str, Any] = {"type": "epoch", "epoch": epoch, "stage": stage.name,
                              **{f"train_{k}": v for k, v in losses.items()}}
    if cfg.data.val and cfg.run.eval_every and (epoch + 1) % cfg.run.eval_every == 0:
        from mlkd.evaluation import evaluate_student_model

        report = evaluate_student_model(student, cfg.data.val, dataset.classes, cfg.model.input_convention,
                                        cfg.model.image_size, cfg.data.options, device, cfg.data.workers,
                                        progress=False)
        record["val_mAP"] = report["classification"]["mAP"]["mlic"]
    train_state = {"stage": index, "stage_epoch": stage_epoch, "optimizer": optimizer.state_dict(),
                   "scheduler": scheduler.state_dict()}
    if isinstance(model, Distiller):
        train_state["scale"] = model.scale.detach().cpu()
    save_checkpoint(out / "last.pt", {
        "model": student.state_dict(), "train_state": train_state, "epoch": epoch, "config": to_dict(cfg),
        "classes": dataset.classes, "input_convention": cfg.model.input_convention, "kind": "student",
        "dataset": dataset.identity.to_dict()})
    log.write(record)
    log.plot()
    print(format_record(record), flush=True)
