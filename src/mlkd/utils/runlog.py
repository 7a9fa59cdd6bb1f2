"""A run's log: JSON lines (one record per logged iteration and per epoch), a training-curve PNG, and optionally
the same scalars for TensorBoard (``run.tensorboard: true``, the ``[tensorboard]`` extra)."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from mlkd.errors import BadInput
from mlkd.utils.figure import agg_figure
from mlkd.utils.optional import optional_import

logger = logging.getLogger(__name__)


class RunLog:
    """Appends records to ``RUN/log.jsonl`` (kept across resumes) and draws ``RUN/curves.png`` from it.

    On resume, records of epochs after the checkpoint's (written before the interruption) are dropped, so the
    log matches the run that the checkpoint continues. With ``tensorboard`` every numeric field of a record is
    also a TensorBoard scalar in ``RUN/tensorboard/`` (iteration records by iteration, epoch records by epoch).
    """

    def __init__(self, out: str | Path, enabled: bool = True, resume_epoch: int | None = None,
                 tensorboard: bool = False) -> None:
        self.path = Path(out) / "log.jsonl"
        self.enabled = enabled
        self._plotted = -float("inf")  # when curves.png was last drawn (time.monotonic)
        self.board = None
        if enabled and tensorboard:
            writer = optional_import("torch.utils.tensorboard", "tensorboard", "run.tensorboard").SummaryWriter
            self.board = writer(str(Path(out) / "tensorboard"))
        if enabled and resume_epoch is not None and self.path.is_file():
            kept = [line for line, record in self._read() if record.get("epoch", -1) <= resume_epoch]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif enabled and resume_epoch is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if self.board is not None:
            step = record["iteration"] if record.get("type") == "iter" else record.get("epoch", 0)
            prefix = "iter/" if record.get("type") == "iter" else "epoch/"
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("epoch", "iteration"):
                    self.board.add_scalar(prefix + key, value, step)
            self.board.flush()

    def records(self) -> list[dict[str, Any]]:
        return [record for _, record in self._read()]

    def _read(self) -> list[tuple[str, dict[str, Any]]]:
        """``(line, record)`` pairs. A torn last line (the process was killed while writing it) is skipped with a
        warning; a bad line elsewhere is an error naming the file and line."""
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        out = []
        for n, line in enumerate(lines, start=1):
            try:
                out.append((line, json.loads(line)))
            except json.JSONDecodeError as e:
                if n < len(lines):
                    raise BadInput(f"{self.path}:{n} is not a JSON record ({e}); the run log is damaged") from e
                logger.warning(f"{self.path}:{n}: skipping a torn last line (the run was interrupted while "
                               f"writing it)")
        return out

    def plot(self, every: float = 0.0) -> Path | None:
        """Loss curves per iteration, learning rate, and any per-epoch metrics: ``RUN/curves.png``. With ``every``
        (seconds), only when the last drawing is older than that: drawing takes about 0.4 s, which was 10 % of a
        small model's epoch when it was redrawn after every one."""
        if not self.enabled or time.monotonic() - self._plotted < every:
            return None
        self._plotted = time.monotonic()
        recs = self.records()
        steps = [r for r in recs if r.get("type") == "iter"]
        epochs = [r for r in recs if r.get("type") == "epoch"]
        fig = agg_figure(figsize=(15, 4))
        axes = fig.subplots(1, 3)
        for key in sorted({k for r in steps for k in r if k.startswith("loss")}):
            pts = [(r["iteration"], r[key]) for r in steps if key in r and math.isfinite(r[key])]
            if pts:
                axes[0].plot(*zip(*pts), label=key)
        axes[0].set(xlabel="iteration", ylabel="loss", title="training losses")
        axes[1].plot([r["iteration"] for r in steps], [r["lr"] for r in steps])
        axes[1].set(xlabel="iteration", ylabel="learning rate", title="learning rate", yscale="log")
        for key in sorted({k for r in epochs for k in r if k.startswith("val_")}):
            pts = [(r["epoch"] + 1, r[key]) for r in epochs if r.get(key) is not None]
            if pts:
                axes[2].plot(*zip(*pts), marker="o", label=key)
        axes[2].set(xlabel="epoch", title="held-out metrics")
        for ax, where in ((axes[0], "upper right"), (axes[2], "lower right")):
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc=where, fontsize=8)
        fig.tight_layout()
        out = self.path.with_name("curves.png")
        fig.savefig(out, dpi=80)
        return out
