"""Evaluation of trained models on a dataset, every protocol named (see docs/evaluation.md):

- the teacher: classification metrics of its image scores; VOC detection AP at IoU 0.5 (``voc07`` unless
  another AP mode is asked for; the report names it in ``ap_variant``) and CorLoc of its
  region scores (with the largest-proposal baseline); test-time views as in :func:`mlkd.inference.predict.predict_teacher`;
- the student: classification metrics of its probabilities;
- the teacher's figures (:func:`visualize_teacher`): its top proposals and detections on the first images;
- with ``plots``, a folder of charts, galleries and an ``index.html`` (:mod:`mlkd.evaluation.page`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from mlkd.data.base import MultiLabelDataset, check_class_order, read_image
from mlkd.errors import BadInput
from mlkd.evaluation.figures import detections_figure, save_rgb, teacher_figure
from mlkd.evaluation.page import check_plots_folder, write_plots
from mlkd.inference.predict import predict_student, predict_teacher
from mlkd.inference.runtime import StudentRuntime
from mlkd.metrics import corloc, detection_ap, evaluate_all, report_to_json
from mlkd.models.build import model_from_checkpoint
from mlkd.models.wsddn import NMS_IOU, WSDDN, class_detections, top_boxes
from mlkd.proposals.attach import open_split, require_proposals
from mlkd.utils.checkpoint import load_checkpoint, write_atomically


def largest_proposal_corloc(dataset: MultiLabelDataset, proposals: Sequence[np.ndarray]) -> dict[str, Any]:
    """CorLoc of the baseline that answers every class with the image's largest proposal."""
    tops = []
    for p in proposals:
        big = p[np.argmax((p[:, 2] - p[:, 0]) * (p[:, 3] - p[:, 1]))] if len(p) else np.zeros(4, np.float32)
        tops.append(np.tile(big, (dataset.num_classes, 1)))
    return corloc(np.stack(tops), dataset.label_matrix(), [r.boxes for r in dataset.records],
                  [r.box_labels for r in dataset.records], class_names=dataset.classes)


def teacher_report(dataset: MultiLabelDataset, pred: dict[str, Any], detection: bool = True,
                   detection_mode: str = "voc07") -> dict[str, Any]:
    """Every metric of the teacher's predictions ``pred`` (from :func:`predict_teacher`) on ``dataset``; detection
    AP in the AP mode ``detection_mode`` (e.g. ``voc07_devkit`` for the number VOC 2007 papers publish)."""
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
                                           difficult, dataset.num_classes, iou=0.5, mode=detection_mode,
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
                           progress: bool = True, checkpoint: str | None = None,
                           plots: str | Path | None = None, detection_mode: str = "voc07") -> dict[str, Any]:
    """Open ``spec`` with its proposal cache, check its class order against ``classes``, predict and score
    (detection AP in ``detection_mode``); ``checkpoint`` is recorded in the report; with ``plots`` the charts and
    ``index.html`` go to that folder."""
    dataset = open_split(spec, options, proposals)
    check_class_order(classes, dataset.classes, f"dataset {spec}")
    require_proposals(dataset, "evaluating the teacher (--proposals)")
    views = tuple(scales) if scales else (scale,)
    pred = predict_teacher(model, dataset, convention, device, views, flip, max_proposals, workers, progress)
    report = teacher_report(dataset, pred, detection, detection_mode)
    report["settings"] = {"scales": list(views), "flip": flip, "max_proposals": max_proposals, "nms_iou": NMS_IOU,
                          "input_convention": convention}
    if checkpoint:
        report["checkpoint"] = checkpoint
    if plots:
        write_plots(plots, "teacher", report, pred["image_scores"], dataset.label_matrix(), pred["image_ids"],
                    [r.path for r in dataset.records], pred["proposals"], pred["region_scores"])
    return report


def evaluate_teacher(checkpoint: str, spec: str, proposals: str | None, out: str | None = None, **kwargs: Any
                     ) -> dict[str, Any]:
    """A teacher checkpoint on a dataset (``mlkd evaluate-teacher``); the JSON report is also written to ``out``,
    the plots to the folder ``plots`` (a keyword argument). Scale and proposal budget default to the checkpoint's."""
    _check_output(out, "report")
    check_plots_folder(kwargs.get("plots"))
    ckpt = load_checkpoint(checkpoint, "teacher")
    model = model_from_checkpoint(ckpt).to(kwargs.get("device", torch.device("cpu")))
    kwargs.setdefault("max_proposals", ckpt["inference"]["max_proposals"])
    kwargs.setdefault("scale", ckpt["inference"]["image_size"])
    report = evaluate_teacher_model(model, spec, proposals, ckpt["classes"], ckpt["input_convention"],
                                    checkpoint=str(checkpoint), **kwargs)
    _write_report(report, out)
    return report


def summary_line(report: dict[str, Any]) -> str:
    """mAP, CF1, OF1 (+ detection AP and CorLoc when present), in %, each AP with the name of its variant."""
    c = report["classification"]
    parts = [f"mAP[mlic] {100 * c['mAP']['mlic']:.2f}", f"CF1 {100 * c['all_labels']['CF1']:.2f}",
             f"OF1 {100 * c['all_labels']['OF1']:.2f}"]
    if "detection" in report:
        parts += [f"detAP@0.5[{report['detection']['ap_variant']}] {100 * report['detection']['mAP']:.2f}",
                  f"CorLoc {100 * report['corloc']['corloc']:.2f} (largest-proposal baseline "
                  f"{100 * report['corloc_largest_proposal']['corloc']:.2f})"]
    return ", ".join(parts)


def evaluate_student_model(model: torch.nn.Module, spec: str, classes: Sequence[str], convention: str,
                           image_size: int, options: dict[str, Any] | None = None,
                           device: torch.device = torch.device("cpu"), workers: int = 0,
                           progress: bool = True, checkpoint: str | None = None,
                           plots: str | Path | None = None) -> dict[str, Any]:
    """Every classification metric of the student on the dataset ``spec`` (class order checked); the
    probabilities ``(N, K)`` are in ``report["scores"]``. ``checkpoint`` is recorded in the report; with
    ``plots`` the charts and ``index.html`` go to that folder."""
    dataset = open_split(spec, options)
    check_class_order(classes, dataset.classes, f"dataset {spec}")
    scores = predict_student(model, dataset, convention, image_size, device, workers, progress=progress)
    labels = dataset.label_matrix()
    report = {"dataset": dataset.identity.to_dict(), "classification": evaluate_all(scores, labels, dataset.classes)}
    if checkpoint:
        report["checkpoint"] = checkpoint
    if plots:
        write_plots(plots, "student", report, scores, labels, [r.image_id for r in dataset.records],
                    [r.path for r in dataset.records])
    return report | {"scores": scores}


def evaluate_student(checkpoint: str, spec: str, out: str | None = None, options: dict[str, Any] | None = None,
                     device: torch.device = torch.device("cpu"), workers: int = 0, progress: bool = True,
                     scores_out: str | None = None, plots: str | Path | None = None, precision: str = "fp32",
                     calibration: str | None = None) -> dict[str, Any]:
    """A student checkpoint on a dataset (``mlkd evaluate``); JSON report to ``out``, scores to ``scores_out``,
    charts, galleries and ``index.html`` to the folder ``plots``. The student runs in ``precision``
    (:mod:`mlkd.inference.runtime`; int8 calibrates on ``calibration``, default the checkpoint's training set)."""
    _check_output(out, "report")
    _check_output(scores_out, "scores")
    check_plots_folder(plots)
    ckpt = load_checkpoint(checkpoint, "student")
    runtime = StudentRuntime.from_checkpoint(ckpt, precision, device, calibration)
    report = evaluate_student_model(runtime, spec, ckpt["classes"], ckpt["input_convention"],
                                    ckpt["inference"]["image_size"], options, device, workers, progress,
                                    str(checkpoint), plots)
    report["precision"] = precision
    scores = report.pop("scores")
    if scores_out:  # through a file object: np.save would append ".npy" to a path that lacks it
        write_atomically(scores_out, lambda f: np.save(f, scores), "scores")
    _write_report(report, out)
    return report


def _check_output(path: str | Path | None, what: str) -> None:
    """Refuse an output path that is a folder before the evaluation runs, not after (nothing could be written)."""
    if path and Path(path).is_dir():
        example = Path(path) / {"report": "report.json", "scores": "scores.npy"}[what]
        raise BadInput(f"the {what} file {path} is a folder; give a file path, e.g. {example}")


def _write_report(report: dict[str, Any], out: str | Path | None) -> None:
    if out:
        text = report_to_json(report) + "\n"
        write_atomically(out, lambda f: f.write(text.encode()), "report")


def visualize_teacher(checkpoint: str, spec: str, proposals: str | None, out: str | Path, num_images: int = 8,
                      options: dict[str, Any] | None = None, device: torch.device = torch.device("cpu"),
                      top_proposals: int = 10, per_class: bool = False, progress: bool = True) -> list[Path]:
    """Teacher figures (and per-class detection figures) of the first ``num_images`` images of a dataset
    (``mlkd visualize-teacher``); returns the PNG paths."""
    ckpt = load_checkpoint(checkpoint, "teacher")
    dataset = open_split(spec, options, proposals)
    check_class_order(ckpt["classes"], dataset.classes, f"dataset {spec}")
    require_proposals(dataset, "drawing the teacher's figures (--proposals)")
    first = dataset.view(indices=range(min(num_images, len(dataset))))
    model = model_from_checkpoint(ckpt).to(device)
    pred = predict_teacher(model, first, ckpt["input_convention"], device, (ckpt["inference"]["image_size"],),
                           max_proposals=ckpt["inference"]["max_proposals"], progress=progress)
    paths = []
    for i, r in enumerate(tqdm(first.records, desc="figures", unit="img", disable=not progress)):
        image, stem = read_image(r.path), Path(r.image_id).stem
        fig = teacher_figure(image, pred["proposals"][i], pred["region_scores"][i], pred["image_scores"][i],
                             dataset.classes, r.labels, top_proposals)
        paths.append(save_rgb(Path(out) / f"{i:03d}_{stem}_teacher.png", fig))
        if per_class:
            boxes, scores, cls = class_detections(pred["proposals"][i], pred["region_scores"][i], max_per_class=1)
            fig = detections_figure(image, boxes, scores, cls, dataset.classes, r.labels)
            paths.append(save_rgb(Path(out) / f"{i:03d}_{stem}_detections.png", fig))
    return paths
