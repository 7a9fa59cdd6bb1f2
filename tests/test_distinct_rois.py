"""Distinct RoIs (pool and run fc6 once per region that rounds to the same feature-map cells): the teacher's
image and region scores, the student's region features and every parameter gradient equal the per-region path,
with many duplicate boxes and with none; the cell rounding equals what torchvision's roi_pool reads."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import roi_pool

from mlkd.models.backbones import tiny
from mlkd.models.ops import distinct_rows, roi_pool_cells
from mlkd.models.student import Student
from mlkd.models.wsddn import WSDDN

K, SIZE, STRIDE = 5, 64, 8


def teacher(distinct: bool) -> WSDDN:
    torch.manual_seed(0)
    return WSDDN(tiny((8, 16, 16, 16)), K, hidden=32, roi_size=3, dropout=0.0, score_scale=0.5, score_bias=0.2,
                 reg_weight=0.3, distinct_rois=distinct).double()


def student(distinct: bool) -> Student:
    torch.manual_seed(0)
    return Student(tiny((8, 16, 16, 16)), K, hidden=32, roi_size=3, dropout=0.0, distinct_rois=distinct).double()


def boxes_with_duplicates(gen: torch.Generator, n: int, dup: bool) -> torch.Tensor:
    """``n`` boxes in a SIZE x SIZE image. ``dup``: few base boxes, each jittered by less than half a cell so
    many round to the same cells (and some land exactly on .5 after scaling); else boxes on distinct cells."""
    if dup:
        base = torch.tensor([[0.0, 0, 31, 31], [8, 8, 55, 40], [16, 0, 63, 63], [0, 24, 40, 48]], dtype=torch.float64)
        pick = base[torch.randint(len(base), (n,), generator=gen)]
        jitter = (torch.rand(n, 4, generator=gen, dtype=torch.float64) - 0.5) * 3.0  # < STRIDE / 2
        boxes = (pick + jitter).clamp(0, SIZE - 1)
        boxes[: n // 4, :2] = pick[: n // 4, :2] + 4.0  # 0.5 cell exactly: the rounding's tie case
        return boxes
    cells = torch.randperm(7 * 7, generator=gen)[:n]  # distinct top-left cells, same size
    x, y = (cells % 7).double() * STRIDE, (cells // 7).double() * STRIDE
    return torch.stack([x, y, x + 7.0, y + 7.0], 1)


@pytest.mark.parametrize("dup", [True, False], ids=["many-duplicates", "no-duplicates"])
def test_teacher_scores_and_gradients_equal_the_per_region_path(dup):
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, SIZE, SIZE, generator=gen, dtype=torch.float64)
    proposals = [boxes_with_duplicates(gen, 40, dup), boxes_with_duplicates(gen, 25, dup)]
    scores = [torch.rand(len(b), generator=gen, dtype=torch.float64) for b in proposals]
    cells = roi_pool_cells(torch.cat(proposals), torch.tensor([0] * 40 + [1] * 25), STRIDE, torch.float64)
    unique = len(torch.unique(cells, dim=0))
    assert (unique < 20) if dup else (unique == 65)  # the fixture really has (or lacks) duplicates
    labels = torch.tensor([[1.0, 0, 1, -1, 0], [0, 1, 0, 0, 1]])
    out, grads = {}, {}
    for distinct in (True, False):
        model = teacher(distinct)
        model.eval()
        with torch.no_grad():
            out[distinct] = model(images, proposals, scores)
        model.train()
        loss = sum(model(images, proposals, scores, labels).values())
        loss.backward()
        grads[distinct] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for a, b in zip(out[True], out[False]):
        torch.testing.assert_close(a["image_scores"], b["image_scores"], rtol=0, atol=1e-5)
        torch.testing.assert_close(a["region_scores"], b["region_scores"], rtol=0, atol=1e-5)
    assert grads[True].keys() == grads[False].keys() and "fc6.weight" in grads[True]
    for name, g in grads[False].items():
        err = (grads[True][name] - g).norm() / g.norm().clamp_min(1e-12)
        assert err < 1e-4, f"{name}: relative gradient difference {err:.2e}"


@pytest.mark.parametrize("dup", [True, False], ids=["many-duplicates", "no-duplicates"])
def test_student_region_features_and_gradients_equal_the_per_region_path(dup):
    gen = torch.Generator().manual_seed(2)
    images = torch.randn(2, 3, SIZE, SIZE, generator=gen, dtype=torch.float64)
    boxes = torch.cat([boxes_with_duplicates(gen, 30, dup), boxes_with_duplicates(gen, 20, dup)])
    index = torch.tensor([0] * 30 + [1] * 20)
    feats, grads = {}, {}
    for distinct in (True, False):
        model = student(distinct).train()
        fmap = model.backbone(images)
        f = model.forward_regions(fmap, boxes, index, ("fc6", "fc7"))
        feats[distinct] = {k: v.detach() for k, v in f.items()}
        (f["fc7"].square().sum() + f["fc6"].sum()).backward()
        grads[distinct] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for layer in ("fc6", "fc7"):
        torch.testing.assert_close(feats[True][layer], feats[False][layer], rtol=0, atol=1e-5)
    for name, g in grads[False].items():
        err = (grads[True][name] - g).norm() / g.norm().clamp_min(1e-12)
        assert err < 1e-4, f"{name}: relative gradient difference {err:.2e}"


def test_cells_are_what_roi_pool_reads():
    """Boxes with equal cell rows pool to equal features, and boxes whose rows differ in one coordinate pool to
    different ones on a feature map whose every cell differs: the rounding is torchvision's, ties included."""
    fmap = torch.arange(1 * 1 * 9 * 9, dtype=torch.float32).reshape(1, 1, 9, 9) ** 1.5  # all cells distinct
    gen = torch.Generator().manual_seed(3)
    boxes = (torch.rand(400, 4, generator=gen) * 64).round(decimals=0) / 2  # many exact .5 after / 8 ... and 0.25
    boxes = torch.cat([torch.minimum(boxes[:, :2], boxes[:, 2:]), torch.maximum(boxes[:, :2], boxes[:, 2:])], 1)
    index = torch.zeros(len(boxes), dtype=torch.int64)
    cells = roi_pool_cells(boxes, index, STRIDE)
    rois = torch.cat([index[:, None].float(), boxes], 1)
    pooled = roi_pool(fmap, rois, 2, 1.0 / STRIDE).flatten(1)
    first, inverse = distinct_rows(cells)
    torch.testing.assert_close(cells[first][inverse], cells, rtol=0, atol=0)
    torch.testing.assert_close(pooled[first][inverse], pooled, rtol=0, atol=0)  # equal cells -> equal features
    # a one-cell box read at the rounded corner: the (x1, y1) cell's value is what roi_pool returns
    single = roi_pool(fmap, torch.cat([index[:, None].float(), boxes[:, :2], boxes[:, :2]], 1), 1, 1.0 / STRIDE)
    corner = roi_pool_cells(torch.cat([boxes[:, :2], boxes[:, :2]], 1), index, STRIDE)[:, 1:3].clamp(0, 8)
    torch.testing.assert_close(single.flatten(), fmap[0, 0, corner[:, 1], corner[:, 0]], rtol=0, atol=0)


def test_every_box_distinct_and_every_box_equal():
    rows = torch.tensor([[0, 1, 1, 2, 2], [0, 1, 1, 2, 3], [1, 1, 1, 2, 2]])
    first, inverse = distinct_rows(rows)
    assert len(first) == 3 and torch.equal(rows[first][inverse], rows)
    same = rows[:1].repeat(6, 1)
    first, inverse = distinct_rows(same)
    assert len(first) == 1 and inverse.tolist() == [0] * 6
