"""The custom dataset format: a CSV or JSON-lines annotation file of image paths, label names and optional boxes.

JSON lines (``.jsonl`` / ``.ndjson``), one image per line (blank lines are skipped)::

    {"path": "images/0001.png", "labels": ["cat", "dog"], "boxes": [[12, 30, 80, 95, "cat"], ...]}

CSV (``.csv``) with a header row; columns ``path`` and ``labels`` (names separated by ``;`` or ``|``,
empty = no positive label), optional ``boxes`` (the same JSON list as above) and ``ignore``::

    path,labels,boxes
    images/0001.png,cat;dog,"[[12, 30, 80, 95, ""cat""]]"

- ``path`` and ``labels`` are required (``"labels": []`` for an image without positive labels); ``boxes`` and
  ``ignore`` are optional. Any other key (a JSON key, a CSV column) is an error naming it, so a typo such as
  ``"lables"`` cannot silently make an image without labels.
- ``boxes``: (x1, y1, x2, y2) pixels of the image file, 0-based, x2 > x1 and y2 > y1, each followed by its
  class name, which must be one of the image's labels. Their values go through the box validator
  (:mod:`mlkd.data.boxes`) under the option ``bad_boxes``: ``"clip"`` (default) clips boxes that cross the
  image border and drops zero-area ones, with a warning and the counts in ``box_report``; non-finite and
  inverted boxes are refused naming ``file:line``. ``"drop"`` drops every defective box, ``"refuse"`` refuses
  them all. The format has no image size: it is read from the header of each image that has boxes (Pillow reads
  only the header); an image whose header cannot be read has its boxes checked without the size.
- ``ignore`` (optional): names whose label is -1 ("ignore for this class" in training and metrics).
- ``path``: relative to ``root`` (default: the annotation file's folder) or absolute. It is the image id, as
  written, so ids are stable wherever the dataset is moved; paths must be unique, and so must the files they name
  (``a.png`` and ``./a.png``, an absolute path, a symlink or a hard link to one file are refused naming both rows).

Class order (part of the dataset's identity): ``classes`` may be a list of names or a path to a text file
(one name per line). If omitted, ``classes.txt`` next to the annotation file is used when it exists; otherwise the
sorted set of names in the annotation file is used **and written to** ``classes.txt`` next to it, so every later
load (and the other splits in that folder) reuse the same order. Load the split with every class first,
or pass ``classes`` explicitly.
"""

from __future__ import annotations

import csv
import json
import re
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from mlkd.data.base import (ImageRecord, MultiLabelDataset, Transform, check_record_boxes, drop_missing, known_size,
                            refuse_aliases, report_boxes)
from mlkd.data.boxes import check_policy
from mlkd.errors import BadInput, NotFound

ANNOTATION_SUFFIXES = (".jsonl", ".ndjson", ".csv")
CLASSES_FILE = "classes.txt"
REQUIRED_KEYS = ("path", "labels")
OPTIONAL_KEYS = ("boxes", "ignore")
_VALID_KEYS = (f"valid keys are {', '.join(REQUIRED_KEYS)} (required) and {', '.join(OPTIONAL_KEYS)} (optional); "
               "an image without positive labels has an empty labels list")


def _fail(where: str, message: str) -> BadInput:
    return BadInput(f"{where}: {message}")


def _check_keys(where: str, keys: Sequence[str], what: str) -> None:
    """Refuse unknown keys (a typo like 'lables' would silently drop the labels) and missing required ones."""
    unknown = [k for k in keys if k not in REQUIRED_KEYS + OPTIONAL_KEYS]
    missing = [k for k in REQUIRED_KEYS if k not in keys]
    if unknown:
        raise _fail(where, f"unknown {what}(s) {unknown}; {_VALID_KEYS}")
    if missing:
        raise _fail(where, f"missing required {what}(s) {missing}; {_VALID_KEYS}")


def _iter_jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``("file:line", row dict)`` for each non-blank line of a JSON-lines annotation file."""
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise _fail(where, f"malformed JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(row, dict):
                raise _fail(where, f"expected a JSON object with 'path' and 'labels', got {type(row).__name__}")
            _check_keys(where, list(row), "key")
            yield where, row


def _split_names(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"[;|]", text) if s.strip()]


def _iter_csv(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``("file:line", row dict)`` for each CSV row; ``labels``/``ignore`` split, ``boxes`` JSON-decoded."""
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        missing = [c for c in REQUIRED_KEYS if c not in columns]
        if missing:
            raise _fail(f"{path}:1", f"CSV header must have columns 'path' and 'labels' (optional 'boxes', "
                                     f"'ignore'); missing {missing}, header is {columns}")
        _check_keys(f"{path}:1", columns, "CSV column")
        for raw in reader:
            where = f"{path}:{reader.line_num}"
            if None in raw or None in raw.values():  # DictReader's marks of a row longer or shorter than the header
                fields = sum(v is not None for k, v in raw.items() if k is not None) + len(raw.get(None) or [])
                raise _fail(where, f"the row has {fields} fields where the header {columns} has {len(columns)} "
                                   "(a value with a comma needs quotes)")
            row: dict[str, Any] = {"path": raw["path"], "labels": _split_names(raw["labels"])}
            if raw.get("ignore"):
                row["ignore"] = _split_names(raw["ignore"])
            if raw.get("boxes") and raw["boxes"].strip():
                try:
                    row["boxes"] = json.loads(raw["boxes"])
                except json.JSONDecodeError as e:
                    raise _fail(where, f"malformed JSON in the 'boxes' column ({e.msg}): {raw['boxes']!r}") from e
            yield where, row


def read_annotations(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """Parse an annotation file into ``[("file:line", {"path", "labels", optional "boxes", "ignore"}), ...]``.

    Only the syntax is checked here; names and boxes are validated by :class:`CustomDataset`.
    """
    path = Path(path)
    if path.suffix.lower() not in ANNOTATION_SUFFIXES:
        raise BadInput(f"unknown annotation file type {path.suffix!r} for {path}; expected one of {ANNOTATION_SUFFIXES}")
    if not path.is_file():
        raise NotFound(f"annotation file not found: {path}")
    rows = list(_iter_csv(path) if path.suffix.lower() == ".csv" else _iter_jsonl(path))
    if not rows:
        raise BadInput(f"annotation file {path} lists no images")
    return rows


def write_jsonl_annotations(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write rows ``{"path", "labels", optional "boxes"}`` as a JSON-lines annotation file (one object per line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, separators=(", ", ": ")) + "\n")


def read_class_file(path: str | Path) -> list[str]:
    """One class name per line, in order; blank lines skipped."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"class list file not found: {path}")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _names_in(rows: Sequence[tuple[str, dict[str, Any]]]) -> set[str]:
    names: set[str] = set()
    for _, row in rows:
        names.update(str(n) for n in row.get("labels") or [])
        names.update(str(n) for n in row.get("ignore") or [])
    return names


def resolve_classes(annotations: Path, rows: Sequence[tuple[str, dict[str, Any]]],
                    classes: str | Path | Sequence[str] | None) -> tuple[list[str], str]:
    """The class order and where it came from: the given list, the given file, ``classes.txt`` beside the
    annotation file, or inferred (sorted names in it) and saved as that ``classes.txt``."""
    if isinstance(classes, (str, Path)):
        return read_class_file(classes), str(classes)
    if classes is not None:
        return [str(c) for c in classes], "the given list"
    beside = annotations.parent / CLASSES_FILE
    if beside.is_file():
        return read_class_file(beside), str(beside)
    inferred = sorted(_names_in(rows))
    if not inferred:
        raise BadInput(f"{annotations} names no class at all; pass the class list (classes=... / --classes)")
    try:
        beside.write_text("".join(f"{c}\n" for c in inferred), encoding="utf-8")
    except OSError as e:  # a read-only dataset folder must still load; the order is then only in memory
        warnings.warn(f"could not save the inferred class list to {beside}: {e}", stacklevel=3)
    return inferred, f"the names in {annotations}"


def _label_vector(where: str, row: dict[str, Any], index: dict[str, int], source: str) -> np.ndarray:
    """``(K,)`` int8 multi-hot of a row: 1 for ``labels``, -1 for ``ignore``, 0 otherwise."""
    labels = np.zeros(len(index), np.int8)
    for key, value in (("labels", 1), ("ignore", -1)):
        names = row.get(key) or []
        if not isinstance(names, list):
            raise _fail(where, f"'{key}' must be a list of class names, got {names!r}")
        for name in names:
            if str(name) not in index:
                raise _fail(where, f"unknown class {name!r}; valid classes (from {source}) are {list(index)}")
            if value == -1 and labels[index[str(name)]] == 1:
                raise _fail(where, f"class {name!r} is both in 'labels' and in 'ignore'")
            labels[index[str(name)]] = value
    return labels


def _parse_boxes(where: str, boxes: Any, labels: np.ndarray, index: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """Read ``[[x1, y1, x2, y2, name], ...]``; return ``(M, 4)`` float32 boxes and ``(M,)`` int64 labels.

    The form and the class names are checked here; the coordinates by the box validator, with the image size."""
    if not isinstance(boxes, list):
        raise _fail(where, f"'boxes' must be a list of [x1, y1, x2, y2, name], got {boxes!r}")
    coords, names = [], []
    for b in boxes:
        ok = isinstance(b, list) and len(b) == 5 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in b[:4])
        if not ok:
            raise _fail(where, f"each box must be [x1, y1, x2, y2, class name], got {b!r}")
        name = str(b[4])
        if name not in index:
            raise _fail(where, f"box {b!r} names unknown class {name!r}; valid classes are {list(index)}")
        if labels[index[name]] == 0:
            raise _fail(where, f"box {b!r} has class {name!r}, which is not among the image's labels")
        coords.append(tuple(float(v) for v in b[:4]))
        names.append(index[name])
    return np.asarray(coords, np.float32).reshape(-1, 4), np.asarray(names, np.int64)


def _records(rows: Sequence[tuple[str, dict[str, Any]]], classes: list[str], root: Path,
             source: str) -> list[ImageRecord]:
    """Turn parsed rows into :class:`ImageRecord` s, validating every name, box and id."""
    index = {c: i for i, c in enumerate(classes)}
    records, seen = [], {}
    for where, row in rows:
        path = row.get("path")
        if not isinstance(path, str) or not path.strip():
            raise _fail(where, f"'path' must be a non-empty string, got {path!r}")
        if path in seen:
            raise _fail(where, f"duplicate image path {path!r} (first at {seen[path]}); image ids must be unique")
        seen[path] = where
        labels = _label_vector(where, row, index, source)
        record = ImageRecord(image_id=path, path=root / path, labels=labels, extra={"source": where})
        if row.get("boxes") is not None:
            record.boxes, record.box_labels = _parse_boxes(where, row["boxes"], labels, index)
        records.append(record)
    return records


class CustomDataset(MultiLabelDataset):
    """A dataset read from a CSV or JSON-lines annotation file (format in the module docstring).

    Args:
        annotations: path to the ``.jsonl`` / ``.ndjson`` / ``.csv`` file.
        classes: list of names, or a path to a class list file; None = ``classes.txt`` beside the annotation file,
            else inferred (sorted) and saved there.
        root: folder the image paths are relative to (default: the annotation file's folder).
        transform: applied to each ``(image, target)``.
        split: split name (default: the annotation file's stem, e.g. ``train``).
        skip_missing: image files that do not exist raise ``FileNotFoundError`` (listing up to 10 and the
            count); with True they are dropped instead, listed in ``self.missing``, and a warning gives the count.
        bad_boxes: ``"clip"`` (default), ``"drop"`` or ``"refuse"``: what happens to defective boxes (module
            docstring); ``self.box_report`` has the counts.

    Options of ``build_dataset`` for this form: ``OPTIONS``.
    """

    OPTIONS = ("classes", "root", "split", "bad_boxes")

    def __init__(self, annotations: str | Path, classes: str | Path | Sequence[str] | None = None,
                 root: str | Path | None = None, transform: Transform | None = None, split: str | None = None,
                 skip_missing: bool = False, bad_boxes: str = "clip") -> None:
        check_policy(bad_boxes)
        annotations = Path(annotations)
        rows = read_annotations(annotations)
        class_list, source = resolve_classes(annotations, rows, classes)
        self.annotations = annotations
        self.root = Path(root) if root is not None else annotations.parent
        records = _records(rows, class_list, self.root, source)
        records, missing = drop_missing(records, skip_missing, str(annotations), self.root)
        refuse_aliases(records, annotations)  # ids are paths as written: two spellings of a file would be two images
        # the format has no image size: read the header of the images with boxes (nothing is decoded)
        sizes = [known_size(r.path) if r.boxes is not None and len(r.boxes) else None for r in records]
        box_report = check_record_boxes(
            records, sizes, bad_boxes, str(annotations),
            lambda r, j: f"{r.extra['source']} boxes[{j}] ({class_list[r.box_labels[j]]!r})")
        report_boxes(box_report, bad_boxes)
        super().__init__("custom", split or annotations.stem, class_list, records, transform,
                         excluded={"missing": missing}, box_report=box_report)
