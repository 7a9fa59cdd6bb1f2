"""Checkpoints: one layout written by one function, read by one; files of mlkd 0.1 (format version 1) still load
and compute what mlkd 0.1 computed with them."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from mlkd.data.synthetic import class_names
from mlkd.errors import BadFile, BadInput, CannotWrite
from mlkd.export.verify import sample_images
from mlkd.models.backbones import normalize
from mlkd.models.build import model_from_checkpoint
from mlkd.utils.checkpoint import FORMAT_VERSION, load_checkpoint, make_checkpoint, save_checkpoint, write_model_dir

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
    ({"classes": "ab"}, "classes is not a list of names: got the string 'ab'"),
    ({"train_state": {"epoch": 1}}, "'train_state' must be None or hold"),
    ({"format_version": 99}, "format version 99; this mlkd .* reads 'mlkd-checkpoint' up to version 2"),
])
def test_a_malformed_checkpoint_is_refused_naming_the_file_and_the_field(tmp_path, change, message):
    good = make_checkpoint("student", {"w": torch.ones(2)}, input_convention="torchvision", classes=["a"],
                           model_config={}, image_size=32)
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
                           model_config={}, image_size=32)


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
            "from mlkd.errors import BadFile, BadInput, CannotWrite\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))\n"
            "ckpt = make_checkpoint('student', {'w': torch.ones(100000)}, input_convention='torchvision', "
            "classes=['a'], model_config={}, image_size=32)\n"
            "try:\n    save_checkpoint(sys.argv[1], ckpt)\nexcept CannotWrite as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"cannot write checkpoint {path}: File too large"
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


# -- class names, and the model folder checked as strictly as a checkpoint ---------------------------------------
CLASSES = ["a", "b", "c"]


def _tiny_student_ckpt(classes=CLASSES) -> dict:
    from mlkd.models.build import build_student
    from mlkd.models.configs import StudentModelConfig
    from mlkd.utils.config import to_dict

    cfg = StudentModelConfig(backbone="tiny", tiny_channels=(4, 8), input_convention="torchvision", hidden=8,
                             roi_size=2, dropout=0.0, image_size=32)
    torch.manual_seed(0)
    state = build_student(cfg, len(classes)).state_dict()
    return make_checkpoint("student", state, input_convention="torchvision", classes=classes,
                           model_config=to_dict(cfg), image_size=32)


def test_repeated_class_names_are_refused_when_a_checkpoint_is_made_read_or_a_folder_loaded(tmp_path):
    """["a"] * 10 used to load: predict returned a one-entry dict (9 of 10 outputs lost)."""
    ckpt = _tiny_student_ckpt()
    with pytest.raises(BadInput, match=r"classes repeat names: 'a' \(10 times\)"):
        make_checkpoint("student", ckpt["model"], input_convention="torchvision", classes=["a"] * 10,
                        model_config=ckpt["model_config"], image_size=32)
    torch.save({**ckpt, "classes": ["a", "b", "a"]}, tmp_path / "dup.pt")
    with pytest.raises(BadInput, match=rf"{tmp_path / 'dup.pt'} is not a valid mlkd checkpoint: classes repeat "
                                       r"names: 'a' \(2 times\)"):
        load_checkpoint(tmp_path / "dup.pt")
    folder = _folder(tmp_path, ckpt, classes=["b", "b", "c"])
    with pytest.raises(BadInput, match=r"config.json is not a valid mlkd checkpoint: classes repeat names: 'b'"):
        load_checkpoint(folder)


def _folder(tmp_path, ckpt: dict | None = None, **config_changes) -> Path:
    """A model folder of the tiny student, its config.json changed by ``config_changes``."""
    folder = write_model_dir(ckpt or _tiny_student_ckpt(), tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    config.update(config_changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("classes, message", [
    ("abc", r"classes is not a list of names: got the string 'abc'"),
    ([1, 2, 3], r"class 0 is 1 \(an int\), not a name"),
    ([], r"classes is empty"),
])
def test_model_folder_classes_must_be_a_list_of_names(tmp_path, classes, message):
    with pytest.raises(BadInput, match=rf"config.json is not a valid mlkd checkpoint: {message}"):
        load_checkpoint(_folder(tmp_path, classes=classes))


@pytest.mark.parametrize("size", [-1, 0, 10 ** 6, 32.5, "32", True])
def test_model_folder_image_size_must_be_an_integer_in_range(tmp_path, size):
    """-1 or 10**6 used to reach the model: a 240 GB allocation and a traceback."""
    folder = _folder(tmp_path, image_size=size)
    config = json.loads((folder / "config.json").read_text())
    config["model_config"].pop("image_size")  # so that only the top-level value is wrong
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(BadInput, match=r"config.json is not a valid mlkd checkpoint: image_size must be an integer in "
                                       rf"\[16, 8192\], got {size!r}"):
        load_checkpoint(folder)


@pytest.mark.parametrize("change, message", [
    ({"image_size": 64}, r"image_size 64 contradicts model_config.image_size 32"),
    ({"input_convention": "caffe"}, r"input_convention 'caffe' contradicts model_config.input_convention "
                                    r"'torchvision'"),
])
def test_model_folder_top_level_values_must_agree_with_model_config(tmp_path, change, message):
    with pytest.raises(BadInput, match=rf"config.json is not a valid mlkd checkpoint: {message}"):
        load_checkpoint(_folder(tmp_path, **change))


def test_model_folder_records_a_checksum_and_every_tensor(tmp_path):
    folder = _folder(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    data = (folder / "model.safetensors").read_bytes()
    assert config["format_version"] == 2 and config["weights"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert config["weights"]["bytes"] == len(data)
    assert config["weights"]["tensors"]["fc8.weight"] == {"dtype": "float32", "shape": [3, 8]}
    assert sorted(config["weights"]["tensors"]) == sorted(_tiny_student_ckpt()["model"])


def test_a_flipped_byte_in_the_weights_is_refused(tmp_path):
    folder = _folder(tmp_path)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-5] ^= 0x10  # inside the last tensor's data: the file still parses
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(BadFile, match=rf"{folder / 'model.safetensors'} is damaged: its SHA-256 is [0-9a-f]{{64}}, "
                                      r"config.json records [0-9a-f]{64}"):
        load_checkpoint(folder)


def _rewrite_weights(folder: Path, change, keep_checksum: bool = False) -> None:
    """Rewrite the folder's weights through ``change(state)``; record the new file's checksum unless told not to."""
    state = safetensors.torch.load_file(str(folder / "model.safetensors"))
    change(state)
    safetensors.torch.save_file(state, str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    if "weights" in config and not keep_checksum:
        data = (folder / "model.safetensors").read_bytes()
        config["weights"].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (folder / "config.json").write_text(json.dumps(config))


def test_a_tensor_of_another_dtype_or_shape_than_recorded_is_refused_naming_it(tmp_path):
    folder = _folder(tmp_path)
    _rewrite_weights(folder, lambda s: s.update({"fc7.weight": s["fc7.weight"].to(torch.int32)}))
    with pytest.raises(BadInput, match=r"model.safetensors: tensor fc7.weight is int32 \(8, 8\); config.json "
                                       r"records float32 \(8, 8\)"):
        load_checkpoint(folder)
    _rewrite_weights(folder, lambda s: s.update({"fc7.weight": torch.zeros(4, 16)}))
    with pytest.raises(BadInput, match=r"tensor fc7.weight is float32 \(4, 16\); config.json records float32 \(8, 8\)"):
        load_checkpoint(folder)


def test_a_folder_written_before_the_checksum_still_loads_but_not_with_integer_weights(tmp_path, caplog):
    folder = _folder(tmp_path, format_version=1)
    config = json.loads((folder / "config.json").read_text())
    del config["weights"]
    (folder / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.DEBUG, logger="mlkd.utils.checkpoint"):
        ckpt = load_checkpoint(folder)
    assert ckpt["classes"] == CLASSES and "records no checksum" in caplog.text
    assert all(r.levelno <= logging.DEBUG for r in caplog.records)
    _rewrite_weights(folder, lambda s: s.update({"fc7.weight": s["fc7.weight"].to(torch.int32)}))
    with pytest.raises(BadInput, match=r"model.safetensors: tensor fc7.weight is int32; expected floating point"):
        load_checkpoint(folder)


def test_kind_teacher_on_student_weights_says_the_weights_do_not_fit_a_teacher(tmp_path):
    """It used to be reported as an unknown config key (model_config.image_size)."""
    folder = _folder(tmp_path, kind="teacher")
    with pytest.raises(BadInput, match=r"kind is 'teacher', but the weights do not fit a teacher: they have one class "
                                       r"head fc8 \(3, 8\), as a student has"):
        model_from_checkpoint(load_checkpoint(folder))


def test_kind_student_on_teacher_weights_says_the_weights_do_not_fit_a_student():
    from mlkd.models.build import build_teacher
    from mlkd.models.configs import TeacherModelConfig

    cfg = TeacherModelConfig(backbone="tiny", tiny_channels=(4, 8), hidden=8, roi_size=2)
    state = build_teacher(cfg, 3).state_dict()
    ckpt = {**_tiny_student_ckpt(), "model": state}
    with pytest.raises(BadInput, match=r"kind is 'student', but the weights do not fit a student: they have two class "
                                       r"streams fc8_c \(3, 8\) and fc8_d \(3, 8\), as a teacher has; expected a "
                                       r"student's weights, or kind 'teacher'"):
        model_from_checkpoint(ckpt)
