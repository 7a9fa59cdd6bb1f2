"""Evaluation protocols for multi-label classification and weakly-supervised detection (DESIGN.md §3).

Every variant is named; nothing is mixed silently.

Classification inputs are ``scores`` ``(N, K)`` (N images, K classes; probabilities for the threshold
metrics, any real numbers for AP) and ``targets`` ``(N, K)`` with 1 = present, 0 = absent, -1 = ignore
(e.g. VOC "difficult"). An ignored entry is removed from that class's ranking and counts. Everything is
computed in float64; float32 scores give identical results (casting preserves order and ties).

AP modes (per class, over that class's ranking of images by score, descending):

- ``"mlic"``: non-interpolated AP as in ML-GCN / ASL: the mean, over positives, of the precision at the
  positive's rank. It equals ``sklearn.metrics.average_precision_score``, ties included.
- ``"voc07"``: PASCAL VOC 2007 11-point AP: mean over t in {0, 0.1, ..., 1} of the highest precision at
  recall >= t (0 if recall t is never reached). The recall test is exact (integer arithmetic), avoiding
  the float quirk of ``np.arange(0, 1.1, 0.1)`` in the Python devkit ports.
- ``"voc_area"``: VOC 2010+ AP: the area under the monotone (interpolated) precision/recall curve.

Ties: scores that are exactly equal form one threshold step, as in sklearn: precision and recall of every
entry in a tie group are those at the end of the group, so the result does not depend on input order.
The same rule is used for detection rankings.

Class averages: a class with no positive (after ignoring) has no AP and no recall; it gets NaN AP, is
excluded from mAP and from CP/CR, and is listed in ``excluded_classes``. On MS-COCO, VOC and NUS-WIDE
test sets every class has positives, so CP/CR equal ML-GCN's mean over all classes.

Boxes are (x1, y1, x2, y2) in continuous 0-based pixel coordinates. Unlike the original VOC devkit we do
not add 1 pixel to widths and heights; IoU is ``torchvision.ops.box_iou``.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np
import torch
from torchvision.ops import box_iou

AP_MODES = ("mlic", "voc07", "voc_area")
THRESHOLD_KEYS = ("CP", "CR", "CF1", "OP", "OR", "OF1")


# ----------------------------------------------------------------------------------------------- inputs
def _to_numpy(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} cannot be read as an array: {e}") from e


def check_scores_targets(scores: Any, targets: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert to ``(float64 (N, K), int8 (N, K))``; ``ValueError`` naming the bad value."""
    s, t = _to_numpy(scores, "scores"), _to_numpy(targets, "targets")
    if s.ndim != 2:
        raise ValueError(f"scores must be 2-D (N images, K classes), got shape {s.shape}")
    if t.shape != s.shape:
        raise ValueError(f"targets shape {t.shape} does not match scores shape {s.shape}")
    if s.shape[0] == 0 or s.shape[1] == 0:
        raise ValueError(f"need at least one image and one class, got shape {s.shape}")
    if not (np.issubdtype(s.dtype, np.floating) or np.issubdtype(s.dtype, np.integer)):
        raise ValueError(f"scores must be a real-valued array, got dtype {s.dtype}")
    s = s.astype(np.float64)
    if np.isnan(s).any():
        i, k = np.argwhere(np.isnan(s))[0]
        raise ValueError(f"scores contain NaN ({int(np.isnan(s).sum())} entries, first at image {i}, class {k})")
    if t.dtype == bool:
        t = t.astype(np.int8)
    bad = ~np.isin(t, (-1, 0, 1))
    if bad.any():
        i, k = np.argwhere(bad)[0]
        raise ValueError(f"targets must be 1 (present), 0 (absent) or -1 (ignore); got {t[i, k].item()!r} "
                         f"at image {i}, class {k} ({int(bad.sum())} bad entries)")
    return s, t.astype(np.int8)


def _check_names(class_names: Sequence[str] | None, k: int) -> list[str] | None:
    if class_names is None:
        return None
    names = [str(n) for n in class_names]
    if len(names) != k:
        raise ValueError(f"got {len(names)} class names for {k} score columns")
    return names


def _excluded(no_positives: np.ndarray, names: list[str] | None) -> list[dict[str, Any]]:
    """``[{"index": k, "name": name or None}]`` for each True of ``no_positives`` ``(K,)``."""
    return [{"index": int(c), "name": names[c] if names else None} for c in np.flatnonzero(no_positives)]


def excluded_classes(targets: np.ndarray, class_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Classes with no positive in ``targets`` ``(N, K)``: ``[{"index": k, "name": name or None}, ...]``."""
    t = np.asarray(targets)
    names = _check_names(class_names, t.shape[1])
    return _excluded((t == 1).sum(0) == 0, names)


def _nanmean(x: np.ndarray) -> float:
    """Mean over non-NaN entries; NaN (without a warning) if there are none."""
    x = np.asarray(x, np.float64)
    ok = ~np.isnan(x)
    return float(x[ok].mean()) if ok.any() else float("nan")


# ---------------------------------------------------------------------------------------- ranking / AP
def _tp_counts(scores: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts at each true positive of each row's ranking, tie groups merged.

    ``scores`` ``(C, N)`` rank the entries of each row (descending); ``codes`` ``(C, N)`` int8 mark them
    1 = TP, 0 = FP, -1 = ignored. Returns, for every TP in row-major ranked order, its ``row``, and the
    numbers of TPs and FPs ranked at or above the end of its tie group (scores >= its score).
    Only the sort touches all C*N entries; the rest works on the sparse TPs.
    """
    c, n = scores.shape
    if n == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    order = np.argsort(-scores, axis=1)  # the order inside a tie group is irrelevant: groups are merged
    s_sorted = np.take_along_axis(scores, order, axis=1).ravel()
    code_sorted = np.take_along_axis(codes, order, axis=1).ravel()
    boundary = np.ones(c * n, bool)  # True at the last entry of a tie group (and of each row)
    boundary[:-1] = s_sorted[:-1] != s_sorted[1:]
    boundary[n - 1 :: n] = True
    ends = np.flatnonzero(boundary)
    pos = np.flatnonzero(code_sorted == 1)  # flat indices, so row by row in ranked order
    ign = np.flatnonzero(code_sorted == -1)
    end = ends[np.searchsorted(ends, pos)]  # last flat index of each TP's tie group
    row = pos // n
    tp = np.searchsorted(pos, end, side="right") - np.searchsorted(pos, row * n)
    n_ign = np.searchsorted(ign, end, side="right") - np.searchsorted(ign, row * n)
    fp = end - row * n + 1 - tp - n_ign
    return row, tp, fp


def _ap_from_counts(row: np.ndarray, tp: np.ndarray, fp: np.ndarray, npos: np.ndarray, mode: str) -> np.ndarray:
    """AP ``(C,)`` in protocol ``mode`` from :func:`_tp_counts` output and the positives ``npos`` ``(C,)``.

    ``npos`` may exceed the TPs of a row (missed detections count as recall never reached); a row with
    ``npos == 0`` gets NaN.
    """
    if mode not in AP_MODES:
        raise ValueError(f"unknown AP mode {mode!r}; choose one of {list(AP_MODES)}")
    prec = tp / (tp + fp)  # at each TP; tp >= 1 there
    starts = np.searchsorted(row, np.arange(len(npos) + 1))
    ap = np.full(len(npos), np.nan)
    for r in np.flatnonzero(npos > 0):
        p = prec[starts[r] : starts[r + 1]]
        if mode == "mlic":
            ap[r] = p.sum() / npos[r]
            continue
        # monotone envelope: the best precision at this recall or any higher one. Points between TPs
        # (after FPs) never exceed the preceding TP's precision, so the TPs suffice.
        interp = np.maximum.accumulate(p[::-1])[::-1]
        if mode == "voc_area":
            ap[r] = interp.sum() / npos[r]
        else:  # first point with recall >= t/10 is the m-th TP, m = ceil(t * npos / 10), exactly
            m = np.maximum(-(-np.arange(11) * npos[r] // 10), 1)
            ap[r] = np.append(interp, 0.0)[np.minimum(m - 1, len(interp))].mean()
    return ap


def _ap_modes(s: np.ndarray, t: np.ndarray, modes: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-class AP ``(K,)`` for each mode from validated ``s`` ``(N, K)`` and ``t`` ``(N, K)``; sorts once."""
    for m in modes:
        if m not in AP_MODES:
            raise ValueError(f"unknown AP mode {m!r}; choose one of {list(AP_MODES)}")
    counts = _tp_counts(np.ascontiguousarray(s.T), np.ascontiguousarray(t.T))
    npos = (t == 1).sum(0)
    return {m: _ap_from_counts(*counts, npos, m) for m in modes}


def average_precision(scores: Any, targets: Any, mode: str = "mlic") -> np.ndarray:
    """Per-class AP ``(K,)`` of ``scores`` ``(N, K)`` against ``targets`` ``(N, K)`` in {1, 0, -1}.

    ``mode`` is ``"mlic"``, ``"voc07"`` or ``"voc_area"`` (see the module docstring). Classes with no
    positive get NaN; ``mAP = np.nanmean(ap)``. -1 entries are dropped from that class's ranking.
    """
    s, t = check_scores_targets(scores, targets)
    return _ap_modes(s, t, (mode,))[mode]


# ------------------------------------------------------------------------------- threshold metrics
def _f1(p: float, r: float) -> float:
    """Harmonic mean 2PR/(P+R); 0 when both are 0, NaN when either is undefined."""
    if np.isnan(p) or np.isnan(r):
        return float("nan")
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def _prf(nc: np.ndarray, np_: np.ndarray, ng: np.ndarray) -> dict[str, Any]:
    """CP/CR/CF1/OP/OR/OF1 from per-class correct, predicted and ground-truth counts ``(K,)``."""
    prec = np.divide(nc, np_, out=np.zeros(nc.shape), where=np_ > 0)  # never predicted -> precision 0
    rec = np.divide(nc, ng, out=np.full(nc.shape, np.nan), where=ng > 0)  # no positives -> undefined
    has_pos = ng > 0
    cp = float(prec[has_pos].mean()) if has_pos.any() else float("nan")
    cr = _nanmean(rec)
    op = float(nc.sum() / np_.sum()) if np_.sum() > 0 else 0.0
    orr = float(nc.sum() / ng.sum()) if ng.sum() > 0 else float("nan")
    return {"CP": cp, "CR": cr, "CF1": _f1(cp, cr), "OP": op, "OR": orr, "OF1": _f1(op, orr),
            "per_class_precision": prec, "per_class_recall": rec}


def top_k_mask(s: np.ndarray, k: int) -> np.ndarray:
    """Boolean ``(N, K)``: True for the ``k`` highest scores of each row of ``s`` ``(N, K)``.

    Ties at the k-th place go to the lower class index, so exactly min(k, K) entries per row are True.
    """
    if int(k) < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    k = min(int(k), s.shape[1])
    kth = -np.partition(-s, k - 1, axis=1)[:, k - 1 : k]  # (N, 1) k-th largest score
    above = s > kth
    tied = s == kth
    need = k - above.sum(1, keepdims=True)  # how many tied entries still fit, taken left to right
    return above | (tied & (np.cumsum(tied, axis=1) <= need))


def _check_threshold(threshold: float | None) -> None:
    if threshold is not None and not np.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number (e.g. 0.5 for probabilities), got {threshold}")


def predicted_labels(s: np.ndarray, threshold: float | None = 0.5, top_k: int | None = None) -> np.ndarray:
    """Boolean ``(N, K)`` predictions: ``score >= threshold``, and/or in the image's ``top_k`` scores.

    Top-k picks among all K scores of an image (the model does not know what is ignored), see
    :func:`top_k_mask`. ``threshold=None`` with ``top_k`` gives plain top-k.
    """
    if threshold is None and top_k is None:
        raise ValueError("give a threshold, a top_k, or both")
    _check_threshold(threshold)
    pred = np.ones(s.shape, bool) if threshold is None else s >= threshold
    return pred if top_k is None else pred & top_k_mask(s, top_k)


def threshold_metrics(scores: Any, targets: Any, threshold: float | None = 0.5,
                      top_k: int | None = None) -> dict[str, Any]:
    """CP, CR, CF1, OP, OR, OF1 of :func:`predicted_labels` against ``targets`` ``(N, K)``.

    Per class: Nc = correct predictions, Np = predictions, Ng = positives, all over non-ignored entries.
    CP = mean_k Nc/Np (0 for a class never predicted), CR = mean_k Nc/Ng, both over classes with Ng > 0;
    OP = ΣNc/ΣNp (0 if nothing is predicted), OR = ΣNc/ΣNg, over all classes; F1 = 2PR/(P+R) (0 when
    P + R = 0). Undefined values (no positives at all) are NaN.
    Returns the six numbers plus ``per_class_precision`` / ``per_class_recall`` ``(K,)`` arrays.
    """
    s, t = check_scores_targets(scores, targets)
    pred = predicted_labels(s, threshold, top_k)
    gt = t == 1
    nc = (pred & gt).sum(0)
    np_ = (pred & (t != -1)).sum(0)
    return _prf(nc, np_, gt.sum(0))


# ------------------------------------------------------------------------------------ full report
def evaluate_all(scores: Any, targets: Any, class_names: Sequence[str] | None = None, threshold: float = 0.5,
                 ap_modes: Sequence[str] = AP_MODES, top_k: int = 3) -> dict[str, Any]:
    """Every classification metric of ``scores`` ``(N, K)`` against ``targets`` ``(N, K)``.

    Returns a dict (values are fractions in [0, 1], not %):
    ``mAP`` {mode: float}, ``ap`` {mode: list of K floats, NaN if excluded}, ``excluded_classes``,
    ``num_positives`` (K ints), ``all_labels`` / ``top_k_thresholded`` / ``top_k`` each
    {CP, CR, CF1, OP, OR, OF1}, plus ``threshold``, ``k``, ``num_images``, ``num_classes``, ``class_names``.
    """
    s, t = check_scores_targets(scores, targets)
    names = _check_names(class_names, s.shape[1])
    _check_threshold(threshold)
    ap = _ap_modes(s, t, tuple(ap_modes))
    gt = t == 1
    valid = t != -1
    ng = gt.sum(0)
    in_top = top_k_mask(s, top_k)

    def counts(pred: np.ndarray) -> dict[str, float]:
        r = _prf((pred & gt).sum(0), (pred & valid).sum(0), ng)
        return {key: r[key] for key in THRESHOLD_KEYS}

    return {
        "num_images": int(s.shape[0]), "num_classes": int(s.shape[1]), "class_names": names,
        "num_positives": [int(n) for n in ng],
        "mAP": {m: _nanmean(a) for m, a in ap.items()},
        "ap": {m: [float(v) for v in a] for m, a in ap.items()},
        "excluded_classes": excluded_classes(t, names),
        "threshold": float(threshold), "k": int(top_k),
        "all_labels": counts(s >= threshold),
        "top_k_thresholded": counts((s >= threshold) & in_top),
        "top_k": counts(in_top),
    }


def _pct(x: float) -> str:
    return "   n/a" if x is None or np.isnan(x) else f"{100 * x:6.2f}"


def format_table(report: dict[str, Any], per_class: bool = True) -> str:
    """A readable text table (numbers in %) of an :func:`evaluate_all` report."""
    modes = list(report["mAP"])
    lines = [f"{report['num_images']} images, {report['num_classes']} classes (numbers in %)", ""]
    lines += [f"mAP [{m}]".ljust(18) + _pct(v) for m, v in report["mAP"].items()]
    thr, k = report["threshold"], report["k"]
    lines += ["", f"{'labels':<24}" + "".join(f"{key:>8}" for key in THRESHOLD_KEYS)]
    for title, key in ((f"all, p >= {thr:g}", "all_labels"), (f"top-{k}, p >= {thr:g}", "top_k_thresholded"),
                       (f"top-{k}", "top_k")):
        lines.append(f"{title:<24}" + "".join(f"{_pct(report[key][c]):>8}" for c in THRESHOLD_KEYS))
    if per_class and modes:
        names = report["class_names"] or [str(i) for i in range(report["num_classes"])]
        width = max(8, *(len(n) for n in names)) + 2
        lines += ["", "class".ljust(width) + f"{'#pos':>8}" + "".join(f"{m:>10}" for m in modes)]
        for i, name in enumerate(names):
            row = name.ljust(width) + f"{report['num_positives'][i]:>8}"
            lines.append(row + "".join(f"{_pct(report['ap'][m][i]):>10}" for m in modes))
    if report["excluded_classes"]:
        ex = ", ".join(f"{e['index']}" + (f" ({e['name']})" if e["name"] else "") for e in report["excluded_classes"])
        lines += ["", f"excluded from mAP and CP/CR (no positives): {ex}"]
    return "\n".join(lines)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in (x.tolist() if isinstance(x, np.ndarray) else x)]
    if isinstance(x, (float, np.floating)):
        return None if np.isnan(x) else float(x)
    return x.item() if isinstance(x, np.generic) else x


def report_to_json(report: dict[str, Any]) -> str:
    """Strict JSON text of a report (NaN becomes ``null``)."""
    return json.dumps(_jsonable(report), indent=2, allow_nan=False)


# -------------------------------------------------------------------------------------- detection
def _boxes(x: Any, name: str) -> np.ndarray:
    """Validated float64 boxes ``(M, 4)`` (x1, y1, x2, y2); an empty input gives ``(0, 4)``."""
    a = _to_numpy(x, name)
    if a.size % 4 or (a.size and a.shape[-1] != 4):
        raise ValueError(f"{name} must have shape (M, 4) as (x1, y1, x2, y2), got {a.shape}")
    b = a.astype(np.float64).reshape(-1, 4)
    if not np.isfinite(b).all():
        raise ValueError(f"{name} has non-finite coordinates")
    bad = (b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])
    if bad.any():
        raise ValueError(f"{name} must be (x1, y1, x2, y2) with x2 >= x1 and y2 >= y1, got {b[bad][0].tolist()}")
    return b


def _labels(x: Any, n: int, k: int, name: str) -> np.ndarray:
    lab = _to_numpy(x, name).reshape(-1)
    if lab.shape[0] != n:
        raise ValueError(f"{name} has {lab.shape[0]} entries for {n} boxes")
    if lab.size and not np.array_equal(lab, np.round(lab)):
        raise ValueError(f"{name} must be integer class indices, got {lab[lab != np.round(lab)][0]}")
    lab = lab.astype(np.int64)
    if ((lab < 0) | (lab >= k)).any():
        raise ValueError(f"{name} must be class indices in [0, {k}), got {lab[(lab < 0) | (lab >= k)][0]}")
    return lab


def _image_predictions(boxes: Any, scores: Any, labels: Any, k: int, i: int) -> tuple[np.ndarray, ...]:
    """Validated detections of image ``i``: boxes ``(R, 4)`` float64, scores ``(R,)`` float64, labels ``(R,)``."""
    b = _boxes(boxes, f"pred_boxes[{i}]")
    s = _to_numpy(scores, f"pred_scores[{i}]").astype(np.float64).ravel()
    if s.shape[0] != len(b) or np.isnan(s).any():
        raise ValueError(f"pred_scores[{i}] must be {len(b)} non-NaN scores, got shape {s.shape}")
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
                 class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """VOC-style detection AP per class at IoU >= ``iou`` (``use_07``: 11-point, else area).

    Per image i: ``pred_boxes[i]`` ``(R_i, 4)``, ``pred_scores[i]`` ``(R_i,)``, ``pred_labels[i]`` ``(R_i,)``;
    ``gt_boxes[i]`` ``(M_i, 4)``, ``gt_labels[i]`` ``(M_i,)``, ``gt_difficult[i]`` ``(M_i,)`` bool (or None
    for none difficult). Boxes (x1, y1, x2, y2), continuous 0-based pixels (no devkit +1). Difficult GTs
    are not counted as positives and a detection matched to one is neither TP nor FP.
    Returns ``{"ap": (K,) NaN for classes without non-difficult GT, "mAP": float, "excluded_classes"}``.
    """
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    n = len(pred_boxes)
    lens = {"pred_scores": len(pred_scores), "pred_labels": len(pred_labels), "gt_boxes": len(gt_boxes),
            "gt_labels": len(gt_labels)} | ({} if gt_difficult is None else {"gt_difficult": len(gt_difficult)})
    for key, m in lens.items():
        if m != n:
            raise ValueError(f"{key} has {m} images but pred_boxes has {n}")
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
            raise ValueError(f"gt_difficult[{i}] has {gd.shape[0]} entries for {len(gb)} boxes")
        npos += np.bincount(gl[~gd], minlength=num_classes)
        tp, fp = _match_image(pb, ps, pl, gb, gl, gd, iou)
        all_s.append(ps), all_l.append(pl), all_tp.append(tp), all_fp.append(fp)
    s, lab = np.concatenate(all_s or [np.zeros(0)]), np.concatenate(all_l or [np.zeros(0, np.int64)])
    tp, fp = np.concatenate(all_tp or [np.zeros(0, bool)]), np.concatenate(all_fp or [np.zeros(0, bool)])
    ap = np.full(num_classes, np.nan)
    mode = "voc07" if use_07 else "voc_area"
    for c in np.flatnonzero(npos > 0):
        sel = lab == c
        codes = np.where(tp[sel], 1, np.where(fp[sel], 0, -1)).astype(np.int8)[None]
        ap[c] = _ap_from_counts(*_tp_counts(s[sel][None], codes), npos[c : c + 1], mode)[0]
    return {"ap": ap, "mAP": _nanmean(ap), "excluded_classes": _excluded(npos == 0, names)}


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
        raise ValueError(f"top_boxes must be (N, K, 4) matching image_labels {lab.shape}, "
                         f"got {None if top is None else top.shape}")
    if len(gt_boxes) != len(top) or len(gt_labels) != len(top):
        raise ValueError(f"gt_boxes/gt_labels have {len(gt_boxes)}/{len(gt_labels)} images, top_boxes {len(top)}")
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
            raise ValueError(f"image {i} is labelled positive for class {missing[0]} but has no GT box of it")
        hits[i, cls] = ((_iou(_boxes(top[i, cls], f"top_boxes[{i}]"), gb) >= iou) & same).any(1)
    npos = (lab == 1).sum(0)
    per_class = np.where(npos > 0, hits.sum(0) / np.maximum(npos, 1), np.nan)
    return {"per_class": per_class, "corloc": _nanmean(per_class), "excluded_classes": _excluded(npos == 0, names)}
