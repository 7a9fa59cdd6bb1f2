"""The WSDDN teacher (mlkd.models.wsddn) against naive per-region, per-class loops in float64, gradcheck,
batches of different R, and bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align, roi_pool

from mlkd.models.backbones import tiny
from mlkd.models.wsddn import (P_CLAMP, WSDDN, flatten_proposals, segment_softmax, spatial_regulariser, wsddn_loss,
                               wsddn_scores)

K = 4
SIZE = 32  # image side (pixels)


# ------------------------------------------------------------------------------------------- naive reference
def naive_scores(cls_logits, det_logits, sizes, t_cls=1.0, t_det=1.0):
    """Region scores S (N, K) and image scores p (B, K), one region and one class at a time."""
    c, d = cls_logits.tolist(), det_logits.tolist()
    k = len(c[0])
    regions = [[0.0] * k for _ in c]
    images = [[0.0] * k for _ in sizes]
    start = 0
    for i, n in enumerate(sizes):
        rows = range(start, start + n)
        for r in rows:
            for j in range(k):
                s_cls = math.exp(c[r][j] / t_cls) / sum(math.exp(c[r][q] / t_cls) for q in range(k))
                s_det = math.exp(d[r][j] / t_det) / sum(math.exp(d[q][j] / t_det) for q in rows)
                regions[r][j] = s_cls * s_det
                images[i][j] += regions[r][j]
        start += n
    return torch.tensor(regions, dtype=torch.float64), torch.tensor(images, dtype=torch.float64)


def naive_loss(image_scores, labels):
    total = 0.0
    for p_i, y_i in zip(image_scores.tolist(), labels.tolist()):
        for p, y in zip(p_i, y_i):
            if y < 0:
                continue
            p = min(max(p, P_CLAMP), 1 - P_CLAMP)
            total -= math.log(p) if y == 1 else math.log(1 - p)
    return total / len(labels)


def naive_iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def regulariser_pairs(boxes, regions, sizes, labels, iou, top):
    """(k, r, r*) for every image, positive class k and neighbour r of k's best region r*: the other regions
    among k's top `top` by S whose IoU with r* exceeds `iou` (the original layer's selection)."""
    b, s = boxes.tolist(), regions.tolist()
    pairs, start = [], 0
    for i, n in enumerate(sizes):
        rows = list(range(start, start + n))
        for k, y in enumerate(labels[i].tolist()):
            if y != 1:
                continue
            ranked = sorted(rows, key=lambda r: -s[r][k])[:top]
            pairs += [(k, r, ranked[0]) for r in ranked[1:] if naive_iou(b[r], b[ranked[0]]) > iou]
        start += n
    return pairs


def naive_regulariser(features, boxes, regions, sizes, labels, iou, top):
    """What the original MatConvNet layer computes and logs: per image and positive class k, the S-weighted
    differences squared, 0.5 * sum_r ||S[r, k] * (phi_r - phi_r*)||^2; summed over classes, divided by the
    number of images (mlkd's batch mean; the original ran one image per batch)."""
    phi, s = features.tolist(), regions.tolist()
    total = 0.0
    for k, r, best in regulariser_pairs(boxes, regions, sizes, labels, iou, top):
        total += 0.5 * sum((s[r][k] * (u - v)) ** 2 for u, v in zip(phi[r], phi[best]))
    return total / len(sizes)


def naive_regulariser_grad(features, boxes, regions, sizes, labels, iou, top, overwrite=False):
    """The layer's backward: S[r, k] * (phi_r - phi_r*) at each neighbour r, minus their sum at r*, divided by
    the number of images. Summed over classes (mlkd), or, with ``overwrite``, assigned class after class as
    the layer does (a later class replaces what an earlier one put in a region)."""
    phi, s = features.tolist(), regions.tolist()
    grad = [[0.0] * len(phi[0]) for _ in phi]
    by_class: dict = {}
    for k, r, best in regulariser_pairs(boxes, regions, sizes, labels, iou, top):
        by_class.setdefault((k, best), []).append(r)
    for (k, best), near in sorted(by_class.items()):
        parts = {r: [s[r][k] * (u - v) / len(sizes) for u, v in zip(phi[r], phi[best])] for r in near}
        at_best = [-sum(p[d] for p in parts.values()) for d in range(len(phi[0]))]
        for r, g in list(parts.items()) + [(best, at_best)]:
            grad[r] = g if overwrite else [a + b for a, b in zip(grad[r], g)]
    return torch.tensor(grad, dtype=torch.float64)


def naive_forward(model: WSDDN, images, proposals, scores):
    """Region features, cls/det logits of every region: RoI-pooled ONE box at a time, multiplied by its score
    factor by hand, then fc6/fc7/fc8 (dropout must be 0)."""
    fmap = model.backbone(images)
    op = roi_pool if model.roi_op == "roi_pool" else \
        lambda f, b, s, sc: roi_align(f, b, s, sc, sampling_ratio=2, aligned=True)
    phis = []
    for i, boxes in enumerate(proposals):
        for r in range(len(boxes)):
            pooled = op(fmap[i:i + 1], [boxes[r:r + 1]], model.roi_size, 1.0 / model.backbone.stride)  # (1, C, s, s)
            s_r = 1.0 if scores is None else float(scores[i][r])
            pooled = pooled * (model.score_scale * s_r + model.score_bias)
            phis.append(F.relu(model.fc7(F.relu(model.fc6(pooled.flatten(1))))))
    phi = torch.cat(phis)
    return phi, model.fc8_c(phi), model.fc8_d(phi)


# ---------------------------------------------------------------------------------------------- fixtures
def random_boxes(gen: torch.Generator, n: int, size: int = SIZE) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=gen, dtype=torch.float64) * (0.6 * size)
    wh = torch.rand(n, 2, generator=gen, dtype=torch.float64) * (0.4 * size) + 3
    return torch.cat([xy, (xy + wh).clamp(max=size - 1)], 1)


def clustered_boxes(gen: torch.Generator, n: int, size: int = SIZE) -> torch.Tensor:
    """Jittered copies of two boxes, so that many pairs overlap (the regulariser's neighbourhoods)."""
    base = torch.tensor([[2.0, 3.0, 20.0, 22.0], [12.0, 10.0, 30.0, 29.0]], dtype=torch.float64)
    boxes = base[torch.arange(n) % 2] + torch.randn(n, 4, generator=gen, dtype=torch.float64) * 1.5
    return boxes.clamp(0, size - 1)


def make_model(**kwargs) -> WSDDN:
    torch.manual_seed(0)
    defaults = dict(hidden=16, roi_size=3, dropout=0.0)
    return WSDDN(tiny((4, 8, 8)), K, **{**defaults, **kwargs}).double()


def make_batch(sizes, seed=0, boxes=random_boxes):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(len(sizes), 3, SIZE, SIZE, generator=gen, dtype=torch.float64)
    proposals = [boxes(gen, n) for n in sizes]
    scores = [torch.rand(n, generator=gen, dtype=torch.float64) for n in sizes]
    labels = torch.randint(0, 2, (len(sizes), K), generator=gen).double()
    labels[0, 0], labels[0, 1], labels[-1, -1] = 1, -1, 1  # a positive, an ignored class
    return images, proposals, scores, labels


# ------------------------------------------------------------------------------------------- the functions
@pytest.mark.parametrize("t_cls, t_det", [(1.0, 1.0), (0.5, 2.0)])
def test_scores_and_loss_match_naive_loops(t_cls, t_det):
    sizes = [3, 1, 5]
    gen = torch.Generator().manual_seed(1)
    c = torch.randn(sum(sizes), K, generator=gen, dtype=torch.float64) * 3
    d = torch.randn(sum(sizes), K, generator=gen, dtype=torch.float64) * 3
    index = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    regions, images = wsddn_scores(c, d, index, len(sizes), t_cls, t_det)
    want_regions, want_images = naive_scores(c, d, sizes, t_cls, t_det)
    torch.testing.assert_close(regions, want_regions, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(images, want_images, rtol=1e-12, atol=1e-14)
    assert torch.all((images > 0) & (images < 1))
    labels = torch.tensor([[1, 0, -1, 1], [0, 0, 1, -1], [1, 1, 0, 0]], dtype=torch.float64)
    assert wsddn_loss(images, labels).item() == pytest.approx(naive_loss(images, labels), rel=1e-12)


def test_loss_clamps_and_ignores():
    p = torch.tensor([[0.0, 1.0, 0.5]], dtype=torch.float64)  # hits both clamps
    y = torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64)
    assert wsddn_loss(p, y).item() == pytest.approx(-2 * math.log(P_CLAMP))
    assert wsddn_loss(p, torch.full_like(y, -1)).item() == 0.0


def test_segment_softmax_large_logits_and_empty_segment():
    logits = torch.tensor([[1000.0, -1000.0], [999.0, -1001.0], [5.0, 5.0]])
    out = segment_softmax(logits, torch.tensor([0, 0, 2]), 3)  # segment 1 is empty
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:2].sum(0), torch.ones(2))
    torch.testing.assert_close(out[2], torch.ones(2))


@pytest.mark.parametrize("iou, top", [(0.3, 10), (0.5, 3)])
def test_spatial_regulariser_matches_naive_loop(iou, top):
    sizes = [6, 1, 8]
    gen = torch.Generator().manual_seed(2)
    boxes = torch.cat([clustered_boxes(gen, n) for n in sizes])
    features = torch.randn(sum(sizes), 5, generator=gen, dtype=torch.float64)
    regions = torch.rand(sum(sizes), K, generator=gen, dtype=torch.float64)
    labels = torch.tensor([[1, 0, 1, -1], [1, 1, 1, 1], [0, 1, 1, 0]], dtype=torch.float64)
    index = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    features.requires_grad_(True)
    got = spatial_regulariser(features, boxes, regions, index, labels, iou, top)
    want = naive_regulariser(features, boxes, regions, sizes, labels, iou, top)
    assert want > 0  # the fixture really has neighbours
    assert got.item() == pytest.approx(want, rel=1e-12)  # the value the original layer logs
    got.backward()  # and the layer's gradient, summed over classes
    want_grad = naive_regulariser_grad(features.detach(), boxes, regions, sizes, labels, iou, top)
    torch.testing.assert_close(features.grad, want_grad, rtol=1e-12, atol=1e-15)


def test_gradcheck_scores_loss_and_regulariser():
    sizes = [3, 2]
    gen = torch.Generator().manual_seed(3)
    index = torch.repeat_interleave(torch.arange(2), torch.tensor(sizes))
    c = torch.randn(5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    d = torch.randn(5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: segment_softmax(x, index, 3), (d,))  # segment 2 empty
    assert torch.autograd.gradcheck(lambda x, y: wsddn_scores(x, y, index, 2, 0.5, 2.0), (c, d))
    assert torch.autograd.gradcheck(lambda x, y: wsddn_loss(wsddn_scores(x, y, index, 2)[1], labels), (c, d))
    p = torch.tensor([[0.2, 0.7, 0.5], [0.9, 0.1, 0.4]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: wsddn_loss(x, labels), (p,))

    boxes = torch.cat([clustered_boxes(gen, n) for n in (6, 4)])
    index = torch.repeat_interleave(torch.arange(2), torch.tensor([6, 4]))
    regions = torch.rand(10, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    features = torch.randn(10, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    reg = lambda f: spatial_regulariser(f, boxes, regions, index, labels, 0.3, 10)  # noqa: E731
    assert reg(features).item() > 0
    # the gradient is that of the S-weighted loss (S constant), not of the logged S^2-weighted value:
    # gradcheck that loss, written out, then compare the regulariser's gradient with it
    pairs = regulariser_pairs(boxes, regions, [6, 4], labels, 0.3, 10)
    s = regions.detach()
    weighted = lambda f: sum(0.5 * s[r, k] * (f[r] - f[b]).pow(2).sum() for k, r, b in pairs) / 2  # noqa: E731
    assert torch.autograd.gradcheck(weighted, (features,))
    want = torch.autograd.grad(weighted(features), features)[0]
    got = torch.autograd.grad(reg(features), features)[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    reg(features).backward()
    assert regions.grad is None  # S is a constant weight (the released layer's gradient)


def test_regulariser_multi_class_gradient_sums_where_the_original_overwrites():
    gen = torch.Generator().manual_seed(6)
    boxes = clustered_boxes(gen, 8)
    features = torch.randn(8, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    regions = torch.rand(8, K, generator=gen, dtype=torch.float64)
    index = torch.zeros(8, dtype=torch.long)
    for labels, same in ((torch.tensor([[1.0, 0, 0, 0]]), True), (torch.tensor([[1.0, 1, 1, 0]]), False)):
        grad = torch.autograd.grad(spatial_regulariser(features, boxes, regions, index, labels, 0.3, 10), features)[0]
        args = (features.detach(), boxes, regions, [8], labels, 0.3, 10)
        torch.testing.assert_close(grad, naive_regulariser_grad(*args), rtol=1e-12, atol=1e-15)
        original = naive_regulariser_grad(*args, overwrite=True)
        # one positive class: the original's gradient; several sharing regions: the original keeps the last class
        assert torch.allclose(grad, original, rtol=1e-12, atol=1e-15) == same


def test_flatten_proposals():
    boxes, scores, index = flatten_proposals([torch.zeros(2, 4), torch.ones(3, 4)], None)
    assert boxes.shape == (5, 4) and scores.tolist() == [1.0] * 5 and index.tolist() == [0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match=r"proposals\[1\] must be Tensor\[R, 4\].*\(3, 5\)"):
        flatten_proposals([torch.zeros(2, 4), torch.zeros(3, 5)], None)
    with pytest.raises(ValueError, match="one Tensor\\[R_i\\] per image"):
        flatten_proposals([torch.zeros(2, 4)], [torch.ones(3)])


# ----------------------------------------------------------------------------------------------- the model
@pytest.mark.parametrize("roi_op, t_cls, t_det, scale, bias, with_scores", [
    ("roi_pool", 1.0, 1.0, 1.0, 0.0, False),
    ("roi_pool", 0.5, 2.0, 10.0, 1.0, True),
    ("roi_align", 1.0, 2.0, 1.0, 0.0, True),
])
def test_model_matches_naive_forward(roi_op, t_cls, t_det, scale, bias, with_scores):
    model = make_model(roi_op=roi_op, cls_temperature=t_cls, det_temperature=t_det, score_scale=scale,
                       score_bias=bias)
    sizes = [4, 7]
    images, proposals, scores, labels = make_batch(sizes)
    scores = scores if with_scores else None
    phi, c, d = naive_forward(model, images, proposals, scores)
    want_regions, want_images = naive_scores(c, d, sizes, t_cls, t_det)
    model.train()
    losses = model(images, proposals, scores, labels)
    assert set(losses) == {"loss_cls"}
    assert losses["loss_cls"].item() == pytest.approx(naive_loss(want_images, labels), rel=1e-10)
    model.eval()
    out = model(images, proposals, scores)
    for o, want in zip(out, want_regions.split(sizes)):
        torch.testing.assert_close(o["region_scores"], want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.stack([o["image_scores"] for o in out]), want_images, rtol=1e-10, atol=1e-12)


def test_model_regulariser_matches_naive():
    model = make_model(reg_weight=0.1, reg_iou=0.3, reg_top=4)
    sizes = [6, 9]
    images, proposals, scores, labels = make_batch(sizes, seed=4, boxes=clustered_boxes)
    phi, c, d = naive_forward(model, images, proposals, None)
    regions, _ = naive_scores(c, d, sizes)
    want = naive_regulariser(phi, torch.cat(proposals), regions, sizes, labels, 0.3, 4)
    assert want > 0
    losses = model.train()(images, proposals, None, labels)
    assert set(losses) == {"loss_cls", "loss_reg"}
    assert losses["loss_reg"].item() == pytest.approx(0.1 * want, rel=1e-10)


def test_batch_equals_each_image_alone():
    model = make_model(reg_weight=0.1, reg_iou=0.3)
    sizes = [2, 9, 1]
    images, proposals, scores, labels = make_batch(sizes, seed=5, boxes=clustered_boxes)
    model.train()
    batch = model(images, proposals, scores, labels)
    alone = [model(images[i:i + 1], proposals[i:i + 1], scores[i:i + 1], labels[i:i + 1]) for i in range(3)]
    for name in ("loss_cls", "loss_reg"):
        torch.testing.assert_close(batch[name], sum(a[name] for a in alone) / 3, rtol=1e-12, atol=1e-14)
    model.eval()
    out = model(images, proposals, scores)
    for i in range(3):
        single = model(images[i:i + 1], proposals[i:i + 1], scores[i:i + 1])[0]
        for key in ("region_scores", "image_scores", "objectness"):
            torch.testing.assert_close(out[i][key], single[key], rtol=1e-12, atol=1e-14)


def test_eval_outputs():
    model = make_model().eval()
    sizes = [3, 6]
    images, proposals, scores, _ = make_batch(sizes, seed=6)
    with torch.no_grad():
        out = model(images, proposals, scores)
    assert len(out) == 2
    for o, n in zip(out, sizes):
        assert o["region_scores"].shape == (n, K) and o["image_scores"].shape == (K,) and o["objectness"].shape == (n,)
        torch.testing.assert_close(o["image_scores"], o["region_scores"].sum(0))
        torch.testing.assert_close(o["objectness"], o["region_scores"].sum(1))
        assert torch.all((o["image_scores"] > 0) & (o["image_scores"] < 1))


def test_model_gradcheck():
    """End to end through RoI pooling, fc6/fc7 and both streams (w.r.t. fc8 and fc6 weights)."""
    model = make_model(hidden=6, cls_temperature=0.5, det_temperature=2.0).train()
    images, proposals, scores, labels = make_batch([3, 2], seed=7)

    def loss(w6, w8):
        params = {"fc6.weight": w6, "fc8_d.weight": w8}
        return torch.func.functional_call(model, params, (images, proposals, scores, labels))["loss_cls"]

    w6, w8 = (w.detach().clone().requires_grad_() for w in (model.fc6.weight, model.fc8_d.weight))
    assert torch.autograd.gradcheck(loss, (w6, w8))


def test_zero_proposals_and_bad_inputs_raise():
    model = make_model()
    images, proposals, _, labels = make_batch([3, 2])
    with pytest.raises(ValueError, match="image 1 of the batch has zero proposals"):
        model(images, [proposals[0], proposals[1][:0]], None, labels)
    with pytest.raises(ValueError, match="got 1 proposal tensors for a batch of 2 images"):
        model(images, proposals[:1], None, labels)
    with pytest.raises(ValueError, match="training needs labels"):
        model.train()(images, proposals)
    with pytest.raises(ValueError, match="roi_op must be 'roi_pool' or 'roi_align', got 'roi_max'"):
        WSDDN(tiny((4, 8)), K, roi_op="roi_max")


@pytest.mark.parametrize("roi_op", ["roi_pool", "roi_align"])
def test_bf16_autocast_on_cpu(roi_op):
    """run.amp=bf16 on the CPU: the step runs, the loss is close to float32's, and RoI pooling sees the exact
    box coordinates (not rounded to bfloat16)."""
    model = make_model(roi_op=roi_op).float().train()
    images, proposals, scores, labels = make_batch([5, 8], seed=8)
    images, proposals, scores = images.float() * 50, [p.float() * 20 for p in proposals], [s.float() for s in scores]
    images = F.interpolate(images, scale_factor=20)  # 640 px: coordinates where bfloat16 steps are 4 px
    full = model(images, proposals, scores, labels.float())["loss_cls"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = model(images, proposals, scores, labels.float())["loss_cls"]
        fmap = model.backbone(images)
        boxes, _, index = flatten_proposals(proposals, None)
        pooled = model.pool(fmap, boxes, index)
    assert fmap.dtype == torch.bfloat16 and pooled.dtype == torch.bfloat16
    half.backward()
    assert torch.isfinite(half) and half.item() == pytest.approx(full.item(), rel=0.05)
    rois = torch.cat([index[:, None].float(), boxes], 1)
    exact = (roi_pool(fmap.float(), rois, 3, 1 / 4) if roi_op == "roi_pool" else
             roi_align(fmap.float(), rois, 3, 1 / 4, sampling_ratio=2, aligned=True))
    torch.testing.assert_close(pooled, exact.to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_step(dtype):
    model = make_model().float().cuda().train()
    images, proposals, scores, labels = make_batch([5, 8], seed=9)
    with torch.autocast("cuda", dtype=dtype):
        losses = model(images.float().cuda(), [p.float().cuda() for p in proposals], [s.float().cuda() for s in scores],
                       labels.float().cuda())
    losses["loss_cls"].backward()
    assert torch.isfinite(losses["loss_cls"])
