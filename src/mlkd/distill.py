"""The student's training objective, with knowledge distillation from the WSDDN teacher, in one visible place.

The teacher is frozen: it stays in eval mode (no dropout), its parameters have ``requires_grad=False``, its
outputs are computed under ``torch.no_grad()`` and nothing ever steps its weights. Losses (B images, K classes,
region r of image b, N_R = sum over images of their regions):

- ``L_p``  = 1/B sum_b sum_k BCE(sigmoid(z_bk), y_bk)                       (labels; y = -1 ignored)
- ``L_p'`` = 1/B sum_b sum_k BCE(sigmoid(a_k z_bk), p^T_bk)                 (teacher's image scores)
  with p^T the teacher's image score computed with both streams' logits x 2 (T = 0.5) and ``a`` the
  learnable per-class scale (init 0.2, i.e. T = 5; lr x 10, no weight decay)
- ``L_f``  = sum_layers sum_(b,r) ||F_T(b, r) - F_S(b, r)||^2 / (2 N_R)     (region features, e.g. fc7)
  = the paper's sum ||F_T - F_S||^2 / (2 N R) when every image has R regions. ``fc7`` is the teacher's region
  feature that its streams read: VGG16's fc7, or a resnet50_c4 teacher's layer4 + average pool (which has no fc6).
  With a feature adapter, F_S is first mapped linearly to the teacher's width (a VGG16 student's 4096-d fc7 to a
  resnet50_c4 teacher's 2048).

Stage 1 of the release trains with L_f, stage 2 with L_p + L_p'; a joint mode weights all three; a student
without distillation trains with L_p alone.

Stage 2's teacher scores are computed once per (image, flip) before training (:func:`compute_teacher_targets`),
and so are stage 1's region features when they fit on disk (:func:`teacher_features_store`). Why this is exact: the frozen teacher is deterministic (eval mode, no dropout) and its input for an image
depends only on the image and on whether the student's view of it is flipped: the teacher always sees the
image warped to its own scale with the cached proposals. The student's other augmentation (its own warp)
never reaches the teacher. Region features too large to store are computed on the fly.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from mlkd import feature_cache
from mlkd.checkpoint import write_atomically
from mlkd.data.base import MultiLabelDataset, collate
from mlkd.data.loader import make_loader
from mlkd.distributed import DistInfo, all_gather, barrier, broadcast, shard
from mlkd.errors import BadInput
from mlkd.feature_cache import TeacherFeatures, estimate_bytes
from mlkd.inference import teacher_view
from mlkd.models.inputs import teacher_inputs
from mlkd.models.ops import caffe_xavier_, flatten_proposals
from mlkd.models.student import Student, label_loss
from mlkd.models.wsddn import WSDDN, wsddn_scores

logger = logging.getLogger(__name__)

TEACHER_TEMPERATURE = 0.5  # the release multiplies both streams' logits by 2 for the soft targets


def feature_loss(student: Tensor, teacher: Tensor, norm: str = "none") -> Tensor:
    """L_f of one layer over region features ``(N_R, D)``.

    - ``"none"`` (the release): ``sum ||F_T - F_S||^2 / (2 N_R)``. Its scale is that of the teacher's features,
      which differs by orders of magnitude between teachers (a tiny teacher's fc7 norms are ~10, VGG16's ~50+).
    - ``"relative"``: ``sum ||F_T - F_S||^2 / sum ||F_T||^2`` over the batch's regions: the squared error relative
      to the teacher's own energy, 1 for a student that outputs zeros, whatever the teacher's scale.
    - ``"l2"``: each region's features divided by their L2 norm first, then ``sum ||.||^2 / (2 N_R)``: only the
      direction is matched, the loss is in [0, 2].
    """
    if student.shape != teacher.shape:
        raise BadInput(f"student region features {tuple(student.shape)} and teacher's {tuple(teacher.shape)} "
                       "differ: the student's fc6/fc7 (or adapter) width must equal the teacher's, or pass through "
                       "a feature adapter (distill.feature_adapter)")
    if norm == "relative":
        return (teacher - student).pow(2).sum() / teacher.pow(2).sum().clamp(min=1e-12)
    if norm == "l2":
        student, teacher = F.normalize(student, dim=1, eps=1e-6), F.normalize(teacher, dim=1, eps=1e-6)
    elif norm != "none":
        raise BadInput(f"feature norm must be 'none', 'relative' or 'l2', got {norm!r}")
    return (teacher - student).pow(2).sum() / (2 * max(student.shape[0], 1))


def check_feature_layers(teacher: WSDDN, layers: Sequence[str]) -> None:
    """Refuse feature layers the teacher does not have (a resnet50_c4 teacher has no fc6)."""
    missing = [layer for layer in layers if layer not in teacher.region_layer_names]
    if missing:
        raise BadInput(f"distill.feature_layers {list(layers)}: the teacher has no {missing} region features, only "
                       f"{list(teacher.region_layer_names)} (a resnet50_c4 teacher's region head is layer4 + average "
                       "pool, whose output is its fc7; fc6 exists in the VGG-style fc6/fc7 head only)")


def check_feature_width(student_width: int, teacher: WSDDN, adapter: bool) -> None:
    """Refuse an L_f between region features of different widths unless a feature adapter maps one to the other."""
    if not adapter and student_width != teacher.feature_width:
        raise BadInput(f"the student's region features are {student_width} wide (model.hidden), the teacher's "
                       f"{teacher.feature_width}: L_f compares them directly, so set model.hidden: "
                       f"{teacher.feature_width}, or distill.feature_adapter: true (a linear map from the student's "
                       "width to the teacher's, trained by L_f only, e.g. a VGG16 student with ImageNet fc6/fc7 and "
                       "a resnet50_c4 teacher)")


def soft_label_loss(logits: Tensor, scale: Tensor, teacher_probs: Tensor) -> Tensor:
    """L_p': ``1/B sum_b sum_k BCE(sigmoid(a_k z_bk), p^T_bk)`` for logits ``(B, K)``, scale ``a (K,)``,
    teacher probabilities ``(B, K)`` in [0, 1]."""
    return F.binary_cross_entropy_with_logits(logits * scale, teacher_probs.to(logits.dtype),
                                              reduction="sum") / logits.shape[0]


@torch.no_grad()
def teacher_outputs(teacher: WSDDN, images: Tensor, proposals: Sequence[Tensor], scores: Sequence[Tensor] | None,
                    soft: bool = True, layers: Sequence[str] | None = None, top_k: int | None = None,
                    temperature: float = TEACHER_TEMPERATURE
                    ) -> tuple[Tensor | None, dict[str, Tensor] | None, Tensor | None]:
    """One forward of the frozen teacher on a batch, giving what distillation needs of it:

    - with ``soft``: its image scores ``(B, K)`` with both streams' logits divided by ``temperature``;
    - with ``layers``: its region features ``{layer: (N', D)}`` and their rows among the batch's flattened
      proposals (None: all of them; with ``top_k``, each image's ``top_k`` regions by objectness s').
    """
    boxes, flat_scores, index = flatten_proposals(proposals, scores)
    target = teacher.region_layers(teacher.backbone(images), boxes, flat_scores, index)
    cls_logits, det_logits = teacher.forward_streams(teacher.drop(target["fc7"]))
    probs = feats = keep = None
    if soft:
        _, probs = wsddn_scores(cls_logits.float(), det_logits.float(), index, len(proposals), temperature,
                                temperature)
        probs = probs.clamp(0.0, 1.0)
    if layers:
        feats = {k: target[k] for k in layers}
        if top_k is not None:
            regions, _ = wsddn_scores(cls_logits, det_logits, index, len(proposals), teacher.cls_temperature,
                                      teacher.det_temperature)
            keep = top_regions(regions.sum(1), index, len(proposals), top_k)  # s' = sum_k S
            feats = {k: v[keep] for k, v in feats.items()}
    return probs, feats, keep


def teacher_image_probs(teacher: WSDDN, images: Tensor, proposals: Sequence[Tensor],
                        scores: Sequence[Tensor] | None, temperature: float = TEACHER_TEMPERATURE) -> Tensor:
    """The teacher's image scores ``(B, K)`` with both streams' logits divided by ``temperature``."""
    return teacher_outputs(teacher, images, proposals, scores, temperature=temperature)[0]


def teacher_region_targets(teacher: WSDDN, images: Tensor, proposals: Sequence[Tensor],
                           scores: Sequence[Tensor] | None, layers: Sequence[str] = ("fc7",),
                           top_k: int | None = None) -> tuple[dict[str, Tensor], Tensor | None]:
    """The teacher's region features ``{layer: (N', D)}`` of a batch and their rows among its flattened
    proposals (None: all of them; with ``top_k``, each image's ``top_k`` regions by objectness s')."""
    _, feats, keep = teacher_outputs(teacher, images, proposals, scores, soft=False, layers=layers, top_k=top_k)
    return feats, keep


def top_regions(objectness: Tensor, index: Tensor, num_images: int, k: int) -> Tensor:
    """Row indices of the ``k`` regions of highest objectness s' in each image (all of them if fewer)."""
    keep = []
    for i in range(num_images):
        rows = (index == i).nonzero().squeeze(1)
        keep.append(rows[objectness[rows].topk(min(k, rows.numel())).indices.sort().values])
    return torch.cat(keep)


class StudentObjective(nn.Module):
    """The student (+ the frozen teacher when distilling); ``forward`` returns the weighted losses of a stage.

    Args:
        student, teacher: the models (the teacher is frozen here and stays so); ``teacher=None`` for a stage
            that learns from labels only (then only ``label_weight`` may be set).
        label_weight, soft_weight, feature_weight: weights of L_p, L_p', L_f (0 = not computed).
        feature_layers: region layers matched by L_f (``("fc7",)`` in the release; add ``"fc6"`` for both, with a
            VGG-style teacher: see :func:`check_feature_layers`).
        top_k: use only each image's ``top_k`` proposals by the teacher's objectness s' for L_f (None = all).
        scale_init: initial value of the learnable per-class scale a of L_p'.
        feature_norm: ``"none"`` (the release), ``"relative"`` or ``"l2"``: see :func:`feature_loss`.
        feature_adapter: match ``adapter[layer](F_S)`` to F_T in L_f, ``adapter`` a linear map per layer from the
            student's region width to the teacher's (FitNets' regressor; Caffe "xavier" init), trained by L_f only
            and not part of the student. False (the release) compares F_S itself, which needs equal widths.
    """

    def __init__(self, student: Student, teacher: WSDDN | None, label_weight: float = 1.0, soft_weight: float = 0.0,
                 feature_weight: float = 0.0, feature_layers: Sequence[str] = ("fc7",), top_k: int | None = None,
                 scale_init: float = 0.2, feature_norm: str = "none", feature_adapter: bool = False) -> None:
        super().__init__()
        if teacher is None and (soft_weight or feature_weight):
            raise BadInput("soft_weight and feature_weight distil from a teacher: give the teacher")
        self.student = student
        self.teacher = teacher
        self.adapter = None
        if teacher is not None:
            if feature_weight:
                check_feature_layers(teacher, feature_layers)
                check_feature_width(student.region_width, teacher, feature_adapter)
                if feature_adapter:
                    self.adapter = nn.ModuleDict({layer: nn.Linear(student.region_width, teacher.feature_width)
                                                  for layer in feature_layers})
                    for layer in self.adapter.values():
                        caffe_xavier_(layer)
            teacher.eval()
            teacher.requires_grad_(False)  # frozen: it only provides targets, nothing may update it
            self.scale = nn.Parameter(torch.full((student.num_classes,), float(scale_init)))  # a of L_p'
        self.weights = {"label": label_weight, "soft": soft_weight, "feature": feature_weight}
        self.feature_layers, self.top_k, self.feature_norm = tuple(feature_layers), top_k, feature_norm

    def train(self, mode: bool = True) -> "StudentObjective":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # dropout in the teacher would make its targets random
        return self

    def extra_parameters(self) -> dict[str, nn.Parameter]:
        """Parameters of the objective that are not the student's (saved to resume): the scale a of L_p' and the
        feature adapter's weights."""
        extra = {"scale": self.scale} if self.teacher is not None else {}
        if self.adapter is not None:
            extra.update({f"adapter.{name}": p for name, p in self.adapter.named_parameters()})
        return extra

    def forward(self, images: Tensor, labels: Tensor, teacher_images: Tensor | None = None,
                proposals: Sequence[Tensor] | None = None, proposal_scores: Sequence[Tensor] | None = None,
                student_proposals: Sequence[Tensor] | None = None, teacher_probs: Tensor | None = None,
                teacher_features: tuple[dict[str, Tensor], Tensor] | None = None) -> dict[str, Tensor]:
        """Weighted losses.

        Args:
            images (Tensor[B, 3, h, w]): the student's input. labels (Tensor[B, K]).
            teacher_images (Tensor[B, 3, H, W]): the teacher's view of the same images (same flip).
            proposals, proposal_scores: per image ``(R_i, 4)`` / ``(R_i,)`` in the teacher's frame.
            student_proposals: the same proposals rescaled to the student's frame.
            teacher_probs (Tensor[B, K]): cached teacher image scores (T = 0.5); computed here when None.
            teacher_features: cached teacher region features ``({layer: (N', D)}, rows (N',))``, ``rows`` the
                positions of those regions among the batch's proposals; computed here when None.
        """
        w = self.weights
        fmap = self.student.backbone(images)
        logits = self.student.forward_logits(fmap).float()
        losses = {}
        if w["label"]:
            losses["loss_label"] = w["label"] * label_loss(logits, labels)
        live_soft, live_features = w["soft"] and teacher_probs is None, w["feature"] and teacher_features is None
        if live_soft or live_features:  # one teacher forward for whatever is not cached
            probs, feats, keep = teacher_outputs(self.teacher, teacher_images, proposals, proposal_scores, live_soft,
                                                 self.feature_layers if live_features else None, self.top_k)
            teacher_probs = probs if live_soft else teacher_probs
            teacher_features = (feats, keep) if live_features else teacher_features
        if w["soft"]:
            losses["loss_soft"] = w["soft"] * soft_label_loss(logits, self.scale, teacher_probs)
        if w["feature"]:
            losses["loss_feature"] = w["feature"] * self._feature_loss(fmap, student_proposals, *teacher_features)
        return losses

    def _feature_loss(self, fmap: Tensor, student_proposals: Sequence[Tensor], target: dict[str, Tensor],
                      rows: Tensor | None) -> Tensor:
        s_boxes, _, s_index = flatten_proposals(student_proposals, None)
        if rows is not None:
            s_boxes, s_index = s_boxes[rows], s_index[rows]
        feats = self.student.forward_regions(fmap, s_boxes, s_index, self.feature_layers)
        if self.adapter is not None:
            feats = {layer: self.adapter[layer](f) for layer, f in feats.items()}
        return sum(feature_loss(feats[layer].float(), target[layer].float(), self.feature_norm)
                   for layer in self.feature_layers)


# -- stage 2's teacher targets, computed once ------------------------------------------------------------------
class TeacherTargets:
    """``image id -> Tensor[2, K]`` (row 0 unflipped, row 1 flipped); :meth:`lookup` builds a batch."""

    def __init__(self, probs: dict[str, torch.Tensor]) -> None:
        self.probs = probs

    def lookup(self, targets: list[dict[str, Any]]) -> torch.Tensor:
        """``(B, K)`` targets of a batch; each target needs ``image_id`` and ``flipped``."""
        return torch.stack([self.probs[t["image_id"]][int(t["flipped"])] for t in targets])


def _fingerprint(teacher_path: str, scale: int, dataset: MultiLabelDataset, max_proposals: int | None) -> dict:
    st = os.stat(teacher_path)
    return {"teacher": os.path.abspath(teacher_path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "scale": scale,
            "dataset": dataset.identity.to_dict(), "max_proposals": max_proposals,
            "proposals": None if dataset.proposals is None else dataset.proposals.meta.get("params")}


TEACHER_BATCH = 4  # images per teacher forward when computing its targets (all are warped to the same square)


def _teacher_passes(teacher: WSDDN, convention: str, dataset: MultiLabelDataset, scale: int,
                    max_proposals: int | None, info: DistInfo, workers: int = 0, batch_size: int = TEACHER_BATCH):
    """``(flipped, targets, inputs)`` for this rank's share of ``dataset`` (every ``world_size``-th image),
    unflipped then flipped, ``batch_size`` images at a time, as the frozen teacher sees them."""
    part = dataset.view(indices=shard(len(dataset), info))
    device = next(teacher.parameters()).device
    for flipped in (False, True):
        loader = make_loader(teacher_view(part, scale, flipped, max_proposals), batch_size, workers, collate,
                             train=False)
        for images, targets in loader:
            yield flipped, targets, teacher_inputs(images, targets, device, convention, with_labels=False)


def _per_image(feats: dict[str, Tensor], keep: Tensor | None, sizes: list[int]):
    """Split a batch's region features (rows ``keep`` of its flattened proposals, all when None) per image:
    ``(positions among that image's proposals, {layer: (R', D)})``."""
    total = sum(sizes)
    rows = torch.arange(total) if keep is None else keep.cpu()
    image = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))[rows]
    starts = np.cumsum([0] + sizes[:-1])
    host = {k: v.float().cpu() for k, v in feats.items()}
    for i in range(len(sizes)):
        sel = (image == i).nonzero().squeeze(1)
        yield (rows[sel] - int(starts[i])).numpy(), {k: v[sel].numpy() for k, v in host.items()}


@dataclasses.dataclass
class FeatureCacheSpec:
    """What stage 1's region-feature store holds: ``layers``, each image's ``top_k`` regions (None: all), and
    the most disk it may take (larger sets run the teacher on the fly)."""

    layers: Sequence[str]
    top_k: int | None
    max_gb: float


def teacher_caches(teacher: WSDDN, convention: str, teacher_path: str, dataset: MultiLabelDataset, scale: int,
                   out: Path, info: DistInfo, max_proposals: int | None, soft: bool,
                   features: FeatureCacheSpec | None, progress: bool = True,
                   workers: int = 0) -> tuple[TeacherTargets | None, TeacherFeatures | None]:
    """The teacher's stage-2 targets (``soft``) and stage-1 region features (``features``) of every (image,
    flip) of ``dataset``, from their caches in ``out`` when those are current, else computed in ONE pass of the
    frozen teacher over the views (its backbone runs once per view for both).

    - Targets: image scores at T = 0.5, in ``out/teacher_targets.pt`` (written atomically by rank 0).
    - Features: float16, in ``out/teacher_features`` (:mod:`mlkd.feature_cache`), or None when they would take
      more than ``features.max_gb`` (stage 1 then runs the teacher on the fly); the size is logged first.

    Both are keyed by a fingerprint of the teacher checkpoint file, its scale, the dataset identity and the
    proposals, so a resumed run with the same inputs reuses them. Under ``torchrun`` each rank computes every
    ``world_size``-th image: targets are gathered on every rank, features go to one store shard per rank.
    """
    if dataset.proposals is None:
        raise BadInput("the teacher's targets need the training split's proposals: set data.train_proposals")
    key = _fingerprint(teacher_path, scale, dataset, max_proposals)
    saved = None
    t_path = out / "teacher_targets.pt"
    if soft and info.is_main and t_path.is_file():
        saved = torch.load(t_path, weights_only=True)
        saved = saved if saved.get("key") == key else None
    need_soft = soft and not broadcast(saved is not None, info)
    root, widths, f_key, need_features = out / "teacher_features", {}, None, False
    if features is not None:
        check_feature_layers(teacher, features.layers)
        widths = {layer: teacher.feature_width for layer in features.layers}
        per_image = features.top_k or max_proposals or round(np.mean([len(dataset.proposals.get(r.image_id)[0])
                                                                      for r in dataset.records[:64]]))
        size = estimate_bytes(len(dataset), per_image, widths)
        if size > features.max_gb * 2**30:
            logger.info(f"teacher region features would take {size / 2**30:.1f} GB (> distill.feature_cache_gb "
                        f"{features.max_gb:g}): stage 1 runs the teacher on the fly")
            features = None
        else:
            f_key = {**key, "layers": list(features.layers), "top_k": features.top_k, "format": 2}
            need_features = not broadcast(info.is_main and feature_cache.is_current(root, f_key), info)
            if need_features:
                logger.info(f"teacher region features: about {size / 2**20:.0f} MB in {root} "
                            f"(float16, {len(dataset)} images x 2 flips)")
    rows: dict[str, list[Tensor | None]] = {}
    if need_soft or need_features:
        teacher.eval()
        what = " and ".join(n for n, on in (("targets", need_soft), ("features", need_features)) if on)
        bar = tqdm(total=2 * len(shard(len(dataset), info)), desc=f"teacher {what}", unit="view",
                   disable=not progress or not info.is_main)

        def views():
            for flipped, targets, x in _teacher_passes(teacher, convention, dataset, scale, max_proposals, info,
                                                       workers):
                probs, feats, keep = teacher_outputs(teacher, x["images"], x["proposals"], x["proposal_scores"],
                                                     need_soft, features.layers if need_features else None,
                                                     features.top_k if need_features else None)
                if probs is not None:
                    for t, p in zip(targets, probs.cpu()):
                        rows.setdefault(t["image_id"], [None, None])[int(flipped)] = p
                bar.update(len(targets))
                if feats is not None:
                    for t, (positions, f) in zip(targets, _per_image(feats, keep, [len(p) for p in x["proposals"]])):
                        yield t["image_id"], flipped, positions, f

        if need_features:
            if info.is_main:
                feature_cache.clear(root)
            barrier(info)
            feature_cache.write_shard(root / f"shard{info.rank}", widths, views(), 2 * len(shard(len(dataset), info)),
                                      progress=False)
        else:
            for _ in views():
                pass
        bar.close()
    if need_soft:
        merged = {k: v for part in all_gather(rows, info) for k, v in part.items()}
        saved = {"key": key, "probs": {r.image_id: torch.stack(merged[r.image_id]) for r in dataset.records}}
        if info.is_main:
            write_atomically(t_path, lambda f: torch.save(saved, f), "teacher targets")  # never half-written
    elif soft:
        saved = broadcast(saved, info)
    if need_features:
        barrier(info)
        if info.is_main:
            feature_cache.finish(root, f_key, [f"shard{r}" for r in range(info.world_size)])
        barrier(info)
    return (TeacherTargets(saved["probs"]) if soft else None,
            TeacherFeatures(root, widths) if features is not None else None)


def compute_teacher_targets(teacher: WSDDN, convention: str, teacher_path: str, dataset: MultiLabelDataset,
                            scale: int, out: Path, info: DistInfo, max_proposals: int | None = None,
                            progress: bool = True, workers: int = 0) -> TeacherTargets:
    """The teacher's image scores (T = 0.5) of every (image, flip) of ``dataset``: :func:`teacher_caches`."""
    return teacher_caches(teacher, convention, teacher_path, dataset, scale, out, info, max_proposals, True, None,
                          progress, workers)[0]


def teacher_features_store(teacher: WSDDN, convention: str, teacher_path: str, dataset: MultiLabelDataset,
                           scale: int, out: Path, info: DistInfo, max_proposals: int | None,
                           layers: Sequence[str], top_k: int | None, max_gb: float,
                           progress: bool = True, workers: int = 0) -> TeacherFeatures | None:
    """The teacher's region features of every (image, flip), or None when they would take more than ``max_gb``:
    :func:`teacher_caches`."""
    return teacher_caches(teacher, convention, teacher_path, dataset, scale, out, info, max_proposals, False,
                          FeatureCacheSpec(layers, top_k, max_gb), progress, workers)[1]
