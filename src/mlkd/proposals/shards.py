"""Sharded generation: shard ``i/n`` owns the images with ``index % n == i``; :func:`merge_caches` joins shards."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from mlkd.data.base import MultiLabelDataset
from mlkd.errors import BadInput
from mlkd.proposals.attach import check_cache_matches
from mlkd.proposals.cache import ProposalCache, meta_differences


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``: this shard takes the images with ``index % n == i``."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise BadInput(f"shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise BadInput(f"shard {text!r} needs 0 <= i < n")
    return i, n


def shard_indices(num_images: int, shard: tuple[int, int] | None) -> range:
    """Indices of the dataset images that belong to ``shard`` (all of them for ``None``)."""
    return range(num_images) if shard is None else range(shard[0], num_images, shard[1])


@dataclass
class MergeReport:
    """Outcome of :func:`merge_caches`. ``missing_ids`` is exact when a dataset was given, otherwise it lists
    the shards' recorded failures (and ``missing_count`` may be larger)."""

    cache_path: Path
    num_images: int
    expected: int
    missing_shards: list[int] = field(default_factory=list)
    missing_ids: list[str] = field(default_factory=list)

    @property
    def missing_count(self) -> int:
        return self.expected - self.num_images

    @property
    def complete(self) -> bool:
        return self.missing_count == 0


def _check_shard_metas(caches: Sequence[ProposalCache]) -> tuple[dict, list[int]]:
    """All metas equal apart from shard fields and counts; returns (merged meta, missing shard indices)."""
    first = caches[0]
    for c in caches[1:]:
        diffs = meta_differences(first.meta, c.meta, ignore=("num_images", "shard", "empty_images"))
        if diffs:
            raise BadInput(f"proposal caches {first.path} and {c.path} were built differently "
                             "(first != second):\n  " + "\n  ".join(diffs))
    shards = [c.meta["shard"] for c in caches]
    missing: list[int] = []
    if any(s is not None for s in shards):
        if any(s is None for s in shards) or len({s["count"] for s in shards}) != 1:
            raise BadInput("cannot merge caches with different sharding: "
                             + ", ".join(f"{c.path}: {c.meta['shard']}" for c in caches))
        indices = [s["index"] for s in shards]
        dupes = sorted({i for i in indices if indices.count(i) > 1})
        if dupes:
            raise BadInput(f"shard index(es) {dupes} given more than once")
        missing = sorted(set(range(shards[0]["count"])) - set(indices))
    return {**first.meta, "shard": None, "num_images": 0, "empty_images": []}, missing


def merge_caches(out: str | Path, shard_paths: Sequence[str | Path], dataset: MultiLabelDataset | None = None,
                 progress: bool = True) -> MergeReport:
    """Copy the shard caches at ``shard_paths`` into a new cache at ``out`` and check it is complete.

    Shards must agree on method, parameters, dataset identity and box convention (a ``ValueError`` names the
    fields that differ). Completeness is checked against the dataset identity's image count; with ``dataset``
    (which must match that identity) the missing image ids are listed exactly. The merged cache is written even
    when incomplete (re-running generation on it fills the gaps); the report says what is missing.
    """
    if not shard_paths:
        raise BadInput("merge needs at least one shard cache directory")
    with contextlib.ExitStack() as stack:  # every shard is closed, whatever happens
        caches = [stack.enter_context(ProposalCache.open(p)) for p in shard_paths]
        meta, missing_shards = _check_shard_metas(caches)
        if dataset is not None:
            check_cache_matches(dataset, caches[0], complete=False)
        failures: dict[str, str] = {}
        with ProposalCache.create(out, meta) as merged:
            for c in tqdm(caches, desc="merging shards", unit="shard", disable=not progress):
                batch: list[tuple[str, bytes]] = []
                for image_id, data in c.items():
                    batch.append((image_id, data))
                    if len(batch) >= 1024:
                        merged.put_raw(batch)
                        batch = []
                merged.put_raw(batch)
                failures.update(c.read_failures())
            failures = {k: v for k, v in failures.items() if k not in merged}
            merged.write_failures(failures)
            merged.write_meta()
            count = len(merged)
    if dataset is not None:
        with ProposalCache.open(out) as merged:
            missing_ids = [r.image_id for r in dataset.records if r.image_id not in merged]
    else:
        missing_ids = sorted(failures)
    return MergeReport(Path(out), count, int(meta["dataset"]["num_images"]), missing_shards, missing_ids)
