"""Transforms move boxes/proposals with the pixels; MultiScaleCollate draws one deterministic scale per batch."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from mlkd.data.base import collate
from mlkd.data.transforms import (Compose, MultiScaleCollate, RandomHorizontalFlip, ResizeShorter, ResizeWSDDN,
                                  Warp, rescale_boxes, shorter_side_size, wsddn_reader_size)


def marked_image(h: int = 40, w: int = 80, box: tuple[int, int, int, int] = (10, 4, 30, 20)) -> torch.Tensor:
    """Black image with a white rectangle covering exactly the pixel-edge box (x1, y1, x2, y2)."""
    img = torch.zeros(3, h, w, dtype=torch.uint8)
    x1, y1, x2, y2 = box
    img[:, y1:y2, x1:x2] = 255
    return img


def white_fraction(img: torch.Tensor, box: torch.Tensor) -> float:
    """Mean brightness (0..1) of ``img`` inside the integer box."""
    x1, y1, x2, y2 = (int(round(v)) for v in box.tolist())
    return img[:, y1:y2, x1:x2].float().mean().item() / 255


def target_with(boxes, proposals=None) -> dict:
    t = {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor([1.0, 0.0])}
    if proposals is not None:
        t["proposals"] = torch.tensor(proposals, dtype=torch.float32).reshape(-1, 4)
    return t


def test_rescale_boxes_matches_hand_computation_and_naive_loop():
    boxes = torch.tensor([[0.0, 0.0, 672.0, 672.0], [30.0, 60.0, 90.0, 300.0]])
    out = rescale_boxes(boxes, (672, 672), (224, 224))
    assert torch.allclose(out, torch.tensor([[0.0, 0.0, 224.0, 224.0], [10.0, 20.0, 30.0, 100.0]]))
    boxes = torch.rand(7, 4) * 100
    out = rescale_boxes(boxes, (50, 100), (80, 30))
    for b, o in zip(boxes, out):  # x scales by W ratio, y by H ratio
        assert torch.allclose(o, torch.stack([b[0] * 0.3, b[1] * 1.6, b[2] * 0.3, b[3] * 1.6]))


def test_rescale_boxes_rejects_bad_input():
    with pytest.raises(ValueError, match=r"Tensor\[R, 4\].*\(3,\)"):
        rescale_boxes(torch.zeros(3), (10, 10), (5, 5))
    with pytest.raises(ValueError, match="to_hw"):
        rescale_boxes(torch.zeros(1, 4), (10, 10), (0, 5))


def test_warp_moves_boxes_and_pixels_together():
    img, target = marked_image(), target_with([[10, 4, 30, 20]], proposals=[[0, 0, 80, 40], [40, 20, 60, 30]])
    out, t = Warp(20)(img, target)
    assert out.shape == (3, 20, 20) and out.dtype == torch.uint8
    assert torch.allclose(t["boxes"], torch.tensor([[2.5, 2.0, 7.5, 10.0]]))  # x * 20/80, y * 20/40
    assert torch.allclose(t["proposals"], torch.tensor([[0.0, 0.0, 20.0, 20.0], [10.0, 10.0, 15.0, 15.0]]))
    assert t["size"].tolist() == [20, 20]
    big, tb = Warp((80, 160))(img, target)  # (h, w) form, x2 on both axes
    assert big.shape == (3, 80, 160) and tb["boxes"].tolist() == [[20.0, 8.0, 60.0, 40.0]]
    assert white_fraction(big, tb["boxes"][0]) > 0.95
    assert big.float().mean().item() / 255 == pytest.approx(40 * 32 / (80 * 160), abs=0.01)


def test_warp_keeps_input_target_and_handles_missing_or_empty_boxes():
    target = target_with([[10, 4, 30, 20]], proposals=[])
    before = target["boxes"].clone()
    _, t = Warp(10)(marked_image(), target)
    assert torch.equal(target["boxes"], before) and "size" not in target
    assert t["proposals"].shape == (0, 4)
    _, t2 = Warp(10)(marked_image(), {"labels": torch.ones(2)})
    assert "boxes" not in t2 and t2["size"].tolist() == [10, 10]


@pytest.mark.parametrize("size", [0, -3, (10,), (10, 0), 2.5])
def test_warp_rejects_bad_size(size):
    with pytest.raises(ValueError, match="Warp size"):
        Warp(size)


def test_transforms_reject_bad_image_shape():
    with pytest.raises(ValueError, match=r"Tensor\[3, H, W\], got \(40, 80\)"):
        Warp(10)(torch.zeros(40, 80, dtype=torch.uint8), {})
    with pytest.raises(ValueError, match=r"got \(1, 4, 4\)"):
        RandomHorizontalFlip(1.0)(torch.zeros(1, 4, 4, dtype=torch.uint8), {})


def test_resize_shorter_preserves_aspect_and_caps_longer_side():
    assert shorter_side_size((40, 80), 20) == (20, 40)
    assert shorter_side_size((40, 80), 20, max_size=30) == (15, 30)  # 80 * 0.5 = 40 > 30 -> scale 30/80
    assert shorter_side_size((480, 640), 600, max_size=1000) == (600, 800)
    img, target = marked_image(), target_with([[10, 4, 30, 20]])
    out, t = ResizeShorter(20, 30)(img, target)
    assert out.shape == (3, 15, 30) and t["size"].tolist() == [15, 30]
    assert torch.allclose(t["boxes"], torch.tensor([[10 * 30 / 80, 4 * 15 / 40, 30 * 30 / 80, 20 * 15 / 40]]))
    with pytest.raises(ValueError, match="max_size"):
        ResizeShorter(600, 500)


def test_wsddn_reader_sizes_hand_computed():
    # (H, W) -> (H', W'), worked out from cnn_wsddn_get_batch.m and vl_imreadjpeg's scalar 'Resize':
    # landscape 375 x 500 at 480: height floor(480/500 * 375) = 360 is made the shorter side -> 360 x 480
    assert wsddn_reader_size((375, 500), 480) == (360, 480)
    # portrait 500 x 375 at 480: height floor(480/500 * 500) = 480 is made the SHORTER side (the width)
    assert wsddn_reader_size((500, 375), 480) == (640, 480)
    assert wsddn_reader_size((500, 500), 688) == (688, 688)
    # 576/500 * 375 is 431.99999999999994 in doubles: the floor gives 431, then 500 * 431/375 = 574.67 -> 575
    assert wsddn_reader_size((375, 500), 576) == (431, 575)
    # 333 x 500 at 480: floor(319.68) = 319, 500 * 319/333 = 478.98 -> 479
    assert wsddn_reader_size((333, 500), 480) == (319, 479)


@pytest.mark.parametrize("scale", [480, 576, 688, 864, 1200])
def test_wsddn_reader_gives_the_width_the_scale(scale):
    for h in range(100, 520, 23):
        for w in range(100, 520, 29):
            nh, nw = wsddn_reader_size((h, w), scale)
            assert abs(nh / nw - h / w) <= 1.5 / min(nh, nw)  # aspect kept up to the rounding of a side
            if w >= h:  # landscape: the longer side is the scale, less what the floor of the height costs
                assert scale - w / h - 1 <= nw <= scale
            else:  # portrait: the shorter side is the scale (or one less), the longer one bigger
                assert nw in (scale - 1, scale) and nh > scale - 1
            # resize: shorter would give landscape images their shorter side = scale, w / h times bigger
            assert shorter_side_size((h, w), scale)[1] >= nw - 1


def test_resize_wsddn_moves_boxes_with_the_pixels_and_caps():
    img, target = marked_image(40, 80, (10, 4, 30, 20)), target_with([[10, 4, 30, 20]], proposals=[[0, 0, 80, 40]])
    out, t = ResizeWSDDN(40)(img, target)  # landscape 40 x 80: width 40, height 20
    assert out.shape == (3, 20, 40) and t["size"].tolist() == [20, 40]
    assert torch.allclose(t["boxes"], torch.tensor([[5.0, 2.0, 15.0, 10.0]]))
    assert torch.allclose(t["proposals"], torch.tensor([[0.0, 0.0, 40.0, 20.0]]))
    inner = t["boxes"][0] + torch.tensor([1.0, 1.0, -1.0, -1.0])  # away from the antialiased edges
    assert white_fraction(out, inner) == 1.0
    img, target = marked_image(80, 40, (4, 10, 20, 30)), target_with([[4, 10, 20, 30]])
    out, t = ResizeWSDDN(20)(img, target)  # portrait 80 x 40: width 20 (the shorter side), height 40
    assert out.shape == (3, 40, 20) and torch.allclose(t["boxes"], torch.tensor([[2.0, 5.0, 10.0, 15.0]]))
    out, t = ResizeWSDDN(20, max_size=30)(img, target)  # the optional cap: longer side 30
    assert out.shape == (3, 30, 15)
    with pytest.raises(ValueError, match="max_size"):
        ResizeWSDDN(600, 500)
    with pytest.raises(ValueError, match="size must be a positive int, got 0"):
        ResizeWSDDN(0)


def test_flip_of_a_known_box_and_its_pixels():
    img, target = marked_image(), target_with([[10, 4, 30, 20]], proposals=[[0, 0, 5, 40]])
    out, t = RandomHorizontalFlip(p=1.0)(img, target)
    assert t["boxes"].tolist() == [[50.0, 4.0, 70.0, 20.0]]  # x -> 80 - x
    assert t["proposals"].tolist() == [[75.0, 0.0, 80.0, 40.0]]
    assert torch.equal(out, img.flip(-1))
    assert white_fraction(out, t["boxes"][0]) == 1.0 and t["size"].tolist() == [40, 80]


def test_flip_twice_is_identity_and_p0_never_flips():
    img = torch.randint(0, 256, (3, 9, 13), dtype=torch.uint8)
    target = target_with([[0.5, 1, 12.5, 8], [3, 3, 4, 4]], proposals=[[1, 2, 3, 4]])
    flip = RandomHorizontalFlip(p=1.0)
    back, t = flip(*flip(img, target))
    assert torch.equal(back, img)
    assert torch.equal(t["boxes"], target["boxes"]) and torch.equal(t["proposals"], target["proposals"])
    assert flip(img, target)[1]["flipped"] is True and t["flipped"] is False  # recorded; two flips cancel
    same, t0 = RandomHorizontalFlip(p=0.0)(img, target)
    assert torch.equal(same, img) and torch.equal(t0["boxes"], target["boxes"]) and t0["flipped"] is False


def test_flip_with_generator_is_reproducible_and_random():
    img = torch.arange(6, dtype=torch.uint8).reshape(1, 1, 6).expand(3, 2, 6).contiguous()

    def decisions(seed: int) -> list[bool]:
        flip = RandomHorizontalFlip(0.5, generator=torch.Generator().manual_seed(seed))
        return [bool(flip(img, {})[0][0, 0, 0] == 5) for _ in range(40)]

    assert decisions(3) == decisions(3)
    assert 5 < sum(decisions(3)) < 35
    with pytest.raises(ValueError, match="p must be in"):
        RandomHorizontalFlip(1.5)


def test_compose_applies_in_order():
    t = Compose([Warp((20, 40)), RandomHorizontalFlip(1.0)])
    out, tgt = t(marked_image(), target_with([[10, 4, 30, 20]]))
    assert out.shape == (3, 20, 40)
    assert tgt["boxes"].tolist() == [[40 - 15.0, 2.0, 40 - 5.0, 10.0]]  # halve, then x -> 40 - x


def batch_of_mixed_sizes(n: int = 3) -> list:
    return [(marked_image(40 + 8 * i, 80 - 8 * i, (8, 4, 24, 20)), target_with([[8, 4, 24, 20]])) for i in range(n)]


def test_multiscale_collate_one_scale_per_batch_from_the_set():
    scales = (480 // 8, 576 // 8, 672 // 8, 736 // 8, 832 // 8)  # the release's set, shrunk to stay fast
    collate_fn = MultiScaleCollate(scales, seed=0)
    seen = set()
    for _ in range(12):
        batch = batch_of_mixed_sizes()
        images, targets = collate_fn(batch)
        s = images.shape[-1]
        assert images.shape == (3, 3, s, s) and s in scales
        seen.add(s)
        for (img, tgt), out_t in zip(batch, targets):
            h, w = img.shape[1:]
            assert out_t["size"].tolist() == [s, s]
            expected = torch.tensor([[8 * s / w, 4 * s / h, 24 * s / w, 20 * s / h]])
            assert torch.allclose(out_t["boxes"], expected)
    assert len(seen) >= 3  # it really varies across batches


def test_multiscale_collate_is_deterministic_given_seed_and_counter():
    def sequence(seed: int, epoch: int = 0) -> list[int]:
        c = MultiScaleCollate((16, 24, 32, 40, 48), seed=seed)
        c.set_epoch(epoch)
        return [c(batch_of_mixed_sizes(1))[0].shape[-1] for _ in range(15)]

    assert sequence(0) == sequence(0)
    assert sequence(0) != sequence(1)
    assert sequence(0, epoch=1) != sequence(0, epoch=0)
    c = MultiScaleCollate((16, 24, 32, 40, 48), seed=0)
    assert [c.scale_for_call(i) for i in range(15)] == sequence(0)


def test_multiscale_collate_shorter_mode_and_validation():
    c = MultiScaleCollate((20,), resize="shorter", max_size=30)
    images, targets = c(batch_of_mixed_sizes(2))  # 40x80 -> 15x30, 48x72 -> 20x30: not stackable -> list
    assert isinstance(images, list) and [tuple(i.shape[1:]) for i in images] == [(15, 30), (20, 30)]
    with pytest.raises(ValueError, match=r"unknown resize mode 'crop'.*\['shorter', 'warp', 'wsddn'\]"):
        MultiScaleCollate((20,), resize="crop")
    with pytest.raises(ValueError, match="scales"):
        MultiScaleCollate(())


def test_multiscale_collate_wsddn_mode():
    c = MultiScaleCollate((24,), resize="wsddn")
    batch = batch_of_mixed_sizes(3)  # 40 x 80, 48 x 72, 56 x 64: all landscape
    images, targets = c(batch)
    want = [wsddn_reader_size(tuple(img.shape[1:]), 24) for img, _ in batch]
    assert [tuple(i.shape[1:]) for i in images] == want and all(hw[1] == 24 for hw in want)
    for (img, _), t, (h, w) in zip(batch, targets, want):
        scale = torch.tensor([w / img.shape[2], h / img.shape[1]] * 2)
        assert torch.allclose(t["boxes"], torch.tensor([[8.0, 4.0, 24.0, 20.0]]) * scale)


def test_multiscale_collate_in_a_dataloader():
    data = batch_of_mixed_sizes(4)
    loader = DataLoader(data, batch_size=2, collate_fn=MultiScaleCollate((16, 32), seed=5))
    shapes = [images.shape for images, _ in loader]
    assert len(shapes) == 2 and all(s[:2] == (2, 3) and s[2] == s[3] in (16, 32) for s in shapes)
    plain = DataLoader(data, batch_size=2, collate_fn=collate)
    assert isinstance(next(iter(plain))[0], list)  # different sizes, no warp: a list
