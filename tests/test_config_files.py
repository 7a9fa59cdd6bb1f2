"""Every shipped config parses into its typed config, configs load by name from any folder, and the release's
values are what docs/method.md states."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from mlkd.models.build import build_teacher
from mlkd.training.student import StudentConfig
from mlkd.training.teacher import TeacherConfig
from mlkd.utils.config import CONFIG_DIR, load_config, packaged_configs, resolve_config

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "mlkd" / "configs"
SHIPPED = sorted(CONFIGS.glob("*.yaml"))


def test_the_configs_ship_inside_the_package():
    assert CONFIG_DIR == CONFIGS and len(SHIPPED) == 24
    assert packaged_configs() == [p.stem for p in SHIPPED]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_config_parses(path):
    cls = TeacherConfig if path.name.startswith("teacher_") else StudentConfig
    cfg = load_config(cls, path)
    assert cfg.run.out and cfg.data.train


def test_release_values():
    t = load_config(TeacherConfig, CONFIGS / "teacher_coco.yaml")
    assert (t.model.backbone, t.model.input_convention, t.model.score_scale, t.model.score_bias) == ("vgg16", "caffe", 1, 0)
    assert t.data.scales == (480, 576, 672, 736, 832) and t.data.test_scale == 672 and t.data.max_proposals == 500
    assert (t.optim.optimizer, t.optim.lr, t.optim.momentum, t.optim.weight_decay) == ("sgd", 5e-5, 0.9, 5e-4)
    w = load_config(TeacherConfig, CONFIGS / "teacher_wsddn_voc07.yaml")
    assert (w.model.score_scale, w.model.score_bias, w.model.det_temperature, w.model.reg_weight) == (10, 1, 2, 1e-4)
    assert w.data.resize == "wsddn" and w.data.max_size is None and w.data.scales == (480, 576, 688, 864, 1200)
    s = load_config(StudentConfig, CONFIGS / "student_coco_kd_release.yaml")
    assert s.model.image_size == 224 and s.distill.teacher_scale == 672 and s.distill.feature_layers == ("fc7",)
    assert s.distill.scale_init == 0.2 and s.distill.scale_lr_mult == 10 and s.data.max_proposals == 500
    assert [(x.label_weight, x.soft_weight, x.feature_weight) for x in s.stages] == [(0, 0, 1), (1, 1, 0)]
    assert (s.distill.feature_norm, s.distill.feature_cache_gb) == ("none", 0)  # the release, exactly


@pytest.mark.parametrize("name", ["demo", "coco", "voc07", "nuswide"])
def test_the_default_recipe_is_one_joint_stage_with_relative_features_over_the_plain_schedule(name):
    kd = load_config(StudentConfig, CONFIGS / f"student_{name}_kd.yaml")
    plain = load_config(StudentConfig, CONFIGS / f"student_{name}.yaml")
    release = load_config(StudentConfig, CONFIGS / f"student_{name}_kd_release.yaml")
    assert [(x.label_weight, x.soft_weight, x.feature_weight) for x in kd.stages] == [(1, 1, 5)]
    assert kd.distill.feature_norm == "relative" and release.distill.feature_norm == "none"
    assert (kd.stages[0].epochs, kd.stages[0].lr_steps) == (plain.stages[0].epochs, plain.stages[0].lr_steps)
    assert kd.model == plain.model == release.model and kd.data.train == release.data.train
    assert len(release.stages) == 2 and sum(s.epochs for s in release.stages) >= plain.stages[0].epochs


def test_the_resnet50_c4_teacher_and_the_default_recipe_student_distilled_from_it():
    t = load_config(TeacherConfig, CONFIGS / "teacher_coco_r50c4.yaml")
    vgg = load_config(TeacherConfig, CONFIGS / "teacher_coco.yaml")
    assert (t.model.backbone, t.model.input_convention, t.model.hidden, t.model.roi_size, t.model.roi_op) == \
        ("resnet50_c4", "torchvision", 2048, 14, "roi_align")
    assert t.model.freeze == ("stem", "layer1") and t.model.weights == "torchvision:IMAGENET1K_V1"
    assert (t.data, t.optim) == (vgg.data, vgg.optim) and t.run.out != vgg.run.out
    teacher = build_teacher(dataclasses.replace(t.model, weights=None), 80)  # the config builds (random weights)
    assert teacher.feature_width == 2048 and teacher.roi_size == 14 and teacher.backbone.stride == 16
    s = load_config(StudentConfig, CONFIGS / "student_coco_kd_r50c4.yaml")
    kd = load_config(StudentConfig, CONFIGS / "student_coco_kd.yaml")
    assert s.distill.teacher == t.run.out + "/last.pt" and s.distill.feature_adapter and not kd.distill.feature_adapter
    assert (s.model, s.data, s.stages, s.optim) == (kd.model, kd.data, kd.stages, kd.optim)
    assert dataclasses.replace(s.distill, teacher=kd.distill.teacher, feature_adapter=False) == kd.distill
    assert s.model.hidden == 4096 != t.model.hidden  # the VGG16 student keeps its ImageNet fc7: the adapter bridges


def test_configs_load_by_name_from_any_folder_and_paths_still_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    by_name = load_config(TeacherConfig, "teacher_coco")
    assert by_name == load_config(TeacherConfig, "teacher_coco.yaml") == load_config(TeacherConfig, CONFIGS / "teacher_coco.yaml")
    own = tmp_path / "mine.yaml"
    own.write_text("base: " + str(CONFIGS / "teacher_demo.yaml") + "\noptim: {epochs: 2}\n")
    assert load_config(TeacherConfig, "mine.yaml").optim.epochs == 2
    (tmp_path / "teacher_coco.yaml").write_text("optim: {epochs: 3}\ndata: {train: x.jsonl}\n")
    assert load_config(TeacherConfig, "teacher_coco.yaml").optim.epochs == 3  # a file here wins over the shipped one
    assert resolve_config("teacher_coco") == CONFIG_DIR / "teacher_coco.yaml"
    with pytest.raises(FileNotFoundError, match=r"teacher_cocoa.*neither a file nor one of mlkd's configs: .*teacher_coco"):
        load_config(TeacherConfig, "teacher_cocoa")


def test_the_oicr_teachers_take_the_published_refinement_and_the_demo_variant_changes_nothing_else():
    v = load_config(TeacherConfig, CONFIGS / "teacher_voc07_oicr.yaml")
    assert (v.model.refine, v.model.refine_iou, v.model.refine_weight, v.model.image_scores) == (3, 0.5, 1.0, "wsddn")
    assert v.model.backbone == "vgg16" and v.model.dilate_last_block  # OICR's conv5: dilated, stride 8
    assert v.data.scales == (480, 576, 688, 864, 1200) and (v.data.resize, v.data.max_size) == ("shorter", 2000)
    assert (v.data.max_proposals, v.data.batch_size, v.optim.lr, v.optim.epochs, v.optim.lr_steps) == \
        (2000, 2, 1e-3, 28, (16,))  # 40k + 30k steps of 2 images over 5011 images
    c = load_config(TeacherConfig, CONFIGS / "teacher_coco_oicr.yaml")
    assert c.model == v.model and c.data.train.startswith("coco:") and c.optim.epochs == 8
    plain, oicr = (load_config(TeacherConfig, CONFIGS / f) for f in ("teacher_demo.yaml", "teacher_demo_oicr.yaml"))
    assert plain.model.refine == 0 and oicr.model.refine == 3
    assert dataclasses.replace(oicr.model, refine=0) == plain.model and oicr.data == plain.data
    assert oicr.optim == plain.optim
