"""Shared fixtures: a tiny synthetic dataset with selective-search proposal caches, a tiny teacher recipe, and a
tiny teacher and student trained on it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from mlkd.data import CustomDataset
from mlkd.data.synthetic import generate
from mlkd.proposals import generate_proposals
from mlkd.training.student import StudentConfig, train_student
from mlkd.training.teacher import TeacherConfig, train_teacher
from mlkd.utils.config import load_config

# The suite's numbers must not depend on how fast this machine runs each candidate of a speed-only choice: every
# decision takes its fixed default, here and in the subprocesses tests start (tests/test_autotune.py turns it on).
os.environ["MLKD_AUTOTUNE"] = "0"


@dataclass
class TeacherData:
    train: Path  # manifest (12 images, 64-96 px)
    val: Path  # manifest (4 images)
    train_proposals: Path
    val_proposals: Path

    def overrides(self, out: Path, **extra) -> list[str]:
        """--set values of a tiny teacher run on this data (tiny backbone, hidden 32, ~2 s per epoch)."""
        values = {
            "model.backbone": "tiny", "model.tiny_channels": "[8, 16, 16]", "model.hidden": 32, "model.roi_size": 3,
            "model.input_convention": "torchvision", "model.dropout": 0.5,
            "data.train": self.train, "data.train_proposals": self.train_proposals, "data.max_proposals": 30,
            "data.scales": "[64, 80, 96]", "data.test_scale": 80, "data.flip": "true", "data.batch_size": 2,
            "data.workers": 0, "optim.lr": 0.01, "optim.epochs": 3, "optim.lr_steps": "[2]", "run.out": out,
            "run.device": "cpu", "run.progress": "false", "run.log_every": 1, "run.seed": 3,
            "run.amp": "none",  # float32 on every CPU (auto would pick bf16 where it is native)
        }
        values.update(extra)
        return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="session")
def teacher_data(tmp_path_factory) -> TeacherData:
    root = tmp_path_factory.mktemp("teacher_data")
    manifests = generate(root / "synth", 16, seed=5, image_size=80, val_fraction=0.25, progress=False)
    caches = {}
    for split in ("train", "val"):
        caches[split] = root / f"proposals_{split}"
        generate_proposals(CustomDataset(manifests[split]), "selective_search", {"mode": "fast", "max_proposals": 30},
                           caches[split], workers=0, progress=False)
    return TeacherData(manifests["train"], manifests["val"], caches["train"], caches["val"])


@dataclass
class Trained:
    data: TeacherData
    teacher: Path  # last.pt of a tiny teacher (2 epochs)
    student: Path  # last.pt of a tiny student distilled from it (one stage-1 and one stage-2 epoch)


TINY_STUDENT = {"model.backbone": "tiny", "model.tiny_channels": "[8, 16, 16]", "model.hidden": 32,
                "model.roi_size": 3, "model.input_convention": "torchvision", "model.image_size": 48,
                "data.batch_size": 4, "data.workers": 0, "data.max_proposals": 30, "optim.optimizer": "adamw",
                "optim.lr": 0.001, "run.progress": "false", "run.device": "cpu", "run.amp": "none"}


@pytest.fixture(scope="session")
def trained(teacher_data, tmp_path_factory) -> Trained:
    """A tiny teacher and a student distilled from it, trained once for the tests that need real checkpoints."""
    root = tmp_path_factory.mktemp("trained")
    teacher = train_teacher(load_config(TeacherConfig, None,
                                        teacher_data.overrides(root / "teacher", **{"optim.epochs": 2})))
    stages = ('[{name: feature, epochs: 1, label_weight: 0, feature_weight: 1}, '
              '{name: prediction, epochs: 1, label_weight: 1, soft_weight: 1}]')
    sets = {**TINY_STUDENT, "data.train": teacher_data.train, "data.train_proposals": teacher_data.train_proposals,
            "distill.teacher": teacher, "stages": stages, "run.out": root / "student"}
    student = train_student(load_config(StudentConfig, None, [f"{k}={v}" for k, v in sets.items()]))
    return Trained(teacher_data, teacher, student)
