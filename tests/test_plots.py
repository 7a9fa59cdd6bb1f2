"""`mlkd evaluate --plots` and `mlkd evaluate-teacher --plots`: the numbers behind the charts (precision-recall
curves that integrate to the mlic AP, reliability bins, co-occurrence, image AP), and a real run of both commands
whose every file decodes, whose index.html shows every image and the key numbers and fetches nothing."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from mlkd.cli import main
from mlkd.evaluation.page import gallery_order, write_plots
from mlkd.metrics import (average_precision, co_occurrence, curve_area, evaluate_all, per_image_ap,
                          precision_recall_curve, reliability)

CHARTS = ["ap_per_class.png", "pr_curves.png", "scores_pooled.png", "scores_per_class.png", "co_occurrence.png",
          "calibration.png"]
GALLERIES = ["gallery_best.jpg", "gallery_worst.jpg"]
TEACHER_ONLY = ["detection_ap_per_class.png", "corloc_per_class.png"]


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
    best, worst = gallery_order(np.array([1.0, 1 / 3, np.nan, 1.0]), np.array([1, 1, 0, 2]), n=2)
    np.testing.assert_array_equal(best, [3, 0])  # a tie goes to more labels
    np.testing.assert_array_equal(worst, [1, 0])


def check_folder(folder: Path, names: list[str]) -> str:
    """Every file decodes as an image; index.html shows each and fetches nothing. Returns the page."""
    for name in names:
        image = cv2.imread(str(folder / name))
        assert image is not None and image.shape[0] > 50 and image.shape[1] > 50, name
    page = (folder / "index.html").read_text()
    shown = set(re.findall(r'<img src="([^"]+)"', page))
    assert shown == set(names)
    assert sorted(p.name for p in folder.iterdir()) == sorted(names + ["index.html"])  # no .tmp left behind
    assert not re.search(r"<script|https?://|//[a-z]|@import|url\(", page, re.IGNORECASE)
    return page


def test_evaluate_plots_on_a_trained_student(trained, tmp_path, capsys):
    folder, report_path, scores_path = tmp_path / "plots", tmp_path / "report.json", tmp_path / "scores.npy"
    assert main(["evaluate", "--checkpoint", str(trained.student), "--dataset", str(trained.data.val), "--workers",
                 "0", "--quiet", "--out", str(report_path), "--scores", str(scores_path), "--plots",
                 str(folder)]) == 0
    assert f"plots written to {folder / 'index.html'}" in capsys.readouterr().out
    report = json.loads(report_path.read_text())["classification"]
    page = check_folder(folder, CHARTS + GALLERIES)
    for mode, value in report["mAP"].items():
        assert f"<td>mAP ({mode})</td><td>{100 * value:.2f}</td>" in page
    for key in ("CF1", "OF1"):
        assert f"<td>{key} (p &gt;= 0.5)</td><td>{100 * report['all_labels'][key]:.2f}</td>" in page
    # the curves drawn are those whose area is the reported AP
    scores, labels = np.load(scores_path), _labels(trained)
    for k, ap in enumerate(report["ap"]["mlic"]):
        area = curve_area(*precision_recall_curve(scores, labels, k)[:2])
        assert (np.isnan(area) and ap is None) or area == pytest.approx(ap, abs=1e-12)


def _labels(trained) -> np.ndarray:
    from mlkd.proposals.attach import open_split

    return open_split(str(trained.data.val)).label_matrix()


def test_evaluate_teacher_plots_add_detection_corloc_and_proposals(trained, tmp_path, capsys):
    folder, report_path = tmp_path / "plots", tmp_path / "report.json"
    assert main(["evaluate-teacher", "--checkpoint", str(trained.teacher), "--dataset", str(trained.data.val),
                 "--proposals", str(trained.data.val_proposals), "--workers", "0", "--quiet", "--out",
                 str(report_path), "--plots", str(folder)]) == 0
    report = json.loads(report_path.read_text())
    page = check_folder(folder, CHARTS + TEACHER_ONLY + GALLERIES)
    assert f"<td>mAP (mlic)</td><td>{100 * report['classification']['mAP']['mlic']:.2f}</td>" in page
    assert f"<td>detection mAP@0.5 (VOC07)</td><td>{100 * report['detection']['mAP']:.2f}</td>" in page
    assert f"<td>CorLoc</td><td>{100 * report['corloc']['corloc']:.2f}</td>" in page
    assert report["checkpoint"] in page


def test_write_plots_with_unlabelled_images_classes_without_positives_and_ignored_entries(tmp_path):
    rng = np.random.default_rng(1)
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"im{i}.png")
        cv2.imwrite(str(paths[-1]), rng.integers(0, 255, (40 + 10 * i, 60, 3), dtype=np.uint8))
    scores = rng.random((5, 3))
    targets = np.array([[1, 0, 0], [0, 0, 0], [1, -1, 0], [0, 1, 0], [1, 1, 0]])  # class 2: no positives
    report = {"dataset": {"name": "tiny", "split": "test"},
              "classification": evaluate_all(scores, targets, ["a <b>", "c", "d"])}
    files = write_plots(tmp_path / "out", "student", report, scores, targets, [p.name for p in paths], paths)
    assert files[-1].name == "index.html"
    page = check_folder(tmp_path / "out", CHARTS + GALLERIES)
    assert "a &lt;b&gt;" in page and "a <b>" not in page  # class names are escaped
    assert "Excluded from mAP (no positives): d" in page


def test_a_plots_path_that_is_a_file_is_refused_before_evaluating(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("mlkd.evaluation.evaluate.load_checkpoint", lambda *a: pytest.fail("evaluated before the check"))
    taken = tmp_path / "plots.png"
    taken.write_bytes(b"")
    for command in (["evaluate", "--checkpoint", str(trained.student)],
                    ["evaluate-teacher", "--checkpoint", str(trained.teacher)]):
        assert main([*command, "--dataset", str(trained.data.val), "--quiet", "--plots", str(taken)]) == 1
        assert f"the plots folder {taken} is a file" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["evaluate", "evaluate-teacher"])
def test_plots_option_is_documented(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "--plots DIR" in capsys.readouterr().out


def test_the_plotting_modules_import_no_matplotlib_until_they_draw():
    code = ("import sys, mlkd.evaluation.evaluate, mlkd.evaluation.page, mlkd.evaluation.charts\n"
            "print([m for m in sys.modules if m.startswith('matplotlib')])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_drawing_leaves_the_callers_matplotlib_backend_unchanged(tmp_path):
    # a notebook's backend, chosen before mlkd draws: the training curves, a chart and the dataset plot keep it
    code = """
import sys
import matplotlib
matplotlib.use("svg")
from pathlib import Path
import numpy as np
from mlkd.data import build_dataset
from mlkd.data.stats import plot_class_frequencies
from mlkd.data.synthetic import generate
from mlkd.evaluation.charts import pr_curves
from mlkd.utils.runlog import RunLog

out = Path(sys.argv[1])
log = RunLog(out)
for i in range(3):
    log.write({"type": "iter", "iteration": i, "lr": 0.1, "loss_total": 1.0 / (i + 1)})
log.write({"type": "epoch", "epoch": 0, "val_mAP": 0.5})
log.plot()
rng = np.random.default_rng(0)
pr_curves(rng.random((8, 2)), np.tile([[1, 0], [0, 1]], (4, 1)), ["a", "b"], out / "pr.png", "pr")
splits = generate(out / "data", 4, image_size=64, progress=False)
plot_class_frequencies([build_dataset(str(splits["train"]))], out / "frequencies.png")
print(matplotlib.get_backend())
"""
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "svg"
    for name in ("curves.png", "pr.png", "frequencies.png"):
        assert cv2.imread(str(tmp_path / name)) is not None, name
