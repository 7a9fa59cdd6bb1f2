"""Opening a dataset split with its proposal cache, after checking that the cache was built for its images."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from mlkd.data import build_dataset
from mlkd.data.base import DatasetIdentity, MultiLabelDataset, Transform, content_digest, listed
from mlkd.errors import BadInput
from mlkd.proposals.cache import IMAGE_FIELDS, ProposalCache, rebuild_hint

logger = logging.getLogger(__name__)

CHANGED_LISTED = 5  # changed images named in the message
SLOW_CHECK_S = 10.0  # a check that hashed images for longer than this is a warning


def check_cache_matches(dataset: MultiLabelDataset, cache: ProposalCache, complete: bool = True) -> None:
    """Raise ``ValueError`` unless ``cache`` holds proposals for exactly ``dataset``'s images (``complete``:
    for every one of them; a shard holds only its share).

    A version-2 cache is matched on the images alone (count and hash of ids and file names), so another label
    policy of the same images reuses it; the error names the differing fields and the images only one side has.
    A version-1 cache is matched as mlkd 0.1 did (name, split, classes, count and a hash covering labels). Then
    every image whose record carries a file stamp must still be that file (:func:`check_image_files`).
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
        check_image_files(dataset, cache)
        return
    ids = {r.image_id for r in dataset.records}
    cached = set(cache.keys())
    lines = diffs + ([f"images of the dataset not in the cache ({len(ids - cached)}):{listed(sorted(ids - cached))}"]
                     if ids - cached else [])
    lines += [f"images in the cache not in the dataset ({len(cached - ids)}):{listed(sorted(cached - ids))}"]\
        if cached - ids else []
    raise BadInput(f"{what} was not built for the images of {dataset.name}/{dataset.split} ({hint}):\n  "
                     + "\n  ".join(lines))


def check_image_files(dataset: MultiLabelDataset, cache: ProposalCache) -> None:
    """Refuse a cache whose images changed on disk since their proposals were computed (rotated, re-encoded, or
    another folder's images under the same names), naming them and the command that rebuilds the cache.

    One ``stat`` per image: a file with the recorded size and mtime is taken as unchanged; one whose size is
    the same but mtime moved is hashed, and accepted when its bytes are the recorded ones (a ``touch``, a copy
    without ``-p``). Records without a stamp (imports, caches of meta version 1 and 2) are not checked: such a
    cache cannot see an image changed in place.
    """
    stamps = cache.stamps()
    t0, changed, hashed = time.perf_counter(), [], 0
    for r in dataset.records:
        stamp = stamps.get(r.image_id)
        if stamp is None:
            continue
        try:
            st = os.stat(r.path)
            if st.st_size == stamp.size and st.st_mtime_ns == stamp.mtime_ns:
                continue
            if st.st_size == stamp.size and content_digest(r.path) == stamp.digest:  # touched, not changed
                hashed += 1
                continue
            changed.append(r.image_id)
        except OSError as e:  # removed or unreadable since the dataset was opened
            changed.append(f"{r.image_id} ({e.strerror})")
    if changed:
        raise BadInput(f"proposal cache {cache.path} was computed from other image files: {len(changed)} of the "
                       f"{len(dataset)} images of {dataset.name}/{dataset.split} changed on disk since (size or "
                       f"content differ from the stamp recorded when the cache was built):"
                       f"{listed(changed, CHANGED_LISTED)}\nits proposals do not fit these images: "
                       f"{rebuild_hint(cache.path, cache.meta)}")
    seconds = time.perf_counter() - t0
    if hashed:  # a copy without -p costs a hash of every image at every attach: say so when it is noticeable
        logger.log(logging.WARNING if seconds > SLOW_CHECK_S else logging.INFO,
                   f"{hashed} images of {dataset.name}/{dataset.split} have another mtime than when {cache.path} was "
                   f"built, so they were hashed ({seconds:.1f} s; their bytes are the same). This repeats at every "
                   "attach: copy datasets keeping mtimes (cp -p, rsync -t), or rebuild the cache where they are now")


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
