"""Image manifests: which images a dataset holds, with a SHA-1 of each file, so two users can check that they
evaluate the same images (NUS-WIDE copies differ by which Flickr images could still be downloaded).

A manifest is a UTF-8 text file, tab-separated, ``#`` lines first::

    # mlkd-image-manifest v1
    # dataset: {"name": "nuswide", "split": "test", "classes": [...], "num_images": 2, "labels_hash": "...", ...}
    status	sha1	image_id
    kept	3f786850e387550fdab836ed7e6dc881de23001b	actor/0001_2124494179.jpg
    kept	89e6c98d92887913cadf06b2adb97f26cde4849b	actor/0002_174174086.jpg
    missing	-	actor/0003_1025372374.jpg
    no_label	-	airport/0001_1234.jpg

``kept`` rows are the dataset's images in its order, with the SHA-1 of the file's bytes; the other statuses
are images the annotation files list but the dataset left out, and why (``dataset.excluded``), unhashed.
The ``dataset`` line is :class:`mlkd.data.base.DatasetIdentity`, whose ``labels_hash`` covers ids, labels
and class order. :class:`mlkd.data.nuswide.NusWideDataset` takes a manifest to fix its image set.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mlkd.data.base import DatasetIdentity, MultiLabelDataset, content_digest
from mlkd.errors import BadInput, NotFound

MAGIC = "# mlkd-image-manifest v1"
COLUMNS = "status\tsha1\timage_id"


@dataclass
class ImageManifest:
    """A parsed manifest: the identity of the dataset it was written from, ``kept`` (image id -> sha1, in
    order) and ``excluded`` (reason -> image ids)."""

    path: Path
    identity: DatasetIdentity
    kept: dict[str, str]
    excluded: dict[str, list[str]] = field(default_factory=dict)


def file_sha1(path: str | Path) -> str:
    """Hex SHA-1 of a file's bytes (the manifest's hash)."""
    return content_digest(path, "sha1").hex()


def hash_images(ds: MultiLabelDataset, workers: int = 4, progress: bool = True) -> list[str]:
    """SHA-1 of every image file of ``ds``, in record order (threads: hashing releases the GIL)."""
    paths = [r.path for r in ds.records]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(tqdm(pool.map(file_sha1, paths), total=len(paths), desc="sha1", unit="img",
                         disable=not progress))


def write_image_manifest(ds: MultiLabelDataset, out: str | Path, workers: int = 4,
                         progress: bool = True) -> dict[str, int]:
    """Write the manifest of ``ds`` (format in the module docstring); returns the row count per status."""
    hashes = hash_images(ds, workers, progress)
    rows = [("kept", h, r.image_id) for h, r in zip(hashes, ds.records)]
    rows += [(reason, "-", image_id) for reason, ids in sorted(ds.excluded.items()) for image_id in ids]
    bad = [image_id for _, _, image_id in rows if "\t" in image_id or "\n" in image_id]
    if bad:
        raise BadInput(f"image ids with a tab or newline cannot be written to a manifest: {bad[:3]}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [MAGIC, "# dataset: " + json.dumps(ds.identity.to_dict()), COLUMNS]
    out.write_text("\n".join(lines + ["\t".join(row) for row in rows]) + "\n", encoding="utf-8")
    counts: dict[str, int] = {}
    for status, _, _ in rows:
        counts[status] = counts.get(status, 0) + 1
    return counts


def read_image_manifest(path: str | Path) -> ImageManifest:
    """Parse a manifest; ``ValueError`` naming the file and line for anything malformed."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"image manifest not found: {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    if len(lines) < 3 or lines[0] != MAGIC or not lines[1].startswith("# dataset: ") or lines[2] != COLUMNS:
        raise BadInput(f"{path} is not an mlkd image manifest: expected the lines {MAGIC!r}, "
                         f"'# dataset: {{...}}' and {COLUMNS!r} first (write one with `mlkd data manifest`)")
    try:
        identity = DatasetIdentity.from_dict(json.loads(lines[1][len("# dataset: "):]))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise BadInput(f"{path}:2: malformed dataset identity ({e})") from e
    kept: dict[str, str] = {}
    excluded: dict[str, list[str]] = {}
    for n, line in enumerate(lines[3:], start=4):
        fields = line.split("\t")
        if len(fields) != 3 or not fields[2]:
            raise BadInput(f"{path}:{n}: expected 3 tab-separated fields (status, sha1, image id), got {line!r}")
        status, digest, image_id = fields
        if status == "kept":
            if image_id in kept:
                raise BadInput(f"{path}:{n}: image id {image_id!r} is listed twice")
            kept[image_id] = digest
        else:
            excluded.setdefault(status, []).append(image_id)
    return ImageManifest(path, identity, kept, excluded)


def compare_with_manifest(ds: MultiLabelDataset, manifest: ImageManifest, hashes: list[str] | None = None
                          ) -> list[str]:
    """Differences between ``ds`` and a manifest (identity, image ids, and file hashes when ``hashes`` of
    ``ds.records`` are given), one readable line each; empty when they match."""
    problems = [f"{k}: dataset has {getattr(ds.identity, k)!r}, manifest has {getattr(manifest.identity, k)!r}"
                for k in ("name", "split", "num_images", "labels_hash")
                if getattr(ds.identity, k) != getattr(manifest.identity, k)]
    if ds.identity.classes != manifest.identity.classes:
        problems.append("class order differs")
    ids = [r.image_id for r in ds.records]
    extra, lacking = sorted(set(ids) - set(manifest.kept)), sorted(set(manifest.kept) - set(ids))
    if extra:
        problems.append(f"{len(extra)} dataset images are not in the manifest, e.g. {extra[:3]}")
    if lacking:
        problems.append(f"{len(lacking)} manifest images are not in the dataset, e.g. {lacking[:3]}")
    if hashes is not None:
        differ = [i for i, h in zip(ids, hashes) if i in manifest.kept and manifest.kept[i] != h]
        if differ:
            problems.append(f"{len(differ)} image files differ (sha1), e.g. {differ[:3]}")
    return problems


def manifest_summary(counts: dict[str, Any]) -> str:
    """``kept 3, missing 1, no_label 1``."""
    order = ["kept"] + sorted(k for k in counts if k != "kept")
    return ", ".join(f"{k} {counts[k]}" for k in order if k in counts)
