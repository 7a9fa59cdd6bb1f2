"""Evaluation protocols for multi-label classification and weakly-supervised detection (docs/evaluation.md).

Every variant is named; nothing is mixed silently.

Classification inputs are ``scores`` ``(N, K)`` (N images, K classes; probabilities for the threshold
metrics, any real numbers for AP) and ``targets`` ``(N, K)`` with 1 = present, 0 = absent, -1 = ignore
(e.g. VOC "difficult"). An ignored entry is removed from that class's ranking and counts. Everything is
computed in float64; float32 scores give identical results (casting preserves order and ties).

AP modes (per class, over that class's ranking of images by score, descending):

- ``"mlic"``: non-interpolated AP: the mean, over positives, of the precision at the positive's rank
  (tie groups merged, below). It equals ``sklearn.metrics.average_precision_score``, ties included. It
  equals ML-GCN's / ASL's sort-based AP when no positive shares its score with another entry of the
  ranking; with such ties theirs depends on where their sort puts tied items (docs/evaluation.md).
- ``"voc07"``: PASCAL VOC 2007 11-point AP: mean over t in {0, 0.1, ..., 1} of the highest precision at
  recall >= t (0 if recall t is never reached). The recall test is exact (integer arithmetic): the
  thresholds are exactly k/10.
- ``"voc07_devkit"``: the official MATLAB devkit's 11-point AP (``VOCevalcls.m`` / ``VOCevaldet.m``), the
  variant behind published VOC 2007 numbers: thresholds as MATLAB builds ``0:0.1:1`` (the 4th is
  0.30000000000000004, not 0.3), float recall ``tp / npos``, tied entries ranked one by one in input order
  (MATLAB's ``sort`` is stable), and ``ap = ap + p / 11`` accumulated in threshold order.
- ``"voc07_py"``: the same with the Python ports' thresholds ``np.arange(0., 1.1, 0.1)`` (Fast R-CNN's
  ``voc_eval.py`` and its descendants), whose 4th, 7th and 8th are above 0.3, 0.6 and 0.7.
- ``"voc_area"``: VOC 2010+ AP: the area under the monotone (interpolated) precision/recall curve.

Ties: except in the two devkit modes, scores that are exactly equal form one threshold step, as in sklearn:
precision and recall of every entry in a tie group are those at the end of the group, so the result does
not depend on input order. The same rule is used for detection rankings.

Class averages: a class with no positive (after ignoring) has no AP and no recall; it gets NaN AP, is
excluded from mAP and from CP/CR, and is listed in ``excluded_classes``. On MS-COCO, VOC and NUS-WIDE
test sets every class has positives, so CP/CR equal ML-GCN's mean over all classes.

Boxes are (x1, y1, x2, y2) in continuous 0-based pixel coordinates. Unlike the original VOC devkit we do
not add 1 pixel to widths and heights; detection protocols live in :mod:`mlkd.metrics.detection`.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np
import torch

from mlkd.errors import BadInput

AP_MODES = ("mlic", "voc07", "voc07_devkit", "voc07_py", "voc_area")
# The 11 recall thresholds of the devkit modes, bit for bit. MATLAB's colon operator builds 0:0.1:1
# symmetrically: k*0.1 from the start for k < 5, (0 + 1)/2 in the middle, 1 - (10-k)*0.1 from the end;
# only k = 3 then differs from the double nearest k/10. numpy's arange computes k*0.1 throughout, which
# also misses at k = 6 and 7. Either way a recall of exactly 3/10 (6/10, 7/10) does not reach that threshold.
DEVKIT_THRESHOLDS = {
    "voc07_devkit": np.array([k * 0.1 if k < 5 else 0.5 if k == 5 else 1.0 - (10 - k) * 0.1 for k in range(11)]),
    "voc07_py": np.arange(0.0, 1.1, 0.1),
}
THRESHOLD_KEYS = ("CP", "CR", "CF1", "OP", "OR", "OF1")


# ----------------------------------------------------------------------------------------------- inputs
def _to_numpy(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as e:
        raise BadInput(f"{name} cannot be read as an array: {e}") from e


def check_scores_targets(scores: Any, targets: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert to ``(float64 (N, K), int8 (N, K))``; ``ValueError`` naming the bad value."""
    s, t = _to_numpy(scores, "scores"), _to_numpy(targets, "targets")
    if s.ndim != 2:
        raise BadInput(f"scores must be 2-D (N images, K classes), got shape {s.shape}")
    if t.shape != s.shape:
        raise BadInput(f"targets shape {t.shape} does not match scores shape {s.shape}")
    if s.shape[0] == 0 or s.shape[1] == 0:
        raise BadInput(f"need at least one image and one class, got shape {s.shape}")
    if not (np.issubdtype(s.dtype, np.floating) or np.issubdtype(s.dtype, np.integer)):
        raise BadInput(f"scores must be a real-valued array, got dtype {s.dtype}")
    s = s.astype(np.float64)
    if np.isnan(s).any():
        i, k = np.argwhere(np.isnan(s))[0]
        raise BadInput(f"scores contain NaN ({int(np.isnan(s).sum())} entries, first at image {i}, class {k})")
    if t.dtype == bool:
        t = t.astype(np.int8)
    bad = ~np.isin(t, (-1, 0, 1))
    if bad.any():
        i, k = np.argwhere(bad)[0]
        raise BadInput(f"targets must be 1 (present), 0 (absent) or -1 (ignore); got {t[i, k].item()!r} "
                         f"at image {i}, class {k} ({int(bad.sum())} bad entries)")
    return s, t.astype(np.int8)


def _check_names(class_names: Sequence[str] | None, k: int) -> list[str] | None:
    if class_names is None:
        return None
    names = [str(n) for n in class_names]
    if len(names) != k:
        raise BadInput(f"got {len(names)} class names for {k} score columns")
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
def _tp_counts(scores: np.ndarray, codes: np.ndarray, merge_ties: bool = True
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts at each true positive of each row's ranking, tie groups merged unless ``merge_ties`` is False.

    ``scores`` ``(C, N)`` rank the entries of each row (descending); ``codes`` ``(C, N)`` int8 mark them
    1 = TP, 0 = FP, -1 = ignored. Returns, for every TP in row-major ranked order, its ``row``, and the
    numbers of TPs and FPs ranked at or above the end of its tie group (scores >= its score). With
    ``merge_ties=False`` every entry is its own group and tied entries keep their input order (a stable
    sort, as the devkits' MATLAB ``sort``).
    Only the sort touches all C*N entries; the rest works on the sparse TPs.
    """
    c, n = scores.shape
    if n == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    # merged tie groups make the order inside a group irrelevant; unmerged, the stable order is the ranking
    order = np.argsort(-scores, axis=1, kind=None if merge_ties else "stable")
    s_sorted = np.take_along_axis(scores, order, axis=1).ravel()
    code_sorted = np.take_along_axis(codes, order, axis=1).ravel()
    boundary = np.ones(c * n, bool)  # True at the last entry of a tie group (and of each row)
    if merge_ties:
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
    _check_mode(mode)
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
        elif mode in DEVKIT_THRESHOLDS:
            ap[r] = _devkit_11_point(interp, tp[starts[r] : starts[r + 1]] / npos[r], DEVKIT_THRESHOLDS[mode])
        else:  # first point with recall >= t/10 is the m-th TP, m = ceil(t * npos / 10), exactly
            m = np.maximum(-(-np.arange(11) * npos[r] // 10), 1)
            ap[r] = np.append(interp, 0.0)[np.minimum(m - 1, len(interp))].mean()
    return ap


def _devkit_11_point(interp: np.ndarray, recall: np.ndarray, thresholds: np.ndarray) -> float:
    """The devkits' loop: ``ap += p / 11`` over ``thresholds``, p the best precision at float recall >= t.

    ``interp`` and ``recall`` ``(T,)`` are the envelope and ``tp / npos`` at each TP, recall nondecreasing,
    so the best precision at recall >= t is the envelope at the first TP that reaches t.
    """
    first = np.searchsorted(recall, thresholds, side="left")  # first TP with recall >= t (T if none)
    total = 0.0
    for i in first:  # summed in this order, as the devkits do, so that the float result is theirs too
        total += (float(interp[i]) if i < len(interp) else 0.0) / 11
    return total


def _check_mode(mode: str) -> None:
    if mode not in AP_MODES:
        raise BadInput(f"unknown AP mode {mode!r}; choose one of {list(AP_MODES)}")


def _ap_modes(s: np.ndarray, t: np.ndarray, modes: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-class AP ``(K,)`` for each mode from validated ``s`` ``(N, K)`` and ``t`` ``(N, K)``; sorts once
    for the modes that merge ties and once for the devkit modes, which rank tied entries in input order."""
    for m in modes:
        _check_mode(m)
    npos = (t == 1).sum(0)
    out = {}
    for merge in {m not in DEVKIT_THRESHOLDS for m in modes}:
        counts = _tp_counts(np.ascontiguousarray(s.T), np.ascontiguousarray(t.T), merge_ties=merge)
        out.update({m: _ap_from_counts(*counts, npos, m) for m in modes if (m not in DEVKIT_THRESHOLDS) == merge})
    return {m: out[m] for m in modes}


def average_precision(scores: Any, targets: Any, mode: str = "mlic") -> np.ndarray:
    """Per-class AP ``(K,)`` of ``scores`` ``(N, K)`` against ``targets`` ``(N, K)`` in {1, 0, -1}.

    ``mode`` is one of :data:`AP_MODES` (see the module docstring). Classes with no positive get NaN;
    ``mAP = np.nanmean(ap)``. -1 entries are dropped from that class's ranking (the devkits' "difficult"
    entries count as neither TP nor FP, which gives the same AP).
    """
    s, t = check_scores_targets(scores, targets)
    return _ap_modes(s, t, (mode,))[mode]


def mean_average_precision(scores: Any, targets: Any, mode: str = "mlic") -> float:
    """mAP: the mean of :func:`average_precision` over the classes that have positives."""
    return _nanmean(average_precision(scores, targets, mode))


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
        raise BadInput(f"top_k must be >= 1, got {k}")
    k = min(int(k), s.shape[1])
    kth = -np.partition(-s, k - 1, axis=1)[:, k - 1 : k]  # (N, 1) k-th largest score
    above = s > kth
    tied = s == kth
    need = k - above.sum(1, keepdims=True)  # how many tied entries still fit, taken left to right
    return above | (tied & (np.cumsum(tied, axis=1) <= need))


def _check_threshold(threshold: float | None) -> None:
    if threshold is not None and not np.isfinite(threshold):
        raise BadInput(f"threshold must be a finite number (e.g. 0.5 for probabilities), got {threshold}")


def predicted_labels(s: np.ndarray, threshold: float | None = 0.5, top_k: int | None = None) -> np.ndarray:
    """Boolean ``(N, K)`` predictions: ``score >= threshold``, and/or in the image's ``top_k`` scores.

    Top-k picks among all K scores of an image (the model does not know what is ignored), see
    :func:`top_k_mask`. ``threshold=None`` with ``top_k`` gives plain top-k.
    """
    if threshold is None and top_k is None:
        raise BadInput("give a threshold, a top_k, or both")
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
    lines += [f"mAP [{m}]".ljust(22) + _pct(v) for m, v in report["mAP"].items()]
    thr, k = report["threshold"], report["k"]
    lines += ["", f"{'labels':<24}" + "".join(f"{key:>8}" for key in THRESHOLD_KEYS)]
    for title, key in ((f"all, p >= {thr:g}", "all_labels"), (f"top-{k}, p >= {thr:g}", "top_k_thresholded"),
                       (f"top-{k}", "top_k")):
        lines.append(f"{title:<24}" + "".join(f"{_pct(report[key][c]):>8}" for c in THRESHOLD_KEYS))
    if per_class and modes:
        names = report["class_names"] or [str(i) for i in range(report["num_classes"])]
        width = max(8, *(len(n) for n in names)) + 2
        lines += ["", "class".ljust(width) + f"{'#pos':>8}" + "".join(f"{m:>14}" for m in modes)]
        for i, name in enumerate(names):
            row = name.ljust(width) + f"{report['num_positives'][i]:>8}"
            lines.append(row + "".join(f"{_pct(report['ap'][m][i]):>14}" for m in modes))
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
