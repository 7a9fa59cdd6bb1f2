"""Stage 1's teacher region features computed once per (image, flip): they equal the features the teacher gives
on the fly (up to float16), with and without top_k, and a run that reads them trains like one that does not."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from mlkd.data.base import collate
from mlkd.data.loader import make_loader
from mlkd.data.transforms import Compose, KeepTopProposals, TeacherStudentViews
from mlkd.distill.cache import (TEACHER_BATCH, FeatureCacheSpec, compute_teacher_targets, teacher_caches,
                               teacher_features_store)
from mlkd.distill.teacher import teacher_region_targets
from mlkd.models.backbones import normalize
from mlkd.models.build import model_from_checkpoint
from mlkd.proposals.attach import open_split
from mlkd.training.student import StudentConfig, train_student
from mlkd.utils.checkpoint import load_checkpoint
from mlkd.utils.config import load_config
from mlkd.utils.distributed import DistInfo
from conftest import TINY_STUDENT

FEATURE = "[{name: feature, epochs: 1, label_weight: 0, feature_weight: 1}]"


@pytest.mark.parametrize("top_k", [None, 5])
def test_cached_features_equal_the_teachers_on_the_fly_up_to_float16(trained, tmp_path, top_k):
    ckpt = load_checkpoint(trained.teacher, "teacher")
    teacher = model_from_checkpoint(ckpt)
    dataset = open_split(str(trained.data.train), proposals=str(trained.data.train_proposals))
    with teacher_features_store(teacher, "torchvision", str(trained.teacher), dataset, 80, tmp_path, DistInfo(),
                                30, ("fc6", "fc7"), top_k, progress=False) as store:
        for flip in (0.0, 1.0):
            view = dataset.view(transform=Compose([KeepTopProposals(30), TeacherStudentViews(80, 48, flip)]))
            for images, targets in make_loader(view, 3, 0, collate, train=False):
                t_img = normalize(torch.stack([t["teacher_image"] for t in targets]), "torchvision")
                live, rows = teacher_region_targets(teacher, t_img, [t["proposals"] for t in targets],
                                                    [t["proposal_scores"] for t in targets], ("fc6", "fc7"), top_k)
                cached, cached_rows = store.lookup(targets)
                if top_k is None:
                    assert rows is None and torch.equal(cached_rows, torch.arange(len(cached_rows)))
                else:
                    assert torch.equal(cached_rows, rows)
                for layer in ("fc6", "fc7"):
                    assert torch.allclose(cached[layer], live[layer], rtol=1e-3, atol=1e-3), layer
        assert (tmp_path / "teacher_features" / "meta.json").is_file()


def test_a_run_reading_the_cache_trains_like_one_running_the_teacher(trained, tmp_path):
    def run(out, gb):
        sets = {**TINY_STUDENT, "data.train": trained.data.train, "data.train_proposals": trained.data.train_proposals,
                "distill.teacher": trained.teacher, "stages": FEATURE, "run.out": out,
                "distill.feature_cache_gb": gb, "distill.baseline": "null"}
        return load_checkpoint(train_student(load_config(StudentConfig, None, [f"{k}={v}" for k, v in sets.items()])))

    cached, live = run(tmp_path / "cached", 1), run(tmp_path / "live", 0)
    assert (tmp_path / "cached" / "teacher_features").is_dir() and not (tmp_path / "live" / "teacher_features").exists()
    logs = [[json.loads(x) for x in (tmp_path / n / "log.jsonl").read_text().splitlines()] for n in ("cached", "live")]
    losses = [[r["loss_feature"] for r in log if r["type"] == "iter"] for log in logs]
    assert losses[0] == pytest.approx(losses[1], rel=2e-3)  # float16 targets: the same loss at every step
    for key, value in live["model"].items():  # and the same weights after the epoch, within float16 noise
        assert torch.allclose(cached["model"][key], value, rtol=1e-2, atol=2e-3), key


def test_targets_and_features_come_from_one_teacher_pass(trained, tmp_path):
    """Both caches at once run the teacher's backbone once per batch of views, and equal the caches computed
    one at a time."""
    ckpt = load_checkpoint(trained.teacher, "teacher")
    teacher = model_from_checkpoint(ckpt)
    dataset = open_split(str(trained.data.train), proposals=str(trained.data.train_proposals))
    calls = []
    teacher.backbone.register_forward_hook(lambda *a: calls.append(1))
    spec = FeatureCacheSpec(("fc7",), None)
    soft, store = teacher_caches(teacher, "torchvision", str(trained.teacher), dataset, 80, tmp_path / "both",
                                 DistInfo(), 30, True, spec, progress=False)
    assert len(calls) == 2 * math.ceil(len(dataset) / TEACHER_BATCH)  # unflipped and flipped views, once each
    alone = compute_teacher_targets(teacher, "torchvision", str(trained.teacher), dataset, 80, tmp_path / "one",
                                    DistInfo(), 30, progress=False)
    other = teacher_features_store(teacher, "torchvision", str(trained.teacher), dataset, 80, tmp_path / "two",
                                   DistInfo(), 30, ("fc7",), None, progress=False)
    with store, other:
        for r in dataset.records:
            torch.testing.assert_close(soft.probs[r.image_id], alone.probs[r.image_id], rtol=0, atol=0)
            for flip in (False, True):
                a, b = store.get(r.image_id, flip), other.get(r.image_id, flip)
                assert (a[0] == b[0]).all() and (a[1]["fc7"] == b[1]["fc7"]).all()
        calls.clear()  # a second call finds both caches current and runs nothing
        with teacher_caches(teacher, "torchvision", str(trained.teacher), dataset, 80, tmp_path / "both", DistInfo(),
                            30, True, spec, progress=False)[1]:
            assert calls == []


def test_a_truncated_targets_file_is_computed_again_on_resume(trained, tmp_path, caplog):
    """teacher_targets.pt cut short (a full disk while copying the run folder): the next call logs it and
    recomputes the same targets instead of ending in a torch.load traceback."""
    teacher = model_from_checkpoint(load_checkpoint(trained.teacher, "teacher"))
    dataset = open_split(str(trained.data.train), proposals=str(trained.data.train_proposals))
    first = compute_teacher_targets(teacher, "torchvision", str(trained.teacher), dataset, 80, tmp_path, DistInfo(),
                                    30, progress=False)
    path = tmp_path / "teacher_targets.pt"
    os.truncate(path, path.stat().st_size // 2)
    again = compute_teacher_targets(teacher, "torchvision", str(trained.teacher), dataset, 80, tmp_path, DistInfo(),
                                    30, progress=False)
    assert f"{path} cannot be read" in caplog.text and "computed again" in caplog.text
    for r in dataset.records:
        torch.testing.assert_close(again.probs[r.image_id], first.probs[r.image_id], rtol=0, atol=0)
    assert torch.load(path, weights_only=True)["probs"].keys() == first.probs.keys()  # rewritten whole


def test_the_caches_fingerprint_follows_the_content_of_the_images_behind_the_proposals(trained, monkeypatch):
    """A proposal cache rebuilt on changed images with the same parameters has other image stamps: the teacher's
    cached targets of the old images must not be reused for it."""
    from mlkd.data.base import FileStamp
    from mlkd.distill.cache import _fingerprint

    dataset = open_split(str(trained.data.train), proposals=str(trained.data.train_proposals))
    stamps = dataset.proposals.stamps()
    assert len(stamps) == len(dataset)  # mlkd's own caches stamp every image
    before = _fingerprint(str(trained.teacher), 80, dataset, 30)
    first = sorted(stamps)[0]
    changed = {**stamps, first: FileStamp(stamps[first].size, stamps[first].mtime_ns, bytes(32))}
    monkeypatch.setattr(type(dataset.proposals), "stamps", lambda self: changed)
    assert _fingerprint(str(trained.teacher), 80, dataset, 30)["images"] != before["images"]
    monkeypatch.setattr(type(dataset.proposals), "stamps", lambda self: stamps)
    assert _fingerprint(str(trained.teacher), 80, dataset, 30) == before
