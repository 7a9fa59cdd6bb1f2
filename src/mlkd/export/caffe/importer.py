"""``mlkd import-caffe``: Caffe models of the release (or mlkd's own exports) into mlkd files.

Three architectures (``arch``):

- ``vgg16`` — an ImageNet VGG-style classifier (``VGG_ILSVRC_16_layers`` and its deploy prototxt, V1 or V2) into a
  weights file in torchvision's layout (``features.N``, ``classifier.0/3/6``) that records input convention
  ``caffe``: the ``model.weights`` of a teacher or a student (:func:`mlkd.models.backbones.load_imagenet_weights`).
- ``wsddn`` — a teacher trained with the release's ``wsddn`` prototxt (conv1_1 .. conv5_3, fc6, fc7, fc8_c, fc8_d,
  image_level_score) into a teacher checkpoint.
- ``student`` — a student of the release's KD prototxts (conv*, fc6, fc7, fc8_<dataset>) or of ``mlkd export``
  into a student checkpoint; the KD snapshots' frozen teacher copy (conv_wsd_*, fc_wsd_*) is skipped, or imported
  as a teacher checkpoint too (``teacher_out``).

Every import is strict: the architecture is read from both files and must be one mlkd builds (see
:mod:`mlkd.export.caffe.layout`); every layer with weights must be imported or be one the release uses for
training only (then the report says why it was skipped); unknown layer types, missing layers and shape
mismatches are errors stating what was expected and what was found. Imported models record input convention
``caffe`` (BGR, 0-255, mean-subtracted), so evaluation and export never guess.

Output files are checked before any work (an existing one is replaced only with ``overwrite``) and written only
once every part of the import succeeded; a failed import leaves none of them, and no ``.tmp``.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from mlkd.data.custom import read_class_file
from mlkd.errors import BadInput
from mlkd.export.caffe import SUPPORTED_TYPES, CaffeNet, LayerBlobs, import_vgg_weights, read_caffemodel, read_prototxt
from mlkd.export.caffe.layout import KD_TEACHER, RELEASE, Naming, VggLayout, fc_input_side, fc_shapes, vgg_layout
from mlkd.export.caffe.wsddn import SUM_LAYER, check_sum_layer, head_settings
from mlkd.models.build import build_student, build_teacher
from mlkd.models.configs import RELEASE_TEST_SCALE, StudentModelConfig, TeacherModelConfig
from mlkd.utils.checkpoint import make_checkpoint, save_checkpoint
from mlkd.utils.config import from_dict, parse_override, to_dict

ARCHS = ("vgg16", "wsddn", "student")
# Layer types of the release's prototxts besides those mlkd converts: data, RoI generation and pooling, the WSDDN
# head, distillation, losses and evaluation. None carries weights that mlkd's models have.
RELEASE_TYPES = ("HumanAttData", "Data", "ImageData", "Slice", "Silence", "Split", "Flatten", "WsdRoigen",
                 "WsdRoigenSingleScale", "ROIPooling", "Interp", "Reshape", "Eltwise", "Power", "Scale", "Gather",
                 "MAP", "CrossEntropyLoss", "SigmoidCrossEntropyLoss", "EuclideanLoss", "SoftmaxWithLoss", "Accuracy")
KNOWN_TYPES = tuple(SUPPORTED_TYPES) + RELEASE_TYPES
TEMPERATURE_SCALES = ("temp_branch1_learn", "temp_branch2_learn")  # KD prototxts: learnable Scale on teacher logits


@dataclasses.dataclass
class ImportReport:
    """What an import wrote: ``path``, its ``kind``, the model ``config``, Caffe layers ``imported`` and
    ``skipped`` (name -> why), and ``notes``."""

    path: Path
    kind: str
    config: dict[str, Any]
    imported: list[str]
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    checkpoint: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)  # what is written to path


# -- reading -----------------------------------------------------------------------------------------
def read_caffe(prototxt: str | Path, caffemodel: str | Path) -> tuple[CaffeNet, dict[str, LayerBlobs]]:
    """Both files; a layer type outside :data:`KNOWN_TYPES` is an error listing the known ones."""
    net = read_prototxt(prototxt, supported=None)
    unknown = [f"{l.name!r} ({l.type})" for l in net.layers if l.type not in KNOWN_TYPES]
    if unknown:
        raise BadInput(f"{prototxt}: layer type unknown to mlkd's Caffe import in {', '.join(unknown)}; known types: "
                         f"{sorted(KNOWN_TYPES)}")
    return net, read_caffemodel(caffemodel)


def read_classes(path: str | Path | None, num_classes: int) -> list[str]:
    """Class names, one per line, in the order of the classifier's outputs; their number must be ``num_classes``."""
    if path is None:
        raise BadInput(f"the model has {num_classes} classes: give their names with --classes FILE (one per line, "
                         "in the order of the Caffe classifier's outputs)")
    names = read_class_file(path)
    if len(names) != num_classes or len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise BadInput(f"{path} lists {len(names)} class names{f' (duplicated: {dupes})' if dupes else ''}; the "
                         f"Caffe model has {num_classes} outputs: expected {num_classes} distinct names")
    return names


def _input_size(net: CaffeNet, first_conv: str) -> int | None:
    """Side of the square net input that feeds ``first_conv`` directly, if the prototxt declares one."""
    shape = net.inputs.get(net.layer(first_conv).bottoms[0]) if net.layer(first_conv).bottoms else None
    if shape is None or len(shape) != 4:
        return None
    if shape[2] != shape[3]:
        raise BadInput(f"the prototxt's input {shape} is not square; mlkd's models warp images to S x S")
    return int(shape[2])


def _dropout(net: CaffeNet, fc: str) -> dict[str, float]:
    """``{"dropout": ratio}`` of the Dropout layer on ``fc`` (the release's drop6), if the prototxt has one."""
    layer = next((l for l in net.layers if l.type == "Dropout" and l.bottoms == [fc]), None)
    return {} if layer is None else {"dropout": float(layer.params.get("dropout_param", {}).get("dropout_ratio", 0.5))}


def _overrides(sets: Sequence[str]) -> dict[str, Any]:
    out = {}
    for text in sets:
        keys, value = parse_override(text)
        if len(keys) != 1:
            raise BadInput(f"--set takes model config keys (e.g. score_scale=10), got {text!r}")
        out[keys[0]] = value
    return out


def _model_config(cls: type, derived: dict[str, Any], sets: Sequence[str]) -> Any:
    overrides = _overrides(sets)
    if "input_convention" in overrides:
        raise BadInput("set the input convention with --input-convention, not --set")
    return from_dict(cls, {**derived, **overrides, "weights": None})


# -- planning: what maps where (shapes only, no copies) ------------------------------------------------
def plan_imagenet(net: CaffeNet, weights: Mapping[str, LayerBlobs]) -> tuple[VggLayout, dict[str, str]]:
    """Layout and torchvision-layout names (``features.N``, ``classifier.0/3/6``) of an ImageNet VGG model."""
    layout = vgg_layout(weights, net, RELEASE, last_pool=True)
    side = fc_input_side(weights, "fc6", layout.channels[-1])
    heads = {"classifier.0": "fc6", "classifier.3": "fc7"}
    hidden = fc_shapes(weights, ["fc6", "fc7"], layout.channels[-1] * side * side)
    if "fc8" in weights:
        fc_shapes(weights, ["fc8"], hidden[-1])
        heads["classifier.6"] = "fc8"
    return layout, {**layout.name_map("features", last_pool=True), **heads}


def plan_teacher(net: CaffeNet, weights: Mapping[str, LayerBlobs], naming: Naming = RELEASE
                 ) -> tuple[dict[str, Any], dict[str, str], int]:
    """Derived teacher config, mlkd prefix -> Caffe name, and K."""
    layout = vgg_layout(weights, net, naming)
    c = layout.channels[-1]
    fc = naming.fc
    side = fc_input_side(weights, fc["fc6"], c)
    h6, h7 = fc_shapes(weights, [fc["fc6"], fc["fc7"]], c * side * side)
    (k,), (k_d,) = fc_shapes(weights, [fc["fc8_c"]], h7), fc_shapes(weights, [fc["fc8_d"]], h7)
    if h6 != h7 or k != k_d:
        raise BadInput(f"{fc['fc6']}/{fc['fc7']} have {h6}/{h7} outputs and {fc['fc8_c']}/{fc['fc8_d']} {k}/{k_d}; "
                         "mlkd's teacher has one hidden width and K outputs in both streams")
    settings = head_settings(net, layout.convs[-1][-1], layout.stride, naming)
    if settings.setdefault("roi_size", side) != side:
        raise BadInput(f"the ROIPooling layer pools to {settings['roi_size']}x{settings['roi_size']} but "
                         f"{fc['fc6']} reads {c}x{side}x{side}")
    derived = {**layout.backbone_config(), "input_convention": "caffe", "hidden": h6, "roi_op": "roi_pool",
               **_dropout(net, fc["fc6"]), **settings}
    names = {**layout.name_map("backbone.features"), **{m: fc[m] for m in ("fc6", "fc7", "fc8_c", "fc8_d")}}
    return derived, names, k


def classifier_name(weights: Mapping[str, LayerBlobs], given: str | None) -> str:
    """The student's K-way layer: ``given``, or the one InnerProduct layer named ``fc8`` or ``fc8_<something>``."""
    if given is not None:
        if given not in weights:
            raise BadInput(f"--classifier-name {given!r} is not a layer with weights in the caffemodel; it has "
                             f"{sorted(weights)}")
        return given
    found = sorted(n for n, lb in weights.items() if lb.type == "InnerProduct" and re.fullmatch(r"fc8(_\w+)?", n)
                   and n not in ("fc8_c", "fc8_d"))
    if len(found) != 1:
        raise BadInput(f"expected one classifier layer named fc8 or fc8_<dataset> (InnerProduct) in the caffemodel, "
                         f"found {found or 'none'} (a stage-1 KD snapshot has none); name it with --classifier-name")
    return found[0]


def plan_student(net: CaffeNet, weights: Mapping[str, LayerBlobs], classifier: str | None = None
                 ) -> tuple[dict[str, Any], dict[str, str], int]:
    """Derived student config, mlkd prefix -> Caffe name, and K."""
    fc8 = classifier_name(weights, classifier)
    layout = vgg_layout(weights, net, RELEASE, last_pool=True)
    c = layout.channels[-1]
    side = fc_input_side(weights, "fc6", c)
    h6, h7, k = fc_shapes(weights, ["fc6", "fc7", fc8], c * side * side)
    if h6 != h7:
        raise BadInput(f"fc6 / fc7 have {h6} / {h7} outputs; mlkd's student has one hidden width")
    size = side * 2 ** len(layout.convs)  # pool5's output is exactly side x side: Caffe's fc6 fixes the input size
    declared = _input_size(net, layout.convs[0][0])
    if declared is not None and declared != size:
        raise BadInput(f"the prototxt's input is {declared}x{declared}, but fc6 reads a {c}x{side}x{side} map after "
                         f"{len(layout.convs)} poolings: the input must be {size}x{size}")
    derived = {**layout.backbone_config(), "input_convention": "caffe", "hidden": h6, "roi_size": side,
               "image_size": size, **_dropout(net, "fc6")}
    names = {**layout.name_map("backbone.features"), "fc6": "fc6", "fc7": "fc7", "fc8": fc8}
    return derived, names, k


# -- importing ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class ImportOptions:
    """The command's options: ``classes`` file, model-config overrides ``sets`` (``key=value``), the student's
    ``classifier`` layer, ``teacher_out`` (KD teacher copy), the teacher's ``image_size``, the ``convention``
    the weights expect (``caffe`` for every model of the release; ``torchvision`` only for mlkd exports of models
    trained that way, as their export.json says) and whether to ``overwrite`` existing output files."""

    classes: str | None = None
    sets: Sequence[str] = ()
    classifier: str | None = None
    teacher_out: str | Path | None = None
    image_size: int | None = None
    convention: str = "caffe"
    source: dict[str, str] = dataclasses.field(default_factory=dict)
    overwrite: bool = False  # replace an existing output file instead of refusing it

    def notes(self) -> list[str]:
        if self.convention == "caffe":
            return []
        return [f"input convention set to {self.convention!r}: right only if the weights were trained for it (a "
                "Caffe model of the release expects 'caffe')"]


def _load(model: torch.nn.Module, weights: Mapping[str, LayerBlobs], names: dict[str, str],
          ignore: set[str]) -> dict[str, torch.Tensor]:
    state = import_vgg_weights(weights, names, expected=model.state_dict(), ignore=ignore)
    model.load_state_dict(state)  # strict: every parameter of the model comes from the caffemodel
    return model.state_dict()


def import_imagenet(net: CaffeNet, weights: Mapping[str, LayerBlobs], out: str | Path,
                    opts: ImportOptions) -> ImportReport:
    layout, names = plan_imagenet(net, weights)
    state = import_vgg_weights(weights, names)
    ckpt = make_checkpoint("imagenet_weights", state, input_convention=opts.convention,
                           source={**opts.source, "backbone": layout.backbone_config()})
    notes = [] if "fc8" in weights else ["no fc8 in the caffemodel: the file has no classifier.6 (mlkd never uses it)"]
    config = {**layout.backbone_config(), "input_convention": opts.convention}
    return ImportReport(Path(out), "imagenet_weights", config, sorted(set(names.values())), notes=notes + opts.notes(),
                        checkpoint=ckpt)


def import_teacher(net: CaffeNet, weights: Mapping[str, LayerBlobs], out: str | Path, opts: ImportOptions,
                   naming: Naming = RELEASE, ignore: Mapping[str, str] | None = None) -> ImportReport:
    derived, names, k = plan_teacher(net, weights, naming)
    skipped = dict(ignore or {})
    if SUM_LAYER in weights:
        check_sum_layer(weights)
        skipped.setdefault(SUM_LAYER, "the sum over regions (weights fixed to 1), built into mlkd's WSDDN")
    classes = read_classes(opts.classes, k)
    cfg = _model_config(TeacherModelConfig, {**derived, "input_convention": opts.convention}, opts.sets)
    scale = opts.image_size or _input_size(net, names["backbone.features.0"]) or RELEASE_TEST_SCALE
    model = build_teacher(cfg, k)
    state = _load(model, weights, names, set(skipped))
    ckpt = make_checkpoint("teacher", state, input_convention=opts.convention, classes=classes,
                           model_config=to_dict(cfg), image_size=scale, source=opts.source)
    return ImportReport(Path(out), "teacher", {**to_dict(cfg), "test_scale": scale}, sorted(set(names.values())),
                        skipped, opts.notes(), ckpt)


def _kd_skips(weights: Mapping[str, LayerBlobs], fc8: str) -> tuple[dict[str, str], list[str]]:
    """Layers of a KD snapshot the student does not have, with the reason; and notes on learned temperatures."""
    skipped, notes = {}, []
    teacher = re.compile(KD_TEACHER.conv)
    for name, lb in weights.items():
        if teacher.fullmatch(name) or name in KD_TEACHER.fc.values():
            skipped[name] = "the frozen teacher copy of the KD prototxts (import it with --teacher-out)"
        elif name == SUM_LAYER:
            skipped[name] = "the teacher copy's sum over regions (weights fixed to 1)"
        elif name == f"{fc8}_soft":
            skipped[name] = "L_p' per-class scale a (training only; mlkd's distiller learns its own)"
        elif name in TEMPERATURE_SCALES:
            values = np.concatenate([b.ravel() for b in lb.blobs]) if lb.blobs else np.zeros(0)
            skipped[name] = "learnable scale of the teacher copy's logits (distillation temperature)"
            if values.size:
                notes.append(f"{name}: learned scales in [{values.min():.4g}, {values.max():.4g}] (initialised 2, "
                             "i.e. T = 0.5); mlkd's distillation uses a fixed x2")
    return skipped, notes


def import_student(net: CaffeNet, weights: Mapping[str, LayerBlobs], out: str | Path,
                   opts: ImportOptions) -> list[ImportReport]:
    derived, names, k = plan_student(net, weights, opts.classifier)
    skipped, notes = _kd_skips(weights, names["fc8"])
    classes = read_classes(opts.classes, k)
    cfg = _model_config(StudentModelConfig, {**derived, "input_convention": opts.convention}, opts.sets)
    model = build_student(cfg, k)
    state = _load(model, weights, names, set(skipped))
    ckpt = make_checkpoint("student", state, input_convention=opts.convention, classes=classes,
                           model_config=to_dict(cfg), image_size=cfg.image_size, source=opts.source)
    reports = [ImportReport(Path(out), "student", to_dict(cfg), sorted(set(names.values())), skipped,
                            notes + opts.notes(), ckpt)]
    if opts.teacher_out is not None:
        copy = {n for n in weights if re.fullmatch(KD_TEACHER.conv, n) or n in KD_TEACHER.fc.values()}
        rest = {n: skipped.get(n, "the student (imported into the student checkpoint)") for n in weights
                if n not in copy}
        teacher_opts = dataclasses.replace(opts, sets=())
        reports.append(import_teacher(net, weights, opts.teacher_out, teacher_opts, KD_TEACHER, ignore=rest))
    return reports


APPLIES = {"vgg16": (), "wsddn": ("--classes", "--set", "--image-size"),
           "student": ("--classes", "--set", "--classifier-name", "--teacher-out")}


def import_caffe(prototxt: str | Path, caffemodel: str | Path, arch: str, out: str | Path,
                 opts: ImportOptions | None = None) -> list[ImportReport]:
    """Import a Caffe model (see the module docstring); returns one report per file written."""
    if arch not in ARCHS:
        raise BadInput(f"unknown --arch {arch!r}; choose one of {list(ARCHS)}")
    opts = dataclasses.replace(opts or ImportOptions(), source={"prototxt": str(prototxt),
                                                                "caffemodel": str(caffemodel), "arch": arch})
    given = {"--classes": opts.classes, "--set": opts.sets, "--classifier-name": opts.classifier,
             "--teacher-out": opts.teacher_out, "--image-size": opts.image_size}
    extra = [flag for flag, value in given.items() if value and flag not in APPLIES[arch]]
    if extra:
        takes = list(APPLIES[arch]) or "none of them"
        raise BadInput(f"{extra} do(es) not apply to --arch {arch} (it takes {takes})")
    check_outputs(out, opts)
    net, weights = read_caffe(prototxt, caffemodel)
    if arch == "vgg16":
        reports = [import_imagenet(net, weights, out, opts)]
    elif arch == "wsddn":
        reports = [import_teacher(net, weights, out, opts)]
    else:
        reports = import_student(net, weights, out, opts)
    write_reports(reports)
    return reports


def check_outputs(out: str | Path, opts: ImportOptions) -> None:
    """Before any work: refuse an output that exists (unless ``opts.overwrite``), is a folder, or is named twice."""
    paths = [Path(out)] + ([Path(opts.teacher_out)] if opts.teacher_out is not None else [])
    if len(paths) == 2 and paths[0].resolve() == paths[1].resolve():
        raise BadInput(f"--out and --teacher-out are the same file {paths[0]}; give two paths")
    for path in paths:
        if path.is_dir():
            raise BadInput(f"{path} is a folder; give the path of the .pt file to write")
        if path.exists() and not opts.overwrite:
            raise BadInput(f"{path} already exists; pass --overwrite to replace it (or choose another path)")


def write_reports(reports: Sequence[ImportReport]) -> None:
    """Write every planned checkpoint; if one cannot be written, remove those this call wrote before it, so a failed
    import leaves no part of its output (each write is atomic: no partial file, no .tmp)."""
    written: list[Path] = []
    try:
        for r in reports:
            written.append(save_checkpoint(r.path, r.checkpoint))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
