"""Stage-2 teacher targets computed once: the teacher's image scores (T = 0.5) per image, unflipped and flipped.

Why this is exact: the frozen teacher is deterministic (eval mode, no dropout) and its input for an image
depends only on the image and on whether the student's view of it is flipped: the teacher always sees the
image warped to its own scale with the cached proposals. The student's other augmentation (its own warp) never
reaches the teacher. So the targets of every (image, flip) pair can be computed before training, instead of
one teacher forward pass per student iteration; stage 1 (region features) still runs the teacher on the fly.

The cache is ``RUN/teacher_targets.pt``, keyed by a fingerprint of the teacher checkpoint file, its scale, the
dataset identity and the proposals; a run resumed with the same inputs reuses it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mlkd.data.base import MultiLabelDataset, collate
from mlkd.data.loader import KeepTopProposals, make_loader
from mlkd.data.transforms import Compose, RandomHorizontalFlip, Warp
from mlkd.distill import teacher_image_probs
from mlkd.distributed import DistInfo, barrier
from mlkd.teacher import teacher_inputs


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


@torch.no_grad()
def compute_teacher_targets(teacher: torch.nn.Module, ckpt: dict[str, Any], teacher_path: str,
                            dataset: MultiLabelDataset, scale: int, out: Path, info: DistInfo,
                            max_proposals: int | None = None, progress: bool = True) -> TeacherTargets:
    """Load the cached targets if their fingerprint matches, else compute them (rank 0) and save them."""
    path = out / "teacher_targets.pt"
    key = _fingerprint(teacher_path, scale, dataset, max_proposals)
    saved = torch.load(path, weights_only=True) if info.is_main and path.is_file() else None
    if info.is_main and (saved is None or saved["key"] != key):
        if dataset.proposals is None:
            raise ValueError("soft targets need the training split's proposals: set data.train_proposals")
        teacher.eval()
        convention = ckpt["input_convention"]
        keep = [KeepTopProposals(max_proposals)] if max_proposals else []
        rows: dict[str, list[torch.Tensor]] = {r.image_id: [] for r in dataset.records}
        previous = dataset.transform
        for flipped in (False, True):
            dataset.transform = Compose(keep + [RandomHorizontalFlip(float(flipped)), Warp(scale)])
            loader = make_loader(dataset, 1, 0, collate, train=False)
            for images, targets in tqdm(loader, desc=f"teacher targets{' (flipped)' if flipped else ''}",
                                        unit="img", disable=not progress):
                x = teacher_inputs(images, targets, next(teacher.parameters()).device, convention, with_labels=False)
                probs = teacher_image_probs(teacher, x["images"], x["proposals"], x["proposal_scores"])
                rows[targets[0]["image_id"]].append(probs[0].cpu())
        dataset.transform = previous
        saved = {"key": key, "probs": {k: torch.stack(v) for k, v in rows.items()}}
        torch.save(saved, path.with_name(path.name + ".tmp"))
        os.replace(path.with_name(path.name + ".tmp"), path)  # an interrupted run leaves no half-written file
    barrier(info)
    if not info.is_main:  # rank 0 may have just written the file
        saved = torch.load(path, weights_only=True)
    return TeacherTargets(saved["probs"])
