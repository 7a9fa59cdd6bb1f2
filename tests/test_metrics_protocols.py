"""The AP variants that published numbers use, against from-scratch ports of what their code computes.

- ``voc07_devkit`` / ``voc07_py``: the PASCAL VOC 2007 devkit's 11-point AP (MATLAB ``VOCevalcls.m`` /
  ``VOCevaldet.m``) and the thresholds of its Python ports (``np.arange(0., 1.1, 0.1)``), written here as the
  devkit's loop: stable sort of the scores, cumulative TP/FP counts, float recall and precision at every
  ranked entry, the highest precision at recall >= t for each of the 11 thresholds, ``ap = ap + p / 11``.
- ML-GCN's / ASL's sort-based AP (precision at each positive's own position after a sort) against ``mlic``.
"""

from __future__ import annotations

import numpy as np
import pytest

from mlkd.metrics import average_precision, detection_ap
from mlkd.metrics.classification import DEVKIT_THRESHOLDS
from test_metrics import random_problem

# MATLAB's 0:0.1:1 as the devkit's `for t=0:0.1:1` iterates it: the colon operator builds the first half
# forward (k * 0.1), the middle as (0 + 1) / 2 and the second half backward (1 - (10 - k) * 0.1), so only
# the 4th value is not the double nearest k/10. Written out, not computed, to stay independent of mlkd.
MATLAB_THRESHOLDS = [0.0, 0.1, 0.2, 0.30000000000000004, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
PY_THRESHOLDS = list(np.arange(0.0, 1.1, 0.1))  # Fast R-CNN's voc_eval.py and its descendants
THRESHOLDS = {"voc07_devkit": MATLAB_THRESHOLDS, "voc07_py": PY_THRESHOLDS}


# ------------------------------------------------------------------------------------------- references
def devkit_11_point(tp_flags: list[int], fp_flags: list[int], npos: int, thresholds: list[float]) -> float:
    """The devkit's AP from per-entry TP / FP flags in ranked order (an entry may be neither: difficult)."""
    tp = fp = 0
    rec, prec = [], []
    for a, b in zip(tp_flags, fp_flags):
        tp, fp = tp + a, fp + b
        rec.append(tp / npos)
        prec.append(tp / (tp + fp) if tp + fp else float("nan"))  # MATLAB: 0/0 = NaN, which max ignores
    ap = 0.0
    for t in thresholds:
        ok = [p for r, p in zip(rec, prec) if r >= t]
        finite = [p for p in ok if p == p]
        p = max(finite) if finite else (float("nan") if ok else 0.0)
        ap = ap + p / 11
    return ap


def devkit_cls_ap(scores: np.ndarray, targets: np.ndarray, thresholds: list[float]) -> float:
    """VOCevalcls.m for one class: gt 1 / -1 / 0 (mlkd's 1 / 0 / -1), stable sort of -score."""
    gt = [{1: 1, 0: -1, -1: 0}[int(v)] for v in targets]
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # Python's sort is stable, as MATLAB's
    return devkit_11_point([int(gt[i] > 0) for i in order], [int(gt[i] < 0) for i in order],
                           sum(1 for g in gt if g > 0), thresholds)


def iou(a, b) -> float:
    """IoU of two (x1, y1, x2, y2) boxes, continuous coordinates (mlkd's convention: no devkit +1)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - iw * ih
    return iw * ih / union if union > 0 else 0.0


def devkit_det_ap(dets: list, gts: list, c: int, thresholds: list[float], thr: float = 0.5) -> float:
    """VOCevaldet.m for class c. dets: (image, score, box, label) in results-file order; gts[image]: list of
    (box, label, difficult). Stable sort by -score, then greedy matching in that order."""
    npos = sum(1 for g in gts for (_, lab, dif) in g if lab == c and not dif)
    mine = sorted([d for d in dets if d[3] == c], key=lambda d: -d[1])
    taken = [[False] * len(g) for g in gts]
    tp, fp = [], []
    for img, _, box, _ in mine:
        ovmax, jmax = -1.0, -1
        for j, (gb, lab, _) in enumerate(gts[img]):
            if lab == c and iou(box, gb) > ovmax:
                ovmax, jmax = iou(box, gb), j
        hit, miss = 0, 1
        if ovmax >= thr:
            if gts[img][jmax][2]:
                hit, miss = 0, 0  # a difficult object: neither
            elif not taken[img][jmax]:
                taken[img][jmax], hit, miss = True, 1, 0
        tp.append(hit)
        fp.append(miss)
    return devkit_11_point(tp, fp, npos, thresholds)


def sort_based_ap(scores: np.ndarray, targets: np.ndarray, order: np.ndarray) -> float:
    """ML-GCN / ASL style: walk the items in ``order`` (best first), precision at each positive's position."""
    hits = total = 0
    precisions = []
    for i in order:
        if targets[i] == -1:
            continue  # ignored (ML-GCN skips "difficult")
        total += 1
        if targets[i] == 1:
            hits += 1
            precisions.append(hits / total)
    return sum(precisions) / hits


# ------------------------------------------------------------------------------------------ classification
def test_thresholds_are_the_devkits():
    assert DEVKIT_THRESHOLDS["voc07_devkit"].tolist() == MATLAB_THRESHOLDS
    assert DEVKIT_THRESHOLDS["voc07_py"].tolist() == PY_THRESHOLDS
    exact = [k / 10 for k in range(11)]
    assert [k for k in range(11) if MATLAB_THRESHOLDS[k] != exact[k]] == [3]
    assert [k for k in range(11) if PY_THRESHOLDS[k] != exact[k]] == [3, 6, 7]


@pytest.mark.parametrize("mode", ["voc07_devkit", "voc07_py"])
@pytest.mark.parametrize("seed, ties, ignore", [(0, False, 0.0), (1, True, 0.0), (2, True, 0.2), (3, False, 0.1)])
def test_devkit_modes_equal_the_devkit_loop_bit_for_bit(mode, seed, ties, ignore):
    s, t = random_problem(k=6, seed=seed, ties=ties, ignore=ignore)
    got = average_precision(s, t, mode)
    want = [devkit_cls_ap(s[:, j], t[:, j], THRESHOLDS[mode]) for j in range(t.shape[1])]
    np.testing.assert_array_equal(got, want)  # same float operations in the same order: equal, not close


def test_devkit_thresholds_make_the_variants_differ():
    # 10 positives: 6 first (recall 0.6 at precision 1), two negatives, then 4 more positives.
    t = np.array([[1]] * 6 + [[0]] * 2 + [[1]] * 4)
    s = -np.arange(len(t), dtype=float)[:, None]  # tie-free
    ap = {m: average_precision(s, t, m)[0] for m in ("voc07", "voc07_devkit", "voc07_py")}
    # the envelope is 1 up to the 6th TP, then 10/12. Exact thresholds: t <= 0.6 at precision 1 (7 of 11).
    # MATLAB: recall 3/10 = 0.3 < 0.30000000000000004 still reaches the 4th TP at precision 1: the same.
    # numpy's 0.6000000000000001 is reached only at the 7th TP, whose envelope is 10/12.
    assert ap["voc07"] == pytest.approx((7 + 4 * 10 / 12) / 11)
    assert ap["voc07_devkit"] == pytest.approx(ap["voc07"])
    assert ap["voc07_py"] == pytest.approx((6 + 5 * 10 / 12) / 11)
    # 3 positives, 3 negatives, 7 positives: recall 3/10 is met exactly at the 3rd TP, and the next TP has a
    # lower envelope, so MATLAB's 0.30000000000000004 differs from k/10 too.
    t = np.array([[1]] * 3 + [[0]] * 3 + [[1]] * 7)
    s = -np.arange(len(t), dtype=float)[:, None]
    assert average_precision(s, t, "voc07")[0] == pytest.approx((4 + 7 * 10 / 13) / 11)
    assert average_precision(s, t, "voc07_devkit")[0] == pytest.approx((3 + 8 * 10 / 13) / 11)
    assert average_precision(s, t, "voc07_py")[0] == pytest.approx((3 + 8 * 10 / 13) / 11)
    for mode in ("voc07_devkit", "voc07_py"):
        assert average_precision(s, t, mode)[0] == devkit_cls_ap(s[:, 0], t[:, 0], THRESHOLDS[mode])


def test_devkit_modes_rank_ties_in_input_order_the_others_do_not():
    # a positive tied with a negative at the top: the devkit's stable sort puts the first row first
    s = np.array([[0.9], [0.9], [0.5]])
    pos_first, neg_first = np.array([[1], [0], [1]]), np.array([[0], [1], [1]])
    assert average_precision(s, pos_first, "voc07_devkit")[0] == pytest.approx(1 * 6 / 11 + 2 / 3 * 5 / 11)
    assert average_precision(s, neg_first, "voc07_devkit")[0] == pytest.approx(2 / 3)
    for mode in ("mlic", "voc07", "voc_area"):  # one tie group: both orders give the same
        assert average_precision(s, pos_first, mode)[0] == average_precision(s, neg_first, mode)[0]


def test_devkit_difficult_equals_ignore():
    s, t = random_problem(k=6, seed=4, ties=True, ignore=0.25)
    for mode in ("voc07_devkit", "voc07_py"):
        for j in range(t.shape[1]):
            keep = t[:, j] != -1
            alone = average_precision(s[keep, j : j + 1], t[keep, j : j + 1], mode)[0]
            assert average_precision(s[:, j : j + 1], t[:, j : j + 1], mode)[0] == alone


# ------------------------------------------------------------------------------------------------ detection
def det_problem(seed: int, ties: bool, n_img: int = 20, k: int = 3):
    """Random GT (some difficult) and detections near them; scores rounded to 1 decimal when ``ties``."""
    rng = np.random.default_rng(seed)
    gt_b, gt_l, gt_d, pb, ps, pl, dets, gts = [], [], [], [], [], [], [], []
    for i in range(n_img):
        m = int(rng.integers(0, 4))
        xy = rng.uniform(0, 40, (m, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(5, 20, (m, 2))], 1)
        lab, dif = rng.integers(0, k, m), rng.random(m) < 0.2
        r = int(rng.integers(0, 10))
        idx = rng.integers(0, max(m, 1), r)  # the GT each detection is drawn near
        src = boxes[idx] if m else rng.uniform(0, 40, (r, 4))
        pbox = src + rng.normal(0, 2, (r, 4))
        pbox = np.concatenate([np.minimum(pbox[:, :2], pbox[:, 2:]), np.maximum(pbox[:, :2], pbox[:, 2:])], 1)
        plab = np.where((rng.random(r) < 0.8) & (m > 0), lab[idx] if m else 0, rng.integers(0, k, r))
        psc = np.round(rng.random(r), 1) if ties else rng.random(r)
        gt_b.append(boxes), gt_l.append(lab), gt_d.append(dif), pb.append(pbox), ps.append(psc), pl.append(plab)
        dets += [(i, psc[j], pbox[j], plab[j]) for j in range(r)]
        gts.append([(boxes[j], lab[j], dif[j]) for j in range(m)])
    return (pb, ps, pl, gt_b, gt_l, gt_d), dets, gts


@pytest.mark.parametrize("mode", ["voc07_devkit", "voc07_py"])
@pytest.mark.parametrize("seed, ties", [(4, False), (1, True), (5, True)])
def test_detection_devkit_modes_equal_the_devkit_loop(mode, seed, ties):
    args, dets, gts = det_problem(seed, ties)
    out = detection_ap(*args, num_classes=3, mode=mode)
    assert out["ap_variant"] == mode and (out["ap"] > 0.1).sum() >= 2  # not a trivial case
    # and one where the variant matters: the thresholds (seed 4), tied detections (the others)
    assert not np.array_equal(out["ap"], detection_ap(*args, num_classes=3)["ap"])
    for c in range(3):
        if not np.isnan(out["ap"][c]):
            assert out["ap"][c] == devkit_det_ap(dets, gts, c, THRESHOLDS[mode])


def test_detection_ap_names_its_variant():
    args, _, _ = det_problem(1, False)
    assert detection_ap(*args, num_classes=3)["ap_variant"] == "voc07"
    assert detection_ap(*args, num_classes=3, use_07=False)["ap_variant"] == "voc_area"
    with pytest.raises(ValueError, match="unknown AP mode 'voc12'"):
        detection_ap(*args, num_classes=3, mode="voc12")


# ------------------------------------------------------------------------------------- mlic vs ML-GCN / ASL
def test_mlic_equals_sort_based_ap_without_ties():
    s, t = random_problem(k=6, seed=5, ignore=0.1)
    assert len(np.unique(s)) == s.size  # no ties at all
    for j in range(t.shape[1]):
        order = np.argsort(-s[:, j], kind="stable")
        assert average_precision(s[:, j : j + 1], t[:, j : j + 1], "mlic")[0] == pytest.approx(
            sort_based_ap(s[:, j], t[:, j], order), abs=1e-12)


def test_mlic_differs_from_sort_based_ap_with_ties():
    # one negative above, then a positive tied with a negative, then a positive
    s = np.array([0.9, 0.5, 0.5, 0.1])
    t = np.array([0, 1, 0, 1])
    mlic = average_precision(s[:, None], t[:, None], "mlic")[0]
    assert mlic == pytest.approx((1 / 3 + 2 / 4) / 2)  # the tie group enters together: precision 1/3 at its end
    positive_first = sort_based_ap(s, t, np.array([0, 1, 2, 3]))  # precision 1/2 at the positive
    negative_first = sort_based_ap(s, t, np.array([0, 2, 1, 3]))  # precision 1/3 at the positive
    assert positive_first == pytest.approx((1 / 2 + 2 / 4) / 2) and negative_first == pytest.approx(mlic)
    # a tie group of positives only, after a negative: the sort gives them 1/2 and 2/3, mlic 2/3 to both, so
    # mlic is above every order the sort could pick
    s, t = np.array([0.9, 0.5, 0.5]), np.array([0, 1, 1])
    assert average_precision(s[:, None], t[:, None], "mlic")[0] == pytest.approx(2 / 3)
    assert sort_based_ap(s, t, np.array([0, 1, 2])) == pytest.approx((1 / 2 + 2 / 3) / 2)
