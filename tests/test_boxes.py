"""The one box validator (mlkd.data.boxes), and proposal generation going through it."""

from __future__ import annotations

import numpy as np
import pytest

from mlkd.data.boxes import BOX_POLICIES, DEFECTS, check_boxes, classify
from mlkd.errors import BadInput
from mlkd.proposals import clean_boxes

NAN, INF = float("nan"), float("inf")
# One box of each kind in a 10 (high) x 20 (wide) image.
BOXES = np.array([
    [1, 1, 5, 5],        # 0 valid
    [NAN, 1, 5, 5],      # 1 non-finite
    [5, 1, 1, 5],        # 2 inverted
    [3, 3, 3, 8],        # 3 zero-area
    [-2, 1, 25, 12],     # 4 out of the image: clipped to [0, 1, 20, 10]
    [21, 1, 30, 5],      # 5 entirely right of the image: nothing left after clipping
    [0, 0, 20, 10],      # 6 valid, touches every border
    [1, INF, 4, 4],      # 7 non-finite
], np.float32)
HW = (10, 20)


def test_classify_gives_each_box_its_first_defect():
    assert classify(BOXES, HW).tolist() == [0, 1, 2, 3, 4, 4, 0, 1]
    assert classify(BOXES, None).tolist() == [0, 1, 2, 3, 0, 0, 0, 1]  # without the size, out-of-image is unknown
    assert classify(np.array([[-5, 0, -5, 3]]), HW).tolist() == [3]  # zero-area wins over out-of-image


def test_refuse_names_where_the_counts_and_the_first_bad_boxes():
    with pytest.raises(BadInput) as e:
        check_boxes(BOXES, HW, "refuse", "f.mat: image 'x'", hint="pass --bad-boxes clip")
    text = str(e.value)
    assert text.startswith("f.mat: image 'x': 6 of 8 boxes are defective: 2 non-finite (NaN or inf), 1 inverted")
    assert "1 zero-area (x2 == x1 or y2 == y1), 2 out-of-image;" in text
    assert "first: box 1: x1y1x2y2 [nan, 1, 5, 5] non-finite; box 2: x1y1x2y2 [5, 1, 1, 5] inverted" in text
    assert "... and 1 more" in text and text.endswith("pass --bad-boxes clip") and "\n" not in text
    valid, report = check_boxes(BOXES[[0, 6]], HW, "refuse", "x")
    assert np.array_equal(valid, BOXES[[0, 6]]) and report.keep.tolist() == [0, 1] and not report.changed


def test_clip_clips_out_of_image_drops_zero_area_and_refuses_non_finite_and_inverted():
    with pytest.raises(BadInput, match=r"x: 3 of 8 boxes are defective \(policy 'clip' refuses non-finite and "
                                       r"inverted boxes: only 'drop' removes them\): 2 non-finite .*1 inverted"):
        check_boxes(BOXES, HW, "clip", "x")
    ok = [0, 3, 4, 5, 6]
    kept, report = check_boxes(BOXES[ok], HW, "clip", "x")
    assert kept.dtype == np.float32 and kept.tolist() == [[1, 1, 5, 5], [0, 1, 20, 10], [0, 0, 20, 10]]
    assert report.keep.tolist() == [0, 2, 4] and report.clipped == 1
    assert report.found == {"non_finite": 0, "inverted": 0, "zero_area": 1, "out_of_image": 2}
    assert report.dropped == {"non_finite": 0, "inverted": 0, "zero_area": 1, "out_of_image": 1}
    assert report.summary() == ("5 boxes checked: 1 out-of-image clipped to the image, 1 zero-area dropped, "
                                "1 out-of-image dropped (entirely outside the image)")
    assert report.examples[1] == "x: box 2: x1y1x2y2 [-2, 1, 25, 12] out-of-image -> clipped to [0, 1, 20, 10]"


def test_drop_drops_every_defective_box_and_counts_them():
    kept, report = check_boxes(BOXES, HW, "drop", "x")
    assert kept.tolist() == [[1, 1, 5, 5], [0, 0, 20, 10]] and report.keep.tolist() == [0, 6]
    assert report.dropped == {"non_finite": 2, "inverted": 1, "zero_area": 1, "out_of_image": 2}
    assert report.num_dropped == 6 and report.clipped == 0 and report.total == 8


def test_per_box_sizes_with_unknown_rows_and_summed_reports():
    hw = np.array([HW, HW, [np.nan, np.nan]], np.float64)  # the third box's image size is unknown
    boxes = np.array([[0, 0, 25, 5], [1, 1, 2, 2], [0, 0, 500, 500]], np.float32)
    kept, report = check_boxes(boxes, hw, "clip", "x")
    assert kept.tolist() == [[0, 0, 20, 5], [1, 1, 2, 2], [0, 0, 500, 500]] and report.unsized == 1
    total = check_boxes(BOXES, HW, "drop", "x")[1]
    total.add(report)
    assert total.total == 11 and total.clipped == 1 and total.dropped["out_of_image"] == 2
    assert check_boxes(np.zeros((0, 4)), HW, "refuse", "x")[0].shape == (0, 4)
    with pytest.raises(BadInput, match=r"f:3: boxes must be an \(R, 4\) array .*got shape \(2, 6\)"):
        check_boxes(np.zeros((2, 6)), HW, "refuse", "f:3")
    with pytest.raises(BadInput, match=r"box policy must be one of \['refuse', 'clip', 'drop'\], got 'fix'"):
        check_boxes(BOXES, HW, "fix", "x")
    assert BOX_POLICIES == ("refuse", "clip", "drop") and len(DEFECTS) == 4


def test_clean_boxes_is_the_clip_policy_plus_the_min_size():
    rng = np.random.default_rng(0)
    xy = rng.uniform(-10, 60, (200, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0, 30, (200, 2))], 1).astype(np.float32)
    clipped, report = check_boxes(boxes, (48, 64), "clip", "x")
    cleaned, _ = clean_boxes(boxes, np.ones(200), (48, 64), min_size=0, max_proposals=None)
    assert np.array_equal(np.unique(clipped, axis=0), np.unique(cleaned, axis=0)) and report.clipped > 0
