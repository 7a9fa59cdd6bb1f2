"""The run folder of a training run: checked and locked before anything is written, written only once the run is
known to start, and resumed only with the settings it was started with.

- :class:`RunFolder` refuses a folder that is not this run's (a foreign folder, or one holding a run of another
  config), refuses to overwrite a finished or interrupted run unless resuming, and holds an exclusive lock
  (``RUN/.lock`` with the pid, host and start time, locked with ``flock``, which the kernel releases when the
  process dies): a second run into the same folder is refused naming the first; a lock left by a dead process
  is reported and taken over.
- Every interruption can be continued by the same command: a run killed after a checkpoint continues with
  ``--resume``; one killed before its first checkpoint (while the teacher's caches were written, say) starts
  again from the first epoch, with or without ``--resume``, reusing whatever cache was finished; a start that
  was refused (a bad setting) writes nothing, so the corrected command runs.
- :func:`check_resume` compares a checkpoint with the run that wants to continue it: a changed dataset, model or
  recipe is refused naming every differing field, except the epochs of a run given explicitly with ``--set``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Sequence

from mlkd.data.base import DatasetIdentity
from mlkd.errors import BadInput, NotFound, RunConflict
from mlkd.utils.checkpoint import load_checkpoint
from mlkd.utils.config import read_yaml, save_config, to_dict
from mlkd.utils.distributed import DistInfo, broadcast
from mlkd.utils.runlog import RunLog

logger = logging.getLogger(__name__)

LOCK = ".lock"
# what a run writes before its first checkpoint (and what a kill can leave of it): a folder holding only these may
# be restarted from scratch
RUN_FILES = {"config.yaml", "config.yaml.tmp", "log.jsonl", "curves.png", "tensorboard", LOCK, "last.pt.tmp",
             "teacher_targets.pt", "teacher_targets.pt.tmp", "teacher_features"}
# settings that do not change what a run computes: they may differ when it resumes
RUN_ONLY = ("run.out", "run.progress", "run.log_every", "run.eval_every", "run.threads", "run.device",
            "run.tensorboard", "data.workers", "data.val", "data.val_proposals", "data.image_cache_mb")
# settings that may differ on resume when the user gives them explicitly (--set): extending a run
EXTENDABLE = {"optim.epochs": "optim.epochs", "stages": ".epochs"}


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1}, "stages": [{"epochs": 2}]}`` -> ``{"optim.lr": 1, "stages[0].epochs": 2}``."""
    if isinstance(config, dict):
        return {k: v for key, value in config.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    if isinstance(config, (list, tuple)) and config and all(isinstance(x, dict) for x in config):
        return {k: v for i, x in enumerate(config) for k, v in flatten(x, f"{prefix[:-1]}[{i}].").items()}
    return {prefix[:-1]: list(config) if isinstance(config, tuple) else config}


def config_differences(old: dict[str, Any], new: dict[str, Any], ignore: Sequence[str] = RUN_ONLY) -> list[str]:
    """``key: old -> new`` for every setting that differs, apart from ``ignore``."""
    a, b = flatten(old), flatten(new)
    return [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and k not in ignore]


def _ignored(cfg: Any) -> tuple[str, ...]:
    """Keys that may differ between a run and its continuation: the run-only settings and the keys that older mlkd
    wrote but the config no longer has (``RETIRED``)."""
    return RUN_ONLY + tuple(getattr(cfg, "RETIRED", ()))


def check_resume(ckpt: dict[str, Any], cfg: Any, identity: DatasetIdentity, where: Path,
                 explicit: Sequence[str] = ()) -> None:
    """Refuse to continue ``ckpt`` with another dataset, model or recipe (``cfg``), naming every difference.

    ``explicit`` are the keys the user set on the command line (``--set optim.epochs=30``); of those, the epochs
    (``optim.epochs``, and the ``epochs`` of each stage when ``stages`` is given) may change, to extend a run.
    """
    allowed = [k for k, suffix in EXTENDABLE.items() if k in explicit]
    diffs = [d for d in config_differences(ckpt.get("config") or {}, to_dict(cfg), _ignored(cfg))
             if not any(d.startswith(k) and d.split(":")[0].endswith(EXTENDABLE[k]) for k in allowed)]
    if ckpt.get("dataset"):
        saved = DatasetIdentity.from_dict(ckpt["dataset"])
        fields = [f for f in DatasetIdentity.FIELDS if getattr(saved, f) is not None]
        diffs += [f"dataset.{line}" for line in identity.differences(saved, "the checkpoint", fields)]
    if diffs:
        raise BadInput(f"cannot resume {where}: it was started with other settings (checkpoint -> now):\n  "
                       + "\n  ".join(diffs) + "\nResume with the run's own config; to extend a run give the new "
                       "epochs with --set (optim.epochs=N, or stages=[...] with only their epochs changed)")


class RunFolder:
    """``cfg.run.out`` for one run (see the module docstring); use as a context manager. Only rank 0 checks,
    locks and writes."""

    def __init__(self, cfg: Any, resume: bool, info: DistInfo) -> None:
        self.cfg, self.resume, self.info = cfg, resume, info
        self.out = Path(cfg.run.out)
        self._fd: int | None = None
        self._created = False
        self.resuming = False  # continuing from last.pt (decided by rank 0 when entering, told to every rank)
        self.log: RunLog | None = None  # opened by start()

    def __enter__(self) -> "RunFolder":
        if self.info.is_main:
            try:
                self._lock()
                self._check()
            except BaseException:
                self.close()
                raise
        self.resuming = broadcast(self.resuming, self.info)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- checks ---------------------------------------------------------------------------------------------
    def _check(self) -> None:
        checkpoint = (self.out / "last.pt").is_file()
        if checkpoint and not self.resume:
            raise RunConflict(f"{self.out} already holds a run (last.pt): continue it with the same command and "
                              "--resume, or choose another run.out")
        self.resuming = checkpoint
        if checkpoint:
            return
        foreign = sorted(p.name for p in self.out.iterdir() if p.name not in RUN_FILES)
        if foreign:
            raise RunConflict(f"{self.out} is not empty and is not an mlkd run folder (it holds {foreign[:5]}); "
                              "choose another run.out")
        started = any(p.name != LOCK for p in self.out.iterdir())
        if self.resume and not started:
            raise NotFound(f"nothing to resume in {self.out}: no run was started there (no last.pt, config.yaml or "
                           "teacher caches); run the command without --resume to start it")
        if self.resume:
            logger.info(f"{self.out}: the run stopped before its first checkpoint; starting it from the first epoch "
                        "(finished teacher caches are reused)")
        if (self.out / "config.yaml").is_file():  # a run that stopped before its first checkpoint
            diffs = config_differences(read_yaml(self.out / "config.yaml"), to_dict(self.cfg), _ignored(self.cfg))
            if diffs:
                raise RunConflict(f"{self.out} holds a run of another config (config.yaml -> now):\n  "
                                  + "\n  ".join(diffs) + "\nremove the folder or choose another run.out")

    # -- the lock -------------------------------------------------------------------------------------------
    def _lock(self) -> None:
        if self.out.exists() and not self.out.is_dir():
            raise RunConflict(f"run.out {self.out} is a file, not a folder")
        self._created = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunConflict(f"run folder {self.out} is in use by {holder}; wait for that run to end or choose "
                              "another run.out") from None
        stale = _read_holder(fd)
        if stale != "an unknown process":
            logger.warning(f"run folder {self.out}: a lock left by {stale} was found; that process is gone, "
                           "taking the folder over")
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self._fd = fd

    def close(self) -> None:
        """Release the lock (and remove the folder if this run created it and wrote nothing)."""
        if self._fd is not None:
            try:
                (self.out / LOCK).unlink(missing_ok=True)
            except OSError:  # a folder made read-only mid-run: the flock goes with the descriptor, the next run
                pass  # finds a lock file of a dead process and takes the folder over
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if self._created and self.out.is_dir() and not any(self.out.iterdir()):
            self.out.rmdir()
            self._created = False

    def restore(self, model: Any, kind: str, identity: DatasetIdentity, explicit: Sequence[str] = ()
                ) -> dict[str, Any] | None:
        """When resuming: ``last.pt`` checked against this run (:func:`check_resume`) and its weights loaded into
        ``model``; the checkpoint (its ``train_state`` continues the loop). None for a run that starts afresh."""
        if not self.resuming:
            return None
        state = load_checkpoint(self.out / "last.pt", kind)
        check_resume(state, self.cfg, identity, self.out, explicit)
        model.load_state_dict(state["model"])
        return state

    # -- starting -------------------------------------------------------------------------------------------
    def start(self, resume_epoch: int | None) -> RunLog:
        """Write ``config.yaml`` and open the log: called once everything the run needs has been checked."""
        if self.info.is_main:
            save_config(self.cfg, self.out / "config.yaml")
            self._created = False
        self.log = RunLog(self.out, enabled=self.info.is_main, resume_epoch=resume_epoch,
                          tensorboard=self.cfg.run.tensorboard)
        return self.log


def _read_holder(fd: int) -> str:
    """Who wrote the lock file: "pid N on HOST (since T)", or "an unknown process" when it is empty."""
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        info = json.loads(os.read(fd, 4096).decode() or "{}")
        return f"pid {info['pid']} on {info['host']} (since {info['started']})"
    except (ValueError, KeyError):
        return "an unknown process"
