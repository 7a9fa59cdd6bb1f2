"""Datasets from spec strings (``voc:/data:2007:test``, ``train.jsonl``, ...): the one place that knows every
format mlkd reads and its options."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from mlkd.data.base import MultiLabelDataset, Transform
from mlkd.data.coco import CocoDataset
from mlkd.data.custom import ANNOTATION_SUFFIXES, CustomDataset
from mlkd.data.datalist import DatalistDataset
from mlkd.data.nuswide import NusWideDataset
from mlkd.data.voc import VOCDataset
from mlkd.errors import BadInput

# Dataset specs accepted by build_dataset (printed in help): form -> what it reads and its options.
# bad_boxes: what happens to defective ground-truth boxes (mlkd.data.boxes); clip is the default.
DATASET_FORMS: dict[str, str] = {
    "PATH.jsonl | PATH.ndjson": "custom format, JSON lines; options classes, root, split, bad_boxes=clip|drop|refuse",
    "PATH.csv": "custom format, CSV; options classes, root, split, bad_boxes=clip|drop|refuse",
    "coco:ROOT:SPLIT": "MS-COCO 2014, SPLIT train2014|val2014; options keep_empty, crowd=positive|ignore|negative, "
                       "bad_boxes=clip|drop|refuse",
    "voc:ROOT:YEAR:SPLIT": "PASCAL VOC, YEAR 2007|2012, SPLIT train|val|trainval|test; "
                           "options difficult=ignore|positive|negative, keep_empty, bad_boxes=clip|drop|refuse",
    "nuswide:ROOT:SPLIT": "NUS-WIDE, SPLIT train|test; options image_root, label_source=auto|traintest|all, "
                          "keep_no_label, image_manifest",
    "datalist:PATH:CLASSES_FILE": "the release's datalist with its proposals; options root, split",
}

# Prefixed forms: name -> (the fields after "name:", builder taking them positionally, its options).
_PREFIXED: dict[str, tuple[tuple[str, ...], Callable[..., MultiLabelDataset], tuple[str, ...]]] = {
    "coco": (("ROOT", "SPLIT"), CocoDataset, CocoDataset.OPTIONS),
    "voc": (("ROOT", "YEAR", "SPLIT"), VOCDataset, VOCDataset.OPTIONS),
    "nuswide": (("ROOT", "SPLIT"), NusWideDataset, NusWideDataset.OPTIONS),
    "datalist": (("PATH", "CLASSES_FILE"), DatalistDataset, DatalistDataset.OPTIONS),
}


def _forms() -> str:
    return "\n  ".join(f"{k:28s} {v}" for k, v in DATASET_FORMS.items())


def parse_spec(spec: str) -> tuple[str, list[str]]:
    """``"voc:/data:2007:test"`` -> ``("voc", ["/data", "2007", "test"])``; an annotation file -> ``("custom", [path])``.

    Fields are split from the right, so the first one (a root or path) may itself contain ``:``.
    """
    name, sep, rest = spec.partition(":")
    if sep and name in _PREFIXED:
        names = _PREFIXED[name][0]
        fields = rest.rsplit(":", len(names) - 1)
        if len(fields) != len(names) or not all(fields):
            raise BadInput(f"dataset spec {spec!r} must be {name}:{':'.join(names)}; accepted forms:\n  {_forms()}")
        return name, fields
    if Path(spec).suffix.lower() in ANNOTATION_SUFFIXES:
        return "custom", [spec]
    raise BadInput(f"unrecognised dataset spec {spec!r}; accepted forms:\n  {_forms()}")


def build_dataset(spec: str, transform: Transform | None = None, skip_missing: bool | None = None,
                  **options: Any) -> MultiLabelDataset:
    """Build a dataset from a spec string (forms and options in ``DATASET_FORMS``).

    Args:
        spec: e.g. ``data/train.jsonl``, ``coco:/data/coco:val2014``, ``voc:/data:2007:test``,
            ``nuswide:/data/nus:test``, ``datalist:lists/train.txt:lists/classes.txt``.
        transform: applied to each ``(image, target)``.
        skip_missing: True drops listed images whose file does not exist (reported in ``dataset.excluded``),
            False raises; None keeps the dataset's default (False, but True for NUS-WIDE).
        options: dataset-specific keyword arguments; an unknown one raises listing the valid ones.
    """
    name, fields = parse_spec(spec)
    valid = CustomDataset.OPTIONS if name == "custom" else _PREFIXED[name][2]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise BadInput(f"unknown option(s) {unknown} for a {name} dataset; valid options: {list(valid)}")
    builder = CustomDataset if name == "custom" else _PREFIXED[name][1]
    if skip_missing is not None:
        options["skip_missing"] = skip_missing
    return builder(*fields, transform=transform, **options)
