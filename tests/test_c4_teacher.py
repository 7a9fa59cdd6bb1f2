"""The resnet50_c4 teacher (Faster R-CNN C4: ResNet-50 stem .. layer3, RoI pooling at 1/16, layer4 + average pool as
the region head) against each box pooled and run through layer4 alone, the distinct-RoI shortcut where it is exact,
gradcheck, frozen BatchNorm and stages, and ImageNet weights from a torchvision file.

Random weights, small images and roi_size 2-4 keep it fast; layer4 is always ResNet-50's own. The float64 comparisons
of the region head put it behind a stand-in backbone (one 16 x 16 stride-16 convolution to 1024 channels), since
float64 convolutions through layer1..layer3 take seconds; the real backbone is checked in float32 and by gradcheck."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torchvision.ops import FrozenBatchNorm2d, roi_align, roi_pool

from mlkd.models.backbones import resnet50_c4
from mlkd.models.build import build_teacher
from mlkd.models.configs import TeacherModelConfig
from mlkd.models.ops import flatten_proposals, roi_pool_cells
from mlkd.models.wsddn import WSDDN, wsddn_scores
from mlkd.training.optim import build_optimizer, param_groups
from test_wsddn import naive_loss, naive_scores

K, SIZE = 4, 64
C4 = dict(backbone="resnet50_c4", hidden=2048, roi_size=4, roi_op="roi_align", dropout=0.0,
          input_convention="torchvision")


def c4(**kwargs) -> WSDDN:
    torch.manual_seed(0)
    return build_teacher(TeacherModelConfig(**{**C4, **kwargs}), K)


class PatchBackbone(torch.nn.Module):
    """A stand-in for ResNet-50's stem .. layer3 with its stride and width: one 16 x 16 convolution, stride 16."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.out_channels, self.stride = torch.nn.Conv2d(3, 1024, 16, 16), 1024, 16

    def forward(self, x):
        return self.conv(x)


def head_model(**kwargs) -> WSDDN:
    """The C4 region head (layer4 + average pool, frozen BatchNorm) behind the stand-in backbone, float64."""
    torch.manual_seed(0)
    options = {"roi_size": 2, "dropout": 0.0, **kwargs}
    return WSDDN(PatchBackbone(), K, hidden=2048, head=resnet50_c4()[1], **options).double()


def make_batch(sizes, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(len(sizes), 3, SIZE, SIZE, generator=gen, dtype=dtype)
    proposals = []
    for n in sizes:
        xy = torch.rand(n, 2, generator=gen, dtype=dtype) * (0.6 * SIZE)
        wh = torch.rand(n, 2, generator=gen, dtype=dtype) * (0.4 * SIZE) + 8
        proposals.append(torch.cat([xy, (xy + wh).clamp(max=SIZE - 1)], 1))
    scores = [torch.rand(n, generator=gen, dtype=dtype) for n in sizes]
    labels = torch.randint(0, 2, (len(sizes), K), generator=gen).to(dtype)
    labels[0, 0], labels[0, 1] = 1, -1
    return images, proposals, scores, labels


def naive_features(model: WSDDN, fmap, proposals, scores):
    """Region features: each box pooled ALONE by torchvision's op at 1/16, times its own score factor, through
    layer4 one box at a time, averaged over space."""
    rows = []
    for i, boxes in enumerate(proposals):
        for r in range(len(boxes)):
            box = [boxes[r:r + 1]]
            pooled = roi_pool(fmap[i:i + 1], box, model.roi_size, 1 / 16) if model.roi_op == "roi_pool" else \
                roi_align(fmap[i:i + 1], box, model.roi_size, 1 / 16, sampling_ratio=2, aligned=True)
            factor = model.score_scale * float(scores[i][r]) + model.score_bias
            rows.append(model.head.layer4(pooled * factor).mean((2, 3)))  # (1, 2048)
    return torch.cat(rows)


def test_shapes_layers_and_a_wrong_width():
    model = c4().eval()
    assert (model.backbone.stride, model.backbone.out_channels, model.feature_width) == (16, 1024, 2048)
    assert model.region_layer_names == ("fc7",) and not hasattr(model, "fc6") and not hasattr(model, "fc7")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # every BatchNorm is frozen
    images, proposals, scores, _ = make_batch([3, 5], dtype=torch.float32)
    with torch.no_grad():
        fmap = model.backbone(images)
        boxes, flat, index = flatten_proposals(proposals, scores)
        layers = model.region_layers(fmap, boxes, flat, index)
        out = model(images, proposals, scores)
    assert fmap.shape == (2, 1024, SIZE // 16, SIZE // 16)
    assert set(layers) == {"fc7"} and layers["fc7"].shape == (8, 2048) and (layers["fc7"] >= 0).all()
    assert [o["region_scores"].shape for o in out] == [(3, K), (5, K)] and out[1]["image_scores"].shape == (K,)
    with pytest.raises(ValueError, match=r"hidden \(model.hidden\) is the width of the region features: 2048 for a "
                                         r"Res5Head region head, got 4096"):
        c4(hidden=4096)
    with pytest.raises(ValueError, match=r"unknown block\(s\) \['conv1'\]; this backbone has \['stem', 'layer1', "
                                         r"'layer2', 'layer3'\]"):
        c4(freeze=("conv1",))


@pytest.mark.parametrize("roi_op, distinct", [("roi_align", True), ("roi_pool", True), ("roi_pool", False)])
def test_region_head_equals_each_box_through_layer4_alone(roi_op, distinct):
    model = head_model(roi_op=roi_op, distinct_rois=distinct, score_scale=10.0, score_bias=1.0)
    sizes = [3, 4]
    images, proposals, scores, labels = make_batch(sizes)
    with torch.no_grad():
        fmap = model.backbone(images)
        want = naive_features(model, fmap, proposals, scores)
        got = model.region_layers(fmap, *flatten_proposals(proposals, scores))["fc7"]
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * float(want.abs().max()))
        want_regions, want_images = naive_scores(model.fc8_c(want), model.fc8_d(want), sizes)
        out = model.eval()(images, proposals, scores)
        loss = model.train()(images, proposals, scores, labels)  # dropout 0: the same forward
    torch.testing.assert_close(torch.cat([o["region_scores"] for o in out]), want_regions, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(torch.stack([o["image_scores"] for o in out]), want_images, rtol=1e-8, atol=1e-12)
    assert loss["loss_cls"].item() == pytest.approx(naive_loss(want_images, labels), rel=1e-8)


def jittered_boxes(gen: torch.Generator, n: int) -> torch.Tensor:
    """Copies of three boxes on cell corners (stride 16), in turn, jittered by < 1/4 cell: each rounds to its base."""
    base = torch.tensor([[0.0, 0, 32, 32], [16, 16, 48, 63], [0, 16, 63, 48]], dtype=torch.float64)
    pick = base[torch.arange(n) % 3]
    return (pick + (torch.rand(n, 4, generator=gen, dtype=torch.float64) - 0.5) * 6).clamp(0, SIZE - 1)


def test_distinct_rois_share_layer4_only_between_equal_cells_and_equal_factors():
    """roi_pool: the head runs once per (rounded cells, score factor); the loss and every gradient equal the path
    that runs every region (float64). Three images of jittered duplicates,
    with factors all equal (no scores: s = 1), of two values, and all different (nothing may be shared)."""
    gen = torch.Generator().manual_seed(3)
    images, _, _, labels = make_batch([1, 1, 1], seed=4)
    proposals = [jittered_boxes(gen, n) for n in (9, 8, 6)]
    scores = [torch.ones(9), torch.arange(8) % 2 * 0.5 + 0.5, torch.rand(6, generator=gen)]
    scores = [s.double() for s in scores]
    runs = {}
    for distinct in (True, False):
        model = head_model(roi_op="roi_pool", distinct_rois=distinct, score_scale=1.0, score_bias=0.5).train()
        rows = []
        model.head.register_forward_hook(lambda m, args, out: rows.append(len(args[0])))
        loss = model(images, proposals, scores, labels)["loss_cls"]
        loss.backward()
        runs[distinct] = loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, rows[0]
    (loss, grads, rows), (ref_loss, ref_grads, all_rows) = runs[True], runs[False]
    cells = [roi_pool_cells(b, torch.zeros(len(b), dtype=torch.long), 16) for b in proposals]
    assert [len(torch.unique(c, dim=0)) for c in cells] == [3, 3, 3]  # the fixture: 3 distinct cell boxes each
    assert all_rows == 23 and rows == 3 + 6 + 6  # one per box, one per (box, score value), all of image 2
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    assert grads.keys() == ref_grads.keys() and {"head.layer4.0.conv1.weight", "backbone.conv.weight"} <= grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-9, atol=1e-9 * float(ref_grads[name].abs().max()))


def test_gradcheck_through_roi_align_the_score_factor_layer4_and_streams():
    """Directional (fast mode) gradcheck w.r.t. the images and the proposal scores, of the region features and the
    image scores: RoIAlign, the score factor, layer4 with frozen BatchNorm, the average pool and both softmaxes."""
    model = head_model(roi_op="roi_align", score_scale=1.0, score_bias=0.5).eval()
    images, proposals, scores, _ = make_batch([2, 3], seed=5)
    sizes = [len(p) for p in proposals]

    def outputs(x, s):
        boxes, flat, index = flatten_proposals(proposals, list(s.split(sizes)))
        feats = model.forward_regions(model.backbone(x), boxes, flat, index)
        return feats, wsddn_scores(*model.forward_streams(feats), index, len(sizes))[1]

    x, s = images.requires_grad_(), torch.cat(scores).requires_grad_()
    assert torch.autograd.gradcheck(outputs, (x, s), fast_mode=True, check_undefined_grad=False)


def test_frozen_batchnorm_and_stages_stay_fixed_after_a_step():
    model = c4(freeze=("stem", "layer1")).float().train()
    images, proposals, scores, labels = make_batch([3, 2], seed=6, dtype=torch.float32)
    images, proposals = images[..., :32, :32], [(p / 2).clamp(max=31) for p in proposals]  # 32 px: 2 x 2 cells
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        train_mode = model.backbone(images)
        eval_mode = model.eval().backbone(images)
    assert torch.equal(train_mode, eval_mode)  # frozen BatchNorm: no batch statistics in training
    model.train()
    optimizer = build_optimizer(param_groups(model, 0.01, 5e-4), "sgd", 0.01, 0.9)
    sum(model(images, proposals, scores, labels).values()).backward()
    assert model.backbone.layer2[0].conv1.weight.grad.abs().sum() > 0 and model.backbone.conv1.weight.grad is None
    optimizer.step()
    after = model.state_dict()
    norms = {f"{n}.{b}" for n, m in model.named_modules() if isinstance(m, FrozenBatchNorm2d)
             for b in ("weight", "bias", "running_mean", "running_var")}
    assert len(norms) == 4 * 53  # ResNet-50's 53 BatchNorm layers, all frozen buffers
    fixed = norms | {k for k in after if k.startswith(("backbone.conv1.", "backbone.layer1."))}
    assert all(torch.equal(after[k], before[k]) for k in fixed)
    trained = [k for k in after if k not in fixed]
    assert trained and all(not torch.equal(after[k], before[k]) for k in trained if k.endswith("weight"))
    assert {k.split(".")[1] for k in trained if k.startswith("backbone.")} == {"layer2", "layer3"}
    assert any(k.startswith("head.layer4.") for k in trained)


def test_imagenet_weights_from_a_torchvision_resnet50_file(tmp_path, monkeypatch):
    """A torchvision ResNet-50 state dict (its BatchNorm counters and 1000-way fc included) fills the backbone and
    the layer4 head, from a file or as torchvision:IMAGENET1K_V1 from the torch hub cache; frozen BatchNorm then
    computes what the network computes in eval mode."""
    torch.manual_seed(1)
    net = torchvision.models.resnet50()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # statistics and affine that are not the identity
            m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2.0)
            torch.nn.init.uniform_(m.weight, 0.2, 0.6), torch.nn.init.uniform_(m.bias, -0.1, 0.1)
    net.eval()
    path = tmp_path / "resnet50_torchvision.pt"
    torch.save(net.state_dict(), path)
    model = build_teacher(TeacherModelConfig(**C4, weights=str(path)), K).eval()
    x, pooled = torch.randn(1, 3, SIZE, SIZE), torch.randn(3, 1024, 4, 4)
    with torch.no_grad():
        stem = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        torch.testing.assert_close(model.backbone(x), net.layer3(net.layer2(net.layer1(stem))), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model.head(pooled), net.layer4(pooled).mean((2, 3)), rtol=1e-4, atol=1e-5)
    hub = tmp_path / "torch" / "hub" / "checkpoints"  # where torchvision downloads ResNet50_Weights.IMAGENET1K_V1
    hub.mkdir(parents=True)
    path = path.rename(hub / "resnet50-0676ba61.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("MLKD_DOWNLOAD_WEIGHTS", raising=False)
    cached = build_teacher(TeacherModelConfig(**C4, weights="torchvision:IMAGENET1K_V1"), K).state_dict()
    assert all(torch.equal(v, cached[k]) for k, v in model.state_dict().items() if not k.startswith("fc8_"))
    with pytest.raises(ValueError, match=r"model.input_convention must be 'torchvision', got 'caffe'"):
        build_teacher(TeacherModelConfig(**{**C4, "input_convention": "caffe"}, weights=str(path)), K)
    with pytest.raises(ValueError, match="the tiny backbone has none"):
        build_teacher(TeacherModelConfig(backbone="tiny", weights=str(path)), K)
