"""Batch adapters: a DataLoader batch ``(images, targets)`` as the keyword arguments of a model's forward.

Images arrive as uint8 RGB (the data contract); each model's input convention is applied here, on the device.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F

from mlkd.errors import BadInput
from mlkd.models.backbones import normalize


class SoftTargets(Protocol):
    """Cached teacher image scores: ``lookup(targets) -> Tensor[B, K]`` for a batch's targets."""

    def lookup(self, targets: list[dict[str, Any]]) -> torch.Tensor: ...


class RegionTargets(Protocol):
    """Cached teacher region features: ``lookup(targets) -> ({layer: (N', D)}, rows (N',))`` for a batch."""

    def lookup(self, targets: list[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]: ...


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
    """The teacher's forward arguments: ``images``, ``proposals``, ``proposal_scores`` (and ``labels``)."""
    if isinstance(images, list):  # normalise before padding, so the padding is the mean colour
        x = stack_images([normalize(im[None].to(device), convention)[0] for im in images])
    else:
        x = normalize(images.to(device, non_blocking=True), convention)
    if any("proposals" not in t for t in targets):
        raise BadInput("the dataset has no proposals: attach a cache (data.train_proposals / --proposals)")
    empty = [t["image_id"] for t in targets if len(t["proposals"]) == 0]
    if empty:
        raise BadInput(f"image(s) {empty} have no proposal; the teacher needs at least one region per image (drop "
                       "them from the dataset or regenerate their proposals)")
    out = {"images": x, "proposals": [t["proposals"].to(device) for t in targets],
           "proposal_scores": [t["proposal_scores"].to(device) for t in targets]}
    if with_labels:
        out["labels"] = torch.stack([t["labels"] for t in targets]).to(device)
    return out


def student_inputs(images: torch.Tensor, targets: list[dict[str, Any]], device: torch.device, convention: str,
                   teacher_convention: str | None = None, soft: SoftTargets | None = None,
                   regions: RegionTargets | None = None) -> dict[str, Any]:
    """The forward arguments of a (distilling) student: ``images``, ``labels``; with teacher views in the
    targets also ``teacher_images``, ``proposals``, ``proposal_scores``, ``student_proposals``; with ``soft``
    the cached ``teacher_probs``, with ``regions`` the cached ``teacher_features``."""
    out: dict[str, Any] = {"images": normalize(images.to(device), convention),
                           "labels": torch.stack([t["labels"] for t in targets]).to(device)}
    if "teacher_image" in targets[0]:
        out["teacher_images"] = normalize(torch.stack([t["teacher_image"] for t in targets]).to(device),
                                          teacher_convention)
    if "student_proposals" in targets[0]:
        out["proposals"] = [t["proposals"].to(device) for t in targets]
        out["proposal_scores"] = [t["proposal_scores"].to(device) for t in targets]
        out["student_proposals"] = [t["student_proposals"].to(device) for t in targets]
    if soft is not None:
        out["teacher_probs"] = soft.lookup(targets).to(device)
    if regions is not None:
        features, rows = regions.lookup(targets)
        out["teacher_features"] = ({k: v.to(device) for k, v in features.items()}, rows.to(device))
    return out
