"""Fault injection: training and proposal generation killed with SIGKILL at random points, then continued, end
exactly where an uninterrupted run ends; a second run into a busy folder is refused.

The processes are real `mlkd` commands (subprocesses in their own process group, so a kill takes their workers
with them). Kill times are drawn from a seeded generator as fractions of the uninterrupted run's duration, so each
seed hits a different point: before the first checkpoint, between epochs, while a checkpoint or log line is
being written.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mlkd.data import CustomDataset
from mlkd.data.synthetic import generate
from mlkd.distill.feature_store import TeacherFeatures
from mlkd.proposals import generate_proposals
from mlkd.proposals.cache import ProposalCache
from mlkd.utils.checkpoint import load_checkpoint
from mlkd.utils.config import apply_overrides
from conftest import TINY_STUDENT

MLKD = [sys.executable, "-m", "mlkd"]
SEEDS = (0, 1, 2)


def run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(MLKD + args, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def killed_at(args: list[str], cwd: Path, after: float) -> None:
    """Start ``mlkd args`` and SIGKILL its whole process group ``after`` seconds later (if still running)."""
    proc = subprocess.Popen(MLKD + args, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        proc.wait(timeout=after)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def teacher_run(teacher_data, tmp_path_factory):
    """A teacher config file (3 epochs, 6 iterations each) and its uninterrupted run's checkpoint and duration."""
    root = tmp_path_factory.mktemp("faults")
    values = apply_overrides({}, teacher_data.overrides(root / "full", **{"run.log_every": 1}))
    values["run"].pop("out")
    (root / "teacher.yaml").write_text(yaml.safe_dump(values))
    t0 = time.perf_counter()
    proc = run(["train-teacher", "--config", "teacher.yaml", "--set", f"run.out={root / 'full'}"], root)
    assert proc.returncode == 0, proc.stderr
    return root, load_checkpoint(root / "full" / "last.pt"), time.perf_counter() - t0


@pytest.mark.parametrize("seed", SEEDS)
def test_training_killed_anywhere_then_continued_ends_bit_identical(teacher_run, seed):
    root, full, duration = teacher_run
    out = root / f"killed{seed}"
    cmd = ["train-teacher", "--config", "teacher.yaml", "--set", f"run.out={out}"]
    killed_at(cmd, root, after=float(np.random.default_rng(seed).uniform(0.2, 0.95)) * duration)
    # what a user does next: --resume when a checkpoint was written, else the same command again
    proc = run(cmd + (["--resume"] if (out / "last.pt").exists() else []), root)
    assert proc.returncode == 0, proc.stderr
    done = load_checkpoint(out / "last.pt")
    assert done["train_state"]["epoch"] == full["train_state"]["epoch"] == 2
    for key, value in full["model"].items():
        assert torch.equal(done["model"][key], value), key
    for a, b in zip(done["train_state"]["optimizer"]["state"].values(),
                    full["train_state"]["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (out / ".lock").exists() and not (out / "last.pt.tmp").exists()


@pytest.fixture(scope="module")
def proposal_run(teacher_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults_proposals")
    args = ["proposals", "--dataset", str(teacher_data.train), "--method", "selective_search", "--max-proposals",
            "30", "--workers", "2", "--quiet"]
    t0 = time.perf_counter()
    proc = run(args + ["--out", str(root / "full")], root)
    assert proc.returncode == 0, proc.stderr
    return root, args, time.perf_counter() - t0


@pytest.mark.parametrize("seed", SEEDS)
def test_proposal_generation_killed_anywhere_then_rerun_equals_an_uninterrupted_run(proposal_run, seed):
    root, args, duration = proposal_run
    out = root / f"killed{seed}"
    killed_at(args + ["--out", str(out)], root, after=float(np.random.default_rng(seed).uniform(0.2, 0.95)) * duration)
    proc = run(args + ["--out", str(out)], root)  # re-running the same command resumes
    assert proc.returncode == 0, proc.stderr
    with ProposalCache.open(root / "full") as full, ProposalCache.open(out) as again:
        assert sorted(full.keys()) == sorted(again.keys())
        assert dict(full.items()) == dict(again.items())  # every record byte-identical


def test_a_second_run_into_a_busy_folder_is_refused_while_the_first_finishes(teacher_run):
    root, _, _ = teacher_run
    cmd = ["train-teacher", "--config", "teacher.yaml", "--set", f"run.out={root / 'busy'}", "--set",
           "optim.epochs=40"]
    first = subprocess.Popen(MLKD + cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (root / "busy" / ".lock").exists() or not (root / "busy" / ".lock").read_text():
        assert time.monotonic() < deadline and first.poll() is None, "the first run never took the lock"
        time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)  # still running (40 tiny epochs can end before a second python has started)
    try:
        second = run(cmd, root)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 1
    assert f"run folder {root / 'busy'} is in use by pid {first.pid} on " in second.stderr
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert load_checkpoint(root / "busy" / "last.pt")["train_state"]["epoch"] == 39


@pytest.fixture(scope="module")
def kd_run(trained, tmp_path_factory):
    """A distilling student (one joint epoch: soft targets and region features cached before it) on 120 images, so
    that writing the teacher's caches takes long enough to be hit; its uninterrupted run's checkpoint and when the
    caches were being written (seconds after the feature store's folder appeared, until its meta.json did)."""
    root = tmp_path_factory.mktemp("faults_kd")
    train = generate(root / "synth", 120, seed=11, image_size=80, val_fraction=0.0, progress=False)["train"]
    generate_proposals(CustomDataset(train), "selective_search", {"mode": "fast", "max_proposals": 30},
                       root / "proposals", workers=0, progress=False)
    sets = {**TINY_STUDENT, "data.train": train, "data.train_proposals": root / "proposals",
            "distill.teacher": trained.teacher, "distill.baseline": "null", "run.log_every": 1,
            "stages": "[{name: joint, epochs: 1, label_weight: 1, soft_weight: 1, feature_weight: 1}]"}
    (root / "kd.yaml").write_text(yaml.safe_dump(apply_overrides({}, [f"{k}={v}" for k, v in sets.items()])))
    out = root / "full"
    proc = subprocess.Popen(MLKD + ["train-student", "--config", "kd.yaml", "--set", f"run.out={out}"], cwd=root,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    begin = end = None
    while proc.poll() is None:
        if begin is None and (out / "teacher_features").exists():
            begin = time.perf_counter()
        if end is None and (out / "teacher_features" / "meta.json").exists():
            end = time.perf_counter()
        time.sleep(0.002)
    assert proc.returncode == 0, proc.stderr.read()
    assert begin is not None and end is not None and end - begin > 0.2, (begin, end)  # a window a kill can hit
    return root, load_checkpoint(out / "last.pt"), end - begin


@pytest.mark.parametrize("seed", SEEDS)
def test_distillation_killed_while_the_teacher_caches_are_written_then_continued(kd_run, seed):
    """kill -9 in the middle of the pass that writes the teacher's soft targets and region features; the command
    again (with --resume for one seed: the folder has caches and no last.pt) rebuilds what was unfinished and the
    run ends as an uninterrupted one (within the float16 of the cached features)."""
    root, full, window = kd_run
    out = root / f"killed{seed}"
    cmd = ["train-student", "--config", "kd.yaml", "--set", f"run.out={out}"]
    proc = subprocess.Popen(MLKD + cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not (out / "teacher_features").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the run never started writing its caches"
        time.sleep(0.002)
    time.sleep(float(np.random.default_rng(seed).uniform(0.1, 0.5)) * window)
    unfinished = not (out / "teacher_features" / "meta.json").exists()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert unfinished and not (out / "last.pt").exists()  # the kill hit the caches being written
    proc = run(cmd + (["--resume"] if seed == 1 else []), root)
    assert proc.returncode == 0, proc.stderr
    done = load_checkpoint(out / "last.pt")
    assert done["train_state"]["epoch"] == full["train_state"]["epoch"] == 0
    for key, value in full["model"].items():
        assert torch.allclose(done["model"][key], value, rtol=1e-2, atol=2e-3), key
    targets = torch.load(out / "teacher_targets.pt", weights_only=True)
    ids = [r.image_id for r in CustomDataset(done["config"]["data"]["train"]).records]
    assert sorted(targets["probs"]) == sorted(ids)  # the caches are complete: every image, both flips
    with TeacherFeatures(out / "teacher_features", {"fc7": 32}) as store:
        for image_id in ids:
            for flipped in (False, True):
                keep, feats = store.get(image_id, flipped)
                assert len(keep) == len(feats["fc7"]) > 0
