"""build_dataset's spec grammar and options, check_class_order, and `mlkd data info|plot|manifest` on the
real-layout fixtures of the loader tests."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from mlkd.cli import main
from mlkd.cli.data import parse_options
from mlkd.data import CustomDataset, build_dataset, check_class_order, parse_spec
from mlkd.data.manifest import read_image_manifest

from test_coco import file_name, write_coco
from test_voc import write_voc


def test_check_class_order_names_both_orders():
    check_class_order(["a", "b"], ("a", "b"), "checkpoint x.pt")
    with pytest.raises(ValueError) as e:
        check_class_order(["cat", "dog", "bird"], ["cat", "bird", "dog"], "checkpoint x.pt")
    text = str(e.value)
    assert "class order of checkpoint x.pt" in text and "position 1: expected 'dog', got 'bird'" in text
    assert "['cat', 'dog', 'bird']" in text and "['cat', 'bird', 'dog']" in text
    with pytest.raises(ValueError, match=r"lengths differ \(2 vs 3\)"):
        check_class_order(["a", "b"], ["a", "b", "c"], "cache")


def test_parse_spec_grammar():
    assert parse_spec("coco:/data/coco:val2014") == ("coco", ["/data/coco", "val2014"])
    assert parse_spec("voc:C:/data/voc:2007:test") == ("voc", ["C:/data/voc", "2007", "test"])  # ':' in ROOT
    assert parse_spec("nuswide:/d:train") == ("nuswide", ["/d", "train"])
    assert parse_spec("datalist:/l/train.txt:/l/classes.txt") == ("datalist", ["/l/train.txt", "/l/classes.txt"])
    assert parse_spec("data/train.jsonl") == ("custom", ["data/train.jsonl"])
    assert parse_spec("C:/data/val.CSV") == ("custom", ["C:/data/val.CSV"])
    with pytest.raises(ValueError, match=r"(?s)'coco:/data' must be coco:ROOT:SPLIT.*voc:ROOT:YEAR:SPLIT"):
        parse_spec("coco:/data")
    with pytest.raises(ValueError, match=r"must be voc:ROOT:YEAR:SPLIT"):
        parse_spec("voc:/d::test")
    with pytest.raises(ValueError, match=r"(?s)unrecognised dataset spec 'data/list\.txt'.*datalist:PATH"):
        parse_spec("data/list.txt")


def test_custom_options_and_unknown_option(tmp_path):
    assert cv2.imwrite(str(tmp_path / "a.png"), np.zeros((4, 4, 3), np.uint8))
    (tmp_path / "t.jsonl").write_text('{"path": "a.png", "labels": ["x"]}\n')
    ds = build_dataset(str(tmp_path / "t.jsonl"), classes=["y", "x"], split="val")
    assert isinstance(ds, CustomDataset) and ds.classes == ["y", "x"] and ds.split == "val"
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['keep_empty'\] for a custom dataset; valid options: "
                                         r"\['classes', 'root', 'split', 'bad_boxes'\]"):
        build_dataset(str(tmp_path / "t.jsonl"), keep_empty=True)


def test_parse_options():
    assert parse_options(["difficult=positive", "keep_empty=TRUE", "x=false", "root=/a=b"]) == \
        {"difficult": "positive", "keep_empty": True, "x": False, "root": "/a=b"}
    with pytest.raises(ValueError, match="--option must be KEY=VALUE"):
        parse_options(["keep_empty"])


def test_info_several_splits_with_options(tmp_path, capsys):
    write_coco(tmp_path, "train2014")
    write_coco(tmp_path, "val2014", skip_files=(file_name("val2014", 9),))
    argv = ["data", "info", "--dataset", f"coco:{tmp_path}:train2014", "--dataset", f"coco:{tmp_path}:val2014",
            "--option", "crowd=ignore", "--option", "keep_empty=false"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "dataset coco2014 / split train2014: 4 images, 4 classes" in out
    assert "dataset coco2014 / split val2014: 3 images, 4 classes" in out
    assert "missing image files: 1" in out and file_name("val2014", 9) in out and "left out: 1 empty" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("car ")]
    assert rows[0] == ["car", "0", "2", "2"]  # crowd=ignore: both car images are crowd-only -> ignored
    assert main(["data", "info", "--dataset", f"coco:{tmp_path}:train2014", "--option", "difficult=ignore"]) == 1
    assert "valid options: ['keep_empty', 'crowd', 'bad_boxes']" in capsys.readouterr().err


def test_info_on_voc_counts_difficult_as_ignored(tmp_path, capsys):
    write_voc(tmp_path)
    assert main(["data", "info", "--dataset", f"voc:{tmp_path}:2007:test", "--decode"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.split()}
    assert lines["horse"] == ["0", "1", "2"] and lines["chair"] == ["1", "0", "2"]
    assert "unreadable image files: 0" in out


def test_plot_writes_a_png_and_refuses_mixed_class_orders(tmp_path, capsys):
    write_coco(tmp_path, "train2014")
    write_coco(tmp_path, "val2014")
    out = tmp_path / "plots" / "coco.png"
    argv = ["data", "plot", "--dataset", f"coco:{tmp_path}:train2014", "--dataset", f"coco:{tmp_path}:val2014",
            "--out", str(out), "--sort", "--fraction", "--log"]
    assert main(argv) == 0 and f"wrote {out}" in capsys.readouterr().out
    image = cv2.imread(str(out))
    assert image is not None and image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 5  # something was drawn
    write_voc(tmp_path / "voc")
    bad = ["data", "plot", "--dataset", f"coco:{tmp_path}:val2014", "--dataset", f"voc:{tmp_path / 'voc'}:2007:test",
           "--out", str(tmp_path / "x.png")]
    assert main(bad) == 1 and "class order of dataset voc2007/test differs" in capsys.readouterr().err


def test_manifest_of_any_dataset_lists_left_out_images(tmp_path, capsys):
    write_voc(tmp_path, objects={"000001": [("cat", 0, (1, 1, 2, 2))], "000002": []})
    out = tmp_path / "voc.tsv"
    assert main(["data", "manifest", "--dataset", f"voc:{tmp_path}:2007:test", "--out", str(out), "--quiet"]) == 0
    assert "kept 1, empty 1" in capsys.readouterr().out
    manifest = read_image_manifest(out)
    assert list(manifest.kept) == ["000001"] and manifest.excluded == {"empty": ["000002"]}
    assert manifest.identity.name == "voc2007" and len(manifest.kept["000001"]) == 40
    assert main(["data", "manifest", "--dataset", f"voc:{tmp_path}:2007:test", "--check", str(out), "--quiet"]) == 0
    assert main(["data", "manifest", "--dataset", f"voc:{tmp_path}:2007:test", "--option", "difficult=positive",
                 "--check", str(out), "--quiet"]) == 0  # no difficult object: same labels
    assert main(["data", "manifest", "--dataset", f"voc:{tmp_path}:2007:test", "--option", "keep_empty=true",
                 "--check", str(out), "--quiet"]) == 1
    assert "1 dataset images are not in the manifest" in capsys.readouterr().out
