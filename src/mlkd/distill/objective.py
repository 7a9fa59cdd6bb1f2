"""The student's training objective, with knowledge distillation from the WSDDN teacher, in one visible place.

Losses (B images, K classes, region r of image b, N_R = sum over images of their regions):

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
without distillation trains with L_p alone. The teacher's targets come from its caches or from the teacher run at
every step, as each stage's :class:`~mlkd.distill.config.TeacherPlan` says (:mod:`mlkd.distill.cache`).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlkd.distill.config import TeacherPlan
from mlkd.distill.teacher import teacher_outputs
from mlkd.errors import BadInput
from mlkd.models.ops import caffe_xavier_, flatten_proposals
from mlkd.models.student import Student, label_loss
from mlkd.models.wsddn import WSDDN


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

def soft_label_loss(logits: Tensor, scale: Tensor, teacher_probs: Tensor) -> Tensor:
    """L_p': ``1/B sum_b sum_k BCE(sigmoid(a_k z_bk), p^T_bk)`` for logits ``(B, K)``, scale ``a (K,)``,
    teacher probabilities ``(B, K)`` in [0, 1]."""
    return F.binary_cross_entropy_with_logits(logits * scale, teacher_probs.to(logits.dtype),
                                              reduction="sum") / logits.shape[0]


class StudentObjective(nn.Module):
    """The student (+ the frozen teacher when distilling); ``forward`` returns the weighted losses of a stage.

    Args:
        student, teacher: the models (the teacher is frozen here and stays so); ``teacher=None`` for a stage
            that learns from labels only (then only ``label_weight`` may be set).
        label_weight, soft_weight, feature_weight: weights of L_p, L_p', L_f (0 = not computed).
        feature_layers: region layers matched by L_f (``("fc7",)`` in the release; add ``"fc6"`` for both, with a
            VGG-style teacher: see :func:`~mlkd.distill.teacher.check_feature_layers`).
        top_k: use only each image's ``top_k`` proposals by the teacher's objectness s' for L_f (None = all).
        scale_init: initial value of the learnable per-class scale a of L_p'.
        feature_norm: ``"none"`` (the release), ``"relative"`` or ``"l2"``: see :func:`feature_loss`.
        feature_adapter: match ``adapter[layer](F_S)`` to F_T in L_f, ``adapter`` a linear map per layer from the
            student's region width to the teacher's (FitNets' regressor; Caffe "xavier" init), trained by L_f only
            and not part of the student. False (the release) compares F_S itself, which needs equal widths.
        plan: where the teacher's targets come from (:class:`~mlkd.distill.config.TeacherPlan`): a ``"cached"``
            target is passed to :meth:`forward`, a ``"live"`` one is computed there by the teacher. Default: every
            target the weights ask for is live.
    """

    def __init__(self, student: Student, teacher: WSDDN | None, label_weight: float = 1.0, soft_weight: float = 0.0,
                 feature_weight: float = 0.0, feature_layers: Sequence[str] = ("fc7",), top_k: int | None = None,
                 scale_init: float = 0.2, feature_norm: str = "none", feature_adapter: bool = False,
                 plan: TeacherPlan | None = None) -> None:
        super().__init__()
        if teacher is None and (soft_weight or feature_weight):
            raise BadInput("soft_weight and feature_weight distil from a teacher: give the teacher")
        plan = plan or TeacherPlan.live(soft_weight > 0, feature_weight > 0)
        if (plan.soft is not None) != (soft_weight > 0) or (plan.features is not None) != (feature_weight > 0):
            raise BadInput(f"{plan} does not match the loss weights (soft_weight {soft_weight}, feature_weight "
                           f"{feature_weight}): a target has a source exactly when its loss is used")
        self.student, self.teacher, self.plan = student, teacher, plan
        self.adapter = None
        if teacher is not None:
            if feature_weight and feature_adapter:
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
            teacher_images (Tensor[B, 3, H, W]): the teacher's view of the same images (same flip); for live targets.
            proposals, proposal_scores: per image ``(R_i, 4)`` / ``(R_i,)`` in the teacher's frame.
            student_proposals: the same proposals rescaled to the student's frame.
            teacher_probs (Tensor[B, K]): the cached teacher image scores (T = 0.5), when ``plan.soft`` is cached.
            teacher_features: the cached teacher region features ``({layer: (N', D)}, rows (N',))``, ``rows`` the
                positions of those regions among the batch's proposals, when ``plan.features`` is cached.
        """
        w, plan = self.weights, self.plan
        self._check_cached("soft", teacher_probs, "teacher_probs")
        self._check_cached("features", teacher_features, "teacher_features")
        fmap = self.student.backbone(images)
        logits = self.student.forward_logits(fmap).float()
        losses = {}
        if w["label"]:
            losses["loss_label"] = w["label"] * label_loss(logits, labels)
        if plan.runs_teacher:  # one teacher forward for whatever is live
            live_soft, live_features = plan.soft == "live", plan.features == "live"
            probs, feats, keep = teacher_outputs(self.teacher, teacher_images, proposals, proposal_scores, live_soft,
                                                 self.feature_layers if live_features else None, self.top_k)
            teacher_probs = probs if live_soft else teacher_probs
            teacher_features = (feats, keep) if live_features else teacher_features
        if w["soft"]:
            losses["loss_soft"] = w["soft"] * soft_label_loss(logits, self.scale, teacher_probs)
        if w["feature"]:
            losses["loss_feature"] = w["feature"] * self._feature_loss(fmap, student_proposals, *teacher_features)
        return losses

    def _check_cached(self, target: str, value: object, argument: str) -> None:
        """A cached target must be given, a live or unused one must not (it would be silently ignored)."""
        cached = getattr(self.plan, target) == "cached"
        if cached and value is None:
            raise BadInput(f"the stage reads the teacher's {target} targets from its cache: pass {argument}")
        if not cached and value is not None:
            raise BadInput(f"{argument} given, but the stage's plan has {target}={getattr(self.plan, target)!r} "
                           "(build the objective with plan=TeacherPlan(..., 'cached') to use cached targets)")

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
