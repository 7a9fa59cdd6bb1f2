"""Telling the user whether distillation helped: the held-out mAP after every stage of a student run, a stage
that made it worse, and the gain over a baseline (the same student trained without distillation).

The student's recipe calls :class:`StageReport` after each stage and :meth:`StageReport.finish` at the end. The
results go to ``RUN/log.jsonl`` (records of type ``stage`` and ``summary``), to ``RUN/kd_report.json`` and to the
console; the student of every stage but the last is kept as ``RUN/stage<i>_<name>.pt``. The baseline is
``distill.baseline``: a checkpoint or run folder, or ``auto``: a finished student run beside this one (a sibling
folder) with the same model config and training set and no distilling stage.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Callable

from mlkd.data.base import check_class_order
from mlkd.distill.config import saved_stages
from mlkd.errors import BadInput, MlkdError, NotFound
from mlkd.models.build import model_from_checkpoint
from mlkd.utils.checkpoint import load_checkpoint
from mlkd.utils.runlog import RunLog

logger = logging.getLogger(__name__)


def distils(config: dict[str, Any]) -> bool:
    """Whether a (resolved, saved) student config has a stage that learns from the teacher."""
    return any(stage.distils for stage in saved_stages(config))


def find_baseline(out: Path, model_config: dict[str, Any], dataset: dict[str, Any]) -> Path | None:
    """A finished student run beside ``out`` with the same model config and training set and no distillation."""
    found = []
    for folder in sorted(out.parent.iterdir()) if out.parent.is_dir() else []:
        path = folder / "last.pt"
        if folder == out or not path.is_file():
            continue
        try:
            ckpt = load_checkpoint(path)
        except MlkdError:
            continue
        config, state = ckpt.get("config") or {}, ckpt["train_state"]
        total = sum(s.get("epochs", 0) for s in config.get("stages", []))
        if (ckpt["kind"] == "student" and not distils(config) and state is not None and state["epoch"] + 1 == total
                and ckpt["model_config"] == model_config and ckpt.get("dataset") == dataset):
            found.append(path)
    return found[0] if found else None


class StageReport:
    """Held-out mAP per stage (the ``val_mAP`` of each stage's last epoch record) and the comparison with a
    baseline."""

    def __init__(self, out: Path, log: RunLog, num_stages: int) -> None:
        self.out, self.log, self.num_stages = out, log, num_stages
        previous = log.records() if log.enabled and log.path.is_file() else []
        self.results = [(r["stage"], r["val_mAP"]) for r in previous if r.get("type") == "stage"]  # on resume

    def stage_end(self, index: int, name: str, record: dict[str, Any] | None) -> None:
        """Measure and log the held-out mAP after stage ``index``; keep that stage's student."""
        if index < self.num_stages - 1:
            shutil.copyfile(self.out / "last.pt", self.out / f"stage{index}_{name}.pt")
        if record is None or "val_mAP" not in record or len(self.results) > index:  # no held-out split, or
            return  # measured before a resume
        value = record["val_mAP"]
        entry: dict[str, Any] = {"type": "stage", "index": index, "stage": name, "val_mAP": value}
        if self.results and value < self.results[-1][1]:
            entry["worse_than_previous"] = self.results[-1][1] - value
            logger.warning(f"stage {name!r} made the held-out mAP worse: {100 * self.results[-1][1]:.2f} after "
                           f"stage {self.results[-1][0]!r} -> {100 * value:.2f}")
        self.results.append((name, value))
        self.log.write(entry)
        logger.info(f"held-out mAP after stage {name!r}: {100 * value:.2f}")

    def finish(self, baseline: Path | None, baseline_mAP: float | None) -> dict[str, Any]:
        """The run's summary: stages, worse stages, baseline and gain; logged, written and returned."""
        worse = [name for (name, value), (_, before) in zip(self.results[1:], self.results) if value < before]
        summary: dict[str, Any] = {"type": "summary", "stages": [{"stage": n, "val_mAP": v} for n, v in self.results],
                                   "worse_stages": worse, "baseline": None if baseline is None else str(baseline),
                                   "baseline_val_mAP": baseline_mAP}
        if baseline_mAP is not None and self.results:
            summary["gain_over_baseline"] = self.results[-1][1] - baseline_mAP
            gain = 100 * summary["gain_over_baseline"]
            message = (f"distillation gain over the baseline {baseline}: {gain:+.2f} mAP "
                       f"({100 * baseline_mAP:.2f} -> {100 * self.results[-1][1]:.2f})")
            (logger.warning if gain < 0 else logger.info)(("the distilled student is WORSE than its baseline: "
                                                           if gain < 0 else "") + message)
        elif self.results:
            logger.info("no baseline to compare with (distill.baseline: a student run without distillation)")
        if worse:
            logger.warning(f"stage(s) {worse} made the held-out mAP worse than the stage before (see log.jsonl)")
        self.log.write(summary)
        (self.out / "kd_report.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def check_baseline(given: str | None, classes: list[str]) -> Path | None:
    """The checkpoint of ``distill.baseline`` when it names one (None for ``null`` and ``auto``), checked before the
    first step: it exists, holds a student of the same classes, trained without distillation."""
    if given is None or given == "auto":
        return None
    path = Path(given) / "last.pt" if Path(given).is_dir() else Path(given)
    if not path.is_file():
        raise NotFound(f"distill.baseline {given}: no such checkpoint, nor a run folder holding a last.pt; give the "
                       "student trained without distillation, auto (a finished sibling run) or null")
    ckpt = load_checkpoint(path)
    if ckpt["kind"] != "student":
        raise BadInput(f"distill.baseline {path} holds a {ckpt['kind']}, not a student; give the student trained "
                       "without distillation")
    check_class_order(classes, ckpt["classes"], f"distill.baseline {path}")
    if distils(ckpt.get("config") or {}):
        raise BadInput(f"distill.baseline {path} was trained with distillation; give a student trained on labels only")
    return path


def baseline_map(path: Path, classes: list[str], measure: Callable[[Any], float]) -> float:
    """The held-out mAP of the baseline student at ``path`` (``measure(model)`` evaluates a student)."""
    ckpt = load_checkpoint(path, "student")
    check_class_order(classes, ckpt["classes"], f"baseline {path}")
    if distils(ckpt.get("config") or {}):
        raise BadInput(f"baseline {path} was trained with distillation; give a student trained on labels only")
    return measure(model_from_checkpoint(ckpt))
