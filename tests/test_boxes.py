"""The one box validator (mlkd.data.boxes) and where boxes enter mlkd through it: proposal import (.mat and
datalist, library and CLI), proposal generation, and proposal caches read back by a dataset."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import scipy.io

from mlkd.cli import main
from mlkd.data import CustomDataset
from mlkd.data.boxes import BOX_POLICIES, DEFECTS, check_boxes, classify
from mlkd.errors import BadInput
from mlkd.proposals import ProposalCache, clean_boxes, import_datalist, import_mat, make_meta
from mlkd.proposals.attach import open_split

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


# -- where boxes enter: import, cache read -------------------------------------------------------------------
@pytest.fixture
def dataset(tmp_path):
    """Two images, a.png 20 wide x 10 high and b.png 30 x 30, in a custom dataset."""
    for name, (h, w) in {"a.png": (10, 20), "b.png": (30, 30)}.items():
        assert cv2.imwrite(str(tmp_path / name), np.zeros((h, w, 3), np.uint8))
    rows = [json.dumps({"path": name, "labels": ["x"]}) + "\n" for name in ("a.png", "b.png")]
    (tmp_path / "d.jsonl").write_text("".join(rows))
    return CustomDataset(tmp_path / "d.jsonl")


def _mat(path, boxes_a):
    """A WSDDN .mat for images a.png and b.png; boxes_a are mlkd x1y1x2y2, written as 1-based [y1 x1 y2 x2]."""
    cells = np.empty((1, 2), dtype=object)
    for k, b in enumerate([np.asarray(boxes_a, np.float64), np.array([[1, 1, 5, 5]], np.float64)]):
        cells[0, k] = np.stack([b[:, 1] + 1, b[:, 0] + 1, b[:, 3], b[:, 2]], axis=1)
    images = np.empty((1, 2), dtype=object)
    images[0, :] = ["a.png", "b.png"]
    scipy.io.savemat(path, {"images": images, "boxes": cells})
    return path


def test_mat_import_refuses_nan_and_inverted_boxes_by_default(dataset, tmp_path):
    mat = _mat(tmp_path / "p.mat", [[0, 0, 4, 4], [NAN, 0, 3, 3], [6, 0, 2, 3]])
    with pytest.raises(BadInput) as e:
        import_mat(mat, dataset, tmp_path / "c", progress=False)
    text = str(e.value)
    assert f"{mat}: boxes{{1}} of image 'a.png' (20 x 10 px image" in text and "1 non-finite" in text
    assert "1 inverted" in text and "box 2: x1y1x2y2 [nan, 0, 3, 3]" in text and "--bad-boxes clip" in text
    assert not (tmp_path / "c").exists()  # refused before anything was written
    with pytest.raises(BadInput, match="policy 'clip' refuses non-finite and inverted"):
        import_mat(mat, dataset, tmp_path / "c", progress=False, bad_boxes="clip")
    report = import_mat(mat, dataset, tmp_path / "c", progress=False, bad_boxes="drop")
    assert report.boxes.dropped["non_finite"] == 1 and report.boxes.dropped["inverted"] == 1
    assert ProposalCache.open(tmp_path / "c").get("a.png")[0].tolist() == [[0, 0, 4, 4]]


def test_mat_import_clips_to_the_size_read_from_the_image_header(dataset, tmp_path):
    mat = _mat(tmp_path / "p.mat", [[0, 0, 4, 4], [10, 2, 25, 12], [20, 0, 24, 5], [3, 3, 3, 6]])
    with pytest.raises(BadInput, match=r"3 of 4 boxes are defective: 1 zero-area .*, 2 out-of-image"):
        import_mat(mat, dataset, tmp_path / "c0", progress=False)
    report = import_mat(mat, dataset, tmp_path / "c", progress=False, bad_boxes="clip")
    assert report.boxes.clipped == 1 and report.boxes.dropped == {"non_finite": 0, "inverted": 0, "zero_area": 1,
                                                                  "out_of_image": 1}
    cache = ProposalCache.open(tmp_path / "c")
    boxes, scores = cache.get("a.png")
    assert boxes.tolist() == [[0, 0, 4, 4], [10, 2, 20, 10]] and scores.tolist() == [1, 1]
    assert cache.get("b.png")[0].tolist() == [[1, 1, 5, 5]]


def test_datalist_import_drops_bad_boxes_with_their_scores(dataset, tmp_path):
    root = dataset.root
    (tmp_path / "l.txt").write_text(f"{root / 'a.png'} 1 0 0 4 4 0.9 5 0 1 3 0.8 2 2 30 6 0.7\n"
                                    f"{root / 'b.png'} 1 1 1 5 5 0.5\n")
    with pytest.raises(BadInput, match=r"l\.txt:1 \(image 'a\.png'\) \(20 x 10 px image.*1 inverted.*1 out-of-image"):
        import_datalist(tmp_path / "l.txt", dataset, tmp_path / "c0", progress=False)
    report = import_datalist(tmp_path / "l.txt", dataset, tmp_path / "c", progress=False, bad_boxes="drop")
    boxes, scores = ProposalCache.open(tmp_path / "c").get("a.png")
    assert boxes.tolist() == [[0, 0, 4, 4]] and scores.tolist() == pytest.approx([0.9])
    assert report.boxes.num_dropped == 2


def test_cli_import_option_and_printed_counts(dataset, tmp_path, capsys):
    mat = _mat(tmp_path / "p.mat", [[0, 0, 4, 4], [-3, 2, 25, 12]])
    args = ["proposals", "import", "--format", "mat", "--file", str(mat), "--dataset", str(dataset.annotations),
            "--quiet", "--out"]
    assert main([*args, str(tmp_path / "c0")]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "1 out-of-image" in err and "--bad-boxes clip" in err and err.count("\n") == 1
    assert main([*args, str(tmp_path / "c"), "--bad-boxes", "clip"]) == 0
    out = capsys.readouterr().out
    assert "--bad-boxes clip: 3 boxes checked: 1 out-of-image clipped to the image" in out
    assert "clipped to [0, 2, 20, 10]" in out
    with pytest.raises(SystemExit):
        main([*args, str(tmp_path / "c2"), "--bad-boxes", "fix"])
    assert "invalid choice: 'fix'" in capsys.readouterr().err


@pytest.mark.parametrize("bad, message", [([[0, 0, NAN, 4]], "1 non-finite"), ([[0, 0, 25, 4]], "1 out-of-image"),
                                          ([[5, 0, 2, 4]], "1 inverted")])
def test_a_damaged_cache_is_refused_when_an_image_is_loaded(dataset, tmp_path, bad, message):
    with ProposalCache.create(tmp_path / "c", make_meta("test", {}, dataset.identity.to_dict())) as cache:
        cache.put("a.png", np.array([[0, 0, 4, 4], *bad], np.float32), np.ones(2, np.float32))
        cache.put("b.png", np.array([[0, 0, 25, 25]], np.float32), np.ones(1, np.float32))
    ds = open_split(str(dataset.annotations), proposals=str(tmp_path / "c"))
    assert ds[1][1]["proposals"].tolist() == [[0, 0, 25, 25]]  # inside b.png (30 x 30)
    with pytest.raises(BadInput, match=rf"proposals of image 'a.png' in {tmp_path / 'c'}: 1 of 2 boxes are "
                                       rf"defective: {message}.*rebuild it with `mlkd proposals`"):
        ds[0]
