"""The Python API on hostile arguments: proposals that are not finite, inverted, misshapen or outside the image,
proposal scores that do not match them, and numbers of the wrong type or range. Each is one BadInput naming the
argument, the value and what was expected (the rules of mlkd.utils.checks, which the command line shares)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mlkd
from mlkd.errors import BadInput
from mlkd.models.build import build_student, build_teacher
from mlkd.models.configs import StudentModelConfig, TeacherModelConfig
from mlkd.utils.checkpoint import make_checkpoint, save_checkpoint
from mlkd.utils.config import to_dict

CLASSES = ["a", "b", "c"]
STUDENT = StudentModelConfig(backbone="tiny", tiny_channels=(4, 8), input_convention="torchvision", hidden=8,
                             roi_size=2, dropout=0.0, image_size=32)
TEACHER = TeacherModelConfig(backbone="tiny", tiny_channels=(4, 8), input_convention="torchvision", hidden=8,
                             roi_size=2, dropout=0.0)
H, W = 20, 30  # the test image: boxes beyond x = 30 or y = 20 are outside it
IMAGE = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
BOXES = np.array([[0, 0, 10, 10], [5, 5, 20, 15], [10, 2, 30, 20], [2, 8, 12, 18]], np.float32)


def _teacher(tmp_path, max_proposals: int | None = None) -> "mlkd.Detector":
    torch.manual_seed(0)
    model = build_teacher(TEACHER, len(CLASSES))
    path = save_checkpoint(tmp_path / "teacher.pt", make_checkpoint(
        "teacher", model.state_dict(), input_convention="torchvision", classes=CLASSES, model_config=to_dict(TEACHER),
        image_size=32, max_proposals=max_proposals))
    return mlkd.load(path)


@pytest.fixture()
def det(tmp_path):
    return _teacher(tmp_path)


@pytest.fixture(scope="module")
def clf(tmp_path_factory):
    torch.manual_seed(0)
    model = build_student(STUDENT, len(CLASSES))
    path = save_checkpoint(tmp_path_factory.mktemp("student") / "s.pt", make_checkpoint(
        "student", model.state_dict(), input_convention="torchvision", classes=CLASSES, model_config=to_dict(STUDENT),
        image_size=32))
    return mlkd.load(path)


# -- proposals: (R, 4) exactly, finite, not inverted; clipped to the image -------------------------------------
@pytest.mark.parametrize("bad, message", [
    ([1, 2, float("nan"), 9], r"1 non-finite .*proposal 1: x1y1x2y2 \[1, 2, nan, 9\] non-finite"),
    ([1, 2, float("inf"), 9], r"1 non-finite .*proposal 1: x1y1x2y2 \[1, 2, inf, 9\] non-finite"),
    ([12, 4, 5, 6], r"1 inverted .*proposal 1: x1y1x2y2 \[12, 4, 5, 6\] inverted.*\(x1, y1, x2, y2\) corners"),
])
def test_non_finite_and_inverted_proposals_are_refused_naming_the_box(det, bad, message):
    boxes = BOXES.copy()
    boxes[1] = bad
    with pytest.raises(BadInput, match=message):
        det.detect(IMAGE, proposals=boxes)


def test_boxes_given_as_x_y_w_h_are_refused_as_inverted(det):
    xywh = np.array([[4, 6, 10, 3], [12, 2, 5, 5]], np.float32)  # x2 = w < x1 or y2 = h < y1
    with pytest.raises(BadInput, match=r"2 of 2 boxes are defective.*2 inverted"):
        det.detect(IMAGE, proposals=xywh)


@pytest.mark.parametrize("shape", [(4, 5), (4, 3), (16,), (2, 4, 4), (4, 0)])
def test_proposals_must_be_an_r_by_4_array_exactly(det, shape):
    """(4, 5) is boxes with a score column, (4, 3) is anything: reshape(-1, 4) used to scramble both into boxes."""
    proposals = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    with pytest.raises(BadInput, match=rf"proposals of .* must be an \(R, 4\) array .*got shape {re_shape(shape)}"):
        det.detect(IMAGE, proposals=proposals)


def re_shape(shape: tuple) -> str:
    return str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")


def test_proposals_partly_outside_the_image_are_clipped_and_empty_ones_dropped_with_their_scores(det):
    boxes = np.array([[-5, -5, 10, 10], [5, 5, 40, 25], [31, 0, 40, 10], [2, 2, 8, 8]], np.float32)
    scores = np.array([0.1, 0.2, 0.3, 0.4], np.float32)  # box 2 lies right of the image: nothing is left of it
    out = det.detect(IMAGE, proposals=boxes, proposal_scores=scores, score_threshold=0, max_detections=None)
    clipped = np.array([[0, 0, 10, 10], [5, 5, 30, 20], [2, 2, 8, 8]], np.float32)
    np.testing.assert_array_equal(out["proposals"], clipped)
    np.testing.assert_array_equal(out["proposal_index"], [0, 1, 3])
    same = det.detect(IMAGE, proposals=clipped, proposal_scores=scores[[0, 1, 3]], score_threshold=0,
                      max_detections=None)
    np.testing.assert_array_equal(out["region_scores"], same["region_scores"])
    assert out["region_scores"].shape == (3, len(CLASSES))


def test_nothing_left_after_clipping_is_no_proposals(det):
    with pytest.raises(BadInput, match=r"no proposals .*1 given, 1 dropped"):
        det.detect(IMAGE, proposals=[[40, 0, 50, 10]])


def test_max_proposals_keeps_the_first_valid_proposals(tmp_path):
    """The teacher's budget applies to what is left after validation: a dropped box does not use a place."""
    det = _teacher(tmp_path, max_proposals=2)
    boxes = np.concatenate([[[31, 0, 40, 10]], BOXES]).astype(np.float32)
    out = det.detect(IMAGE, proposals=boxes)
    np.testing.assert_array_equal(out["proposals"], BOXES[:2])
    np.testing.assert_array_equal(out["proposal_index"], [1, 2])


@pytest.mark.parametrize("scores, message", [
    (np.ones(5, np.float32), r"proposal_scores of .* must be a \(4,\) array, one per proposal, got shape \(5,\)"),
    (np.ones(3, np.float32), r"proposal_scores of .* must be a \(4,\) array, one per proposal, got shape \(3,\)"),
    (np.ones((4, 1), np.float32), r"proposal_scores of .* must be a \(4,\) array, one per proposal, got shape "
                                  r"\(4, 1\)"),
    (np.array([0.5, 0.5, np.nan, 0.5]), r"proposal_scores of .*: the score of proposal 2 is nan; expected finite"),
    (np.array([0.5, -np.inf, 0.5, 0.5]), r"the score of proposal 1 is -inf"),
])
def test_proposal_scores_must_be_one_finite_number_per_proposal(det, scores, message):
    with pytest.raises(BadInput, match=message) as e:
        det.detect(IMAGE, proposals=BOXES, proposal_scores=scores)
    assert "weights" not in str(e.value)


def test_proposal_scores_without_proposals_are_refused(det):
    with pytest.raises(BadInput, match="proposal_scores given without proposals"):
        det.detect(IMAGE, proposal_scores=np.ones(4, np.float32))


@pytest.mark.parametrize("kwargs, message", [
    (dict(nms_iou=float("nan")), r"nms_iou must be a number in \[0, 1\], got nan"),
    (dict(nms_iou=-0.1), r"nms_iou must be a number in \[0, 1\], got -0.1"),
    (dict(nms_iou=1.5), r"nms_iou must be a number in \[0, 1\], got 1.5"),
    (dict(max_per_class=0), r"max_per_class must be an integer >= 1, got 0"),
    (dict(max_per_class=-1), r"max_per_class must be an integer >= 1, got -1"),
    (dict(max_per_class=2.5), r"max_per_class must be an integer >= 1, got 2.5 \(a float\)"),
    (dict(max_per_class=True), r"max_per_class must be an integer >= 1, got True \(a bool\)"),
    (dict(score_threshold="0.5"), r"score_threshold must be a number in \[0, 1\], got '0.5' \(a str\)"),
    (dict(max_detections=True), r"max_detections must be an integer >= 1 or None \(all\), got True \(a bool\)"),
])
def test_detect_numbers_of_the_wrong_type_or_range_are_refused(det, kwargs, message):
    with pytest.raises(BadInput, match=message):
        det.detect(IMAGE, proposals=BOXES, **kwargs)


def test_numpy_integers_are_integers(det, clf):
    out = det.detect(IMAGE, proposals=BOXES, max_per_class=np.int64(1), max_detections=np.int32(2), score_threshold=0)
    assert len(out["scores"]) == 2
    assert len(clf.predict(IMAGE, top_k=np.int64(2))) == 2


# -- Classifier arguments -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(threshold="a" * 200), r"threshold must be a number in \[0, 1\].*got 'aaaa.*' \(a str\)$"),
    (dict(threshold=float("nan")), r"threshold must be a number in \[0, 1\].*got nan"),
    (dict(threshold=[0.5, "x", 0.5]), r"threshold\[1\] must be a number in \[0, 1\], got 'x' \(a str\)"),
    (dict(threshold={"a": 0.5, "b": 1.5, "c": 0.5}), r"threshold\['b'\] must be a number in \[0, 1\], got 1.5"),
    (dict(threshold=[0.5, 0.5]), r"threshold must be one number in \[0, 1\] or 3 of them.*got 2"),
    (dict(top_k=2.5), r"top_k must be an integer >= 1 or None \(all\), got 2.5 \(a float\)"),
    (dict(top_k="3"), r"top_k must be an integer >= 1 or None \(all\), got '3' \(a str\)"),
    (dict(top_k=True), r"top_k must be an integer >= 1 or None \(all\), got True \(a bool\)"),
    (dict(top_k=0), r"top_k must be an integer >= 1 or None \(all\), got 0"),
    (dict(batch_size=1.5), r"batch_size must be an integer >= 1, got 1.5 \(a float\)"),
])
def test_predict_arguments_of_the_wrong_type_or_range_are_refused(clf, kwargs, message):
    with pytest.raises(BadInput, match=message) as e:
        clf.predict(IMAGE, **kwargs)
    assert len(str(e.value)) < 400  # a 200-character string is shortened in the message


@pytest.mark.parametrize("image, shape", [
    (np.zeros((0, 0, 3), np.uint8), r"\(0, 0, 3\)"), (np.zeros((0, 5), np.uint8), r"\(0, 5\)"),
    (torch.zeros(3, 0, 0), r"\(3, 0, 0\)"), (torch.zeros(3, 4, 0, dtype=torch.uint8), r"\(3, 4, 0\)"),
])
def test_an_empty_image_is_refused_naming_its_shape(clf, det, image, shape):
    with pytest.raises(BadInput, match=rf"image has no pixels: shape {shape}; expected at least 1 x 1"):
        clf.predict(image)
    with pytest.raises(BadInput, match=rf"image has no pixels: shape {shape}"):
        det.detect(image, proposals=BOXES)


# -- the shared rules themselves ---------------------------------------------------------------------------------
def test_the_shared_rules_treat_bool_as_no_number_and_numpy_numbers_as_numbers():
    from mlkd.utils import checks

    assert checks.integer(np.int16(3), "n", low=1) == 3 and type(checks.integer(np.int16(3), "n")) is int
    assert checks.number(np.float32(0.25), "x", 0, 1) == 0.25 and checks.probability(1, "p") == 1.0
    assert checks.integer(None, "n", low=1, none="all") is None
    for bad in (True, np.bool_(True), 2.0, "2", None):
        with pytest.raises(BadInput, match="n must be an integer >= 1, got"):
            checks.integer(bad, "n", low=1)
    for bad in (float("inf"), float("nan"), True, "0.5", None):
        with pytest.raises(BadInput, match=r"p must be a number in \[0, 1\], got"):
            checks.probability(bad, "p")
    with pytest.raises(BadInput, match=r"x must be a finite number > 0, got 0"):
        checks.number(0, "x", low=0, low_open=True)


@pytest.mark.parametrize("classes, message", [
    ("abcdefghij", r"classes is not a list of names: got the string 'abcdefghij'"),
    ([1, 2, 3], r"class 0 is 1 \(an int\), not a name"),
    (["a", ""], r"class 1 is '', not a name"),
    ([], "classes is empty"),
    (["a"] * 10 + ["b", "c", "b"], r"classes repeat names: 'a' \(10 times\), 'b' \(2 times\)"),
])
def test_class_names_are_a_non_empty_list_of_distinct_names(classes, message):
    from mlkd.utils import checks

    with pytest.raises(BadInput, match=rf"here: {message}"):
        checks.class_names(classes, "here")
    assert checks.class_names(("x", "y"), "here") == ["x", "y"]
