"""Evaluating the teacher (mlkd.evaluation.evaluate, mlkd.inference.predict): per-class detections, top boxes, reports, the CLI, class order."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torchvision.ops import nms

from mlkd.cli import main
from mlkd.evaluation.evaluate import evaluate_teacher, evaluate_teacher_model, teacher_report
from mlkd.inference.predict import predict_teacher
from mlkd.models.build import model_from_checkpoint
from mlkd.models.wsddn import NMS_IOU, class_detections, top_boxes
from mlkd.proposals.attach import open_split
from mlkd.training.teacher import TeacherConfig, train_teacher
from mlkd.utils.checkpoint import load_checkpoint
from mlkd.utils.config import load_config


@pytest.fixture(scope="module")
def checkpoint(teacher_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher_run")
    return train_teacher(load_config(TeacherConfig, None, teacher_data.overrides(out, **{"optim.epochs": 2})))


def random_detection_input(seed: int, r: int = 40, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 60, (r, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 40, (r, 2))], 1).astype(np.float32)
    return boxes, rng.random((r, k)).astype(np.float32)


@pytest.mark.parametrize("max_per_class", [100, 3])
def test_class_detections_match_per_class_nms_loop(max_per_class):
    boxes, regions = random_detection_input(0)
    got_boxes, got_scores, got_labels = class_detections(boxes, regions, max_per_class=max_per_class)
    assert np.all(np.diff(got_scores) <= 0)  # best first over all classes
    for k in range(regions.shape[1]):
        keep = nms(torch.from_numpy(boxes), torch.from_numpy(regions[:, k]), NMS_IOU)[:max_per_class].numpy()
        mine = got_labels == k
        np.testing.assert_array_equal(got_boxes[mine], boxes[keep])
        np.testing.assert_array_equal(got_scores[mine], regions[keep, k])
    assert len(got_labels) == sum(min(max_per_class, len(nms(torch.from_numpy(boxes), torch.from_numpy(regions[:, k]),
                                                             NMS_IOU))) for k in range(3))


def test_class_detections_suppress_overlaps_of_one_class_only():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 11], [50, 50, 60, 60]], np.float32)
    regions = np.array([[0.9, 0.1], [0.8, 0.7], [0.2, 0.3]], np.float32)
    b, s, lab = class_detections(boxes, regions)
    assert sorted((int(k), round(float(v), 4)) for k, v in zip(lab, s)) == [(0, 0.2), (0, 0.9), (1, 0.3), (1, 0.7)]


def test_top_boxes():
    boxes, regions = random_detection_input(1, r=7, k=4)
    other = random_detection_input(2, r=3, k=4)
    tops = top_boxes([boxes, other[0]], [regions, other[1]])
    assert tops.shape == (2, 4, 4)
    for k in range(4):
        np.testing.assert_array_equal(tops[0, k], boxes[np.argmax(regions[:, k])])
        np.testing.assert_array_equal(tops[1, k], other[0][np.argmax(other[1][:, k])])


def test_predict_and_report(teacher_data, checkpoint):
    ckpt = load_checkpoint(checkpoint, "teacher")
    model = model_from_checkpoint(ckpt)
    assert not model.training
    dataset = open_split(str(teacher_data.val), None, str(teacher_data.val_proposals))
    pred = predict_teacher(model, dataset, "torchvision", torch.device("cpu"), (80,), max_proposals=30,
                           progress=False)
    n, k = len(dataset), dataset.num_classes
    assert pred["image_scores"].shape == (n, k) and pred["image_scores"].dtype == np.float32
    assert pred["image_ids"] == [r.image_id for r in dataset.records]
    for p, r, s in zip(pred["proposals"], pred["region_scores"], pred["image_scores"]):
        assert p.shape == (r.shape[0], 4) and r.shape[1] == k and 0 < r.shape[0] <= 30
        np.testing.assert_allclose(s, r.sum(0), rtol=1e-6)
    report = teacher_report(dataset, pred)
    assert {"dataset", "classification", "detection", "corloc", "corloc_largest_proposal"} <= set(report)
    assert 0 <= report["classification"]["mAP"]["mlic"] <= 1 and 0 <= report["corloc"]["corloc"] <= 1
    assert len(report["detection"]["ap"]) == k and report["detection"]["ap_variant"] == "voc07"
    assert teacher_report(dataset, pred, detection_mode="voc07_devkit")["detection"]["ap_variant"] == "voc07_devkit"
    assert set(teacher_report(dataset, pred, detection=False)) == {"dataset", "classification"}

    # several test views: region scores are the mean of the single views
    multi = predict_teacher(model, dataset, "torchvision", torch.device("cpu"), (64, 96), max_proposals=30,
                            progress=False)
    views = [predict_teacher(model, dataset, "torchvision", torch.device("cpu"), (s,), max_proposals=30,
                             progress=False) for s in (64, 96)]
    for i in range(n):
        np.testing.assert_allclose(multi["region_scores"][i],
                                   (views[0]["region_scores"][i] + views[1]["region_scores"][i]) / 2, rtol=1e-6)
    flipped = predict_teacher(model, dataset, "torchvision", torch.device("cpu"), (80,), flip=True,
                              max_proposals=30, progress=False)
    assert all(f.shape == r.shape for f, r in zip(flipped["region_scores"], pred["region_scores"]))


def test_evaluate_teacher_cli_writes_json(teacher_data, checkpoint, tmp_path, capsys):
    out = tmp_path / "reports" / "teacher.json"
    code = main(["evaluate-teacher", "--checkpoint", str(checkpoint), "--dataset", str(teacher_data.val),
                 "--proposals", str(teacher_data.val_proposals), "--out", str(out), "--workers", "0",
                 "--device", "cpu", "--quiet", "--summary", "--detection-ap", "voc07_devkit"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "teacher: mAP[mlic] " in printed and "detAP@0.5[voc07_devkit] " in printed  # every AP names its variant
    report = json.loads(out.read_text())
    assert report["detection"]["ap_variant"] == "voc07_devkit" and "voc07_devkit" in report["classification"]["mAP"]
    assert {"classification", "detection", "corloc", "settings", "checkpoint", "dataset"} <= set(report)
    # the training config's test scale and proposal budget unless given
    assert report["settings"] == {"scales": [80], "flip": False, "max_proposals": 30, "nms_iou": NMS_IOU,
                                  "input_convention": "torchvision"}
    assert report["checkpoint"] == str(checkpoint)
    again = evaluate_teacher(str(checkpoint), str(teacher_data.val), str(teacher_data.val_proposals),
                             progress=False, scales=[80])
    assert again["classification"]["mAP"] == pytest.approx(report["classification"]["mAP"])


def test_class_order_mismatch_names_both_orders(teacher_data, checkpoint, tmp_path, capsys):
    classes = load_checkpoint(checkpoint)["classes"]
    swapped = [classes[1], classes[0], *classes[2:]]
    model = model_from_checkpoint(load_checkpoint(checkpoint))
    with pytest.raises(ValueError) as e:
        evaluate_teacher_model(model, str(teacher_data.val), None, classes, "torchvision",
                               options={"classes": swapped}, progress=False)
    assert "class order of dataset" in str(e.value) and str(classes) in str(e.value) and str(swapped) in str(e.value)

    class_file = tmp_path / "swapped.txt"
    class_file.write_text("\n".join(swapped) + "\n")
    code = main(["evaluate-teacher", "--checkpoint", str(checkpoint), "--dataset", str(teacher_data.val),
                 "--option", f"classes={class_file}", "--workers", "0", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "class order" in err and str(swapped) in err


def test_prediction_leaves_the_dataset_as_it_was_even_when_it_fails(teacher_data, checkpoint):
    """predict_* build their own view of the dataset; the caller's transform and records stay the same objects."""
    model = model_from_checkpoint(load_checkpoint(checkpoint))
    dataset = open_split(str(teacher_data.val), None, str(teacher_data.val_proposals))
    transform, records = object(), dataset.records
    dataset.transform = transform
    predict_teacher(model, dataset, "torchvision", torch.device("cpu"), (64,), progress=False)
    assert dataset.transform is transform and dataset.records is records

    def broken(*args, **kwargs):
        raise RuntimeError("boom")
    model.forward = broken
    with pytest.raises(RuntimeError, match="boom"):
        predict_teacher(model, dataset, "torchvision", torch.device("cpu"), (64,), progress=False)
    assert dataset.transform is transform and dataset.records is records
    first = dataset.view(indices=[0])
    assert len(first) == 1 and len(dataset) == len(records) and first.identity == dataset.identity
