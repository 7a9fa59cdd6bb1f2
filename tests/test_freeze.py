"""model.freeze: the named backbone blocks get no gradient and never change; every other gradient is the one the
unfrozen model computes (freezing a prefix only skips work)."""

from __future__ import annotations

import pytest
import torch

from mlkd.models.backbones import conv_blocks, vgg16
from mlkd.models.build import build_student, build_teacher
from mlkd.models.configs import StudentModelConfig, TeacherModelConfig
from mlkd.training.teacher import TeacherConfig
from mlkd.utils.config import load_config

TINY = dict(backbone="tiny", tiny_channels=(8, 16, 16), hidden=16, roi_size=2, dropout=0.0)


def gradients(freeze):
    torch.manual_seed(0)
    model = build_teacher(TeacherModelConfig(**TINY, freeze=freeze), 3).train()
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 32, 32, generator=gen)
    boxes = [torch.tensor([[0.0, 0, 20, 20], [4, 4, 31, 31], [8, 0, 24, 16]]), torch.tensor([[2.0, 2, 30, 14]])]
    loss = sum(model(images, boxes, None, torch.tensor([[1.0, 0, 1], [0, 1, 0]])).values())
    loss.backward()
    return model, {n: p.grad for n, p in model.named_parameters()}


def test_frozen_blocks_get_no_gradient_and_the_rest_is_unchanged():
    _, full = gradients(())
    model, part = gradients(("conv1", "conv2"))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"backbone.features.0.weight", "backbone.features.0.bias", "backbone.features.3.weight",
                      "backbone.features.3.bias"}
    for name, g in part.items():
        if name in frozen:
            assert g is None
        else:
            torch.testing.assert_close(g, full[name], rtol=1e-6, atol=1e-7)


def test_vgg16_blocks_are_its_five_conv_stages():
    blocks = conv_blocks(vgg16())
    assert {k: sum(isinstance(m, torch.nn.Conv2d) for m in v) for k, v in blocks.items()} == {
        "conv1": 2, "conv2": 2, "conv3": 3, "conv4": 3, "conv5": 3}


def test_bad_freeze_names_are_errors():
    with pytest.raises(ValueError, match=r"unknown block\(s\) \['conv9'\]; this backbone has \['conv1', 'conv2', 'conv3'\]"):
        build_teacher(TeacherModelConfig(**TINY, freeze=("conv9",)), 3)
    with pytest.raises(ValueError, match="VGG-style backbone"):
        build_student(StudentModelConfig(backbone="resnet50", freeze=("conv1",)), 3)
    cfg = load_config(TeacherConfig, None, ["data.train=t.jsonl", "model.freeze=[conv1, conv2]"])
    assert cfg.model.freeze == ("conv1", "conv2")
