"""`mlkd predict` and `Classifier.probabilities` on hostile input: a model whose outputs are NaN, thresholds that are
not probabilities, ranges of the numeric options, and one image named twice under two spellings."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import mlkd
from mlkd.cli import main
from mlkd.models.build import build_student
from mlkd.models.configs import StudentModelConfig
from mlkd.utils.checkpoint import make_checkpoint, save_checkpoint
from mlkd.utils.config import to_dict

CLASSES = ["a", "b", "c"]
TINY = StudentModelConfig(backbone="tiny", tiny_channels=(4, 8), input_convention="torchvision", hidden=8,
                          roi_size=2, dropout=0.0, image_size=32)


def _student(path, nan_class: int | None = None):
    """A tiny random student (fast to build); ``nan_class`` makes that class's logit NaN for every image."""
    torch.manual_seed(0)
    model = build_student(TINY, len(CLASSES))
    if nan_class is not None:
        with torch.no_grad():
            model.fc8.bias[nan_class] = float("nan")
    save_checkpoint(path, make_checkpoint("student", model.state_dict(), input_convention="torchvision",
                                          classes=CLASSES, model_config=to_dict(TINY), image_size=32))
    return path


@pytest.fixture()
def world(tmp_path, monkeypatch):
    """A student, a NaN student and an image ``x.png`` in ``folder/``; the working directory is ``tmp_path``."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "folder" / "x.png")
    return _student(tmp_path / "s.pt"), _student(tmp_path / "nan.pt", nan_class=1)


def _err(capsys) -> str:
    return capsys.readouterr().err


def test_nan_outputs_are_refused_naming_the_image(world, capsys):
    bad = world[1]
    assert main(["predict", "--checkpoint", str(bad), "folder/x.png", "--quiet"]) == 1
    err = _err(capsys)
    assert "the model's output for folder/x.png is not finite" in err and "['b']" in err
    with pytest.raises(ValueError, match="output for folder/x.png is not finite"):
        mlkd.load(bad).predict("folder/x.png")


class BrightIsNaN(torch.nn.Module):
    """The model's logits, NaN for bright images: which image of a list the error names can be checked."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        out[x.mean((1, 2, 3)) > 0] = float("nan")
        return out


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_the_api_names_the_image_with_non_finite_outputs_in_any_batch(world, batch_size):
    clf = mlkd.load(world[0])
    clf.model = BrightIsNaN(clf.model)
    dark, bright = np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 255, np.uint8)
    with pytest.raises(ValueError, match=r"output for image 2 \(a ndarray\) is not finite .* 3 class\(es\)"):
        clf.probabilities([dark, dark, bright], batch_size=batch_size)
    with pytest.raises(ValueError, match=r"output for image 0 \(a Tensor\) is not finite"):
        clf.probabilities(torch.ones(3, 8, 8))
    assert clf.probabilities([dark]).shape == (1, 3)


def test_a_batch_size_below_one_and_a_nan_tensor_image_are_refused(world):
    clf = mlkd.load(world[0])
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        clf.probabilities("folder/x.png", batch_size=0)
    image = torch.zeros(3, 8, 8)
    image[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"float in \[0, 1\], got torch.float32 with 1 non-finite value"):
        clf.probabilities(image)


@pytest.mark.parametrize("value", ["nan", "inf", "-0.1", "1.5"])
def test_a_threshold_that_is_not_a_probability_is_refused(world, capsys, value):
    assert main(["predict", "--checkpoint", str(world[0]), "folder/x.png", "--thresholds", value]) == 1
    assert f"--thresholds {value}: expected a probability in [0, 1]" in _err(capsys)


@pytest.mark.parametrize("text, message", [
    ("a 0.5\nb nan\nc 0.5\n", "thr.txt:2: threshold 'nan' of 'b' is not a probability; expected a number in [0, 1]"),
    ("a 0.5\nb 0.5\nc inf\n", "thr.txt:3: threshold 'inf' of 'c' is not a probability"),
    ("a 2\nb 0.5\nc 0.5\n", "thr.txt:1: threshold '2' of 'a' is not a probability"),
    ("a 0.5\nb 0.5\nc 0.5\na 0.7\n", "thr.txt:4: class 'a' is listed twice"),
])
def test_a_thresholds_file_with_bad_values_is_refused_naming_the_line(world, capsys, text, message):
    with open("thr.txt", "w") as f:
        f.write(text)
    assert main(["predict", "--checkpoint", str(world[0]), "folder/x.png", "--thresholds", "thr.txt"]) == 1
    assert message in _err(capsys)


@pytest.mark.parametrize("option, value", [("--top-k", "0"), ("--top-k", "-2"), ("--batch-size", "0"),
                                           ("--batch-size", "-1"), ("--batch-size", "x")])
def test_numeric_options_out_of_range_are_usage_errors(world, capsys, option, value):
    with pytest.raises(SystemExit) as e:
        main(["predict", "--checkpoint", str(world[0]), "folder/x.png", option, value])
    assert e.value.code == 2
    assert f"argument {option}: expected an integer >= 1, got '{value}'" in _err(capsys)


def test_one_image_under_several_spellings_is_classified_once(world, tmp_path, capsys):
    os.symlink(tmp_path / "folder" / "x.png", tmp_path / "link.png")
    spellings = ["./folder/x.png", "folder", "folder/x.png", "folder/../folder/x.png", str(tmp_path / "folder" / "x.png"),
                 "link.png"]
    assert main(["predict", "--checkpoint", str(world[0]), *spellings, "--json", "p.json", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("dropped 5 path(s) naming an image already listed: folder/x.png, folder/x.png, "
                          "folder/../folder/x.png (= folder/x.png), ...")
    assert [r["image"] for r in json.loads(open("p.json").read())] == ["folder/x.png"]  # the first spelling
    assert out.count("x.png: ") == 1


def test_a_json_path_that_is_a_folder_is_refused_before_predicting(world, capsys):
    assert main(["predict", "--checkpoint", str(world[0]), "folder/x.png", "--json", "folder"]) == 1
    captured = capsys.readouterr()
    assert "--json folder is a folder; give a file path, e.g. folder/predictions.json" in captured.err
    assert "x.png: " not in captured.out


def test_a_model_with_repeated_class_names_is_refused_naming_them(world, tmp_path, capsys):
    """It used to print "a 0.514, a 0.504, a 0.496": three outputs under one name."""
    ckpt = torch.load(world[0], weights_only=True)
    torch.save({**ckpt, "classes": ["a", "a", "a"]}, tmp_path / "dup.pt")
    assert main(["predict", "--checkpoint", "dup.pt", "folder/x.png", "--quiet"]) == 1
    captured = capsys.readouterr()
    assert "dup.pt is not a valid mlkd checkpoint: classes repeat names: 'a' (3 times)" in captured.err
    assert "x.png: " not in captured.out
