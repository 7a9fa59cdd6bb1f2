"""A refined (OICR) teacher through the whole system on the synthetic fixture: it trains (the streams' losses
logged and finite), evaluates (classification from WSDDN's image scores, detection AP and CorLoc from the refined
region scores), draws its figures, is loaded and detects, exports to a safetensors folder (Caffe refused, saying
why), and a student distils from it, cached and on the fly, from the image scores and regions the docs name."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import mlkd
from mlkd.data.base import collate
from mlkd.distill.teacher import teacher_outputs
from mlkd.errors import BadInput
from mlkd.evaluation.evaluate import evaluate_teacher, teacher_report, visualize_teacher
from mlkd.export.exporter import export_checkpoint
from mlkd.inference.predict import predict_teacher, teacher_view
from mlkd.models.build import model_from_checkpoint
from mlkd.models.inputs import teacher_inputs
from mlkd.models.ops import flatten_proposals
from mlkd.models.refine import refined_region_scores
from mlkd.models.wsddn import wsddn_scores
from mlkd.proposals.attach import open_split
from mlkd.training.student import StudentConfig, train_student
from mlkd.training.teacher import TeacherConfig, train_teacher
from mlkd.utils.checkpoint import load_checkpoint
from mlkd.utils.config import load_config
from conftest import TINY_STUDENT

REFINE = {"model.refine": 3, "optim.epochs": 2, "optim.lr_steps": "[]"}


@pytest.fixture(scope="module")
def refined(teacher_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("oicr") / "teacher"
    return train_teacher(load_config(TeacherConfig, None, teacher_data.overrides(out, **REFINE)))


def by_hand(model, images, proposals):
    """Region and image scores written out from the parts: the streams' mean without background; WSDDN's p."""
    boxes, scores, index = flatten_proposals(proposals, None)
    feats = model.forward_regions(model.backbone(images), boxes, scores, index)
    regions = refined_region_scores([s(feats) for s in model.refine])
    _, p = wsddn_scores(*model.forward_streams(feats), index, len(proposals))
    return regions, p, index


def test_it_trains_and_its_checkpoint_rebuilds_it(refined):
    log = [json.loads(line) for line in (refined.parent / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in log if r["type"] == "epoch"]
    assert len(epochs) == 2
    for k in ("train_loss_cls", "train_loss_refine1", "train_loss_refine2", "train_loss_refine3"):
        assert np.isfinite(epochs[-1][k]) and epochs[-1][k] > 0, k
    ckpt = load_checkpoint(refined, "teacher")
    model = model_from_checkpoint(ckpt)
    assert len(model.refine) == 3 and ckpt["model_config"]["refine"] == 3
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in model.state_dict().items())


def test_evaluation_scores_refined_regions_and_wsddn_image_scores(refined, teacher_data):
    ckpt = load_checkpoint(refined, "teacher")
    model = model_from_checkpoint(ckpt)
    data = open_split(str(teacher_data.val), proposals=str(teacher_data.val_proposals))
    size, budget = ckpt["inference"]["image_size"], ckpt["inference"]["max_proposals"]
    pred = predict_teacher(model, data, ckpt["input_convention"], torch.device("cpu"), (size,), max_proposals=budget,
                           progress=False, batch_size=1)
    view = teacher_view(data, size, max_proposals=budget)
    with torch.no_grad():
        for i in range(len(data)):
            x = teacher_inputs(*collate([view[i]]), torch.device("cpu"), ckpt["input_convention"], with_labels=False)
            regions, p, _ = by_hand(model, x["images"], x["proposals"])
            np.testing.assert_allclose(pred["region_scores"][i], regions.numpy(), rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(pred["image_scores"][i], p[0].numpy(), rtol=1e-5, atol=1e-7)
    report = evaluate_teacher(str(refined), str(teacher_data.val), str(teacher_data.val_proposals), progress=False)
    want = teacher_report(data, pred)
    assert report["detection"]["mAP"] == want["detection"]["mAP"]
    assert report["corloc"]["corloc"] == want["corloc"]["corloc"]
    assert report["classification"]["mAP"]["mlic"] == want["classification"]["mAP"]["mlic"]


def test_figures_load_detect_export_and_caffe_refused(refined, teacher_data, tmp_path):
    paths = visualize_teacher(str(refined), str(teacher_data.val), str(teacher_data.val_proposals), tmp_path / "fig",
                              num_images=2, per_class=True, progress=False)
    assert len(paths) == 4 and all(p.stat().st_size > 0 for p in paths)
    folder = tmp_path / "model"
    info, checks = export_checkpoint(refined, "safetensors", folder)
    assert all(c.passed and c.max_abs_diff == 0 for c in checks) and info["kind"] == "teacher"
    image = next((teacher_data.train.parent / "images" / "val").iterdir())
    boxes = np.array([[2.0, 3, 40, 50], [10, 10, 70, 60], [0, 0, 79, 79], [5, 5, 30, 30]], np.float32)
    found = [mlkd.load(p).detect(image, proposals=boxes) for p in (refined, folder)]
    np.testing.assert_array_equal(found[0]["region_scores"], found[1]["region_scores"])
    regions = found[0]["region_scores"]
    assert regions.shape == (4, 10) and (regions.sum(1) < 1).all()  # class probabilities, background dropped
    np.testing.assert_allclose(found[0]["objectness"], regions.sum(1), rtol=1e-6)
    with pytest.raises(BadInput, match=r"is a refined teacher \(model.refine 3\): the release's teacher net, whose "
                                       r"layer names the Caffe export keeps, has only the WSDDN streams .* --format "
                                       r"safetensors"):
        export_checkpoint(refined, "caffe", tmp_path / "caffe")
    assert not (tmp_path / "caffe").exists()


def test_distillation_targets_are_wsddn_image_scores_or_refined_ones_and_top_regions_by_refined_scores(refined):
    ckpt = load_checkpoint(refined, "teacher")
    model = model_from_checkpoint(ckpt)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 80, 80, generator=g)
    proposals = [torch.cat([xy := torch.rand(r, 2, generator=g) * 50, xy + 8 + torch.rand(r, 2, generator=g) * 20], 1)
                 for r in (7, 2, 5)]
    probs, feats, keep = teacher_outputs(model, images, proposals, None, layers=("fc7",), top_k=3, chunk=2)
    with torch.no_grad():
        regions, _, index = by_hand(model, images, proposals)
        boxes, scores, _ = flatten_proposals(proposals, None)
        feats_all = model.forward_regions(model.backbone(images), boxes, scores, index)
        _, soft = wsddn_scores(*model.forward_streams(feats_all), index, 3, 0.5, 0.5)
    torch.testing.assert_close(probs, soft, rtol=1e-5, atol=1e-7)  # WSDDN's p at T = 0.5
    want = torch.cat([torch.nonzero(index == i).squeeze(1)[regions[index == i].sum(1).topk(min(3, int((index == i)
                      .sum()))).indices.sort().values] for i in range(3)])
    assert keep.tolist() == want.tolist()  # the top regions by the refined objectness
    torch.testing.assert_close(feats["fc7"], feats_all[keep], rtol=1e-5, atol=1e-6)
    model.image_scores = "refined"
    probs, _, _ = teacher_outputs(model, images, proposals, None)
    with torch.no_grad():
        soft_regions = refined_region_scores([s(feats_all) / 0.5 for s in model.refine])
    torch.testing.assert_close(probs, torch.stack([soft_regions[index == i].max(0).values for i in range(3)]))


@pytest.mark.parametrize("cached", [True, False])
def test_a_student_distils_from_it(refined, teacher_data, tmp_path, cached):
    out = tmp_path / "student"
    sets = {**TINY_STUDENT, "data.train": teacher_data.train, "data.train_proposals": teacher_data.train_proposals,
            "distill.teacher": refined, "distill.cache_soft_targets": str(cached).lower(),
            "distill.feature_cache_gb": 1 if cached else 0, "distill.top_k": 5, "run.out": out,
            "stages": "[{name: joint, epochs: 1, label_weight: 1, soft_weight: 1, feature_weight: 1}]"}
    train_student(load_config(StudentConfig, None, [f"{k}={v}" for k, v in sets.items()]))
    epoch = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["type"] == "epoch"][-1]
    assert epoch["train_loss_feature"] > 0 and np.isfinite(epoch["train_loss_soft"])
