"""The original release's datalist as a dataset that brings its own proposals.

A datalist (the Caffe data layer input of the release) has one line per image, whitespace-separated::

    path y_1 ... y_K x1 y1 x2 y2 score x1 y1 x2 y2 score ...

``K`` labels in {0, 1}, then ``R`` groups of 5 numbers: a proposal ``(x1, y1, x2, y2)`` in pixels of the image
file (read as written: the release produced them in its own frame, mlkd's 0-based convention) and its score.
The file has no class names, so the class list is required (a file, one name per line, or a list); its
length must be ``K``. Paths are relative to ``root`` (default: the datalist's folder) or absolute, and the
path as written is the image id. Two lines naming one file (``a.jpg`` and ``./a.jpg``, an absolute path, a
symlink) are refused naming both. Blank lines are skipped.

Proposals: the dataset attaches an :class:`InMemoryProposals` (``self.proposals``), which has the reading
interface of :class:`mlkd.proposals.cache.ProposalCache` (``get(image_id) -> (boxes (R, 4), scores (R,))``,
``meta`` with the dataset identity, ``path``), so ``__getitem__`` returns ``target["proposals"]`` and
``target["proposal_scores"]`` exactly as with an LMDB cache, and transforms move them. Memory: 20 bytes per
proposal (500 proposals x 82k COCO images is ~0.8 GB); for large sets import the datalist into an LMDB cache.

Bad proposals (:mod:`mlkd.data.boxes`) are refused: non-finite, inverted or zero-area ones when the file is read,
out-of-image ones when their image is loaded (its size is known only then). To clip or drop them instead, import
the datalist into a cache: ``mlkd proposals import --format datalist --bad-boxes clip|drop``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from mlkd.data.base import BOX_CONVENTION, ImageRecord, MultiLabelDataset, Transform, drop_missing, refuse_aliases
from mlkd.data.boxes import check_boxes
from mlkd.data.custom import read_class_file
from mlkd.errors import BadInput, MissingEntry, NotFound


# -- the line format --------------------------------------------------------------------------------------------
@dataclass
class DatalistEntry:
    """One datalist line: ``labels (K,)`` int8, ``boxes (R, 4)`` float32 x1y1x2y2, ``scores (R,)`` float32."""

    path: str
    labels: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    line: int


def parse_datalist_line(text: str, num_classes: int, where: str) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    """Split one line into ``(path, labels (K,), boxes (R, 4), scores (R,))``; ``where`` is ``file:line``.

    Labels must be 0 or 1 and scores finite; the boxes are returned as written, for the box validator
    (:func:`mlkd.data.boxes.check_boxes`) of whoever reads them.
    """
    fields = text.split()
    n_num = len(fields) - 1
    if n_num < num_classes or (n_num - num_classes) % 5:
        raise BadInput(f"{where}: {len(fields)} fields; expected 1 path + {num_classes} labels + 5 numbers "
                         f"(x1 y1 x2 y2 score) per box, i.e. 1 + {num_classes} + 5*R fields")
    try:
        values = np.array(fields[1:], dtype=np.float64)
    except ValueError:
        bad = next(f for f in fields[1:] if not _is_number(f))
        raise BadInput(f"{where}: {bad!r} is not a number (labels, coordinates and scores must be)") from None
    labels = values[:num_classes]
    if not np.isin(labels, (0, 1)).all():
        raise BadInput(f"{where}: labels must be 0 or 1, got {labels[~np.isin(labels, (0, 1))][:5].tolist()}")
    groups = values[num_classes:].reshape(-1, 5)
    if not np.isfinite(groups[:, 4]).all():
        raise BadInput(f"{where}: proposal score {groups[~np.isfinite(groups[:, 4]), 4][0]} is not finite")
    return fields[0], labels.astype(np.int8), groups[:, :4].astype(np.float32), groups[:, 4].astype(np.float32)


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def read_datalist(path: str | Path, num_classes: int) -> list[DatalistEntry]:
    """Parse a datalist file with ``num_classes`` labels per line (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"datalist file not found: {path}")
    entries = []
    with path.open() as f:
        for i, text in enumerate(f, start=1):
            if text.strip():
                p, labels, boxes, scores = parse_datalist_line(text, num_classes, f"{path}:{i}")
                entries.append(DatalistEntry(p, labels, boxes, scores, i))
    return entries


def format_datalist_line(path: str, labels: np.ndarray, boxes: np.ndarray, scores: np.ndarray) -> str:
    """One datalist line; float32 values are printed shortest-exact, so reading back gives the same numbers."""
    if any(c.isspace() for c in path):
        raise BadInput(f"datalist paths cannot contain whitespace: {path!r}")
    groups = np.concatenate([np.asarray(boxes, np.float32).reshape(-1, 4),
                             np.asarray(scores, np.float32).reshape(-1, 1)], axis=1)
    labels = np.where(np.asarray(labels) == 1, 1, 0)  # -1 (ignore) has no datalist form
    return " ".join([path, *labels.astype(str), *groups.ravel().astype(str)])


def write_datalist(path: str | Path, rows: Iterable[tuple[str, np.ndarray, np.ndarray, np.ndarray]]) -> int:
    """Write ``(path, labels (K,), boxes (R, 4), scores (R,))`` rows; returns how many lines were written."""
    n = 0
    with Path(path).open("w") as f:
        for row in rows:
            f.write(format_datalist_line(*row) + "\n")
            n += 1
    return n


_IMPORT_HINT = ("to clip or drop bad proposals, import the datalist into a cache with `mlkd proposals import "
                "--format datalist --bad-boxes clip|drop` and use the dataset with that cache")


class InMemoryProposals:
    """Proposals held in memory with the reading interface of ``ProposalCache``.

    Args:
        path: the file they came from (named in messages, like a cache's folder).
        items: ``image id -> (boxes (R, 4) float32 x1y1x2y2, scores (R,) float32)``.
        meta: as a cache's ``meta.json``: ``method``, ``params``, ``dataset`` (an identity dict), ...
    """

    def __init__(self, path: Path, items: dict[str, tuple[np.ndarray, np.ndarray]], meta: dict[str, Any]) -> None:
        self.path, self.items, self.meta = path, items, meta

    def get(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the proposals of ``image_id``: boxes ``(R, 4)`` and scores ``(R,)``, float32."""
        if image_id not in self.items:
            raise MissingEntry(f"image id {image_id!r} has no proposals in {self.path} ({len(self)} images)")
        boxes, scores = self.items[image_id]
        return boxes.copy(), scores.copy()

    def __contains__(self, image_id: object) -> bool:
        return image_id in self.items

    def __len__(self) -> int:
        return len(self.items)

    def keys(self) -> Iterator[str]:
        return iter(self.items)

    def __repr__(self) -> str:
        return f"InMemoryProposals({str(self.path)!r}, images={len(self)})"


def read_datalist_records(path: Path, classes: list[str], root: Path
                          ) -> tuple[list[ImageRecord], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Records (image id = path as written) and ``image id -> (boxes, scores)`` of a datalist file."""
    if not path.is_file():
        raise NotFound(f"datalist file not found: {path}")
    records, proposals, seen = [], {}, {}
    with path.open(encoding="utf-8") as f:
        for n, text in enumerate(f, start=1):
            if not text.strip():
                continue
            where = f"{path}:{n}"
            name, labels, boxes, scores = parse_datalist_line(text, len(classes), where)
            # the image sizes are not read here: out-of-image proposals are refused when an image is loaded
            check_boxes(boxes, None, "refuse", f"{where} (image {name!r})", name_box=lambda i: f"proposal {i}",
                        hint=_IMPORT_HINT)
            if name in seen:
                raise BadInput(f"{where}: image {name!r} is listed again (first at line {seen[name]})")
            seen[name] = n
            records.append(ImageRecord(name, root / name, labels, extra={"source": where}))
            proposals[name] = (boxes, scores)
    if not records:
        raise BadInput(f"datalist {path} lists no images")
    return records, proposals


class DatalistDataset(MultiLabelDataset):
    """A datalist file as a dataset with its proposals attached (format in the module docstring).

    Args:
        path: the datalist file.
        classes: the class names in label order: a file (one per line) or a list; required.
        root: folder the image paths are relative to (default: the datalist's folder).
        transform: applied to each ``(image, target)``; it moves ``target["proposals"]`` with the image.
        skip_missing: missing image files raise ``FileNotFoundError``; with True they are dropped and listed
            in ``self.excluded["missing"]``.
        split: split name (default: the file's stem).

    Identity: name ``datalist``, split as given.
    """

    OPTIONS = ("root", "split")

    def __init__(self, path: str | Path, classes: str | Path | Sequence[str], root: str | Path | None = None,
                 transform: Transform | None = None, skip_missing: bool = False, split: str | None = None) -> None:
        path = Path(path)
        class_list = read_class_file(classes) if isinstance(classes, (str, Path)) else [str(c) for c in classes]
        if not class_list:
            raise BadInput(f"the class list for datalist {path} is empty; a datalist has no names, pass them")
        self.root = Path(root) if root is not None else path.parent
        records, proposals = read_datalist_records(path, class_list, self.root)
        records, missing = drop_missing(records, skip_missing, str(path), self.root)
        refuse_aliases(records, path)  # ids are paths as written: two spellings of a file would be two images
        super().__init__("datalist", split or path.stem, class_list, records, transform,
                         excluded={"missing": missing})
        meta = {"method": "import:datalist", "params": {"source": str(path.resolve())},
                "dataset": self.identity.to_dict(), "num_images": len(records), "box_convention": BOX_CONVENTION}
        # built from the same lines as the records, so they belong to this dataset by construction
        self.proposals = InMemoryProposals(path, {r.image_id: proposals[r.image_id] for r in records}, meta)
