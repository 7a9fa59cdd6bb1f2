"""Students on timm backbones (``model.backbone: timm/<name>``): one distillation stage (L_p + L_p' + L_f) each
for a ResNet-50 and a ConvNeXt-T from timm (random weights, 64 px) taught by the session's tiny teacher; a ViT's
patch tokens as a map; the input convention through the checkpoint, `mlkd.load` and the ONNX export (verified by
onnxruntime, also for the distilled ConvNeXt); clear errors for bad names and a missing extra."""

from __future__ import annotations

import json
import sys
import typing

import pytest
import torch

import mlkd
from mlkd.cli import main
from mlkd.errors import BadInput
from mlkd.models.backbones import CONVENTIONS, convention_of
from mlkd.models.build import build_student, model_from_checkpoint
from mlkd.models.configs import StudentModelConfig
from mlkd.training.student import StudentConfig, train_student
from mlkd.utils.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from mlkd.utils.config import load_config, to_dict
from mlkd.utils.optional import MissingExtra

timm = pytest.importorskip("timm")
torch.set_num_threads(1)  # as the other model tests: on 2 shared cores, 2 threads made a ViT step 100x slower
CLASSES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def kd_runs(trained, tmp_path_factory):
    """``{name: last.pt}`` of a timm student trained for one joint distillation stage (L_p + L_p' + L_f, as the
    default recipe) against the session's teacher (hidden 32, so the student's adapter has width 32)."""
    root, data = tmp_path_factory.mktemp("timm_kd"), trained.data
    runs = {}
    for name in ("resnet50", "convnext_tiny"):
        sets = {"model.backbone": f"timm/{name}", "model.input_convention": "torchvision", "model.image_size": 64,
                "model.hidden": 32, "model.roi_size": 2, "data.train": data.train,
                "data.train_proposals": data.train_proposals, "data.batch_size": 6, "data.workers": 0,
                "data.max_proposals": 10, "optim.optimizer": "adamw", "optim.lr": 0.001, "run.progress": "false",
                "run.device": "cpu", "run.amp": "none", "run.out": root / name, "distill.teacher": trained.teacher,
                "distill.baseline": "null",
                "stages": "[{name: kd, epochs: 1, label_weight: 1, soft_weight: 1, feature_weight: 1}]"}
        runs[name] = train_student(load_config(StudentConfig, None, [f"{k}={v}" for k, v in sets.items()]))
    return runs


@pytest.mark.parametrize("name", ["resnet50", "convnext_tiny"])
def test_timm_student_distils_one_stage_and_rebuilds_from_its_checkpoint(kd_runs, name):
    ckpt = load_checkpoint(kd_runs[name], "student")
    records = [json.loads(line) for line in (kd_runs[name].parent / "log.jsonl").read_text().splitlines()]
    (epoch,) = [r for r in records if r["type"] == "epoch"]
    assert epoch["stage"] == "kd"
    assert epoch["train_loss_label"] > 0 and epoch["train_loss_soft"] > 0 and epoch["train_loss_feature"] > 0
    assert ckpt["input_convention"] == "torchvision" and ckpt["model_config"]["backbone"] == f"timm/{name}"
    model = model_from_checkpoint(ckpt)  # from the checkpoint alone
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in model.state_dict().items())
    assert model.head == "resnet" and model.adapter.out_features == 32 and model.backbone.stride == 32


@pytest.mark.parametrize("name, prefix", [("vit_tiny_patch16_224", 1), ("deit_tiny_distilled_patch16_224", 2)])
def test_vit_map_is_the_last_blocks_patch_tokens_without_prefix_tokens(name, prefix):
    torch.manual_seed(0)
    cfg = StudentModelConfig(backbone=f"timm/{name}", input_convention="inception", image_size=64, hidden=8)
    student = build_student(cfg, len(CLASSES)).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fmap = student.backbone(images)
        vit = student.backbone.features.model  # the ViT itself, run by hand: embed, blocks, drop the prefix tokens
        tokens = vit.blocks(vit.norm_pre(vit._pos_embed(vit.patch_embed(images))))  # (B, prefix + 16, C)
    assert vit.num_prefix_tokens == prefix and tokens.shape == (2, prefix + 16, 192)
    assert fmap.shape == (2, 192, 4, 4) and student.backbone.stride == 16 and student.backbone.out_channels == 192
    expected = tokens[:, prefix:].reshape(2, 4, 4, 192).permute(0, 3, 1, 2)  # row-major patch grid
    torch.testing.assert_close(fmap, expected)


def test_convention_round_trips_through_checkpoint_api_and_onnx_export(tmp_path, capsys):
    """A ViT student in the `inception` convention (timm's ViT weights): recorded in the checkpoint, used by
    `mlkd.load` and written into the ONNX export's input description; the export is verified by onnxruntime."""
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    cfg = StudentModelConfig(backbone="timm/vit_tiny_patch16_224", input_convention="inception", image_size=64,
                             hidden=8)
    model = build_student(cfg, len(CLASSES))
    path = save_checkpoint(tmp_path / "vit.pt", make_checkpoint(
        "student", model.state_dict(), input_convention=cfg.input_convention, classes=CLASSES,
        model_config=to_dict(cfg), image_size=cfg.image_size))
    clf = mlkd.load(path)
    assert clf.input_convention == "inception" and clf.image_size == 64
    probs = clf.predict([torch.zeros(3, 50, 70, dtype=torch.uint8)], as_arrays=True)
    with torch.no_grad():  # a black image is -1 everywhere in this convention (0 - 0.5) / 0.5
        ref = torch.sigmoid(model_from_checkpoint(load_checkpoint(path))(-torch.ones(1, 3, 64, 64)))
    torch.testing.assert_close(torch.from_numpy(probs), ref)
    assert main(["export", "--checkpoint", str(path), "--format", "onnx", "--out", str(tmp_path / "onnx")]) == 0
    (inp,) = json.loads((tmp_path / "onnx" / "export.json").read_text())["inputs"]
    assert (inp["convention"], inp["mean"], inp["std"], inp["channel_order"]) == ("inception", [0.5] * 3, [0.5] * 3,
                                                                                   "RGB")
    assert "logits: max |onnxruntime - PyTorch| = " in capsys.readouterr().out


def test_distilled_convnext_student_exports_to_onnx_verified(kd_runs, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "onnx"
    assert main(["export", "--checkpoint", str(kd_runs["convnext_tiny"]), "--format", "onnx", "--out", str(out)]) == 0
    record = json.loads((out / "export.json").read_text())
    assert record["verification"]["passed"] and record["inputs"][0]["convention"] == "torchvision"
    assert [c["output"] for c in record["verification"]["checks"]] == ["logits", "probabilities"]
    assert "probabilities: max |onnxruntime - PyTorch| = " in capsys.readouterr().out


def test_bad_backbone_names_are_clear_errors():
    with pytest.raises(BadInput, match=r"model.backbone: 'timm/nonexistent_model' names no model of timm .*"
                                       r"list the names with python -c \"import timm; "
                                       r"print\(timm.list_models\('\*convnext\*'\)\)\""):
        build_student(StudentModelConfig(backbone="timm/nonexistent_model"), 3)
    with pytest.raises(BadInput, match=r"closest: \['convnext_tiny'"):
        build_student(StudentModelConfig(backbone="timm/convnext_tinyy"), 3)
    for bad in ("resnet18", "timm/"):
        with pytest.raises(BadInput, match=rf"model.backbone: '{bad}' is not one of \['vgg16', 'resnet50', "
                                           r"'resnet101', 'tiny'\] or timm/<timm model name>"):
            load_config(StudentConfig, None, [f"model.backbone={bad}"])


def test_a_missing_timm_extra_is_an_error_naming_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    with pytest.raises(MissingExtra, match=r"model.backbone timm/<name> needs timm: pip install 'mlkd\[timm\]'"):
        build_student(StudentModelConfig(backbone="timm/resnet50", input_convention="torchvision"), 3)


def test_every_named_convention_is_a_student_config_value_and_timm_values_map_to_names():
    allowed = typing.get_args(typing.get_type_hints(StudentModelConfig)["input_convention"])
    assert set(allowed) == set(CONVENTIONS)
    assert convention_of((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) == "torchvision"
    assert convention_of((0.5,) * 3, (0.5,) * 3) == "inception"
    assert convention_of((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)) == "clip"
    assert convention_of((0.0,) * 3, (1.0,) * 3) == "unit"
    assert convention_of((0.485, 0.456, 0.406), (0.5,) * 3) is None  # a mean of one name, the std of another
    assert convention_of((124 / 255, 117 / 255, 104 / 255), (1 / (0.0167 * 255),) * 3) is None  # DPN's: no name
