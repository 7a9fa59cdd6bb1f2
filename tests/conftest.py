"""Shared fixtures: a tiny synthetic dataset with selective-search proposal caches, and a tiny teacher recipe."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from mlkd.data import CustomDataset
from mlkd.data.synthetic import generate
from mlkd.proposals import generate_proposals


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
