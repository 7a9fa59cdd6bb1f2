"""Student inference precisions (mlkd.inference.runtime, `--precision`, `mlkd export --int8`): fp32 with channels_last equals
the eager model, bf16 only where it is native, int8 is a real quantised graph close to float32, and every misuse
is a clear error."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

import mlkd
from mlkd.cli import main
from mlkd.data.base import read_image
from mlkd.data.transforms import Warp
from mlkd.export.quantize import calibration_batches
from mlkd.inference import runtime as runtime_module
from mlkd.inference.runtime import StudentRuntime
from mlkd.models.backbones import normalize
from mlkd.models.build import model_from_checkpoint
from mlkd.proposals.attach import open_split
from mlkd.utils import device as dev
from mlkd.utils.checkpoint import load_checkpoint, save_checkpoint

real_timing = runtime_module._channels_last_is_faster


def batch(trained, size=48):
    paths = [r.path for r in open_split(str(trained.data.val)).records]
    warp = Warp(size)
    images = torch.stack([warp(torch.from_numpy(read_image(p)).permute(2, 0, 1), {})[0] for p in paths])
    return normalize(images, "torchvision")


def test_fp32_runtime_equals_the_eager_model(trained, monkeypatch):
    ckpt = load_checkpoint(trained.student)
    eager = model_from_checkpoint(ckpt).eval()
    x = batch(trained)
    with torch.no_grad():
        ref = eager(x)
    for faster in (True, False):  # either memory layout the timing picks gives the same logits
        monkeypatch.setattr(runtime_module, "_channels_last_is_faster", lambda *a, faster=faster: faster)
        runtime = StudentRuntime(model_from_checkpoint(ckpt), "fp32", "cpu", 48)
        assert runtime.channels_last == faster
        torch.testing.assert_close(runtime(x), ref, rtol=1e-5, atol=1e-5)
    assert isinstance(real_timing(model_from_checkpoint(ckpt).eval(), 48, False), bool)


def test_bf16_runs_where_native_and_is_refused_elsewhere(trained, monkeypatch):
    ckpt = load_checkpoint(trained.student)
    x = batch(trained)
    with torch.no_grad():
        ref = model_from_checkpoint(ckpt).eval()(x)
    monkeypatch.setattr(dev, "native_bf16", lambda d: False)
    # the refusal names the setting the user gave (precision, not a training run's run.amp) and what to use
    with pytest.raises(ValueError, match=r"precision=bf16 on a CPU without native bfloat16 .* use precision fp32"):
        StudentRuntime(model_from_checkpoint(ckpt), "bf16")
    with pytest.raises(ValueError, match=r"precision=bf16 on a CPU without native bfloat16"):
        StudentRuntime.from_checkpoint(ckpt, "bf16")
    monkeypatch.setattr(dev, "native_bf16", lambda d: True)  # bf16 arithmetic is correct either way, only slow
    got = StudentRuntime(model_from_checkpoint(ckpt), "bf16")(x)
    assert got.dtype == torch.float32
    assert (torch.sigmoid(got) - torch.sigmoid(ref)).abs().max() < 0.05


def test_int8_is_a_quantised_graph_close_to_float32(trained, tmp_path):
    ckpt = load_checkpoint(trained.student)
    x = batch(trained)
    with torch.no_grad():
        ref = torch.sigmoid(model_from_checkpoint(ckpt).eval()(x))
    calibration = calibration_batches(str(trained.data.train), None, 48, "torchvision", count=8, batch_size=4)
    runtime = StudentRuntime(model_from_checkpoint(ckpt), "int8", "cpu", 48, calibration)
    got = torch.sigmoid(runtime(x))
    assert (got - ref).abs().max() < 0.1 and not torch.equal(got, ref)
    # through the CLI export: a graph of int8 operators, and its probabilities checked in export.json
    out = tmp_path / "onnx"
    assert main(["export", "--checkpoint", str(trained.student), "--format", "onnx", "--out", str(out), "--int8"]) == 0
    ops = {n.op_type for n in onnx.load(str(out / "student_int8.onnx")).graph.node}
    assert {"QLinearConv", "QuantizeLinear"} <= ops and "Conv" not in ops
    info = json.loads((out / "export.json").read_text())
    check = [c for c in info["verification"]["checks"] if c["output"] == "int8 probabilities"][0]
    assert check["passed"] and 0 < check["max_abs_diff"] <= 0.1 and info["files"]["onnx_int8"] == "student_int8.onnx"


def test_evaluate_and_predict_take_a_precision(trained, tmp_path, capsys):
    val = str(trained.data.val)
    reports = {}
    for p in ("fp32", "int8"):
        out = tmp_path / f"{p}.json"
        assert main(["evaluate", "--checkpoint", str(trained.student), "--dataset", val, "--precision", p,
                     "--out", str(out), "--scores", str(tmp_path / f"{p}.npy"), "--quiet", "--workers", "0"]) == 0
        reports[p] = json.loads(out.read_text())
    assert reports["int8"]["precision"] == "int8" and reports["fp32"]["precision"] == "fp32"
    s32, s8 = np.load(tmp_path / "fp32.npy"), np.load(tmp_path / "int8.npy")
    assert np.abs(s32 - s8).max() < 0.1  # the training set recorded in the checkpoint calibrated it
    clf = mlkd.load(trained.student, precision="int8", calibration=str(trained.data.train))
    np.testing.assert_allclose(clf.predict([r.path for r in open_split(val).records], as_arrays=True), s8, atol=0.02)


def test_precision_misuse_is_a_clear_error(trained, tmp_path, capsys):
    with pytest.raises(ValueError, match="precision must be one of"):
        StudentRuntime(torch.nn.Linear(1, 1), "fp16")
    with pytest.raises(ValueError, match="precision and calibration apply to students"):
        mlkd.load(trained.teacher, precision="int8")
    assert main(["evaluate", "--checkpoint", str(trained.student), "--dataset", str(trained.data.val),
                 "--calibration", str(trained.data.train)]) != 0
    assert "calibration (a dataset of training images) applies to precision int8, not fp32" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(trained.student), "--format", "caffe", "--out", str(tmp_path / "c"),
                 "--int8"]) != 0
    assert "--int8 (and --calibration) apply to students exported with --format onnx" in capsys.readouterr().err
    ckpt = load_checkpoint(trained.student)
    ckpt["config"]["data"]["train"] = str(tmp_path / "gone.jsonl")
    save_checkpoint(tmp_path / "moved.pt", ckpt)
    with pytest.raises(ValueError, match=r"calibrates on the model's training set .*gone.jsonl, which cannot be "
                                         r"opened here .*give --calibration SPEC"):
        mlkd.load(tmp_path / "moved.pt", precision="int8")
