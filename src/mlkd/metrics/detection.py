"""Weakly-supervised detection protocols: VOC-style detection AP and CorLoc (docs/evaluation.md).

Boxes are (x1, y1, x2, y2) in continuous 0-based pixel coordinates (no devkit "+1"); IoU is
``torchvision.ops.box_iou``; a prediction matches a ground-truth box at IoU >= the threshold, as in the
official MATLAB devkit. Rankings use the same tie rule as :mod:`mlkd.metrics.classification`: tie groups
merged, except in the devkit AP modes, which rank tied detections one by one in the order of the input
(image by image, and within an image in the order given), as the devkit's stable sort of its results file.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torchvision.ops import box_iou

from mlkd.errors import BadInput
from mlkd.metrics.classification import (DEVKIT_THRESHOLDS, _ap_from_counts, _check_mode, _check_names, _excluded,
                                         _nanmean, _to_numpy, _tp_counts)

def _boxes(x: Any, name: str) -> np.ndarray:
    """Validated float64 boxes ``(M, 4)`` (x1, y1, x2, y2); an empty input gives ``(0, 4)``."""
    a = _to_numpy(x, name)
    if a.size % 4 or (a.size and a.shape[-1] != 4):
        raise BadInput(f"{name} must have shape (M, 4) as (x1, y1, x2, y2), got {a.shape}")
    b = a.astype(np.float64).reshape(-1, 4)
    if not np.isfinite(b).all():
        raise BadInput(f"{name} has non-finite coordinates")
    bad = (b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])
    if bad.any():
        raise BadInput(f"{name} must be (x1, y1, x2, y2) with x2 >= x1 and y2 >= y1, got {b[bad][0].tolist()}")
    return b


def _labels(x: Any, n: int, k: int, name: str) -> np.ndarray:
    lab = _to_numpy(x, name).reshape(-1)
    if lab.shape[0] != n:
        raise BadInput(f"{name} has {lab.shape[0]} entries for {n} boxes")
    if lab.size and not np.array_equal(lab, np.round(lab)):
        raise BadInput(f"{name} must be integer class indices, got {lab[lab != np.round(lab)][0]}")
    lab = lab.astype(np.int64)
    if ((lab < 0) | (lab >= k)).any():
        raise BadInput(f"{name} must be class indices in [0, {k}), got {lab[(lab < 0) | (lab >= k)][0]}")
    return lab


def _image_predictions(boxes: Any, scores: Any, labels: Any, k: int, i: int) -> tuple[np.ndarray, ...]:
    """Validated detections of image ``i``: boxes ``(R, 4)`` float64, scores ``(R,)`` float64, labels ``(R,)``."""
    b = _boxes(boxes, f"pred_boxes[{i}]")
    s = _to_numpy(scores, f"pred_scores[{i}]").astype(np.float64).ravel()
    if s.shape[0] != len(b) or np.isnan(s).any():
        raise BadInput(f"pred_scores[{i}] must be {len(b)} non-NaN scores, got shape {s.shape}")
    return b, s, _labels(labels, len(b), k, f"pred_labels[{i}]")


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU ``(A, B)`` of boxes ``(A, 4)`` and ``(B, 4)`` (x1, y1, x2, y2); 0 where both have zero area."""
    return np.nan_to_num(box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy(), nan=0.0)


def _match_image(pb: np.ndarray, ps: np.ndarray, pl: np.ndarray, gb: np.ndarray, gl: np.ndarray,
                 gd: np.ndarray, thr: float) -> tuple[np.ndarray, np.ndarray]:
    """VOC greedy matching in one image: (tp, fp) bool ``(R,)``; neither for a match to a difficult GT.

    As in the devkit, each detection (in descending score order) takes the same-class GT of highest IoU;
    if IoU >= thr it is TP when that GT is non-difficult and still free, ignored when it is difficult,
    FP otherwise (an already-taken GT does not fall back to the next best one).
    """
    if gb.shape[0] == 0:
        return np.zeros(len(pb), bool), np.ones(len(pb), bool)
    iou = np.where(pl[:, None] == gl[None, :], _iou(pb, gb), -1.0)  # (R, M), -1 for other classes
    best, ovmax = iou.argmax(1), iou.max(1)
    hit = ovmax >= thr
    order = np.argsort(-ps, kind="stable")
    cand = order[(hit & ~gd[best])[order]]  # non-difficult hits in score order
    _, first = np.unique(best[cand], return_index=True)  # the first claim on each GT wins
    tp = np.zeros(len(pb), bool)
    tp[cand[first]] = True
    return tp, ~tp & ~(hit & gd[best])


def detection_ap(pred_boxes: Sequence[Any], pred_scores: Sequence[Any], pred_labels: Sequence[Any],
                 gt_boxes: Sequence[Any], gt_labels: Sequence[Any], gt_difficult: Sequence[Any] | None,
                 num_classes: int, iou: float = 0.5, use_07: bool = True,
                 class_names: Sequence[str] | None = None, mode: str | None = None) -> dict[str, Any]:
    """VOC-style detection AP per class at IoU >= ``iou`` in AP ``mode`` (one of
    :data:`mlkd.metrics.AP_MODES`; by default ``"voc07"`` if ``use_07`` else ``"voc_area"``).

    Per image i: ``pred_boxes[i]`` ``(R_i, 4)``, ``pred_scores[i]`` ``(R_i,)``, ``pred_labels[i]`` ``(R_i,)``;
    ``gt_boxes[i]`` ``(M_i, 4)``, ``gt_labels[i]`` ``(M_i,)``, ``gt_difficult[i]`` ``(M_i,)`` bool (or None
    for none difficult). Boxes (x1, y1, x2, y2), continuous 0-based pixels (no devkit +1). Difficult GTs
    are not counted as positives and a detection matched to one is neither TP nor FP.
    Returns ``{"ap": (K,) NaN for classes without non-difficult GT, "mAP": float, "ap_variant": the mode,
    "excluded_classes"}``.
    """
    mode = mode if mode is not None else "voc07" if use_07 else "voc_area"
    _check_mode(mode)
    if int(num_classes) < 1:
        raise BadInput(f"num_classes must be >= 1, got {num_classes}")
    n = len(pred_boxes)
    lens = {"pred_scores": len(pred_scores), "pred_labels": len(pred_labels), "gt_boxes": len(gt_boxes),
            "gt_labels": len(gt_labels)} | ({} if gt_difficult is None else {"gt_difficult": len(gt_difficult)})
    for key, m in lens.items():
        if m != n:
            raise BadInput(f"{key} has {m} images but pred_boxes has {n}")
    names = _check_names(class_names, num_classes)
    all_s, all_l, all_tp, all_fp = [], [], [], []
    npos = np.zeros(num_classes, np.int64)
    for i in range(n):
        pb, ps, pl = _image_predictions(pred_boxes[i], pred_scores[i], pred_labels[i], num_classes, i)
        gb = _boxes(gt_boxes[i], f"gt_boxes[{i}]")
        gl = _labels(gt_labels[i], len(gb), num_classes, f"gt_labels[{i}]")
        gd = np.zeros(len(gb), bool)
        if gt_difficult is not None:
            gd = _to_numpy(gt_difficult[i], f"gt_difficult[{i}]").astype(bool).ravel()
        if gd.shape[0] != len(gb):
            raise BadInput(f"gt_difficult[{i}] has {gd.shape[0]} entries for {len(gb)} boxes")
        npos += np.bincount(gl[~gd], minlength=num_classes)
        tp, fp = _match_image(pb, ps, pl, gb, gl, gd, iou)
        all_s.append(ps), all_l.append(pl), all_tp.append(tp), all_fp.append(fp)
    s, lab = np.concatenate(all_s or [np.zeros(0)]), np.concatenate(all_l or [np.zeros(0, np.int64)])
    tp, fp = np.concatenate(all_tp or [np.zeros(0, bool)]), np.concatenate(all_fp or [np.zeros(0, bool)])
    ap = np.full(num_classes, np.nan)
    merge = mode not in DEVKIT_THRESHOLDS
    for c in np.flatnonzero(npos > 0):
        sel = lab == c
        codes = np.where(tp[sel], 1, np.where(fp[sel], 0, -1)).astype(np.int8)[None]
        ap[c] = _ap_from_counts(*_tp_counts(s[sel][None], codes, merge), npos[c : c + 1], mode)[0]
    return {"ap": ap, "mAP": _nanmean(ap), "ap_variant": mode, "excluded_classes": _excluded(npos == 0, names)}


def corloc(top_boxes: Any, image_labels: Any, gt_boxes: Sequence[Any], gt_labels: Sequence[Any],
           iou: float = 0.5, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """CorLoc: per class, the fraction of its positive images whose top box hits a GT of that class.

    ``top_boxes`` ``(N, K, 4)``: the top-scoring box of each class in each image (x1, y1, x2, y2, pixels);
    ``image_labels`` ``(N, K)`` in {1, 0, -1} (only 1 counts as positive); ``gt_boxes[i]`` ``(M_i, 4)``,
    ``gt_labels[i]`` ``(M_i,)``. A hit is IoU >= ``iou`` with any GT box of the class (difficult ones
    included). Returns ``{"per_class": (K,) NaN without positive images, "corloc": mean, "excluded_classes"}``.
    """
    top = np.stack([_to_numpy(b, "top_boxes").astype(np.float64) for b in top_boxes]) if len(top_boxes) else None
    lab = _to_numpy(image_labels, "image_labels")
    if top is None or top.ndim != 3 or top.shape[2] != 4 or top.shape[:2] != lab.shape:
        raise BadInput(f"top_boxes must be (N, K, 4) matching image_labels {lab.shape}, "
                         f"got {None if top is None else top.shape}")
    if len(gt_boxes) != len(top) or len(gt_labels) != len(top):
        raise BadInput(f"gt_boxes/gt_labels have {len(gt_boxes)}/{len(gt_labels)} images, top_boxes {len(top)}")
    n, k = lab.shape
    names = _check_names(class_names, k)
    hits = np.zeros((n, k), bool)
    for i in range(n):
        cls = np.flatnonzero(lab[i] == 1)
        if cls.size == 0:
            continue
        gb = _boxes(gt_boxes[i], f"gt_boxes[{i}]")
        gl = _labels(gt_labels[i], len(gb), k, f"gt_labels[{i}]")
        same = cls[:, None] == gl[None, :]  # (P, M)
        missing = cls[~same.any(1)]
        if missing.size:
            raise BadInput(f"image {i} is labelled positive for class {missing[0]} but has no GT box of it")
        hits[i, cls] = ((_iou(_boxes(top[i, cls], f"top_boxes[{i}]"), gb) >= iou) & same).any(1)
    npos = (lab == 1).sum(0)
    per_class = np.where(npos > 0, hits.sum(0) / np.maximum(npos, 1), np.nan)
    return {"per_class": per_class, "corloc": _nanmean(per_class), "excluded_classes": _excluded(npos == 0, names)}
