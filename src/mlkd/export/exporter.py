"""``mlkd export``: a checkpoint's model as Caffe files or ONNX, verified by another runtime before it is done.

- Student, ``caffe``: deploy prototxt + caffemodel with the release's layer names (conv1_1 ... pool5, fc6, fc7,
  the classifier ``fc8`` or ``--classifier-name``, a Sigmoid ``prob``), checked with OpenCV's DNN module. Only the
  VGG head is expressible with the VGG converter (:mod:`mlkd.export.caffe.vgg`); ResNet students are refused.
- Student, ``onnx``: ``images`` -> ``logits``, ``probabilities`` (see :mod:`mlkd.export.onnx`), checked with
  onnxruntime.
- Teacher, ``caffe``: every layer of the release's teacher network but the RoI generation and pooling (see
  :mod:`mlkd.export.caffe.wsddn`), checked with OpenCV on regions pooled by PyTorch, plus a weight round trip
  through the importer.

Each export writes ``export.json`` (machine-readable) and ``README.md`` beside the model files: the input
convention (channel order, scale, mean, std, size), the outputs' meaning and the verification's numbers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import cv2
import torch
import torch.nn.functional as F
from torch import nn

from mlkd import __version__
from mlkd.checkpoint import load_checkpoint
from mlkd.export.caffe import (feature_sizes, import_vgg_weights, read_caffemodel, read_prototxt, vgg_layer_names,
                               vgg_to_caffe, write_caffemodel, write_prototxt)
from mlkd.export.caffe.wsddn import export_wsddn
from mlkd.export.verify import Check, compare, describe_input, require, sample_inputs

FORMATS = ("caffe", "onnx")


class VggDeployView(nn.Module):
    """A VGG-head :class:`~mlkd.models.student.Student` as a plain VGG classifier (the converter's contract):
    ``features`` = backbone + pool5; the student's adaptive average pooling to ``roi_size`` folded into ``fc6``
    (both are linear, so the product is exact up to float rounding; identity when pool5 is already roi_size)."""

    def __init__(self, student: nn.Module, image_size: int) -> None:
        super().__init__()
        self.features = nn.Sequential(*student.backbone.features, student.pool5)
        h, w = feature_sizes(self.features, (image_size, image_size), caffe=False)[-1]
        self.fc6 = fold_adaptive_pool(student.fc6, student.backbone.out_channels, (h, w), student.roi_size)
        self.fc7, self.fc8, self.drop = student.fc7, student.fc8, student.drop
        self.grid = (h, w)  # pool5's output at image_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.drop(F.relu(self.fc6(self.features(images).flatten(1))))  # (B, hidden)
        return self.fc8(self.drop(F.relu(self.fc7(x))))


def fold_adaptive_pool(fc: nn.Linear, channels: int, hw: tuple[int, int], side: int) -> nn.Linear:
    """``fc`` reading ``adaptive_avg_pool2d(x, side)`` of ``x (C, h, w)`` as one Linear reading ``x`` itself."""
    h, w = hw
    if (h, w) == (side, side):
        return fc
    if h < 1 or w < 1:
        raise ValueError(f"pool5 gives a {h}x{w} map at this input size; the student needs at least 1x1")
    basis = torch.eye(h * w, dtype=torch.float64).view(h * w, 1, h, w)
    pool = F.adaptive_avg_pool2d(basis, side).view(h * w, side * side)  # (hw, ss): input cell -> output cell weight
    weight = fc.weight.detach().double().view(fc.out_features, channels, side * side) @ pool.T  # (D, C, hw)
    folded = nn.Linear(channels * h * w, fc.out_features)
    with torch.no_grad():
        folded.weight.copy_(weight.reshape(fc.out_features, -1).float())
        folded.bias.copy_(fc.bias.detach())
    return folded


# -- student -----------------------------------------------------------------------------------------
def export_student_caffe(student: nn.Module, out: Path, image_size: int, classifier: str, tolerance: float,
                         x: torch.Tensor) -> dict[str, Any]:
    """Write ``student.prototxt`` / ``student.caffemodel`` and check them with OpenCV; the manifest's parts."""
    if getattr(student, "head", None) != "vgg":
        raise ValueError("a ResNet-head student cannot be written as Caffe layers by mlkd (its converter covers "
                         "VGG-style networks: Conv / ReLU / MaxPool + fc layers; no BatchNorm, residual sums or "
                         "global pooling); export it with --format onnx")
    view = VggDeployView(student, image_size).eval()
    prototxt, caffemodel = out / "student.prototxt", out / "student.caffemodel"
    net, blobs = vgg_to_caffe(view, image_size, classifier, output="sigmoid", dropout_ratio=student.drop.p,
                              net_name="mlkd_student")
    write_prototxt(prototxt, net)
    write_caffemodel(caffemodel, blobs, net=net)
    cv = cv2.dnn.readNetFromCaffe(str(prototxt), str(caffemodel))
    cv.setInput(x.numpy())
    logits, prob = cv.forward([classifier, "prob"])
    with torch.no_grad():
        ref = student(x)
    scale = float(ref.abs().max())
    checks = [compare(classifier, logits, ref, tolerance), compare("prob", prob, torch.sigmoid(ref), tolerance, scale)]
    (h, w), s = view.grid, student.roi_size
    notes = ["the prototxt declares a batch of 1; OpenCV, and Caffe after net.blobs['data'].reshape(N, ...), take "
             "any batch N"]
    if (h, w) != (s, s):
        notes.append(f"at {image_size}x{image_size} the student's pool5 gives a {h}x{w} grid that it pools to roi_size "
                     f"{s}x{s} (adaptive average): that pooling is folded into fc6, which reads {h}x{w} (exact up to "
                     "float rounding)")
    return {"files": {"prototxt": prototxt.name, "caffemodel": caffemodel.name},
            "inputs": ["data"], "runtime": f"OpenCV {cv2.__version__} DNN", "checks": checks, "notes": notes,
            "outputs": {classifier: "logits z (N, K), classes in the order of `classes`",
                        "prob": "sigmoid(z) (N, K): independent per-class probabilities (multi-label)"}}


def export_student_onnx(student: nn.Module, out: Path, image_size: int, opset: int, tolerance: float,
                        x: torch.Tensor) -> dict[str, Any]:
    """Write ``student.onnx`` and check it with onnxruntime (on a batch other than the traced one)."""
    from mlkd.export.onnx import export_onnx, run_onnx, runtime_name

    model = VggDeployView(student, image_size).eval() if student.head == "vgg" else student
    path = out / "student.onnx"
    export_onnx(model, path, image_size, opset)
    got = run_onnx(path, x)
    with torch.no_grad():
        ref = student(x)
    scale = float(ref.abs().max())
    checks = [compare("logits", got["logits"], ref, tolerance),
              compare("probabilities", got["probabilities"], torch.sigmoid(ref), tolerance, scale)]
    return {"files": {"onnx": path.name}, "opset": opset, "inputs": ["images"], "checks": checks, "notes": [],
            "runtime": runtime_name(),
            "outputs": {"logits": "logits z (N, K), classes in the order of `classes`",
                        "probabilities": "sigmoid(z) (N, K): independent per-class probabilities (multi-label)"}}


# -- teacher -----------------------------------------------------------------------------------------
def _random_boxes(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` boxes (x1, y1, x2, y2) inside a ``size`` image, and proposal scores in (0.05, 1)."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size * 0.7
    wh = (0.1 + 0.5 * torch.rand(n, 2, generator=g)) * size
    boxes = torch.cat([xy, (xy + wh).clamp(max=size - 1)], 1)
    return boxes, 0.05 + 0.95 * torch.rand(n, generator=g)


def _teacher_reference(teacher: nn.Module, image: torch.Tensor, regions: int) -> tuple[torch.Tensor, dict]:
    """Pooled, score-scaled regions of ``regions`` random proposals on ``image`` (1, 3, S, S), and the teacher's
    outputs on them keyed by the Caffe layer that gives each."""
    boxes, scores = _random_boxes(regions, image.shape[-1], seed=0)
    index = torch.zeros(regions, dtype=torch.int64)
    fmap = teacher.backbone(image)  # (1, C, S / stride, S / stride)
    factor = teacher.score_scale * scores + teacher.score_bias  # (R,)
    pooled = teacher.pool(fmap, boxes, index) * factor[:, None, None, None]  # (R, C, s, s)
    cls_logits, det_logits = teacher.forward_streams(teacher.forward_regions(fmap, boxes, scores, index))
    result = teacher(image, [boxes], [scores])[0]
    names = vgg_layer_names(teacher.backbone.features)
    return pooled, {names[max(names)]: fmap, "fc8_c": cls_logits, "fc8_d": det_logits,
                    "proposal_class_score": result["region_scores"], "image_level_score": result["image_scores"]}


def _round_trip(teacher: nn.Module, prototxt: Path, caffemodel: Path) -> Check:
    """Import the written files the way ``mlkd import-caffe --arch wsddn`` does; compare every tensor."""
    from mlkd.export.importer import plan_teacher

    weights = read_caffemodel(caffemodel)
    _, names, _ = plan_teacher(read_prototxt(prototxt, supported=None), weights)
    back = import_vgg_weights(weights, names, expected=teacher.state_dict(), ignore={"image_level_score"})
    state = teacher.state_dict()
    same_keys = back.keys() == state.keys()
    diff = max((float((back[k] - state[k]).abs().max()) for k in state), default=0.0) if same_keys else float("inf")
    return Check("weights", diff, 0.0, "max |imported from the files - teacher| (every tensor)")


@torch.no_grad()
def export_teacher_caffe(teacher: nn.Module, out: Path, image_size: int, regions: int, tolerance: float,
                         x: torch.Tensor) -> dict[str, Any]:
    """Write ``teacher.prototxt`` / ``teacher.caffemodel``; check OpenCV on PyTorch-pooled regions of the first
    image of ``x``, and that importing the files gives the teacher's tensors bit for bit."""
    prototxt, caffemodel = out / "teacher.prototxt", out / "teacher.caffemodel"
    export_wsddn(teacher, prototxt, caffemodel, image_size, regions)
    pooled, refs = _teacher_reference(teacher, x[:1], regions)
    cv = cv2.dnn.readNetFromCaffe(str(prototxt), str(caffemodel))
    cv.setInput(x[:1].numpy(), "data")
    cv.setInput(pooled.numpy(), "roi_pooling")
    got = cv.forward(list(refs))
    logits = max(float(refs["fc8_c"].abs().max()), float(refs["fc8_d"].abs().max()))
    checks = [compare(name, g, ref, tolerance, logits if name.endswith("score") else None)
              for (name, ref), g in zip(refs.items(), got)]
    checks.append(_round_trip(teacher, prototxt, caffemodel))
    c, s, last_relu = teacher.backbone.out_channels, teacher.roi_size, next(iter(refs))
    pooling = {"shape": [regions, c, s, s], "op": "roi_pool", "spatial_scale": 1.0 / teacher.backbone.stride,
               "score_scale": teacher.score_scale, "score_bias": teacher.score_bias}
    return {"files": {"prototxt": prototxt.name, "caffemodel": caffemodel.name}, "inputs": ["data", "roi_pooling"],
            "runtime": f"OpenCV {cv2.__version__} DNN", "checks": checks, "roi_pooling": pooling,
            "outputs": {last_relu.replace("relu", "conv"): f"feature map of `data` (N, C, S/stride, S/stride) after "
                        f"{last_relu} (in place; in OpenCV ask for layer {last_relu}): pool regions of it into "
                        "`roi_pooling`",
                        "proposal_class_score": "region scores S (1, R, K, 1): softmax over classes times softmax "
                                                "over regions",
                        "image_level_score": "image scores p (1, 1, K, 1) = sum over regions of S, in (0, 1)"},
            "notes": teacher_notes(teacher, regions)}


def teacher_notes(teacher: nn.Module, regions: int) -> list[str]:
    """What the teacher needs outside standard Caffe, and how the release names it."""
    s, stride = teacher.roi_size, teacher.backbone.stride
    return [
        f"input `roi_pooling` (R={regions}, C, {s}, {s}): RoI max pooling of the last convolution (Fast R-CNN "
        f"rounding, spatial_scale 1/{stride}: torchvision.ops.roi_pool) for R proposals (x1, y1, x2, y2) in pixels "
        f"of `data`, each pooled region multiplied by ({teacher.score_scale:g} * proposal score + "
        f"{teacher.score_bias:g}); exactly R regions per image: the Reshape layers fix R (padding would change "
        "the softmax over regions; for another count edit their dim R or export again with --regions)",
        "not expressible in standard Caffe: the release computes it with two layers of its fork, `roi` (WsdRoigen: "
        "(N, 5R) proposals -> (N*R, 6) rois image, x1, y1, x2, y2, score) and `roi_pooling` (ROIPooling with "
        "roi_pooling_param {pooled_h, pooled_w, spatial_scale, score_scale, score_bias}, field 149 of its "
        "caffe.proto); BVLC Caffe has no RoI pooling and Fast R-CNN's / OpenCV's ROIPooling has no score scaling",
        "standard Caffe, as in the release: reshape_branch1/2 (Reshape -1, R, K, 1), class_score (Softmax axis 2, "
        "over classes), proposal_score (Softmax axis 1, over regions), proposal_class_score (Eltwise PROD), "
        "image_level_score (1x1 Convolution with weights fixed to 1, no bias: the sum over regions)",
        "mlkd's objectness s'_r = sum over classes of S (its own definition) is not a layer: sum "
        "proposal_class_score over K",
    ]


# -- the command -------------------------------------------------------------------------------------
def _manifest(ckpt: dict[str, Any], checkpoint: str, fmt: str, part: dict[str, Any], size: int,
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


def _prepare_dir(out: Path, fmt: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "export.json"
    if manifest.exists():
        previous = json.loads(manifest.read_text()).get("format")
        if previous != fmt:
            raise ValueError(f"{out} already holds a {previous} export (export.json); export {fmt} into another folder")


def export_checkpoint(checkpoint: str | Path, fmt: str, out: str | Path, classifier: str | None = None,
                      opset: int = 17, tolerance: float = 1e-4, images: Sequence[str | Path] = (),
                      image_size: int | None = None, regions: int | None = None) -> tuple[dict[str, Any], list[Check]]:
    """Export and verify (see the module docstring). Returns the manifest and the checks; raises ValueError when
    the verification fails (after writing the manifest, whose ``verification.passed`` is then false)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {list(FORMATS)}")
    ckpt = load_checkpoint(checkpoint)
    kind, model_cfg = ckpt["kind"], ckpt["config"]["model"]
    out = Path(out)
    if kind == "teacher":
        from mlkd.teacher import teacher_from_checkpoint

        if fmt != "caffe" or classifier is not None:
            raise ValueError("a teacher exports to --format caffe only (ONNX would need RoI pooling and per-image "
                             "softmax over a variable number of regions), without --classifier-name")
        model, size = teacher_from_checkpoint(ckpt), image_size or ckpt["config"]["data"]["test_scale"]
        regions = regions or ckpt["config"]["data"].get("max_proposals") or 500
    else:
        from mlkd.student import student_from_checkpoint

        if image_size not in (None, model_cfg["image_size"]) or regions is not None:
            raise ValueError(f"a student exports at its image_size {model_cfg['image_size']}; --image-size and "
                             "--regions apply to teachers")
        model, size = student_from_checkpoint(ckpt), model_cfg["image_size"]
    _prepare_dir(out, fmt)
    names, x = sample_inputs(size, ckpt["input_convention"], images)
    if kind == "teacher":
        part = export_teacher_caffe(model, out, size, regions, tolerance, x)
    elif fmt == "caffe":
        part = export_student_caffe(model, out, size, classifier or "fc8", tolerance, x)
    else:
        if classifier is not None:
            raise ValueError("--classifier-name names the Caffe classifier layer; ONNX outputs are `logits` and "
                             "`probabilities`")
        part = export_student_onnx(model, out, size, opset, tolerance, x)
    manifest, checks = _manifest(ckpt, str(checkpoint), fmt, part, size, names[:1] if kind == "teacher" else names,
                                 tolerance)
    (out / "export.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (out / "README.md").write_text(_readme(manifest))
    require(checks, part["runtime"], out)
    return manifest, checks
