"""model.dilate_last_block (OICR's VGG16: pool4 an identity, conv5 dilated by 2, stride 8): the dilated block equals
convolutions with zero-interleaved 5x5 kernels written by hand, the weights and block names are those of the plain
backbone (so ImageNet weights and freezing work as before), a dilated teacher pools its regions at the new stride,
trains, and the option is refused where it means nothing."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mlkd.errors import BadInput
from mlkd.models.backbones import conv_blocks, dilate_last_block, tiny, vgg16
from mlkd.models.build import build_teacher
from mlkd.models.configs import TeacherModelConfig
from mlkd.models.wsddn import WSDDN
from mlkd.utils.config import from_dict
from test_wsddn import K, make_batch, naive_forward, naive_loss, naive_scores


def holes(weight: torch.Tensor) -> torch.Tensor:
    """A (O, I, 3, 3) kernel spread over (O, I, 5, 5) with zeros between its taps: the dilated kernel, by hand."""
    out = weight.new_zeros(*weight.shape[:2], 5, 5)
    out[:, :, ::2, ::2] = weight
    return out


@pytest.mark.parametrize("h, w", [(40, 48), (44, 54)])  # the dilated block on an even and on an odd map
def test_the_dilated_block_equals_zero_interleaved_kernels_on_the_unpooled_map(h, w):
    torch.manual_seed(0)
    plain = tiny((4, 8, 8), convs_per_block=2).double()
    dilated = dilate_last_block(copy.deepcopy(plain))
    x = torch.randn(2, 3, h, w, dtype=torch.float64)
    last_pool = max(i for i, m in enumerate(plain.features) if isinstance(m, torch.nn.MaxPool2d))
    ref = plain.features[:last_pool](x)  # everything before the pool the dilation replaces
    for layer in list(plain.features)[last_pool + 1:]:
        if isinstance(layer, torch.nn.Conv2d):
            ref = F.relu(F.conv2d(ref, holes(layer.weight), layer.bias, padding=2))
    got = dilated(x)
    assert (plain.stride, dilated.stride) == (4, 2)
    assert got.shape == (2, 8, h // 2, w // 2) and plain(x).shape == (2, 8, h // 4, w // 4)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_dilated_vgg16_keeps_its_weights_names_and_blocks():
    plain = vgg16()
    dilated = dilate_last_block(copy.deepcopy(plain))
    assert dilated.stride == 8 and dilated(torch.zeros(1, 3, 64, 96)).shape == (1, 512, 8, 12)
    a, b = plain.state_dict(), dilated.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # torchvision / Caffe weights load as is
    convs = {k: [(m.dilation, m.padding) for m in v if isinstance(m, torch.nn.Conv2d)]
             for k, v in conv_blocks(dilated).items()}
    assert convs == {"conv1": [((1, 1), (1, 1))] * 2, "conv2": [((1, 1), (1, 1))] * 2,
                     "conv3": [((1, 1), (1, 1))] * 3, "conv4": [((1, 1), (1, 1))] * 3,
                     "conv5": [((2, 2), (2, 2))] * 3}
    assert dilated.signature != plain.signature  # autotune decisions are not shared between the two


def test_a_dilated_teacher_pools_at_the_halved_stride_and_matches_the_naive_forward():
    torch.manual_seed(0)
    model = WSDDN(dilate_last_block(tiny((4, 8, 8))), K, hidden=16, roi_size=3, dropout=0.0).double()
    assert model.backbone.stride == 2
    sizes = [4, 7]
    images, proposals, scores, labels = make_batch(sizes)
    _, c, d = naive_forward(model, images, proposals, scores)  # one box at a time, roi_pool at 1 / 2
    want_regions, want_images = naive_scores(c, d, sizes, 1.0, 1.0)
    model.train()
    loss = model(images, proposals, scores, labels)["loss_cls"]
    assert loss.item() == pytest.approx(naive_loss(want_images, labels), rel=1e-10)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    out = model(images, proposals, scores)
    for o, want in zip(out, want_regions.split(sizes)):
        torch.testing.assert_close(o["region_scores"], want, rtol=1e-10, atol=1e-12)


def test_the_config_builds_it_and_refuses_it_where_it_means_nothing():
    cfg = from_dict(TeacherModelConfig, {"backbone": "tiny", "tiny_channels": [8, 16, 16], "hidden": 16,
                                         "dilate_last_block": True, "freeze": ["conv1"]})
    model = build_teacher(cfg, 3)
    assert model.backbone.stride == 2 and not model.backbone.features[0].weight.requires_grad
    assert from_dict(TeacherModelConfig, {}).dilate_last_block is False  # the release's VGG16, stride 16
    with pytest.raises(BadInput, match="dilate_last_block.*resnet50_c4"):
        from_dict(TeacherModelConfig, {"backbone": "resnet50_c4", "dilate_last_block": True})
    with pytest.raises(BadInput, match="dilate_last_block needs a backbone with a max pool"):
        build_teacher(from_dict(TeacherModelConfig, {"backbone": "tiny", "tiny_channels": [8], "hidden": 16,
                                                     "dilate_last_block": True}), 3)
