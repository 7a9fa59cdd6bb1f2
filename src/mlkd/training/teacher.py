"""The teacher's recipe: its config (model, data, optimiser, run) and the run, one stage of
:func:`~mlkd.training.loop.run_stages`.

``mlkd train-teacher --config teacher_voc07 [--set key=value ...] [--resume]`` calls :func:`train_teacher`. The
run folder gets ``config.yaml`` (resolved), ``log.jsonl``, ``curves.png`` and ``last.pt`` (written atomically
after every epoch; ``--resume`` continues from it exactly).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar, Literal, Sequence

import torch

from mlkd.data.base import MultiLabelDataset, check_class_order
from mlkd.data.images import image_cache
from mlkd.data.loader import make_loader
from mlkd.data.transforms import Compose, KeepTopProposals, MultiScaleCollate, RandomHorizontalFlip
from mlkd.errors import BadInput
from mlkd.inference.predict import predict_teacher
from mlkd.metrics import mean_average_precision
from mlkd.models.build import build_teacher
from mlkd.models.configs import RELEASE_TEST_SCALE, TeacherModelConfig
from mlkd.models.inputs import teacher_inputs
from mlkd.models.wsddn import WSDDN
from mlkd.proposals.attach import open_split, require_proposals
from mlkd.training.config import DataConfig, OptimConfig, RunConfig
from mlkd.training.loop import Hooks, LoopSettings, Stage, StageParts, process_group, run_stages
from mlkd.training.optim import build_optimizer, param_groups
from mlkd.training.run_folder import RunFolder
from mlkd.utils.checkpoint import make_checkpoint
from mlkd.utils.config import SIZE, bounded, to_dict
from mlkd.utils.distributed import DistInfo


@dataclasses.dataclass
class TeacherDataConfig(DataConfig):
    """The teacher's data: the shared keys, plus its multi-scale input and its held-out split's proposals."""

    ELSEWHERE: ClassVar[dict[str, str]] = {}
    val_proposals: str | None = None  # proposal cache of the val split (teacher evaluation)
    scales: tuple[int, ...] = bounded((480, 576, 672, 736, 832), *SIZE)  # one drawn per training batch
    test_scale: int = bounded(RELEASE_TEST_SCALE, *SIZE)  # single-scale evaluation size
    # warp to scale x scale (release), shorter side = scale, or width = scale as the original WSDDN reader does
    resize: Literal["warp", "shorter", "wsddn"] = "warp"
    max_size: int | None = bounded(None, *SIZE)  # cap on the longer side with resize=shorter or wsddn

    def validate(self) -> None:
        if not self.scales:
            raise BadInput("data.scales must list at least one training scale")


@dataclasses.dataclass
class TeacherConfig:
    model: TeacherModelConfig = dataclasses.field(default_factory=TeacherModelConfig)
    data: TeacherDataConfig = dataclasses.field(default_factory=TeacherDataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    run: RunConfig = dataclasses.field(default_factory=lambda: RunConfig(out="runs/teacher"))

    def validate(self) -> None:
        if not self.data.train:
            raise BadInput("data.train is required: the dataset spec of the training split")


def train_teacher(cfg: TeacherConfig, resume: bool = False, explicit: Sequence[str] = ()) -> Path:
    """Train (or resume) the teacher described by ``cfg``; return the path of the final checkpoint. ``explicit``
    are the config keys the user set on the command line (on resume, only they may extend the run)."""
    with process_group(cfg.run) as info, RunFolder(cfg, resume, info) as run, image_cache(cfg.data.image_cache_mb):
        steps = ([KeepTopProposals(cfg.data.max_proposals)] if cfg.data.max_proposals else []) + \
                ([RandomHorizontalFlip(0.5)] if cfg.data.flip else [])
        dataset = open_split(cfg.data.train, cfg.data.options, cfg.data.train_proposals, Compose(steps))
        require_proposals(dataset, "training the teacher (data.train_proposals)")
        torch.manual_seed(cfg.run.seed)  # the new layers' initialisation
        model = build_teacher(cfg.model, dataset.num_classes).to(info.device)
        state = run.restore(model, "teacher", dataset.identity, explicit)
        settings = LoopSettings.from_config(cfg.optim, cfg.run).resolved(info.device)  # refused before any write
        run.start(state["train_state"]["epoch"] if state else None)
        stage = Stage("wsddn", cfg.optim.epochs, lambda: _stage_parts(cfg, model, dataset, info))
        return run_stages([stage], settings, _TeacherHooks(cfg, model, dataset, info), run, info,
                          state["train_state"] if state is not None else None)


class _TeacherHooks(Hooks):
    """The teacher's checkpoint and its validation on ``data.val``."""

    def __init__(self, cfg: TeacherConfig, model: WSDDN, dataset: MultiLabelDataset, info: DistInfo) -> None:
        self.cfg, self.model, self.dataset, self.info = cfg, model, dataset, info
        self.validates = bool(cfg.data.val)
        self._val: MultiLabelDataset | None = None  # opened at the first validation

    def checkpoint(self, train_state: dict[str, Any]) -> dict[str, Any]:
        cfg, dataset = self.cfg, self.dataset
        return make_checkpoint("teacher", self.model.state_dict(), input_convention=cfg.model.input_convention,
                               classes=dataset.classes, model_config=to_dict(cfg.model),
                               image_size=cfg.data.test_scale, max_proposals=cfg.data.max_proposals,
                               proposals=proposal_method(dataset), dataset=dataset.identity.to_dict(),
                               config=to_dict(cfg), train_state=train_state)

    def validate(self) -> dict[str, float]:
        """Classification mAP of the held-out split (for the log only; checkpoints are never chosen by it); under
        torchrun each rank scores its share."""
        cfg = self.cfg
        if self._val is None:
            self._val = open_split(cfg.data.val, cfg.data.options, cfg.data.val_proposals)
            check_class_order(self.dataset.classes, self._val.classes, f"dataset {cfg.data.val}")
        dataset = self._val
        pred = predict_teacher(self.model, dataset, cfg.model.input_convention, self.info.device,
                               (cfg.data.test_scale,), max_proposals=cfg.data.max_proposals,
                               workers=cfg.data.workers, progress=False, info=self.info)
        return {"val_mAP": mean_average_precision(pred["image_scores"], dataset.label_matrix())}


def proposal_method(dataset: MultiLabelDataset) -> dict[str, Any] | None:
    """How the training split's proposals were computed (``method``, ``params``), so that inference on new images
    can compute them the same way; None when they were imported from files."""
    meta = dataset.proposals.meta
    return None if meta["method"].startswith("import") else {"method": meta["method"], "params": meta["params"]}


def _stage_parts(cfg: TeacherConfig, model: WSDDN, dataset: MultiLabelDataset, info: DistInfo) -> StageParts:
    collate = MultiScaleCollate(cfg.data.scales, seed=cfg.run.seed, resize=cfg.data.resize,
                                max_size=cfg.data.max_size)
    loader = make_loader(dataset, cfg.data.batch_size, cfg.data.workers, collate, train=True, seed=cfg.run.seed,
                         rank=info.rank, world_size=info.world_size)
    groups = param_groups(model, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.bias_lr_mult, cfg.optim.bias_decay)
    optimizer = build_optimizer(groups, cfg.optim.optimizer, cfg.optim.lr, cfg.optim.momentum)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(cfg.optim.lr_steps), cfg.optim.gamma)
    convention = cfg.model.input_convention
    return StageParts(model, cfg.optim.lr, optimizer, scheduler, loader,
                      lambda im, t: teacher_inputs(im, t, info.device, convention))
