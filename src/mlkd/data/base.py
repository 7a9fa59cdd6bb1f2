"""The dataset contract shared by every loader.

A dataset item is ``(image, target)``:

- ``image``: ``Tensor[3, H, W]`` uint8, RGB (the model's input convention is applied later, by the model).
- ``target``: a dict with
    - ``labels`` (``Tensor[K]`` float32): multi-hot, 1 = present, 0 = absent, -1 = ignore for this class;
    - ``image_id`` (str) and ``orig_size`` (``Tensor[2]`` int64, (H, W) of the file on disk);
    - ``boxes`` (``Tensor[M, 4]`` float32, (x1, y1, x2, y2) pixels, 0-based) and ``box_labels``
      (``Tensor[M]`` int64 class indices) when the dataset has boxes (for evaluation only);
    - ``proposals`` (``Tensor[R, 4]`` float32) and ``proposal_scores`` (``Tensor[R]`` float32) when a
      proposal cache is attached.

Boxes and proposals are always in the pixel frame of the returned image: transforms move them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from mlkd.data.boxes import BoxReport, check_boxes
from mlkd.data.images import file_problem, header_size, read_image  # read_image: re-exported for its callers
from mlkd.errors import BadInput, MlkdError, NotFound


BOX_CONVENTION = "x1y1x2y2 float32, 0-based pixel edges of the image on disk, x2/y2 exclusive (x2 = x + w)"


@dataclass(frozen=True)
class DatasetIdentity:
    """What makes two datasets 'the same' for checkpoints (all fields) and proposal caches (the images only).

    ``labels_hash`` covers the image ids, their labels and the class order; ``images_hash`` only the set of
    image ids and their file names (see :func:`images_hash`), cheap enough for every dataset construction. What
    the files hold is a proposal cache's per-image :class:`FileStamp`, checked when the cache is attached.
    """

    name: str
    split: str
    classes: tuple[str, ...]
    num_images: int
    labels_hash: str
    images_hash: str | None = None  # None in identities written before mlkd 0.2

    FIELDS = ("name", "split", "classes", "num_images", "labels_hash", "images_hash")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["classes"] = list(self.classes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DatasetIdentity":
        """Read an identity dict; mlkd 0.1 called ``labels_hash`` ``manifest_hash`` and had no ``images_hash``."""
        labels = d["labels_hash"] if "labels_hash" in d else d["manifest_hash"]
        return cls(d["name"], d["split"], tuple(d["classes"]), int(d["num_images"]), labels, d.get("images_hash"))

    def differences(self, other: "DatasetIdentity", what: str, fields: Sequence[str] = FIELDS) -> list[str]:
        """``field: dataset has X, <what> has Y`` lines for the ``fields`` that differ."""
        return [f"{k}: dataset has {getattr(self, k)!r}, {what} has {getattr(other, k)!r}"
                for k in fields if getattr(self, k) != getattr(other, k)]

    def check_same(self, other: "DatasetIdentity", what: str) -> None:
        """Raise ``ValueError`` naming both sides if ``other`` (from ``what``) differs from ``self``."""
        diffs = self.differences(other, what)
        if diffs:
            raise BadInput(f"{what} does not belong to this dataset:\n  " + "\n  ".join(diffs))


def check_class_order(expected: Sequence[str], got: Sequence[str], what: str) -> None:
    """Raise ``ValueError`` naming both orders (and the first differing position) unless they are equal.

    ``expected`` is e.g. the dataset's classes, ``got`` those stored in ``what`` (a checkpoint, a cache).
    """
    expected, got = [str(c) for c in expected], [str(c) for c in got]
    if expected == got:
        return
    first = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
    at = (f"position {first}: expected {expected[first]!r}, got {got[first]!r}"
          if first < min(len(expected), len(got)) else f"lengths differ ({len(expected)} vs {len(got)})")
    raise BadInput(f"class order of {what} differs from the expected one ({at}):\n"
                     f"  expected ({len(expected)}): {expected}\n  got      ({len(got)}): {got}")


@dataclass
class ImageRecord:
    """One image of a dataset, as listed by its annotation files (nothing decoded yet)."""

    image_id: str
    path: Path
    labels: np.ndarray  # (K,) int8 in {1, 0, -1}
    boxes: np.ndarray | None = None  # (M, 4) float32 x1y1x2y2, pixels of the file on disk
    box_labels: np.ndarray | None = None  # (M,) int64
    box_difficult: np.ndarray | None = None  # (M,) bool
    extra: dict[str, Any] = field(default_factory=dict)


def labels_hash(records: Sequence[ImageRecord], classes: Sequence[str]) -> str:
    """A short stable hash of the image ids (in order), their labels and the class order."""
    h = hashlib.sha1(json.dumps(list(classes)).encode())
    for r in records:
        h.update(r.image_id.encode())
        h.update(np.ascontiguousarray(r.labels, dtype=np.int8).tobytes())
    return h.hexdigest()[:16]


def images_hash(records: Sequence[ImageRecord]) -> str:
    """A short stable hash of the set of images: each image id with its file name, in sorted order. Labels,
    class names and record order do not enter, so a label policy (e.g. VOC ``difficult=positive``) keeps it."""
    h = hashlib.sha1()
    for image_id, name in sorted((r.image_id, Path(r.path).name) for r in records):
        h.update(f"{image_id}\t{name}\n".encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class FileStamp:
    """What an image file was when something was computed from it: its size, its mtime (ns) and the SHA-256
    digest of its bytes. A later file with the same size and mtime is taken as unchanged without reading it (as
    build tools do); any other is hashed, so a touched but identical file still matches."""

    size: int
    mtime_ns: int
    digest: bytes  # 32 bytes


def content_digest(path: str | Path, algorithm: str = "sha256", chunk: int = 1 << 20) -> bytes:
    """The digest of a file's bytes, streamed: SHA-256 by default (the hash pip checks; CPUs with SHA extensions run
    it at over 1 GiB/s)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.digest()


def file_stamp(path: str | Path) -> FileStamp:
    """The :class:`FileStamp` of ``path`` now. The stat comes first: a write during the hash leaves an mtime
    that no longer matches, so the file is hashed again (and found changed) when the stamp is checked."""
    st = os.stat(path)
    return FileStamp(st.st_size, st.st_mtime_ns, content_digest(path))


def refuse_aliases(records: Sequence[ImageRecord], source: str | Path) -> None:
    """Refuse two records that name one file (``a.png``, ``./a.png``, an absolute path, a symlink or a hard link
    to it): the image would count twice in training and metrics. Files are compared by device and inode (the
    resolved path where a file system has no inode numbers); ``extra["source"]`` names each record's row."""
    seen: dict[object, ImageRecord] = {}
    for r in records:
        st = os.stat(r.path)
        key = (st.st_dev, st.st_ino) if st.st_ino else os.path.realpath(r.path)
        first = seen.setdefault(key, r)
        if first is not r:
            a, b = os.path.realpath(first.path), os.path.realpath(r.path)
            how = f"both resolve to {a}" if a == b else f"{b} is a hard link to {a}"
            raise BadInput(f"{r.extra.get('source', source)}: image {r.image_id!r} is the same file as image "
                           f"{first.image_id!r} at {first.extra.get('source', source)} ({how}); list each image "
                           "once: remove one of the two rows")


MAX_LISTED = 10  # how many ids an error message lists


def listed(ids: Sequence[str], limit: int = MAX_LISTED) -> str:
    """Up to ``limit`` ids, one per indented line, then ``... and N more``."""
    more = f"\n  ... and {len(ids) - limit} more" if len(ids) > limit else ""
    return "\n  " + "\n  ".join(ids[:limit]) + more


def drop_missing(records: list[ImageRecord], skip_missing: bool, source: str,
                 root: str | Path) -> tuple[list[ImageRecord], list[str]]:
    """Check that every record's image file exists and is a regular file.

    Returns ``(records whose file exists, ids of the others)``. Missing files raise ``FileNotFoundError``
    (count, first ids, and what each path is when it exists but is not a file: a directory, a FIFO, ...) unless
    ``skip_missing``; then they are dropped with a warning giving the count. ``source`` names the annotation
    file and ``root`` the image folder, for the messages.
    """
    problems = {r.image_id: p for r in records if (p := file_problem(r.path)) is not None}
    missing = list(problems)
    if missing and not skip_missing:
        shown = [i if problems[i] == "does not exist" else f"{i} ({problems[i]})" for i in missing]
        raise NotFound(
            f"{len(missing)} of {len(records)} image files listed in {source} do not exist under {root} "
            f"(or are not regular files):{listed(shown)}\n(pass skip_missing=True / --skip-missing to drop them)")
    if missing:
        warnings.warn(f"{source}: skipped {len(missing)} missing image files", stacklevel=3)
        records = [r for r in records if r.image_id not in problems]
    return records, missing


BAD_BOXES_HINT = ("the dataset option bad_boxes (--option bad_boxes=...) decides: clip (default) clips out-of-image "
                  "boxes and drops zero-area ones, drop drops every defective box, refuse refuses them all")


def known_size(path: str | Path) -> tuple[int, int] | None:
    """``(H, W)`` of an image from its header (EXIF orientation applied), or None when the header cannot be read:
    a loader then checks that image's boxes without its size, and the decode reports the file when it is used."""
    try:
        return header_size(path)
    except MlkdError:
        return None


def check_record_boxes(records: Sequence[ImageRecord], sizes: Sequence[tuple[int, int] | None], policy: str,
                       source: str, name_box: Callable[[ImageRecord, int], str]) -> BoxReport:
    """Validate the ground-truth boxes of ``records`` in one vectorised pass (:func:`mlkd.data.boxes.check_boxes`);
    clipped or dropped boxes are written back to each record with their labels and difficult flags.

    Args:
        records: records whose ``boxes`` are ``(M_i, 4)`` float32 x1y1x2y2 (or None: skipped).
        sizes: each record's image ``(H, W)``, or None when unknown (out-of-image is then not checked).
        policy: ``"refuse"``, ``"clip"`` or ``"drop"``; source: the annotation file, for messages.
        name_box: ``(record, j) -> text`` naming box ``j`` of a record (its file, line or object, and values).
    """
    held = [(r, s) for r, s in zip(records, sizes) if r.boxes is not None and len(r.boxes)]
    if not held:
        return BoxReport()
    counts = np.array([len(r.boxes) for r, _ in held])
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    owner = np.repeat(np.arange(len(held)), counts)
    hw = np.repeat(np.array([s if s is not None else (np.nan, np.nan) for _, s in held], np.float64), counts, axis=0)
    boxes, report = check_boxes(np.concatenate([r.boxes for r, _ in held]), hw, policy, source,
                                name_box=lambda i: name_box(held[owner[i]][0], int(i - starts[owner[i]])),
                                hint=BAD_BOXES_HINT)
    if report.changed:
        kept_per_record = np.bincount(owner[report.keep], minlength=len(held))
        slices = np.split(np.arange(len(boxes)), np.cumsum(kept_per_record)[:-1])  # kept boxes, record by record
        for k, ((r, _), sel) in enumerate(zip(held, slices)):
            local = report.keep[sel] - starts[k]  # positions of the kept boxes within the record
            r.boxes = boxes[sel]
            r.box_labels = np.asarray(r.box_labels)[local]
            if r.box_difficult is not None:
                r.box_difficult = np.asarray(r.box_difficult)[local]
    return report


def report_boxes(report: BoxReport, policy: str) -> None:
    """Warn with the counts when a dataset's box policy clipped or dropped ground-truth boxes."""
    if report.changed:
        warnings.warn(f"bad_boxes={policy}: ground-truth boxes, {report.summary()} (the dataset's box_report has "
                      f"the counts); e.g. {report.examples[0]}", stacklevel=3)


def check_proposals(boxes: np.ndarray, image_hw: tuple[int, int], image_id: str, source: Any) -> None:
    """Refuse proposals read from a cache that are not valid boxes of their ``(H, W)`` image.

    Caches written by mlkd hold only valid boxes, so this catches damaged or hand-made ones; one vectorised
    pass over ``(R, 4)`` boxes.
    """
    check_boxes(boxes, image_hw, "refuse", f"proposals of image {image_id!r} in {source}",
                hint="the cache is damaged or was not written by mlkd: rebuild it with `mlkd proposals`, or "
                     "re-import its source with `mlkd proposals import --bad-boxes clip|drop`")


Transform = Callable[[torch.Tensor, dict[str, Any]], tuple[torch.Tensor, dict[str, Any]]]
KEEP = object()  # "leave as it is" for MultiLabelDataset.view


class MultiLabelDataset(Dataset):
    """Base class: subclasses fill ``name``, ``split``, ``classes`` and ``records`` then call ``super().__init__``.

    ``excluded`` maps a reason (``"missing"``, ``"no_label"``, ``"empty"``, ...) to the ids of the images the
    annotation files list but the dataset left out, so every exclusion is reported, never silent;
    ``box_report`` (a :class:`~mlkd.data.boxes.BoxReport`) says what the ``bad_boxes`` policy did to the
    ground-truth boxes.
    """

    def __init__(self, name: str, split: str, classes: Sequence[str], records: list[ImageRecord],
                 transform: Transform | None = None, excluded: dict[str, list[str]] | None = None,
                 box_report: BoxReport | None = None) -> None:
        if len(set(classes)) != len(classes):
            raise BadInput(f"class names must be unique, got {list(classes)}")
        self.name, self.split = name, split
        self.classes = list(classes)
        self.records = records
        self.transform = transform
        self.excluded = {k: list(v) for k, v in (excluded or {}).items() if v}
        self.proposals = None  # a ProposalCache once attached
        self.box_report = box_report  # what the bad_boxes policy did to the ground-truth boxes (None: no boxes)
        self.identity = DatasetIdentity(name, split, tuple(self.classes), len(records),
                                        labels_hash(records, self.classes), images_hash(records))

    def __len__(self) -> int:
        return len(self.records)

    @property
    def missing(self) -> list[str]:
        """Ids of listed images whose file does not exist (dropped with ``skip_missing``)."""
        return self.excluded.get("missing", [])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def label_matrix(self) -> np.ndarray:
        """``(N, K)`` int8 labels of every image, without decoding anything."""
        return np.stack([r.labels for r in self.records]) if self.records else np.zeros((0, self.num_classes), np.int8)

    def view(self, transform: Transform | None | object = KEEP, indices: Sequence[int] | None = None,
             proposals: Any = KEEP) -> "MultiLabelDataset":
        """A shallow copy with another ``transform``, only the records at ``indices``, and/or other
        ``proposals``; this dataset is left as it is. ``identity`` stays the full dataset's.

        ``proposals`` is anything with ``get(image_id) -> (boxes (R, 4), scores (R,))`` (a proposal cache);
        whoever opens it checks that it belongs to this dataset (:func:`mlkd.proposals.open_split`).
        """
        out = copy.copy(self)
        if transform is not KEEP:
            out.transform = transform
        if indices is not None:
            out.records = [self.records[i] for i in indices]
        if proposals is not KEEP:
            out.proposals = proposals
        return out

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        r = self.records[index]
        img = read_image(r.path)
        h, w = img.shape[:2]
        target: dict[str, Any] = {
            "labels": torch.from_numpy(r.labels.astype(np.float32)),
            "image_id": r.image_id,
            "orig_size": torch.tensor([h, w], dtype=torch.int64),
        }
        if r.boxes is not None:
            target["boxes"] = torch.from_numpy(np.asarray(r.boxes, np.float32).reshape(-1, 4))
            target["box_labels"] = torch.from_numpy(np.asarray(r.box_labels, np.int64))
            if r.box_difficult is not None:
                target["box_difficult"] = torch.from_numpy(np.asarray(r.box_difficult, bool))
        if self.proposals is not None:
            boxes, scores = self.proposals.get(r.image_id)
            check_proposals(boxes, (h, w), r.image_id, getattr(self.proposals, "path", "the attached proposals"))
            target["proposals"] = torch.from_numpy(boxes)
            target["proposal_scores"] = torch.from_numpy(scores)
        image = torch.from_numpy(img).permute(2, 0, 1).contiguous()
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target


def collate(batch: list[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[torch.Tensor | list[torch.Tensor], list[dict[str, Any]]]:
    """Stack images when they share a size (else return a list); keep targets as a list (R varies per image)."""
    images = [b[0] for b in batch]
    targets = [b[1] for b in batch]
    if all(im.shape == images[0].shape for im in images):
        return torch.stack(images), targets
    return images, targets
