"""Telling the user whether distillation helped: held-out mAP after every stage, stages that made it worse, and
the gain over the same student trained without distillation (found beside the run or given)."""

from __future__ import annotations

import json
import logging

import pytest

from mlkd.distill.report import StageReport, find_baseline
from mlkd.training.student import StudentConfig, train_student
from mlkd.utils.checkpoint import load_checkpoint
from mlkd.utils.config import load_config, to_dict
from mlkd.utils.runlog import RunLog
from conftest import TINY_STUDENT

TWO_STAGE = ('[{name: feature, epochs: 1, label_weight: 0, feature_weight: 1}, '
             '{name: prediction, epochs: 1, label_weight: 1, soft_weight: 1}]')


def student(trained, out, stages, **extra):
    sets = {**TINY_STUDENT, "data.train": trained.data.train, "data.train_proposals": trained.data.train_proposals,
            "data.val": trained.data.val, "distill.teacher": trained.teacher, "stages": stages, "run.out": out,
            **extra}
    return load_config(StudentConfig, None, [f"{k}={v}" for k, v in sets.items()])


def test_a_distilled_run_reports_every_stage_and_its_gain_over_the_baseline_beside_it(trained, tmp_path, caplog):
    plain = train_student(student(trained, tmp_path / "plain", "[{name: plain, epochs: 2}]"))
    other = student(trained, tmp_path / "other", "[{name: plain, epochs: 2}]", **{"model.hidden": 16})
    train_student(other)  # another model: not a baseline of this run
    with caplog.at_level(logging.INFO, logger="mlkd"):
        train_student(student(trained, tmp_path / "kd", TWO_STAGE))
    report = json.loads((tmp_path / "kd" / "kd_report.json").read_text())
    assert [s["stage"] for s in report["stages"]] == ["feature", "prediction"]
    records = [json.loads(line) for line in (tmp_path / "kd" / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["type"] == "epoch"]
    assert report["stages"][-1]["val_mAP"] == epochs[-1]["val_mAP"]  # the last epoch's measure, not a new one
    assert report["baseline"] == str(plain)
    baseline_log = [json.loads(x) for x in (tmp_path / "plain" / "log.jsonl").read_text().splitlines()]
    assert report["baseline_val_mAP"] == pytest.approx([r for r in baseline_log if r["type"] == "epoch"][-1]["val_mAP"])
    assert report["gain_over_baseline"] == pytest.approx(report["stages"][-1]["val_mAP"] - report["baseline_val_mAP"])
    assert [r["type"] for r in records if r["type"] in ("stage", "summary")] == ["stage", "stage", "summary"]
    assert "distillation gain over the baseline" in caplog.text and "held-out mAP after stage 'feature'" in caplog.text
    kept = load_checkpoint(tmp_path / "kd" / "stage0_feature.pt")
    assert kept["train_state"]["stage"] == 0 and kept["train_state"]["epoch"] == 0


def test_stages_that_make_things_worse_and_a_negative_gain_are_reported(tmp_path, caplog):
    (tmp_path / "last.pt").write_bytes(b"")
    report = StageReport(tmp_path, RunLog(tmp_path), num_stages=3)
    with caplog.at_level(logging.INFO, logger="mlkd"):
        for i, (name, value) in enumerate(zip(("a", "b", "c"), (0.5, 0.4, 0.45))):
            report.stage_end(i, name, {"type": "epoch", "val_mAP": value})
        summary = report.finish(tmp_path / "base.pt", 0.6)
    assert "stage 'b' made the held-out mAP worse: 50.00 after stage 'a' -> 40.00" in caplog.text
    assert summary["worse_stages"] == ["b"] and summary["gain_over_baseline"] == pytest.approx(-0.15)
    assert "the distilled student is WORSE than its baseline" in caplog.text and "-15.00 mAP" in caplog.text
    stage_b = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()][1]
    assert stage_b["worse_than_previous"] == pytest.approx(0.1)
    assert sorted(p.name for p in tmp_path.glob("stage*.pt")) == ["stage0_a.pt", "stage1_b.pt"]


def test_find_baseline_needs_a_finished_plain_run_of_the_same_model_and_data(trained, tmp_path):
    kd_cfg = student(trained, tmp_path / "kd", TWO_STAGE)
    train_student(kd_cfg)  # a distilled sibling is no baseline
    identity = load_checkpoint(tmp_path / "kd" / "last.pt")["dataset"]
    assert find_baseline(tmp_path / "new", to_dict(kd_cfg.model), identity) is None


def test_a_baseline_that_cannot_be_compared_is_refused_before_the_first_step(trained, tmp_path):
    """A missing path, a teacher, or a student of other classes as distill.baseline used to be found out only after
    the whole run had trained (and no kd_report.json written): now the start is refused and nothing is written."""
    from mlkd.errors import NotFound
    from mlkd.utils.checkpoint import save_checkpoint

    other = load_checkpoint(trained.student)
    other["classes"] = list(reversed(other["classes"]))
    save_checkpoint(tmp_path / "other_classes.pt", other)
    cases = [(tmp_path / "missing.pt", NotFound, "distill.baseline .*missing.pt: no such checkpoint"),
             (trained.teacher, ValueError, "distill.baseline .* holds a teacher, not a student"),
             (tmp_path / "other_classes.pt", ValueError, "distill.baseline .*other_classes.pt"),
             (trained.student, ValueError, "was trained with distillation; give a student trained on labels only")]
    for i, (baseline, error, message) in enumerate(cases):
        out = tmp_path / f"kd{i}"
        with pytest.raises(error, match=message):
            train_student(student(trained, out, TWO_STAGE, **{"distill.baseline": baseline}))
        assert not out.exists()  # refused before the teacher's caches, the config or a checkpoint were written
