"""The batch adapter of a (distilling) student: a DataLoader batch ``(images, targets)`` as the keyword arguments
of :meth:`mlkd.distill.objective.StudentObjective.forward`, with the cached teacher targets the stage's
:class:`~mlkd.distill.config.TeacherPlan` reads.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from mlkd.distill.config import TeacherPlan
from mlkd.errors import BadInput
from mlkd.models.backbones import normalize


class SoftTargets(Protocol):
    """Cached teacher image scores: ``lookup(targets) -> Tensor[B, K]`` for a batch's targets."""

    def lookup(self, targets: list[dict[str, Any]]) -> torch.Tensor: ...


class RegionTargets(Protocol):
    """Cached teacher region features: ``lookup(targets) -> ({layer: (N', D)}, rows (N',))`` for a batch."""

    def lookup(self, targets: list[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]: ...


def student_inputs(images: torch.Tensor, targets: list[dict[str, Any]], device: torch.device, convention: str,
                   teacher_convention: str | None = None, plan: TeacherPlan = TeacherPlan(),
                   soft: SoftTargets | None = None, regions: RegionTargets | None = None) -> dict[str, Any]:
    """The forward arguments of a student: ``images``, ``labels``; with teacher views in the targets also
    ``teacher_images``, ``proposals``, ``proposal_scores``, ``student_proposals``; where ``plan`` reads a cache,
    ``teacher_probs`` from ``soft`` and ``teacher_features`` from ``regions``."""
    out: dict[str, Any] = {"images": normalize(images.to(device), convention),
                           "labels": torch.stack([t["labels"] for t in targets]).to(device)}
    if "teacher_image" in targets[0]:
        out["teacher_images"] = normalize(torch.stack([t["teacher_image"] for t in targets]).to(device),
                                          teacher_convention)
    if "student_proposals" in targets[0]:
        out["proposals"] = [t["proposals"].to(device) for t in targets]
        out["proposal_scores"] = [t["proposal_scores"].to(device) for t in targets]
        out["student_proposals"] = [t["student_proposals"].to(device) for t in targets]
    if plan.soft == "cached":
        out["teacher_probs"] = _cache(soft, "soft").lookup(targets).to(device)
    if plan.features == "cached":
        features, rows = _cache(regions, "features").lookup(targets)
        out["teacher_features"] = ({k: v.to(device) for k, v in features.items()}, rows.to(device))
    return out


def _cache(cache: Any, target: str) -> Any:
    if cache is None:
        raise BadInput(f"the stage reads the teacher's {target} targets from a cache, but none was given")
    return cache
