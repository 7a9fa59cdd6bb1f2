"""``mlkd export``: a checkpoint's model as Caffe files, ONNX or a safetensors model folder, verified before it
is done (Caffe and ONNX by another runtime, the model folder by reading it back).

- Student, ``caffe``: deploy prototxt + caffemodel with the release's layer names (conv1_1 ... pool5, fc6, fc7,
  the classifier ``fc8`` or ``--classifier-name``, a Sigmoid ``prob``), checked with OpenCV's DNN module. Only the
  VGG head is expressible with the VGG converter (:mod:`mlkd.export.caffe.vgg`); ResNet students are refused.
- Student, ``onnx``: ``images`` -> ``logits``, ``probabilities`` (see :mod:`mlkd.export.onnx`), checked with
  onnxruntime; with ``--int8`` also ``student_int8.onnx`` (:mod:`mlkd.export.quantize`), calibrated on training
  images and held to :data:`~mlkd.export.quantize.INT8_TOLERANCE` of the float32 probabilities.
- Teacher, ``caffe``: every layer of the release's teacher network but the RoI generation and pooling (see
  :mod:`mlkd.export.caffe.wsddn`), checked with OpenCV on regions pooled by PyTorch, plus a weight round trip
  through the importer. VGG-style teachers (fc6/fc7 head) only: a resnet50_c4 teacher is refused.
- Teacher or student, ``safetensors``: the folder :func:`mlkd.load` reads
  (:func:`mlkd.utils.checkpoint.write_model_dir`).

Each Caffe / ONNX export writes ``export.json`` (machine-readable) and ``README.md`` beside the model files: the input
convention (channel order, scale, mean, std, size), the outputs' meaning and the verification's numbers.

The output folder is checked before the checkpoint is read: a new or empty folder, or this checkpoint's export in
this format; anything else only with ``overwrite`` (:class:`~mlkd.export.folder.ExportFolder`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from mlkd.errors import BadInput
from mlkd.export.folder import ExportFolder
from mlkd.export.onnx import check_opset, export_onnx, run_onnx, runtime_name
from mlkd.export.quantize import INT8_TOLERANCE, checkpoint_calibration_batches, deploy_model, quantize_student
from mlkd.export.safetensors import RELOADED, write_model_folder
from mlkd.export.verify import Check, compare, describe_input, require, sample_inputs
from mlkd.models.build import model_from_checkpoint
from mlkd.utils.checkpoint import load_checkpoint, write_atomically
from mlkd.utils.optional import optional_import
from mlkd.version import __version__

FORMATS = ("caffe", "onnx", "safetensors")


# -- student ----------------------------------------------------------------------------------------
def export_student_onnx(student: nn.Module, out: Path, image_size: int, opset: int, tolerance: float,
                        x: torch.Tensor, int8_calibration: Iterable[np.ndarray] | None = None) -> dict[str, Any]:
    """Write ``student.onnx`` and check it with onnxruntime (on a batch other than the traced one); with
    ``int8_calibration`` (normalised batches of training images) also ``student_int8.onnx``, whose
    probabilities must stay within :data:`INT8_TOLERANCE` of PyTorch's on the calibration images."""
    path = out / "student.onnx"
    export_onnx(deploy_model(student, image_size), path, image_size, opset)
    got = run_onnx(path, x)
    with torch.no_grad():
        ref = student(x)
    scale = float(ref.abs().max())
    checks = [compare("logits", got["logits"], ref, tolerance),
              compare("probabilities", got["probabilities"], torch.sigmoid(ref), tolerance, scale)]
    files, notes = {"onnx": path.name}, []
    if int8_calibration is not None:
        batches = list(int8_calibration)
        int8 = quantize_student(student, image_size, iter(batches), out / "student_int8.onnx", opset)
        images = torch.from_numpy(np.concatenate(batches))
        with torch.no_grad():
            probs = torch.sigmoid(student(images))
        got8 = run_onnx(int8, images)["probabilities"]
        checks.append(Check("int8 probabilities", float(np.abs(got8 - probs.numpy()).max()), INT8_TOLERANCE,
                            f"max |int8 - float32 PyTorch| on the {len(images)} calibration images"))
        files["onnx_int8"] = int8.name
        notes.append(f"student_int8.onnx: int8 weights (per channel) and activations (ranges from {len(images)} "
                     "training images), onnxruntime QOperator form; approximate by design: judge it by its held-out "
                     "mAP (mlkd evaluate --precision int8)")
    return {"files": files, "opset": opset, "inputs": ["images"], "checks": checks, "notes": notes,
            "runtime": runtime_name(),
            "outputs": {"logits": "logits z (N, K), classes in the order of `classes`",
                        "probabilities": "sigmoid(z) (N, K): independent per-class probabilities (multi-label)"}}


# -- the command -------------------------------------------------------------------------------------
def _export_info(ckpt: dict[str, Any], checkpoint: str, fmt: str, part: dict[str, Any], size: int,
              names: list[str], tolerance: float) -> tuple[dict[str, Any], list[Check]]:
    convention = ckpt["input_convention"]
    inputs = [describe_input(convention, size, part["inputs"][0])]
    if ckpt["kind"] == "teacher":
        inputs.append({"name": "roi_pooling", **part.pop("roi_pooling"), "description": part["notes"][0]})
    checks = part.pop("checks")
    return {"format": fmt, "kind": ckpt["kind"], "mlkd_version": __version__, "checkpoint": str(checkpoint),
            "files": part.pop("files"), **({"opset": part.pop("opset")} if "opset" in part else {}),
            "classes": list(ckpt["classes"]), "inputs": inputs, "outputs": part["outputs"], "notes": part["notes"],
            "verification": {"runtime": part["runtime"], "images": names, "tolerance": tolerance,
                             "rule": "max |runtime - PyTorch| <= tolerance * max(1, max |PyTorch|); outputs "
                                     "computed from logits (sigmoid, softmax) use the logits' max |.|",
                             "checks": [{"output": c.name, "max_abs_diff": c.max_abs_diff, "allowed": c.allowed,
                                         "passed": c.passed} for c in checks],
                             "passed": all(c.passed for c in checks)}}, checks


def _readme(m: dict[str, Any]) -> str:
    v = m["verification"]
    lines = [f"# mlkd {m['kind']} exported as {m['format']}", "",
             f"From `{m['checkpoint']}` (mlkd {m['mlkd_version']}), {len(m['classes'])} classes (order in "
             "export.json).", "", "## Files", ""]
    lines += [f"- `{f}` ({k})" for k, f in m["files"].items()] + ["", "## Inputs", ""]
    for i in m["inputs"]:
        text = (f"{i['shape']} {i['dtype']} {i['layout']}, convention `{i['convention']}`: {i['resize']}; "
                f"{i['formula']}; mean {i['mean']}, std {i['std']}") if "formula" in i else i["description"]
        lines.append(f"- `{i['name']}`: {text}")
    lines += ["", "## Outputs", ""] + [f"- `{k}`: {d}" for k, d in m["outputs"].items()]
    if m["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in m["notes"]]
    lines += ["", f"## Verification ({v['runtime']})", "", f"Images: {', '.join(v['images'])}; {v['rule']}, "
              f"tolerance {v['tolerance']:g}.", ""]
    lines += [f"- `{c['output']}`: max abs diff {c['max_abs_diff']:.3e} (allowed {c['allowed']:.1e})" for c in
              v["checks"]]
    return "\n".join(lines) + "\n"


def _caffe_export():
    """:mod:`mlkd.export.caffe.export`, imported on first use: it needs protobuf, the ``[caffe]`` extra."""
    return optional_import("mlkd.export.caffe.export", "caffe", "Caffe export")


def _check_options(fmt: str, tolerance: float, opset: int) -> None:
    if fmt not in FORMATS:
        raise BadInput(f"unknown export format {fmt!r}; choose one of {list(FORMATS)}")
    if not math.isfinite(tolerance) or tolerance <= 0:  # nan would fail every check, a negative one too
        raise BadInput(f"the tolerance must be a finite number > 0 (e.g. 1e-4), got {tolerance}")
    if fmt == "onnx":
        check_opset(opset)


def _plan(ckpt: dict[str, Any], checkpoint: str | Path, fmt: str, classifier: str | None, image_size: int | None,
          regions: int | None, int8: bool, calibration: str | None) -> tuple[nn.Module | None, int, int | None]:
    """Refuse options that do not apply to this checkpoint and format; the model, its input size and (teacher)
    the regions per image. No model is built for safetensors, which writes the checkpoint's tensors."""
    kind = ckpt["kind"]
    if (int8 or calibration is not None) and (fmt != "onnx" or kind != "student"):
        raise BadInput("--int8 (and --calibration) apply to students exported with --format onnx")
    if kind not in ("teacher", "student"):
        raise BadInput(f"{checkpoint} holds {kind}, not a trained teacher or student")
    if fmt == "safetensors":
        if classifier is not None or image_size is not None or regions is not None:
            raise BadInput("--classifier-name, --image-size and --regions apply to caffe / onnx exports")
        return None, ckpt["inference"]["image_size"], None
    if kind == "teacher":
        if fmt != "caffe" or classifier is not None:
            raise BadInput("a teacher exports to --format caffe or safetensors only (ONNX would need RoI pooling "
                             "and per-image softmax over a variable number of regions), without --classifier-name")
        model, size = model_from_checkpoint(ckpt), image_size or ckpt["inference"]["image_size"]
        if model.head is not None:
            raise BadInput(f"{checkpoint} is a {ckpt['model_config']['backbone']} teacher: mlkd's Caffe export writes "
                           "the release's VGG-style teacher (conv layers, fc6, fc7, fc8_c, fc8_d) and has no converter "
                           "for ResNet blocks, frozen BatchNorm or a layer4 region head; export it with --format "
                           "safetensors (mlkd.load reads that folder)")
        if len(model.refine):
            raise BadInput(f"{checkpoint} is a refined teacher (model.refine {len(model.refine)}): the release's "
                           "teacher net, whose layer names the Caffe export keeps, has only the WSDDN streams (fc8_c, "
                           "fc8_d -> proposal_class_score), so a Caffe copy would give WSDDN's region scores, not this "
                           "teacher's refined ones; export it with --format safetensors (mlkd.load reads that folder)")
        return model, size, regions or ckpt["inference"]["max_proposals"] or 500
    size = ckpt["inference"]["image_size"]
    if image_size not in (None, size) or regions is not None:
        raise BadInput(f"a student exports at its image_size {size}; --image-size and --regions apply to "
                         "teachers")
    if fmt == "onnx" and classifier is not None:
        raise BadInput("--classifier-name names the Caffe classifier layer; ONNX outputs are `logits` and "
                         "`probabilities`")
    if calibration is not None and not int8:
        raise BadInput("--calibration applies to --int8")
    return model_from_checkpoint(ckpt), size, None


def _write_export(ckpt: dict[str, Any], checkpoint: str, fmt: str, stage: Path, model: nn.Module, size: int,
                  regions: int | None, options: dict[str, Any]) -> tuple[dict[str, Any], list[Check], str]:
    """Write a Caffe / ONNX export into ``stage`` (export.json and README.md included), run by the other runtime;
    the export record, the checks and the runtime's name."""
    tolerance, images = options["tolerance"], options["images"]
    names, x = sample_inputs(size, ckpt["input_convention"], images)
    if ckpt["kind"] == "teacher":
        part = _caffe_export().export_teacher_caffe(model, stage, size, regions, tolerance, x)
    elif fmt == "caffe":
        part = _caffe_export().export_student_caffe(model, stage, size, options["classifier"] or "fc8", tolerance, x)
    else:
        batches = checkpoint_calibration_batches(ckpt, options["calibration"]) if options["int8"] else None
        part = export_student_onnx(model, stage, size, options["opset"], tolerance, x, batches)
    runtime = part["runtime"]
    info, checks = _export_info(ckpt, checkpoint, fmt, part, size, names[:1] if ckpt["kind"] == "teacher" else names,
                                tolerance)
    write_atomically(stage / "export.json", lambda f: f.write((json.dumps(info, indent=2) + "\n").encode()),
                     "export record")
    write_atomically(stage / "README.md", lambda f: f.write(_readme(info).encode()), "export README")
    return info, checks, runtime


def export_checkpoint(checkpoint: str | Path, fmt: str, out: str | Path, classifier: str | None = None,
                      opset: int = 17, tolerance: float = 1e-4, images: Sequence[str | Path] = (),
                      image_size: int | None = None, regions: int | None = None, int8: bool = False,
                      calibration: str | None = None, overwrite: bool = False) -> tuple[dict[str, Any], list[Check]]:
    """Export and verify (see the module docstring) into the folder ``out``: one that does not exist, is empty or
    holds this checkpoint's export in this format, else only with ``overwrite`` (:class:`ExportFolder`, checked
    before the checkpoint is read). Returns the export record (``export.json``) and the checks; raises ValueError
    when the verification fails (after writing the files, whose ``verification.passed`` is then false)."""
    _check_options(fmt, tolerance, opset)
    options = {"classifier": classifier, "opset": opset, "tolerance": tolerance, "images": images, "int8": int8,
               "calibration": calibration}
    with ExportFolder(out, fmt, str(checkpoint), overwrite) as folder:
        ckpt = load_checkpoint(checkpoint)
        model, size, regions = _plan(ckpt, checkpoint, fmt, classifier, image_size, regions, int8, calibration)
        if fmt == "safetensors":
            info, checks = write_model_folder(ckpt, str(checkpoint), folder.stage, folder.out.name, images)
            runtime = RELOADED
        else:
            info, checks, runtime = _write_export(ckpt, str(checkpoint), fmt, folder.stage, model, size, regions,
                                                  options)
        folder.commit()
    require(checks, runtime, folder.out)
    return info, checks
