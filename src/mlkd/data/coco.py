"""MS-COCO 2014, read as its download lays it out on disk.

Layout::

    ROOT/annotations/instances_train2014.json    ROOT/train2014/COCO_train2014_000000000009.jpg ...
    ROOT/annotations/instances_val2014.json      ROOT/val2014/COCO_val2014_000000000042.jpg ...

- **Classes**: the file's ``categories`` sorted by ``id`` (80 for COCO; ids 1..90 with gaps), names as written
  (``person``, ``bicycle``, ...). This is the order of ML-GCN, ASL and the paper.
- **Images**: by default only images with at least one annotation (82,081 train / 40,137 val, the MLIC
  standard: ASL's loader takes ``coco.imgToAnns.keys()``); ``keep_empty=True`` keeps the others
  (82,783 / 40,504) with all-zero labels and no box. Records are sorted by file name; the image id is the
  ``file_name`` (``COCO_val2014_000000000042.jpg``), stable across copies.
- **Labels**: class ``k`` is 1 when the image has an annotation of category ``k``.
- **Crowd** (``iscrowd=1``, a region of many instances): the MLIC literature counts them as labels (ASL's
  ``CocoDetection`` sets ``output[cat2cat[obj['category_id']]] = 1`` for every annotation, crowd or not;
  ML-GCN's preprocessed lists come from the same annotations), so ``crowd="positive"`` is the default.
  ``crowd="ignore"`` makes a class present *only* through crowd regions -1 (ignore), ``crowd="negative"``
  makes it 0. In every mode crowd boxes are kept with ``box_difficult=True`` so that detection AP ignores
  them (as the COCO evaluation treats crowd regions). Which images are "empty" does not depend on the mode.
- **Boxes**: COCO ``bbox`` is ``[x, y, w, h]`` in continuous pixel coordinates with (0, 0) the top-left
  corner of the image; mlkd's ``(x1, y1, x2, y2) = (x, y, x + w, y + h)``, the same 0-based pixel-edge
  convention, no rounding. ``box_labels`` are class indices.
- **Bad boxes** (:mod:`mlkd.data.boxes`), checked against each image's ``width`` / ``height`` (its file header
  when the entry lacks them): ``bad_boxes="clip"`` (default) clips boxes that cross the image border (COCO has
  some, by fractions of a pixel) and drops zero-area ones, with a warning and the counts in ``box_report``;
  non-finite boxes and negative ``w`` / ``h`` are refused naming the annotation. ``"drop"`` drops every
  defective box, ``"refuse"`` refuses them all. Labels come from the annotations whatever happens to boxes.

An annotation naming a category id that ``categories`` lacks, an image id that ``images`` lacks, or a
malformed ``bbox`` raises ``ValueError`` naming the file, the annotation id and the value.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from mlkd.data.base import (ImageRecord, MultiLabelDataset, Transform, check_record_boxes, drop_missing, known_size,
                            report_boxes)
from mlkd.data.boxes import BoxReport, check_policy
from mlkd.errors import BadInput, NotFound

COCO_SPLITS = ("train2014", "val2014")
CROWD_MODES = ("positive", "ignore", "negative")


def coco_annotation_file(root: str | Path, split: str) -> Path:
    """``ROOT/annotations/instances_<split>.json``; ``ValueError`` for an unknown split."""
    if split not in COCO_SPLITS:
        raise BadInput(f"unknown COCO split {split!r}; expected one of {list(COCO_SPLITS)}")
    return Path(root) / "annotations" / f"instances_{split}.json"


def load_coco_json(path: str | Path) -> dict[str, Any]:
    """Read an ``instances_*.json`` and check it has the lists ``images``, ``annotations``, ``categories``."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"COCO annotation file not found: {path} (expected ROOT/annotations/"
                                f"instances_{{train,val}}2014.json and images in ROOT/{{train,val}}2014/)")
    try:
        with path.open("rb") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"{path}: malformed JSON ({e})") from e
    missing = [k for k in ("images", "annotations", "categories")
               if not isinstance(data, dict) or not isinstance(data.get(k), list)]
    if missing:
        raise BadInput(f"{path}: not a COCO instances file, it lacks the list(s) {missing}")
    return data


def coco_classes(categories: list[dict[str, Any]], path: Path) -> tuple[list[str], dict[int, int]]:
    """Class names sorted by category id, and ``category id -> class index``."""
    by_id: dict[int, str] = {}
    for c in categories:
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
            raise BadInput(f"{path}: each category needs an int 'id' and a str 'name', got {c!r}")
        if c["id"] in by_id:
            raise BadInput(f"{path}: category id {c['id']} appears twice ({by_id[c['id']]!r}, {c['name']!r})")
        by_id[c["id"]] = c["name"]
    ids = sorted(by_id)
    return [by_id[i] for i in ids], {cid: k for k, cid in enumerate(ids)}


def xywh_to_xyxy(bbox: np.ndarray) -> np.ndarray:
    """COCO ``[x, y, w, h]`` ``(M, 4)`` -> ``(M, 4)`` float32 ``(x1, y1, x2, y2) = (x, y, x + w, y + h)``."""
    b = np.asarray(bbox, np.float64).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1).astype(np.float32)


def _check_bbox(bbox: Any, where: str) -> list[float]:
    """The 4 numbers of a ``bbox``; their values (finite, w and h >= 0, inside the image) are the box
    validator's to check, under the dataset's ``bad_boxes`` policy."""
    ok = (isinstance(bbox, list) and len(bbox) == 4
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox))
    if not ok:
        raise BadInput(f"{where}: bbox must be [x, y, w, h] with 4 numbers, got {bbox!r}")
    return [float(v) for v in bbox]


def _image_hw(im: dict[str, Any]) -> tuple[int, int] | None:
    """``(height, width)`` of an ``images`` entry, or None when it lacks valid ones."""
    h, w = im.get("height"), im.get("width")
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in (h, w))
    return (int(h), int(w)) if ok else None


def group_annotations(data: dict[str, Any], cat_index: dict[int, int], path: Path
                      ) -> dict[int, tuple[list[list[float]], list[int], list[bool], list[Any]]]:
    """``image id -> (bboxes [x, y, w, h], class indices, crowd flags, annotation ids)``, validating every
    annotation."""
    image_ids = {im.get("id") for im in data["images"] if isinstance(im, dict)}
    grouped: dict[int, tuple[list[list[float]], list[int], list[bool], list[Any]]] = {}
    for ann in data["annotations"]:
        if not isinstance(ann, dict):
            raise BadInput(f"{path}: each annotation must be a JSON object, got {ann!r}")
        where = f"{path}: annotation id {ann.get('id')}"
        cid, iid = ann.get("category_id"), ann.get("image_id")
        if cid not in cat_index:
            raise BadInput(f"{where} has category_id {cid!r}, which is not among the file's categories "
                             f"(ids {sorted(cat_index)})")
        if iid not in image_ids:
            raise BadInput(f"{where} has image_id {iid!r}, which is not among the file's images")
        crowd = ann.get("iscrowd", 0)
        if crowd not in (0, 1):
            raise BadInput(f"{where}: iscrowd must be 0 or 1, got {crowd!r}")
        boxes, labels, crowds, ann_ids = grouped.setdefault(iid, ([], [], [], []))
        boxes.append(_check_bbox(ann.get("bbox"), where))
        labels.append(cat_index[cid])
        crowds.append(bool(crowd))
        ann_ids.append(ann.get("id"))
    return grouped


def image_labels(box_labels: np.ndarray, crowd: np.ndarray, num_classes: int, mode: str) -> np.ndarray:
    """``(K,)`` int8 labels from an image's annotations: 1 for non-crowd classes; crowd-only classes 1, -1
    or 0 for ``mode`` ``"positive"``, ``"ignore"``, ``"negative"``."""
    labels = np.zeros(num_classes, np.int8)
    crowd_value = {"positive": 1, "ignore": -1, "negative": 0}[mode]
    labels[box_labels[crowd]] = crowd_value
    labels[box_labels[~crowd]] = 1  # a non-crowd instance wins over a crowd region
    return labels


Source = tuple["tuple[int, int] | None", list[list[float]], list[Any]]  # (H, W) or None, raw bboxes, annotation ids


def coco_records(data: dict[str, Any], image_dir: Path, path: Path, crowd: str, keep_empty: bool
                 ) -> tuple[list[str], list[ImageRecord], list[str], dict[str, Source]]:
    """Classes, records sorted by file name, the file names of images without any annotation, and per file name
    what the json says of the image and its boxes (``(H, W)`` or None, raw bboxes, annotation ids)."""
    classes, cat_index = coco_classes(data["categories"], path)
    grouped = group_annotations(data, cat_index, path)
    records, empty, seen, sources = [], [], set(), {}
    for im in data["images"]:
        if not isinstance(im, dict) or not isinstance(im.get("file_name"), str) or "id" not in im:
            raise BadInput(f"{path}: each image needs an 'id' and a str 'file_name', got {im!r}")
        if im["file_name"] in seen:
            raise BadInput(f"{path}: file_name {im['file_name']!r} is listed twice")
        seen.add(im["file_name"])
        if im["id"] not in grouped:
            empty.append(im["file_name"])
            if not keep_empty:
                continue
        bboxes, labels, crowds, ann_ids = grouped.get(im["id"], ([], [], [], []))
        box_labels, is_crowd = np.asarray(labels, np.int64), np.asarray(crowds, bool)
        records.append(ImageRecord(
            image_id=im["file_name"], path=image_dir / im["file_name"],
            labels=image_labels(box_labels, is_crowd, len(classes), crowd),
            boxes=xywh_to_xyxy(np.asarray(bboxes, np.float64)), box_labels=box_labels, box_difficult=is_crowd,
            extra={"coco_id": im["id"]}))
        sources[im["file_name"]] = (_image_hw(im), bboxes, ann_ids)
    records.sort(key=lambda r: r.image_id)
    return classes, records, sorted(empty), sources


def check_coco_boxes(records: list[ImageRecord], sources: dict[str, Source], policy: str, path: Path) -> BoxReport:
    """Apply the ``bad_boxes`` policy to every record's boxes, against the size the json gives for the image
    (its file header when the json has none); messages name the annotation id and its raw bbox."""
    sizes = [sources[r.image_id][0] or (known_size(r.path) if len(r.boxes) else None) for r in records]

    def name_box(r: ImageRecord, j: int) -> str:
        _, bboxes, ann_ids = sources[r.image_id]
        return f"annotation id {ann_ids[j]} (image {r.image_id}, bbox {bboxes[j]})"

    return check_record_boxes(records, sizes, policy, str(path), name_box)


class CocoDataset(MultiLabelDataset):
    """MS-COCO 2014 (layout, labels, crowd handling and box convention in the module docstring).

    Args:
        root: the folder holding ``annotations/`` and ``train2014/`` / ``val2014/``.
        split: ``"train2014"`` or ``"val2014"``.
        transform: applied to each ``(image, target)``.
        skip_missing: image files that do not exist raise ``FileNotFoundError``; with True they are dropped
            and listed in ``self.excluded["missing"]``.
        keep_empty: keep images without any annotation (all-zero labels); default False, the standard
            counts. Left-out ones are listed in ``self.excluded["empty"]``.
        crowd: ``"positive"`` (default, as the MLIC literature), ``"ignore"`` or ``"negative"``: the label of a
            class present only through ``iscrowd=1`` annotations.
        bad_boxes: ``"clip"`` (default), ``"drop"`` or ``"refuse"``: what happens to defective boxes (module
            docstring); ``self.box_report`` has the counts.

    Identity: name ``coco2014``, split as given.
    """

    OPTIONS = ("keep_empty", "crowd", "bad_boxes")

    def __init__(self, root: str | Path, split: str, transform: Transform | None = None,
                 skip_missing: bool = False, keep_empty: bool = False, crowd: str = "positive",
                 bad_boxes: str = "clip") -> None:
        if crowd not in CROWD_MODES:
            raise BadInput(f"crowd must be one of {list(CROWD_MODES)}, got {crowd!r}")
        check_policy(bad_boxes)
        path = coco_annotation_file(root, split)
        self.root, self.annotation_file = Path(root), path
        classes, records, empty, sources = coco_records(load_coco_json(path), Path(root) / split, path, crowd,
                                                        keep_empty)
        records, missing = drop_missing(records, skip_missing, str(path), Path(root) / split)
        box_report = check_coco_boxes(records, sources, bad_boxes, path)
        report_boxes(box_report, bad_boxes)
        super().__init__("coco2014", split, classes, records, transform,
                         excluded={"missing": missing, "empty": [] if keep_empty else empty}, box_report=box_report)
