"""The numbers behind the evaluation charts: precision-recall curves that integrate to the mlic AP, reliability
bins, co-occurrence, image AP."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from mlkd.metrics import average_precision, co_occurrence, curve_area, per_image_ap, precision_recall_curve, reliability


def tied_scores(rng: np.random.Generator, n: int = 60, k: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Scores rounded to one decimal (many ties) and labels with some ignored entries."""
    s = np.round(rng.random((n, k)), 1)
    t = (rng.random((n, k)) < 0.3).astype(np.int8)
    t[rng.random((n, k)) < 0.1] = -1
    return s, t


def test_the_area_of_the_pr_curve_is_the_mlic_ap_ties_and_ignored_entries_included():
    s, t = tied_scores(np.random.default_rng(0))
    ap = average_precision(s, t, "mlic")
    for k in range(s.shape[1]):
        precision, recall, thresholds = precision_recall_curve(s, t, k)
        keep = t[:, k] != -1
        assert curve_area(precision, recall) == pytest.approx(ap[k], abs=1e-12)
        assert curve_area(precision, recall) == pytest.approx(average_precision_score(t[keep, k], s[keep, k]))
        assert recall[0] == 0 and precision[0] == 1 and recall[-1] == 1 and np.all(np.diff(recall) >= 0)
        assert len(thresholds) == len(np.unique(s[keep, k])) + 1  # one point per tie group


def test_a_pr_curve_point_is_measured_at_the_end_of_its_tie_group():
    # docs/evaluation.md's worked example: scores 0.9, 0.8, 0.8, 0.3 with targets 1, 0, 1, 1; mlic AP 0.806
    precision, recall, thresholds = precision_recall_curve(np.array([[0.9], [0.8], [0.8], [0.3]]),
                                                           np.array([[1], [0], [1], [1]]), 0)
    np.testing.assert_allclose(precision, [1, 1, 2 / 3, 3 / 4])
    np.testing.assert_allclose(recall, [0, 1 / 3, 2 / 3, 1])
    np.testing.assert_array_equal(thresholds, [np.inf, 0.9, 0.8, 0.3])
    assert curve_area(precision, recall) == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)


def test_a_class_without_positives_has_a_nan_curve():
    precision, recall, _ = precision_recall_curve(np.array([[0.2], [0.7]]), np.array([[0], [-1]]), 0)
    assert np.isnan(recall).all() and np.isnan(curve_area(precision, recall))


def test_reliability_bins_counts_and_ece():
    s = np.array([[0.05, 0.95], [0.15, 1.0], [0.05, 0.5]])
    t = np.array([[0, 1], [1, 1], [1, -1]])  # the ignored 0.5 counts nowhere
    r = reliability(s, t, bins=10)
    np.testing.assert_array_equal(r["count"], [2, 1, 0, 0, 0, 0, 0, 0, 0, 2])  # 1.0 falls in the last bin
    np.testing.assert_array_equal(r["positives"], [1, 1, 0, 0, 0, 0, 0, 0, 0, 2])
    np.testing.assert_allclose(r["frequency"][[0, 1, 9]], [0.5, 1.0, 1.0])
    assert np.isnan(r["frequency"][2])
    assert r["ece"] == pytest.approx((2 * 0.45 + 1 * 0.85 + 2 * 0.025) / 5)
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\], got scores in \[0.05, 1.5\]"):
        reliability(np.array([[0.05, 1.5]]), np.array([[0, 1]]))


def test_co_occurrence_counts_images_with_both_labels():
    t = np.array([[1, 1, 0], [1, 0, 1], [1, 1, -1]])
    s = np.array([[0.9, 0.6, 0.1], [0.2, 0.7, 0.8], [0.5, 0.5, 0.9]])
    gt, pred = co_occurrence(s, t, 0.5)
    np.testing.assert_array_equal(gt, [[3, 2, 1], [2, 2, 0], [1, 0, 1]])
    np.testing.assert_array_equal(pred, [[2, 2, 0], [2, 3, 1], [0, 1, 1]])  # (2, 2): the -1 entry is not a prediction


def test_image_ap_ranks_an_images_classes():
    s = np.array([[0.9, 0.8, 0.1], [0.1, 0.8, 0.9], [0.5, 0.5, 0.5]])
    t = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    np.testing.assert_allclose(per_image_ap(s, t), [1.0, 1 / 3, np.nan])
