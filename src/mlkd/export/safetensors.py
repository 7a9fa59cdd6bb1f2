"""A checkpoint's model as a safetensors model folder (``model.safetensors`` + ``config.json``, the folder
:func:`mlkd.load` and every command that takes a checkpoint read), verified by reading it back.

Beside them, ``export.json`` records the export (format, checkpoint, files, the verification) as every export's
does, and ``README.md`` says how to load it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from mlkd.export.folder import RECORD, ExportFolder
from mlkd.export.verify import Check, random_boxes, require, sample_inputs
from mlkd.models.build import model_from_checkpoint
from mlkd.utils.checkpoint import CONFIG, WEIGHTS, read_model_dir, write_atomically, write_model_dir
from mlkd.version import __version__

RELOADED = "mlkd (reloaded from the folder)"  # the runtime that verifies a model folder


def export_model_dir(ckpt: dict[str, Any], checkpoint: str, out: str | Path, images: Sequence[str | Path] = (),
                     overwrite: bool = False) -> tuple[dict[str, Any], list[Check]]:
    """The model as a folder (``model.safetensors`` + ``config.json``, see :mod:`mlkd.utils.checkpoint`),
    verified by reading it back: its outputs must equal the checkpoint's bit for bit. ``out`` must not exist, be
    empty or hold the safetensors export of ``checkpoint`` (the path the checkpoint was read from), unless
    ``overwrite`` (:class:`~mlkd.export.folder.ExportFolder`)."""
    with ExportFolder(out, "safetensors", checkpoint, overwrite) as folder:
        info, checks = write_model_folder(ckpt, checkpoint, folder.stage, folder.out.name, images)
        folder.commit()
    require(checks, RELOADED, folder.out)
    return info, checks


@torch.no_grad()
def write_model_folder(ckpt: dict[str, Any], checkpoint: str, where: Path, name: str,
                       images: Sequence[str | Path] = ()) -> tuple[dict[str, Any], list[Check]]:
    """Write the model folder's files into ``where`` (the staging folder of the export folder ``name``) and read
    them back; the export record and the checks (not yet required to pass)."""
    write_model_dir(ckpt, where)
    original, loaded = model_from_checkpoint(ckpt), model_from_checkpoint(read_model_dir(where))
    size = ckpt["inference"]["image_size"]
    names, x = sample_inputs(size, ckpt["input_convention"], images)
    if ckpt["kind"] == "student":
        pairs = [("logits", original(x), loaded(x))]
    else:
        boxes, scores = random_boxes(32, size, seed=0)
        a, b = (m(x, [boxes] * len(x), [scores] * len(x)) for m in (original, loaded))
        pairs = [(key, join([r[key] for r in a]), join([r[key] for r in b]))
                 for key, join in (("image_scores", torch.stack), ("region_scores", torch.cat))]
    checks = [Check(name, float((p - q).abs().max()), 0.0, "max |model folder - checkpoint|") for name, p, q in pairs]
    info = {"format": "safetensors", "kind": ckpt["kind"], "mlkd_version": __version__, "checkpoint": checkpoint,
            "files": {"weights": WEIGHTS, "config": CONFIG}, "classes": list(ckpt["classes"]),
            "verification": {"runtime": RELOADED, "images": names,
                             "checks": [{"output": c.name, "max_abs_diff": c.max_abs_diff, "allowed": c.allowed,
                                         "passed": c.passed} for c in checks]}}
    readme = (f"# mlkd {ckpt['kind']}\n\nFrom `{checkpoint}` (mlkd {__version__}), {len(ckpt['classes'])} classes."
              f"\n\n```python\nimport mlkd\nmodel = mlkd.load(\"{name}\")\n```\n\nWeights in `{WEIGHTS}` "
              f"(safetensors: no code runs when they are read), everything else in `{CONFIG}`.\n")
    write_atomically(where / "README.md", lambda f: f.write(readme.encode()), "model README")
    write_atomically(where / RECORD, lambda f: f.write((json.dumps(info, indent=2) + "\n").encode()), "export record")
    return info, checks
