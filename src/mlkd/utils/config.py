"""Typed dataclass configs: built from YAML files and ``--set key=value`` overrides, saved resolved.

One dataclass tree per entry point: ``TeacherConfig`` (:mod:`mlkd.training.teacher`) and ``StudentConfig``
(:mod:`mlkd.training.student`); each section lives beside the code it configures (``model`` in
:mod:`mlkd.models.configs`, ``distill`` and ``stages`` in :mod:`mlkd.distill.config`, ``data``, ``optim`` and
``run`` in :mod:`mlkd.training.config`). This module holds the machinery: :func:`from_dict` (unknown keys and wrong
types are errors naming the key, the value and what was expected), :func:`apply_overrides`, :func:`load_config` and
:func:`to_dict`.

A config is a YAML file or the name of one shipped with mlkd (``teacher_coco`` is
``mlkd/configs/teacher_coco.yaml``; :func:`packaged_configs` lists them). A file may start from another with
``base: other.yaml`` (path relative to the file): its keys are applied on top of the base's, section by section.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar, Union

import yaml

from mlkd.errors import BadInput, NotFound

T = TypeVar("T")
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"  # the recipes shipped with mlkd
SIZE = (16, 8192)  # image sizes in pixels: smaller leaves no feature map, larger is a typo that would exhaust memory


def packaged_configs() -> list[str]:
    """Names of the configs shipped with mlkd (``--config NAME`` works from any folder)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config(name: str | Path) -> Path:
    """The YAML file of ``name``: an existing path, else a config shipped with mlkd (``teacher_coco`` or
    ``teacher_coco.yaml``). An unknown name is an error listing the shipped ones."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    raise NotFound(f"config file not found: {name} (neither a file nor one of mlkd's configs: "
                            f"{', '.join(packaged_configs())})")


class _Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where a float needs a dot: ``1e-4`` would be the string "1e-4". Read it as a
    float, as YAML 1.2 and Python do (``optim.lr=1e-4``, ``lr: 5e-5``)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (converting int -> float and lists -> tuples)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ValueError as e:
                errors.append(str(e))
        raise BadInput(errors[0] if len(errors) == 1 else f"{key}: {value!r} is not a {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise BadInput(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise BadInput(f"{key}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise BadInput(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        raise BadInput(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is float and not math.isfinite(value):
        raise BadInput(f"{key}: expected a finite number, got {value!r}")
    return value


def bounded(default: Any, low: float | None = None, high: float | None = None, *, above: bool = False) -> Any:
    """A dataclass field whose value (each item, for a tuple) must lie in [low, high], or in (low, high] with
    ``above``; None (for optional fields) is always allowed. :func:`from_dict` checks it."""
    return dataclasses.field(default=default, metadata={"range": (low, high, above)})


def _check_range(value: Any, bounds: tuple[float | None, float | None, bool], key: str) -> None:
    low, high, above = bounds
    for v in (value if isinstance(value, tuple) else (value,)):
        if v is None:
            continue
        ok = (low is None or (v > low if above else v >= low)) and (high is None or v <= high)
        if not ok:
            lo = "" if low is None else f"{low} {'<' if above else '<='} "
            hi = "" if high is None else f" <= {high}"
            raise BadInput(f"{key}: {v!r} is out of range; expected {lo}value{hi}")


def from_dict(cls: type[T], data: dict[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) dict; missing keys keep their defaults."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise BadInput(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        elsewhere = getattr(cls, "ELSEWHERE", {})  # keys a user may expect here, and where they belong
        hints = "".join(f"; {prefix}{k} {elsewhere[k]}" for k in unknown if k in elsewhere)
        raise BadInput(f"unknown config key(s) {[prefix + k for k in unknown]}{hints}; valid keys here: "
                       f"{[prefix + k for k in fields]}")
    hints = typing.get_type_hints(cls)
    values = {name: _coerce(v, hints[name], prefix + name) for name, v in data.items()}
    for name, value in values.items():
        if "range" in fields[name].metadata:
            _check_range(value, fields[name].metadata["range"], prefix + name)
    obj = cls(**values)
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain nested dict (lists, not tuples) of a dataclass config: what YAML files and checkpoints hold."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(cfg)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file as a dict, its ``base:`` chain resolved."""
    path = Path(path)
    if path.resolve() in _chain:
        raise BadInput(f"config base chain loops: {' -> '.join(str(p) for p in (*_chain, path.resolve()))}")
    if not path.is_file():
        raise NotFound(f"config file not found: {path}")
    try:
        data = _load_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise BadInput(f"cannot parse config {path}: {e}") from e
    if not isinstance(data, dict):
        raise BadInput(f"config {path} must be a mapping of keys, got {type(data).__name__}")
    base = data.pop("base", None)
    return _merge(read_yaml(path.parent / base, (*_chain, path.resolve())), data) if base else data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=0.01"`` -> (["optim", "lr"], 0.01); the value is read as YAML (numbers, lists, null, ...)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise BadInput(f"override must look like key=value (e.g. optim.lr=0.001), got {text!r}")
    try:
        value = _load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise BadInput(f"cannot parse the value of override {text!r}: {e}") from e
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set each ``a.b.c=value`` in the nested dict ``data`` (a copy is returned; checking happens in from_dict)."""
    out = _merge({}, data)
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise BadInput(f"override {text!r}: {k!r} is a value, not a section")
        node[keys[-1]] = value
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """``cls`` built from the YAML file or shipped config ``path`` (optional) with ``overrides`` on top."""
    data = read_yaml(resolve_config(path)) if path else {}
    return from_dict(cls, apply_overrides(data, overrides))


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (what a run actually used), through a ``.tmp`` file: a run killed while
    writing it leaves the previous file or none, never half a config."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)
