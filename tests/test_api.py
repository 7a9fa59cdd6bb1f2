"""The Python API (mlkd.load -> Classifier / Detector) and the safetensors model folder: every accepted image form
gives the same answer, the answers equal the dataset path and `mlkd predict`, and inference imports no training
machinery."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mlkd
from mlkd.cli import main
from mlkd.data.base import read_image
from mlkd.inference.predict import predict_student, predict_teacher
from mlkd.proposals.attach import open_split
from mlkd.utils.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def clf(trained):
    return mlkd.load(trained.student)


def val_images(trained) -> list:
    return [r.path for r in open_split(str(trained.data.val)).records]


def test_load_returns_a_classifier_for_a_student_and_a_detector_for_a_teacher(trained, clf):
    assert isinstance(clf, mlkd.Classifier) and not isinstance(clf, mlkd.Detector)
    det = mlkd.load(trained.teacher)
    assert isinstance(det, mlkd.Detector)
    ckpt = load_checkpoint(trained.student)
    assert clf.classes == ckpt["classes"] and clf.input_convention == "torchvision" and clf.image_size == 48
    assert clf.input_description["mean"] == (0.485, 0.456, 0.406) and not clf.model.training


def test_every_image_form_gives_the_same_probabilities(trained, clf):
    path = val_images(trained)[0]
    rgb = read_image(path)
    chw = torch.from_numpy(rgb).permute(2, 0, 1)
    forms = [path, str(path), Image.open(path), rgb, chw, chw.float() / 255]
    probs = [clf.probabilities(f) for f in forms]
    for p in probs[1:]:
        np.testing.assert_array_equal(p, probs[0])
    grey = clf.probabilities(rgb[:, :, 0])  # (H, W): replicated to three channels
    np.testing.assert_array_equal(grey, clf.probabilities(np.repeat(rgb[:, :, :1], 3, axis=2)))


def test_predict_returns_mappings_best_first_filtered_by_top_k_and_thresholds(trained, clf):
    paths = val_images(trained)
    probs = clf.probabilities(paths)
    one = clf.predict(paths[0])
    # every class with its probability, best first (near-equal probabilities may swap between a batch of one and
    # a batch of many, so the order is checked on the returned values, the values against the batch)
    assert isinstance(one, dict) and sorted(one) == sorted(clf.classes)
    assert list(one.values()) == sorted(one.values(), reverse=True)
    np.testing.assert_allclose([one[c] for c in clf.classes], probs[0], rtol=1e-5, atol=1e-6)
    many = clf.predict(paths, top_k=2)
    assert isinstance(many, list) and len(many) == len(paths) and all(len(m) == 2 for m in many)
    cut = float(np.median(probs))
    for row, p in zip(clf.predict(paths, threshold=cut), probs):
        assert set(row) == {clf.classes[c] for c in np.flatnonzero(p >= cut)}
    assert probs[:, 1:].max() < 1.0  # so a threshold of 1 (the highest: thresholds are probabilities) drops them
    per_class = {c: (0.0 if i == 0 else 1.0) for i, c in enumerate(clf.classes)}  # only class 0 can pass
    assert all(list(r) == [clf.classes[0]] for r in clf.predict(paths, threshold=per_class))
    batched, single = clf.predict(paths, threshold=[0.0] * len(clf.classes), top_k=1)[0], clf.predict(paths[0], top_k=1)
    assert list(batched) == list(single)  # the same best class; its probability up to the batch's float rounding
    np.testing.assert_allclose(list(batched.values()), list(single.values()), rtol=1e-5)
    np.testing.assert_array_equal(clf.predict(paths, as_arrays=True), probs)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((8, 8, 3), np.float32), "an array image must be uint8, got float32"),
    (np.zeros((8, 8, 4), np.uint8), r"must be \(H, W, 3\) RGB or \(H, W\) grey, got shape \(8, 8, 4\)"),
    (torch.zeros(8, 8, 3, dtype=torch.uint8), r"a tensor image must be \(3, H, W\) RGB, got shape \(8, 8, 3\)"),
    (torch.full((3, 8, 8), 2.0), r"uint8 \(0-255\) or float in \[0, 1\], got torch.float32 with values in \[2, 2\]"),
    (b"bytes", "cannot read an image from a bytes"),
])
def test_bad_images_are_clear_errors(clf, bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        clf.predict(bad)


def test_bad_thresholds_and_top_k_are_clear_errors(clf):
    with pytest.raises(ValueError, match=r"thresholds must name exactly the model's classes; unknown \['nope'\]"):
        clf.predict(np.zeros((8, 8, 3), np.uint8), threshold={"nope": 0.5})
    with pytest.raises(ValueError, match=r"threshold must be one number in \[0, 1\] or 10 of them"):
        clf.predict(np.zeros((8, 8, 3), np.uint8), threshold=[0.5, 0.5])
    with pytest.raises(ValueError, match=r"threshold\['circle_stripes'\] must be a number in \[0, 1\], got 2.0"):
        clf.predict(np.zeros((8, 8, 3), np.uint8), threshold={c: 2.0 for c in clf.classes})
    with pytest.raises(ValueError, match=r"top_k must be an integer >= 1 or None \(all\), got 0"):
        clf.predict(np.zeros((8, 8, 3), np.uint8), top_k=0)


def test_api_equals_the_dataset_path_and_mlkd_predict(trained, clf, tmp_path, capsys):
    dataset = open_split(str(trained.data.val))
    reference = predict_student(clf.model, dataset, clf.input_convention, clf.image_size, torch.device("cpu"),
                                progress=False)
    paths = val_images(trained)
    np.testing.assert_array_equal(clf.probabilities(paths), reference)
    assert main(["predict", "--checkpoint", str(trained.student), *map(str, paths), "--json", str(tmp_path / "p.json"),
                 "--quiet"]) == 0
    rows = json.loads((tmp_path / "p.json").read_text())
    assert [r["image"] for r in rows] == [str(p) for p in paths]
    cli = np.array([[r["probabilities"][c] for c in clf.classes] for r in rows], np.float32)
    np.testing.assert_array_equal(cli, reference)
    assert capsys.readouterr().out.count(": ") >= len(paths)


def test_inference_imports_no_training_ddp_lmdb_proposal_cache_scipy_or_matplotlib(trained):
    """In a fresh interpreter: what `import mlkd; mlkd.load(...).predict(...)` adds to what torch, torchvision and
    OpenCV import on their own."""
    image = val_images(trained)[0]
    code = f"""
import sys, torch, torchvision, cv2, numpy
before = set(sys.modules)
import mlkd
clf = mlkd.load({str(trained.student)!r})
print(clf.predict({str(image)!r}, top_k=1))
added = sorted(set(sys.modules) - before)
print("ADDED", " ".join(added))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    added = proc.stdout.split("ADDED", 1)[1].split()
    forbidden = ("mlkd.training.loop", "mlkd.utils.distributed", "mlkd.training.teacher", "mlkd.training.student", "mlkd.distill.objective",
                 "mlkd.evaluation.evaluate", "mlkd.demo", "mlkd.proposals.cache", "mlkd.proposals.generate",
                 "mlkd.proposals.convert", "lmdb", "scipy", "matplotlib", "torch.nn.parallel.distributed",
                 "tensorboard", "onnx", "onnxruntime", "timm", "huggingface_hub")
    loaded = [m for m in added if m.startswith(forbidden)]
    assert not loaded, loaded
    assert "mlkd.api" in added and "mlkd.models.build" in added  # the check is not vacuous


def test_safetensors_model_folder_round_trip_without_pickle(trained, clf, tmp_path, capsys, monkeypatch):
    out = tmp_path / "model"
    assert main(["export", "--checkpoint", str(trained.student), "--format", "safetensors", "--out", str(out)]) == 0
    assert "outputs equal bit for bit" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "export.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["kind"] == "student" and config["classes"] == clf.classes and config["image_size"] == 48
    assert config["input_convention"] == "torchvision" and config["model_config"]["hidden"] == 32
    assert config["mlkd_version"] == mlkd.__version__ and config["dataset"]["name"] == "custom"

    def no_pickle(*args, **kwargs):
        raise AssertionError("a model folder must load without torch.load")
    monkeypatch.setattr(torch, "load", no_pickle)
    folder = mlkd.load(out)
    paths = val_images(trained)
    np.testing.assert_array_equal(folder.probabilities(paths), clf.probabilities(paths))
    monkeypatch.undo()
    assert main(["predict", "--checkpoint", str(out), str(paths[0]), "--quiet"]) == 0
    assert main(["evaluate", "--checkpoint", str(out), "--dataset", str(trained.data.val), "--workers", "0",
                 "--quiet", "--scores", str(tmp_path / "s.npy")]) == 0  # a model folder works wherever a checkpoint does
    np.testing.assert_array_equal(np.load(tmp_path / "s.npy"), clf.probabilities(paths))


def test_teacher_model_folder_and_detector(trained, tmp_path):
    out = tmp_path / "teacher_model"
    assert main(["export", "--checkpoint", str(trained.teacher), "--format", "safetensors", "--out", str(out)]) == 0
    det, det_dir = mlkd.load(trained.teacher), mlkd.load(out)
    dataset = open_split(str(trained.data.val), proposals=str(trained.data.val_proposals))
    pred = predict_teacher(det.model, dataset, "torchvision", torch.device("cpu"), (det.image_size,),
                           max_proposals=det.max_proposals, progress=False)
    record = dataset.records[0]
    boxes, scores = dataset.proposals.get(record.image_id)
    given = det.detect(record.path, proposals=boxes, proposal_scores=scores, score_threshold=0, max_detections=None)
    np.testing.assert_allclose(given["region_scores"], pred["region_scores"][0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(list(given["image_scores"].values()), pred["image_scores"][0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(given["objectness"], pred["region_scores"][0].sum(1), rtol=1e-5, atol=1e-7)
    assert len(given["boxes"]) == len(given["labels"]) == len(given["scores"]) > 0
    assert set(given["labels"]) <= set(det.classes) and np.all(np.diff(given["scores"]) <= 0)
    # without proposals it computes them as the training cache was made (selective search fast, at most 30)
    assert det.proposal_method["method"] == "selective_search"
    computed = det.detect(record.path)
    np.testing.assert_array_equal(computed["proposals"], boxes[:det.max_proposals])
    np.testing.assert_array_equal(computed["region_scores"], given["region_scores"])
    np.testing.assert_array_equal(det_dir.detect(record.path)["region_scores"], computed["region_scores"])
    with pytest.raises(ValueError, match="the image has no proposals"):
        det.detect(record.path, proposals=np.zeros((0, 4), np.float32))


def test_loaded_models_print_what_they_are(trained, clf):
    det = mlkd.load(trained.teacher)
    names = ", ".join(clf.classes[:5])
    assert repr(clf) == (f"Classifier(classes=[{names}, ... ({len(clf.classes)} classes)], input=48x48 torchvision, "
                         "precision=fp32, device=cpu)")
    assert repr(det).startswith(f"Detector(classes=[{names}, ...") and "precision=fp32, device=cpu)" in repr(det)


def test_detect_keeps_the_best_detections_above_a_score_by_default(trained):
    """torchvision's detector defaults (score >= 0.05, at most 100 per image) unless asked for all; each default
    result is the head of the full, score-ordered list; a list of images gives a list of results."""
    det = mlkd.load(trained.teacher)
    dataset = open_split(str(trained.data.val), proposals=str(trained.data.val_proposals))
    records = dataset.records[:3]
    boxes = [dataset.proposals.get(r.image_id)[0] for r in records]
    for record, b in zip(records, boxes):
        full = det.detect(record.path, proposals=b, score_threshold=0, max_detections=None)
        assert len(full["scores"]) > 100 or np.any(full["scores"] < 0.05)  # the defaults have something to drop
        default = det.detect(record.path, proposals=b)
        keep = int((full["scores"] >= 0.05).sum())
        assert len(default["scores"]) == min(keep, 100) and np.all(default["scores"] >= 0.05)
        np.testing.assert_array_equal(default["boxes"], full["boxes"][:len(default["scores"])])
        assert default["labels"] == full["labels"][:len(default["scores"])]
        middle = float(np.median(full["scores"]))  # a threshold that keeps some and drops some
        above = det.detect(record.path, proposals=b, score_threshold=middle, max_detections=None)
        assert 0 < len(above["scores"]) < len(full["scores"])
        np.testing.assert_array_equal(above["scores"], full["scores"][full["scores"] >= middle])
        top = det.detect(record.path, proposals=b, score_threshold=0, max_detections=2)
        np.testing.assert_array_equal(top["scores"], full["scores"][:2])
    many = det.detect([r.path for r in records], proposals=boxes)
    assert isinstance(many, list) and len(many) == len(records)
    for one, record, b in zip(many, records, boxes):
        np.testing.assert_array_equal(one["scores"], det.detect(record.path, proposals=b)["scores"])
    for bad, message in [(dict(score_threshold=float("nan")), "score_threshold must be a number in \\[0, 1\\]"),
                         (dict(score_threshold=1.5), "score_threshold must be a number in \\[0, 1\\], got 1.5"),
                         (dict(max_detections=0), "max_detections must be an integer >= 1 or None"),
                         (dict(max_detections=2.5), "max_detections must be an integer >= 1 or None")]:
        with pytest.raises(ValueError, match=message):
            det.detect(records[0].path, proposals=boxes[0], **bad)
    with pytest.raises(ValueError, match="with a list of 2 images, proposals must be a list with one entry per image"):
        det.detect([records[0].path, records[1].path], proposals=boxes[0])


def test_load_refuses_what_is_not_a_trained_model(tmp_path):
    save_checkpoint(tmp_path / "w.pt", make_checkpoint("imagenet_weights", {"w": torch.ones(1)},
                                                       input_convention="caffe"))
    with pytest.raises(ValueError, match="holds imagenet_weights, not a trained student or teacher"):
        mlkd.load(tmp_path / "w.pt")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="is not an mlkd model folder: it needs config.json and model.safetensors"):
        mlkd.load(tmp_path / "dir")


def test_predict_out_dir_keeps_one_annotated_copy_per_image_even_when_stems_repeat(trained, tmp_path, capsys):
    """a/x.png and b/x.png used to be written to one x_pred.png: 3 images in, 1 file out."""
    source = val_images(trained)[0]
    for folder in ("a", "b", "c"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.png").write_bytes(Path(source).read_bytes())
    images = [str(tmp_path / f / "x.png") for f in ("a", "b", "c")]
    assert main(["predict", "--checkpoint", str(trained.student), *images, "--out-dir", str(tmp_path / "viz"),
                 "--quiet"]) == 0
    assert sorted(p.name for p in (tmp_path / "viz").iterdir()) == [f"{i:05d}_x_pred.png" for i in range(3)]
