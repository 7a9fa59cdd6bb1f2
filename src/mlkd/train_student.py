"""The student's recipe: its config and the run, with or without distillation from a trained teacher.

A run is a sequence of stages (``stages`` in the config), each with its own epochs, learning rate and loss
weights (L_p ``label_weight``, L_p' ``soft_weight``, L_f ``feature_weight``; see :mod:`mlkd.distill`):

- no distillation: one stage ``{label_weight: 1}``;
- the release's two-stage recipe: stage 1 ``{label_weight: 0, feature_weight: 1}``, then stage 2
  ``{label_weight: 1, soft_weight: 1}``, each with a fresh optimizer (the release trained them as two solvers);
- joint mode: one stage with all three weights.

``mlkd train-student --config student_coco_kd [--set key=value ...] [--resume]`` calls :func:`train_student`;
the run folder gets ``config.yaml``, ``log.jsonl``, ``curves.png``, ``last.pt``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from mlkd.checkpoint import load_checkpoint, make_checkpoint
from mlkd.config import SIZE, DataConfig, OptimConfig, RunConfig, bounded, to_dict
from mlkd.data.base import MultiLabelDataset, check_class_order, collate
from mlkd.data.loader import make_loader
from mlkd.data.transforms import Compose, KeepTopProposals, RandomHorizontalFlip, TeacherStudentViews, Warp
from mlkd.distill import (FeatureCacheSpec, StudentObjective, TeacherTargets, check_feature_layers,
                          check_feature_width, teacher_caches)
from mlkd.distributed import DistInfo, broadcast
from mlkd.engine import Stage, StageParts, build_optimizer, launch, param_groups, run_stages
from mlkd.errors import BadInput, NotFound
from mlkd.feature_cache import TeacherFeatures
from mlkd.inference import predict_student
from mlkd.kd_report import StageReport, baseline_map, find_baseline
from mlkd.metrics import mean_average_precision
from mlkd.models.build import build_student, model_from_checkpoint
from mlkd.models.configs import StudentModelConfig
from mlkd.models.inputs import student_inputs
from mlkd.models.student import Student
from mlkd.models.wsddn import WSDDN
from mlkd.proposals.attach import open_split, require_proposals
from mlkd.run_folder import RunFolder, check_resume


@dataclasses.dataclass
class StageConfig:
    name: str = "plain"
    epochs: int = bounded(20, 1, 100_000)
    lr: float | None = bounded(None, 0, 10, above=True)  # None = optim.lr
    lr_steps: tuple[int, ...] = bounded((), 1, 100_000)  # epochs of this stage after which lr *= optim.gamma
    label_weight: float = bounded(1.0, 0, None)  # L_p
    soft_weight: float = bounded(0.0, 0, None)  # L_p'
    feature_weight: float = bounded(0.0, 0, None)  # L_f


@dataclasses.dataclass
class DistillConfig:
    teacher: str | None = None  # teacher checkpoint; needed by stages with soft_weight or feature_weight
    teacher_scale: int | None = bounded(None, *SIZE)  # the teacher's input size (None = its checkpoint's test scale)
    # region layers matched by L_f: fc7 = the teacher's region feature its streams read (resnet50_c4: layer4 +
    # average pool); fc6 for VGG-style teachers only
    feature_layers: tuple[Literal["fc6", "fc7"], ...] = ("fc7",)
    # L_f through a linear map from the student's region width (model.hidden) to the teacher's, trained by L_f only
    # (not part of the student); needed when they differ, e.g. a VGG16 student (4096) and a resnet50_c4 teacher (2048)
    feature_adapter: bool = False
    # L_f's scale: none (the release: the teacher's), relative (error / the teacher's energy), l2 (directions)
    feature_norm: Literal["none", "relative", "l2"] = "none"
    top_k: int | None = bounded(None, 1, 100_000)  # L_f on each image's top-k proposals by objectness (None = all)
    scale_init: float = bounded(0.2, 0, None, above=True)  # the learnable per-class scale a of L_p' (T = 1 / a)
    scale_lr_mult: float = bounded(10.0, 0, None)
    cache_soft_targets: bool = True  # compute the teacher's image scores once per image and flip
    # stage 1: compute the teacher's region features once per image and flip (float16) when they take at most
    # this many GB; larger sets (or 0) run the teacher on the fly
    feature_cache_gb: float = bounded(16.0, 0, None)
    # the same student trained without distillation, to report the gain: a checkpoint or run folder, "auto" (a
    # finished sibling run of the same model and training set without distillation), or null
    baseline: str | None = "auto"


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
            raise BadInput("data.train is required: the dataset spec of the training split")
        if not self.stages:
            raise BadInput("stages must list at least one stage")
        needs = [s.name for s in self.stages if s.soft_weight or s.feature_weight]
        if needs and not self.distill.teacher:
            raise BadInput(f"stage(s) {needs} distil from the teacher: set distill.teacher to its checkpoint")


@dataclasses.dataclass
class _Teacher:
    """The frozen teacher of a distilling run and what the stages need of it."""

    model: WSDDN
    convention: str
    scale: int
    soft: TeacherTargets | None
    features: TeacherFeatures | None


def train_student(cfg: StudentConfig, resume: bool = False, explicit: Sequence[str] = ()) -> Path:
    """Train (or resume) the student described by ``cfg``; return the path of the final checkpoint. ``explicit``
    are the config keys the user set on the command line (on resume, only they may extend the run)."""
    return launch(_train, cfg, resume, explicit)


def _train(cfg: StudentConfig, resume: bool, info: DistInfo, explicit: Sequence[str]) -> Path:
    with RunFolder(cfg, resume, info) as run:
        dataset = open_split(cfg.data.train, cfg.data.options, cfg.data.train_proposals)
        torch.manual_seed(cfg.run.seed)
        student = build_student(cfg.model, dataset.num_classes).to(info.device)
        state = load_checkpoint(run.out / "last.pt", "student") if resume else None
        if state is not None:
            check_resume(state, cfg, dataset.identity, run.out, explicit)
            student.load_state_dict(state["model"])
        teacher = _load_teacher(cfg, dataset, run.out, info)
        log = run.start(state["train_state"]["epoch"] if state else None)
        stages = [Stage(s.name, s.epochs, lambda s=s: _stage_parts(cfg, s, student, teacher, dataset, info))
                  for s in cfg.stages]

        def checkpoint(train_state: dict[str, Any]) -> dict[str, Any]:
            return make_checkpoint("student", student.state_dict(), input_convention=cfg.model.input_convention,
                                   classes=dataset.classes, model_config=to_dict(cfg.model),
                                   image_size=cfg.model.image_size, dataset=dataset.identity.to_dict(),
                                   config=to_dict(cfg), train_state=train_state)

        validate = (lambda: _validate(student, cfg, dataset.classes, info)) if cfg.data.val else None
        report = StageReport(run.out, log, len(stages)) if info.is_main else None
        path = run_stages(stages, cfg, info, run.out, log, checkpoint, validate,
                          state["train_state"] if state is not None else None,
                          stage_end=report.stage_end if report is not None else None)
        if teacher is not None and teacher.features is not None:
            teacher.features.close()
        if teacher is not None:  # a distilled student: its gain over the baseline (measured by every rank)
            baseline = broadcast(_baseline(cfg, run.out, dataset) if info.is_main else None, info)

            def measure(model: torch.nn.Module) -> float:
                return _validate(model.to(info.device), cfg, dataset.classes, info)["val_mAP"]

            value = baseline_map(baseline, dataset.classes, measure) if baseline is not None and cfg.data.val else None
            if report is not None:
                report.finish(baseline, value)
        return path


def _baseline(cfg: StudentConfig, out: Path, dataset: MultiLabelDataset) -> Path | None:
    """The checkpoint of the run without distillation to compare with (see ``distill.baseline``)."""
    given = cfg.distill.baseline
    if given is None:
        return None
    if given == "auto":
        return find_baseline(out, to_dict(cfg.model), dataset.identity.to_dict())
    path = Path(given) / "last.pt" if Path(given).is_dir() else Path(given)
    if not path.is_file():
        raise NotFound(f"distill.baseline {given}: no such checkpoint or run folder with a last.pt")
    return path


def _load_teacher(cfg: StudentConfig, dataset: MultiLabelDataset, out: Path, info: DistInfo) -> _Teacher | None:
    """The frozen teacher (and its cached stage-2 targets) when a stage distils, else None."""
    if not (cfg.distill.teacher and any(s.soft_weight or s.feature_weight for s in cfg.stages)):
        return None
    require_proposals(dataset, "distilling from the teacher (data.train_proposals)")
    ckpt = load_checkpoint(cfg.distill.teacher, "teacher")
    check_class_order(ckpt["classes"], dataset.classes, f"teacher {cfg.distill.teacher} vs the training set")
    model = model_from_checkpoint(ckpt).to(info.device)
    scale = cfg.distill.teacher_scale or ckpt["inference"]["image_size"]
    d = cfg.distill
    if any(s.feature_weight for s in cfg.stages):  # before hours of cached targets, not after
        check_feature_layers(model, d.feature_layers)
        check_feature_width(cfg.model.hidden, model, d.feature_adapter)
    soft = d.cache_soft_targets and any(s.soft_weight for s in cfg.stages)
    wanted = FeatureCacheSpec(d.feature_layers, d.top_k, d.feature_cache_gb) \
        if d.feature_cache_gb > 0 and any(s.feature_weight for s in cfg.stages) else None
    soft, features = (teacher_caches(model, ckpt["input_convention"], d.teacher, dataset, scale, out, info,
                                     cfg.data.max_proposals, soft, wanted, cfg.run.progress, cfg.data.workers)
                      if soft or wanted else (None, None))
    return _Teacher(model, ckpt["input_convention"], scale, soft, features)


def _stage_transform(cfg: StudentConfig, stage: StageConfig, teacher: _Teacher | None):
    """Teacher + student views when the stage runs the teacher; the student's view and the proposals when it
    reads the teacher's region features from their cache; else only the student's view."""
    size, flip = cfg.model.image_size, 0.5 if cfg.data.flip else 0.0
    runs_teacher = (stage.feature_weight and teacher.features is None) or (stage.soft_weight and teacher.soft is None)
    if runs_teacher or stage.feature_weight:
        keep = [KeepTopProposals(cfg.data.max_proposals)] if cfg.data.max_proposals else []
        return Compose(keep + [TeacherStudentViews(teacher.scale, size, flip, teacher_image=bool(runs_teacher))])
    return Compose([RandomHorizontalFlip(flip), Warp(size)])


def _stage_parts(cfg: StudentConfig, stage: StageConfig, student: Student, teacher: _Teacher | None,
                 dataset: MultiLabelDataset, info: DistInfo) -> StageParts:
    distils = bool(stage.soft_weight or stage.feature_weight)
    d = cfg.distill
    objective = StudentObjective(student, teacher.model if distils else None, stage.label_weight, stage.soft_weight,
                                 stage.feature_weight, d.feature_layers, d.top_k, d.scale_init,
                                 d.feature_norm, d.feature_adapter).to(info.device)
    lr = stage.lr or cfg.optim.lr
    groups = param_groups(objective, lr, cfg.optim.weight_decay, cfg.optim.bias_lr_mult, cfg.optim.bias_decay,
                          lr_mults={"scale": d.scale_lr_mult}, no_decay=("scale",))
    optimizer = build_optimizer(groups, cfg.optim.optimizer, lr, cfg.optim.momentum)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(stage.lr_steps), cfg.optim.gamma)
    loader = make_loader(dataset.view(transform=_stage_transform(cfg, stage, teacher)), cfg.data.batch_size,
                         cfg.data.workers, collate, train=True, seed=cfg.run.seed, rank=info.rank,
                         world_size=info.world_size)
    soft = teacher.soft if teacher is not None and stage.soft_weight else None
    regions = teacher.features if teacher is not None and stage.feature_weight else None
    t_conv = teacher.convention if teacher is not None else None

    def prepare(images, targets):
        return student_inputs(images, targets, info.device, cfg.model.input_convention, t_conv, soft, regions)

    return StageParts(objective, lr, optimizer, scheduler, loader, prepare, extra=objective.extra_parameters())


def _validate(student: torch.nn.Module, cfg: StudentConfig, classes: list[str], info: DistInfo
              ) -> dict[str, float]:
    """Classification mAP of the held-out split (for the log only; checkpoints are never chosen by it); under
    torchrun each rank scores its share."""
    dataset = open_split(cfg.data.val, cfg.data.options)
    check_class_order(classes, dataset.classes, f"dataset {cfg.data.val}")
    scores = predict_student(student, dataset, cfg.model.input_convention, cfg.model.image_size, info.device,
                             cfg.data.workers, progress=False, info=info)
    return {"val_mAP": mean_average_precision(scores, dataset.label_matrix())}
