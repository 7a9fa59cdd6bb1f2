"""PASCAL VOC loader on a fixture in the real devkit layout: difficult modes vs a naive reference, the
1-based box convention checked on pixels, root forms, empty / malformed XML, unknown classes, missing files."""

from __future__ import annotations

from pathlib import Path
from xml.dom import minidom

import cv2
import numpy as np
import pytest

from mlkd.data import VOC_CLASSES, VOCDataset, build_dataset
from mlkd.data.voc import voc_to_boxes

# image id -> objects (name, difficult flag or None for "no <difficult> tag", (xmin, ymin, xmax, ymax) 1-based)
OBJECTS = {
    "000005": [("chair", 0, (4, 3, 8, 5)), ("chair", 1, (1, 1, 2, 2)), ("diningtable", 1, (2, 2, 10, 6))],
    "000007": [("car", None, (1, 1, 16, 12))],
    "000009": [("person", 0, (2, 2, 6, 10)), ("horse", 1, (1, 1, 3, 3)), ("horse", 1, (5, 5, 7.5, 8.0)),
               ("person", 1, (9, 1, 12, 4))],
    "000012": [("tvmonitor", 1, (1, 1, 4, 4))],
}


def voc_xml(image_id: str, objects, part: bool = True) -> str:
    """An annotation file as the devkit writes it (VOC2012 person layout <part>s included)."""
    objs = []
    for name, difficult, (x1, y1, x2, y2) in objects:
        diff = "" if difficult is None else f"<difficult>{difficult}</difficult>"
        parts = ("<part><name>head</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>2</xmax><ymax>2</ymax>"
                 "</bndbox></part>") if part and name == "person" else ""
        objs.append(f"<object><name>{name}</name><pose>Left</pose><truncated>0</truncated>{diff}"
                    f"<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox>"
                    f"{parts}</object>")
    return (f"<annotation><folder>VOC2007</folder><filename>{image_id}.jpg</filename><source><database>The VOC2007 "
            "Database</database><annotation>PASCAL VOC2007</annotation></source><size><width>16</width>"
            f"<height>12</height><depth>3</depth></size><segmented>0</segmented>{''.join(objs)}</annotation>\n")


def write_voc(root: Path, year: str = "2007", objects=OBJECTS, splits=None, skip_jpeg=()) -> Path:
    """ROOT/VOCdevkit/VOC<year>/{Annotations, ImageSets/Main, JPEGImages}; returns the VOC<year> folder."""
    voc = root / "VOCdevkit" / f"VOC{year}"
    for d in ("Annotations", "ImageSets/Main", "JPEGImages"):
        (voc / d).mkdir(parents=True, exist_ok=True)
    for image_id, objs in objects.items():
        (voc / "Annotations" / f"{image_id}.xml").write_text(voc_xml(image_id, objs))
        if image_id not in skip_jpeg:
            assert cv2.imwrite(str(voc / "JPEGImages" / f"{image_id}.jpg"), np.zeros((12, 16, 3), np.uint8))
    splits = splits or {"test": list(objects), "trainval": list(objects)[:2]}
    for split, ids in splits.items():
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return voc


def naive_labels(voc: Path, ids: list[str], difficult_value: int) -> np.ndarray:
    """Labels from the XML with minidom and a loop per class (independent of the loader)."""
    rows = []
    for image_id in ids:
        doc = minidom.parse(str(voc / "Annotations" / f"{image_id}.xml"))
        objs = [o for o in doc.getElementsByTagName("object") if o.parentNode.tagName == "annotation"]
        found = []
        for o in objs:
            name = [n for n in o.childNodes if getattr(n, "tagName", "") == "name"][0].firstChild.data.strip()
            flags = o.getElementsByTagName("difficult")
            found.append((name, bool(flags) and flags[0].firstChild.data.strip() == "1"))
        rows.append([1 if (c, False) in found else difficult_value if (c, True) in found else 0 for c in VOC_CLASSES])
    return np.array(rows, np.int8)


@pytest.mark.parametrize("mode, value", [("ignore", -1), ("positive", 1), ("negative", 0)])
def test_difficult_modes_equal_a_naive_reference(tmp_path, mode, value):
    voc = write_voc(tmp_path)
    ds = VOCDataset(tmp_path, "2007", "test", difficult=mode)
    assert ds.classes == list(VOC_CLASSES) and [r.image_id for r in ds.records] == list(OBJECTS)
    assert np.array_equal(ds.label_matrix(), naive_labels(voc, list(OBJECTS), value))


def test_difficult_default_is_ignore_and_hand_checked(tmp_path):
    write_voc(tmp_path)
    labels = {r.image_id: r.labels for r in VOCDataset(tmp_path, "2007", "test").records}
    k = {c: i for i, c in enumerate(VOC_CLASSES)}
    assert labels["000005"][k["chair"]] == 1 and labels["000005"][k["diningtable"]] == -1
    assert labels["000007"][k["car"]] == 1  # no <difficult> tag = not difficult
    assert labels["000009"][k["person"]] == 1 and labels["000009"][k["horse"]] == -1
    assert (labels["000012"] == -1).sum() == 1 and (labels["000012"] == 1).sum() == 0


def test_boxes_are_one_based_inclusive_converted_to_pixel_edges(tmp_path):
    assert voc_to_boxes(np.array([[1, 1, 10, 5], [4, 3, 8, 5], [5, 5, 7.5, 8.0]])).tolist() == \
        [[0, 0, 10, 5], [3, 2, 8, 5], [4, 4, 7.5, 8]]
    assert voc_to_boxes(np.array([[0, 0, 3, 3]])).tolist() == [[0, 0, 3, 3]]  # a 0 written for the first pixel
    voc = write_voc(tmp_path)
    # The chair of 000005 covers 1-based columns 4..8 and rows 3..5: paint exactly those pixels.
    img = np.zeros((12, 16, 3), np.uint8)
    img[2:5, 3:8] = 255
    assert cv2.imwrite(str(voc / "JPEGImages" / "000005.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 100])
    ds = VOCDataset(voc, "2007", "test")
    image, target = ds[0]
    x1, y1, x2, y2 = (int(v) for v in target["boxes"][0])
    assert (x1, y1, x2, y2) == (3, 2, 8, 5)
    gray = image.float().mean(0)
    assert gray[y1:y2, x1:x2].min() > 200  # every pixel inside the converted box is painted
    ring = gray[y1 - 1:y2 + 1, x1 - 1:x2 + 1].clone()
    ring[1:-1, 1:-1] = 0
    assert ring.max() < 100  # and none just outside it
    assert target["box_difficult"].tolist() == [False, True, True]
    assert target["box_labels"].tolist() == [VOC_CLASSES.index(c) for c in ("chair", "chair", "diningtable")]


def test_parts_are_not_objects_and_decimal_coordinates_are_kept(tmp_path):
    write_voc(tmp_path)
    r = {r.image_id: r for r in VOCDataset(tmp_path, "2007", "test").records}["000009"]
    assert len(r.boxes) == 4 and r.boxes[2].tolist() == [4.0, 4.0, 7.5, 8.0]


def test_root_may_be_the_parent_vocdevkit_or_voc_folder(tmp_path):
    voc = write_voc(tmp_path)
    ids = [VOCDataset(root, 2007, "trainval").identity for root in (tmp_path, tmp_path / "VOCdevkit", voc)]
    assert ids[0] == ids[1] == ids[2] and ids[0].name == "voc2007" and ids[0].split == "trainval"
    assert ids[0].num_images == 2
    with pytest.raises(FileNotFoundError, match="no PASCAL VOC 2012 devkit"):
        VOCDataset(voc, "2012", "test")  # a VOC2007 folder is not VOC2012
    with pytest.raises(ValueError, match=r"unknown VOC year '2010'"):
        VOCDataset(tmp_path, "2010", "test")
    with pytest.raises(ValueError, match=r"unknown VOC split 'minival'"):
        VOCDataset(tmp_path, "2007", "minival")


def test_voc2012_layout_and_build_dataset(tmp_path):
    write_voc(tmp_path, "2012", objects={"2008_000008": OBJECTS["000009"]}, splits={"val": ["2008_000008"]})
    ds = build_dataset(f"voc:{tmp_path}:2012:val", difficult="negative")
    assert isinstance(ds, VOCDataset) and ds.identity.name == "voc2012" and ds.records[0].image_id == "2008_000008"
    assert ds.label_matrix().min() == 0
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['crowd'\] for a voc dataset; valid options: "
                                         r"\['difficult', 'keep_empty', 'bad_boxes'\]"):
        build_dataset(f"voc:{tmp_path}:2012:val", crowd="ignore")
    with pytest.raises(ValueError, match=r"must be voc:ROOT:YEAR:SPLIT"):
        build_dataset(f"voc:{tmp_path}:val")


def test_xml_without_objects_is_left_out_and_reported_or_kept_as_all_negative(tmp_path):
    write_voc(tmp_path, objects={**OBJECTS, "000010": []})
    with pytest.warns(UserWarning, match=r"left out 1 images whose XML has no object \(e.g. 000010\)"):
        ds = VOCDataset(tmp_path, "2007", "test")
    assert len(ds) == 4 and "000010" not in [r.image_id for r in ds.records] and ds.excluded == {"empty": ["000010"]}
    kept = VOCDataset(tmp_path, "2007", "test", keep_empty=True)
    r = kept.records[-1]
    assert r.image_id == "000010" and r.labels.tolist() == [0] * 20 and r.boxes.shape == (0, 4)
    assert kept.excluded == {}


def test_unknown_class_name_names_the_file_and_the_name(tmp_path):
    bad = [("aeroplane", 0, (1, 1, 2, 2)), ("airplane", 0, (1, 1, 2, 2))]
    voc = write_voc(tmp_path, objects={**OBJECTS, "000011": bad})
    with pytest.raises(ValueError, match=rf"{voc}/Annotations/000011\.xml: unknown class name 'airplane' "
                                         r"\(object 2\); valid VOC classes are \['aeroplane'"):
        VOCDataset(tmp_path, "2007", "test")


@pytest.mark.parametrize("xml, message", [
    ("<annotation><object><name>cat</name>", "malformed XML"),
    ("<annotation><object><name>cat</name></object></annotation>", r"object 1 \('cat'\): missing <bndbox>"),
    ("<annotation><object><bndbox><xmin>1</xmin></bndbox></object></annotation>", "object 1: missing <name>"),
    ("<annotation><object><name>cat</name><bndbox><xmin>a</xmin><ymin>1</ymin><xmax>2</xmax><ymax>2</ymax>"
     "</bndbox></object></annotation>", "<xmin> is 'a', not a number"),
    ("<annotation><object><name>cat</name><bndbox><xmin>5</xmin><ymin>1</ymin><xmax>2</xmax><ymax>2</ymax>"
     "</bndbox></object></annotation>",
     r"object 1 \('cat', xmin ymin xmax ymax = 5, 1, 2, 2\): x1y1x2y2 \[4, 0, 2, 2\] inverted"),
])
def test_malformed_xml_names_the_file(tmp_path, xml, message):
    voc = write_voc(tmp_path)
    (voc / "Annotations" / "000007.xml").write_text(xml)
    with pytest.raises(ValueError, match=rf"{voc}/Annotations/000007\.xml: .*{message}"):
        VOCDataset(tmp_path, "2007", "test")


def test_missing_jpeg_or_xml_raises_or_is_skipped_and_reported(tmp_path):
    voc = write_voc(tmp_path, skip_jpeg=("000009",))
    (voc / "Annotations" / "000012.xml").unlink()
    with pytest.raises(FileNotFoundError,
                       match=r"(?s)2 of 4 images listed in .*test\.txt.*000009\n  000012.*skip_missing"):
        VOCDataset(tmp_path, "2007", "test")
    with pytest.warns(UserWarning, match="skipped 2 images with a missing XML or JPEG"):
        ds = VOCDataset(tmp_path, "2007", "test", skip_missing=True)
    assert [r.image_id for r in ds.records] == ["000005", "000007"] and ds.missing == ["000009", "000012"]


def test_duplicate_id_in_split_file(tmp_path):
    voc = write_voc(tmp_path, splits={"val": ["000005", "000007", "000005"]})
    with pytest.raises(ValueError, match=rf"{voc}/ImageSets/Main/val\.txt:3: image id '000005' repeats line 1"):
        VOCDataset(tmp_path, "2007", "val")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_coordinates_are_refused_at_load_naming_the_xml_and_the_object(tmp_path, value):
    objects = {**OBJECTS, "000007": [("car", 0, (1, 1, 16, 12)), ("dog", 0, (2, value, 5, 6))]}
    voc = write_voc(tmp_path, objects=objects)
    with pytest.raises(ValueError, match=rf"1 non-finite .*{voc}/Annotations/000007\.xml: object 2 \('dog', xmin "
                                         rf"ymin xmax ymax = 2, {value}, 5, 6\)"):
        VOCDataset(tmp_path, "2007", "test")
    with pytest.warns(UserWarning, match="1 non-finite dropped"):
        ds = VOCDataset(tmp_path, "2007", "test", bad_boxes="drop")
    r = {r.image_id: r for r in ds.records}["000007"]
    assert r.boxes.tolist() == [[0, 0, 16, 12]] and r.box_labels.tolist() == [VOC_CLASSES.index("car")]
    assert r.labels[VOC_CLASSES.index("dog")] == 1  # labels come from the objects, whatever happens to boxes
    assert ds.box_report.dropped["non_finite"] == 1


def test_boxes_beyond_the_xml_size_are_clipped_by_default_or_refused(tmp_path):
    objects = {**OBJECTS, "000007": [("car", None, (1, 1, 18, 12)), ("dog", 0, (-2, 3, 5, 6))]}  # 16 x 12 images
    voc = write_voc(tmp_path, objects=objects)
    with pytest.warns(UserWarning, match=r"bad_boxes=clip: ground-truth boxes, 10 boxes checked: 2 out-of-image "
                                         r"clipped to the image"):
        ds = VOCDataset(tmp_path, "2007", "test")
    assert {r.image_id: r for r in ds.records}["000007"].boxes.tolist() == [[0, 0, 16, 12], [0, 2, 5, 6]]
    with pytest.raises(ValueError, match=rf"{voc}/Annotations: 2 of 10 boxes are defective: 2 out-of-image; first: "
                                         rf"{voc}/Annotations/000007\.xml: object 1 \('car', .* = 1, 1, 18, 12\)"):
        VOCDataset(tmp_path, "2007", "test", bad_boxes="refuse")
    # an XML without <size>: the JPEG's header gives it
    (voc / "Annotations" / "000007.xml").write_text(voc_xml("000007", objects["000007"]).replace(
        "<size><width>16</width><height>12</height><depth>3</depth></size>", ""))
    with pytest.raises(ValueError, match="2 of 10 boxes are defective: 2 out-of-image"):
        VOCDataset(tmp_path, "2007", "test", bad_boxes="refuse")
