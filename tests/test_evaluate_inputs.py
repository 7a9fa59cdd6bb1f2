"""`mlkd evaluate`, `evaluate-teacher` and `visualize-teacher` on hostile input: output paths that are folders or
lack a suffix, and numeric options out of range (usage errors before any work)."""

from __future__ import annotations

import numpy as np
import pytest

from mlkd.cli import main


def test_scores_go_to_exactly_the_path_given(trained, tmp_path, capsys):
    scores = tmp_path / "out" / "scores_without_suffix"
    assert main(["evaluate", "--checkpoint", str(trained.student), "--dataset", str(trained.data.val), "--workers", "0",
                 "--quiet", "--scores", str(scores)]) == 0
    assert f"scores written to {scores}\n" in capsys.readouterr().out
    assert sorted(p.name for p in scores.parent.iterdir()) == ["scores_without_suffix"]  # no .npy appended
    assert np.load(scores).shape == (4, 10)


@pytest.mark.parametrize("option, example", [("--scores", "scores.npy"), ("--out", "report.json")])
def test_an_output_that_is_a_folder_is_refused_before_evaluating(trained, tmp_path, capsys, monkeypatch, option,
                                                                 example):
    monkeypatch.setattr("mlkd.evaluation.evaluate.load_checkpoint", lambda *a: pytest.fail("evaluated before the check"))
    assert main(["evaluate", "--checkpoint", str(trained.student), "--dataset", str(trained.data.val), "--quiet",
                 option, str(tmp_path)]) == 1
    what = option.strip("-").replace("out", "report")
    assert f"the {what} file {tmp_path} is a folder; give a file path, e.g. {tmp_path / example}" in \
        capsys.readouterr().err


def test_a_teacher_report_that_is_a_folder_is_refused_before_evaluating(trained, tmp_path, capsys):
    assert main(["evaluate-teacher", "--checkpoint", str(trained.teacher), "--dataset", str(trained.data.val),
                 "--proposals", str(trained.data.val_proposals), "--quiet", "--out", str(tmp_path)]) == 1
    assert f"the report file {tmp_path} is a folder" in capsys.readouterr().err


TEACHER = ["--checkpoint", "t.pt", "--dataset", "val.jsonl"]


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "--checkpoint", "s.pt", "--dataset", "val.jsonl", "--workers", "-1"],
     "argument --workers: expected an integer >= 0, got '-1'"),
    (["evaluate-teacher", *TEACHER, "--workers", "-3"], "argument --workers: expected an integer >= 0, got '-3'"),
    (["evaluate-teacher", *TEACHER, "--scales", "480", "0"], "argument --scales: expected an integer >= 1, got '0'"),
    (["evaluate-teacher", *TEACHER, "--scales", "-480"], "argument --scales: expected an integer >= 1, got '-480'"),
    (["evaluate-teacher", *TEACHER, "--max-proposals", "0"],
     "argument --max-proposals: expected an integer >= 1, got '0'"),
    (["visualize-teacher", *TEACHER, "--out", "figs", "--num-images", "0"],
     "argument --num-images: expected an integer >= 1, got '0'"),
    (["visualize-teacher", *TEACHER, "--out", "figs", "--top-proposals", "-1"],
     "argument --top-proposals: expected an integer >= 1, got '-1'"),
    (["import-caffe", "--arch", "wsddn", "--prototxt", "p", "--caffemodel", "c", "--out", "o", "--image-size", "0"],
     "argument --image-size: expected an integer >= 1, got '0'"),
    (["export", "--checkpoint", "t.pt", "--format", "caffe", "--out", "o", "--regions", "0"],
     "argument --regions: expected an integer >= 1, got '0'"),
])
def test_numeric_options_out_of_range_are_usage_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
