"""Everything a distilling run needs of its teacher, prepared once before the first step: the frozen model, the
checks that it can teach this student, its caches, and for each stage where its targets come from.

:func:`prepare_teacher` is the one place that decides whether a target is read from a cache or computed by the
teacher at every step (:meth:`DistillTeacher.plan`): the image scores of L_p' are cached unless
``distill.cache_soft_targets`` is false; the region features of L_f are cached when they fit in
``distill.feature_cache_gb`` (a store larger than that, or a limit of 0, runs the teacher on the fly).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Sequence

from mlkd.data.base import MultiLabelDataset, check_class_order
from mlkd.distill.cache import FeatureCacheSpec, TeacherTargets, feature_cache_bytes, teacher_caches
from mlkd.distill.config import DistillConfig, Source, StageConfig, TeacherPlan
from mlkd.distill.feature_store import TeacherFeatures
from mlkd.distill.teacher import check_feature_layers, check_feature_width
from mlkd.models.build import model_from_checkpoint
from mlkd.models.wsddn import WSDDN
from mlkd.proposals.attach import require_proposals
from mlkd.utils.checkpoint import load_checkpoint
from mlkd.utils.distributed import DistInfo

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class DistillTeacher:
    """The frozen teacher of a distilling run, its input, and its caches (None: that target is computed live).
    A context manager: leaving it closes the feature store."""

    model: WSDDN
    convention: str  # the teacher's input convention
    scale: int  # the teacher's input size
    soft: TeacherTargets | None  # cached image scores for L_p'
    features: TeacherFeatures | None  # cached region features for L_f

    def plan(self, stage: StageConfig) -> TeacherPlan:
        """Where ``stage`` gets each target: the cache when there is one, else the teacher at every step."""
        return TeacherPlan(_source(stage.uses_soft, self.soft), _source(stage.uses_features, self.features))

    def close(self) -> None:
        if self.features is not None:
            self.features.close()

    def __enter__(self) -> "DistillTeacher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _source(used: bool, cache: object | None) -> Source | None:
    return None if not used else ("cached" if cache is not None else "live")


def prepare_teacher(cfg: DistillConfig, stages: Sequence[StageConfig], student_width: int,
                    dataset: MultiLabelDataset, out: Path, info: DistInfo, max_proposals: int | None,
                    progress: bool = True, workers: int = 0) -> DistillTeacher | None:
    """Load the teacher of ``cfg.teacher``, check it against the training set and the student's region width
    (``student_width``), and build the caches the ``stages`` will read; None when no stage distils."""
    if not any(s.distils for s in stages):
        return None
    require_proposals(dataset, "distilling from the teacher (data.train_proposals)")
    ckpt = load_checkpoint(cfg.teacher, "teacher")
    check_class_order(ckpt["classes"], dataset.classes, f"teacher {cfg.teacher} vs the training set")
    model = model_from_checkpoint(ckpt).to(info.device)
    scale = cfg.teacher_scale or ckpt["inference"]["image_size"]
    features = None
    if any(s.uses_features for s in stages):  # before hours of cached targets, not after
        check_feature_layers(model, cfg.feature_layers)
        check_feature_width(student_width, model, cfg.feature_adapter)
        features = _feature_cache(cfg, model, dataset, max_proposals)
    soft = cfg.cache_soft_targets and any(s.uses_soft for s in stages)
    cached = teacher_caches(model, ckpt["input_convention"], cfg.teacher, dataset, scale, out, info, max_proposals,
                            soft, features, progress, workers) if soft or features else (None, None)
    return DistillTeacher(model, ckpt["input_convention"], scale, *cached)


def _feature_cache(cfg: DistillConfig, teacher: WSDDN, dataset: MultiLabelDataset,
                   max_proposals: int | None) -> FeatureCacheSpec | None:
    """The region-feature store to build, or None when L_f runs the teacher on the fly (the store would not fit
    in ``distill.feature_cache_gb``, or that limit is 0)."""
    if cfg.feature_cache_gb <= 0:
        return None
    spec = FeatureCacheSpec(cfg.feature_layers, cfg.top_k)
    size = feature_cache_bytes(teacher, dataset, spec, max_proposals)
    if size > cfg.feature_cache_gb * 2**30:
        logger.info(f"teacher region features would take {size / 2**30:.1f} GB (> distill.feature_cache_gb "
                    f"{cfg.feature_cache_gb:g}): L_f runs the teacher on the fly")
        return None
    return spec
