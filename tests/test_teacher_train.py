"""Training the teacher (mlkd.training.teacher.train_teacher): exact resume, non-finite losses, DDP over 2 CPU processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, DistributedSampler

import mlkd
from mlkd.errors import RunStopped
from mlkd.models.build import build_teacher
import mlkd.models.wsddn
import mlkd.training.teacher
from mlkd.training.teacher import TeacherConfig, train_teacher
from mlkd.utils.checkpoint import load_checkpoint
from mlkd.utils.config import apply_overrides, load_config


def config(teacher_data, out: Path, **extra) -> TeacherConfig:
    return load_config(TeacherConfig, None, teacher_data.overrides(out, **extra))


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def assert_same_tensors(a, b, exact: bool = True) -> None:
    """Equal nested state (dicts / lists of tensors and numbers)."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b) if exact else torch.allclose(a, b, rtol=1e-4, atol=1e-6), (a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_tensors(a[k], b[k], exact)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tensors(x, y, exact)
    else:
        assert a == b


def test_resume_is_bit_identical_to_an_uninterrupted_run(teacher_data, tmp_path):
    """Dropout, flips, multi-scale and shuffling all draw random numbers; per-epoch reseeding makes a run that
    stopped after epoch 1 and resumed end with exactly the weights and optimizer state of one that did not."""
    extra = {"data.val": teacher_data.val, "data.val_proposals": teacher_data.val_proposals}
    full = torch.load(train_teacher(config(teacher_data, tmp_path / "full", **extra)), weights_only=True)

    part = tmp_path / "part"
    train_teacher(config(teacher_data, part, **{**extra, "optim.epochs": 1}))
    first = load_checkpoint(part / "last.pt", "teacher")
    assert first["train_state"]["epoch"] == 0 and first["train_state"]["optimizer"]["state"]  # momentum buffers
    with (part / "log.jsonl").open("a") as f:  # written by the interrupted run after its last checkpoint
        f.write(json.dumps({"type": "epoch", "epoch": 1, "train_loss_cls": 9.0}) + "\n")
    with pytest.raises(ValueError, match="already holds a run .*continue it with the same command and --resume"):
        train_teacher(config(teacher_data, part, **extra))
    with pytest.raises(ValueError, match=r"(?s)cannot resume .*part: it was started with other settings.*"
                                         r"optim.epochs: 1 -> 3"):
        train_teacher(config(teacher_data, part, **extra), resume=True)  # extending needs an explicit epochs
    resumed = torch.load(train_teacher(config(teacher_data, part, **extra), resume=True, explicit=["optim.epochs"]),
                         weights_only=True)

    done, ref = resumed["train_state"], full["train_state"]
    assert done["epoch"] == ref["epoch"] == 2 and done["stage"] == 0 and done["stage_epoch"] == 2
    assert_same_tensors(resumed["model"], full["model"])
    assert_same_tensors(done["optimizer"], ref["optimizer"])
    assert done["scheduler"]["last_epoch"] == 3 and done["scheduler"] == ref["scheduler"]
    assert not torch.equal(first["model"]["fc8_d.weight"], resumed["model"]["fc8_d.weight"])  # it did train

    logs = {name: records(tmp_path / name) for name in ("full", "part")}
    epochs = [[r for r in logs[n] if r["type"] == "epoch"] for n in ("full", "part")]
    assert [r["epoch"] for r in epochs[1]] == [0, 1, 2]  # no duplicate, the stale epoch-1 record dropped
    assert epochs[0] == epochs[1]  # same losses, same val_mAP
    assert "val_mAP" in epochs[1][0]
    iters = [r["iteration"] for r in logs["part"] if r["type"] == "iter"]
    assert iters == sorted(set(iters)) == list(range(3 * 6))  # 12 images, batch 2, log_every 1
    assert (tmp_path / "part" / "curves.png").is_file() and (tmp_path / "part" / "config.yaml").is_file()
    assert resumed["classes"] == full["classes"] and resumed["kind"] == "teacher"


def test_resume_without_a_checkpoint_is_an_error(teacher_data, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing to resume in .*: no run was started there"):
        train_teacher(config(teacher_data, tmp_path / "none"), resume=True)


def test_non_finite_loss_stops_with_the_loss_dict_and_the_last_good_checkpoint(teacher_data, tmp_path,
                                                                               monkeypatch):
    real, calls = mlkd.models.wsddn.wsddn_loss, []

    def nan_from(n: int):
        def loss(*args):
            calls.append(1)
            return real(*args) * (float("nan") if len(calls) >= n else 1.0)
        return loss

    monkeypatch.setattr(mlkd.models.wsddn, "wsddn_loss", nan_from(3))
    # log lines at iterations 1 and 5: the NaN of iteration 3 is found at the second one and named exactly
    cfg = config(teacher_data, tmp_path / "nan", **{"model.reg_weight": 0.1, "run.log_every": 4})
    with pytest.raises(FloatingPointError, match=r"non-finite loss at epoch 1, iteration 3: \{'loss_cls': nan, "
                                                 r"'loss_reg': [0-9.e-]+\} \(stage 'wsddn'\)\. No checkpoint was "
                                                 r"written yet"):
        train_teacher(cfg)
    assert not (tmp_path / "nan" / "last.pt").exists()
    calls.clear()
    monkeypatch.setattr(mlkd.models.wsddn, "wsddn_loss", nan_from(8))  # 6 iterations per epoch: epoch 2
    with pytest.raises(RunStopped, match=r"(?s)epoch 2, iteration 2.*last good checkpoint is .*last.pt \(after "
                                         r"epoch 1\).*--resume"):
        train_teacher(config(teacher_data, tmp_path / "nan2"))


def ddp_equivalent_loader(dataset, batch_size, workers, collate_fn, *, train, seed=0, rank=0, world_size=1):
    """The order DDP uses, in one process: DistributedSampler over 1 replica draws the same permutation
    (seed + epoch) that 2 replicas split as rank r <- positions r, r + 2, r + 4, ...; so step s of the 2-process
    run (rank 0: perm[2s], rank 1: perm[2s + 1]) is batch s of this loader with batch_size 2."""
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=train, seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_fn)


def test_ddp_two_cpu_processes_equal_one_process_with_the_doubled_batch(teacher_data, tmp_path, monkeypatch):
    """torchrun, gloo, 2 processes x batch 1 vs 1 process x batch 2 over the same image pairs per step: DDP
    averages the two gradients, the batch loss averages the two images' losses, so the weights agree (up to
    float summation order). Needs dropout 0, no flip and one scale: their random draws differ per process."""
    same = {"model.dropout": 0.0, "data.flip": "false", "data.scales": "[80]", "optim.epochs": 1, "optim.lr": 0.05}
    cfg_file = tmp_path / "ddp.yaml"
    cfg_file.write_text(yaml.safe_dump(apply_overrides({}, teacher_data.overrides(tmp_path / "ddp", **same))))
    src = str(Path(mlkd.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mlkd",
           "train-teacher", "--config", str(cfg_file), "--set", "data.batch_size=1", "--set", "run.log_every=1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    out = tmp_path / "ddp"
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "curves.png", "last.pt", "log.jsonl"]
    assert proc.stdout.count("teacher checkpoint:") == 2 and proc.stdout.count("epoch 0 ") == 1  # rank 0 logs
    logged = records(out)
    assert [r["iteration"] for r in logged if r["type"] == "iter"] == list(range(6))  # 12 images / 2 ranks
    assert [r["epoch"] for r in logged if r["type"] == "epoch"] == [0]
    ddp = load_checkpoint(out / "last.pt", "teacher")
    assert load_config(TeacherConfig, out / "config.yaml").data.batch_size == 1

    monkeypatch.setattr(mlkd.training.teacher, "make_loader", ddp_equivalent_loader)
    cfg = config(teacher_data, tmp_path / "single", **same)
    single = torch.load(train_teacher(cfg), weights_only=True)
    assert len([r for r in records(tmp_path / "single") if r["type"] == "iter"]) == 6
    torch.manual_seed(cfg.run.seed)  # the initial weights, as _train draws them
    start = build_teacher(cfg.model, len(single["classes"])).state_dict()
    assert (single["model"]["fc8_c.weight"] - start["fc8_c.weight"]).abs().max() > 1e-2  # it trained
    assert_same_tensors(ddp["model"], single["model"], exact=False)
    assert_same_tensors(ddp["train_state"]["optimizer"]["state"], single["train_state"]["optimizer"]["state"],
                        exact=False)


def test_tensorboard_scalars_equal_the_log(teacher_data, tmp_path):
    out = tmp_path / "tb"
    train_teacher(config(teacher_data, out, **{"optim.epochs": 2, "run.tensorboard": "true"}))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    logged = records(out)
    iters = [r for r in logged if r["type"] == "iter"]
    board = events.Scalars("iter/loss_cls")
    assert [e.step for e in board] == [r["iteration"] for r in iters]
    assert [e.value for e in board] == pytest.approx([r["loss_cls"] for r in iters], rel=1e-6)
    epochs = [r for r in logged if r["type"] == "epoch"]
    assert [e.value for e in events.Scalars("epoch/train_loss_cls")] == pytest.approx(
        [r["train_loss_cls"] for r in epochs], rel=1e-6)
    assert [e.step for e in events.Scalars("iter/lr")] == [r["iteration"] for r in iters]
