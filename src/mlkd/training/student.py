"""The student's recipe: its config and the run, with or without distillation from a trained teacher.

A run is a sequence of stages (``stages`` in the config; :mod:`mlkd.distill.config`), each with its own epochs,
learning rate and loss weights (L_p ``label_weight``, L_p' ``soft_weight``, L_f ``feature_weight``; see
:mod:`mlkd.distill.objective`). The teacher, its caches and each stage's :class:`~mlkd.distill.config.TeacherPlan`
are prepared once before the first step (:func:`mlkd.distill.prepare.prepare_teacher`).

``mlkd train-student --config student_coco_kd [--set key=value ...] [--resume]`` calls :func:`train_student`;
the run folder gets ``config.yaml``, ``log.jsonl``, ``curves.png``, ``last.pt``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch

from mlkd.data.base import MultiLabelDataset, check_class_order, collate
from mlkd.data.images import image_cache
from mlkd.data.loader import make_loader
from mlkd.data.transforms import Compose, KeepTopProposals, RandomHorizontalFlip, TeacherStudentViews, Warp
from mlkd.distill.config import DistillConfig, StageConfig, TeacherPlan
from mlkd.distill.inputs import student_inputs
from mlkd.distill.objective import StudentObjective
from mlkd.distill.prepare import DistillTeacher, prepare_teacher
from mlkd.distill.report import StageReport, baseline_map, check_baseline, find_baseline
from mlkd.errors import BadInput
from mlkd.inference.predict import predict_student
from mlkd.metrics import mean_average_precision
from mlkd.models.build import build_student
from mlkd.models.configs import StudentModelConfig
from mlkd.models.student import Student
from mlkd.proposals.attach import open_split
from mlkd.training.config import DataConfig, OptimConfig, RunConfig
from mlkd.training.loop import Hooks, LoopSettings, Stage, StageParts, process_group, run_stages
from mlkd.training.optim import build_optimizer, param_groups
from mlkd.training.run_folder import RunFolder
from mlkd.utils.checkpoint import make_checkpoint
from mlkd.utils.config import to_dict
from mlkd.utils.distributed import DistInfo, broadcast


@dataclasses.dataclass
class StudentConfig:
    # keys that older mlkd wrote into student configs and no student ever read: ignored when such a run resumes
    RETIRED: ClassVar[tuple[str, ...]] = ("data.scales", "data.test_scale", "data.resize", "data.max_size",
                                          "data.val_proposals")

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
        needs = [s.name for s in self.stages if s.distils]
        if needs and not self.distill.teacher:
            raise BadInput(f"stage(s) {needs} distil from the teacher: set distill.teacher to its checkpoint")


def train_student(cfg: StudentConfig, resume: bool = False, explicit: Sequence[str] = ()) -> Path:
    """Train (or resume) the student described by ``cfg``; return the path of the final checkpoint. ``explicit``
    are the config keys the user set on the command line (on resume, only they may extend the run)."""
    with process_group(cfg.run) as info, RunFolder(cfg, resume, info) as run, image_cache(cfg.data.image_cache_mb):
        dataset = open_split(cfg.data.train, cfg.data.options, cfg.data.train_proposals)
        torch.manual_seed(cfg.run.seed)
        student = build_student(cfg.model, dataset.num_classes).to(info.device)
        state = run.restore(student, "student", dataset.identity, explicit)
        settings = LoopSettings.from_config(cfg.optim, cfg.run).resolved(info.device)  # refused before any write
        if info.is_main and any(s.distils for s in cfg.stages):  # a baseline that cannot be compared: said now
            check_baseline(cfg.distill.baseline, dataset.classes)
        teacher = prepare_teacher(cfg.distill, cfg.stages, cfg.model.hidden, dataset, run.out, info,
                                  cfg.data.max_proposals, cfg.run.progress, cfg.data.workers)
        log = run.start(state["train_state"]["epoch"] if state else None)
        stages = [Stage(s.name, s.epochs, lambda s=s: _stage_parts(cfg, s, student, teacher, dataset, info))
                  for s in cfg.stages]
        hooks = _StudentHooks(cfg, student, dataset, info, StageReport(run.out, log, len(stages)) if info.is_main
                              else None)
        with teacher if teacher is not None else contextlib.nullcontext():  # closes the teacher's feature store
            path = run_stages(stages, settings, hooks, run, info, state["train_state"] if state is not None else None)
        if teacher is not None:  # a distilled student: its gain over the baseline (measured by every rank)
            hooks.report_gain(run.out)
        return path


class _StudentHooks(Hooks):
    """The student's checkpoint, its validation on ``data.val`` and, when distilling, the per-stage report."""

    def __init__(self, cfg: StudentConfig, student: Student, dataset: MultiLabelDataset, info: DistInfo,
                 report: StageReport | None) -> None:
        self.cfg, self.student, self.dataset, self.info, self.report = cfg, student, dataset, info, report
        self.validates = bool(cfg.data.val)
        self.validates_stages = True  # the report reads each stage's held-out mAP
        self._val: MultiLabelDataset | None = None  # opened at the first validation

    def checkpoint(self, train_state: dict[str, Any]) -> dict[str, Any]:
        cfg, dataset = self.cfg, self.dataset
        return make_checkpoint("student", self.student.state_dict(), input_convention=cfg.model.input_convention,
                               classes=dataset.classes, model_config=to_dict(cfg.model),
                               image_size=cfg.model.image_size, dataset=dataset.identity.to_dict(),
                               config=to_dict(cfg), train_state=train_state)

    def validate(self, model: torch.nn.Module | None = None) -> dict[str, float]:
        """Classification mAP of the held-out split (for the log only; checkpoints are never chosen by it); under
        torchrun each rank scores its share."""
        cfg, model = self.cfg, self.student if model is None else model
        if self._val is None:
            self._val = open_split(cfg.data.val, cfg.data.options)
            check_class_order(self.dataset.classes, self._val.classes, f"dataset {cfg.data.val}")
        dataset = self._val
        scores = predict_student(model.to(self.info.device), dataset, cfg.model.input_convention,
                                 cfg.model.image_size, self.info.device, cfg.data.workers, progress=False,
                                 info=self.info)
        return {"val_mAP": mean_average_precision(scores, dataset.label_matrix())}

    def after_stage(self, index: int, name: str, record: dict[str, Any] | None) -> None:
        if self.report is not None:
            self.report.stage_end(index, name, record)

    def report_gain(self, out: Path) -> None:
        """The distilled student's gain over its baseline (``distill.baseline``), measured by every rank."""
        baseline = broadcast(_baseline(self.cfg, out, self.dataset) if self.info.is_main else None, self.info)
        value = None
        if baseline is not None and self.validates:
            value = baseline_map(baseline, self.dataset.classes, lambda model: self.validate(model)["val_mAP"])
        if self.report is not None:
            self.report.finish(baseline, value)


def _baseline(cfg: StudentConfig, out: Path, dataset: MultiLabelDataset) -> Path | None:
    """The checkpoint of the run without distillation to compare with (see ``distill.baseline``)."""
    if cfg.distill.baseline == "auto":
        return find_baseline(out, to_dict(cfg.model), dataset.identity.to_dict())
    return check_baseline(cfg.distill.baseline, dataset.classes)


def _stage_transform(cfg: StudentConfig, plan: TeacherPlan, teacher: DistillTeacher | None) -> Compose:
    """Teacher + student views when the stage runs the teacher; the student's view and the proposals when it
    reads the teacher's region features from their cache; else only the student's view."""
    size, flip = cfg.model.image_size, 0.5 if cfg.data.flip else 0.0
    if plan.runs_teacher or plan.features is not None:
        keep = [KeepTopProposals(cfg.data.max_proposals)] if cfg.data.max_proposals else []
        return Compose(keep + [TeacherStudentViews(teacher.scale, size, flip, teacher_image=plan.runs_teacher)])
    return Compose([RandomHorizontalFlip(flip), Warp(size)])


def _stage_parts(cfg: StudentConfig, stage: StageConfig, student: Student, teacher: DistillTeacher | None,
                 dataset: MultiLabelDataset, info: DistInfo) -> StageParts:
    plan, d = (teacher.plan(stage) if teacher is not None else TeacherPlan()), cfg.distill
    objective = StudentObjective(student, teacher.model if stage.distils else None, stage.label_weight,
                                 stage.soft_weight, stage.feature_weight, d.feature_layers, d.top_k, d.scale_init,
                                 d.feature_norm, d.feature_adapter, plan).to(info.device)
    lr = stage.lr or cfg.optim.lr
    groups = param_groups(objective, lr, cfg.optim.weight_decay, cfg.optim.bias_lr_mult, cfg.optim.bias_decay,
                          lr_mults={"scale": d.scale_lr_mult}, no_decay=("scale",))
    optimizer = build_optimizer(groups, cfg.optim.optimizer, lr, cfg.optim.momentum)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(stage.lr_steps), cfg.optim.gamma)
    loader = make_loader(dataset.view(transform=_stage_transform(cfg, plan, teacher)), cfg.data.batch_size,
                         cfg.data.workers, collate, train=True, seed=cfg.run.seed, rank=info.rank,
                         world_size=info.world_size)
    t_conv, soft, regions = (teacher.convention, teacher.soft, teacher.features) if teacher else (None, None, None)

    def prepare(images, targets):
        return student_inputs(images, targets, info.device, cfg.model.input_convention, t_conv, plan, soft, regions)

    return StageParts(objective, lr, optimizer, scheduler, loader, prepare, extra=objective.extra_parameters())
