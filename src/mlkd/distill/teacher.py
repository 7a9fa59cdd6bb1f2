"""The frozen teacher's outputs that distillation learns from: its image scores at temperature T (L_p') and its
region features (L_f), in one forward of the teacher.

A refined (OICR) teacher gives the image scores its ``model.image_scores`` names (WSDDN's by default) and its
fc7 features, the layer both its WSDDN streams and its refinement streams read; ``top_k`` ranks regions by
the refined region scores.

The teacher is frozen: it stays in eval mode (no dropout), its parameters have ``requires_grad=False``, its
outputs are computed under ``torch.no_grad()`` and nothing ever steps its weights.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from mlkd.errors import BadInput
from mlkd.models.ops import flatten_proposals
from mlkd.models.wsddn import WSDDN

TEACHER_TEMPERATURE = 0.5  # the release multiplies both streams' logits by 2 for the soft targets
TEACHER_CHUNK = 4  # images per teacher forward on the fly: its activations at 672-832 px bound the peak memory


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

@torch.no_grad()
def teacher_outputs(teacher: WSDDN, images: Tensor, proposals: Sequence[Tensor], scores: Sequence[Tensor] | None,
                    soft: bool = True, layers: Sequence[str] | None = None, top_k: int | None = None,
                    temperature: float = TEACHER_TEMPERATURE, chunk: int = TEACHER_CHUNK
                    ) -> tuple[Tensor | None, dict[str, Tensor] | None, Tensor | None]:
    """The frozen teacher on a batch, giving what distillation needs of it:

    - with ``soft``: its image scores ``(B, K)`` with both streams' logits divided by ``temperature``;
    - with ``layers``: its region features ``{layer: (N', D)}`` and their rows among the batch's flattened
      proposals (None: all of them; with ``top_k``, each image's ``top_k`` regions by objectness s').

    The images run ``chunk`` at a time: every output is per image (the teacher is in eval mode, VGG16 and the C4
    head have no batch statistics), so the values are those of one forward, while the peak memory is a chunk's
    (a VGG16 teacher at 672 px keeps ~0.5 GB of activations per image: a student batch of 32 on the fly would
    need 16 GB at once)."""
    if len(proposals) <= chunk:
        return _teacher_outputs(teacher, images, proposals, scores, soft, layers, top_k, temperature)
    parts, offset = [], 0
    for start in range(0, len(proposals), chunk):
        end = min(start + chunk, len(proposals))
        probs, feats, keep = _teacher_outputs(teacher, images[start:end], proposals[start:end],
                                              None if scores is None else scores[start:end], soft, layers, top_k,
                                              temperature)
        parts.append((probs, feats, None if keep is None else keep + offset))
        offset += sum(int(b.shape[0]) for b in proposals[start:end])
    probs = torch.cat([p for p, _, _ in parts]) if soft else None
    feats = {k: torch.cat([f[k] for _, f, _ in parts]) for k in layers} if layers else None
    keep = torch.cat([k for _, _, k in parts]) if layers and top_k is not None else None
    return probs, feats, keep


def _teacher_outputs(teacher: WSDDN, images: Tensor, proposals: Sequence[Tensor], scores: Sequence[Tensor] | None,
                     soft: bool, layers: Sequence[str] | None, top_k: int | None, temperature: float
                     ) -> tuple[Tensor | None, dict[str, Tensor] | None, Tensor | None]:
    boxes, flat_scores, index = flatten_proposals(proposals, scores)
    target = teacher.region_layers(teacher.backbone(images), boxes, flat_scores, index)
    logits = teacher.stream_logits(teacher.drop(target["fc7"]))  # once, for the soft targets and the top regions
    probs = feats = keep = None
    if soft:  # the image scores the teacher classifies with (WSDDN's p, or a refined teacher's choice), softened
        probs = teacher.scores_of(logits, index, len(proposals), temperature)[1].clamp(0.0, 1.0)
    if layers:
        feats = {k: target[k] for k in layers}
        if top_k is not None:  # by objectness s' = sum_k of the region scores (a refined teacher's: its streams')
            regions, _ = teacher.scores_of(logits, index, len(proposals))
            keep = top_regions(regions.sum(1), index, len(proposals), top_k)
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
