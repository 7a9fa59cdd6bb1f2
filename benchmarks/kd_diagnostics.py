"""What a distilled student looks like inside: the measurements behind the choice of mlkd's default recipe.

For a teacher and a student checkpoint (e.g. a run's ``stage0_feature.pt``, the student after stage 1), on some
training images with their proposals and on the held-out images:

- region features (fc7) of the teacher and of the student on the same proposals: norm per region, fraction of
  zeros, and L_f per region (what stage 1 minimises);
- the student's image path on held-out images: fc6 / fc7 units that are zero on every image ("dead"), the
  features' norm, the logits' spread across images, the label loss against the loss of the class prior;
- the teacher's stage-2 targets (T = 0.5): their mean and how many are near 0 or 1.

    python benchmarks/kd_diagnostics.py --teacher runs/demo/seed0/teacher/last.pt \\
        --student runs/demo/seed0/student_kd/stage0_feature.pt --data runs/demo --json out.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mlkd.data.base import collate
from mlkd.data.loader import make_loader
from mlkd.data.transforms import Compose, KeepTopProposals, TeacherStudentViews
from mlkd.distill.teacher import teacher_image_probs
from mlkd.models.backbones import normalize
from mlkd.models.build import model_from_checkpoint
from mlkd.models.ops import flatten_proposals
from mlkd.models.student import label_loss
from mlkd.proposals.attach import open_split
from mlkd.utils.checkpoint import load_checkpoint


def stats(x: torch.Tensor) -> dict[str, float]:
    """Norm per row, fraction of zeros, mean of a (N, D) feature matrix."""
    return {"norm": float(x.norm(dim=1).mean()), "zeros": float((x == 0).float().mean()), "mean": float(x.mean())}


@torch.no_grad()
def region_features(teacher, student, t_ckpt, s_ckpt, data: Path, images: int, max_proposals: int) -> dict:
    scale, size = t_ckpt["inference"]["image_size"], s_ckpt["inference"]["image_size"]
    ds = open_split(str(data / "data" / "train.jsonl"), proposals=str(data / "proposals" / "train"))
    view = ds.view(transform=Compose([KeepTopProposals(max_proposals), TeacherStudentViews(scale, size, 0.0)]),
                   indices=range(min(images, len(ds))))
    t_feats, s_feats = [], []
    for imgs, targets in make_loader(view, 4, 0, collate, train=False):
        t_img = normalize(torch.stack([t["teacher_image"] for t in targets]), t_ckpt["input_convention"])
        boxes, scores, index = flatten_proposals([t["proposals"] for t in targets],
                                                 [t["proposal_scores"] for t in targets])
        t_feats.append(teacher.region_layers(teacher.backbone(t_img), boxes, scores, index)["fc7"])
        s_boxes, _, s_index = flatten_proposals([t["student_proposals"] for t in targets], None)
        fmap = student.backbone(normalize(imgs, s_ckpt["input_convention"]))
        s_feats.append(student.forward_regions(fmap, s_boxes, s_index, ("fc7",))["fc7"])
    t, s = torch.cat(t_feats), torch.cat(s_feats)
    return {"teacher_fc7": stats(t), "student_fc7": stats(s), "L_f": float((t - s).pow(2).sum() / (2 * len(t)))}


@torch.no_grad()
def image_path(student, s_ckpt, teacher, t_ckpt, data: Path) -> dict:
    """The student's image path and the teacher's soft targets on the held-out images."""
    ds = open_split(str(data / "data" / "val.jsonl"), proposals=str(data / "proposals" / "val"))
    size, scale = s_ckpt["inference"]["image_size"], t_ckpt["inference"]["image_size"]
    view = ds.view(transform=Compose([KeepTopProposals(t_ckpt["inference"]["max_proposals"] or 200),
                                      TeacherStudentViews(scale, size, 0.0)]))
    h6s, h7s, logits, labels, soft = [], [], [], [], []
    for imgs, targets in make_loader(view, 16, 0, collate, train=False):
        fmap = student.backbone(normalize(imgs, s_ckpt["input_convention"]))
        x = F.adaptive_avg_pool2d(student.pool5(fmap), student.roi_size).flatten(1)
        h6 = F.relu(student.fc6(x))
        h7 = F.relu(student.fc7(h6))
        h6s.append(h6), h7s.append(h7), logits.append(student.fc8(h7))
        labels.append(torch.stack([t["labels"] for t in targets]))
        t_img = normalize(torch.stack([t["teacher_image"] for t in targets]), t_ckpt["input_convention"])
        soft.append(teacher_image_probs(teacher, t_img, [t["proposals"] for t in targets],
                                        [t["proposal_scores"] for t in targets]))
    h6, h7, z, y, p = (torch.cat(v) for v in (h6s, h7s, logits, labels, soft))
    prior = y.clamp(min=0).mean(0, keepdim=True).clamp(1e-4, 1 - 1e-4).expand_as(y)
    return {"fc6_dead_units": float((h6.max(0).values == 0).float().mean()),
            "fc7_dead_units": float((h7.max(0).values == 0).float().mean()),
            "fc6": stats(h6), "fc7": stats(h7),
            "logit_std_over_images": float(z.std(0).mean()), "logit_mean": float(z.mean()),
            "label_loss": float(label_loss(z, y)), "prior_loss": float(label_loss(torch.logit(prior), y)),
            "soft_targets": {"mean": float(p.mean()), "near_0": float((p < 0.05).float().mean()),
                             "near_1": float((p > 0.95).float().mean())}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--student", required=True, help="a student checkpoint, e.g. RUN/stage0_feature.pt")
    ap.add_argument("--data", required=True, type=Path, help="a demo folder: data/ and proposals/ inside")
    ap.add_argument("--images", type=int, default=32, help="training images for the region features (32)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    t_ckpt, s_ckpt = load_checkpoint(args.teacher, "teacher"), load_checkpoint(args.student, "student")
    teacher, student = model_from_checkpoint(t_ckpt), model_from_checkpoint(s_ckpt)
    out = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "student": str(args.student),
           "regions": region_features(teacher, student, t_ckpt, s_ckpt, args.data, args.images,
                                      t_ckpt["inference"]["max_proposals"] or 200),
           "held_out": image_path(student, s_ckpt, teacher, t_ckpt, args.data)}
    if s_ckpt["train_state"] and "scale" in s_ckpt["train_state"]["extra"]:
        a = s_ckpt["train_state"]["extra"]["scale"]
        out["scale_a"] = {"mean": float(a.mean()), "min": float(a.min()), "max": float(a.max())}
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
