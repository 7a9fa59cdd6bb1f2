"""The custom CSV / JSON-lines loader, its errors, build_dataset and `mlkd data info`."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mlkd.cli import main
from mlkd.data import CustomDataset, MultiLabelDataset, Warp, build_dataset, collate
from mlkd.errors import BadInput


def write_png(path: Path, h: int, w: int, value: int) -> np.ndarray:
    """A tiny RGB image whose pixels are distinct per position; returns the RGB array written."""
    rgb = ((np.arange(h * w * 3).reshape(h, w, 3) * 7 + value) % 256).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return rgb


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def images(tmp_path):
    return {name: write_png(tmp_path / "img" / name, 6 + i, 8 + i, 10 * i)
            for i, name in enumerate(["a.png", "b.png", "c.png"])}


JSONL_ROWS = [
    {"path": "img/a.png", "labels": ["dog", "cat"], "boxes": [[1, 1, 4, 5, "cat"], [0, 0, 2, 2.5, "dog"]]},
    {"path": "img/b.png", "labels": []},
    {"path": "img/c.png", "labels": ["bird"], "ignore": ["cat"]},
]


def test_jsonl_infers_sorted_classes_and_saves_them(tmp_path, images):
    manifest = write_jsonl(tmp_path / "train.jsonl", JSONL_ROWS)
    ds = CustomDataset(manifest)
    assert ds.classes == ["bird", "cat", "dog"] and ds.split == "train" and len(ds) == 3
    assert (tmp_path / "classes.txt").read_text() == "bird\ncat\ndog\n"
    assert ds.label_matrix().tolist() == [[0, 1, 1], [0, 0, 0], [1, -1, 0]]
    assert [r.image_id for r in ds.records] == ["img/a.png", "img/b.png", "img/c.png"]
    assert ds.records[0].boxes.tolist() == [[1, 1, 4, 5], [0, 0, 2, 2.5]]
    assert ds.records[0].box_labels.tolist() == [1, 2] and ds.records[1].boxes is None
    image, target = ds[0]
    assert image.dtype == torch.uint8 and np.array_equal(image.permute(1, 2, 0).numpy(), images["a.png"])
    assert target["image_id"] == "img/a.png" and target["orig_size"].tolist() == [6, 8]
    assert target["labels"].tolist() == [0.0, 1.0, 1.0] and target["boxes"].shape == (2, 4)


def test_class_order_from_list_file_or_existing_classes_txt(tmp_path, images):
    manifest = write_jsonl(tmp_path / "train.jsonl", JSONL_ROWS)
    by_list = CustomDataset(manifest, classes=["dog", "cat", "bird", "fish"])
    assert by_list.label_matrix()[0].tolist() == [1, 1, 0, 0] and by_list.records[0].box_labels.tolist() == [1, 0]
    (tmp_path / "names.txt").write_text("cat\n\ndog\nbird\n")
    assert CustomDataset(manifest, classes=tmp_path / "names.txt").classes == ["cat", "dog", "bird"]
    (tmp_path / "classes.txt").write_text("dog\nbird\ncat\nzebra\n")
    ds = CustomDataset(manifest)
    assert ds.classes == ["dog", "bird", "cat", "zebra"] and ds.label_matrix()[2].tolist() == [0, 1, -1, 0]
    assert ds.identity.labels_hash != by_list.identity.labels_hash  # class order is part of the identity


def test_csv_with_both_separators_boxes_and_ignore(tmp_path, images):
    manifest = tmp_path / "val.csv"
    manifest.write_text('path,labels,boxes,ignore\n'
                        'img/a.png,cat;dog,"[[1, 1, 4, 5, ""cat""]]",\n'
                        'img/b.png,,,\n'
                        'img/c.png, bird | dog ,,cat\n')
    ds = CustomDataset(manifest)
    assert ds.classes == ["bird", "cat", "dog"] and ds.split == "val"
    assert ds.label_matrix().tolist() == [[0, 1, 1], [0, 0, 0], [1, -1, 1]]
    assert ds.records[0].boxes.tolist() == [[1, 1, 4, 5]] and ds.records[2].boxes is None
    assert ds.records[2].image_id == "img/c.png"


def test_root_and_split_arguments(tmp_path, images):
    (tmp_path / "lists").mkdir()
    manifest = write_jsonl(tmp_path / "lists" / "all.jsonl", [{"path": "a.png", "labels": ["x"]}])
    ds = CustomDataset(manifest, root=tmp_path / "img", split="test")
    assert ds.split == "test" and ds[0][0].shape == (3, 6, 8)


def test_one_image_dataset_in_a_dataloader_with_transform(tmp_path, images):
    manifest = write_jsonl(tmp_path / "one.jsonl", [JSONL_ROWS[0]])
    ds = CustomDataset(manifest, transform=Warp((12, 16)))
    assert len(ds) == 1 and isinstance(ds, MultiLabelDataset)
    batch_images, targets = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate)))
    assert batch_images.shape == (1, 3, 12, 16)
    assert torch.allclose(targets[0]["boxes"], torch.tensor([[2.0, 2.0, 8.0, 10.0], [0.0, 0.0, 4.0, 5.0]]))


def test_dataloader_over_mixed_sizes(tmp_path, images):
    ds = CustomDataset(write_jsonl(tmp_path / "train.jsonl", JSONL_ROWS))
    batch_images, targets = next(iter(DataLoader(ds, batch_size=3, collate_fn=collate)))
    assert isinstance(batch_images, list) and [tuple(i.shape) for i in batch_images] == [(3, 6, 8), (3, 7, 9), (3, 8, 10)]
    warped = CustomDataset(tmp_path / "train.jsonl", transform=Warp(5))
    stacked, targets = next(iter(DataLoader(warped, batch_size=3, collate_fn=collate)))
    assert stacked.shape == (3, 3, 5, 5) and [t["image_id"] for t in targets] == ["img/a.png", "img/b.png", "img/c.png"]


def test_unknown_class_names_file_line_name_and_valid_classes(tmp_path, images):
    manifest = write_jsonl(tmp_path / "train.jsonl", JSONL_ROWS)
    with pytest.raises(ValueError) as e:
        CustomDataset(manifest, classes=["cat", "dog"])
    assert f"{manifest}:3" in str(e.value) and "'bird'" in str(e.value) and "['cat', 'dog']" in str(e.value)
    csv = tmp_path / "t.csv"
    csv.write_text("path,labels\nimg/a.png,cat\nimg/b.png,cat;cow\n")
    with pytest.raises(ValueError, match=rf"{csv}:3: unknown class 'cow'"):
        CustomDataset(csv, classes=["cat", "dog"])


def test_malformed_json_line_names_file_and_line(tmp_path, images):
    manifest = write_jsonl(tmp_path / "train.jsonl", [JSONL_ROWS[0], "", '{"path": "img/b.png", "labels": [}'])
    with pytest.raises(ValueError, match=rf"{manifest}:3: malformed JSON"):
        CustomDataset(manifest)
    csv = tmp_path / "t.csv"
    csv.write_text('path,labels,boxes\nimg/a.png,cat,"[[1, 2, 3"\n')
    with pytest.raises(ValueError, match=rf"{csv}:2: malformed JSON in the 'boxes' column"):
        CustomDataset(csv)


@pytest.mark.parametrize("box, message", [
    ([1, 1, 4, "cat"], r"\[x1, y1, x2, y2, class name\]"),
    ([1, 1, 4, 5, "dog"], "not among the image's labels"),
    ([1, 1, 4, 5, "cow"], "unknown class 'cow'"),
])
def test_bad_boxes_raise_with_file_line(tmp_path, images, box, message):
    manifest = write_jsonl(tmp_path / "train.jsonl", [{"path": "img/a.png", "labels": ["cat"], "boxes": [box]}])
    with pytest.raises(ValueError, match=rf"{manifest}:1: .*{message}"):
        CustomDataset(manifest, classes=["cat", "dog"])


@pytest.mark.parametrize("box, message", [  # img/a.png is 8 x 6
    ([4, 1, 4, 5, "cat"], r"1 zero-area \(x2 == x1 or y2 == y1\)"),
    ([1, 5, 4, 2, "cat"], r"1 inverted \(x2 < x1 or y2 < y1\)"),
    ([-1, 1, 4, 5, "cat"], "1 out-of-image"),
    ([1, 1, 4, 7, "cat"], "1 out-of-image"),
])
def test_defective_boxes_refused_naming_file_line_and_box(tmp_path, images, box, message):
    manifest = write_jsonl(tmp_path / "train.jsonl", [{"path": "img/a.png", "labels": ["cat"], "boxes": [box]}])
    with pytest.raises(ValueError, match=rf"{manifest}: 1 of 1 boxes are defective: {message}; first: "
                                         rf"{manifest}:1 boxes\[0\] \('cat'\)"):
        CustomDataset(manifest, classes=["cat", "dog"], bad_boxes="refuse")


@pytest.mark.parametrize("row, message", [
    ({"labels": ["cat"]}, r"missing required key\(s\) \['path'\]"),
    ({"path": "", "labels": ["cat"]}, "'path' must be a non-empty string"),
    ({"path": "img/a.png", "labels": "cat"}, "'labels' must be a list"),
    ({"path": "img/a.png", "labels": ["cat"], "ignore": ["cat"]}, "both in 'labels' and in 'ignore'"),
    ([1, 2], "expected a JSON object"),
])
def test_bad_rows_raise(tmp_path, images, row, message):
    manifest = write_jsonl(tmp_path / "train.jsonl", [row])
    with pytest.raises(ValueError, match=message):
        CustomDataset(manifest, classes=["cat"])


def test_duplicate_paths_empty_annotation_files_and_bad_csv_header(tmp_path, images):
    dup = write_jsonl(tmp_path / "d.jsonl", [JSONL_ROWS[1], JSONL_ROWS[1]])
    with pytest.raises(ValueError, match=rf"{dup}:2: duplicate image path 'img/b.png' \(first at {dup}:1\)"):
        CustomDataset(dup, classes=["cat"])
    with pytest.raises(ValueError, match="lists no images"):
        CustomDataset(write_jsonl(tmp_path / "e.jsonl", [""]))
    with pytest.raises(ValueError, match="names no class at all"):
        CustomDataset(write_jsonl(tmp_path / "n.jsonl", [JSONL_ROWS[1]]))
    (tmp_path / "h.csv").write_text("file,labels\nimg/a.png,cat\n")
    with pytest.raises(ValueError, match=r"missing \['path'\], header is \['file', 'labels'\]"):
        CustomDataset(tmp_path / "h.csv")
    with pytest.raises(ValueError, match=r"unknown annotation file type '.txt'"):
        CustomDataset(tmp_path / "x.txt")
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        CustomDataset(tmp_path / "x.jsonl")


@pytest.mark.parametrize("alias", ["./img/a.png", "img/../img/a.png", "ABS", "img/link.png", "img/hard.png"])
def test_one_file_under_two_paths_is_refused_naming_both_rows(tmp_path, images, alias):
    """The id is the path as written, so `img/a.png` and `./img/a.png` (an absolute path, a symlink, a hard link)
    made two images of one file: it counted twice in training and in the metrics."""
    (tmp_path / "img" / "link.png").symlink_to("a.png")
    os.link(tmp_path / "img" / "a.png", tmp_path / "img" / "hard.png")
    path = str(tmp_path / "img" / "a.png") if alias == "ABS" else alias
    manifest = write_jsonl(tmp_path / "train.jsonl", JSONL_ROWS + [{"path": path, "labels": ["cat"]}])
    with pytest.raises(BadInput, match=rf"^{manifest}:4: image {re.escape(repr(path))} is the same file as image "
                                       rf"'img/a.png' at {manifest}:1 \(.*{tmp_path / 'img' / 'a.png'}\); list each "
                                       "image once"):
        CustomDataset(manifest)
    other = write_jsonl(tmp_path / "ok.jsonl", JSONL_ROWS[1:] + [{"path": path, "labels": ["cat"]}])
    assert len(CustomDataset(other, classes=["bird", "cat", "dog"])) == 3  # one name per file is fine


def test_missing_files_listed_or_skipped(tmp_path, images):
    rows = JSONL_ROWS + [{"path": f"img/gone{i:02d}.png", "labels": ["cat"]} for i in range(12)]
    manifest = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(FileNotFoundError) as e:
        CustomDataset(manifest)
    text = str(e.value)
    assert "12 of 15 image files" in text and "img/gone00.png" in text and "img/gone09.png" in text
    assert "img/gone10.png" not in text and "and 2 more" in text and "skip_missing" in text
    with pytest.warns(UserWarning, match="skipped 12 missing"):
        ds = CustomDataset(manifest, skip_missing=True)
    assert len(ds) == 3 and len(ds.missing) == 12 and ds.identity.num_images == 3


def test_build_dataset_accepts_manifests_and_lists_forms_otherwise(tmp_path, images):
    manifest = write_jsonl(tmp_path / "train.jsonl", JSONL_ROWS)
    ds = build_dataset(str(manifest), transform=Warp(4))
    assert isinstance(ds, CustomDataset) and ds[1][0].shape == (3, 4, 4)
    (tmp_path / "t.csv").write_text("path,labels\nimg/a.png,cat\n")
    assert len(build_dataset(str(tmp_path / "t.csv"))) == 1
    with pytest.raises(ValueError, match=r"(?s)unrecognised dataset spec 'imagenet:/data'.*PATH\.jsonl.*PATH\.csv"):
        build_dataset("imagenet:/data")


def test_cli_info_counts_and_missing(tmp_path, images, capsys):
    rows = JSONL_ROWS + [{"path": "img/gone.png", "labels": ["cat"]}]
    manifest = write_jsonl(tmp_path / "train.jsonl", rows)
    assert main(["data", "info", "--dataset", str(manifest), "--decode"]) == 0
    out = capsys.readouterr().out
    assert "3 images, 3 classes" in out and "label cardinality 1.000" in out and "boxes: 2" in out
    assert "missing image files: 1" in out and "img/gone.png" in out and "H 6-8, W 8-10" in out
    lines = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.split()}
    assert lines["bird"] == ["1", "0", "0"] and lines["cat"] == ["1", "1", "1"] and lines["dog"] == ["1", "0", "1"]
    (tmp_path / "img" / "b.png").write_bytes(b"not a png")
    assert main(["data", "info", "--dataset", str(manifest), "--decode"]) == 1
    assert "unreadable image files: 1" in capsys.readouterr().out
    assert main(["data", "info", "--dataset", str(tmp_path / "none.jsonl")]) == 1


@pytest.mark.parametrize("row, message", [
    ({"path": "img/a.png", "lables": ["cat"]}, r"unknown key\(s\) \['lables'\]"),
    ({"path": "img/a.png"}, r"missing required key\(s\) \['labels'\]"),
    ({"path": "img/a.png", "labels": ["cat"], "box": [[1, 1, 4, 5, "cat"]]}, r"unknown key\(s\) \['box'\]"),
])
def test_unknown_or_missing_keys_name_file_line_and_the_valid_keys(tmp_path, images, row, message):
    manifest = write_jsonl(tmp_path / "train.jsonl", [JSONL_ROWS[1], row])
    with pytest.raises(ValueError, match=rf"{manifest}:2: {message}; valid keys are path, labels \(required\) and "
                                         r"boxes, ignore \(optional\)"):
        CustomDataset(manifest, classes=["cat"])


def test_csv_unknown_columns_and_short_or_long_rows(tmp_path, images):
    csv = tmp_path / "t.csv"
    csv.write_text("path,labels,boxs\nimg/a.png,cat,\n")
    with pytest.raises(ValueError, match=rf"{csv}:1: unknown CSV column\(s\) \['boxs'\]; valid keys are path, labels"):
        CustomDataset(csv, classes=["cat"])
    csv.write_text("path,labels\nimg/a.png,cat\nimg/b.png\n")
    with pytest.raises(ValueError, match=rf"{csv}:3: the row has 1 fields where the header \['path', 'labels'\] has 2"):
        CustomDataset(csv, classes=["cat"])
    csv.write_text("path,labels\nimg/a.png,cat,dog\n")
    with pytest.raises(ValueError, match=rf"{csv}:2: the row has 3 fields where the header"):
        CustomDataset(csv, classes=["cat", "dog"])
    csv.write_text("path,labels\nimg/a.png,\n")  # an empty labels field is still "no positive label"
    assert CustomDataset(csv, classes=["cat"]).label_matrix().tolist() == [[0]]


def test_boxes_crossing_the_border_are_clipped_by_default_to_the_size_in_the_header(tmp_path, images):
    rows = [{"path": "img/a.png", "labels": ["cat"], "boxes": [[-1, 1, 4, 5, "cat"], [2, 2, 12, 9, "cat"],
                                                               [9, 1, 12, 5, "cat"], [1, 1, 3, 3, "cat"]]}]
    manifest = write_jsonl(tmp_path / "train.jsonl", rows)  # img/a.png is 8 wide x 6 high
    with pytest.warns(UserWarning, match=rf"bad_boxes=clip: ground-truth boxes, 4 boxes checked: 2 out-of-image "
                                         rf"clipped to the image, 1 out-of-image dropped .*{manifest}:1 boxes\[0\]"):
        ds = CustomDataset(manifest, classes=["cat"])
    assert ds.records[0].boxes.tolist() == [[0, 1, 4, 5], [2, 2, 8, 6], [1, 1, 3, 3]]
    assert ds.records[0].box_labels.tolist() == [0, 0, 0] and ds.box_report.clipped == 2
    assert ds.label_matrix().tolist() == [[1]]
    with pytest.warns(UserWarning, match="bad_boxes=drop: ground-truth boxes, 4 boxes checked: 3 out-of-image dropped"):
        dropped = CustomDataset(manifest, classes=["cat"], bad_boxes="drop")
    assert dropped.records[0].boxes.tolist() == [[1, 1, 3, 3]] and dropped.box_report.dropped["out_of_image"] == 3
    with pytest.raises(ValueError, match=r"bad_boxes must be one of \['refuse', 'clip', 'drop'\], got 'keep'"):
        CustomDataset(manifest, classes=["cat"], bad_boxes="keep")
