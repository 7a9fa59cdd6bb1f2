"""Opening a dataset split with its proposal cache, after checking that the cache was built for its images."""

from __future__ import annotations

from typing import Any

from mlkd.data import build_dataset
from mlkd.data.base import DatasetIdentity, MultiLabelDataset, Transform, listed
from mlkd.errors import BadInput
from mlkd.proposals.cache import IMAGE_FIELDS, ProposalCache


def check_cache_matches(dataset: MultiLabelDataset, cache: ProposalCache, complete: bool = True) -> None:
    """Raise ``ValueError`` unless ``cache`` holds proposals for exactly ``dataset``'s images (``complete``:
    for every one of them; a shard holds only its share).

    A version-2 cache is matched on the images alone (count and hash of ids and file names), so another label
    policy of the same images reuses it; the error names the differing fields and the images only one side has.
    A version-1 cache is matched as mlkd 0.1 did (name, split, classes, count and a hash covering labels).
    """
    recorded = DatasetIdentity.from_dict(cache.meta["dataset"])
    what = f"proposal cache {cache.path}"
    if cache.meta["version"] < 2:
        fields = ("name", "split", "classes", "num_images", "labels_hash")
        hint = "it is a version-1 cache, matched on labels too: rebuild it with `mlkd proposals` to match on images only"
    else:
        fields, hint = IMAGE_FIELDS, "rebuild the cache for this dataset with `mlkd proposals`"
    diffs = dataset.identity.differences(recorded, what, fields)
    if not diffs:
        if complete:
            _check_coverage(dataset, cache)
        return
    ids = {r.image_id for r in dataset.records}
    cached = set(cache.keys())
    lines = diffs + ([f"images of the dataset not in the cache ({len(ids - cached)}):{listed(sorted(ids - cached))}"]
                     if ids - cached else [])
    lines += [f"images in the cache not in the dataset ({len(cached - ids)}):{listed(sorted(cached - ids))}"]\
        if cached - ids else []
    raise BadInput(f"{what} was not built for the images of {dataset.name}/{dataset.split} ({hint}):\n  "
                     + "\n  ".join(lines))


def _check_coverage(dataset: MultiLabelDataset, cache: ProposalCache) -> None:
    """Every image of the split must be in the cache (generation may have failed for some, or been stopped)."""
    missing = sorted({r.image_id for r in dataset.records} - set(cache.keys()))
    if missing:
        failures = cache.read_failures()
        lines = [f"{i}: {failures[i]}" if i in failures else i for i in missing]
        raise BadInput(f"proposal cache {cache.path} lacks {len(missing)} of the {len(dataset)} images of "
                       f"{dataset.name}/{dataset.split}:{listed(lines)}\nre-run the `mlkd proposals` command that "
                       "built it: it computes only what is missing (failed images are listed in failures.json)")


def require_proposals(dataset: MultiLabelDataset, purpose: str) -> None:
    """Refuse a split without proposals, or with images that have none (WSDDN needs a region in every image),
    before any work starts; the images are named. (Caches of mlkd 0.1 do not list such images: they are named
    where they are met.)"""
    if dataset.proposals is None:
        raise BadInput(f"{purpose} needs proposals: attach a proposal cache of {dataset.name}/{dataset.split}")
    empty = sorted(set(dataset.proposals.meta.get("empty_images", [])) & {r.image_id for r in dataset.records})
    if empty:
        raise BadInput(f"{len(empty)} images of {dataset.name}/{dataset.split} have no proposal in "
                       f"{dataset.proposals.path}, and {purpose} needs at least one per image:{listed(empty)}\n"
                       "drop them from the dataset, or build the cache again with a smaller --min-size")


def open_split(spec: str, options: dict[str, Any] | None = None, proposals: str | None = None,
               transform: Transform | None = None) -> MultiLabelDataset:
    """The dataset of ``spec`` (``options`` as for :func:`mlkd.data.build_dataset`), with the proposal cache at
    ``proposals`` attached after :func:`check_cache_matches`."""
    dataset = build_dataset(spec, transform=transform, **(options or {}))
    if proposals is None:
        return dataset
    cache = ProposalCache.open(proposals)
    check_cache_matches(dataset, cache)
    return dataset.view(proposals=cache)
