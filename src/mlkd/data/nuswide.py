"""NUS-WIDE (81 concepts), read from the official list and label files.

Layout (each file is looked for in the places the official archives unpack to)::

    ROOT/ImageList/{TrainImagelist,TestImagelist,Imagelist}.txt    one image per line, Windows paths
    ROOT/Concepts81.txt               or ROOT/ConceptsList/Concepts81.txt      81 names, one per line
    ROOT/TrainTestLabels/Labels_<concept>_{Train,Test}.txt    or ROOT/Groundtruth/TrainTestLabels/...
    ROOT/AllLabels/Labels_<concept>.txt                       or ROOT/Groundtruth/AllLabels/...
    ROOT/Flickr/<folder>/<file>.jpg                           the images (``image_root`` to put them elsewhere)

- **Image lists**: lines like ``actor\\0001_2124494179.jpg`` or ``C:\\ImageData\\Flickr\\actor\\0001_2124494179.jpg``;
  the last two components (``/`` or ``\\`` separated) are the folder and the file. The image id is
  ``folder/file`` (``actor/0001_2124494179.jpg``), its file ``image_root/folder/file``. The official split is
  161,789 train / 107,859 test images (``TrainImagelist.txt`` / ``TestImagelist.txt``).
- **Labels**: a label file holds one ``0`` or ``1`` per line, line ``i`` for image ``i`` of its list.
  ``TrainTestLabels`` (``Labels_<c>_Train.txt`` aligned with ``TrainImagelist.txt``, ``_Test`` with
  ``TestImagelist.txt``) are used when they exist, since they are per split exactly as the protocol reads
  them; otherwise ``AllLabels`` (``Labels_<c>.txt`` aligned with ``Imagelist.txt``), each split image found
  in ``Imagelist.txt`` by its id. ``label_source="traintest"`` / ``"all"`` forces one. A wrong line count or a
  value other than 0/1 raises ``ValueError`` naming the file, the line and the value.
- **Left out, and reported**: images missing on disk (many Flickr images can no longer be downloaded) and
  images with no positive label (the MLIC convention); a warning gives the counts, ``self.excluded`` holds the
  ids, and ``mlkd data manifest`` writes them to a file with the hashes of the kept images.
  ``keep_no_label=True`` keeps unlabelled images; ``skip_missing=False`` makes missing files an error.
- **A fixed image set**: ``image_manifest=FILE`` (written by ``mlkd data manifest``) keeps exactly the images
  it lists as kept; one of them missing on disk, unknown to the image list, or labelled differently (the
  manifest's hash covers ids and labels) is an error, so two users evaluate the same images.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np

from mlkd.data.base import ImageRecord, MultiLabelDataset, Transform, check_class_order, listed
from mlkd.data.manifest import ImageManifest, read_image_manifest
from mlkd.errors import BadInput, NotFound

NUS_SPLITS = {"train": ("TrainImagelist.txt", "Train"), "test": ("TestImagelist.txt", "Test")}
LABEL_SOURCES = ("auto", "traintest", "all")


def _first_existing(root: Path, candidates: list[str], what: str) -> Path:
    for c in candidates:
        if (root / c).exists():
            return root / c
    raise NotFound(f"NUS-WIDE {what} not found: looked for {[str(root / c) for c in candidates]}")


def _lines(path: Path) -> list[str]:
    """Lines of a text file without line ends; trailing blank lines dropped (CRLF files are common)."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def read_image_list(path: Path) -> list[str]:
    """Image ids ``folder/file`` of an image list file (format in the module docstring)."""
    if not path.is_file():
        raise NotFound(f"NUS-WIDE image list not found: {path}")
    ids, seen = [], {}
    for n, line in enumerate(_lines(path), start=1):
        parts = [p for p in re.split(r"[\\/]", line.strip()) if p]
        if len(parts) < 2:
            raise BadInput(f"{path}:{n}: expected a path like 'actor\\0001_2124494179.jpg', got {line!r}")
        image_id = f"{parts[-2]}/{parts[-1]}"
        if image_id in seen:
            raise BadInput(f"{path}:{n}: image {image_id!r} repeats line {seen[image_id]}")
        seen[image_id] = n
        ids.append(image_id)
    return ids


def read_concepts(path: Path) -> list[str]:
    """Concept names, one per line, in file order (81 for NUS-WIDE)."""
    names = [line.strip() for line in _lines(path) if line.strip()]
    if not names:
        raise BadInput(f"{path} lists no concept")
    return names


def read_label_column(path: Path, num_images: int, list_path: Path) -> np.ndarray:
    """``(N,)`` int8 labels of one concept file, one 0/1 per line aligned with ``list_path`` (N images)."""
    if not path.is_file():
        raise NotFound(f"NUS-WIDE label file not found: {path}")
    lines = _lines(path)
    if len(lines) != num_images:
        raise BadInput(f"{path}: {len(lines)} lines, but {list_path} lists {num_images} images "
                         "(expected one 0/1 per line, aligned with the image list)")
    values = np.char.strip(np.asarray(lines, dtype=str)) if lines else np.zeros(0, str)
    bad = np.flatnonzero((values != "0") & (values != "1"))
    if bad.size:
        raise BadInput(f"{path}:{bad[0] + 1}: label {lines[bad[0]]!r} is not 0 or 1 "
                         f"({bad.size} such lines; expected one 0/1 per line)")
    return (values == "1").astype(np.int8)


def _label_files(root: Path, concepts: list[str], split: str, source: str, ids: list[str],
                 list_path: Path) -> np.ndarray:
    """``(N, K)`` int8 labels of the split's images from TrainTestLabels or AllLabels (see module docstring)."""
    tt = [root / "TrainTestLabels", root / "Groundtruth" / "TrainTestLabels"]
    if source == "auto":
        source = "traintest" if any(d.is_dir() for d in tt) else "all"
    if source == "traintest":
        folder = _first_existing(root, ["TrainTestLabels", "Groundtruth/TrainTestLabels"], "TrainTestLabels folder")
        suffix = NUS_SPLITS[split][1]
        return np.stack([read_label_column(folder / f"Labels_{c}_{suffix}.txt", len(ids), list_path)
                         for c in concepts], axis=1)
    folder = _first_existing(root, ["AllLabels", "Groundtruth/AllLabels"], "AllLabels folder")
    all_list = root / "ImageList" / "Imagelist.txt"
    row = {image_id: i for i, image_id in enumerate(read_image_list(all_list))}
    absent = [i for i in ids if i not in row]
    if absent:
        raise BadInput(f"{len(absent)} images of {list_path} are not in {all_list}, whose rows AllLabels "
                         f"follow:{listed(absent)}")
    rows = np.asarray([row[i] for i in ids], np.int64)
    columns = [read_label_column(folder / f"Labels_{c}.txt", len(row), all_list)[rows] for c in concepts]
    return np.stack(columns, axis=1) if columns else np.zeros((len(ids), 0), np.int8)


class NusWideDataset(MultiLabelDataset):
    """NUS-WIDE (layout, label files, exclusions and manifests in the module docstring).

    Args:
        root: the folder holding ``ImageList/``, the concept list and the label folders.
        split: ``"train"`` or ``"test"``.
        transform: applied to each ``(image, target)``.
        skip_missing: True (default) leaves out and reports images missing on disk; False raises.
        image_root: folder holding ``<folder>/<file>`` images (default ``root/Flickr``).
        label_source: ``"auto"`` (TrainTestLabels if present, else AllLabels), ``"traintest"`` or ``"all"``.
        keep_no_label: keep images with no positive label (default False: left out and reported).
        image_manifest: a manifest file (``mlkd data manifest``) fixing the image set; ``skip_missing`` and
            ``keep_no_label`` are then unused (the manifest decides) and excluded ids are "not_in_manifest".

    Identity: name ``nuswide``, split as given.
    """

    OPTIONS = ("image_root", "label_source", "keep_no_label", "image_manifest")

    def __init__(self, root: str | Path, split: str, transform: Transform | None = None, skip_missing: bool = True,
                 image_root: str | Path | None = None, label_source: str = "auto", keep_no_label: bool = False,
                 image_manifest: str | Path | None = None) -> None:
        if split not in NUS_SPLITS:
            raise BadInput(f"unknown NUS-WIDE split {split!r}; expected one of {list(NUS_SPLITS)}")
        if label_source not in LABEL_SOURCES:
            raise BadInput(f"label_source must be one of {list(LABEL_SOURCES)}, got {label_source!r}")
        root = Path(root)
        self.root, self.image_root = root, Path(image_root) if image_root is not None else root / "Flickr"
        list_path = root / "ImageList" / NUS_SPLITS[split][0]
        ids = read_image_list(list_path)
        concepts = read_concepts(_first_existing(root, ["Concepts81.txt", "ConceptsList/Concepts81.txt"],
                                                 "concept list Concepts81.txt"))
        labels = _label_files(root, concepts, split, label_source, ids, list_path)
        records = [ImageRecord(i, self.image_root / i, labels[n]) for n, i in enumerate(ids)]
        manifest = read_image_manifest(image_manifest) if image_manifest is not None else None
        if manifest is not None:
            records, excluded = self._fix_to_manifest(records, manifest, split, concepts)
        else:
            records, excluded = self._exclude(records, skip_missing, keep_no_label, list_path)
        super().__init__("nuswide", split, concepts, records, transform, excluded=excluded)
        if manifest is not None and self.identity.labels_hash != manifest.identity.labels_hash:
            raise BadInput(f"the labels of the images in {manifest.path} differ from this copy's label files "
                             f"(hash {self.identity.labels_hash} != {manifest.identity.labels_hash})")

    def _exclude(self, records: list[ImageRecord], skip_missing: bool, keep_no_label: bool,
                 list_path: Path) -> tuple[list[ImageRecord], dict[str, list[str]]]:
        """Leave out missing files, then (unless ``keep_no_label``) unlabelled images; warn with the counts."""
        missing = [r.image_id for r in records if not os.path.isfile(r.path)]
        if missing and not skip_missing:
            raise NotFound(f"{len(missing)} of {len(records)} images of {list_path} are missing under "
                                    f"{self.image_root}:{listed(missing)}\n(skip_missing=True leaves them out)")
        if records and len(missing) == len(records):
            raise NotFound(f"none of the {len(records)} images of {list_path} exists under "
                                    f"{self.image_root} (e.g. {records[0].path}); pass image_root= the folder "
                                    "holding <folder>/<file>.jpg")
        lost = set(missing)
        present = [r for r in records if r.image_id not in lost]
        no_label = [] if keep_no_label else [r.image_id for r in present if not (r.labels == 1).any()]
        unlabelled = set(no_label)
        kept = [r for r in present if r.image_id not in unlabelled]
        if missing or no_label:
            warnings.warn(f"NUS-WIDE {list_path.name}: kept {len(kept)} of {len(records)} images; left out "
                          f"{len(missing)} missing under {self.image_root} and {len(no_label)} with no label "
                          "(ids in .excluded; `mlkd data manifest` writes them to a file)", stacklevel=3)
        return kept, {"missing": missing, "no_label": no_label}

    def _fix_to_manifest(self, records: list[ImageRecord], manifest: ImageManifest, split: str,
                         concepts: list[str]) -> tuple[list[ImageRecord], dict[str, list[str]]]:
        """Keep exactly the manifest's kept images (in image-list order); refuse any that cannot be had."""
        path = manifest.path
        if (manifest.identity.name, manifest.identity.split) != ("nuswide", split):
            raise BadInput(f"{path} is a manifest of {manifest.identity.name}/{manifest.identity.split}, "
                             f"not nuswide/{split}")
        check_class_order(concepts, manifest.identity.classes, f"image manifest {path}")
        known = {r.image_id for r in records}
        unknown = [i for i in manifest.kept if i not in known]
        if unknown:
            raise BadInput(f"{len(unknown)} images of {path} are not in this copy's image list:{listed(unknown)}")
        kept = [r for r in records if r.image_id in manifest.kept]
        missing = [r.image_id for r in kept if not os.path.isfile(r.path)]
        if missing:
            raise NotFound(f"{len(missing)} images that {path} lists are missing under "
                                    f"{self.image_root}, so this copy cannot evaluate the same images:"
                                    f"{listed(missing)}")
        return kept, {"not_in_manifest": [r.image_id for r in records if r.image_id not in manifest.kept]}
