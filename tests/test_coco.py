"""MS-COCO 2014 loader on a fixture in the real layout: labels vs a naive loop, crowd modes, boxes, errors."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from mlkd.data import CocoDataset, Warp, build_dataset
from mlkd.data.coco import xywh_to_xyxy

# Category ids with gaps, listed out of id order (the loader must sort by id).
CATEGORIES = [{"supercategory": "animal", "id": 18, "name": "dog"},
              {"supercategory": "person", "id": 1, "name": "person"},
              {"supercategory": "vehicle", "id": 7, "name": "train"},
              {"supercategory": "vehicle", "id": 3, "name": "car"}]
# (image id, [(category id, [x, y, w, h], iscrowd), ...])
IMAGES = [
    (42, [(1, [1.5, 2.0, 4.25, 3.0], 0), (18, [0, 0, 6, 5], 0), (1, [2, 1, 5, 6], 1)]),
    (73, [(3, [0.0, 0.0, 8.0, 6.0], 1)]),              # car only as a crowd region
    (74, []),                                          # no annotation at all
    (133, [(7, [3, 3, 2, 2], 0), (18, [1, 1, 2, 2], 0), (18, [4, 2, 3, 3], 0), (3, [0, 0, 1, 1], 1)]),
    (9, [(1, [0, 0, 7.5, 5.5], 0)]),
]


def file_name(split: str, image_id: int) -> str:
    return f"COCO_{split}_{image_id:012d}.jpg"


def write_coco(root: Path, split: str = "val2014", images=IMAGES, categories=CATEGORIES, skip_files=()) -> Path:
    """An ``instances_<split>.json`` in the real schema, plus a small JPEG per image under ``root/<split>``."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(parents=True, exist_ok=True)
    data = {"info": {"description": "COCO 2014 Dataset", "version": "1.0", "year": 2014},
            "licenses": [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1, "name": "BY-NC-SA"}],
            "images": [], "annotations": [], "categories": categories}
    ann_id = 1000
    for image_id, anns in images:
        name = file_name(split, image_id)
        data["images"].append({"license": 1, "file_name": name,
                               "coco_url": f"http://images.cocodataset.org/{split}/{name}", "height": 6, "width": 8,
                               "date_captured": "2013-11-14 16:28:13",
                               "flickr_url": "http://farm4.staticflickr.com/x.jpg", "id": image_id})
        for cid, bbox, crowd in anns:
            data["annotations"].append({"segmentation": [[0, 0, 1, 0, 1, 1]] if not crowd else
                                        {"counts": [0, 48], "size": [6, 8]}, "area": bbox[2] * bbox[3],
                                        "iscrowd": crowd, "image_id": image_id, "bbox": bbox,
                                        "category_id": cid, "id": ann_id})
            ann_id += 1
        if name not in skip_files:
            img = np.full((6, 8, 3), (image_id * 37) % 256, np.uint8)
            assert cv2.imwrite(str(root / split / name), img)
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps(data))
    return path


def naive_labels(path: Path, crowd_value: int, keep_empty: bool = False) -> tuple[list[str], np.ndarray]:
    """File names (sorted) and labels straight from the raw JSON, with a loop per class."""
    data = json.loads(path.read_text())
    cat_ids = sorted(c["id"] for c in data["categories"])
    names, rows = [], []
    for im in sorted(data["images"], key=lambda im: im["file_name"]):
        anns = [a for a in data["annotations"] if a["image_id"] == im["id"]]
        if not anns and not keep_empty:
            continue
        row = []
        for cid in cat_ids:
            plain = any(a["category_id"] == cid and a["iscrowd"] == 0 for a in anns)
            crowd = any(a["category_id"] == cid and a["iscrowd"] == 1 for a in anns)
            row.append(1 if plain else crowd_value if crowd else 0)
        names.append(im["file_name"])
        rows.append(row)
    return names, np.array(rows, np.int8)


@pytest.mark.parametrize("mode, crowd_value", [("positive", 1), ("ignore", -1), ("negative", 0)])
def test_labels_equal_a_naive_loop_over_the_json(tmp_path, mode, crowd_value):
    path = write_coco(tmp_path)
    ds = CocoDataset(tmp_path, "val2014", crowd=mode)
    names, expected = naive_labels(path, crowd_value)
    assert ds.classes == ["person", "car", "train", "dog"]  # ids 1, 3, 7, 18
    assert [r.image_id for r in ds.records] == names and len(ds) == 4
    assert np.array_equal(ds.label_matrix(), expected)
    assert ds.excluded == {"empty": [file_name("val2014", 74)]}


def test_crowd_modes_on_hand_checked_images(tmp_path):
    write_coco(tmp_path)
    by_mode = {m: {r.image_id: r.labels.tolist() for r in CocoDataset(tmp_path, "val2014", crowd=m).records}
               for m in ("positive", "ignore", "negative")}
    car_crowd = file_name("val2014", 73)  # only a crowd car
    assert by_mode["positive"][car_crowd] == [0, 1, 0, 0]  # the default: crowd counts (ASL / ML-GCN)
    assert by_mode["ignore"][car_crowd] == [0, -1, 0, 0]
    assert by_mode["negative"][car_crowd] == [0, 0, 0, 0]  # still kept: it has an annotation
    person = file_name("val2014", 42)  # person both plain and crowd: 1 in every mode
    assert {tuple(m[person]) for m in by_mode.values()} == {(1, 0, 0, 1)}


def test_boxes_xywh_to_xyxy_hand_computed_and_crowd_marked_difficult(tmp_path):
    assert xywh_to_xyxy(np.array([[1.5, 2.0, 4.25, 3.0], [0, 0, 0, 0]])).tolist() == \
        [[1.5, 2.0, 5.75, 5.0], [0, 0, 0, 0]]
    assert xywh_to_xyxy(np.zeros((0, 4))).shape == (0, 4)
    write_coco(tmp_path)
    r = {r.image_id: r for r in CocoDataset(tmp_path, "val2014", bad_boxes="drop").records}[file_name("val2014", 42)]
    assert r.boxes.dtype == np.float32
    assert r.boxes.tolist() == [[1.5, 2.0, 5.75, 5.0], [0, 0, 6, 5]]  # the crowd box crosses the 8 x 6 image
    assert r.box_labels.tolist() == [0, 3] and r.box_difficult.tolist() == [False, False]
    with pytest.warns(UserWarning, match=r"bad_boxes=clip: ground-truth boxes, 9 boxes checked: 1 out-of-image "
                                         r"clipped.*annotation id 1002 .*bbox \[2.0, 1.0, 5.0, 6.0\]"):
        ds = CocoDataset(tmp_path, "val2014")  # the default clips it to the image's height 6
    r = {r.image_id: r for r in ds.records}[file_name("val2014", 42)]
    assert ds.box_report.clipped == 1 and ds.box_report.found["out_of_image"] == 1
    assert r.boxes.tolist() == [[1.5, 2.0, 5.75, 5.0], [0, 0, 6, 5], [2, 1, 7, 6]]
    assert r.box_labels.tolist() == [0, 3, 0] and r.box_difficult.tolist() == [False, False, True]
    assert r.extra["coco_id"] == 42 and r.path == tmp_path / "val2014" / file_name("val2014", 42)


def test_getitem_and_warp_move_boxes(tmp_path):
    write_coco(tmp_path)
    ds = CocoDataset(tmp_path, "val2014", transform=Warp((12, 4)))  # x / 2, y * 2
    index = [r.image_id for r in ds.records].index(file_name("val2014", 42))
    image, target = ds[index]
    assert image.shape == (3, 12, 4) and target["orig_size"].tolist() == [6, 8]
    assert torch.allclose(target["boxes"][0], torch.tensor([0.75, 4.0, 2.875, 10.0]))
    assert target["box_difficult"].tolist() == [False, False, True] and target["labels"].tolist() == [1, 0, 0, 1]


def test_keep_empty_keeps_unannotated_images(tmp_path):
    path = write_coco(tmp_path)
    ds = CocoDataset(tmp_path, "val2014", keep_empty=True)
    names, expected = naive_labels(path, 1, keep_empty=True)
    assert len(ds) == 5 and [r.image_id for r in ds.records] == names and np.array_equal(ds.label_matrix(), expected)
    empty = ds.records[names.index(file_name("val2014", 74))]
    assert empty.boxes.shape == (0, 4) and empty.box_labels.shape == (0,) and ds.excluded == {}
    assert ds[names.index(file_name("val2014", 74))][1]["boxes"].shape == (0, 4)


def test_identity_and_build_dataset(tmp_path):
    write_coco(tmp_path, "train2014")
    ds = build_dataset(f"coco:{tmp_path}:train2014", crowd="ignore")
    assert isinstance(ds, CocoDataset) and ds.identity.name == "coco2014" and ds.identity.split == "train2014"
    assert ds.identity.num_images == 4 and ds.identity.classes == ("person", "car", "train", "dog")
    assert ds.identity != build_dataset(f"coco:{tmp_path}:train2014").identity  # crowd mode changes labels
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['difficult'\] for a coco dataset; valid options: "
                                         r"\['keep_empty', 'crowd', 'bad_boxes'\]"):
        build_dataset(f"coco:{tmp_path}:train2014", difficult="ignore")
    with pytest.raises(ValueError, match=r"unknown COCO split 'val2017'; expected one of \['train2014', 'val2014'\]"):
        build_dataset(f"coco:{tmp_path}:val2017")
    with pytest.raises(ValueError, match=r"crowd must be one of \['positive', 'ignore', 'negative'\], got 'drop'"):
        CocoDataset(tmp_path, "train2014", crowd="drop")


def test_unknown_category_id_names_the_id_and_the_file(tmp_path):
    images = IMAGES + [(500, [(2, [0, 0, 1, 1], 0)])]  # category 2 is not among the categories
    path = write_coco(tmp_path, images=images)
    with pytest.raises(ValueError, match=rf"{path}: annotation id \d+ has category_id 2, which is not among the "
                                         r"file's categories \(ids \[1, 3, 7, 18\]\)"):
        CocoDataset(tmp_path, "val2014")


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["annotations"][0].update(bbox=[0, 0, -1, 2]),
     r"1 inverted .*annotation id 1000 \(image COCO_val2014_000000000042.jpg, bbox \[0.0, 0.0, -1.0, 2.0\]\)"),
    (lambda d: d["annotations"][0].update(bbox=[0, 0, 1]), r"bbox must be \[x, y, w, h\]"),
    (lambda d: d["annotations"][0].update(image_id=999), "image_id 999, which is not among the file's images"),
    (lambda d: d["annotations"][0].update(iscrowd=2), "iscrowd must be 0 or 1, got 2"),
    (lambda d: d["categories"].append({"id": 1, "name": "human"}), "category id 1 appears twice"),
    (lambda d: d.pop("categories"), r"lacks the list\(s\) \['categories'\]"),
])
def test_malformed_annotations_raise_naming_the_file(tmp_path, edit, message):
    path = write_coco(tmp_path)
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"{path}.*{message}"):
        CocoDataset(tmp_path, "val2014")


def test_malformed_json_and_missing_annotation_file(tmp_path):
    path = write_coco(tmp_path)
    path.write_text(path.read_text()[:-10])
    with pytest.raises(ValueError, match=rf"{path}: malformed JSON"):
        CocoDataset(tmp_path, "val2014")
    with pytest.raises(FileNotFoundError, match=r"instances_train2014\.json.*expected ROOT/annotations"):
        CocoDataset(tmp_path, "train2014")


def test_missing_image_raises_or_is_skipped_and_reported(tmp_path):
    gone = file_name("val2014", 133)
    write_coco(tmp_path, skip_files=(gone,))
    with pytest.raises(FileNotFoundError, match=rf"(?s)1 of 4 image files.*{gone}.*skip_missing"):
        CocoDataset(tmp_path, "val2014")
    with pytest.warns(UserWarning, match="skipped 1 missing image files"):
        ds = CocoDataset(tmp_path, "val2014", skip_missing=True)
    assert len(ds) == 3 and ds.missing == [gone] and ds.excluded["missing"] == [gone]


def test_bad_boxes_policies_name_the_annotation_and_use_the_json_size(tmp_path):
    path = write_coco(tmp_path)  # annotation 1002: a crowd box of image 42 reaching y = 7 in a 6-high image
    with pytest.raises(ValueError, match=rf"{path}: 1 of 9 boxes are defective: 1 out-of-image; first: annotation "
                                         r"id 1002 \(image COCO_val2014_000000000042\.jpg, bbox \[2\.0, 1\.0, 5\.0, "
                                         r"6\.0\]\)"):
        CocoDataset(tmp_path, "val2014", bad_boxes="refuse")
    data = json.loads(path.read_text())
    data["annotations"][0]["bbox"] = [float("nan"), 0, 2, 2]  # json writes NaN, and Python's json reads it back
    data["images"][0].pop("height")  # no size in the json: the file's header (6 x 8) is read instead
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"1 of 9 boxes are defective \(policy 'clip'.*1 non-finite.*"
                                         r"annotation id 1000"):
        CocoDataset(tmp_path, "val2014")
    with pytest.warns(UserWarning, match=r"1 non-finite dropped, 1 out-of-image dropped"):
        ds = CocoDataset(tmp_path, "val2014", bad_boxes="drop")
    r = {r.image_id: r for r in ds.records}[file_name("val2014", 42)]
    assert r.boxes.tolist() == [[0, 0, 6, 5]] and r.labels.tolist() == [1, 0, 0, 1]
