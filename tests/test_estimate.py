"""`mlkd estimate`: real steps of a config's model at its sizes, the schedule projected from them, the caches'
disk from the formats' own sizes, and what could not be had here (data, weights) said, not guessed silently."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mlkd.cli import main
from mlkd.distill.feature_store import estimate_bytes
from mlkd.training.estimate import KNOWN, RECORD_BYTES, estimate, format_estimate

CPU = torch.device("cpu")


def test_a_teacher_is_timed_at_every_training_scale_and_its_schedule_follows(trained):
    sets = (f"data.train={trained.data.train}", "data.scales=[48, 64]", "data.max_proposals=20",
            "data.batch_size=3", "optim.epochs=5")
    result = estimate("teacher_demo", CPU, steps=1, overrides=sets)
    assert [r["what"] for r in result["rows"]] == ["teacher step at 48x48, batch 3, 20 proposals",
                                                   "teacher step at 64x64, batch 3, 20 proposals"]
    assert all(r["seconds"] > 0 and r["peak_mib"] > 0 for r in result["rows"])
    images = result["images"]
    assert images == 12 and result["classes"] == 10  # the fixture's training split, read here
    assert result["schedule"]["steps"] == math.ceil(12 / 3) * 5
    mean = sum(r["seconds"] for r in result["rows"]) / 2
    assert result["schedule"]["seconds"] == pytest.approx(20 * mean)
    assert result["caches"] == {"proposals_bytes": 12 * 20 * RECORD_BYTES}


def test_a_distilling_student_is_timed_plain_cached_and_on_the_fly(trained):
    sets = (f"data.train={trained.data.train}", f"distill.teacher={trained.teacher}", "model.image_size=48",
            "model.hidden=32", "data.batch_size=4", "data.max_proposals=30", "distill.top_k=8",
            "stages=[{name: joint, epochs: 2, label_weight: 1, soft_weight: 1, feature_weight: 1}]")
    result = estimate("student_demo_kd", CPU, steps=1, world_size=2, overrides=sets)
    whats = [r["what"] for r in result["rows"]]
    assert whats[0].startswith("student step at 48, batch 4") and "cached" in whats[1] and "on the fly" in whats[2]
    assert whats[3].startswith("teacher pass filling the caches")
    caches = result["caches"]
    assert caches["features_bytes"] == estimate_bytes(12, 8, {"fc7": 32}) and caches["features_fit"]
    assert caches["soft_targets_bytes"] == 12 * 2 * 10 * 4
    per_epoch = math.ceil(12 / (4 * 2))  # two processes share the images
    assert result["schedule"]["steps"] == per_epoch * 2
    rows = {r["what"]: r["seconds"] for r in result["rows"]}
    expected = per_epoch * 2 * rows[whats[1]] + 2 * 12 / 2 * rows[whats[3]] / 4  # cached stage + the caches' pass
    assert result["schedule"]["seconds"] == pytest.approx(expected)
    text = format_estimate(result)
    assert "teacher region features" in text and "fits" in text and "2 process(es)" in text


def test_what_is_not_here_is_said_and_replaced(trained, monkeypatch):
    """A dataset that is not on the machine takes its published size; a weights file that is not here, random
    weights; both are notes of the result, never silent."""
    import mlkd.training.estimate as est

    sets = ("data.scales=[48]", "data.max_proposals=10", "data.batch_size=1", "model.backbone=tiny",
            "model.tiny_channels=[8, 16]", "model.hidden=16", "model.roi_size=2", "model.weights=missing/vgg.pt")
    result = est.estimate("teacher_voc07", CPU, overrides=sets)
    assert (result["images"], result["classes"]) == KNOWN[("voc", "2007", "trainval")]
    notes = " ".join(result["notes"])
    assert "dataset voc:/data/voc:2007:trainval is not on this machine: its published size (5011 images" in notes
    assert "model.weights missing/vgg.pt not available here" in notes and "random weights are used" in notes
    with pytest.raises(FileNotFoundError, match="is not on this machine and its size is not known to mlkd"):
        est.estimate("teacher_demo", CPU, overrides=("data.train=nowhere/train.jsonl",))


def test_the_command_prints_the_estimate_or_its_json(trained, capsys):
    args = ["estimate", "--config", "teacher_demo", "--device", "cpu", "--set", f"data.train={trained.data.train}",
            "--set", "data.scales=[48]", "--set", "data.max_proposals=10"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "teacher step at 48x48" in out and "full schedule:" in out and "disk: proposals" in out
    assert main(args + ["--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["kind"] == "teacher"
