"""Run folders: locked while a run is in them, never another run's or a foreign folder, nothing written before the
run is known to start, and resumed only with the settings the run was started with."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from mlkd.errors import NotFound, RunConflict
from mlkd.training.run_folder import RunFolder, config_differences, flatten
from mlkd.training.teacher import TeacherConfig, train_teacher
from mlkd.utils.checkpoint import load_checkpoint
from mlkd.utils.config import load_config, save_config
from mlkd.utils.distributed import DistInfo


def config(teacher_data, out: Path, **extra) -> TeacherConfig:
    return load_config(TeacherConfig, None, teacher_data.overrides(out, **{"optim.epochs": 1, **extra}))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def finished(teacher_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "done"
    train_teacher(config(teacher_data, out))
    return out


def test_resume_refuses_another_dataset_model_or_recipe_and_writes_nothing(teacher_data, finished, tmp_path):
    before = snapshot(finished)
    with pytest.raises(ValueError, match=r"(?s)cannot resume .*model.hidden: 32 -> 64"):
        train_teacher(config(teacher_data, finished, **{"model.hidden": 64}), resume=True, explicit=["model.hidden"])
    with pytest.raises(ValueError, match=r"(?s)optim.lr: 0.01 -> 0.02"):
        train_teacher(config(teacher_data, finished, **{"optim.lr": 0.02}), resume=True)
    other = {"data.train": teacher_data.val, "data.train_proposals": teacher_data.val_proposals}
    with pytest.raises(ValueError, match=r"(?s)data.train: .*train.jsonl' -> .*val.jsonl'.*"
                                         r"dataset.num_images: dataset has 4, the checkpoint has 12"):
        train_teacher(config(teacher_data, finished, **other), resume=True)
    assert snapshot(finished) == before  # config.yaml, log.jsonl, last.pt untouched by the refused resumes


def test_run_only_settings_may_change_and_epochs_only_when_given_explicitly(teacher_data, finished):
    cfg = config(teacher_data, finished, **{"run.progress": "false", "run.log_every": 3, "data.workers": 0})
    assert train_teacher(cfg, resume=True) == finished / "last.pt"  # nothing left to train, nothing refused
    with pytest.raises(ValueError, match=r"optim.epochs: 1 -> 2"):
        train_teacher(config(teacher_data, finished, **{"optim.epochs": 2}), resume=True)


def test_a_second_run_into_a_locked_folder_is_refused_naming_the_first(teacher_data, tmp_path):
    cfg = config(teacher_data, tmp_path / "busy")
    with RunFolder(cfg, False, DistInfo()):
        holder = json.loads((tmp_path / "busy" / ".lock").read_text())
        with pytest.raises(RunConflict, match=rf"run folder .*busy is in use by pid {holder['pid']} on "):
            train_teacher(cfg)
    assert not (tmp_path / "busy").exists()  # the refused run created nothing; the lock left with its holder


def test_a_stale_lock_of_a_dead_process_is_reported_and_taken_over(teacher_data, tmp_path, caplog):
    out = tmp_path / "stale"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": 999_999, "host": "gone", "started": "yesterday"}))
    with caplog.at_level(logging.WARNING, logger="mlkd"):
        train_teacher(config(teacher_data, out))
    assert "a lock left by pid 999999 on gone (since yesterday) was found; that process is gone" in caplog.text
    assert (out / "last.pt").is_file() and not (out / ".lock").exists()


def test_a_foreign_folder_or_another_runs_folder_is_refused_untouched(teacher_data, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(RunConflict, match=r"mine is not empty and is not an mlkd run folder .*notes.txt"):
        train_teacher(config(teacher_data, foreign))
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]

    stopped = tmp_path / "stopped"  # a run that stopped before its first checkpoint: config.yaml only
    stopped.mkdir()
    cfg = config(teacher_data, stopped)
    save_config(cfg, stopped / "config.yaml")
    with pytest.raises(RunConflict, match=r"(?s)stopped holds a run of another config.*model.hidden: 32 -> 16"):
        train_teacher(config(teacher_data, stopped, **{"model.hidden": 16}))
    assert train_teacher(cfg) == stopped / "last.pt"  # the same config starts again from scratch


def test_nothing_to_resume_is_a_clear_error_and_leaves_no_folder(teacher_data, tmp_path):
    with pytest.raises(NotFound, match=r"nothing to resume in .*none: no run was started there .* run the command "
                                       r"without --resume to start it"):
        train_teacher(config(teacher_data, tmp_path / "none"), resume=True)
    assert not (tmp_path / "none").exists()


def test_a_run_stopped_before_its_first_checkpoint_continues_with_or_without_resume(teacher_data, tmp_path):
    """What a kill while the teacher's caches were written leaves (caches, maybe config.yaml, no last.pt) is
    neither 'nothing to resume' nor 'not an mlkd run folder': the same command, with --resume or not, runs it."""
    for resume in (False, True):
        out = tmp_path / f"stopped{resume}"
        (out / "teacher_features" / "shard0").mkdir(parents=True)  # an unfinished store: no meta.json
        (out / "teacher_targets.pt.tmp").write_bytes(b"half a file")
        save_config(config(teacher_data, out), out / "config.yaml")
        with RunFolder(config(teacher_data, out), resume, DistInfo()) as run:
            assert not run.resuming  # nothing to load: it starts from the first epoch
        assert train_teacher(config(teacher_data, out), resume=resume) == out / "last.pt"


def test_a_refused_start_writes_nothing_so_the_corrected_command_runs(teacher_data, tmp_path, monkeypatch):
    from mlkd.utils import device

    monkeypatch.setattr(device, "native_bf16", lambda d: False)  # as on a CPU without native bf16
    out = tmp_path / "refused"
    with pytest.raises(ValueError, match="run.amp=bf16 on a CPU without native bfloat16"):
        train_teacher(config(teacher_data, out, **{"run.amp": "bf16"}))
    assert not out.exists()
    assert train_teacher(config(teacher_data, out, **{"run.amp": "none"})) == out / "last.pt"


def test_a_run_folder_made_read_only_mid_run_reports_the_write_that_failed_not_the_lock(teacher_data, tmp_path,
                                                                                        monkeypatch):
    """The write error is what the user sees; releasing the lock file in a read-only folder must not replace it
    with a traceback of its own (the flock goes with the process; the next run takes a dead process's lock over)."""
    from mlkd.errors import CannotWrite

    real_unlink = Path.unlink

    def read_only(self, *args, **kwargs):
        if self.name == ".lock":
            raise PermissionError(13, "Permission denied", str(self))
        return real_unlink(self, *args, **kwargs)

    with pytest.raises(CannotWrite, match="cannot write checkpoint") as e:
        with RunFolder(config(teacher_data, tmp_path / "ro"), False, DistInfo()):
            monkeypatch.setattr(Path, "unlink", read_only)
            raise CannotWrite("cannot write checkpoint last.pt: Read-only file system")
    assert e.value.__context__ is None


def test_a_torn_last_log_line_is_skipped_on_resume_and_a_damaged_one_named(teacher_data, tmp_path, caplog):
    out = tmp_path / "torn"
    train_teacher(config(teacher_data, out))
    log = out / "log.jsonl"
    good = log.read_text()
    log.write_text(good + '{"type": "iter", "epoch": 1, "itera')  # killed while writing the next line
    with caplog.at_level(logging.WARNING, logger="mlkd"):
        train_teacher(config(teacher_data, out, **{"optim.epochs": 2}), resume=True, explicit=["optim.epochs"])
    assert "skipping a torn last line" in caplog.text
    assert load_checkpoint(out / "last.pt")["train_state"]["epoch"] == 1
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:2] + ["{oops"] + lines[2:]) + "\n")
    with pytest.raises(ValueError, match=rf"{log}:3 is not a JSON record"):
        train_teacher(config(teacher_data, out, **{"optim.epochs": 3}), resume=True, explicit=["optim.epochs"])


def test_config_differences_name_nested_keys():
    assert flatten({"optim": {"lr": 1}, "stages": [{"epochs": 2}], "scales": (1, 2)}) == {
        "optim.lr": 1, "stages[0].epochs": 2, "scales": [1, 2]}
    old = {"run": {"out": "a", "seed": 0}, "stages": [{"epochs": 2, "lr": None}]}
    new = {"run": {"out": "b", "seed": 1}, "stages": [{"epochs": 3, "lr": None}]}
    assert config_differences(old, new) == ["run.seed: 0 -> 1", "stages[0].epochs: 2 -> 3"]
