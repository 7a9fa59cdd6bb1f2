"""Tests of mlkd.metrics against independent references: sklearn, naive loops, hand-computed cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from mlkd.cli import main
from mlkd.metrics import (AP_MODES, average_precision, corloc, detection_ap, evaluate_all, format_table,
                          report_to_json, threshold_metrics)

# the modes that merge tie groups (the devkit modes rank tied entries in input order: test_metrics_protocols.py)
MERGED_MODES = ("mlic", "voc07", "voc_area")


# ------------------------------------------------------------------------------- naive references
def naive_ap(scores: np.ndarray, labels: np.ndarray, mode: str) -> float:
    """One class, plain Python: PR points at each distinct score (tied scores form one step)."""
    keep = [i for i in range(len(labels)) if labels[i] != -1]
    s = [float(scores[i]) for i in keep]
    y = [int(labels[i]) for i in keep]
    npos = sum(1 for v in y if v == 1)
    if npos == 0:
        return float("nan")
    recs, precs, tps = [], [], []
    for thr in sorted(set(s), reverse=True):
        tp = sum(1 for v, x in zip(y, s) if x >= thr and v == 1)
        fp = sum(1 for v, x in zip(y, s) if x >= thr and v == 0)
        tps.append(tp)
        recs.append(tp / npos)
        precs.append(tp / (tp + fp) if tp + fp else 0.0)
    if mode == "mlic":  # sum of (R_n - R_{n-1}) P_n
        total, prev = 0.0, 0.0
        for r, p in zip(recs, precs):
            total += (r - prev) * p
            prev = r
        return total
    if mode == "voc07":
        total = 0.0
        for t in range(11):
            ok = [p for tp, p in zip(tps, precs) if 10 * tp >= t * npos]
            total += max(ok) if ok else 0.0
        return total / 11
    mrec, mpre = [0.0] + recs + [1.0], [0.0] + precs + [0.0]  # VOC2010+ devkit recipe
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    return sum((mrec[i + 1] - mrec[i]) * mpre[i + 1] for i in range(len(mrec) - 1) if mrec[i + 1] != mrec[i])


def naive_prf(pred: np.ndarray, t: np.ndarray) -> dict[str, float]:
    """ML-GCN-style counts with loops; precision 0 for never-predicted classes; CP/CR over classes with positives."""
    n, k = t.shape
    nc, np_, ng = [0] * k, [0] * k, [0] * k
    for i in range(n):
        for j in range(k):
            if t[i, j] == -1:
                continue
            nc[j] += int(pred[i, j] and t[i, j] == 1)
            np_[j] += int(pred[i, j])
            ng[j] += int(t[i, j] == 1)
    cls = [j for j in range(k) if ng[j] > 0]
    cp = sum(nc[j] / np_[j] if np_[j] else 0.0 for j in cls) / len(cls)
    cr = sum(nc[j] / ng[j] for j in cls) / len(cls)
    op, orr = sum(nc) / sum(np_), sum(nc) / sum(ng)
    return {"CP": cp, "CR": cr, "CF1": 2 * cp * cr / (cp + cr), "OP": op, "OR": orr, "OF1": 2 * op * orr / (op + orr)}


def naive_iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def naive_det_ap07(dets, gts, c: int, thr: float = 0.5) -> float:
    """VOC devkit loop for class c. dets: (img, score, box, label); gts[img]: list of (box, label, difficult)."""
    npos = sum(1 for g in gts for (_, lab, dif) in g if lab == c and not dif)
    mine = sorted([d for d in dets if d[3] == c], key=lambda d: -d[1])
    taken = [[False] * len(g) for g in gts]
    tp, fp = [], []
    for img, _, box, _ in mine:
        best, jbest = -1.0, -1
        for j, (gb, lab, _) in enumerate(gts[img]):
            if lab == c and naive_iou(box, gb) > best:
                best, jbest = naive_iou(box, gb), j
        if best >= thr and gts[img][jbest][2]:
            continue  # difficult: neither
        hit = best >= thr and not taken[img][jbest]
        if hit:
            taken[img][jbest] = True
        tp.append(int(hit))
        fp.append(int(not hit))
    ctp, cfp, rec, prec = 0, 0, [], []
    for a, b in zip(tp, fp):
        ctp, cfp = ctp + a, cfp + b
        rec.append(ctp / npos)
        prec.append(ctp / (ctp + cfp))
    return sum(max([p for r, p in zip(rec, prec) if r >= t / 10 - 1e-12] or [0.0]) for t in range(11)) / 11


def random_problem(n=60, k=7, seed=0, ties=False, ignore=0.0):
    rng = np.random.default_rng(seed)
    t = (rng.random((n, k)) < 0.3).astype(np.int8)
    s = rng.random((n, k)) + 0.4 * t
    if ties:
        s = np.round(s, 1)
    if ignore:
        t[rng.random((n, k)) < ignore] = -1
    return s, t


# ------------------------------------------------------------------------------------------- AP
def test_mlic_equals_sklearn_tie_free_and_with_ties():
    for ties in (False, True):
        s, t = random_problem(ties=ties)
        ref = [average_precision_score(t[:, j], s[:, j]) for j in range(t.shape[1])]
        np.testing.assert_allclose(average_precision(s, t, "mlic"), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", MERGED_MODES)
@pytest.mark.parametrize("ties,ignore", [(False, 0.0), (True, 0.0), (True, 0.15)])
def test_ap_matches_naive_loop(mode, ties, ignore):
    s, t = random_problem(n=45, k=5, seed=3, ties=ties, ignore=ignore)
    ref = [naive_ap(s[:, j], t[:, j], mode) for j in range(t.shape[1])]
    np.testing.assert_allclose(average_precision(s, t, mode), ref, rtol=0, atol=1e-12)


def test_ap_hand_computed():
    # ranking: +, -, +, -  -> precisions at positives 1, 2/3
    s, t = np.array([[0.9], [0.8], [0.7], [0.6]]), np.array([[1], [0], [1], [0]])
    np.testing.assert_allclose(average_precision(s, t, "mlic"), [(1 + 2 / 3) / 2])
    np.testing.assert_allclose(average_precision(s, t, "voc_area"), [(1 + 2 / 3) / 2])
    np.testing.assert_allclose(average_precision(s, t, "voc07"), [(6 * 1 + 5 * 2 / 3) / 11])
    # ranking: -, +, +  -> raw precisions 1/2, 2/3; the envelope lifts the first to 2/3
    s, t = np.array([[0.9], [0.8], [0.7]]), np.array([[0], [1], [1]])
    np.testing.assert_allclose(average_precision(s, t, "mlic"), [(1 / 2 + 2 / 3) / 2])
    np.testing.assert_allclose(average_precision(s, t, "voc_area"), [2 / 3])
    np.testing.assert_allclose(average_precision(s, t, "voc07"), [2 / 3])
    # a tie between a positive and a negative is one step: precision 1/2 whatever the input order
    for order in ([0, 1], [1, 0]):
        s, t = np.array([[0.5], [0.5]])[order], np.array([[1], [0]])[order]
        np.testing.assert_allclose(average_precision(s, t, "mlic"), [0.5])


def test_voc07_recall_thresholds_are_exact():
    # 10 positives: recall 3/10 must count as reaching t = 0.3 (np.arange(0, 1.1, 0.1)[3] > 0.3 in floats)
    t = np.array([[1]] * 3 + [[0]] * 3 + [[1]] * 7)
    s = -np.arange(len(t), dtype=float)[:, None]
    np.testing.assert_allclose(average_precision(s, t, "voc07"), [naive_ap(s[:, 0], t[:, 0], "voc07")])
    assert average_precision(s, t, "voc07")[0] == pytest.approx((4 * 1.0 + 7 * 10 / 13) / 11)


def test_ignored_entries_equal_dropping_them():
    s, t = random_problem(n=50, k=6, seed=5, ties=True, ignore=0.2)
    for mode in AP_MODES:
        ap = average_precision(s, t, mode)
        for j in range(t.shape[1]):
            keep = t[:, j] != -1
            alone = average_precision(s[keep, j : j + 1], t[keep, j : j + 1], mode)[0]
            assert ap[j] == pytest.approx(alone, abs=1e-12)


def test_float32_equals_float64_and_row_order_irrelevant():
    s, t = random_problem(n=80, k=5, seed=7, ties=True, ignore=0.1)
    s32 = s.astype(np.float32)
    perm = np.random.default_rng(0).permutation(len(s))
    for mode in AP_MODES:
        a = average_precision(s32, t, mode)
        np.testing.assert_array_equal(a, average_precision(s32.astype(np.float64), t, mode))
        if mode in MERGED_MODES:  # the devkit modes depend on the order of tied rows, as the devkits do
            np.testing.assert_allclose(a, average_precision(s32[perm], t[perm], mode), rtol=0, atol=1e-12)
    assert report_to_json(evaluate_all(s32, t)) == report_to_json(evaluate_all(s32.astype(np.float64), t))


def test_no_positive_and_all_ignored_classes_are_excluded_and_listed():
    s, t = random_problem(n=30, k=4, seed=2)
    t[:, 1] = 0  # no positives
    t[:, 3] = -1  # everything ignored
    for mode in AP_MODES:
        ap = average_precision(s, t, mode)
        assert np.isnan(ap[[1, 3]]).all() and not np.isnan(ap[[0, 2]]).any()
    rep = evaluate_all(s, t, class_names=["a", "b", "c", "d"])
    assert rep["excluded_classes"] == [{"index": 1, "name": "b"}, {"index": 3, "name": "d"}]
    assert rep["mAP"]["mlic"] == pytest.approx(np.mean(average_precision(s, t)[[0, 2]]))
    text = format_table(rep)
    assert "1 (b)" in text and "3 (d)" in text and "n/a" in text


def test_all_classes_without_positives_give_nan_not_crash():
    s = np.random.default_rng(0).random((5, 3))
    rep = evaluate_all(s, np.zeros((5, 3), np.int8))
    assert all(np.isnan(v) for v in rep["mAP"].values()) and len(rep["excluded_classes"]) == 3
    assert np.isnan(rep["all_labels"]["CR"]) and json.loads(report_to_json(rep))["mAP"]["mlic"] is None


# -------------------------------------------------------------------------------- threshold metrics
def test_threshold_metrics_hand_computed():
    s = np.array([[0.9, 0.6, 0.1], [0.2, 0.7, 0.8], [0.6, 0.3, 0.4], [0.1, 0.2, 0.3]])
    t = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 1], [1, 0, 0]])
    r = threshold_metrics(s, t, 0.5)
    # class 0: predicted imgs {0, 2}, correct {0}, gt {0, 3}: P 1/2 R 1/2; class 1: pred {0, 1}, correct {1},
    # gt {1}: P 1/2 R 1; class 2: pred {1}, correct {1}, gt {1, 2}: P 1 R 1/2
    cp, cr = (0.5 + 0.5 + 1) / 3, (0.5 + 1 + 0.5) / 3
    assert r["CP"] == pytest.approx(cp) and r["CR"] == pytest.approx(cr)
    assert r["CF1"] == pytest.approx(2 * cp * cr / (cp + cr))
    assert r["OP"] == pytest.approx(3 / 5) and r["OR"] == pytest.approx(3 / 5) and r["OF1"] == pytest.approx(3 / 5)
    # a class never predicted has precision 0 (threshold above every score of class 2)
    r = threshold_metrics(s * np.array([1, 1, 0.5]), t, 0.5)
    assert r["per_class_precision"][2] == 0.0 and r["CP"] == pytest.approx((0.5 + 0.5 + 0) / 3)


def test_top3_hand_computed():
    s = np.array([[0.9, 0.8, 0.7, 0.6, 0.1], [0.2, 0.4, 0.3, 0.1, 0.35]])
    t = np.array([[1, 0, 0, 1, 0], [0, 1, 1, 0, 0]])
    plain = threshold_metrics(s, t, None, top_k=3)
    # img 0 predicts {0,1,2} (2 wrong, label 3 missed); img 1 predicts {1,4,2} (1 wrong)
    assert plain["OP"] == pytest.approx(3 / 6) and plain["OR"] == pytest.approx(3 / 4)
    thr = threshold_metrics(s, t, 0.5, top_k=3)  # img 0 keeps {0,1,2}; img 1 nothing passes 0.5
    assert thr["OP"] == pytest.approx(1 / 3) and thr["OR"] == pytest.approx(1 / 4)
    # classes 0..4 precision: 1, 1/2, 1/2, 0, 0 ; recall over classes with positives 0,1,2,3: 1,1,1,0
    assert plain["CP"] == pytest.approx((1 + 0.5 + 0.5 + 0 + 0) / 4)  # class 4 has no positives: excluded
    assert plain["CR"] == pytest.approx(3 / 4)


def test_top_k_ties_go_to_lower_index():
    s = np.array([[0.5, 0.5, 0.5, 0.5]])
    r = threshold_metrics(s, np.array([[0, 0, 1, 1]]), None, top_k=2)  # picks classes 0 and 1
    assert r["OP"] == 0.0
    r = threshold_metrics(s, np.array([[1, 1, 0, 0]]), None, top_k=2)
    assert r["OP"] == 1.0


@pytest.mark.parametrize("top_k", [None, 3])
def test_threshold_metrics_match_naive_with_ignored(top_k):
    s, t = random_problem(n=40, k=6, seed=11, ignore=0.1)
    s = s / s.max()
    pred = s >= 0.5
    if top_k:
        order = np.argsort(-s, axis=1, kind="stable")[:, :top_k]
        mask = np.zeros_like(pred)
        for i in range(len(s)):
            mask[i, order[i]] = True
        pred &= mask
    got, ref = threshold_metrics(s, t, 0.5, top_k=top_k), naive_prf(pred, t)
    for key, v in ref.items():
        assert got[key] == pytest.approx(v), key


def test_evaluate_all_is_consistent_with_parts():
    s, t = random_problem(n=50, k=5, seed=4, ignore=0.05)
    rep = evaluate_all(s, t, threshold=0.6, top_k=2)
    for mode in AP_MODES:
        np.testing.assert_allclose(rep["ap"][mode], average_precision(s, t, mode))
        assert rep["mAP"][mode] == pytest.approx(np.nanmean(average_precision(s, t, mode)))
    for key, (thr, k) in {"all_labels": (0.6, None), "top_k_thresholded": (0.6, 2), "top_k": (None, 2)}.items():
        ref = threshold_metrics(s, t, thr, top_k=k)
        assert all(rep[key][m] == pytest.approx(ref[m]) for m in ("CP", "CR", "CF1", "OP", "OR", "OF1"))
    assert rep["num_positives"] == [int(v) for v in (t == 1).sum(0)]
    assert "top-2, p >= 0.6" in format_table(rep)


# ---------------------------------------------------------------------------------------- detection
def test_detection_ap_voc07_hand_computed():
    gt_boxes = [np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float), np.array([[0, 0, 10, 10]], float)]
    gt_labels = [np.array([0, 0]), np.array([0])]
    gt_diff = [np.array([False, True]), np.array([False])]
    pred_boxes = [np.array([[0, 0, 10, 10], [0, 0, 10, 9], [20, 20, 30, 30], [50, 50, 60, 60]], float),
                  np.array([[0, 0, 10, 10]], float)]
    pred_scores = [np.array([0.9, 0.8, 0.7, 0.6]), np.array([0.5])]
    pred_labels = [np.array([0, 0, 0, 0]), np.array([0])]
    out = detection_ap(pred_boxes, pred_scores, pred_labels, gt_boxes, gt_labels, gt_diff, num_classes=2)
    # ranked: .9 TP, .8 duplicate FP, .7 difficult (ignored), .6 FP, .5 TP; npos = 2
    # points: (rec .5, prec 1), (.5, .5), (.5, 1/3), (1, 2/4) -> 6 thresholds at 1, 5 at 1/2
    assert out["ap"][0] == pytest.approx((6 * 1 + 5 * 0.5) / 11)
    assert np.isnan(out["ap"][1]) and out["excluded_classes"] == [{"index": 1, "name": None}]
    assert out["mAP"] == pytest.approx(out["ap"][0])
    area = detection_ap(pred_boxes, pred_scores, pred_labels, gt_boxes, gt_labels, gt_diff, 2, use_07=False)
    assert area["ap"][0] == pytest.approx(0.5 * 1 + 0.5 * 0.5)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_detection_ap_matches_devkit_loop_on_random_boxes(seed):
    rng = np.random.default_rng(seed)
    n_img, k = 15, 3
    gt_b, gt_l, gt_d, pb, ps, pl, dets, gts = [], [], [], [], [], [], [], []
    for i in range(n_img):
        m = rng.integers(0, 4)
        xy = rng.uniform(0, 40, (m, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(5, 20, (m, 2))], 1)
        lab, dif = rng.integers(0, k, m), rng.random(m) < 0.2
        r = rng.integers(0, 10)
        idx = rng.integers(0, max(m, 1), r)
        src = boxes[idx] if m else rng.uniform(0, 40, (r, 4))
        pbox = src + rng.normal(0, 2, (r, 4))
        pbox = np.concatenate([np.minimum(pbox[:, :2], pbox[:, 2:]), np.maximum(pbox[:, :2], pbox[:, 2:])], 1)
        plab = np.where((rng.random(r) < 0.8) & (m > 0), lab[idx] if m else 0, rng.integers(0, k, r))
        psc = rng.random(r)
        gt_b.append(boxes), gt_l.append(lab), gt_d.append(dif), pb.append(pbox), ps.append(psc), pl.append(plab)
        dets += [(i, psc[j], pbox[j], plab[j]) for j in range(r)]
        gts.append([(boxes[j], lab[j], dif[j]) for j in range(m)])
    out = detection_ap(pb, ps, pl, gt_b, gt_l, gt_d, num_classes=k)
    assert (out["ap"] > 0.1).sum() >= 2  # the case is not trivial
    for c in range(k):
        if not np.isnan(out["ap"][c]):
            assert out["ap"][c] == pytest.approx(naive_det_ap07(dets, gts, c), abs=1e-12)


def test_detection_ap_handles_images_without_boxes_and_rejects_bad_input():
    out = detection_ap([np.zeros((0, 4))], [np.zeros(0)], [np.zeros(0)], [np.array([[0, 0, 5, 5.0]])],
                       [np.array([0])], None, num_classes=1)
    assert out["ap"][0] == 0.0  # a GT nobody detected
    with pytest.raises(ValueError, match="x2 >= x1"):
        detection_ap([np.array([[5, 0, 1, 4.0]])], [np.ones(1)], [np.zeros(1)], [np.zeros((0, 4))], [np.zeros(0)],
                     None, 1)
    with pytest.raises(ValueError, match=r"pred_labels\[0\] must be class indices in \[0, 1\), got 3"):
        detection_ap([np.array([[0, 0, 1, 4.0]])], [np.ones(1)], [np.array([3])], [np.zeros((0, 4))],
                     [np.zeros(0)], None, 1)
    with pytest.raises(ValueError, match="gt_boxes has 2 images but pred_boxes has 1"):
        detection_ap([np.zeros((0, 4))], [np.zeros(0)], [np.zeros(0)], [np.zeros((0, 4))] * 2, [np.zeros(0)], None, 1)


def test_corloc_hand_computed():
    gt_boxes = [np.array([[0, 0, 10, 10], [20, 20, 40, 40]], float), np.array([[0, 0, 10, 10]], float),
                np.zeros((0, 4))]
    gt_labels = [np.array([0, 1]), np.array([0]), np.zeros(0)]
    labels = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    top = np.zeros((3, 3, 4))
    top[0, 0] = [0, 0, 10, 10]  # hit
    top[0, 1] = [0, 0, 10, 10]  # class 1's GT is elsewhere: miss (a class-0 box does not count)
    top[1, 0] = [0, 0, 10, 5]  # IoU exactly 0.5: hit (>=)
    top[2] = [1, 1, 2, 2]  # negative image: not counted
    out = corloc(top, labels, gt_boxes, gt_labels, class_names=["a", "b", "c"])
    np.testing.assert_allclose(out["per_class"][:2], [1.0, 0.0])
    assert np.isnan(out["per_class"][2]) and out["corloc"] == pytest.approx(0.5)
    assert out["excluded_classes"] == [{"index": 2, "name": "c"}]
    with pytest.raises(ValueError, match="image 2 is labelled positive for class 0"):
        corloc(top, np.array([[1, 1, 0], [1, 0, 0], [1, 0, 0]]), gt_boxes, gt_labels)


# ---------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("scores,targets,match", [
    (np.zeros((3, 2)), np.zeros((3, 3)), r"targets shape \(3, 3\) does not match scores shape \(3, 2\)"),
    (np.zeros(3), np.zeros(3), "must be 2-D"),
    (np.array([[0.1, np.nan]]), np.array([[0, 1]]), "NaN .* image 0, class 1"),
    (np.array([[0.1, 0.2]]), np.array([[0, 2]]), "got 2 at image 0, class 1"),
    (np.array([[0.1, 0.2]]), np.array([[0, 0.5]]), "got 0.5"),
    (np.zeros((0, 2)), np.zeros((0, 2)), "at least one image"),
])
def test_bad_inputs_raise_with_the_value(scores, targets, match):
    with pytest.raises(ValueError, match=match):
        average_precision(scores, targets)
    with pytest.raises(ValueError, match=match):
        evaluate_all(scores, targets)


def test_bad_options_raise():
    s, t = random_problem(n=5, k=2)
    with pytest.raises(ValueError, match=r"unknown AP mode 'voc12'; choose one of \['mlic', 'voc07', "
                                         r"'voc07_devkit', 'voc07_py', 'voc_area'\]"):
        average_precision(s, t, "voc12")
    with pytest.raises(ValueError, match="got 3 class names for 2 score columns"):
        evaluate_all(s, t, class_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="top_k must be >= 1, got 0"):
        threshold_metrics(s, t, 0.5, top_k=0)
    with pytest.raises(ValueError, match="threshold must be a finite number .* got nan"):
        evaluate_all(s, t, threshold=float("nan"))


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_end_to_end(tmp_path, capsys):
    s, t = random_problem(n=30, k=3, seed=9)
    s = s / 1.4  # probabilities: the command refuses scores outside [0, 1]
    np.save(tmp_path / "s.npy", s.astype(np.float32))
    np.save(tmp_path / "t.npy", t)
    (tmp_path / "classes.txt").write_text("cat\ndog\n\nbird\n")
    base = ["metrics", "--scores", str(tmp_path / "s.npy"), "--targets", str(tmp_path / "t.npy")]
    assert main(base + ["--classes", str(tmp_path / "classes.txt"), "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "mAP [mlic]" in out and "bird" in out and "OF1" in out
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["class_names"] == ["cat", "dog", "bird"]
    assert rep["mAP"]["mlic"] == pytest.approx(float(np.mean(average_precision(s.astype(np.float32), t))))
    assert main(base + ["--ap-mode", "voc07", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert list(printed["mAP"]) == ["voc07"]


def test_cli_reports_errors(tmp_path, capsys):
    np.save(tmp_path / "s.npy", np.zeros((4, 2)))
    np.save(tmp_path / "t.npy", np.zeros((4, 3)))
    base = ["metrics", "--scores", str(tmp_path / "s.npy")]
    assert main(base + ["--targets", str(tmp_path / "missing.npy")]) == 1
    assert "targets file not found" in capsys.readouterr().err
    assert main(base + ["--targets", str(tmp_path / "t.npy")]) == 1
    assert (f"mlkd metrics: error: scores {tmp_path / 's.npy'} have shape (4, 2) but targets {tmp_path / 't.npy'} "
            "have shape (4, 3)") in capsys.readouterr().err
