"""Import proposal files of other tools into a :class:`ProposalCache` for a dataset, and export caches back.

Imported proposals keep the file's order and are neither filtered by size nor capped; each image's boxes go
through the box validator (:mod:`mlkd.data.boxes`) against the image's size, read from its file header, under
the ``bad_boxes`` policy: ``refuse`` (default), ``clip`` or ``drop``, with the counts in the report. A non-finite
proposal score (NaN, inf, or beyond float32's range) is refused under every policy, naming the image and the
proposal. The meta records ``method = "import:mat"`` / ``"import:datalist"`` and ``params = {"source": <file>}``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from mlkd.data.base import ImageRecord, MultiLabelDataset
from mlkd.data.boxes import BoxReport, check_boxes, check_policy
from mlkd.data.images import image_size
from mlkd.errors import BadInput
from mlkd.proposals.attach import check_cache_matches
from mlkd.proposals.cache import ProposalCache, make_meta
from mlkd.proposals.formats import DatalistEntry, read_datalist, read_mat_proposals, write_datalist, \
    write_mat_proposals


@dataclass
class ImportReport:
    """``extra``: entries of the file that are not in the dataset (ignored); ``missing``: dataset image ids
    that the file lacks (only possible with ``allow_missing=True``); ``boxes``: what the ``bad_boxes`` policy
    found, clipped and dropped."""

    cache_path: Path
    imported: int
    extra: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    boxes: BoxReport = field(default_factory=BoxReport)


BAD_BOXES_HINT = ("pass --bad-boxes clip (clip out-of-image boxes to the image, drop zero-area ones) or --bad-boxes "
                  "drop (drop every defective box); bad_boxes= in Python")


def check_imported(found: dict[str, tuple[np.ndarray, np.ndarray]], dataset: MultiLabelDataset, policy: str,
                   where: dict[str, str], progress: bool) -> BoxReport:
    """Validate each image's imported boxes against its size (read from the file header) under ``policy``;
    ``found`` (image id -> boxes ``(R, 4)``, scores ``(R,)``) is updated in place with what is kept.
    ``where`` names each image's entry in the file, for messages."""
    check_policy(policy)
    total = BoxReport()
    paths = {r.image_id: r.path for r in dataset.records}
    for image_id in tqdm([i for i in found if i in paths], desc="checking boxes", unit="img", disable=not progress):
        boxes, scores = found[image_id]
        if len(boxes) == 0:
            continue
        h, w = image_size(paths[image_id])
        kept, report = check_boxes(boxes, (h, w), policy, f"{where[image_id]} ({w} x {h} px image; boxes as "
                                   "mlkd's 0-based x1, y1, x2, y2)", name_box=lambda i: f"box {i + 1}",
                                   hint=BAD_BOXES_HINT)
        found[image_id] = (kept, scores[report.keep])
        total.add(report)
    return total


def check_scores(found: dict[str, tuple[np.ndarray, np.ndarray]], image_ids: set[str], where: dict[str, str]) -> None:
    """Refuse a NaN or infinite proposal score (one beyond float32's range is inf once stored) of an image in
    ``image_ids``, naming ``where[image_id]`` and the proposal: the teacher multiplies each region by its score, so a
    single NaN would only surface, unnamed, as a non-finite loss in training. No --bad-boxes policy drops these."""
    for image_id in (i for i in found if i in image_ids):
        scores = found[image_id][1]
        bad = np.flatnonzero(~np.isfinite(scores))
        if bad.size:
            first = ", ".join(f"proposal {k + 1} has score {scores[k]:g}" for k in bad[:3])
            raise BadInput(f"{where[image_id]}: {bad.size} of {len(scores)} proposal scores are not finite: {first}"
                           f"{' ...' if bad.size > 3 else ''}; expected finite numbers (|score| < 3.4e38, float32; a "
                           "tool without scores writes 1.0): fix or re-export the file")


def _write_import(dataset: MultiLabelDataset, found: dict[str, tuple[np.ndarray, np.ndarray]], out: str | Path,
                  method: str, source: Path, allow_missing: bool, extra: list[str], progress: bool,
                  bad_boxes: str, where: dict[str, str]) -> ImportReport:
    missing = [r.image_id for r in dataset.records if r.image_id not in found]
    if missing and not allow_missing:
        raise BadInput(f"{source} has no proposals for {len(missing)} of the {len(dataset)} dataset images "
                         f"(e.g. {missing[:5]}); pass allow_missing (--allow-missing) to import the rest anyway")
    boxes = check_imported(found, dataset, bad_boxes, where, progress)  # before the cache exists: no partial cache
    meta = make_meta(method, {"source": str(source.resolve())}, dataset.identity.to_dict())
    with ProposalCache.create(out, meta) as cache:
        items = [(r.image_id, *found[r.image_id]) for r in dataset.records if r.image_id in found]
        for start in tqdm(range(0, len(items), 1024), desc=f"importing {source.name}", unit="batch",
                          disable=not progress):
            cache.put_many(items[start:start + 1024])
    return ImportReport(Path(out), len(items), extra, missing, boxes)


def import_mat(path: str | Path, dataset: MultiLabelDataset, out: str | Path, allow_missing: bool = False,
               progress: bool = True, bad_boxes: str = "refuse") -> ImportReport:
    """Import a WSDDN / selective-search ``.mat`` proposal file; its ``images`` ids must be dataset image ids.
    ``bad_boxes``: ``"refuse"``, ``"clip"`` or ``"drop"`` (module docstring)."""
    check_policy(bad_boxes)
    found = read_mat_proposals(path)
    ids = {r.image_id for r in dataset.records}
    extra = sorted(k for k in found if k not in ids)
    if len(extra) == len(found) and found:
        raise BadInput(f"none of the {len(found)} image ids in {path} (e.g. {extra[:3]}) is an image id of "
                         f"dataset {dataset.name!r}/{dataset.split!r} (e.g. {[r.image_id for r in dataset.records[:3]]})")
    check_scores(found, ids, {image_id: f"{path}: boxScores{{{k + 1}}} of image {image_id!r}"
                              for k, image_id in enumerate(found)})
    where = {image_id: f"{path}: boxes{{{k + 1}}} of image {image_id!r}" for k, image_id in enumerate(found)}
    return _write_import(dataset, found, out, "import:mat", Path(path), allow_missing, extra, progress, bad_boxes,
                         where)


def _norm(p: str | Path) -> str:
    return os.path.normpath(os.path.abspath(p))


def match_paths(paths: list[str], records: list[ImageRecord], root: Path) -> list[ImageRecord | None]:
    """Find the record of each datalist path, trying in turn:

    1. the same file (relative paths taken from ``root``);
    2. a record whose image id ends the path (``/home/author/coco/train2014/x.jpg`` matches image id
       ``train2014/x.jpg``: the release's datalists hold absolute paths of the authors' machines);
    3. the unique record whose path ends with the path (``images/001.jpg`` matches ``/data/voc/images/001.jpg``).

    ``None`` when no record matches; a ``ValueError`` when several do.
    """
    by_path = {_norm(r.path): r for r in records}
    by_id = {Path(os.path.normpath(r.image_id)).parts: r for r in records}
    by_name: dict[str, list[ImageRecord]] = {}
    for r in records:
        by_name.setdefault(Path(r.path).name, []).append(r)
    out: list[ImageRecord | None] = []
    for p in paths:
        direct = by_path.get(_norm(p if os.path.isabs(p) else root / p))
        parts = Path(os.path.normpath(p)).parts
        if direct is None:  # the longest tail of the path that is an image id
            direct = next((by_id[parts[k:]] for k in range(len(parts)) if parts[k:] in by_id), None)
        if direct is not None:
            out.append(direct)
            continue
        hits = [r for r in by_name.get(parts[-1], []) if Path(r.path).parts[-len(parts):] == parts]
        if len(hits) > 1:
            raise BadInput(f"datalist path {p!r} matches several dataset images: {[str(h.path) for h in hits[:3]]}")
        out.append(hits[0] if hits else None)
    return out


def _check_labels(entries: list[DatalistEntry], matched: list[ImageRecord | None], classes: list[str],
                  source: Path) -> None:
    """The datalist's labels must equal the dataset's wherever the dataset does not say 'ignore' (-1)."""
    problems = []
    for e, r in zip(entries, matched):
        if r is None:
            continue
        bad = np.flatnonzero((r.labels != -1) & (r.labels != e.labels))
        problems += [f"{source}:{e.line} {r.image_id}: class {classes[k]!r} is {e.labels[k]} in the datalist, "
                     f"{r.labels[k]} in the dataset" for k in bad[:2]]
        if len(problems) >= 5:
            break
    if problems:
        raise BadInput("datalist labels disagree with the dataset (a different class order?):\n  "
                         + "\n  ".join(problems[:5]))


def import_datalist(path: str | Path, dataset: MultiLabelDataset, out: str | Path, root: str | Path | None = None,
                    allow_missing: bool = False, progress: bool = True, bad_boxes: str = "refuse") -> ImportReport:
    """Import the release's datalist format; lines are matched to dataset images by path (see
    :func:`match_paths`, relative paths from ``root``, default the datalist's folder) and their labels checked.
    ``bad_boxes``: ``"refuse"``, ``"clip"`` or ``"drop"`` (module docstring)."""
    check_policy(bad_boxes)
    path = Path(path)
    entries = read_datalist(path, dataset.num_classes)
    matched = match_paths([e.path for e in entries], dataset.records, Path(root) if root else path.parent)
    if entries and all(m is None for m in matched):
        raise BadInput(f"no path in {path} (e.g. {entries[0].path!r}) matches a dataset image "
                         f"(e.g. {str(dataset.records[0].path) if dataset.records else 'none'!r}); check --root")
    _check_labels(entries, matched, dataset.classes, path)
    found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    lines: dict[str, int] = {}
    for e, r in zip(entries, matched):
        if r is not None:
            if r.image_id in found:
                raise BadInput(f"{path}:{e.line} lists image {r.image_id!r} again (first at line {lines[r.image_id]})")
            found[r.image_id], lines[r.image_id] = (e.boxes, e.scores), e.line
    extra = [e.path for e, r in zip(entries, matched) if r is None]
    where = {image_id: f"{path}:{line} (image {image_id!r})" for image_id, line in lines.items()}
    check_scores(found, set(found), where)  # the datalist reader refuses NaN text; 1e39 is inf as float32
    return _write_import(dataset, found, out, "import:datalist", path, allow_missing, extra, progress, bad_boxes,
                         where)


def _cached_rows(dataset: MultiLabelDataset, cache: ProposalCache, progress: bool, what: str
                 ) -> Iterator[tuple[ImageRecord, np.ndarray, np.ndarray]]:
    check_cache_matches(dataset, cache)
    for r in tqdm(dataset.records, desc=f"writing {what}", unit="img", disable=not progress):
        yield (r, *cache.get(r.image_id))


def export_datalist(path: str | Path, dataset: MultiLabelDataset, cache: ProposalCache,
                    relative_to: str | Path | None = None, progress: bool = True) -> int:
    """Write ``dataset`` with its cached proposals as a datalist; returns how many -1 labels were written as 0.

    Paths are written relative to ``relative_to`` when given, else as the dataset lists them.
    """
    ignored = int((dataset.label_matrix() == -1).sum())

    def rows():
        for r, boxes, scores in _cached_rows(dataset, cache, progress, "datalist"):
            name = os.path.relpath(r.path, relative_to) if relative_to else str(r.path)
            yield name, r.labels, boxes, scores

    write_datalist(path, rows())
    return ignored


def export_mat(path: str | Path, dataset: MultiLabelDataset, cache: ProposalCache, progress: bool = True) -> None:
    """Write ``dataset``'s cached proposals as a WSDDN-layout ``.mat`` (``images``, ``boxes``, ``boxScores``)."""
    write_mat_proposals(path, ((r.image_id, b, s) for r, b, s in _cached_rows(dataset, cache, progress, ".mat")))
