"""The release's datalist as a dataset: labels, its own proposals through __getitem__, Warp and a DataLoader,
and clear errors for malformed lines."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mlkd.cli import main
from mlkd.data import DatalistDataset, InMemoryProposals, Warp, build_dataset, collate
from mlkd.data.base import DatasetIdentity
from mlkd.errors import BadInput

CLASSES = ["cat", "dog", "bird"]
LINES = [
    "img/a.jpg 1 0 1 0 0 4 3 0.9 2 1 8 6 0.25",   # two proposals
    "img/b.jpg 0 1 0 1.5 2.5 3.5 4.5 1",           # one proposal
    "",                                            # blank lines are skipped
    "img/c.jpg 0 0 0",                             # no proposal
]


@pytest.fixture
def datalist(tmp_path) -> Path:
    for name in ("a", "b", "c"):
        (tmp_path / "img").mkdir(exist_ok=True)
        assert cv2.imwrite(str(tmp_path / "img" / f"{name}.jpg"), np.zeros((6, 8, 3), np.uint8))
    (tmp_path / "classes.txt").write_text("".join(f"{c}\n" for c in CLASSES))
    path = tmp_path / "train_list.txt"
    path.write_text("\n".join(LINES) + "\n")
    return path


def test_labels_ids_and_proposals_of_the_file(datalist):
    ds = DatalistDataset(datalist, datalist.parent / "classes.txt")
    assert ds.classes == CLASSES and ds.split == "train_list" and ds.identity.name == "datalist"
    assert [r.image_id for r in ds.records] == ["img/a.jpg", "img/b.jpg", "img/c.jpg"]
    assert ds.label_matrix().tolist() == [[1, 0, 1], [0, 1, 0], [0, 0, 0]]
    image, target = ds[0]
    assert image.shape == (3, 6, 8) and target["proposals"].dtype == torch.float32
    assert target["proposals"].tolist() == [[0, 0, 4, 3], [2, 1, 8, 6]]
    assert target["proposal_scores"].tolist() == pytest.approx([0.9, 0.25])
    _, target = ds[1]
    assert target["proposals"].tolist() == [[1.5, 2.5, 3.5, 4.5]] and target["proposal_scores"].tolist() == [1.0]
    _, target = ds[2]
    assert target["proposals"].shape == (0, 4) and target["proposal_scores"].shape == (0,)


def test_proposals_move_with_warp_and_stored_ones_stay_intact(datalist):
    ds = DatalistDataset(datalist, CLASSES, transform=Warp((12, 4)))  # y x2, x /2
    _, target = ds[0]
    assert torch.allclose(target["proposals"], torch.tensor([[0.0, 0.0, 2.0, 6.0], [1.0, 2.0, 4.0, 12.0]]))
    assert target["proposal_scores"].tolist() == pytest.approx([0.9, 0.25])
    images, targets = next(iter(DataLoader(ds, batch_size=3, collate_fn=collate)))
    assert images.shape == (3, 3, 12, 4) and [len(t["proposals"]) for t in targets] == [2, 1, 0]


def test_in_memory_proposals_look_like_a_cache(datalist):
    ds = DatalistDataset(datalist, CLASSES)
    ds[0][1]["proposals"].mul_(0)  # a caller changing its target in place must not change the dataset
    assert ds[0][1]["proposals"].tolist() == [[0, 0, 4, 3], [2, 1, 8, 6]]
    store = ds.proposals
    assert isinstance(store, InMemoryProposals) and len(store) == 3 and "img/b.jpg" in store
    assert DatasetIdentity.from_dict(store.meta["dataset"]) == ds.identity
    assert store.meta["method"] == "import:datalist" and store.meta["num_images"] == 3
    with pytest.raises(KeyError, match="'img/z.jpg' has no proposals"):
        store.get("img/z.jpg")


def test_cli_info_counts_labels_and_proposals(datalist, tmp_path, capsys):
    assert main(["data", "info", "--dataset", f"datalist:{datalist}:{tmp_path / 'classes.txt'}"]) == 0
    out = capsys.readouterr().out
    assert "dataset datalist / split train_list: 3 images, 3 classes" in out
    assert "proposals: 3 (1.0 per image, 0-2)" in out and "label cardinality 1.000" in out


def test_build_dataset_spec_and_root(datalist, tmp_path):
    ds = build_dataset(f"datalist:{datalist}:{tmp_path / 'classes.txt'}", split="train")
    assert isinstance(ds, DatalistDataset) and ds.split == "train" and len(ds) == 3
    moved = tmp_path / "lists" / "l.txt"
    moved.parent.mkdir()
    moved.write_text(datalist.read_text())
    assert build_dataset(f"datalist:{moved}:{tmp_path / 'classes.txt'}", root=tmp_path)[0][0].shape == (3, 6, 8)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['difficult'\] for a datalist dataset"):
        build_dataset(f"datalist:{datalist}:{tmp_path / 'classes.txt'}", difficult="ignore")
    with pytest.raises(ValueError, match=r"must be datalist:PATH:CLASSES_FILE"):
        build_dataset(f"datalist:{datalist}")


@pytest.mark.parametrize("line, message", [
    ("img/a.jpg 1 0", r":1: 3 fields; expected 1 path \+ 3 labels \+ 5 numbers"),
    ("img/a.jpg 1 0 1 0 0 4 3", r":1: 8 fields; expected 1 path \+ 3 labels"),
    ("img/a.jpg 1 x 1", r":1: 'x' is not a number"),
    ("img/a.jpg 1 2 1", r":1: labels must be 0 or 1, got \[2.0\]"),
    ("img/a.jpg 1 0 1 5 0 4 3 0.9", r":1 \(image 'img/a.jpg'\): 1 of 1 boxes are defective: 1 inverted"),
    ("img/a.jpg 1 0 1 0 0 nan 3 0.9", r":1 \(image 'img/a.jpg'\): 1 of 1 boxes are defective: 1 non-finite"),
    ("img/a.jpg 1 0 1 0 0 4 3 nan", r":1: proposal score nan is not finite"),
])
def test_malformed_lines_name_file_and_line(datalist, line, message):
    datalist.write_text(line + "\n")
    with pytest.raises(ValueError, match=rf"{datalist}{message}"):
        DatalistDataset(datalist, CLASSES)


def test_duplicates_missing_images_and_class_list(datalist, tmp_path):
    datalist.write_text(f"{LINES[0]}\n{LINES[1]}\n{LINES[0]}\n")
    with pytest.raises(ValueError, match=rf"{datalist}:3: image 'img/a.jpg' is listed again \(first at line 1\)"):
        DatalistDataset(datalist, CLASSES)
    datalist.write_text(f"{LINES[0]}\nimg/gone.jpg 0 0 1\n")
    with pytest.raises(FileNotFoundError, match=r"(?s)1 of 2 image files.*img/gone\.jpg"):
        DatalistDataset(datalist, CLASSES)
    with pytest.warns(UserWarning, match="skipped 1 missing"):
        ds = DatalistDataset(datalist, CLASSES, skip_missing=True)
    assert len(ds) == 1 and ds.missing == ["img/gone.jpg"] and len(ds.proposals) == 1
    with pytest.raises(FileNotFoundError, match="class list file not found"):
        DatalistDataset(datalist, tmp_path / "none.txt")
    with pytest.raises(ValueError, match="a datalist has no names, pass them"):
        DatalistDataset(datalist, [])


@pytest.mark.parametrize("alias", ["./img/a.jpg", "ABS", "img/link.jpg"])
def test_one_image_under_two_paths_is_refused_naming_both_lines(datalist, alias):
    (datalist.parent / "img" / "link.jpg").symlink_to("a.jpg")
    path = str(datalist.parent / "img" / "a.jpg") if alias == "ABS" else alias
    datalist.write_text(f"{LINES[0]}\n{LINES[1]}\n{path} 0 1 0\n")
    with pytest.raises(BadInput, match=rf"^{datalist}:3: image {re.escape(repr(path))} is the same file as image "
                                       rf"'img/a.jpg' at {datalist}:1 .*remove one of the two rows"):
        DatalistDataset(datalist, CLASSES)
