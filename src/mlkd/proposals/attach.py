"""Opening a dataset split with its proposal cache, after checking that the cache was built for its images."""

from __future__ import annotations

from typing import Any

from mlkd.data import build_dataset
from mlkd.data.base import DatasetIdentity, MultiLabelDataset, Transform, listed
from mlkd.errors import BadInput
from mlkd.proposals.cache import IMAGE_FIELDS, ProposalCache


def check_cache_matches(dataset: MultiLabelDataset, cache: ProposalCache) -> None:
    """Raise ``ValueError`` unless ``cache`` holds proposals for exactly ``dataset``'s images.

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
        return
    ids = {r.image_id for r in dataset.records}
    cached = set(cache.keys())
    lines = diffs + ([f"images of the dataset not in the cache ({len(ids - cached)}):{listed(sorted(ids - cached))}"]
                     if ids - cached else [])
    lines += [f"images in the cache not in the dataset ({len(cached - ids)}):{listed(sorted(cached - ids))}"]\
        if cached - ids else []
    raise BadInput(f"{what} was not built for the images of {dataset.name}/{dataset.split} ({hint}):\n  "
                     + "\n  ".join(lines))


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
