"""PASCAL VOC 2007 / 2012, read as the devkit lays it out on disk.

Layout (``root`` may be the folder holding ``VOCdevkit``, ``VOCdevkit`` itself, or ``VOC<year>`` itself)::

    VOCdevkit/VOC2007/Annotations/000005.xml
    VOCdevkit/VOC2007/ImageSets/Main/{train,val,trainval,test}.txt   one image id per line
    VOCdevkit/VOC2007/JPEGImages/000005.jpg

- **Classes**: the 20 of the devkit in its order (``VOC_CLASSES``). The image id is the VOC id (``000005``).
- **Labels**: class ``k`` is 1 when the image has a non-difficult object of class ``k``. A class present only
  through ``<difficult>1</difficult>`` objects is -1 (ignore) by default, which is the official VOC
  classification protocol (the devkit's ``<class>_<split>.txt`` files mark such images 0, "difficult",
  and its evaluation leaves them out); ``difficult="positive"`` counts it 1, ``"negative"`` counts it 0.
  A missing ``<difficult>`` tag means 0 (some VOC2012 objects have none).
- **Boxes**: every object's box with ``box_difficult``, for detection AP. VOC ``<bndbox>`` values are
  1-based *inclusive* pixel indices (the top-left pixel is (1, 1); a box covering pixel columns 1..10 has
  xmin = 1, xmax = 10). mlkd boxes are 0-based pixel *edges*, so the same pixels are
  ``(x1, y1, x2, y2) = (xmin - 1, ymin - 1, xmax, ymax)``: exact, no rounding (some VOC2012 values are
  written as decimals and are kept as such).
- **An XML with no object** (no official VOC image of a Main split has one; a labelImg-style custom set can):
  the image is left out by default and reported (warning, ``self.excluded["empty"]``), because all-zero
  labels from a truncated annotation would be a silent wrong label for every class; ``keep_empty=True``
  keeps such images with all-zero labels and no box, for sets whose background images are meant as negatives.

- **Bad boxes** (:mod:`mlkd.data.boxes`), checked against the XML's ``<size>`` (the JPEG's header when the XML
  has none): ``bad_boxes="clip"`` (default) clips boxes that cross the image border and drops zero-area ones,
  with a warning and the counts in ``box_report``; NaN / inf coordinates and inverted boxes (xmax < xmin) are
  refused naming the XML file and the object. ``"drop"`` drops every defective box, ``"refuse"`` refuses them
  all. Labels come from the objects whatever happens to their boxes.

Errors name the file: an unknown class name (with the valid ones), a malformed XML, a missing or
non-numeric box field, a bad box (above). A listed id whose XML or JPEG is missing raises
``FileNotFoundError`` (ids listed) unless ``skip_missing``, which drops and reports it.
"""

from __future__ import annotations

import re
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from mlkd.data.base import (ImageRecord, MultiLabelDataset, Transform, check_record_boxes, known_size, listed,
                            report_boxes)
from mlkd.data.boxes import BoxReport, check_policy
from mlkd.errors import BadInput, NotFound

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
VOC_YEARS = ("2007", "2012")
VOC_SPLITS = ("train", "val", "trainval", "test")
DIFFICULT_MODES = ("ignore", "positive", "negative")


def find_voc_dir(root: str | Path, year: str) -> Path:
    """The ``VOC<year>`` folder for ``root`` = its parent's parent, ``VOCdevkit``, or the folder itself."""
    if str(year) not in VOC_YEARS:
        raise BadInput(f"unknown VOC year {year!r}; expected one of {list(VOC_YEARS)}")
    root = Path(root)
    candidates = [root / "VOCdevkit" / f"VOC{year}", root / f"VOC{year}", root]
    for c in candidates:
        if (c / "ImageSets" / "Main").is_dir() and (c.name == f"VOC{year}" or not re.fullmatch(r"VOC\d{4}", c.name)):
            return c
    raise NotFound(f"no PASCAL VOC {year} devkit under {root}: looked for ImageSets/Main in "
                            f"{[str(c) for c in candidates]} (expected ROOT/VOCdevkit/VOC{year}/{{Annotations, "
                            f"ImageSets/Main, JPEGImages}})")


def read_split(voc_dir: Path, split: str) -> list[str]:
    """Image ids of ``ImageSets/Main/<split>.txt`` (first field of each non-blank line), duplicates refused."""
    if split not in VOC_SPLITS:
        raise BadInput(f"unknown VOC split {split!r}; expected one of {list(VOC_SPLITS)}")
    path = voc_dir / "ImageSets" / "Main" / f"{split}.txt"
    if not path.is_file():
        raise NotFound(f"VOC split file not found: {path}")
    ids, seen = [], {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            image_id = line.split()[0]
            if image_id in seen:
                raise BadInput(f"{path}:{n}: image id {image_id!r} repeats line {seen[image_id]}")
            seen[image_id] = n
            ids.append(image_id)
    return ids


def voc_to_boxes(xyxy_1based: np.ndarray) -> np.ndarray:
    """VOC ``(xmin, ymin, xmax, ymax)`` 1-based inclusive ``(M, 4)`` -> ``(M, 4)`` float32 0-based pixel edges
    ``(xmin - 1, ymin - 1, xmax, ymax)``; a 0 (written by some tools for the first pixel) maps to edge 0. Other
    values are converted as they are: what lies outside the image is for the box validator to report."""
    b = np.asarray(xyxy_1based, np.float64).reshape(-1, 4)
    out = b - np.array([1.0, 1.0, 0.0, 0.0])
    out[:, :2] = np.where(b[:, :2] == 0, 0.0, out[:, :2])
    return out.astype(np.float32)


def _text(node: ET.Element, tag: str, where: str) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise BadInput(f"{where}: missing <{tag}>")
    return child.text.strip()


def _number(node: ET.Element, tag: str, where: str) -> float:
    text = _text(node, tag, where)
    try:
        return float(text)
    except ValueError:
        raise BadInput(f"{where}: <{tag}> is {text!r}, not a number") from None


def _size(root: ET.Element) -> tuple[int, int] | None:
    """``(height, width)`` from ``<size>``, or None when it is missing or not two positive numbers."""
    try:
        h, w = (float(root.findtext(f"size/{t}", "")) for t in ("height", "width"))
    except ValueError:
        return None
    return (int(h), int(w)) if h > 0 and w > 0 and np.isfinite([h, w]).all() else None


def parse_voc_xml(path: Path, class_index: dict[str, int]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int] | None]:
    """Objects of one annotation file: ``boxes (M, 4)`` VOC 1-based ``xmin ymin xmax ymax`` float64 as written
    (their values are checked by the box validator), ``labels (M,)`` int64 class indices, ``difficult (M,)`` bool,
    and the image's ``(H, W)`` from ``<size>`` (None if absent)."""
    try:
        tree = ET.parse(path)
    except ET.ParseError as e:
        raise BadInput(f"{path}: malformed XML ({e})") from e
    boxes, labels, difficult = [], [], []
    for i, obj in enumerate(tree.getroot().findall("object")):  # direct children: <part>s are not objects
        where = f"{path}: object {i + 1}"
        name = _text(obj, "name", where)
        if name not in class_index:
            raise BadInput(f"{path}: unknown class name {name!r} (object {i + 1}); valid VOC classes are "
                             f"{list(class_index)}")
        box_node = obj.find("bndbox")
        if box_node is None:
            raise BadInput(f"{where} ({name!r}): missing <bndbox>")
        box = [_number(box_node, t, f"{where} ({name!r})") for t in ("xmin", "ymin", "xmax", "ymax")]
        flag = obj.find("difficult")
        boxes.append(box)
        labels.append(class_index[name])
        difficult.append(flag is not None and (flag.text or "0").strip() not in ("0", ""))
    return (np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(labels, np.int64), np.asarray(difficult, bool),
            _size(tree.getroot()))


def voc_labels(box_labels: np.ndarray, difficult: np.ndarray, num_classes: int, mode: str) -> np.ndarray:
    """``(K,)`` int8: 1 for classes with a non-difficult object; difficult-only classes -1, 1 or 0 for
    ``mode`` ``"ignore"``, ``"positive"``, ``"negative"``."""
    labels = np.zeros(num_classes, np.int8)
    labels[box_labels[difficult]] = {"ignore": -1, "positive": 1, "negative": 0}[mode]
    labels[box_labels[~difficult]] = 1
    return labels


class VOCDataset(MultiLabelDataset):
    """PASCAL VOC 2007 / 2012 (layout, difficult handling and box convention in the module docstring).

    Args:
        root: folder holding ``VOCdevkit``, or ``VOCdevkit``, or ``VOC<year>``.
        year: ``"2007"`` or ``"2012"``.
        split: ``"train"``, ``"val"``, ``"trainval"`` or ``"test"``.
        transform: applied to each ``(image, target)``.
        skip_missing: a listed id whose XML or JPEG is missing raises ``FileNotFoundError``; with True it
            is dropped, listed in ``self.excluded["missing"]``, and a warning gives the count.
        difficult: ``"ignore"`` (default, official), ``"positive"`` or ``"negative"``: the label of a class
            present only through difficult objects.
        keep_empty: keep images whose XML has no object, with all-zero labels (default: left out, reported).
        bad_boxes: ``"clip"`` (default), ``"drop"`` or ``"refuse"``: what happens to defective boxes (module
            docstring); ``self.box_report`` has the counts.

    Identity: name ``voc<year>``, split as given.
    """

    OPTIONS = ("difficult", "keep_empty", "bad_boxes")

    def __init__(self, root: str | Path, year: str | int, split: str, transform: Transform | None = None,
                 skip_missing: bool = False, difficult: str = "ignore", keep_empty: bool = False,
                 bad_boxes: str = "clip") -> None:
        if difficult not in DIFFICULT_MODES:
            raise BadInput(f"difficult must be one of {list(DIFFICULT_MODES)}, got {difficult!r}")
        check_policy(bad_boxes)
        year = str(year)
        self.voc_dir = find_voc_dir(root, year)
        ids = read_split(self.voc_dir, split)
        missing = [i for i in ids if not (self.voc_dir / "Annotations" / f"{i}.xml").is_file()
                   or not (self.voc_dir / "JPEGImages" / f"{i}.jpg").is_file()]
        source = self.voc_dir / "ImageSets" / "Main" / f"{split}.txt"
        if missing and not skip_missing:
            raise NotFound(f"{len(missing)} of {len(ids)} images listed in {source} lack their "
                                    f"Annotations/<id>.xml or JPEGImages/<id>.jpg under {self.voc_dir}:"
                                    f"{listed(missing)}\n(pass skip_missing=True / --skip-missing to drop them)")
        lost = set(missing)
        records, empty, box_report = self._records([i for i in ids if i not in lost], difficult, keep_empty,
                                                   bad_boxes)
        if missing:
            warnings.warn(f"{source}: skipped {len(missing)} images with a missing XML or JPEG", stacklevel=2)
        if empty and not keep_empty:
            warnings.warn(f"{source}: left out {len(empty)} images whose XML has no object (e.g. {empty[0]}); "
                          "pass keep_empty=True to keep them with all-zero labels", stacklevel=2)
        report_boxes(box_report, bad_boxes)
        super().__init__(f"voc{year}", split, VOC_CLASSES, records, transform,
                         excluded={"missing": missing, "empty": [] if keep_empty else empty}, box_report=box_report)

    def _records(self, ids: list[str], difficult: str, keep_empty: bool, bad_boxes: str
                 ) -> tuple[list[ImageRecord], list[str], BoxReport]:
        index = {c: k for k, c in enumerate(VOC_CLASSES)}
        records, empty, sizes, raw = [], [], [], {}
        for image_id in ids:
            boxes, labels, hard, size = parse_voc_xml(self.voc_dir / "Annotations" / f"{image_id}.xml", index)
            if len(labels) == 0:
                empty.append(image_id)
                if not keep_empty:
                    continue
            records.append(ImageRecord(
                image_id=image_id, path=self.voc_dir / "JPEGImages" / f"{image_id}.jpg",
                labels=voc_labels(labels, hard, len(VOC_CLASSES), difficult),
                boxes=voc_to_boxes(boxes), box_labels=labels, box_difficult=hard))
            sizes.append(size or (known_size(records[-1].path) if len(labels) else None))
            raw[image_id] = boxes

        def name_box(r: ImageRecord, j: int) -> str:
            values = ", ".join(f"{v:g}" for v in raw[r.image_id][j])
            return (f"{self.voc_dir / 'Annotations' / r.image_id}.xml: object {j + 1} "
                    f"({VOC_CLASSES[r.box_labels[j]]!r}, xmin ymin xmax ymax = {values})")

        report = check_record_boxes(records, sizes, bad_boxes, str(self.voc_dir / "Annotations"), name_box)
        return records, empty, report
