"""Training the teacher T-WDet: its config, how it is built, and the run (single process or DDP).

``mlkd train-teacher --config configs/teacher_voc07.yaml [--set key=value ...] [--resume]`` calls
:func:`train_teacher`. The run folder gets ``config.yaml`` (resolved), ``log.jsonl``, ``curves.png`` and
``last.pt`` (written atomically after every epoch; ``--resume`` continues from it exactly).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from mlkd.checkpoint import load_checkpoint, save_checkpoint
from mlkd.config import DataConfig, OptimConfig, RunConfig, from_dict, to_dict
from mlkd.data.loader import KeepTopProposals, make_loader, open_split
from mlkd.data.transforms import Compose, MultiScaleCollate, RandomHorizontalFlip
from mlkd.distributed import DistInfo, barrier, cleanup, init_distributed
from mlkd.engine import build_optimizer, format_record, param_groups, prepare_run, train_one_epoch, wrap_ddp
from mlkd.models.backbones import build_backbone, load_imagenet_weights, normalize
from mlkd.models.wsddn import WSDDN
from mlkd.runlog import RunLog

# torchvision VGG16 state-dict prefixes -> teacher prefixes (the 1000-way classifier.6 is not used)
VGG16_IMAGENET = {"features.": "backbone.features.", "classifier.0.": "fc6.", "classifier.3.": "fc7."}


@dataclasses.dataclass
class TeacherModelConfig:
    """The WSDDN teacher (see :class:`mlkd.models.wsddn.WSDDN` for each knob)."""

    backbone: Literal["vgg16", "tiny"] = "vgg16"
    tiny_channels: tuple[int, ...] = (16, 32, 64, 64)  # backbone=tiny only
    tiny_convs_per_block: int = 1  # backbone=tiny only
    weights: str | None = None  # local ImageNet VGG16 file (torchvision layout, or an `mlkd import-caffe` output)
    input_convention: Literal["caffe", "torchvision"] = "caffe"  # must match the weights
    hidden: int = 4096
    roi_size: int = 7
    roi_op: Literal["roi_pool", "roi_align"] = "roi_pool"
    dropout: float = 0.5
    score_scale: float = 1.0
    score_bias: float = 0.0
    cls_temperature: float = 1.0
    det_temperature: float = 1.0
    reg_weight: float = 0.0
    reg_iou: float = 0.6
    reg_top: int = 10


@dataclasses.dataclass
class TeacherConfig:
    model: TeacherModelConfig = dataclasses.field(default_factory=TeacherModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    run: RunConfig = dataclasses.field(default_factory=lambda: RunConfig(out="runs/teacher"))

    def validate(self) -> None:
        if not self.data.train:
            raise ValueError("data.train is required: the dataset spec of the training split")


def build_teacher(cfg: TeacherModelConfig, num_classes: int) -> WSDDN:
    """A WSDDN from its config; ImageNet weights (backbone, fc6, fc7) from ``cfg.weights`` when given."""
    backbone = build_backbone(cfg.backbone, channels=cfg.tiny_channels, convs_per_block=cfg.tiny_convs_per_block)
    model = WSDDN(backbone, num_classes, hidden=cfg.hidden, roi_size=cfg.roi_size, roi_op=cfg.roi_op,
                  dropout=cfg.dropout, score_scale=cfg.score_scale, score_bias=cfg.score_bias,
                  cls_temperature=cfg.cls_temperature, det_temperature=cfg.det_temperature,
                  reg_weight=cfg.reg_weight, reg_iou=cfg.reg_iou, reg_top=cfg.reg_top)
    if cfg.weights:
        if cfg.backbone != "vgg16":
            raise ValueError(f"model.weights are ImageNet VGG16 weights; model.backbone is {cfg.backbone!r}")
        load_imagenet_weights(model, cfg.weights, VGG16_IMAGENET, cfg.input_convention)
    return model


def teacher_from_checkpoint(ckpt: dict[str, Any]) -> WSDDN:
    """Rebuild a trained teacher from its checkpoint alone (eval mode, on the CPU)."""
    cfg = from_dict(TeacherModelConfig, {**ckpt["config"]["model"], "weights": None})
    model = build_teacher(cfg, len(ckpt["classes"]))
    model.load_state_dict(ckpt["model"])
    return model.eval()


def stack_images(images: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """A batch tensor from stacked images, or from a list of different sizes padded at the bottom/right
    (boxes keep their coordinates; the padding is zero after normalisation)."""
    if isinstance(images, torch.Tensor):
        return images
    h = max(im.shape[1] for im in images)
    w = max(im.shape[2] for im in images)
    return torch.stack([F.pad(im, (0, w - im.shape[2], 0, h - im.shape[1])) for im in images])


def teacher_inputs(images: Any, targets: list[dict[str, Any]], device: torch.device, convention: str,
                   with_labels: bool = True) -> dict[str, Any]:
    """The teacher's forward arguments for a DataLoader batch."""
    if isinstance(images, list):  # normalise before padding, so the padding is the mean colour
        x = stack_images([normalize(im[None].to(device), convention)[0] for im in images])
    else:
        x = normalize(images.to(device, non_blocking=True), convention)
    if any("proposals" not in t for t in targets):
        raise ValueError("the dataset has no proposals: attach a cache (data.train_proposals / --proposals)")
    out = {"images": x, "proposals": [t["proposals"].to(device) for t in targets],
           "proposal_scores": [t["proposal_scores"].to(device) for t in targets]}
    if with_labels:
        out["labels"] = torch.stack([t["labels"] for t in targets]).to(device)
    return out


def seed_epoch(seed: int, epoch: int, rank: int = 0) -> None:
    """Reseed torch and numpy for an epoch, so epoch e draws the same numbers whether or not the run resumed.

    Each DDP rank gets its own stream (flips and dropout differ between ranks); rank 0 draws what a single
    process draws.
    """
    state = np.random.SeedSequence([seed, epoch] + ([rank] if rank else [])).generate_state(2)
    torch.manual_seed(int(state[0]))
    np.random.seed(int(state[1]))


def train_teacher(cfg: TeacherConfig, resume: bool = False) -> Path:
    """Train (or resume) the teacher described by ``cfg``; return the path of the final checkpoint."""
    info = init_distributed(cfg.run.device)
    try:
        return _train(cfg, resume, info)
    finally:
        cleanup(info)


def _train(cfg: TeacherConfig, resume: bool, info: DistInfo) -> Path:
    out = prepare_run(cfg, resume, info)
    steps = ([KeepTopProposals(cfg.data.max_proposals)] if cfg.data.max_proposals else []) + \
            ([RandomHorizontalFlip(0.5)] if cfg.data.flip else [])
    dataset = open_split(cfg.data.train, cfg.data.options, cfg.data.train_proposals, Compose(steps))
    if dataset.proposals is None:
        raise ValueError("the teacher needs proposals: set data.train_proposals to a proposal cache")
    collate = MultiScaleCollate(cfg.data.scales, seed=cfg.run.seed, resize=cfg.data.resize,
                                max_size=cfg.data.max_size)
    loader = make_loader(dataset, cfg.data.batch_size, cfg.data.workers, collate, train=True, seed=cfg.run.seed,
                         rank=info.rank, world_size=info.world_size)
    torch.manual_seed(cfg.run.seed)  # the new layers' initialisation
    model = build_teacher(cfg.model, dataset.num_classes).to(info.device)
    groups = param_groups(model, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.bias_lr_mult, cfg.optim.bias_decay)
    optimizer = build_optimizer(groups, cfg.optim.optimizer, cfg.optim.lr, cfg.optim.momentum)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(cfg.optim.lr_steps), cfg.optim.gamma)
    start = 0
    if resume:
        ckpt = load_checkpoint(out / "last.pt", "teacher")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start = ckpt["epoch"] + 1
    log = RunLog(out, enabled=info.is_main, resume_epoch=start - 1 if resume else None)
    wrapped = wrap_ddp(model, info)
    scaler = torch.amp.GradScaler("cuda") if cfg.run.amp == "fp16" else None
    convention = cfg.model.input_convention
    for epoch in range(start, cfg.optim.epochs):
        seed_epoch(cfg.run.seed, epoch, info.rank)
        collate.set_epoch(epoch)
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        losses = train_one_epoch(
            wrapped, loader, optimizer, lambda im, t: teacher_inputs(im, t, info.device, convention), epoch=epoch,
            device=info.device, accumulate=cfg.optim.accumulate, amp=cfg.run.amp, clip_grad=cfg.optim.clip_grad,
            scaler=scaler, log=log, log_every=cfg.run.log_every, progress=cfg.run.progress and info.is_main)
        scheduler.step()
        if info.is_main:
            record = {"type": "epoch", "epoch": epoch, **{f"train_{k}": v for k, v in losses.items()}}
            if cfg.data.val and cfg.run.eval_every and (epoch + 1) % cfg.run.eval_every == 0:
                record.update(_validate(model, cfg, dataset.classes, info.device))
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "epoch": epoch, "config": to_dict(cfg),
                     "classes": dataset.classes, "input_convention": convention, "kind": "teacher",
                     "dataset": dataset.identity.to_dict()}
            save_checkpoint(out / "last.pt", state)
            log.write(record)
            log.plot()
            print(format_record(record), flush=True)
        barrier(info)
    return out / "last.pt"


def _validate(model: WSDDN, cfg: TeacherConfig, classes: list[str], device: torch.device) -> dict[str, float]:
    """Classification mAP of the held-out split (for the log only; checkpoints are never chosen by it)."""
    from mlkd.evaluation import evaluate_teacher_model

    report = evaluate_teacher_model(model, cfg.data.val, cfg.data.val_proposals, classes, cfg.model.input_convention,
                                    scale=cfg.data.test_scale, options=cfg.data.options, device=device,
                                    max_proposals=cfg.data.max_proposals, workers=cfg.data.workers,
                                    detection=False, progress=False)
    model.train()
    return {"val_mAP": report["classification"]["mAP"]["mlic"]}
