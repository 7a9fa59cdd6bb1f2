"""Proposal methods on one image and the post-processing every cache entry goes through."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from mlkd.data.synthetic import render_image
from mlkd.proposals import clean_boxes, edge_boxes, gradient_edge_map, selective_search
from mlkd.proposals.generate import resolve_params
from mlkd.proposals.methods import rects_to_boxes


@pytest.fixture(scope="module")
def image():
    img, boxes, _ = render_image(np.random.default_rng([3, 0]), 10, 128)
    return img, boxes


def _in_bounds(boxes: np.ndarray, hw: tuple[int, int]) -> bool:
    h, w = hw
    return bool(((boxes[:, 0] >= 0) & (boxes[:, 1] >= 0) & (boxes[:, 2] <= w) & (boxes[:, 3] <= h)
                 & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all())


def test_rects_to_boxes_converts_xywh():
    assert rects_to_boxes(np.array([[3, 4, 10, 20]])).tolist() == [[3, 4, 13, 24]]
    assert rects_to_boxes(np.zeros((0, 4))).shape == (0, 4)


def test_selective_search_is_deterministic_and_finds_the_objects(image):
    img, gt = image
    boxes, scores = selective_search(img, mode="fast")
    again, _ = selective_search(img, mode="fast")
    selective_search(np.ascontiguousarray(img[::-1]), mode="fast")  # another image in between changes nothing
    third, _ = selective_search(img, mode="fast")
    assert np.array_equal(boxes, again) and np.array_equal(boxes, third)
    assert len(boxes) > 20 and _in_bounds(boxes, img.shape[:2]) and (scores == 1).all()
    best = box_iou(torch.from_numpy(gt), torch.from_numpy(boxes)).max(1).values
    assert (best >= 0.5).float().mean() >= 0.5, best  # the shapes are crisp: most are found


def test_edge_boxes_without_model_scores_sorted_and_boxes_valid(image):
    img, _ = image
    boxes, scores = edge_boxes(img, min_box_area=100)
    assert len(boxes) > 10 and _in_bounds(boxes, img.shape[:2])
    assert (np.diff(scores) <= 0).all() and (scores > 0).all()
    assert edge_boxes(np.zeros((64, 64, 3), np.uint8))[0].shape == (0, 4)  # a flat image has no edges


def test_gradient_edge_map_range_orientation_and_a_vertical_edge():
    img = np.zeros((32, 32, 3), np.uint8)
    img[:, 16:] = 200  # one vertical edge between columns 15 and 16
    edges, orient = gradient_edge_map(img, sigma=0)
    assert edges.dtype == np.float32 and edges.min() >= 0 and edges.max() == pytest.approx(1.0)
    assert orient.min() >= 0 and orient.max() < np.pi
    cols = np.flatnonzero(edges[16] > 0.5)
    assert set(cols) <= {15, 16} and len(cols) >= 1  # thinned to the edge, 1 px wide
    assert orient[16, cols[0]] == pytest.approx(0.0, abs=1e-6)  # gradient along x: normal angle 0


def test_methods_reject_bad_images():
    with pytest.raises(ValueError, match=r"RGB uint8 image of shape \(H, W, 3\), got float32"):
        selective_search(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="unknown selective search mode 'slow'"):
        selective_search(np.zeros((8, 8, 3), np.uint8), mode="slow")


def naive_clean(boxes, scores, hw, min_size, max_proposals):
    """Reference for clean_boxes without NMS: a plain loop."""
    h, w = hw
    kept = []
    for b, s in zip(boxes.tolist(), scores.tolist()):
        x1, y1, x2, y2 = min(max(b[0], 0), w), min(max(b[1], 0), h), min(max(b[2], 0), w), min(max(b[3], 0), h)
        if x2 - x1 >= min_size and y2 - y1 >= min_size and x2 > x1 and y2 > y1:
            kept.append(((x1, y1, x2, y2), s))
    kept = sorted(enumerate(kept), key=lambda t: (-t[1][1], t[0]))  # by score, ties in input order
    out, seen = [], set()
    for _, (box, s) in kept:
        key = tuple(np.float32(box))
        if key not in seen:
            seen.add(key)
            out.append((box, s))
    out = out[:max_proposals]
    return np.array([o[0] for o in out], np.float32).reshape(-1, 4), np.array([o[1] for o in out], np.float32)


@pytest.mark.parametrize("seed", range(4))
def test_clean_boxes_matches_naive_loop(seed):
    rng = np.random.default_rng(seed)
    xy = rng.integers(-10, 60, size=(300, 2))
    wh = rng.integers(-2, 40, size=(300, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    boxes[150:200] = boxes[:50]  # exact duplicates
    scores = rng.integers(0, 20, size=300).astype(np.float32) / 20  # many ties
    got = clean_boxes(boxes, scores, (48, 64), min_size=5, max_proposals=80)
    want = naive_clean(boxes, scores, (48, 64), 5, 80)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_clean_boxes_nms_drops_near_duplicates_keeps_ranking():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 11], [20, 20, 30, 30], [0, 0, 10, 10]], np.float32)
    scores = np.array([0.5, 0.9, 0.7, 0.1], np.float32)
    b, s = clean_boxes(boxes, scores, (100, 100), nms_iou=0.8)
    assert b.tolist() == [[0, 0, 10, 11], [20, 20, 30, 30]] and s.tolist() == pytest.approx([0.9, 0.7])


def test_clean_boxes_empty_and_bad_input():
    b, s = clean_boxes(np.zeros((0, 4)), np.zeros(0), (10, 10), min_size=2, max_proposals=5)
    assert b.shape == (0, 4) and s.shape == (0,)
    with pytest.raises(ValueError, match=r"boxes must have shape \(R, 4\), got \(3,\)"):
        clean_boxes(np.zeros(3), np.zeros(1), (10, 10))
    with pytest.raises(ValueError, match="finite"):
        clean_boxes(np.array([[0, 0, np.nan, 1]]), np.ones(1), (10, 10))


def test_resolve_params_fills_defaults_and_rejects_unknown_or_bad_values(tmp_path):
    p = resolve_params("selective_search", {"mode": "quality"})
    assert p["mode"] == "quality" and p["max_proposals"] == 500 and p["min_size"] == 8
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['colour'\] for method 'edge_boxes'"):
        resolve_params("edge_boxes", {"colour": 1})
    with pytest.raises(ValueError, match="unknown proposal method 'sliding'"):
        resolve_params("sliding")
    with pytest.raises(ValueError, match="max_proposals must be a positive integer, got 0"):
        resolve_params("edge_boxes", {"max_proposals": 0})
    with pytest.raises(FileNotFoundError, match="structured edge model not found"):
        resolve_params("edge_boxes", {"model_path": str(tmp_path / "model.yml.gz")})
