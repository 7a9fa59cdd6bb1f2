"""Import proposal files of other tools into a :class:`ProposalCache` for a dataset, and export caches back.

Imported proposals are stored as the file has them (no clipping, filtering or capping), with meta
``method = "import:mat"`` / ``"import:datalist"`` and ``params = {"source": <file>}``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from mlkd.data.base import ImageRecord, MultiLabelDataset
from mlkd.errors import BadInput
from mlkd.proposals.attach import check_cache_matches
from mlkd.proposals.cache import ProposalCache, make_meta
from mlkd.proposals.formats import DatalistEntry, read_datalist, read_mat_proposals, write_datalist, \
    write_mat_proposals


@dataclass
class ImportReport:
    """``extra``: entries of the file that are not in the dataset (ignored); ``missing``: dataset image ids
    that the file lacks (only possible with ``allow_missing=True``)."""

    cache_path: Path
    imported: int
    extra: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def _write_import(dataset: MultiLabelDataset, found: dict[str, tuple[np.ndarray, np.ndarray]], out: str | Path,
                  method: str, source: Path, allow_missing: bool, extra: list[str], progress: bool) -> ImportReport:
    missing = [r.image_id for r in dataset.records if r.image_id not in found]
    if missing and not allow_missing:
        raise BadInput(f"{source} has no proposals for {len(missing)} of the {len(dataset)} dataset images "
                         f"(e.g. {missing[:5]}); pass allow_missing (--allow-missing) to import the rest anyway")
    meta = make_meta(method, {"source": str(source.resolve())}, dataset.identity.to_dict())
    with ProposalCache.create(out, meta) as cache:
        items = [(r.image_id, *found[r.image_id]) for r in dataset.records if r.image_id in found]
        for start in tqdm(range(0, len(items), 1024), desc=f"importing {source.name}", unit="batch",
                          disable=not progress):
            cache.put_many(items[start:start + 1024])
    return ImportReport(Path(out), len(items), extra, missing)


def import_mat(path: str | Path, dataset: MultiLabelDataset, out: str | Path, allow_missing: bool = False,
               progress: bool = True) -> ImportReport:
    """Import a WSDDN / selective-search ``.mat`` proposal file; its ``images`` ids must be dataset image ids."""
    found = read_mat_proposals(path)
    ids = {r.image_id for r in dataset.records}
    extra = sorted(k for k in found if k not in ids)
    if len(extra) == len(found) and found:
        raise BadInput(f"none of the {len(found)} image ids in {path} (e.g. {extra[:3]}) is an image id of "
                         f"dataset {dataset.name!r}/{dataset.split!r} (e.g. {[r.image_id for r in dataset.records[:3]]})")
    return _write_import(dataset, found, out, "import:mat", Path(path), allow_missing, extra, progress)


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
                    allow_missing: bool = False, progress: bool = True) -> ImportReport:
    """Import the release's datalist format; lines are matched to dataset images by path (see
    :func:`match_paths`, relative paths from ``root``, default the datalist's folder) and their labels checked."""
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
    return _write_import(dataset, found, out, "import:datalist", path, allow_missing, extra, progress)


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
