"""Checkpoints: one layout written by one function, read by one; files of mlkd 0.1 (format version 1) still load
and compute what mlkd 0.1 computed with them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mlkd.data.synthetic import class_names
from mlkd.errors import CannotWrite
from mlkd.export.verify import sample_images
from mlkd.models.backbones import normalize
from mlkd.models.build import model_from_checkpoint
from mlkd.utils.checkpoint import FORMAT_VERSION, load_checkpoint, make_checkpoint, save_checkpoint

V1 = Path(__file__).parent / "fixtures" / "checkpoints_v1"


@pytest.fixture(scope="module")
def expected() -> dict:
    return json.loads((V1 / "expected.json").read_text())


def test_a_version_1_student_loads_and_predicts_as_mlkd_0_1_did(expected):
    ckpt = load_checkpoint(V1 / "student_v1.pt", "student")
    assert ckpt["format_version"] == FORMAT_VERSION and ckpt["kind"] == "student"
    assert ckpt["inference"]["image_size"] == 32 and ckpt["model_config"]["hidden"] == 8
    state = ckpt["train_state"]  # the student's v1 train_state, with the L_p' scale, moved into the v2 layout
    assert (state["epoch"], state["stage"], state["stage_epoch"]) == (1, 1, 0) and state["extra"]["scale"].shape == (10,)
    assert state["optimizer"]["state"] and ckpt["config"]["stages"][0]["name"] == "feature"
    student = model_from_checkpoint(ckpt)
    _, images = sample_images(32)
    with torch.no_grad():
        probs = torch.sigmoid(student(normalize(images, "torchvision")))
    assert torch.allclose(probs, torch.tensor(expected["student_probabilities"]), atol=1e-6)


def test_a_version_1_teacher_loads_and_scores_as_mlkd_0_1_did(expected):
    ckpt = load_checkpoint(V1 / "teacher_v1.pt", "teacher")
    assert ckpt["inference"] == {"image_size": 64, "max_proposals": 8, "proposals": None}
    state = ckpt["train_state"]  # the teacher kept optimizer and scheduler at the top level in v1
    assert (state["epoch"], state["stage"], state["stage_epoch"]) == (0, 0, 0) and state["scheduler"]["last_epoch"] == 1
    assert ckpt["dataset"]["num_images"] == 6 and ckpt["classes"] == class_names(10)
    teacher = model_from_checkpoint(ckpt)
    _, images = sample_images(64)
    boxes = torch.tensor(expected["boxes"])
    with torch.no_grad():
        out = teacher(normalize(images, "torchvision"), [boxes, boxes])
    for got, image_scores, regions in zip(out, expected["teacher_image_scores"], expected["teacher_region_scores"]):
        assert torch.allclose(got["image_scores"], torch.tensor(image_scores), atol=1e-6)
        assert torch.allclose(got["region_scores"], torch.tensor(regions), atol=1e-6)


def test_save_then_load_round_trip_and_atomic_write(tmp_path):
    ckpt = make_checkpoint("student", {"w": torch.ones(2)}, input_convention="torchvision", classes=["a", "b"],
                           model_config={"backbone": "tiny"}, image_size=32)
    path = save_checkpoint(tmp_path / "run" / "last.pt", ckpt)
    assert not (tmp_path / "run" / "last.pt.tmp").exists()
    back = load_checkpoint(path, "student")
    assert back["classes"] == ["a", "b"] and torch.equal(back["model"]["w"], torch.ones(2))
    assert back["inference"] == {"image_size": 32, "max_proposals": None, "proposals": None}
    assert back["train_state"] is None and back["mlkd_version"]
    with pytest.raises(ValueError, match="is a student checkpoint; expected a teacher checkpoint"):
        load_checkpoint(path, "teacher")


@pytest.mark.parametrize("change, message", [
    ({"kind": "detector"}, "kind 'detector' is not one of"),
    ({"model": {"w": [1, 2]}}, "'model' is not a state dict"),
    ({"classes": "ab"}, "'classes' is not a list of names"),
    ({"train_state": {"epoch": 1}}, "'train_state' must be None or hold"),
    ({"format_version": 99}, "format version 99; this mlkd .* reads 'mlkd-checkpoint' up to version 2"),
])
def test_a_malformed_checkpoint_is_refused_naming_the_file_and_the_field(tmp_path, change, message):
    good = make_checkpoint("student", {"w": torch.ones(2)}, input_convention="torchvision", classes=["a"],
                           model_config={}, image_size=8)
    torch.save({**good, **change}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=message) as e:
        load_checkpoint(tmp_path / "bad.pt")
    assert "bad.pt" in str(e.value)


def test_weights_that_do_not_fit_the_config_are_an_error_listing_them():
    ckpt = load_checkpoint(V1 / "student_v1.pt")
    ckpt["model_config"] = {**ckpt["model_config"], "hidden": 16}
    with pytest.raises(ValueError, match=r"(?s)do not fit its model_config.*fc6.weight: shape \(8, 16\)"):
        model_from_checkpoint(ckpt)


@pytest.mark.parametrize("forge, message", [
    (lambda c: c["model"].pop("fc7.weight"), r"do not fit its model_config and 10 classes:\s+missing fc7.weight"),
    (lambda c: c["model"].update({"fc6.weight": torch.zeros(3, 3)}), r"fc6.weight: shape \(3, 3\) in the checkpoint"),
    (lambda c: c.update(classes=c["classes"][:4]), r"4 classes:.*fc8.weight: shape \(10, 8\) in the checkpoint, \(4, 8\)"),
    (lambda c: c["model_config"].update(hidden=-5), r"model_config.hidden: -5 is out of range"),
    (lambda c: c["model_config"].update(hiden=8), r"unknown config key\(s\) \['model_config.hiden'\]"),
])
def test_forged_checkpoints_are_clear_errors_naming_the_file(tmp_path, forge, message):
    ckpt = load_checkpoint(V1 / "student_v1.pt")
    forge(ckpt)
    save_checkpoint(tmp_path / "forged.pt", ckpt)
    with pytest.raises(ValueError, match=rf"(?s){tmp_path / 'forged.pt'}.*{message}"):
        model_from_checkpoint(load_checkpoint(tmp_path / "forged.pt"))


# -- writing that fails: a CannotWrite naming the path, the previous file intact, no .tmp left ------------------
def _small(size: int = 1000) -> dict:
    return make_checkpoint("student", {"w": torch.ones(size)}, input_convention="torchvision", classes=["a"],
                           model_config={}, image_size=8)


def test_a_path_below_a_file_or_naming_a_folder_is_a_cannot_write(tmp_path):
    (tmp_path / "plain").write_text("x")
    for path, message in ((tmp_path / "plain" / "sub" / "c.pt", "plain is a file, not a folder"),
                          (tmp_path, "it is a folder; give a file path")):
        with pytest.raises(CannotWrite, match=message) as e:
            save_checkpoint(path, _small())
        assert str(path) in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_a_cannot_write(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(CannotWrite, match=f"cannot write checkpoint {folder / 'c.pt'}: Permission denied"):
            save_checkpoint(folder / "c.pt", _small())
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


def test_a_file_size_limit_is_a_cannot_write_that_keeps_the_previous_file(tmp_path):
    """RLIMIT_FSIZE makes the write fail half-way (as a full disk does); Python ignores the SIGXFSZ it sends."""
    path = tmp_path / "last.pt"
    save_checkpoint(path, _small(10))
    before = path.read_bytes()
    code = ("import resource, sys, torch\n"
            "from mlkd.utils.checkpoint import make_checkpoint, save_checkpoint\n"
            "from mlkd.errors import CannotWrite\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))\n"
            "ckpt = make_checkpoint('student', {'w': torch.ones(100000)}, input_convention='torchvision', "
            "classes=['a'], model_config={}, image_size=8)\n"
            "try:\n    save_checkpoint(sys.argv[1], ckpt)\nexcept CannotWrite as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"cannot write checkpoint {path}: File too large"
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
