"""OICR refinement (mlkd.models.refine) against naive per-region loops written from the paper's description: the
pseudo-labels and weights, the weighted loss, no gradient through the pseudo-labels, the inference scores; a
refined WSDDN equal on its distinct-region and per-region paths and batched or one image at a time; a plain WSDDN
unchanged by the new code (same initial weights, same outputs)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mlkd.errors import BadInput
from mlkd.models.build import build_teacher
from mlkd.models.configs import TeacherModelConfig
from mlkd.models.ops import segment_max
from mlkd.models.refine import pseudo_labels, refine_loss, refined_region_scores, refinement_losses
from mlkd.utils.config import from_dict


def iou(a, b) -> float:
    """IoU of two (x1, y1, x2, y2) boxes, torchvision's convention (areas without +1)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def naive_pseudo_labels(boxes, scores, index, labels, threshold):
    """OICR, Sec. 3.3, one image and one region at a time: each present class's top region is a seed with the class
    and its score; each region takes the seed of largest IoU (the first in class order on a tie): its class if the
    IoU reaches the threshold, else background (0), and that seed's score as weight. No seeds: weight 0."""
    boxes, scores, index, labels = (t.tolist() for t in (boxes, scores, index, labels))
    targets, weights = [0] * len(boxes), [0.0] * len(boxes)
    for i, image_labels in enumerate(labels):
        rows = [r for r in range(len(boxes)) if index[r] == i]
        seeds = []  # (class, region, score)
        for c, y in enumerate(image_labels):
            if y != 1:
                continue
            best = rows[0]
            for r in rows:
                if scores[r][c] > scores[best][c]:
                    best = r
            seeds.append((c, best, scores[best][c]))
        if not seeds:
            continue
        for r in rows:
            chosen, overlap = None, -1.0
            for c, s_row, s in seeds:
                o = iou(boxes[r], boxes[s_row])
                if o > overlap:
                    chosen, overlap = (c, s), o
            targets[r] = chosen[0] + 1 if overlap >= threshold else 0
            weights[r] = chosen[1]
    return targets, weights


def naive_loss(logits, targets, weights, index, num_images):
    total = 0.0
    for i in range(num_images):
        rows = [r for r in range(len(targets)) if index[r] == i]
        image = 0.0
        for r in rows:
            z = logits[r].tolist()
            log_softmax = z[targets[r]] - math.log(sum(math.exp(v) for v in z))
            image += -weights[r] * log_softmax
        total += image / max(len(rows), 1)
    return total / num_images


def random_batch(seed: int, sizes=(7, 1, 5, 9), classes: int = 4):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    xy = torch.rand(n, 2, generator=g) * 60
    wh = torch.rand(n, 2, generator=g) * 40 + 2
    boxes = torch.cat([xy, xy + wh], 1).double()
    boxes[1] = boxes[0]  # a duplicate region: the seeds of two classes can fall on equal boxes
    scores = torch.rand(n, classes, generator=g, dtype=torch.float64)
    index = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)])
    labels = torch.tensor([[1, 0, 1, -1], [0, 1, 0, 0], [0, 0, 0, -1], [1, 1, 1, 1]])  # image 2: no positive
    return boxes, scores, index, labels


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("threshold", [0.5, 0.1, 1.0])
def test_pseudo_labels_match_a_per_region_loop(seed, threshold):
    boxes, scores, index, labels = random_batch(seed)
    targets, weights = pseudo_labels(boxes, scores, index, labels, threshold)
    want_t, want_w = naive_pseudo_labels(boxes, scores, index, labels, threshold)
    assert targets.tolist() == want_t
    np.testing.assert_array_equal(weights.numpy(), np.array(want_w))
    assert (weights[index == 2] == 0).all()  # no positive class: no pseudo-labels
    single = index == 1  # a one-region image: that region is its only class's seed, at IoU 1
    assert targets[single].tolist() == [2] and weights[single].tolist() == [scores[single, 1].item()]


def test_shared_seed_goes_to_the_first_class_and_ignored_labels_are_no_seeds():
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 9], [50, 50, 60, 60]])
    scores = torch.tensor([[0.9, 0.8, 0.99], [0.1, 0.1, 0.0], [0.0, 0.1, 0.01]])
    targets, weights = pseudo_labels(boxes, scores, torch.zeros(3, dtype=torch.int64), torch.tensor([[1, 1, -1]]))
    # both classes' seed is region 0: every region goes to class 0 (the first), weight 0.9; class 2 is ignored
    assert targets.tolist() == [1, 1, 0] and weights.tolist() == pytest.approx([0.9, 0.9, 0.9])


@pytest.mark.parametrize("seed", range(3))
def test_weighted_loss_matches_a_per_region_loop(seed):
    boxes, scores, index, labels = random_batch(seed)
    logits = torch.randn(len(boxes), labels.shape[1] + 1, generator=torch.Generator().manual_seed(seed),
                         dtype=torch.float64)
    targets, weights = pseudo_labels(boxes, scores, index, labels)
    got = refine_loss(logits, targets, weights, index, labels.shape[0])
    assert float(got) == pytest.approx(naive_loss(logits, targets.tolist(), weights.tolist(), index.tolist(), 4),
                                       rel=1e-12)


def test_streams_chain_their_labels_and_no_gradient_reaches_them():
    boxes, scores, index, labels = random_batch(0)
    wsddn = scores.clone().requires_grad_()
    streams = [torch.randn(len(boxes), 5, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    losses = refinement_losses(streams, wsddn, boxes, index, labels, 0.5)
    previous = [scores] + [F.softmax(z.detach(), 1)[:, 1:] for z in streams[:-1]]  # stream k learns from k-1
    for loss, z, prev in zip(losses, streams, previous):
        t, w = pseudo_labels(boxes, prev, index, labels, 0.5)
        assert float(loss) == pytest.approx(float(refine_loss(z.detach(), t, w, index, 4)), rel=1e-12)
    for k, loss in enumerate(losses):
        grads = torch.autograd.grad(loss, [wsddn, *streams], allow_unused=True, retain_graph=True)
        assert all(g is None for j, g in enumerate(grads) if j != k + 1)  # only into its own stream
        assert grads[k + 1].abs().sum() > 0


def test_inference_scores_are_the_streams_mean_without_background_and_the_segment_max():
    z = [torch.randn(6, 4, dtype=torch.float64) for _ in range(3)]
    want = sum(torch.exp(x) / torch.exp(x).sum(1, keepdim=True) for x in z)[:, 1:] / 3
    torch.testing.assert_close(refined_region_scores(z), want, rtol=1e-12, atol=0)
    torch.testing.assert_close(refined_region_scores(z, 0.5), refined_region_scores([2 * x for x in z]))
    index = torch.tensor([0, 0, 1, 1, 1, 2])
    got = segment_max(want, index, 4)
    for i in range(3):
        torch.testing.assert_close(got[i], want[index == i].max(0).values)
    assert (got[3] == 0).all()  # an image without regions


def teacher(refine: int, seed: int = 0, **extra):
    cfg = from_dict(TeacherModelConfig, {"backbone": "tiny", "tiny_channels": [8, 16, 16], "hidden": 32,
                                         "roi_size": 3, "dropout": 0.0, "refine": refine, **extra})
    torch.manual_seed(seed)
    return build_teacher(cfg, 5)


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, 64, 64, generator=g)
    proposals = []
    for r in (6, 1, 9):
        xy = torch.rand(r, 2, generator=g) * 40
        proposals.append(torch.cat([xy, xy + torch.rand(r, 2, generator=g) * 20 + 4], 1))
    proposals[2][3] = proposals[2][2]  # repeated regions: the distinct path shares them
    labels = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0, 0, -1]])
    return images, proposals, labels


def test_distinct_and_per_region_paths_and_batching_agree():
    images, proposals, labels = inputs()
    models = {d: teacher(3, **{"distinct_rois": d}) for d in (True, False)}
    losses = {d: m.train()(images, proposals, labels=labels) for d, m in models.items()}
    assert set(losses[True]) == {"loss_cls", "loss_refine1", "loss_refine2", "loss_refine3"}
    for k in losses[True]:
        torch.testing.assert_close(losses[True][k], losses[False][k], rtol=1e-5, atol=1e-7)
    model = models[True].train()
    single = [model(images[i:i + 1], proposals[i:i + 1], labels=labels[i:i + 1]) for i in range(3)]
    for k in losses[True]:  # every loss is a mean over images
        torch.testing.assert_close(losses[True][k], sum(s[k] for s in single) / 3, rtol=1e-5, atol=1e-7)
    outs = {d: m.eval()(images, proposals) for d, m in models.items()}
    alone = [models[True](images[i:i + 1], proposals[i:i + 1])[0] for i in range(3)]
    for a, b, c in zip(outs[True], outs[False], alone):
        for key in ("region_scores", "image_scores", "objectness"):
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(a[key], c[key], rtol=1e-5, atol=1e-6)


def test_image_scores_wsddn_or_refined():
    images, proposals, _ = inputs(1)
    wsddn_like, refined = teacher(2).eval(), teacher(2, image_scores="refined").eval()
    refined.load_state_dict(wsddn_like.state_dict())
    plain = teacher(0).eval()
    plain.load_state_dict({k: v for k, v in wsddn_like.state_dict().items() if not k.startswith("refine.")})
    for a, b, p in zip(wsddn_like(images, proposals), refined(images, proposals), plain(images, proposals)):
        torch.testing.assert_close(a["region_scores"], b["region_scores"], rtol=0, atol=0)
        torch.testing.assert_close(a["image_scores"], p["image_scores"], rtol=0, atol=0)  # WSDDN's p
        torch.testing.assert_close(b["image_scores"], a["region_scores"].max(0).values, rtol=0, atol=0)
        assert not torch.allclose(a["region_scores"], p["region_scores"])  # the refined streams' scores
        assert ((a["region_scores"] > 0) & (a["region_scores"] < 1)).all()


def test_a_plain_wsddn_is_unchanged_by_refinement():
    """refine 0 draws the same initial weights as before the refinement existed (the streams come after fc8 in
    the random stream) and has no extra parameters; refine 3 only adds the streams."""
    plain, refined = teacher(0, seed=7), teacher(3, seed=7)
    own = plain.state_dict()
    assert not any(k.startswith("refine") for k in own)
    assert all(torch.equal(v, refined.state_dict()[k]) for k, v in own.items())
    assert {k for k in refined.state_dict() if k not in own} == {f"refine.{i}.{p}" for i in range(3)
                                                                 for p in ("weight", "bias")}
    assert refined.refine[0].weight.shape == (6, 32)  # C + 1 with background


def test_config_refuses_refined_image_scores_without_streams():
    with pytest.raises(BadInput, match=r"model.image_scores: 'refined' takes the refinement streams' scores, but "
                                       r"model.refine is 0"):
        from_dict(TeacherModelConfig, {"image_scores": "refined"})
    with pytest.raises(BadInput, match=r"refine"):
        from_dict(TeacherModelConfig, {"refine": -1})
