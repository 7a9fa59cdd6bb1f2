"""The student's training objective, with knowledge distillation from the WSDDN teacher, in one visible place.

The teacher is frozen: it stays in eval mode (no dropout), its parameters have ``requires_grad=False``, its
outputs are computed under ``torch.no_grad()`` and nothing ever steps its weights. Losses (B images, K classes,
region r of image b, N_R = sum over images of their regions):

- ``L_p``  = 1/B sum_b sum_k BCE(sigmoid(z_bk), y_bk)                       (labels; y = -1 ignored)
- ``L_p'`` = 1/B sum_b sum_k BCE(sigmoid(a_k z_bk), p^T_bk)                 (teacher's image scores)
  with p^T the teacher's image score computed with both streams' logits x 2 (T = 0.5) and ``a`` the
  learnable per-class scale (init 0.2, i.e. T = 5; lr x 10, no weight decay)
- ``L_f``  = sum_layers sum_(b,r) ||F_T(b, r) - F_S(b, r)||^2 / (2 N_R)     (region features, e.g. fc7)
  = the paper's sum ||F_T - F_S||^2 / (2 N R) when every image has R regions.

Stage 1 of the release trains with L_f, stage 2 with L_p + L_p'; a joint mode weights all three; a student
without distillation trains with L_p alone.

Stage 2's teacher scores are computed once per (image, flip) before training (:func:`compute_teacher_targets`),
and so are stage 1's region features when they fit on disk (:func:`teacher_features_store`). Why this is exact: the frozen teacher is deterministic (eval mode, no dropout) and its input for an image
depends only on the image and on whether the student's view of it is flipped: the teacher always sees the
image warped to its own scale with the cached proposals. The student's other augmentation (its own warp)
never reaches the teacher. Region features too large to store are computed on the fly.
"""

from __future__ import annotations

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
from mlkd.models.ops import flatten_proposals
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
                       "differ: the student's fc6/fc7 (or adapter) width must equal the teacher's")
    if norm == "relative":
        return (teacher - student).pow(2).sum() / teacher.pow(2).sum().clamp(min=1e-12)
    if norm == "l2":
        student, teacher = F.normalize(student, dim=1, eps=1e-6), F.normalize(teacher, dim=1, eps=1e-6)
    elif norm != "none":
        raise BadInput(f"feature norm must be 'none', 'relative' or 'l2', got {norm!r}")
    return (teacher - student).pow(2).sum() / (2 * max(student.shape[0], 1))


def soft_label_loss(logits: Tensor, scale: Tensor, teacher_probs: Tensor) -> Tensor:
    """L_p': ``1/B sum_b sum_k BCE(sigmoid(a_k z_bk), p^T_bk)`` for logits ``(B, K)``, scale ``a (K,)``,
    teacher probabilities ``(B, K)`` in [0, 1]."""
    return F.binary_cross_entropy_with_logits(logits * scale, teacher_probs.to(logits.dtype),
                                              reduction="sum") / logits.shape[0]


@torch.no_grad()
def teacher_image_probs(teacher: WSDDN, images: Tensor, proposals: Sequence[Tensor],
                        scores: Sequence[Tensor] | None, temperature: float = TEACHER_TEMPERATURE) -> Tensor:
    """The teacher's image scores ``(B, K)`` with both streams' logits divided by ``temperature``."""
    boxes, flat_scores, index = flatten_proposals(proposals, scores)
    features = teacher.forward_regions(teacher.backbone(images), boxes, flat_scores, index)
    cls_logits, det_logits = teacher.forward_streams(features)
    _, probs = wsddn_scores(cls_logits.float(), det_logits.float(), index, images.shape[0], temperature, temperature)
    return probs.clamp(0.0, 1.0)


@torch.no_grad()
def teacher_region_targets(teacher: WSDDN, images: Tensor, proposals: Sequence[Tensor],
                           scores: Sequence[Tensor] | None, layers: Sequence[str] = ("fc7",),
                           top_k: int | None = None) -> tuple[dict[str, Tensor], Tensor | None]:
    """The teacher's region features ``{layer: (N', D)}`` of a batch and their rows among its flattened
    proposals (None: all of them; with ``top_k``, each image's ``top_k`` regions by objectness s')."""
    boxes, flat_scores, index = flatten_proposals(proposals, scores)
    target = teacher.region_layers(teacher.backbone(images), boxes, flat_scores, index)
    if top_k is None:
        return {k: target[k] for k in layers}, None
    regions, _ = wsddn_scores(*teacher.forward_streams(target["fc7"]), index, len(proposals),
                              teacher.cls_temperature, teacher.det_temperature)
    keep = top_regions(regions.sum(1), index, len(proposals), top_k)  # s' = sum_k S
    return {k: target[k][keep] for k in layers}, keep


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
        feature_layers: region layers matched by L_f (``("fc7",)`` in the release; add ``"fc6"`` for both).
        top_k: use only each image's ``top_k`` proposals by the teacher's objectness s' for L_f (None = all).
        scale_init: initial value of the learnable per-class scale a of L_p'.
        feature_norm: ``"none"`` (the release), ``"relative"`` or ``"l2"``: see :func:`feature_loss`.
    """

    def __init__(self, student: Student, teacher: WSDDN | None, label_weight: float = 1.0, soft_weight: float = 0.0,
                 feature_weight: float = 0.0, feature_layers: Sequence[str] = ("fc7",), top_k: int | None = None,
                 scale_init: float = 0.2, feature_norm: str = "none") -> None:
        super().__init__()
        if teacher is None and (soft_weight or feature_weight):
            raise BadInput("soft_weight and feature_weight distil from a teacher: give the teacher")
        self.student = student
        self.teacher = teacher
        if teacher is not None:
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
        """Parameters of the objective that are not the student's (saved to resume): the scale a of L_p'."""
        return {"scale": self.scale} if self.teacher is not None else {}

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
        if w["soft"]:
            if teacher_probs is None:
                teacher_probs = teacher_image_probs(self.teacher, teacher_images, proposals, proposal_scores)
            losses["loss_soft"] = w["soft"] * soft_label_loss(logits, self.scale, teacher_probs)
        if w["feature"]:
            if teacher_features is None:
                teacher_features = teacher_region_targets(self.teacher, teacher_images, proposals, proposal_scores,
                                                          self.feature_layers, self.top_k)
            losses["loss_feature"] = w["feature"] * self._feature_loss(fmap, student_proposals, *teacher_features)
        return losses

    def _feature_loss(self, fmap: Tensor, student_proposals: Sequence[Tensor], target: dict[str, Tensor],
                      rows: Tensor | None) -> Tensor:
        s_boxes, _, s_index = flatten_proposals(student_proposals, None)
        if rows is not None:
            s_boxes, s_index = s_boxes[rows], s_index[rows]
        feats = self.student.forward_regions(fmap, s_boxes, s_index, self.feature_layers)
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


@torch.no_grad()
def compute_teacher_targets(teacher: WSDDN, convention: str, teacher_path: str, dataset: MultiLabelDataset,
                            scale: int, out: Path, info: DistInfo, max_proposals: int | None = None,
                            progress: bool = True, workers: int = 0) -> TeacherTargets:
    """The teacher's image scores (T = 0.5) of every (image, flip) of ``dataset``.

    Cached in ``out/teacher_targets.pt``, keyed by a fingerprint of the teacher checkpoint file, its scale, the
    dataset identity and the proposals: a run resumed with the same inputs reuses the file. Under ``torchrun``
    each rank computes its share, every rank gets them all, rank 0 writes the file (atomically).
    """
    path = out / "teacher_targets.pt"
    key = _fingerprint(teacher_path, scale, dataset, max_proposals)
    saved = None
    if info.is_main and path.is_file():
        saved = torch.load(path, weights_only=True)
        saved = saved if saved.get("key") == key else None
    if not broadcast(saved is not None, info):
        if dataset.proposals is None:
            raise BadInput("soft targets need the training split's proposals: set data.train_proposals")
        teacher.eval()
        rows: dict[str, list[torch.Tensor | None]] = {}
        bar = tqdm(total=2 * len(shard(len(dataset), info)), desc="teacher targets", unit="view",
                   disable=not progress or not info.is_main)
        for flipped, targets, x in _teacher_passes(teacher, convention, dataset, scale, max_proposals, info, workers):
            probs = teacher_image_probs(teacher, x["images"], x["proposals"], x["proposal_scores"]).cpu()
            for t, p in zip(targets, probs):
                rows.setdefault(t["image_id"], [None, None])[int(flipped)] = p
            bar.update(len(targets))
        bar.close()
        merged = {k: v for part in all_gather(rows, info) for k, v in part.items()}
        saved = {"key": key, "probs": {r.image_id: torch.stack(merged[r.image_id]) for r in dataset.records}}
        if info.is_main:
            write_atomically(path, lambda f: torch.save(saved, f), "teacher targets")  # never half-written
    else:
        saved = broadcast(saved, info)
    return TeacherTargets(saved["probs"])


# -- stage 1's teacher region features, computed once -----------------------------------------------------------
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


def teacher_features_store(teacher: WSDDN, convention: str, teacher_path: str, dataset: MultiLabelDataset,
                           scale: int, out: Path, info: DistInfo, max_proposals: int | None,
                           layers: Sequence[str], top_k: int | None, max_gb: float,
                           progress: bool = True, workers: int = 0) -> TeacherFeatures | None:
    """The teacher's region features of every (image, flip), in ``out/teacher_features`` (float16), or None
    when they would take more than ``max_gb`` (stage 1 then runs the teacher on the fly). The size is logged
    before anything is computed; under ``torchrun`` each rank writes its share to its own shard."""
    widths = {layer: teacher.fc7.out_features for layer in layers}
    per_image = top_k or max_proposals or round(np.mean([len(dataset.proposals.get(r.image_id)[0])
                                                         for r in dataset.records[:64]]))
    size = estimate_bytes(len(dataset), per_image, widths)
    if size > max_gb * 2**30:
        logger.info(f"teacher region features would take {size / 2**30:.1f} GB (> distill.feature_cache_gb "
                    f"{max_gb:g}): stage 1 runs the teacher on the fly")
        return None
    root = out / "teacher_features"
    key = {**_fingerprint(teacher_path, scale, dataset, max_proposals), "layers": list(layers), "top_k": top_k,
           "format": 2}
    if broadcast(info.is_main and feature_cache.is_current(root, key), info):
        return TeacherFeatures(root, widths)
    logger.info(f"teacher region features: about {size / 2**20:.0f} MB in {root} "
                f"(float16, {len(dataset)} images x 2 flips)")
    teacher.eval()

    @torch.no_grad()
    def views():
        for flipped, targets, x in _teacher_passes(teacher, convention, dataset, scale, max_proposals, info, workers):
            feats, keep = teacher_region_targets(teacher, x["images"], x["proposals"], x["proposal_scores"], layers,
                                                 top_k)
            for t, (rows, f) in zip(targets, _per_image(feats, keep, [len(p) for p in x["proposals"]])):
                yield t["image_id"], flipped, rows, f

    if info.is_main:
        feature_cache.clear(root)
    barrier(info)
    feature_cache.write_shard(root / f"shard{info.rank}", widths, views(), 2 * len(shard(len(dataset), info)),
                              progress and info.is_main)
    barrier(info)
    if info.is_main:
        feature_cache.finish(root, key, [f"shard{r}" for r in range(info.world_size)])
    barrier(info)
    return TeacherFeatures(root, widths)
