"""Typed configs (mlkd.utils.config): unknown keys, wrong types, coercion, --set overrides, base: files, round trips."""

from __future__ import annotations

import dataclasses

import pytest

from mlkd.distill.config import StageConfig
from mlkd.training.student import StudentConfig
from mlkd.training.teacher import TeacherConfig
from mlkd.utils.config import apply_overrides, from_dict, load_config, parse_override, read_yaml, save_config, to_dict

TRAIN = {"data": {"train": "data/train.jsonl"}}


def teacher(**sections) -> TeacherConfig:
    return from_dict(TeacherConfig, {**TRAIN, **sections} if "data" not in sections else sections)


def test_defaults_and_required_train():
    cfg = teacher()
    assert cfg.optim.lr == 5e-5 and cfg.data.scales == (480, 576, 672, 736, 832) and cfg.model.backbone == "vgg16"
    with pytest.raises(ValueError, match="data.train is required"):
        from_dict(TeacherConfig, {})


@pytest.mark.parametrize("data, bad, valid", [
    ({"optim": {"lrr": 1.0}}, "['optim.lrr']", "'optim.lr'"),
    ({"modle": {}}, "['modle']", "'model', 'data', 'optim', 'run'"),
    ({"model": {"hiden": 3, "dropot": 0.1}}, "['model.dropot', 'model.hiden']", "'model.hidden'"),
])
def test_unknown_keys_name_the_key_and_the_valid_ones(data, bad, valid):
    with pytest.raises(ValueError) as e:
        from_dict(TeacherConfig, {**TRAIN, **data})
    assert f"unknown config key(s) {bad}" in str(e.value) and valid in str(e.value)


@pytest.mark.parametrize("key, value", [("scales", "[100]"), ("test_scale", 100), ("resize", "shorter"),
                                        ("max_size", 900), ("val_proposals", "p_val")])
def test_a_student_refuses_the_teachers_data_keys_naming_where_they_belong(key, value):
    """A student reads none of the teacher's multi-scale keys: giving one is an error naming it, not a no-op."""
    with pytest.raises(ValueError) as e:
        load_config(StudentConfig, None, ["data.train=t.jsonl", f"data.{key}={value}"])
    assert f"unknown config key(s) ['data.{key}']; data.{key} is a teacher's key" in str(e.value)
    assert "'data.train'" in str(e.value)  # and the keys a student's data section has
    cfg = load_config(TeacherConfig, None, ["data.train=t.jsonl", f"data.{key}={value}"])  # the teacher's own
    assert getattr(cfg.data, key) is not None


def test_a_student_run_saved_with_the_retired_teacher_keys_still_resumes():
    """Older mlkd wrote the teacher's data keys into every student config; resuming such a run is not a change of
    recipe, while any real difference still is."""
    from mlkd.training.run_folder import check_resume

    cfg = load_config(StudentConfig, None, ["data.train=t.jsonl"])
    old = to_dict(cfg)
    old["data"].update(scales=[480, 576], test_scale=672, resize="warp", max_size=None, val_proposals=None)
    identity = None  # the checkpoints below record no dataset: only their configs are compared
    check_resume({"config": old}, cfg, identity, "run")
    old["optim"]["lr"] = 0.5
    with pytest.raises(ValueError, match=r"optim.lr: 0.5 -> 0.001"):
        check_resume({"config": old}, cfg, identity, "run")


@pytest.mark.parametrize("section, key, value, message", [
    ("optim", "lr", "abc", "optim.lr: expected float, got 'abc' (str)"),
    ("optim", "lr", True, "optim.lr: expected float, got True (bool)"),
    ("data", "scales", 5, "data.scales: expected a list, got 5"),
    ("data", "scales", [480, "x"], "data.scales[1]: expected int, got 'x' (str)"),
    ("data", "batch_size", 2.5, "data.batch_size: expected int, got 2.5 (float)"),
    ("data", "batch_size", True, "data.batch_size: expected int, got True (bool)"),
    ("data", "max_proposals", "many", "data.max_proposals: expected int, got 'many' (str)"),
    ("data", "options", 3, "data.options: expected a mapping, got 3"),
    ("data", "flip", "yes please", "data.flip: expected bool, got 'yes please' (str)"),
    ("model", "backbone", "resnet", "model.backbone: 'resnet' is not one of ['vgg16', 'tiny', 'resnet50_c4']"),
    ("run", "amp", "fp8", "run.amp: 'fp8' is not one of ['auto', 'none', 'bf16', 'fp16']"),
    ("optim", "clip_grad", "x", "optim.clip_grad: expected float, got 'x' (str)"),
])
def test_wrong_types_are_errors(section, key, value, message):
    data = {"data": {"train": "t"}}
    data.setdefault(section, {})[key] = value
    with pytest.raises(ValueError) as e:
        from_dict(TeacherConfig, data)
    assert message in str(e.value)


def test_section_must_be_a_mapping_and_validate_runs():
    with pytest.raises(ValueError, match="optim: expected a mapping of keys, got 5"):
        from_dict(TeacherConfig, {**TRAIN, "optim": 5})
    with pytest.raises(ValueError, match=r"data.batch_size: 0 is out of range; expected 1 <= value <= 4096"):
        from_dict(TeacherConfig, {"data": {"train": "t", "batch_size": 0}})
    with pytest.raises(ValueError, match=r"optim.lr: 0.0 is out of range; expected 0 < value <= 10"):
        teacher(optim={"lr": 0})


@pytest.mark.parametrize("override, message", [
    ("optim.gamma=-1", r"optim.gamma: -1.0 is out of range; expected 0 < value <= 1"),  # the lr would turn negative
    ("optim.gamma=1.5", r"optim.gamma: 1.5 is out of range"),
    ("optim.lr=.nan", r"optim.lr: expected a finite number, got nan"),
    ("optim.epochs=0", r"optim.epochs: 0 is out of range; expected 1 <= value"),
    ("model.hidden=100000", r"model.hidden: 100000 is out of range; expected 1 <= value <= 65536"),  # 30 GB
    ("model.hidden=0", r"model.hidden: 0 is out of range"),
    ("model.roi_size=0", r"model.roi_size: 0 is out of range"),  # ZeroDivisionError before
    ("data.test_scale=0", r"data.test_scale: 0 is out of range; expected 16 <= value <= 8192"),
    ("run.seed=-1", r"run.seed: -1 is out of range; expected 0 <= value <= 4294967295"),  # was a numpy traceback
    ("data.scales=[480,0]", r"data.scales: 0 is out of range"),
    ("data.max_proposals=0", r"data.max_proposals: 0 is out of range; expected 1 <= value"),  # not silently "all"
    ("run.threads=0", r"run.threads: 0 is out of range; expected 1 <= value"),
    ("run.out=", r"run.out is empty"),
    ("model.dropout=1.5", r"model.dropout: 1.5 is out of range; expected 0 <= value <= 1"),
    ("model.score_scale=.inf", r"model.score_scale: expected a finite number, got inf"),
])
def test_numeric_config_fields_carry_ranges(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(TeacherConfig, None, ["data.train=t.jsonl", override])


def test_student_ranges_and_none_still_means_default():
    with pytest.raises(ValueError, match=r"stages\[0\].epochs: 0 is out of range"):
        load_config(StudentConfig, None, ["data.train=t.jsonl", "stages=[{name: a, epochs: 0}]"])
    with pytest.raises(ValueError, match=r"model.image_size: 8 is out of range; expected 16 <= value <= 8192"):
        load_config(StudentConfig, None, ["data.train=t.jsonl", "model.image_size=8"])
    with pytest.raises(ValueError, match=r"distill.feature_layers\[0\]: 'fc8' is not one of \['fc6', 'fc7'\]"):
        load_config(StudentConfig, None, ["data.train=t.jsonl", "distill.feature_layers=[fc8]"])
    cfg = load_config(StudentConfig, None, ["data.train=t.jsonl", "data.max_proposals=null", "run.threads=null"])
    assert cfg.data.max_proposals is None and cfg.run.threads is None


def test_int_to_float_and_list_to_tuple():
    cfg = teacher(optim={"lr": 1, "clip_grad": 5}, model={"score_scale": 10, "tiny_channels": [4, 8]})
    for v in (cfg.optim.lr, cfg.optim.clip_grad, cfg.model.score_scale):
        assert type(v) is float
    assert cfg.optim.lr == 1.0 and cfg.optim.clip_grad == 5.0 and cfg.model.tiny_channels == (4, 8)


@pytest.mark.parametrize("text, keys, value", [
    ("optim.lr=1e-4", ["optim", "lr"], 1e-4),
    ("optim.lr=5E-5", ["optim", "lr"], 5e-5),
    ("optim.lr=0.01", ["optim", "lr"], 0.01),
    ("data.scales=[480, 576]", ["data", "scales"], [480, 576]),
    ("model.weights=null", ["model", "weights"], None),
    ("data.flip=false", ["data", "flip"], False),
    ("run.out=runs/a=b", ["run", "out"], "runs/a=b"),
    ("data.options={difficult: ignore}", ["data", "options"], {"difficult": "ignore"}),
    ("data.val=", ["data", "val"], ""),
])
def test_parse_override_reads_yaml_values(text, keys, value):
    assert parse_override(text) == (keys, value)


@pytest.mark.parametrize("text", ["optim.lr", "=3", "optim.lr=[1,"])
def test_bad_override_syntax(text):
    with pytest.raises(ValueError, match="override"):
        parse_override(text)


def test_overrides_on_a_file(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("data:\n  train: a.jsonl\n  scales: [100]\noptim:\n  lr: 5e-5\n  lr_steps: [3]\n")
    cfg = load_config(TeacherConfig, path, ["optim.lr=1e-3", "data.scales=[480, 576]", "model.weights=null",
                                            "data.flip=false", "run.threads=2", "data.max_proposals=null",
                                            "optim.lr_steps=[]", "data.options={difficult: ignore}"])
    assert cfg.optim.lr == 1e-3 and cfg.data.scales == (480, 576) and cfg.model.weights is None
    assert cfg.data.flip is False and cfg.run.threads == 2 and cfg.data.max_proposals is None
    assert cfg.optim.lr_steps == () and cfg.data.options == {"difficult": "ignore"} and cfg.data.train == "a.jsonl"
    assert load_config(TeacherConfig, path).optim.lr == 5e-5  # the file itself: an exponent without a dot
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['optim.lrr'\]"):
        load_config(TeacherConfig, path, ["optim.lrr=1"])
    with pytest.raises(ValueError, match="optim.lr: expected float, got 'abc'"):
        load_config(TeacherConfig, path, ["optim.lr=abc"])
    with pytest.raises(ValueError, match="'lr' is a value, not a section"):
        apply_overrides({"optim": {"lr": 1.0}}, ["optim.lr.x=1"])
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(TeacherConfig, tmp_path / "nope.yaml")


def test_base_inheritance(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "root.yaml").write_text("data:\n  train: r.jsonl\n  scales: [100, 200]\n  batch_size: 4\n"
                                        "optim:\n  lr: 0.5\n  epochs: 7\n")
    (tmp_path / "sub" / "mid.yaml").write_text("base: ../root.yaml\noptim:\n  epochs: 3\nrun:\n  seed: 9\n")
    (tmp_path / "sub" / "top.yaml").write_text("base: mid.yaml\ndata:\n  scales: [500]\n")
    data = read_yaml(tmp_path / "sub" / "top.yaml")
    assert "base" not in data
    cfg = load_config(TeacherConfig, tmp_path / "sub" / "top.yaml", ["run.seed=4"])
    assert cfg.data.train == "r.jsonl" and cfg.data.batch_size == 4  # from root, section merged key by key
    assert cfg.data.scales == (500,)  # lists are replaced, not merged
    assert cfg.optim.lr == 0.5 and cfg.optim.epochs == 3 and cfg.run.seed == 4


def test_bad_yaml_files(tmp_path):
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must be a mapping of keys"):
        read_yaml(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("data: [1, \n")
    with pytest.raises(ValueError, match="cannot parse config"):
        read_yaml(tmp_path / "broken.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(TeacherConfig, None, ["data.train=t.jsonl", "optim.lr=1e-3", "data.options={a: 1}",
                                            "model.tiny_channels=[4, 8]", "optim.clip_grad=2"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(TeacherConfig, tmp_path / "config.yaml")
    assert again == cfg and to_dict(again) == to_dict(cfg)
    assert to_dict(cfg)["model"]["tiny_channels"] == [4, 8]  # plain lists in files and checkpoints


def test_student_stages_are_nested_dataclasses(tmp_path):
    cfg = load_config(StudentConfig, None, [
        "data.train=t.jsonl", "distill.teacher=t.pt",
        "stages=[{name: features, epochs: 2, feature_weight: 1, lr_steps: [1]}, {name: kd, soft_weight: 1}]"])
    assert cfg.stages == (StageConfig(name="features", epochs=2, feature_weight=1.0, lr_steps=(1,)),
                          StageConfig(name="kd", soft_weight=1.0))
    assert type(cfg.stages[0].feature_weight) is float
    save_config(cfg, tmp_path / "s.yaml")
    assert load_config(StudentConfig, tmp_path / "s.yaml") == cfg
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['stages\[1\].wieght'\]; valid keys here: "
                                         r"\['stages\[1\].name'"):
        load_config(StudentConfig, None, ["data.train=t", "stages=[{name: a}, {wieght: 1}]"])
    with pytest.raises(ValueError, match=r"stages\[0\].epochs: expected int, got 'two'"):
        load_config(StudentConfig, None, ["data.train=t", "stages=[{epochs: two}]"])
    with pytest.raises(ValueError, match="distil from the teacher: set distill.teacher"):
        load_config(StudentConfig, None, ["data.train=t", "stages=[{soft_weight: 1}]"])
    assert dataclasses.is_dataclass(cfg.stages[1])


def test_a_looping_base_chain_is_a_clear_error(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\nrun: {seed: 1}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ValueError, match=r"config base chain loops: .*a.yaml -> .*b.yaml -> .*a.yaml"):
        read_yaml(tmp_path / "a.yaml")


def test_amp_auto_picks_bf16_only_where_it_is_native(monkeypatch):
    import torch

    from mlkd.utils import device as dev
    from mlkd.utils.device import resolve_amp

    cpu = torch.device("cpu")
    monkeypatch.setattr(dev, "native_bf16", lambda d: True)
    assert resolve_amp("auto", cpu) == "bf16" and resolve_amp("bf16", cpu) == "bf16"
    monkeypatch.setattr(dev, "native_bf16", lambda d: False)
    assert resolve_amp("auto", cpu) == "none" and resolve_amp("none", cpu) == "none"
    with pytest.raises(ValueError, match=r"run.amp=bf16 on a CPU without native bfloat16 .* about 20x slower"):
        resolve_amp("bf16", cpu)
    with pytest.raises(ValueError, match="run.amp=fp16 needs a CUDA device"):
        resolve_amp("fp16", cpu)
    assert load_config(TeacherConfig, None, ["data.train=t.jsonl"]).run.amp == "auto"
    assert load_config(TeacherConfig, "teacher_demo").run.amp == "none"  # the demo stays float32 everywhere
