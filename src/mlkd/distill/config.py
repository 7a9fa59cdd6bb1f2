"""What a student run learns from: its stages (the weights of L_p, L_p', L_f and their schedule), the
distillation settings, and, per stage, where the teacher's targets come from (:class:`TeacherPlan`).

A run is a sequence of stages, each with its own epochs, learning rate and loss weights:

- no distillation: one stage ``{label_weight: 1}``;
- the release's two-stage recipe: stage 1 ``{label_weight: 0, feature_weight: 1}``, then stage 2
  ``{label_weight: 1, soft_weight: 1}``, each with a fresh optimizer (the release trained them as two solvers);
- joint mode: one stage with all three weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from mlkd.errors import BadInput
from mlkd.utils.config import SIZE, bounded, from_dict

Source = Literal["cached", "live"]  # read from the caches computed before training, or the teacher run every step


@dataclasses.dataclass
class StageConfig:
    """One stage of a student run: ``epochs`` epochs of ``label_weight * L_p + soft_weight * L_p' +
    feature_weight * L_f`` with a fresh optimizer."""

    name: str = "plain"
    epochs: int = bounded(20, 1, 100_000)
    lr: float | None = bounded(None, 0, 10, above=True)  # None = optim.lr
    lr_steps: tuple[int, ...] = bounded((), 1, 100_000)  # epochs of this stage after which lr *= optim.gamma
    label_weight: float = bounded(1.0, 0, None)  # L_p
    soft_weight: float = bounded(0.0, 0, None)  # L_p'
    feature_weight: float = bounded(0.0, 0, None)  # L_f

    @property
    def uses_soft(self) -> bool:
        """Whether the stage learns from the teacher's image scores (L_p')."""
        return self.soft_weight > 0

    @property
    def uses_features(self) -> bool:
        """Whether the stage learns from the teacher's region features (L_f)."""
        return self.feature_weight > 0

    @property
    def distils(self) -> bool:
        """Whether the stage learns from the teacher at all."""
        return self.uses_soft or self.uses_features


def saved_stages(config: dict[str, Any]) -> list[StageConfig]:
    """The stages of a resolved student config as saved in a checkpoint (a plain dict)."""
    return [from_dict(StageConfig, s, prefix=f"stages[{i}].") for i, s in enumerate(config.get("stages") or [])]


@dataclasses.dataclass
class DistillConfig:
    """The teacher a student learns from and how (see :mod:`mlkd.distill.objective` for the losses)."""

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
    # L_f: compute the teacher's region features once per image and flip (float16) when they take at most this
    # many GB; larger sets (or 0) run the teacher on the fly
    feature_cache_gb: float = bounded(16.0, 0, None)
    # the same student trained without distillation, to report the gain: a checkpoint or run folder, "auto" (a
    # finished sibling run of the same model and training set without distillation), or null
    baseline: str | None = "auto"


@dataclasses.dataclass(frozen=True)
class TeacherPlan:
    """Where one stage gets each of the teacher's targets: ``"cached"``, ``"live"`` or None (not used).

    Decided once per stage by :meth:`mlkd.distill.prepare.DistillTeacher.plan` and handed to everything that
    depends on it: the data transform (the teacher's view of each image is decoded only when the teacher runs),
    the batch adapter (:func:`mlkd.distill.inputs.student_inputs` reads the caches) and the objective (which runs
    the teacher for what is live).
    """

    soft: Source | None = None  # L_p': the teacher's image scores
    features: Source | None = None  # L_f: the teacher's region features

    def __post_init__(self) -> None:
        for name in ("soft", "features"):
            if getattr(self, name) not in (None, "cached", "live"):
                raise BadInput(f"TeacherPlan.{name} must be 'cached', 'live' or None, got {getattr(self, name)!r}")

    @classmethod
    def live(cls, soft: bool, features: bool) -> "TeacherPlan":
        """Everything the stage uses computed by the teacher at every step."""
        return cls("live" if soft else None, "live" if features else None)

    @property
    def mode(self) -> Literal["none", "cached", "live"]:
        """``"none"``: the stage does not distil; ``"live"``: the teacher runs at every step; ``"cached"``:
        everything is read from the caches."""
        sources = {self.soft, self.features} - {None}
        return "none" if not sources else ("live" if "live" in sources else "cached")

    @property
    def runs_teacher(self) -> bool:
        return self.mode == "live"
