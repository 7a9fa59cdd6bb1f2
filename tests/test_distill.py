"""Distillation losses against naive references, the two views' box rescaling, the frozen teacher."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import roi_pool

from mlkd.data.transforms import TeacherStudentViews
from mlkd.distill.objective import StudentObjective, feature_loss, soft_label_loss
from mlkd.distill.teacher import check_feature_width, teacher_image_probs, top_regions
from mlkd.models.backbones import tiny
from mlkd.models.student import Student, label_loss
from mlkd.models.wsddn import WSDDN

K = 4


def make_teacher(hidden: int = 16) -> WSDDN:
    torch.manual_seed(0)
    return WSDDN(tiny((4, 8, 8), 1), K, hidden=hidden, roi_size=2, dropout=0.5).double()


def make_student(hidden: int = 16) -> Student:
    torch.manual_seed(1)
    return Student(tiny((4, 8, 8), 1), K, hidden=hidden, roi_size=2, dropout=0.5).double()


def random_boxes(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=gen, dtype=torch.float64) * (size - 8)
    wh = 4 + torch.rand(n, 2, generator=gen, dtype=torch.float64) * (size / 2)
    return torch.cat([xy, (xy + wh).clamp(max=size)], 1)


def test_feature_loss_matches_naive_loop():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(7, 5, generator=gen), torch.randn(7, 5, generator=gen)
    naive = sum(sum((t[r, d] - s[r, d]) ** 2 for d in range(5)) for r in range(7)) / (2 * 7)
    assert feature_loss(s, t).item() == pytest.approx(naive.item(), rel=1e-6)
    with pytest.raises(ValueError, match=r"student region features \(7, 5\) and teacher's \(7, 6\) differ"):
        feature_loss(s, torch.zeros(7, 6))


def test_normalised_feature_losses_match_naive_loops_and_ignore_the_teachers_scale():
    gen = torch.Generator().manual_seed(3)
    s, t = torch.randn(6, 4, generator=gen, dtype=torch.float64), torch.randn(6, 4, generator=gen, dtype=torch.float64)
    err = sum((t[r, d] - s[r, d]) ** 2 for r in range(6) for d in range(4))
    energy = sum(t[r, d] ** 2 for r in range(6) for d in range(4))
    assert feature_loss(s, t, "relative").item() == pytest.approx((err / energy).item(), rel=1e-12)
    unit = [(t[r] / math.sqrt(sum(t[r, d] ** 2 for d in range(4))), s[r] / math.sqrt(sum(s[r, d] ** 2 for d in range(4))))
            for r in range(6)]
    naive_l2 = sum(((a - b) ** 2).sum() for a, b in unit) / (2 * 6)
    assert feature_loss(s, t, "l2").item() == pytest.approx(naive_l2.item(), rel=1e-12)
    for norm in ("relative", "l2"):  # a teacher with 50x larger features and a student following it: same loss
        assert feature_loss(50 * s, 50 * t, norm).item() == pytest.approx(feature_loss(s, t, norm).item(), rel=1e-9)
    assert feature_loss(torch.zeros(6, 4), t, "relative").item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="feature norm must be 'none', 'relative' or 'l2', got 'max'"):
        feature_loss(s, t, "max")


def test_soft_label_loss_with_learnable_scale_matches_naive_loop():
    gen = torch.Generator().manual_seed(1)
    z, p = torch.randn(3, K, generator=gen, dtype=torch.float64), torch.rand(3, K, generator=gen, dtype=torch.float64)
    a = torch.tensor([0.2, 0.5, 1.0, 3.0], dtype=torch.float64)
    naive = 0.0
    for b in range(3):
        for k in range(K):
            q = 1 / (1 + math.exp(-a[k].item() * z[b, k].item()))
            naive -= p[b, k].item() * math.log(q) + (1 - p[b, k].item()) * math.log(1 - q)
    assert soft_label_loss(z, a, p).item() == pytest.approx(naive / 3, rel=1e-10)


def test_label_loss_ignores_minus_one_and_averages_over_images():
    z = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]], dtype=torch.float64)
    y = torch.tensor([[1, 0, -1], [-1, 1, 0]], dtype=torch.float64)
    naive = 0.0
    for b in range(2):
        for k in range(3):
            if y[b, k] >= 0:
                q = 1 / (1 + math.exp(-z[b, k].item()))
                naive -= y[b, k].item() * math.log(q) + (1 - y[b, k].item()) * math.log(1 - q)
    assert label_loss(z, y).item() == pytest.approx(naive / 2, rel=1e-10)


def test_teacher_probs_use_both_streams_logits_doubled():
    teacher = make_teacher().eval()
    gen = torch.Generator().manual_seed(2)
    images = torch.randn(2, 3, 32, 32, generator=gen, dtype=torch.float64)
    proposals = [random_boxes(5, 32, gen), random_boxes(3, 32, gen)]
    scores = [torch.rand(5, generator=gen, dtype=torch.float64), torch.rand(3, generator=gen, dtype=torch.float64)]
    got = teacher_image_probs(teacher, images, proposals, scores)
    fmap = teacher.backbone(images)
    for i, (b, s) in enumerate(zip(proposals, scores)):  # one image at a time, by the formula
        phi = teacher.forward_regions(fmap[i:i + 1], b, s, torch.zeros(len(b), dtype=torch.int64))
        c, d = teacher.forward_streams(phi)
        want = (torch.softmax(2 * c, 1) * torch.softmax(2 * d, 0)).sum(0)
        assert torch.allclose(got[i].double(), want, atol=1e-6)


@pytest.mark.parametrize("top_k", [None, 2])
def test_the_teacher_in_chunks_of_images_gives_the_one_forward_values(top_k):
    from mlkd.distill.teacher import teacher_outputs

    teacher = make_teacher().eval()
    gen = torch.Generator().manual_seed(3)
    images = torch.randn(5, 3, 32, 32, generator=gen, dtype=torch.float64)
    sizes = [4, 1, 6, 3, 2]  # uneven, one image with a single proposal
    proposals = [random_boxes(n, 32, gen) for n in sizes]
    scores = [torch.rand(n, generator=gen, dtype=torch.float64) for n in sizes]
    whole = teacher_outputs(teacher, images, proposals, scores, True, ["fc6", "fc7"], top_k, chunk=5)
    for chunk in (1, 2, 4):
        probs, feats, keep = teacher_outputs(teacher, images, proposals, scores, True, ["fc6", "fc7"], top_k,
                                             chunk=chunk)
        torch.testing.assert_close(probs, whole[0], rtol=0, atol=1e-12)
        for layer in ("fc6", "fc7"):
            torch.testing.assert_close(feats[layer], whole[1][layer], rtol=0, atol=1e-12)
        if top_k is None:
            assert keep is None and whole[2] is None and feats["fc7"].shape[0] == sum(sizes)
        else:  # rows among the whole batch's flattened proposals, not the chunk's
            assert torch.equal(keep, whole[2]) and keep.numel() == sum(min(2, n) for n in sizes)


def test_top_regions_picks_the_k_best_of_each_image():
    obj = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.8, 0.2])
    index = torch.tensor([0, 0, 0, 1, 1, 1])
    assert top_regions(obj, index, 2, 2).tolist() == [1, 2, 3, 4]
    assert top_regions(obj, index, 2, 10).tolist() == [0, 1, 2, 3, 4, 5]


def test_student_region_features_match_manual_roi_pool_and_fc_layers():
    student = make_student().eval()
    gen = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, 32, 32, generator=gen, dtype=torch.float64)
    boxes = random_boxes(6, 32, gen)
    index = torch.tensor([0, 0, 0, 1, 1, 1])
    fmap = student.backbone(images)
    got = student.forward_regions(fmap, boxes, index, ("fc6", "fc7"))
    pooled = torch.stack([roi_pool(fmap[i:i + 1], [boxes[r:r + 1]], 2, 1 / 4)[0] for r, i in enumerate(index)])
    fc6 = torch.relu(student.fc6(pooled.flatten(1)))
    assert torch.allclose(got["fc6"], fc6) and torch.allclose(got["fc7"], torch.relu(student.fc7(fc6)))


def test_two_views_rescale_proposals_from_the_teacher_frame_and_flip_both():
    image = torch.zeros(3, 40, 60, dtype=torch.uint8)
    image[:, 5:15, 10:30] = 255  # a bright box at x 10..30, y 5..15
    target = {"proposals": torch.tensor([[10.0, 5.0, 30.0, 15.0], [0.0, 0.0, 60.0, 40.0]]),
              "proposal_scores": torch.ones(2), "labels": torch.zeros(K)}
    for flip in (0.0, 1.0):
        student, t = TeacherStudentViews((80, 120), 30, flip=flip)(image, target)
        assert t["flipped"] == bool(flip) and student.shape == (3, 30, 30) and t["teacher_image"].shape == (3, 80, 120)
        x1, x2 = (10.0, 30.0) if not flip else (30.0, 50.0)  # flipped: x -> 60 - x
        assert torch.allclose(t["proposals"][0], torch.tensor([x1 * 2, 10, x2 * 2, 30]))  # teacher frame (x2, y2)
        assert torch.allclose(t["student_proposals"][0], torch.tensor([x1 / 2, 15 / 4, x2 / 2, 45 / 4]))
        bright = t["teacher_image"][0] > 128  # the pixels moved with the boxes in the teacher view
        cols = bright.any(0).nonzero().squeeze(1)
        assert cols.min().item() == pytest.approx(x1 * 2, abs=1) and cols.max().item() == pytest.approx(x2 * 2 - 1, abs=1)


def test_distiller_keeps_the_teacher_frozen_and_grads_reach_the_student_and_scale():
    teacher, student = make_teacher(), make_student()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    model = StudentObjective(student, teacher, label_weight=1.0, soft_weight=1.0, feature_weight=1.0).double()
    model.train()
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    gen = torch.Generator().manual_seed(4)
    proposals = [random_boxes(5, 64, gen), random_boxes(4, 64, gen)]
    losses = model(images=torch.randn(2, 3, 32, 32, generator=gen, dtype=torch.float64),
                   labels=torch.tensor([[1.0, 0, 0, -1], [0, 1, 1, 0]], dtype=torch.float64),
                   teacher_images=torch.randn(2, 3, 64, 64, generator=gen, dtype=torch.float64),
                   proposals=proposals, proposal_scores=[torch.ones(5), torch.ones(4)],
                   student_proposals=[b / 2 for b in proposals])
    assert set(losses) == {"loss_label", "loss_soft", "loss_feature"}
    sum(losses.values()).backward()
    assert model.scale.grad is not None and model.scale.grad.abs().sum() > 0
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_distiller_top_k_uses_only_the_best_regions():
    teacher, student = make_teacher(), make_student()
    gen = torch.Generator().manual_seed(5)
    proposals = [random_boxes(6, 64, gen)]
    kw = dict(images=torch.randn(1, 3, 32, 32, generator=gen, dtype=torch.float64), labels=torch.zeros(1, K),
              teacher_images=torch.randn(1, 3, 64, 64, generator=gen, dtype=torch.float64), proposals=proposals,
              proposal_scores=None, student_proposals=[b / 2 for b in proposals])
    model = StudentObjective(student, teacher, 0, 0, 1, top_k=2).double().eval()
    got = model(**kw)["loss_feature"]
    with torch.no_grad():  # by hand: the teacher's objectness, its top 2 regions, their fc7 features
        idx = torch.zeros(6, dtype=torch.int64)
        t = teacher.region_layers(teacher.backbone(kw["teacher_images"]), proposals[0], torch.ones(6, dtype=torch.float64), idx)
        c, d = teacher.forward_streams(t["fc7"])
        keep = ((torch.softmax(c, 1) * torch.softmax(d, 0)).sum(1)).topk(2).indices.sort().values
        s = student.forward_regions(student.backbone(kw["images"]), proposals[0][keep] / 2, idx[keep])["fc7"]
        want = (t["fc7"][keep] - s).pow(2).sum() / 4
    assert got.item() == pytest.approx(want.item(), rel=1e-6)  # L_f is summed in float32


def test_a_feature_adapter_maps_the_students_width_to_the_teachers_and_is_trained_by_l_f_only():
    """A 12-wide student and a 16-wide teacher: refused without the adapter (where the teacher is prepared, and by
    L_f itself), and with it L_f is the loss of adapter(F_S) against F_T by hand; the adapter gets a gradient, is
    saved as an extra parameter, the teacher none."""
    teacher, student = make_teacher(16), make_student(12)
    with pytest.raises(ValueError, match=r"the student's region features are 12 wide \(model.hidden\), the "
                                         r"teacher's 16: .*set model.hidden: 16, or distill.feature_adapter: true"):
        check_feature_width(student.region_width, teacher, adapter=False)
    check_feature_width(student.region_width, teacher, adapter=True)
    gen = torch.Generator().manual_seed(6)
    proposals = [random_boxes(5, 64, gen), random_boxes(3, 64, gen)]
    kw = dict(images=torch.randn(2, 3, 32, 32, generator=gen, dtype=torch.float64), labels=torch.zeros(2, K),
              teacher_images=torch.randn(2, 3, 64, 64, generator=gen, dtype=torch.float64), proposals=proposals,
              proposal_scores=None, student_proposals=[b / 2 for b in proposals])
    with pytest.raises(ValueError, match=r"student region features \(8, 12\) and teacher's \(8, 16\) differ"):
        StudentObjective(student, teacher, 0, 0, 1).double()(**kw)
    StudentObjective(student, teacher, 1, 1, 0).double()(**kw)  # no L_f: the widths do not matter
    model = StudentObjective(student, teacher, 0, 0, 1, feature_norm="relative", feature_adapter=True).double()
    assert (model.adapter["fc7"].in_features, model.adapter["fc7"].out_features) == (12, 16)
    assert set(model.extra_parameters()) == {"scale", "adapter.fc7.weight", "adapter.fc7.bias"}
    got = model.train()(**kw)["loss_feature"]
    with torch.no_grad():  # by hand: every region's teacher fc7 against the adapted student fc7
        idx = torch.tensor([0] * 5 + [1] * 3)
        boxes = torch.cat(proposals)
        t = teacher.region_layers(teacher.backbone(kw["teacher_images"]), boxes, torch.ones(8, dtype=torch.float64),
                                  idx)["fc7"]
        s = model.adapter["fc7"](student.forward_regions(student.backbone(kw["images"]), boxes / 2, idx)["fc7"])
        want = (t - s).pow(2).sum() / t.pow(2).sum()
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    got.backward()
    assert model.adapter["fc7"].weight.grad.abs().sum() > 0 and student.fc7.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_zero_proposals_in_a_distillation_batch_is_a_clear_error():
    model = StudentObjective(make_student(), make_teacher(), 0, 0, 1).double()
    with pytest.raises(ValueError, match="image 0 of the batch has zero proposals"):
        model(images=torch.zeros(1, 3, 32, 32, dtype=torch.float64), labels=torch.zeros(1, K),
              teacher_images=torch.zeros(1, 3, 64, 64, dtype=torch.float64), proposals=[torch.zeros(0, 4)],
              student_proposals=[torch.zeros(0, 4)])


def test_student_region_features_run_under_cpu_bf16_autocast():
    student = make_student().float().eval()
    boxes, index = torch.tensor([[0.0, 0.0, 20.0, 20.0], [4.0, 4.0, 30.0, 31.0]]), torch.zeros(2, dtype=torch.int64)
    images = torch.randn(1, 3, 32, 32)
    want = student.forward_regions(student.backbone(images), boxes, index)["fc7"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = student.forward_regions(student.backbone(images), boxes, index)["fc7"]
    assert got.dtype == torch.bfloat16 and torch.allclose(got.float(), want, atol=0.1, rtol=0.05)
