"""The demo's results table: mean ± std per model over seeds, and every distillation recipe's gain per seed over
the student without distillation, a seed where a distilled student is worse flagged."""

from __future__ import annotations

import pytest

from mlkd.demo import table


def report(map_: float, teacher: bool = False) -> dict:
    c = {"mAP": {"mlic": map_}, "all_labels": {"CF1": 0.5, "OF1": 0.6}, "top_k_thresholded": {"CF1": 0.4, "OF1": 0.3}}
    out = {"classification": c}
    if teacher:
        out.update(detection={"mAP": 0.4, "ap_variant": "voc07"}, corloc_train={"corloc": 0.5},
                   corloc_largest_proposal_train={"corloc": 0.0})
    return out


def test_gains_per_seed_and_a_worse_seed_flagged():
    seeds = [{"teacher": report(0.9, True), "student": report(s), "student_kd": report(k),
              "student_kd_release": report(r)} for s, k, r in ((0.40, 0.70, 0.60), (0.50, 0.60, 0.45))]
    text, stats = table(seeds)
    gains = stats["kd_gain_mAP"]
    assert gains["student_kd"]["per_seed"] == pytest.approx([30.0, 10.0])
    assert gains["student_kd"]["mean"] == pytest.approx(20.0) and gains["student_kd"]["std"] == pytest.approx(10.0)
    assert gains["student_kd_release"]["per_seed"] == pytest.approx([20.0, -5.0])
    assert "student_joint" not in gains
    lines = {line.split("  ")[1].strip(): line for line in text.splitlines() if line.startswith("  w/ KD")}
    assert "+30.0 +10.0" in lines["w/ KD (mlkd default)"] and "WORSE" not in lines["w/ KD (mlkd default)"]
    assert "+20.0 -5.0" in lines["w/ KD (release)"] and "WORSE than w/o KD for 1 seed(s)" in lines["w/ KD (release)"]
    assert stats["student"]["mAP"]["per_seed"] == pytest.approx([40.0, 50.0])
