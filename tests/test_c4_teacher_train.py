"""A resnet50_c4 teacher through the whole system on the synthetic fixture: one training epoch (frozen stages and
BatchNorm unchanged by it), evaluation, a student distilled from it (L_f on its 2048-d region features), the
checkpoint -> model round trip, mlkd.load, the safetensors model folder, a narrower student through a feature
adapter, and the refusals (Caffe export, fc6, unequal widths without an adapter).

Random ImageNet-free weights, roi_size 4 and one batch of the 12 training images per epoch keep it to seconds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import mlkd
from mlkd.errors import BadInput
from mlkd.evaluation.evaluate import evaluate_teacher
from mlkd.export.exporter import export_checkpoint
from mlkd.models.build import build_teacher, model_from_checkpoint
from mlkd.training.student import StudentConfig, train_student
from mlkd.training.teacher import TeacherConfig, train_teacher
from mlkd.utils.checkpoint import load_checkpoint
from mlkd.utils.config import load_config
from conftest import TINY_STUDENT

C4 = {"model.backbone": "resnet50_c4", "model.hidden": 2048, "model.roi_size": 4, "model.roi_op": "roi_align",
      "model.dropout": 0.0, "model.freeze": "[stem, layer1]", "data.batch_size": 12, "data.max_proposals": 12,
      "optim.epochs": 1, "optim.lr_steps": "[]", "optim.lr": 1e-4}


@pytest.fixture(scope="module")
def c4_teacher(teacher_data, tmp_path_factory):
    cfg = load_config(TeacherConfig, None, teacher_data.overrides(tmp_path_factory.mktemp("c4") / "teacher", **C4))
    return cfg, train_teacher(cfg)


def student_sets(teacher_data, teacher, out, **extra) -> list[str]:
    """A tiny student with 2048-wide fc6/fc7 (the C4 teacher's region width), one joint stage, the teacher on the
    fly (nothing cached), all 12 images in one batch."""
    sets = {**TINY_STUDENT, "model.hidden": 2048, "data.batch_size": 12, "data.max_proposals": 12,
            "data.train": teacher_data.train, "data.train_proposals": teacher_data.train_proposals,
            "distill.teacher": teacher, "distill.cache_soft_targets": "false", "distill.feature_cache_gb": 0,
            "distill.feature_norm": "relative", "distill.baseline": "null", "run.out": out,
            "stages": "[{name: joint, epochs: 1, label_weight: 1, soft_weight: 1, feature_weight: 5}]", **extra}
    return [f"{k}={v}" for k, v in sets.items()]


def test_an_epoch_keeps_frozen_stages_and_batchnorm_and_the_checkpoint_rebuilds_the_model(c4_teacher, teacher_data):
    cfg, path = c4_teacher
    ckpt = load_checkpoint(path, "teacher")
    assert ckpt["model_config"]["backbone"] == "resnet50_c4" and ckpt["train_state"]["epoch"] == 0
    log = [json.loads(line) for line in (path.parent / "log.jsonl").read_text().splitlines()]
    assert [r["type"] for r in log if r["type"] == "iter"] == ["iter"] and np.isfinite(log[-1]["train_loss_cls"])
    torch.manual_seed(cfg.run.seed)  # the initial weights, as the run drew them
    start = build_teacher(cfg.model, len(ckpt["classes"])).state_dict()
    saved = ckpt["model"]
    fixed = [k for k in saved if k.startswith(("backbone.conv1.", "backbone.bn1.", "backbone.layer1."))
             or k.endswith(("running_mean", "running_var")) or ".bn" in k or ".downsample.1." in k]
    assert len(fixed) > 4 * 53 and all(torch.equal(saved[k], start[k]) for k in fixed)
    assert not torch.equal(saved["backbone.layer3.5.conv3.weight"], start["backbone.layer3.5.conv3.weight"])
    assert not torch.equal(saved["head.layer4.2.conv3.weight"], start["head.layer4.2.conv3.weight"])

    model = model_from_checkpoint(ckpt)
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items()) and not model.training
    report = evaluate_teacher(str(path), str(teacher_data.val), str(teacher_data.val_proposals), progress=False)
    assert 0 <= report["classification"]["mAP"]["mlic"] <= 1 and "detection" in report


def test_a_student_distils_its_2048_wide_region_features(c4_teacher, teacher_data, tmp_path):
    _, teacher = c4_teacher
    out = tmp_path / "student"
    train_student(load_config(StudentConfig, None, student_sets(teacher_data, teacher, out)))
    epoch = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["type"] == "epoch"][-1]
    assert epoch["train_loss_feature"] > 0 and np.isfinite(epoch["train_loss_soft"])
    with pytest.raises(BadInput, match=r"distill.feature_layers \['fc6', 'fc7'\]: the teacher has no \['fc6'\] region "
                                       r"features, only \['fc7'\] \(a resnet50_c4 teacher's region head is layer4"):
        train_student(load_config(StudentConfig, None, student_sets(
            teacher_data, teacher, tmp_path / "fc6", **{"distill.feature_layers": "[fc6, fc7]"})))


def test_a_narrower_student_distils_through_a_feature_adapter_and_is_refused_without_one(c4_teacher, teacher_data,
                                                                                          tmp_path):
    """The tiny student's own 32-wide fc7 (as a VGG16 student keeps its ImageNet 4096-wide fc7) against the teacher's
    2048-d features: refused before training without distill.feature_adapter, trained through the adapter with it;
    the adapter is saved with the objective's parameters to resume, not with the student."""
    _, teacher = c4_teacher
    narrow = {"model.hidden": 32}
    with pytest.raises(BadInput, match=r"the student's region features are 32 wide \(model.hidden\), the teacher's "
                                       r"2048: .*distill.feature_adapter: true"):
        train_student(load_config(StudentConfig, None, student_sets(teacher_data, teacher, tmp_path / "no", **narrow)))
    out = tmp_path / "adapter"
    path = train_student(load_config(StudentConfig, None, student_sets(
        teacher_data, teacher, out, **narrow, **{"distill.feature_adapter": "true"})))
    epoch = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["type"] == "epoch"][-1]
    assert np.isfinite(epoch["train_loss_feature"]) and epoch["train_loss_feature"] > 0
    ckpt = load_checkpoint(path, "student")
    assert ckpt["train_state"]["extra"]["adapter.fc7.weight"].shape == (2048, 32)
    assert not any("adapter" in k for k in ckpt["model"]) and ckpt["model"]["fc7.weight"].shape == (32, 32)


def test_load_detect_safetensors_folder_and_caffe_refused(c4_teacher, teacher_data, tmp_path):
    _, path = c4_teacher
    folder = tmp_path / "model"
    info, checks = export_checkpoint(path, "safetensors", folder)
    assert all(c.passed and c.max_abs_diff == 0 for c in checks) and info["kind"] == "teacher"
    image = next((teacher_data.train.parent / "images" / "val").iterdir())
    boxes = np.array([[2.0, 3, 40, 50], [10, 10, 70, 60], [0, 0, 79, 79]], np.float32)
    found = [mlkd.load(p).detect(image, proposals=boxes) for p in (path, folder)]
    assert isinstance(mlkd.load(folder), mlkd.Detector)
    assert found[0]["region_scores"].shape == (3, 10)  # the synthetic dataset's 10 classes
    np.testing.assert_array_equal(found[0]["region_scores"], found[1]["region_scores"])
    with pytest.raises(BadInput, match=r"is a resnet50_c4 teacher: mlkd's Caffe export writes the release's VGG-style "
                                       r"teacher .* export it with --format safetensors"):
        export_checkpoint(path, "caffe", tmp_path / "caffe")
    assert not (tmp_path / "caffe").exists()
