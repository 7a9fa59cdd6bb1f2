"""The synthetic dataset: deterministic, valid boxes, labels = box classes, small objects, every class."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlkd.cli import main
from mlkd.data.custom import CustomDataset
from mlkd.data.synthetic import (CLASS_TEXTURES, OUTLINE_COLOURS, SHAPES, _pattern, class_names, generate,
                                 render_image)

SIZE = 96  # small images keep the whole file fast


def render(seed: int, index: int, num_classes: int = 10, size: int = SIZE):
    return render_image(np.random.default_rng([seed, index]), num_classes, size)


@pytest.fixture(scope="module")
def rendered():
    """80 images of seed 0 (in memory), enough for every class to appear."""
    return [render(0, i) for i in range(80)]


def test_class_names_pairs_share_outline_and_bad_counts_raise():
    names = class_names(10)
    assert len(set(names)) == 10 and names[0] == "circle_stripes" and names[5] == "circle_checker"
    assert len(class_names(20)) == 20
    for bad in (1, 21):
        with pytest.raises(ValueError, match=r"num_classes must be in \[2, 20\]"):
            class_names(bad)


def test_render_is_deterministic_for_a_seed_and_differs_for_another():
    a, b, c = render(0, 3), render(0, 3), render(1, 3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert a[0].shape != c[0].shape or not np.array_equal(a[0], c[0])


def test_boxes_inside_image_and_object_counts(rendered):
    for image, boxes, labels in rendered:
        h, w = image.shape[:2]
        assert image.dtype == np.uint8 and max(h, w) == SIZE and min(h, w) >= 0.75 * SIZE - 1
        assert 1 <= len(boxes) <= 4 and len(labels) == len(boxes)
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()


def test_objects_do_not_overlap(rendered):
    for _, boxes, _ in rendered:
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                overlap_w = min(a[2], b[2]) - max(a[0], b[0])
                overlap_h = min(a[3], b[3]) - max(a[1], b[1])
                assert overlap_w <= 0 or overlap_h <= 0


def test_small_objects_exist_and_every_class_appears(rendered):
    sides = np.concatenate([np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) for _, b, _ in rendered])
    small = (sides <= 0.125 * SIZE).mean()
    assert 0.15 < small < 0.6 and (sides >= 9).all()  # shapes are drawn in >= 10 px patches
    assert set(np.concatenate([lab for _, _, lab in rendered]).tolist()) == set(range(10))
    twenty = [render(2, i, num_classes=20) for i in range(120)]
    assert set(np.concatenate([lab for _, _, lab in twenty]).tolist()) == set(range(20))


def test_class_outlines_are_mirror_symmetric_so_flips_keep_classes():
    for outline in OUTLINE_COLOURS:
        mask = np.zeros((41, 41), np.uint8)
        SHAPES[outline](mask)
        on = mask > 0
        iou = (on & on[:, ::-1]).sum() / (on | on[:, ::-1]).sum()
        assert iou > 0.95, outline


def test_textures_cover_about_half_so_they_blur_to_one_shade():
    rng = np.random.default_rng(0)
    for texture in (*CLASS_TEXTURES, "speckle"):
        fraction = _pattern(texture, 60, 60, 3, rng).mean()
        assert 0.4 < fraction < 0.6, (texture, fraction)
    stripes = _pattern("stripes", 8, 8, 2, rng)
    assert (stripes.all(1) | ~stripes.any(1)).all() and stripes.any()  # rows are uniform: horizontal stripes


def test_object_pixels_have_the_outline_colour(rendered):
    """Each labelled box holds many pixels of its outline's colour (the object really is drawn there)."""
    names = class_names(10)
    for image, boxes, labels in rendered[:20]:
        for (x1, y1, x2, y2), k in zip(boxes.astype(int), labels):
            patch = image[y1:y2, x1:x2].reshape(-1, 3).astype(float)
            colour = np.array(OUTLINE_COLOURS[names[k].split("_")[0]], float)
            close = np.linalg.norm(patch - colour, axis=1) < 60  # jitter sigma 12 per channel + noise 5
            assert close.mean() > 0.1, (names[k], close.mean())


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return out, generate(out, 12, seed=7, image_size=SIZE, val_fraction=0.25, progress=False)


def test_generate_writes_the_custom_format(written):
    out, manifests = written
    assert set(manifests) == {"train", "val"}
    assert (out / "classes.txt").read_text().split() == class_names(10)
    assert json.loads((out / "meta.json").read_text())["seed"] == 7
    train = CustomDataset(manifests["train"])
    val = CustomDataset(manifests["val"])
    assert (len(train), len(val)) == (9, 3) and train.classes == class_names(10) and val.split == "val"
    for i in range(len(train)):
        image, target = train[i]
        h, w = image.shape[1:]
        assert (target["boxes"][:, 2] <= w).all() and (target["boxes"][:, 3] <= h).all()
        from_boxes = set(target["box_labels"].tolist())
        assert set(np.flatnonzero(target["labels"].numpy()).tolist()) == from_boxes


def test_generate_is_deterministic_and_matches_render(written, tmp_path):
    out, manifests = written
    again = generate(tmp_path / "again", 12, seed=7, image_size=SIZE, progress=False)
    other = generate(tmp_path / "other", 12, seed=8, image_size=SIZE, progress=False)
    assert again["train"].read_text() == manifests["train"].read_text()
    assert other["train"].read_text() != manifests["train"].read_text()
    image, _ = CustomDataset(manifests["val"])[2]  # PNG is lossless: the file is the rendered image
    assert np.array_equal(image.permute(1, 2, 0).numpy(), render(7, 11, size=SIZE)[0])


@pytest.mark.parametrize("kwargs, message", [
    (dict(val_fraction=1.0), r"val_fraction must be in \[0, 1\)"),
    (dict(image_format="bmp"), r"unknown image format 'bmp'.*\['jpg', 'png'\]"),
    (dict(image_size=32), "image_size must be >= 64"),
    (dict(num_images=1), "leaves no training image"),
])
def test_generate_rejects_bad_arguments(tmp_path, kwargs, message):
    args = dict(num_images=4, seed=0, progress=False) | kwargs
    with pytest.raises(ValueError, match=message):
        generate(tmp_path, **args)


def test_cli_synth_without_val_and_jpeg(tmp_path, capsys):
    rc = main(["data", "synth", "--out", str(tmp_path), "--num-images", "3", "--seed", "1", "--val-fraction", "0",
               "--image-size", "64", "--format", "jpg", "--num-classes", "12", "--quiet"])
    assert rc == 0 and "train:" in capsys.readouterr().out
    assert not (tmp_path / "val.jsonl").exists() and len(list((tmp_path / "images/train").glob("*.jpg"))) == 3
    assert len(CustomDataset(tmp_path / "train.jsonl").classes) == 12
    with pytest.raises(SystemExit) as e:  # a usage error of the option, before anything runs
        main(["data", "synth", "--out", str(tmp_path), "--num-images", "3", "--num-classes", "30"])
    assert e.value.code == 2 and "argument --num-classes: expected an integer in [2, 20], got '30'" in \
        capsys.readouterr().err
