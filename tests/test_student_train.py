"""Student training end to end on a tiny synthetic set: plain and distilled runs, the frozen teacher, cached
teacher targets, exact resume, and the evaluate / predict commands."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from mlkd.cli import main
from mlkd.data.base import collate
from mlkd.data.loader import make_loader
from mlkd.data.synthetic import generate
from mlkd.data.transforms import TeacherStudentViews
from mlkd.distill.cache import compute_teacher_targets
from mlkd.distill.inputs import student_inputs
from mlkd.distill.objective import StudentObjective
from mlkd.distill.teacher import teacher_image_probs
from mlkd.models.backbones import normalize
from mlkd.models.build import build_student, model_from_checkpoint
from mlkd.proposals import generate_proposals
from mlkd.proposals.attach import open_split
from mlkd.training.loop import LoopSettings, StageParts, train_one_epoch
from mlkd.training.student import StudentConfig, train_student
from mlkd.training.teacher import TeacherConfig, train_teacher
from mlkd.utils.checkpoint import load_checkpoint
from mlkd.utils.config import load_config
from mlkd.utils.distributed import DistInfo

TINY = {"tiny_channels": [4, 8, 8], "tiny_convs_per_block": 1, "input_convention": "torchvision", "hidden": 16,
        "roi_size": 2, "dropout": 0.5}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """12 synthetic images, their proposals and a teacher trained for one epoch."""
    root = tmp_path_factory.mktemp("kd")
    manifests = generate(root / "data", 12, seed=3, image_size=64, val_fraction=0.25, progress=False)
    for split, path in manifests.items():
        ds = open_split(str(path))
        generate_proposals(ds, "selective_search", {"max_proposals": 20, "min_size": 4}, root / f"p_{split}",
                           progress=False)
    data = [f"data.train={manifests['train']}", f"data.val={manifests['val']}", f"data.train_proposals={root / 'p_train'}"]
    teacher_set = data + [f"data.val_proposals={root / 'p_val'}", "data.scales=[64]", "data.test_scale=64",
                          "data.batch_size=3", "data.workers=0", "optim.optimizer=adamw", "optim.lr=0.001",
                          "optim.epochs=1", "run.progress=false", "run.amp=none", f"run.out={root / 'teacher'}"]
    tcfg = load_config(TeacherConfig, None, teacher_set + [f"model.{k}={json.dumps(v)}" for k, v in TINY.items()]
                       + ["model.backbone=tiny"])
    return root, data, train_teacher(tcfg)


def student_cfg(world, out, stages, extra=()):
    root, data, teacher = world
    sets = data + ["model.backbone=tiny", "model.image_size=32", "data.batch_size=3", "data.workers=0",
                   "data.max_proposals=10", "optim.optimizer=adamw", "optim.lr=0.001", "run.progress=false", "run.amp=none",
                   f"run.out={out}", f"distill.teacher={teacher}", f"stages={json.dumps(stages)}", *extra]
    return load_config(StudentConfig, None, sets + [f"model.{k}={json.dumps(v)}" for k, v in TINY.items()])


TWO_STAGE = [{"name": "feature", "epochs": 1, "label_weight": 0, "feature_weight": 1},
             {"name": "prediction", "epochs": 2, "lr_steps": [1], "label_weight": 1, "soft_weight": 1}]


def sha(path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def test_two_stage_run_leaves_the_teacher_file_untouched_and_logs_both_stages(world, tmp_path):
    teacher_path = world[2]
    before = sha(teacher_path)
    last = train_student(student_cfg(world, tmp_path / "kd", TWO_STAGE))
    assert sha(teacher_path) == before
    ckpt = load_checkpoint(last, "student")
    state = ckpt["train_state"]
    assert state["epoch"] == 2 and state["stage"] == 1 and state["stage_epoch"] == 1 and "scale" in state["extra"]
    assert not any(k.startswith("teacher") for k in ckpt["model"])  # the teacher is never saved with the student
    epochs = [json.loads(line) for line in (tmp_path / "kd" / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in epochs if r["type"] == "epoch"]
    assert [r["stage"] for r in epochs] == ["feature", "prediction", "prediction"]
    assert "train_loss_feature" in epochs[0] and {"train_loss_label", "train_loss_soft"} <= set(epochs[1])
    iters = [json.loads(line) for line in (tmp_path / "kd" / "log.jsonl").read_text().splitlines()]
    lrs = {r["lr"] for r in iters if r["type"] == "iter"}
    assert sorted(lrs) == pytest.approx([0.0001, 0.001])  # the weights' lr and its step decay, not the scale a's (x10)
    assert (tmp_path / "kd" / "teacher_targets.pt").is_file() and (tmp_path / "kd" / "curves.png").is_file()


def test_teacher_parameters_are_bit_identical_after_a_student_epoch(world):
    root, _, teacher_path = world
    teacher = model_from_checkpoint(load_checkpoint(teacher_path))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    dataset = open_split(str(root / "data" / "train.jsonl"), proposals=str(root / "p_train"),
                         transform=TeacherStudentViews(64, 32))
    student = build_student(student_cfg(world, root / "unused", TWO_STAGE).model, dataset.num_classes)
    model = StudentObjective(student, teacher, 1.0, 1.0, 1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    loader = make_loader(dataset, 3, 0, collate, train=True)
    parts = StageParts(model, 0.1, opt, torch.optim.lr_scheduler.MultiStepLR(opt, []), loader,
                       lambda im, t: student_inputs(im, t, torch.device("cpu"), "torchvision", "torchvision"))
    train_one_epoch(model, parts, 0, LoopSettings(progress=False), torch.device("cpu"))
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not teacher.training


def test_cached_teacher_targets_equal_the_targets_computed_on_the_fly(world, tmp_path):
    root, _, teacher_path = world
    ckpt = load_checkpoint(teacher_path)
    teacher = model_from_checkpoint(ckpt)
    dataset = open_split(str(root / "data" / "train.jsonl"), proposals=str(root / "p_train"))
    cache = compute_teacher_targets(teacher, ckpt["input_convention"], str(teacher_path), dataset, 64, tmp_path,
                                    DistInfo(), progress=False)
    for flip in (0.0, 1.0):
        views = dataset.view(transform=TeacherStudentViews(64, 32, flip=flip))
        for i in range(len(views)):
            _, t = views[i]
            live = teacher_image_probs(teacher, normalize(t["teacher_image"][None], "torchvision"), [t["proposals"]],
                                       [t["proposal_scores"]])
            assert torch.allclose(cache.lookup([t])[0], live[0], atol=1e-6), (i, flip)


def test_resumed_run_gives_the_same_weights_as_an_uninterrupted_one(world, tmp_path):
    full = load_checkpoint(train_student(student_cfg(world, tmp_path / "full", TWO_STAGE)))
    cut = [TWO_STAGE[0], {**TWO_STAGE[1], "epochs": 1}]  # interrupted after the first epoch of stage 2
    train_student(student_cfg(world, tmp_path / "cut", cut))
    resumed = load_checkpoint(train_student(student_cfg(world, tmp_path / "cut", TWO_STAGE), resume=True,
                                            explicit=["stages"]))
    assert all(torch.equal(full["model"][k], resumed["model"][k]) for k in full["model"])
    assert torch.equal(full["train_state"]["extra"]["scale"], resumed["train_state"]["extra"]["scale"])
    with pytest.raises(ValueError, match="already holds a run"):
        train_student(student_cfg(world, tmp_path / "cut", TWO_STAGE))


def test_plain_student_evaluate_and_predict_commands(world, tmp_path, capsys):
    root = world[0]
    plain = [{"name": "plain", "epochs": 1}]
    last = train_student(student_cfg(world, tmp_path / "plain", plain, ["distill.teacher=null"]))
    capsys.readouterr()
    val = str(root / "data" / "val.jsonl")
    assert main(["evaluate", "--checkpoint", str(last), "--dataset", val, "--out", str(tmp_path / "r.json"),
                 "--scores", str(tmp_path / "s.npy"), "--quiet", "--workers", "0"]) == 0
    assert "mAP [mlic]" in capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    scores = np.load(tmp_path / "s.npy")
    assert scores.shape == (3, 10) and report["classification"]["num_images"] == 3
    image = sorted((root / "data" / "images" / "val").iterdir())[0]
    (tmp_path / "thr.txt").write_text("".join(f"{c} 0.5\n" for c in load_checkpoint(last)["classes"]))
    assert main(["predict", "--checkpoint", str(last), str(image), "--thresholds", str(tmp_path / "thr.txt"),
                 "--out-dir", str(tmp_path / "viz")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{image}: ") and "above threshold" in out and len(list((tmp_path / "viz").iterdir())) == 1
    (tmp_path / "bad.txt").write_text("not_a_class 0.5\n")
    assert main(["predict", "--checkpoint", str(last), str(image), "--thresholds", str(tmp_path / "bad.txt")]) == 1
    assert "unknown ['not_a_class']" in capsys.readouterr().err


def test_config_errors_are_clear(world, tmp_path):
    with pytest.raises(ValueError, match=r"stage\(s\) \['feature'\] distil from the teacher: set distill.teacher"):
        student_cfg(world, tmp_path, TWO_STAGE[:1], ["distill.teacher=null"])
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['stages\[0\].wieght'\]; valid keys here: "
                                         r"\['stages\[0\].name'"):
        student_cfg(world, tmp_path, [{"name": "x", "epochs": 1, "wieght": 2}])
