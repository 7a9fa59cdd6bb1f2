"""proposal_recall against a hand-made case."""

import numpy as np
import pytest

from mlkd.data.base import ImageRecord, MultiLabelDataset
from mlkd.proposals.recall import proposal_recall


class DictCache:
    def __init__(self, d):
        self.d = d

    def get(self, image_id):
        return self.d[image_id]


def _ds(boxes_per_image):
    recs = [ImageRecord(f"im{i}", f"/nonexistent/{i}.png", np.array([1, 0], np.int8),
                        np.array(b, np.float32).reshape(-1, 4), np.zeros(len(b), np.int64))
            for i, b in enumerate(boxes_per_image)]
    return MultiLabelDataset("t", "train", ["a", "b"], recs)


def test_recall_counts_covered_boxes_and_budgets():
    ds = _ds([[[0, 0, 10, 10], [20, 20, 30, 30]], [[0, 0, 4, 4]]])
    cache = DictCache({
        # image 0: the first proposal misses both GTs, the second hits the first GT exactly
        "im0": (np.array([[50, 50, 60, 60], [0, 0, 10, 10]], np.float32), np.array([0.9, 0.8], np.float32)),
        "im1": (np.zeros((0, 4), np.float32), np.zeros(0, np.float32)),  # zero proposals is legal
    })
    out = proposal_recall(ds, cache, ious=(0.5,), top_n=(None, 1))
    assert out["recall"]["all"]["0.5"] == pytest.approx(1 / 3)
    assert out["recall"]["top1"]["0.5"] == 0.0
    assert out["images_without_proposals"] == 1
    assert out["mean_proposals"] == 1.0 and out["num_gt"] == 3


def test_recall_threshold_is_inclusive_and_partial_overlap():
    ds = _ds([[[0, 0, 10, 10]]])
    # IoU of [0,0,10,5] with [0,0,10,10] is exactly 0.5
    cache = DictCache({"im0": (np.array([[0, 0, 10, 5]], np.float32), np.ones(1, np.float32))})
    out = proposal_recall(ds, cache, ious=(0.5, 0.7))
    assert out["recall"]["all"] == {"0.5": 1.0, "0.7": 0.0}


def test_recall_needs_boxes():
    recs = [ImageRecord("x", "/nonexistent.png", np.array([1], np.int8))]
    with pytest.raises(ValueError, match="has no boxes"):
        proposal_recall(MultiLabelDataset("t", "s", ["a"], recs), DictCache({}))
