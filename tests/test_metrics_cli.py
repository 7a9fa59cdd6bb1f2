"""`mlkd metrics` on hostile input: files that are not one .npy (N, K) array, logits where probabilities are expected
(refused, or passed through a sigmoid with --logits), non-finite scores, shapes that differ, options out of range."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlkd.cli import main
from mlkd.metrics import evaluate_all

EXPECTED = "expected a .npy array of shape (N, K), one row per image, one column per class"
TARGETS = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], np.int8)
LOGITS = np.array([[2.0, -1.0], [-3.0, 4.0], [1.0, 0.5], [-50.0, 0.0]])


@pytest.fixture()
def base(tmp_path, monkeypatch) -> list[str]:
    monkeypatch.chdir(tmp_path)
    np.save("t.npy", TARGETS)
    return ["metrics", "--targets", "t.npy", "--summary"]


def _fails(argv: list[str], capsys) -> str:
    assert main(argv) == 1
    return capsys.readouterr().err


def test_a_npz_archive_is_named_as_such(base, capsys):
    np.savez("s.npz", probs=np.full((4, 2), 0.5), other=np.zeros(3))
    err = _fails(base + ["--scores", "s.npz"], capsys)
    assert "scores file s.npz is a .npz archive of 2 array(s) ['probs', 'other'], not one array" in err
    assert "numpy.load('s.npz')['probs']" in err and EXPECTED in err


def test_a_text_file_is_named_as_such(base, capsys):
    with open("s.txt", "w") as f:
        f.write("0.1 0.2\n0.3 0.4\n0.5 0.6\n0.7 0.8\n")
    err = _fails(base + ["--scores", "s.txt"], capsys)
    assert "scores file s.txt is a text file (convert it, e.g. numpy.save('out.npy', numpy.loadtxt(...)))" in err
    assert EXPECTED in err and "pickle" not in err


@pytest.mark.parametrize("content, message", [
    (b"\x00\x01\x02binary", "scores file s.bin is not a .npy file (it does not start with the .npy header)"),
    (b"PK\x03\x04garbage", "scores file s.bin is a zip file (not a .npz numpy archive)"),
])
def test_other_files_say_what_they_are(base, capsys, content, message):
    with open("s.bin", "wb") as f:
        f.write(content)
    err = _fails(base + ["--scores", "s.bin"], capsys)
    assert message in err and EXPECTED in err


@pytest.mark.parametrize("array, message", [
    (np.zeros(4), "scores file s.npy holds a float64 array of shape (4,); " + EXPECTED),
    (np.array([{"a": 1}], dtype=object), "cannot read scores file s.npy as a numeric .npy array"),
    (np.array([["a", "b"]]), "scores file s.npy holds a <U1 array of shape (1, 2)"),
])
def test_arrays_of_the_wrong_kind_are_refused(base, capsys, array, message):
    np.save("s.npy", array)
    assert message in _fails(base + ["--scores", "s.npy"], capsys)


def test_a_shape_mismatch_names_both_files_and_shapes(base, capsys):
    np.save("s.npy", np.full((4, 3), 0.5))
    err = _fails(base + ["--scores", "s.npy"], capsys)
    assert "scores s.npy have shape (4, 3) but targets t.npy have shape (4, 2); expected the same" in err
    np.save("s.npy", np.full((4, 2), 0.5))
    with open("classes.txt", "w") as f:
        f.write("a\nb\nc\n")
    err = _fails(base + ["--scores", "s.npy", "--classes", "classes.txt"], capsys)
    assert "classes.txt lists 3 class names but scores s.npy have 2 columns" in err


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_are_refused_with_or_without_logits(base, capsys, value):
    scores = np.full((4, 2), 0.5)
    scores[2, 1] = value
    np.save("s.npy", scores)
    for extra in ([], ["--logits"]):
        err = _fails(base + ["--scores", "s.npy", *extra], capsys)
        assert "scores s.npy hold 1 non-finite values (NaN or inf; the first at image 2, class 1)" in err


def test_logits_are_refused_unless_logits_is_given_which_applies_a_sigmoid(base, capsys):
    np.save("s.npy", LOGITS)
    err = _fails(base + ["--scores", "s.npy"], capsys)
    assert "scores s.npy range over [-50, 4], outside [0, 1]" in err and "pass --logits to apply a sigmoid" in err
    assert main(base + ["--scores", "s.npy", "--logits", "--json", "r.json"]) == 0
    got = json.loads(open("r.json").read())
    expected = evaluate_all(1 / (1 + np.exp(-LOGITS)), TARGETS)
    assert got["all_labels"] == pytest.approx(expected["all_labels"]) and got["mAP"] == pytest.approx(expected["mAP"])
    assert got["all_labels"]["OP"] == pytest.approx(4 / 5)  # p >= 0.5: logits 2, 4, 1, 0.5 right, 0 (p = 0.5) wrong


def test_help_documents_logits(capsys):
    with pytest.raises(SystemExit):
        main(["metrics", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--logits the scores are logits (raw outputs, any real number): apply a sigmoid first" in text
    assert "scores outside [0, 1] are refused" in text


@pytest.mark.parametrize("option, value, message", [
    ("--threshold", "nan", "expected a number in [0, 1], got 'nan'"),
    ("--threshold", "1.5", "expected a number in [0, 1], got '1.5'"),
    ("--top-k", "0", "expected an integer >= 1, got '0'"),
])
def test_options_out_of_range_are_usage_errors(base, capsys, option, value, message):
    np.save("s.npy", np.full((4, 2), 0.5))
    with pytest.raises(SystemExit) as e:
        main(base + ["--scores", "s.npy", option, value])
    assert e.value.code == 2 and f"argument {option}: {message}" in capsys.readouterr().err
