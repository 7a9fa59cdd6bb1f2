"""The numbers behind the evaluation plots (docs/evaluation.md, "Evaluation you can look at"): precision-recall
curves that integrate to the ``mlic`` AP, reliability bins, label co-occurrence and a per-image AP.

Inputs are validated as in :mod:`mlkd.metrics.classification`: ``scores`` ``(N, K)``, ``targets`` ``(N, K)`` in
{1, 0, -1}; a -1 entry is dropped from its class (curves, reliability) and is neither a label nor a prediction
(co-occurrence).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mlkd.errors import BadInput
from mlkd.metrics.classification import _ap_modes, _check_threshold, check_scores_targets

# float32 sums of probabilities (a teacher's image scores: sums of region scores) can pass 1 by a rounding error
ROUNDING = 1e-5


def precision_recall_curve(scores: Any, targets: Any, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision-recall curve of class ``k``: ``(precision, recall, thresholds)``, recall ascending.

    One point per distinct score (a tie group enters together, as in the ``mlic`` AP), highest score first, after
    a first point (recall 0, precision 1, threshold +inf) as in sklearn. The area of the step curve that holds
    each point's precision back to the previous recall, ``sum(diff(recall) * precision[1:])``, equals the class's
    ``mlic`` AP (sklearn's ``average_precision_score``). A class without positives has NaN recall.
    """
    s, t = check_scores_targets(scores, targets)
    if not 0 <= k < s.shape[1]:
        raise BadInput(f"class index must be in [0, {s.shape[1]}), got {k}")
    keep = t[:, k] != -1
    sk, pos = s[keep, k], t[keep, k] == 1
    order = np.argsort(-sk, kind="stable")
    sk, pos = sk[order], pos[order]
    ends = np.flatnonzero(np.append(sk[:-1] != sk[1:], True)) if len(sk) else np.zeros(0, np.int64)
    tp = np.cumsum(pos)[ends].astype(np.float64)
    fp = ends + 1 - tp
    npos = pos.sum()
    recall = tp / npos if npos else np.full(len(tp), np.nan)
    precision = tp / np.maximum(tp + fp, 1)
    return (np.append(1.0, precision), np.append(0.0 if npos else np.nan, recall),
            np.append(np.inf, sk[ends]))


def curve_area(precision: np.ndarray, recall: np.ndarray) -> float:
    """Area of a :func:`precision_recall_curve` as the step curve the plots draw: ``sum(diff(recall) *
    precision[1:])``; NaN for a class without positives."""
    return float(np.sum(np.diff(recall) * precision[1:]))


def reliability(scores: Any, targets: Any, bins: int = 10) -> dict[str, np.ndarray | float]:
    """Reliability (calibration) of probabilities: the non-ignored (image, class) pairs of all classes pooled
    into ``bins`` equal-width bins of the score over [0, 1] (the last bin includes 1).

    Returns ``edges`` ``(bins + 1,)``, per bin ``count``, ``positives``, ``mean_score`` and ``frequency`` (the
    fraction of positives; NaN for an empty bin), and ``ece``: the expected calibration error
    ``sum_b count_b / total * |frequency_b - mean_score_b|``.
    """
    if int(bins) < 1:
        raise BadInput(f"bins must be >= 1, got {bins}")
    s, t = check_scores_targets(scores, targets)
    keep = t != -1
    p, y = s[keep], t[keep] == 1
    if p.size and (p.min() < -ROUNDING or p.max() > 1 + ROUNDING):
        raise BadInput(f"reliability needs probabilities in [0, 1], got scores in [{p.min():g}, {p.max():g}]")
    p = np.clip(p, 0.0, 1.0)
    edges = np.linspace(0.0, 1.0, int(bins) + 1)
    which = np.minimum((p * bins).astype(np.int64), bins - 1)  # a score of exactly 1 goes to the last bin
    count = np.bincount(which, minlength=bins)
    positives = np.bincount(which, weights=y, minlength=bins)
    sums = np.bincount(which, weights=p, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        frequency, mean_score = positives / count, sums / count
    gap = np.where(count > 0, np.abs(np.nan_to_num(frequency) - np.nan_to_num(mean_score)), 0.0)
    ece = float((count * gap).sum() / count.sum()) if count.sum() else float("nan")
    return {"edges": edges, "count": count, "positives": positives.astype(np.int64), "mean_score": mean_score,
            "frequency": frequency, "ece": ece}


def co_occurrence(scores: Any, targets: Any, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Label co-occurrence ``(K, K)`` int matrices ``(ground_truth, predicted)``: entry (i, j) counts the images
    labelled (resp. predicted, score >= ``threshold``) with both classes i and j; the diagonal counts the images
    of each class. Ignored (-1) entries count in neither."""
    s, t = check_scores_targets(scores, targets)
    _check_threshold(threshold)
    gt = (t == 1).astype(np.int64)
    pred = ((s >= threshold) & (t != -1)).astype(np.int64)
    return gt.T @ gt, pred.T @ pred


def per_image_ap(scores: Any, targets: Any) -> np.ndarray:
    """AP ``(N,)`` of each image: its K classes ranked by its scores, its labels as positives (the ``mlic``
    AP of the transposed problem). 1 when every true label outranks every other class; NaN for an image
    without a positive label."""
    s, t = check_scores_targets(scores, targets)
    return _ap_modes(np.ascontiguousarray(s.T), np.ascontiguousarray(t.T), ("mlic",))["mlic"]
