"""Checkpoints: :func:`save_checkpoint` is the one function that writes them, :func:`load_checkpoint` the one
that reads them. Everything else (training, import, export, the Python API) goes through these two.

A checkpoint is a ``torch.save`` dict of plain values and tensors (read with ``weights_only=True``, so loading a
file never runs code), format version 2::

    format          "mlkd-checkpoint"
    format_version  2
    mlkd_version    the version that wrote it
    kind            "teacher" | "student" | "imagenet_weights"
    model           the state dict
    model_config    the model's config dict (TeacherModelConfig / StudentModelConfig); None for imagenet_weights
    classes         class names in output order: distinct non-empty strings (a repeated name would hide outputs)
    input_convention  a name of mlkd.models.backbones.CONVENTIONS ("caffe", "torchvision", ...): the input the
                    weights expect
    inference       {"image_size": S, "max_proposals": R or None, "proposals": {"method", "params"} or None}: how
                    to feed the model at test time (a teacher records how its training proposals were made);
                    S in [16, 8192], and where model_config has image_size / input_convention they must agree
    dataset         identity of the training split (DatasetIdentity.to_dict()), or None
    config          the resolved run config (the whole recipe), or None for imported models
    train_state     {"epoch", "stage", "stage_epoch", "optimizer", "scheduler", "extra"} to resume, or None
    source          where imported weights came from (files, arch), or None

Version 1 (mlkd 0.1) had no ``format_version``; :func:`load_checkpoint` converts such files in memory (the
teacher's optimizer state was at the top level, the student's under ``train_state`` with ``scale``).

A trained model is shared as a *model folder* (:func:`write_model_dir`): ``model.safetensors`` (the weights; no
code runs when they are read) and ``config.json`` (``format`` "mlkd-model", ``format_version`` 2,
``mlkd_version``, ``kind``, ``model_config``, ``classes``, ``input_convention``, ``image_size``, ``max_proposals``,
``proposals``, ``dataset``, and ``weights``: ``{"sha256", "bytes", "tensors": {name: {"dtype", "shape"}}}`` of
``model.safetensors``, checked when it is read; format 1 had no ``weights`` and is still read).
:func:`load_checkpoint` reads a folder too, as a checkpoint without training state, so every command that takes a
checkpoint takes a model folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, BinaryIO, Callable, Sequence

import safetensors.torch
import torch

from mlkd.errors import BadFile, BadInput, CannotWrite, MlkdError, NotFound
from mlkd.utils.checks import Rule, class_names_problem
from mlkd.utils.config import SIZE
from mlkd.version import __version__

logger = logging.getLogger(__name__)

FORMAT = "mlkd-checkpoint"
FORMAT_VERSION = 2
KINDS = ("teacher", "student", "imagenet_weights")
TRAIN_STATE_KEYS = ("epoch", "stage", "stage_epoch", "optimizer", "scheduler", "extra")
MODEL_FORMAT, MODEL_FORMAT_VERSION = "mlkd-model", 2
WEIGHTS, CONFIG = "model.safetensors", "config.json"


def make_checkpoint(kind: str, model: dict[str, torch.Tensor], *, input_convention: str,
                    classes: Sequence[str] = (), model_config: dict[str, Any] | None = None,
                    image_size: int | None = None, max_proposals: int | None = None,
                    proposals: dict[str, Any] | None = None, dataset: dict[str, Any] | None = None,
                    config: dict[str, Any] | None = None,
                    train_state: dict[str, Any] | None = None, source: dict[str, Any] | None = None,
                    where: str = "the checkpoint being written") -> dict[str, Any]:
    """The checkpoint dict of the layout above (checked as :func:`load_checkpoint` checks a file; ``where`` names
    it in errors)."""
    # list() only for a tuple: list("abc") would make a string three one-letter classes instead of an error
    ckpt = {"format": FORMAT, "format_version": FORMAT_VERSION, "mlkd_version": __version__, "kind": kind,
            "model": model, "model_config": model_config,
            "classes": list(classes) if isinstance(classes, tuple) else classes,
            "input_convention": input_convention,
            "inference": {"image_size": image_size, "max_proposals": max_proposals, "proposals": proposals},
            "dataset": dataset,
            "config": config, "train_state": train_state, "source": source}
    check_layout(ckpt, where)
    return ckpt


def save_checkpoint(path: str | Path, ckpt: dict[str, Any]) -> Path:
    """Write ``ckpt`` (from :func:`make_checkpoint`) to ``path`` atomically: a crash mid-write leaves the previous
    file intact and no partial file under ``path``; a file that cannot be written is a :class:`CannotWrite`."""
    saved = {k: v for k, v in ckpt.items() if k != "file"}  # where a loaded checkpoint came from is not saved
    return write_atomically(path, lambda f: torch.save(saved, f), "checkpoint")


def write_atomically(path: str | Path, write: Callable[[BinaryIO], None], what: str = "file") -> Path:
    """Create ``path`` (and its folders) through ``write(f)`` on ``path.tmp``, then rename it to ``path``. Whatever
    fails (a read-only folder, a full disk, a file-size limit, an interrupt) leaves ``path`` as it was and no
    ``.tmp``; an OS error is a :class:`CannotWrite` naming ``what`` and the path."""
    path = Path(path)
    _check_file_path(path, what)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # it could not be created either
        cause = _os_error(e)
        if cause is None:
            raise
        raise CannotWrite(f"cannot write {what} {path}: {cause.strerror or cause}") from e
    return path


def _check_file_path(path: Path, what: str) -> None:
    """Refuse a ``path`` that is a folder, or below a file, before anything is written (the OS would only say
    "File exists" or "Not a directory")."""
    if path.is_dir() or not path.name:
        raise CannotWrite(f"cannot write {what} {path}: it is a folder; give a file path")
    parent = next((a for a in path.parents if a.exists()), None)
    if parent is not None and not parent.is_dir():
        raise CannotWrite(f"cannot write {what} {path}: {parent} is a file, not a folder")


def _os_error(e: BaseException) -> OSError | None:
    """The OS error behind ``e``: ``e`` itself, or the one torch.save wraps in a RuntimeError (a full disk, a
    file-size limit); None for anything else (an mlkd error, an interrupt or a bug keeps its own type)."""
    seen = 0
    while e is not None and seen < 5:
        if isinstance(e, MlkdError):
            return None
        if isinstance(e, OSError):
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def load_checkpoint(path: str | Path, kind: str | None = None) -> dict[str, Any]:
    """Read a checkpoint (or a model folder) on the CPU, as format version 2 (older files are converted in
    memory); ``kind`` checks it is a teacher / student checkpoint."""
    path = Path(path)
    if path.is_dir():
        ckpt = read_model_dir(path)
        if kind is not None and ckpt["kind"] != kind:
            raise BadInput(f"{path} holds a {ckpt['kind']}; expected a {kind}")
        return {**ckpt, "file": str(path)}
    if not path.is_file():
        raise NotFound(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: say which file
        raise BadInput(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    if not isinstance(ckpt, dict):
        raise BadInput(f"{path} is not an mlkd checkpoint (it holds a {type(ckpt).__name__}, not a dict)")
    if "format_version" not in ckpt:
        ckpt = upgrade_v1(ckpt, str(path))
    elif ckpt.get("format") != FORMAT or not isinstance(ckpt["format_version"], int) \
            or ckpt["format_version"] > FORMAT_VERSION:
        raise BadInput(f"{path} is {ckpt.get('format')!r} format version {ckpt.get('format_version')!r}; this "
                         f"mlkd ({__version__}) reads {FORMAT!r} up to version {FORMAT_VERSION}")
    check_layout(ckpt, str(path))
    if kind is not None and ckpt["kind"] != kind:
        raise BadInput(f"{path} is a {ckpt['kind']} checkpoint; expected a {kind} checkpoint")
    return {**ckpt, "file": str(path)}  # where it was read from, for messages (never saved)


def check_layout(ckpt: dict[str, Any], where: str) -> None:
    """Raise a ``BadInput`` naming ``where`` and the field unless ``ckpt`` has the version-2 layout."""
    problems = [f"missing {k!r}" for k in ("kind", "model", "classes", "input_convention", "model_config",
                                           "inference", "train_state") if k not in ckpt]
    if not problems:
        if ckpt["kind"] not in KINDS:
            problems.append(f"kind {ckpt['kind']!r} is not one of {list(KINDS)}")
        if not isinstance(ckpt["model"], dict) or not all(isinstance(v, torch.Tensor) for v in ckpt["model"].values()):
            problems.append("'model' is not a state dict (name -> tensor)")
        problems.append(class_names_problem(ckpt["classes"], allow_empty=ckpt["kind"] == "imagenet_weights"))
        if ckpt["kind"] != "imagenet_weights" and not isinstance(ckpt["model_config"], dict):
            problems.append("'model_config' is not a dict")
        ts = ckpt["train_state"]
        if ts is not None and (not isinstance(ts, dict) or set(TRAIN_STATE_KEYS) - set(ts)):
            problems.append(f"'train_state' must be None or hold {list(TRAIN_STATE_KEYS)}")
        if ckpt["kind"] in ("teacher", "student"):
            problems += _inference_problems(ckpt)
    problems = [p for p in problems if p]
    if problems:
        raise BadInput(f"{where} is not a valid mlkd checkpoint: " + "; ".join(problems))


def _inference_problems(ckpt: dict[str, Any]) -> list[str]:
    """What is wrong with how a trained model is fed: its input size (a typo of -1 or 10**6 would reach the model
    as an allocation of hundreds of GB) and proposal budget, and a top-level value that the model config
    contradicts (which of the two the weights were made for cannot be told, so neither wins)."""
    inference = ckpt["inference"]
    if not isinstance(inference, dict):
        return ["'inference' is not a dict"]
    problems = [rule.problem(inference.get(key), key)
                for key, rule in (("image_size", Rule(True, *SIZE)), ("max_proposals", Rule(True, 1, none="all")))]
    config = ckpt["model_config"] if isinstance(ckpt["model_config"], dict) else {}
    tops = {"input_convention": ckpt["input_convention"]}
    if ckpt["kind"] == "student":  # a teacher's model config has no input size: its test scale is the top level's
        tops["image_size"] = inference.get("image_size")
    problems += [f"{key} {top!r} contradicts model_config.{key} {config[key]!r}" for key, top in tops.items()
                 if key in config and config[key] != top]
    return problems


def upgrade_v1(old: dict[str, Any], where: str) -> dict[str, Any]:
    """A checkpoint of mlkd 0.1 (no ``format_version``) in the version-2 layout."""
    missing = [k for k in ("model", "kind", "input_convention") if k not in old]
    if missing:
        raise BadInput(f"{where} is not an mlkd checkpoint (missing {missing})")
    kind, config = old["kind"], old.get("config")
    if kind != "imagenet_weights" and not isinstance(config, dict):
        raise BadInput(f"{where} is not an mlkd checkpoint (missing 'config')")
    source = dict(old.get("imported_from") or {}) or None
    if kind == "imagenet_weights":
        return make_checkpoint(kind, old["model"], input_convention=old["input_convention"],
                               source={**(source or {}), "backbone": old.get("arch")})
    data = config.get("data", {})
    image_size = config["model"].get("image_size") if kind == "student" else data.get("test_scale")
    return make_checkpoint(kind, old["model"], input_convention=old["input_convention"], classes=old.get("classes", []),
                           model_config=config["model"], image_size=image_size,
                           max_proposals=data.get("max_proposals") if kind == "teacher" else None,
                           dataset=old.get("dataset"), config=config, train_state=_v1_train_state(old), source=source)


def _v1_train_state(old: dict[str, Any]) -> dict[str, Any] | None:
    if "train_state" in old:  # a student: stage, stage_epoch, optimizer, scheduler (+ scale of L_p')
        ts = old["train_state"]
        extra = {"scale": ts["scale"]} if "scale" in ts else {}
        return {"epoch": old["epoch"], "stage": ts["stage"], "stage_epoch": ts["stage_epoch"],
                "optimizer": ts["optimizer"], "scheduler": ts["scheduler"], "extra": extra}
    if "optimizer" in old:  # a teacher: one stage
        return {"epoch": old["epoch"], "stage": 0, "stage_epoch": old["epoch"], "optimizer": old["optimizer"],
                "scheduler": old["scheduler"], "extra": {}}
    return None  # an imported model: nothing to resume


# -- the shareable model folder ----------------------------------------------------------------------------
def write_model_dir(ckpt: dict[str, Any], out: str | Path) -> Path:
    """Write the model of ``ckpt`` (a teacher or student checkpoint dict) into the folder ``out``; its config
    records the weights file's SHA-256 and every tensor's dtype and shape, which :func:`read_model_dir` checks."""
    if ckpt["kind"] not in ("teacher", "student"):
        raise BadInput(f"only trained teachers and students are written as model folders, not {ckpt['kind']}")
    out = Path(out)
    state = {k: v.contiguous() for k, v in ckpt["model"].items()}
    _check_dtypes(state, f"the {ckpt['kind']} being written to {out / WEIGHTS}")
    weights = safetensors.torch.save(state, metadata={"format": MODEL_FORMAT})
    inference = ckpt["inference"]
    config = {"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION, "mlkd_version": __version__,
              "kind": ckpt["kind"], "model_config": ckpt["model_config"], "classes": ckpt["classes"],
              "input_convention": ckpt["input_convention"], "image_size": inference["image_size"],
              "max_proposals": inference.get("max_proposals"), "proposals": inference.get("proposals"),
              "dataset": ckpt.get("dataset"),
              "weights": {"sha256": hashlib.sha256(weights).hexdigest(), "bytes": len(weights),
                          "tensors": {k: _describe(v) for k, v in state.items()}}}
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / WEIGHTS, lambda f: f.write(weights), "model weights")
    write_atomically(out / CONFIG, lambda f: f.write((json.dumps(config, indent=2) + "\n").encode()), "model config")
    return out


def read_model_dir(path: str | Path) -> dict[str, Any]:
    """A model folder as a checkpoint dict (format version 2, no training state); clear errors naming the file.
    The weights are checked against what the config records (checksum, tensors); a folder of format 1 records
    neither, and its tensors are only checked to be floating point."""
    path = Path(path)
    cfg_path, weights = path / CONFIG, path / WEIGHTS
    if not cfg_path.is_file() or not weights.is_file():
        raise NotFound(f"{path} is not an mlkd model folder: it needs {CONFIG} and {WEIGHTS}")
    config = _read_model_config(cfg_path)
    record = config.get("weights")
    if record is None:
        logger.debug("%s records no checksum of %s (a format-1 folder): its weights are read unchecked", cfg_path,
                     WEIGHTS)
    else:
        _check_checksum(weights, record["sha256"], cfg_path)
    try:
        state = safetensors.torch.load_file(str(weights))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise BadInput(f"cannot read weights {weights}: {type(e).__name__}: {e}") from e
    if record is not None:
        _check_recorded(state, record["tensors"], weights)
    _check_dtypes(state, str(weights))
    return make_checkpoint(config["kind"], state, input_convention=config["input_convention"],
                           classes=config["classes"], model_config=config["model_config"],
                           image_size=config["image_size"], max_proposals=config.get("max_proposals"),
                           proposals=config.get("proposals"), dataset=config.get("dataset"),
                           source={"model_dir": str(path)}, where=str(cfg_path))


def _read_model_config(cfg_path: Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a model folder: its format, version and required keys checked."""
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"cannot read {cfg_path}: {e}") from e
    if not isinstance(config, dict) or config.get("format") != MODEL_FORMAT \
            or config.get("format_version") not in range(1, MODEL_FORMAT_VERSION + 1):
        raise BadInput(f"{cfg_path} is not an mlkd model config (format {MODEL_FORMAT!r}, versions 1 to "
                       f"{MODEL_FORMAT_VERSION})")
    required = ["kind", "model_config", "classes", "input_convention", "image_size"]
    missing = [k for k in required + ["weights"] * (config["format_version"] >= 2) if k not in config]
    if missing:
        raise BadInput(f"{cfg_path} lacks {missing}")
    record = config.get("weights")
    tensors = record.get("tensors") if isinstance(record, dict) else None
    if record is not None and not (isinstance(record.get("sha256"), str) and isinstance(tensors, dict) and all(
            isinstance(t, dict) and isinstance(t.get("dtype"), str) and isinstance(t.get("shape"), list)
            for t in tensors.values())):
        raise BadInput(f"{cfg_path}: 'weights' must hold 'sha256' (hex digits) and 'tensors' (name -> {{'dtype', "
                       f"'shape'}}) as mlkd writes them, got {str(record)[:120]}")
    return config


def _check_checksum(weights: Path, expected: str, cfg_path: Path) -> None:
    """Refuse weights whose bytes are not those written: a flipped bit in a tensor's data would otherwise load."""
    digest = hashlib.sha256()
    with open(weights, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected.lower():
        raise BadFile(f"{weights} is damaged: its SHA-256 is {digest.hexdigest()}, {cfg_path.name} records "
                      f"{expected}; the file changed after it was written (copy it again, or export the model again)")


def _describe(tensor: torch.Tensor) -> dict[str, Any]:
    return {"dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape)}


def _check_recorded(state: dict[str, torch.Tensor], tensors: dict[str, Any], weights: Path) -> None:
    """Refuse weights that are not the tensors ``config.json`` records (names, dtypes, shapes)."""
    missing, extra = sorted(set(tensors) - set(state)), sorted(set(state) - set(tensors))
    if missing or extra:
        raise BadInput(f"{weights}: its tensors are not those {CONFIG} records: missing {missing[:5]}, not recorded "
                       f"{extra[:5]}")
    for name, tensor in state.items():
        got, want = _describe(tensor), tensors[name]
        if got != {"dtype": want["dtype"], "shape": want["shape"]}:
            raise BadInput(f"{weights}: tensor {name} is {got['dtype']} {tuple(got['shape'])}; {CONFIG} records "
                           f"{want['dtype']} {tuple(want['shape'])}")


def _check_dtypes(state: dict[str, torch.Tensor], where: str) -> None:
    """Refuse tensors that are not floating point (BatchNorm's integer update counter excepted): the model would
    copy int32 weights into its float parameters without a word."""
    for name, tensor in state.items():
        if not tensor.is_floating_point() and not name.endswith("num_batches_tracked"):
            raise BadInput(f"{where}: tensor {name} is {str(tensor.dtype).removeprefix('torch.')}; expected "
                           "floating point weights")
