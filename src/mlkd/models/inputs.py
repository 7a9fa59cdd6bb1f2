"""Batch adapters: a DataLoader batch ``(images, targets)`` as the keyword arguments of a model's forward.

Images arrive as uint8 RGB (the data contract); each model's input convention is applied here, on the device.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mlkd.errors import BadInput
from mlkd.models.backbones import normalize


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
