"""NUS-WIDE loader on a fixture in the official layout (Windows paths, CRLF), label file errors, exclusions,
and image manifests (`mlkd data manifest`) that fix the image set."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from mlkd.cli import main
from mlkd.data import NusWideDataset, build_dataset
from mlkd.data.manifest import read_image_manifest

CONCEPTS = ["airport", "animal", "beach", "sky"]
# split -> [(folder\file, labels per concept)]; the last test image is missing on disk, one has no label
SPLITS = {
    "Train": [("actor\\0001_2124494179.jpg", [0, 1, 0, 1]), ("airport\\0001_99.jpg", [1, 0, 0, 1]),
              ("beach\\0003_7.jpg", [0, 0, 1, 0])],
    "Test": [("actor\\0002_174174086.jpg", [0, 0, 0, 1]), ("animal\\0010_55.jpg", [0, 1, 0, 0]),
             ("beach\\0001_8.jpg", [0, 0, 0, 0]), ("sky\\0004_3.jpg", [1, 0, 1, 1]),
             ("sky\\0005_4.jpg", [0, 0, 0, 1])],
}
MISSING = "sky/0005_4.jpg"


def write_nuswide(root: Path, traintest: bool = True, all_labels: bool = True, nested: bool = False) -> Path:
    """Image lists (CRLF, backslashes; Imagelist.txt with the C:\\ImageData\\Flickr prefix), Concepts81.txt,
    TrainTestLabels and AllLabels (under Groundtruth/ and ConceptsList/ when ``nested``), Flickr images."""
    crlf = lambda lines: "".join(f"{line}\r\n" for line in lines)  # noqa: E731
    (root / "ImageList").mkdir(parents=True)
    all_rows = SPLITS["Test"][::-1] + SPLITS["Train"]  # Imagelist.txt has its own order
    (root / "ImageList" / "Imagelist.txt").write_text(crlf(f"C:\\ImageData\\Flickr\\{p}" for p, _ in all_rows))
    concepts_dir = root / "ConceptsList" if nested else root
    concepts_dir.mkdir(exist_ok=True)
    (concepts_dir / "Concepts81.txt").write_text(crlf(CONCEPTS))
    gt = root / "Groundtruth" if nested else root
    for split, rows in SPLITS.items():
        (root / "ImageList" / f"{split}Imagelist.txt").write_text(crlf(p for p, _ in rows))
        if traintest:
            (gt / "TrainTestLabels").mkdir(parents=True, exist_ok=True)
            for k, c in enumerate(CONCEPTS):
                (gt / "TrainTestLabels" / f"Labels_{c}_{split}.txt").write_text(crlf(str(y[k]) for _, y in rows))
        for p, _ in rows:
            if p.replace("\\", "/") != MISSING:
                path = root / "Flickr" / p.replace("\\", "/")
                path.parent.mkdir(parents=True, exist_ok=True)
                assert cv2.imwrite(str(path), np.full((5, 7, 3), len(p) * 9 % 256, np.uint8))
    if all_labels:
        (gt / "AllLabels").mkdir(parents=True, exist_ok=True)
        for k, c in enumerate(CONCEPTS):
            (gt / "AllLabels" / f"Labels_{c}.txt").write_text(crlf(f"{y[k]} " for _, y in all_rows))
    return root


def expected(split: str, keep=lambda p, y: p != MISSING and any(y)) -> tuple[list[str], np.ndarray]:
    rows = [(p.replace("\\", "/"), y) for p, y in SPLITS[split]]
    kept = [(p, y) for p, y in rows if keep(p, y)]
    return [p for p, _ in kept], np.array([y for _, y in kept], np.int8)


def test_test_split_labels_exclusions_and_warning(tmp_path):
    write_nuswide(tmp_path)
    with pytest.warns(UserWarning, match=r"kept 3 of 5 images; left out 1 missing .* and 1 with no label"):
        ds = NusWideDataset(tmp_path, "test")
    ids, labels = expected("Test")
    assert ds.classes == CONCEPTS and [r.image_id for r in ds.records] == ids
    assert np.array_equal(ds.label_matrix(), labels)
    assert ds.excluded == {"missing": [MISSING], "no_label": ["beach/0001_8.jpg"]}
    assert ds.identity.name == "nuswide" and ds.identity.split == "test" and ds.identity.num_images == 3
    image, target = ds[0]
    assert image.shape == (3, 5, 7) and target["image_id"] == "actor/0002_174174086.jpg"


def test_alllabels_give_the_same_labels_and_auto_prefers_traintest(tmp_path):
    write_nuswide(tmp_path)
    by_tt = NusWideDataset(tmp_path, "train", label_source="traintest")  # nothing left out: no warning
    by_all = NusWideDataset(tmp_path, "train", label_source="all")
    auto = NusWideDataset(tmp_path, "train")
    ids, labels = expected("Train")
    for ds in (by_tt, by_all, auto):
        assert [r.image_id for r in ds.records] == ids and np.array_equal(ds.label_matrix(), labels)
    # Make AllLabels disagree: "auto" must still read TrainTestLabels while both exist.
    (tmp_path / "AllLabels" / "Labels_sky.txt").write_text("0\n" * 8)
    assert np.array_equal(NusWideDataset(tmp_path, "train").label_matrix(), labels)
    assert not np.array_equal(NusWideDataset(tmp_path, "train", label_source="all").label_matrix(), labels)


def test_groundtruth_and_conceptslist_folders_and_alllabels_only(tmp_path):
    write_nuswide(tmp_path, traintest=False, nested=True)
    with pytest.warns(UserWarning):
        ds = build_dataset(f"nuswide:{tmp_path}:test", keep_no_label=True)
    ids, labels = expected("Test", keep=lambda p, y: p != MISSING)
    assert [r.image_id for r in ds.records] == ids and np.array_equal(ds.label_matrix(), labels)
    assert ds.excluded == {"missing": [MISSING]}
    with pytest.raises(FileNotFoundError, match="TrainTestLabels folder not found"):
        NusWideDataset(tmp_path, "test", label_source="traintest")


def test_missing_images_raise_with_skip_missing_false(tmp_path):
    write_nuswide(tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"1 of 5 images of .*TestImagelist\.txt are missing .*\n  {MISSING}"):
        build_dataset(f"nuswide:{tmp_path}:test", skip_missing=False)
    with pytest.raises(FileNotFoundError, match=r"none of the 5 images of .* exists under .*elsewhere.*image_root="):
        build_dataset(f"nuswide:{tmp_path}:test", image_root=tmp_path / "elsewhere")
    (tmp_path / "Flickr").rename(tmp_path / "images")
    with pytest.warns(UserWarning, match="kept 3 of 5"):
        assert len(build_dataset(f"nuswide:{tmp_path}:test", image_root=tmp_path / "images")) == 3


@pytest.mark.parametrize("content, message", [
    ("0\n1\n0\n", r"3 lines, but .*TestImagelist\.txt lists 5 images"),
    ("0\n1\n0\n1\n0\n1\n", r"6 lines, but .*TestImagelist\.txt lists 5 images"),
    ("0\n1\n2\n1\n0\n", r"Labels_beach_Test\.txt:3: label '2' is not 0 or 1"),
    ("0\n1\n0 1\n1\n0\n", r"Labels_beach_Test\.txt:3: label '0 1' is not 0 or 1"),
    ("0\n1\n\n1\n0\n", r"Labels_beach_Test\.txt:3: label '' is not 0 or 1"),
])
def test_bad_label_file_names_file_line_and_value(tmp_path, content, message):
    write_nuswide(tmp_path)
    (tmp_path / "TrainTestLabels" / "Labels_beach_Test.txt").write_text(content)
    with pytest.raises(ValueError, match=message):
        NusWideDataset(tmp_path, "test")


def test_missing_label_file_and_bad_image_list(tmp_path):
    write_nuswide(tmp_path)
    (tmp_path / "TrainTestLabels" / "Labels_sky_Test.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"label file not found: .*Labels_sky_Test\.txt"):
        NusWideDataset(tmp_path, "test")
    (tmp_path / "ImageList" / "TrainImagelist.txt").write_text("actor\\0001_1.jpg\nnofolder.jpg\n")
    with pytest.raises(ValueError, match=r"TrainImagelist\.txt:2: expected a path like"):
        NusWideDataset(tmp_path, "train")
    with pytest.raises(ValueError, match=r"unknown NUS-WIDE split 'val'"):
        NusWideDataset(tmp_path, "val")


def test_manifest_cli_writes_hashes_and_fixes_the_image_set(tmp_path, capsys):
    root = write_nuswide(tmp_path / "nus")
    spec, out = f"nuswide:{root}:test", tmp_path / "test_manifest.tsv"
    assert main(["data", "manifest", "--dataset", spec, "--out", str(out), "--quiet"]) == 0
    assert "kept 3, missing 1, no_label 1" in capsys.readouterr().out
    manifest = read_image_manifest(out)
    ids, _ = expected("Test")
    assert list(manifest.kept) == ids and manifest.excluded == {"missing": [MISSING], "no_label": ["beach/0001_8.jpg"]}
    for image_id, digest in manifest.kept.items():
        assert digest == hashlib.sha1((root / "Flickr" / image_id).read_bytes()).hexdigest()
    # The missing image appears on disk: the plain loader now keeps it, the manifest keeps the set fixed.
    shutil.copy(root / "Flickr" / "sky/0004_3.jpg", root / "Flickr" / MISSING)
    with pytest.warns(UserWarning):
        assert len(NusWideDataset(root, "test")) == 4
    fixed = NusWideDataset(root, "test", image_manifest=out)
    assert [r.image_id for r in fixed.records] == ids and fixed.identity == manifest.identity
    assert fixed.excluded == {"not_in_manifest": ["beach/0001_8.jpg", MISSING]}
    assert main(["data", "manifest", "--dataset", spec, "--option", f"image_manifest={out}", "--check", str(out),
                 "--quiet"]) == 0
    # A changed file is caught by --check; a kept image gone from disk makes the manifest unusable.
    (root / "Flickr" / ids[1]).write_bytes((root / "Flickr" / ids[1]).read_bytes() + b"\0")
    assert main(["data", "manifest", "--dataset", spec, "--option", f"image_manifest={out}", "--check", str(out),
                 "--quiet"]) == 1
    assert "1 image files differ (sha1)" in capsys.readouterr().out
    (root / "Flickr" / ids[0]).unlink()
    with pytest.raises(FileNotFoundError, match=rf"1 images that .* lists are missing .*\n  {ids[0]}"):
        NusWideDataset(root, "test", image_manifest=out)


def test_manifest_refuses_other_labels_or_another_split(tmp_path):
    root = write_nuswide(tmp_path / "nus")
    out = tmp_path / "m.tsv"
    assert main(["data", "manifest", "--dataset", f"nuswide:{root}:test", "--out", str(out), "--quiet"]) == 0
    with pytest.raises(ValueError, match="is a manifest of nuswide/test, not nuswide/train"):
        NusWideDataset(root, "train", image_manifest=out)
    (root / "TrainTestLabels" / "Labels_animal_Test.txt").write_text("1\n1\n0\n0\n0\n")
    with pytest.raises(ValueError, match="labels of the images in .* differ from this copy's label files"):
        NusWideDataset(root, "test", image_manifest=out)
    out.write_text("not a manifest\n")
    with pytest.raises(ValueError, match="is not an mlkd image manifest"):
        NusWideDataset(root, "test", image_manifest=out)
