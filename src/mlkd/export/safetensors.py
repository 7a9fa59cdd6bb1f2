"""A checkpoint's model as a safetensors model folder (``model.safetensors`` + ``config.json``, the folder
:func:`mlkd.load` and every command that takes a checkpoint read), verified by reading it back."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from mlkd.export.verify import Check, random_boxes, require, sample_inputs
from mlkd.models.build import model_from_checkpoint
from mlkd.utils.checkpoint import CONFIG, WEIGHTS, read_model_dir, write_model_dir
from mlkd.version import __version__


@torch.no_grad()
def export_model_dir(ckpt: dict[str, Any], checkpoint: str, out: Path, images: Sequence[str | Path] = ()
                     ) -> tuple[dict[str, Any], list[Check]]:
    """The model as a folder (``model.safetensors`` + ``config.json``, see :mod:`mlkd.utils.checkpoint`),
    verified by reading it back: its outputs must equal the checkpoint's bit for bit."""
    write_model_dir(ckpt, out)
    original, loaded = model_from_checkpoint(ckpt), model_from_checkpoint(read_model_dir(out))
    size = ckpt["inference"]["image_size"]
    names, x = sample_inputs(size, ckpt["input_convention"], images)
    if ckpt["kind"] == "student":
        pairs = [("logits", original(x), loaded(x))]
    else:
        boxes, scores = random_boxes(32, size, seed=0)
        a, b = (m(x, [boxes] * len(x), [scores] * len(x)) for m in (original, loaded))
        pairs = [("image_scores", torch.stack([r["image_scores"] for r in a]), torch.stack([r["image_scores"] for r in b])),
                 ("region_scores", torch.cat([r["region_scores"] for r in a]), torch.cat([r["region_scores"] for r in b]))]
    checks = [Check(name, float((p - q).abs().max()), 0.0, "max |model folder - checkpoint|") for name, p, q in pairs]
    info = {"format": "safetensors", "kind": ckpt["kind"], "mlkd_version": __version__, "checkpoint": checkpoint,
            "files": {"weights": WEIGHTS, "config": CONFIG}, "classes": list(ckpt["classes"]),
            "verification": {"runtime": "mlkd (reloaded from the folder)", "images": names,
                             "checks": [{"output": c.name, "max_abs_diff": c.max_abs_diff, "allowed": c.allowed,
                                         "passed": c.passed} for c in checks]}}
    require(checks, "mlkd (reloaded from the folder)", out)
    (out / "README.md").write_text(f"# mlkd {ckpt['kind']}\n\nFrom `{checkpoint}` (mlkd {__version__}), "
                                   f"{len(ckpt['classes'])} classes.\n\n```python\nimport mlkd\nmodel = "
                                   f"mlkd.load(\"{out.name}\")\n```\n\nWeights in `{WEIGHTS}` (safetensors: no "
                                   f"code runs when they are read), everything else in `{CONFIG}`.\n")
    return info, checks
