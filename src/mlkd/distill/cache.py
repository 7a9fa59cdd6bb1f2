"""The teacher's targets computed once before training: its image scores of every (image, flip) for L_p' and,
when they fit on disk, its region features for L_f (:mod:`mlkd.distill.feature_store`).

Why this is exact: the frozen teacher is deterministic (eval mode, no dropout) and its input for an image depends
only on the image and on whether the student's view of it is flipped: the teacher always sees the image warped to
its own scale with the cached proposals. The student's other augmentation (its own warp) never reaches the
teacher. Whether a stage reads these caches or runs the teacher is its :class:`~mlkd.distill.config.TeacherPlan`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from mlkd.data.base import MultiLabelDataset, collate
from mlkd.data.loader import make_loader
from mlkd.distill import feature_store
from mlkd.distill.feature_store import TeacherFeatures, estimate_bytes
from mlkd.distill.teacher import teacher_outputs
from mlkd.errors import BadInput
from mlkd.inference.predict import teacher_view
from mlkd.models.inputs import teacher_inputs
from mlkd.models.wsddn import WSDDN
from mlkd.utils.checkpoint import write_atomically
from mlkd.utils.distributed import DistInfo, all_gather, barrier, broadcast, shard

logger = logging.getLogger(__name__)

TARGETS_FILE, FEATURES_DIR = "teacher_targets.pt", "teacher_features"  # in the run folder


class TeacherTargets:
    """``image id -> Tensor[2, K]`` (row 0 unflipped, row 1 flipped); :meth:`lookup` builds a batch."""

    def __init__(self, probs: dict[str, torch.Tensor]) -> None:
        self.probs = probs

    def lookup(self, targets: list[dict[str, Any]]) -> torch.Tensor:
        """``(B, K)`` targets of a batch; each target needs ``image_id`` and ``flipped``."""
        return torch.stack([self.probs[t["image_id"]][int(t["flipped"])] for t in targets])


def _fingerprint(teacher_path: str, scale: int, dataset: MultiLabelDataset, max_proposals: int | None) -> dict:
    """What the teacher's caches were computed from: the teacher file, its scale, the dataset, its proposals and
    the content of the images they were computed on (so a proposal cache rebuilt on changed images with the same
    parameters does not let old targets through)."""
    st = os.stat(teacher_path)
    stamps = getattr(dataset.proposals, "stamps", None)  # caches of proposals computed by mlkd record them
    digest = hashlib.sha256()
    for image_id, stamp in sorted((stamps() if stamps else {}).items()):
        digest.update(image_id.encode() + b"\0" + stamp.digest)
    return {"teacher": os.path.abspath(teacher_path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "scale": scale,
            "dataset": dataset.identity.to_dict(), "max_proposals": max_proposals,
            "proposals": None if dataset.proposals is None else dataset.proposals.meta.get("params"),
            "images": digest.hexdigest()}


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


@dataclasses.dataclass(frozen=True)
class FeatureCacheSpec:
    """What the region-feature store holds: ``layers`` and each image's ``top_k`` regions (None: all)."""

    layers: Sequence[str]
    top_k: int | None = None


def feature_cache_bytes(teacher: WSDDN, dataset: MultiLabelDataset, spec: FeatureCacheSpec,
                        max_proposals: int | None) -> int:
    """Disk space of the region-feature store of ``dataset`` (its regions per image estimated from the first 64
    images when neither ``top_k`` nor ``max_proposals`` bounds them)."""
    per_image = spec.top_k or max_proposals or round(np.mean([len(dataset.proposals.get(r.image_id)[0])
                                                              for r in dataset.records[:64]]))
    return estimate_bytes(len(dataset), per_image, {layer: teacher.feature_width for layer in spec.layers})


def teacher_caches(teacher: WSDDN, convention: str, teacher_path: str, dataset: MultiLabelDataset, scale: int,
                   out: Path, info: DistInfo, max_proposals: int | None, soft: bool,
                   features: FeatureCacheSpec | None, progress: bool = True,
                   workers: int = 0) -> tuple[TeacherTargets | None, TeacherFeatures | None]:
    """The teacher's image scores (``soft``) and region features (``features``) of every (image, flip) of
    ``dataset``, from their caches in ``out`` when those are current, else computed in ONE pass of the frozen
    teacher over the views (its backbone runs once per view for both).

    - Targets: image scores at T = 0.5, in ``out/teacher_targets.pt`` (written atomically by rank 0).
    - Features: float16, in ``out/teacher_features`` (:mod:`mlkd.distill.feature_store`).

    Both are keyed by a fingerprint of the teacher checkpoint file, its scale, the dataset identity and the
    proposals, so a resumed run with the same inputs reuses them. Under ``torchrun`` each rank computes every
    ``world_size``-th image: targets are gathered on every rank, features go to one store shard per rank.
    """
    if dataset.proposals is None:
        raise BadInput("the teacher's targets need the training split's proposals: set data.train_proposals")
    key = _fingerprint(teacher_path, scale, dataset, max_proposals)
    saved = _saved_targets(out / TARGETS_FILE, key, info, dataset) if soft else None
    need_soft = soft and not broadcast(saved is not None, info)
    root, widths = out / FEATURES_DIR, {layer: teacher.feature_width for layer in (features.layers if features else ())}
    f_key = {**key, "layers": list(features.layers), "top_k": features.top_k, "format": 2} if features else None
    need_features = features is not None and not broadcast(info.is_main and feature_store.is_current(root, f_key), info)
    if need_features:
        size = feature_cache_bytes(teacher, dataset, features, max_proposals)
        logger.info(f"teacher region features: about {size / 2**20:.0f} MB in {root} (float16, {len(dataset)} images "
                    "x 2 flips)")
    rows: dict[str, list[Tensor | None]] = {}
    if need_soft or need_features:
        views = _teacher_views(teacher, convention, dataset, scale, max_proposals, info, workers, need_soft,
                               features if need_features else None, rows, progress)
        if need_features:
            if info.is_main:
                feature_store.clear(root)
            barrier(info)
            feature_store.write_shard(root / f"shard{info.rank}", widths, views, 2 * len(shard(len(dataset), info)),
                                      progress=False)
        else:
            for _ in views:
                pass
    if need_soft:
        merged = {k: v for part in all_gather(rows, info) for k, v in part.items()}
        saved = {"key": key, "probs": {r.image_id: torch.stack(merged[r.image_id]) for r in dataset.records}}
        if info.is_main:
            write_atomically(out / TARGETS_FILE, lambda f: torch.save(saved, f), "teacher targets")  # never half-written
    elif soft:
        saved = broadcast(saved, info)
    if need_features:
        barrier(info)
        if info.is_main:
            feature_store.finish(root, f_key, [f"shard{r}" for r in range(info.world_size)])
        barrier(info)
    return (TeacherTargets(saved["probs"]) if soft else None,
            TeacherFeatures(root, widths) if features is not None else None)


def _saved_targets(path: Path, key: dict[str, Any], info: DistInfo,
                   dataset: MultiLabelDataset) -> dict[str, Any] | None:
    """The targets saved in ``path`` when they were computed from ``key`` (read by rank 0 only), else None.

    The file is a cache that one teacher pass rebuilds exactly, so one that cannot be read (cut short,
    hostile: ``weights_only`` loads no code) or does not hold a ``(2, K)`` probability tensor per image is
    logged and computed again, rather than stopping a resumed run or feeding it wrong targets.
    """
    if not info.is_main or not path.is_file():
        return None
    try:
        saved = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - torch.load fails in many types (zip, pickle, storage): all mean unreadable
        logger.warning(f"{path} cannot be read ({type(e).__name__}: {e}); the teacher's targets are computed again")
        return None
    if isinstance(saved, dict) and saved.get("key") != key:
        return None  # computed from another teacher, dataset or proposals: not an error
    problem = _targets_problem(saved, dataset)
    if problem is not None:
        logger.warning(f"{path} is not a teacher targets file of this run ({problem}); the teacher's targets are "
                       "computed again")
        return None
    return saved


def _targets_problem(saved: Any, dataset: MultiLabelDataset) -> str | None:
    """What is wrong with a loaded targets file, or None: it must be ``{"key": ..., "probs": {image id: (2, K)
    finite float tensor in [0, 1]}}`` with an entry for every image of ``dataset``."""
    if not isinstance(saved, dict) or not isinstance(saved.get("probs"), dict):
        return f"expected a dict with 'key' and 'probs', got {type(saved).__name__}"
    probs, k = saved["probs"], dataset.num_classes
    for r in dataset.records:
        p = probs.get(r.image_id)
        if not isinstance(p, torch.Tensor) or not p.is_floating_point() or tuple(p.shape) != (2, k):
            got = f"{p.dtype} {tuple(p.shape)}" if isinstance(p, torch.Tensor) else type(p).__name__
            return f"image {r.image_id!r}: expected a (2, {k}) float tensor, got {got}"
    if dataset.records:  # one pass over all values: a per-image check costs seconds on COCO
        values = torch.stack([probs[r.image_id] for r in dataset.records]).float()
        bad = ~(torch.isfinite(values) & (values >= 0) & (values <= 1)).flatten(1).all(1)
        if bad.any():
            return (f"image {dataset.records[int(bad.nonzero()[0])].image_id!r}: probabilities outside [0, 1] or "
                    "not finite")
    return None


def _teacher_views(teacher: WSDDN, convention: str, dataset: MultiLabelDataset, scale: int,
                   max_proposals: int | None, info: DistInfo, workers: int, soft: bool,
                   features: FeatureCacheSpec | None, rows: dict[str, list[Tensor | None]], progress: bool
                   ) -> Iterator[tuple[str, bool, np.ndarray, dict[str, np.ndarray]]]:
    """One pass of the frozen teacher over this rank's views: with ``soft`` each view's image scores go into
    ``rows[image id][flipped]``; with ``features`` each view's region features are yielded for the store."""
    teacher.eval()
    what = " and ".join(n for n, on in (("targets", soft), ("features", features is not None)) if on)
    bar = tqdm(total=2 * len(shard(len(dataset), info)), desc=f"teacher {what}", unit="view",
               disable=not progress or not info.is_main)
    for flipped, targets, x in _teacher_passes(teacher, convention, dataset, scale, max_proposals, info, workers):
        probs, feats, keep = teacher_outputs(teacher, x["images"], x["proposals"], x["proposal_scores"], soft,
                                             features.layers if features else None,
                                             features.top_k if features else None)
        if probs is not None:
            for t, p in zip(targets, probs.cpu()):
                rows.setdefault(t["image_id"], [None, None])[int(flipped)] = p
        bar.update(len(targets))
        if feats is not None:
            for t, (positions, f) in zip(targets, _per_image(feats, keep, [len(p) for p in x["proposals"]])):
                yield t["image_id"], flipped, positions, f
    bar.close()


def compute_teacher_targets(teacher: WSDDN, convention: str, teacher_path: str, dataset: MultiLabelDataset,
                            scale: int, out: Path, info: DistInfo, max_proposals: int | None = None,
                            progress: bool = True, workers: int = 0) -> TeacherTargets:
    """The teacher's image scores (T = 0.5) of every (image, flip) of ``dataset``: :func:`teacher_caches`."""
    return teacher_caches(teacher, convention, teacher_path, dataset, scale, out, info, max_proposals, True, None,
                          progress, workers)[0]


def teacher_features_store(teacher: WSDDN, convention: str, teacher_path: str, dataset: MultiLabelDataset,
                           scale: int, out: Path, info: DistInfo, max_proposals: int | None,
                           layers: Sequence[str], top_k: int | None, progress: bool = True,
                           workers: int = 0) -> TeacherFeatures:
    """The teacher's region features of every (image, flip): :func:`teacher_caches`."""
    return teacher_caches(teacher, convention, teacher_path, dataset, scale, out, info, max_proposals, False,
                          FeatureCacheSpec(tuple(layers), top_k), progress, workers)[1]
