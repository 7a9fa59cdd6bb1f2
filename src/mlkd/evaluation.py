"""Evaluating the teacher: classification metrics of its image scores, VOC detection AP and CorLoc of its
region scores (DESIGN.md §3).

Test-time views: one pass at ``scale`` (the release: 672, no flip) by default; with several ``scales`` and/or
``flip`` the region scores of all views are averaged per proposal (a flip keeps the proposals' order), and the
image scores are the sums of the averaged region scores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torchvision.ops import batched_nms
from tqdm import tqdm

from mlkd.checkpoint import load_checkpoint
from mlkd.data.base import MultiLabelDataset, check_class_order, collate
from mlkd.data.loader import KeepTopProposals, make_loader, open_split
from mlkd.data.transforms import Compose, RandomHorizontalFlip, Warp
from mlkd.metrics import corloc, detection_ap, evaluate_all, report_to_json
from mlkd.models.wsddn import WSDDN

NMS_IOU = 0.4  # per-class NMS on region scores before detection AP (WSDDN's evaluation)


@torch.no_grad()
def predict_teacher(model: WSDDN, dataset: MultiLabelDataset, convention: str, device: torch.device,
                    scales: Sequence[int] = (672,), flip: bool = False, max_proposals: int | None = None,
                    workers: int = 0, progress: bool = True) -> dict[str, Any]:
    """Teacher outputs for every image of ``dataset`` (which must have proposals attached).

    Returns ``image_ids``; ``image_scores`` ``(N, K)`` float32; per image ``region_scores`` ``(R_i, K)`` and
    ``proposals`` ``(R_i, 4)`` in pixels of the image file (x1, y1, x2, y2).
    """
    from mlkd.teacher import teacher_inputs

    model.eval()
    views = [(s, f) for s in scales for f in ((False, True) if flip else (False,))]
    sums: list[torch.Tensor] = [None] * len(dataset)  # type: ignore[list-item]
    keep = [KeepTopProposals(max_proposals)] if max_proposals else []
    for scale, flipped in views:
        dataset.transform = Compose(keep + ([RandomHorizontalFlip(1.0)] if flipped else []) + [Warp(scale)])
        loader = make_loader(dataset, 1, workers, collate, train=False)
        desc = f"teacher @{scale}{' flip' if flipped else ''}"
        for i, (images, targets) in enumerate(tqdm(loader, desc=desc, unit="img", disable=not progress)):
            out = model(**teacher_inputs(images, targets, device, convention, with_labels=False))[0]
            r = out["region_scores"].float().cpu()
            sums[i] = r if sums[i] is None else sums[i] + r
    dataset.transform = None
    regions = [s / len(views) for s in sums]
    proposals = [dataset.proposals.get(r.image_id)[0][: max_proposals or None] for r in dataset.records]
    return {"image_ids": [r.image_id for r in dataset.records],
            "image_scores": torch.stack([r.sum(0) for r in regions]).numpy() if regions else np.zeros((0, 0)),
            "region_scores": [r.numpy() for r in regions], "proposals": proposals}


def class_detections(proposals: np.ndarray, regions: np.ndarray, nms_iou: float = NMS_IOU,
                     max_per_class: int = 100) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Detections of one image: every (proposal, class) scored by ``regions`` ``(R, K)``, per-class NMS, the
    best ``max_per_class`` of each class kept. Returns boxes ``(D, 4)``, scores ``(D,)``, labels ``(D,)``."""
    r, k = regions.shape
    boxes = torch.from_numpy(np.repeat(proposals[None], k, 0).reshape(-1, 4))  # (K * R, 4), class-major
    scores = torch.from_numpy(np.ascontiguousarray(regions.T).reshape(-1))
    labels = torch.arange(k).repeat_interleave(r)
    kept = batched_nms(boxes, scores, labels, nms_iou)  # sorted by score
    per_class_rank = _rank_within(labels[kept])
    kept = kept[per_class_rank < max_per_class]
    return boxes[kept].numpy(), scores[kept].numpy(), labels[kept].numpy()


def _rank_within(labels: torch.Tensor) -> torch.Tensor:
    """Position of each entry among the earlier entries of the same label (0 for the first of each label)."""
    order = torch.argsort(labels, stable=True)
    sorted_labels = labels[order]
    starts = torch.searchsorted(sorted_labels, sorted_labels, right=False)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(labels)) - starts
    return rank


def top_boxes(proposals: Sequence[np.ndarray], regions: Sequence[np.ndarray]) -> np.ndarray:
    """The best proposal of every class in every image: ``(N, K, 4)`` (CorLoc's input)."""
    return np.stack([p[r.argmax(0)] for p, r in zip(proposals, regions)])


def largest_proposal_corloc(dataset: MultiLabelDataset, proposals: Sequence[np.ndarray]) -> dict[str, Any]:
    """CorLoc of the baseline that answers every class with the image's largest proposal."""
    tops = []
    for p in proposals:
        big = p[np.argmax((p[:, 2] - p[:, 0]) * (p[:, 3] - p[:, 1]))] if len(p) else np.zeros(4, np.float32)
        tops.append(np.tile(big, (dataset.num_classes, 1)))
    return corloc(np.stack(tops), dataset.label_matrix(), [r.boxes for r in dataset.records],
                  [r.box_labels for r in dataset.records], class_names=dataset.classes)


def teacher_report(dataset: MultiLabelDataset, pred: dict[str, Any], detection: bool = True) -> dict[str, Any]:
    """Every metric of the teacher's predictions ``pred`` (from :func:`predict_teacher`) on ``dataset``."""
    labels = dataset.label_matrix()
    report: dict[str, Any] = {"dataset": dataset.identity.to_dict(),
                              "classification": evaluate_all(pred["image_scores"], labels, dataset.classes)}
    has_boxes = bool(dataset.records) and all(r.boxes is not None for r in dataset.records)
    if detection and has_boxes:
        dets = [class_detections(p, r) for p, r in zip(pred["proposals"], pred["region_scores"])]
        difficult = [r.box_difficult if r.box_difficult is not None else np.zeros(len(r.boxes), bool)
                     for r in dataset.records]
        report["detection"] = detection_ap([d[0] for d in dets], [d[1] for d in dets], [d[2] for d in dets],
                                           [r.boxes for r in dataset.records], [r.box_labels for r in dataset.records],
                                           difficult, dataset.num_classes, iou=0.5, use_07=True,
                                           class_names=dataset.classes)
        report["corloc"] = corloc(top_boxes(pred["proposals"], pred["region_scores"]), labels,
                                  [r.boxes for r in dataset.records], [r.box_labels for r in dataset.records],
                                  class_names=dataset.classes)
        report["corloc_largest_proposal"] = largest_proposal_corloc(dataset, pred["proposals"])
    return report


def evaluate_teacher_model(model: WSDDN, spec: str, proposals: str | None, classes: Sequence[str], convention: str,
                           scale: int = 672, scales: Sequence[int] | None = None, flip: bool = False,
                           options: dict[str, Any] | None = None, device: torch.device = torch.device("cpu"),
                           max_proposals: int | None = None, workers: int = 0, detection: bool = True,
                           progress: bool = True) -> dict[str, Any]:
    """Open ``spec`` with its proposal cache, check its class order against ``classes``, predict and score."""
    dataset = open_split(spec, options, proposals)
    check_class_order(classes, dataset.classes, f"dataset {spec}")
    if dataset.proposals is None:
        raise ValueError(f"dataset {spec} has no proposals: give its proposal cache (--proposals)")
    views = tuple(scales) if scales else (scale,)
    pred = predict_teacher(model, dataset, convention, device, views, flip, max_proposals, workers, progress)
    report = teacher_report(dataset, pred, detection)
    report["settings"] = {"scales": list(views), "flip": flip, "max_proposals": max_proposals, "nms_iou": NMS_IOU,
                          "input_convention": convention}
    return report


def evaluate_teacher(checkpoint: str, spec: str, proposals: str | None, out: str | None = None, **kwargs: Any
                     ) -> dict[str, Any]:
    """``mlkd evaluate-teacher``: the checkpoint's teacher on a dataset; the JSON report is written to ``out``."""
    from mlkd.teacher import teacher_from_checkpoint

    ckpt = load_checkpoint(checkpoint, "teacher")
    model = teacher_from_checkpoint(ckpt).to(kwargs.get("device", torch.device("cpu")))
    kwargs.setdefault("max_proposals", ckpt["config"]["data"]["max_proposals"])
    kwargs.setdefault("scale", ckpt["config"]["data"]["test_scale"])
    report = evaluate_teacher_model(model, spec, proposals, ckpt["classes"], ckpt["input_convention"], **kwargs)
    report["checkpoint"] = str(checkpoint)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(report_to_json(report) + "\n")
    return report


def summary_line(report: dict[str, Any]) -> str:
    """mAP, CF1, OF1 (+ detection AP and CorLoc when present), in %."""
    c = report["classification"]
    parts = [f"mAP {100 * c['mAP']['mlic']:.2f}", f"CF1 {100 * c['all_labels']['CF1']:.2f}",
             f"OF1 {100 * c['all_labels']['OF1']:.2f}"]
    if "detection" in report:
        parts += [f"detAP@0.5 {100 * report['detection']['mAP']:.2f}", f"CorLoc {100 * report['corloc']['corloc']:.2f}",
                  f"(largest-proposal CorLoc {100 * report['corloc_largest_proposal']['corloc']:.2f})"]
    return ", ".join(parts)



# ----------------------------------------------------------------------------------------------- student
@torch.no_grad()
def predict_student(model: torch.nn.Module, dataset: MultiLabelDataset, convention: str, image_size: int,
                    device: torch.device, workers: int = 0, batch_size: int = 32, progress: bool = True) -> np.ndarray:
    """Sigmoid probabilities ``(N, K)`` float32 of the student on every image (warped to ``image_size``)."""
    from mlkd.models.backbones import normalize

    model.eval()
    dataset.transform = Warp(image_size)
    loader = make_loader(dataset, batch_size, workers, collate, train=False)
    scores = [torch.sigmoid(model(normalize(images.to(device), convention)).float()).cpu()
              for images, _ in tqdm(loader, desc="student", unit="batch", disable=not progress)]
    dataset.transform = None
    return torch.cat(scores).numpy() if scores else np.zeros((0, dataset.num_classes), np.float32)


def evaluate_student_model(model: torch.nn.Module, spec: str, classes: Sequence[str], convention: str,
                           image_size: int, options: dict[str, Any] | None = None,
                           device: torch.device = torch.device("cpu"), workers: int = 0,
                           progress: bool = True) -> dict[str, Any]:
    """Every classification metric of the student on the dataset ``spec`` (class order checked)."""
    dataset = open_split(spec, options)
    check_class_order(classes, dataset.classes, f"dataset {spec}")
    scores = predict_student(model, dataset, convention, image_size, device, workers, progress=progress)
    return {"dataset": dataset.identity.to_dict(), "classification": evaluate_all(scores, dataset.label_matrix(),
                                                                                  dataset.classes),
            "scores": scores}


def evaluate_student(checkpoint: str, spec: str, out: str | None = None, options: dict[str, Any] | None = None,
                     device: torch.device = torch.device("cpu"), workers: int = 0, progress: bool = True,
                     scores_out: str | None = None) -> dict[str, Any]:
    """``mlkd evaluate``: a student checkpoint on a dataset; JSON report to ``out``, scores to ``scores_out``."""
    from mlkd.student import student_from_checkpoint

    ckpt = load_checkpoint(checkpoint, "student")
    model = student_from_checkpoint(ckpt).to(device)
    report = evaluate_student_model(model, spec, ckpt["classes"], ckpt["input_convention"],
                                    ckpt["config"]["model"]["image_size"], options, device, workers, progress)
    scores = report.pop("scores")
    report["checkpoint"] = str(checkpoint)
    if scores_out:
        np.save(scores_out, scores)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(report_to_json(report) + "\n")
    return report
