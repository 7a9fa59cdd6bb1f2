"""`mlkd export`: a student trained for a few steps (the demo's architecture) exported to Caffe and ONNX, re-run here
by OpenCV's DNN module and onnxruntime on fresh inputs; the exported Caffe student imported back; the teacher's
Caffe export (OpenCV on PyTorch-pooled regions, weight round trip); refusals and a failing verification."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from mlkd.cli import main
from mlkd.data.synthetic import render_image
from mlkd.export import exporter
from mlkd.export.caffe import export as caffe_export
from mlkd.export.caffe import read_prototxt
from mlkd.export.onnx import supported_opsets
from mlkd.export.verify import sample_inputs
from mlkd.models.backbones import tiny
from mlkd.models.build import build_student, build_teacher, model_from_checkpoint
from mlkd.models.configs import StudentModelConfig, TeacherModelConfig
from mlkd.models.student import Student, label_loss
from mlkd.training.student import StudentConfig
from mlkd.training.teacher import TeacherDataConfig
from mlkd.training.teacher import TeacherConfig
from mlkd.utils.checkpoint import load_checkpoint, save_checkpoint
from mlkd.utils.config import to_dict

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
cv2.setNumThreads(1)
torch.set_num_threads(1)
CLASSES = ["circle_dots", "square_stripes", "star_plain", "ring_checks", "cross_dots"]
# configs/student_demo.yaml's model: tiny backbone at 96 x 96, pool5 gives 6 x 6, roi_size 4 (folded into fc6)
DEMO_STUDENT = StudentModelConfig(backbone="tiny", tiny_channels=(16, 32, 64, 64), tiny_convs_per_block=1,
                                  input_convention="torchvision", hidden=256, roi_size=4, dropout=0.25, image_size=96)


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    """Run the CLI; its report (the measured differences) is shown under ``pytest -s`` too."""
    rc = main(list(argv))
    out, err = capsys.readouterr()
    with capsys.disabled():
        print(out, end="")
    return rc, out, err


def _close(capsys, name: str, got: np.ndarray, ref: torch.Tensor, tolerance: float = 1e-4) -> float:
    ref = ref.detach().numpy()
    diff, scale = float(np.abs(got.reshape(ref.shape) - ref).max()), max(1.0, float(np.abs(ref).max()))
    with capsys.disabled():
        print(f"{name}: max abs diff {diff:.2e} (allowed {tolerance * scale:.1e})")
    assert got.size == ref.size and diff <= tolerance * scale
    return diff


@pytest.fixture(scope="module")
def trained_student(tmp_path_factory):
    """The demo student trained for 8 AdamW steps on random images and labels (not random weights)."""
    torch.manual_seed(0)
    model = build_student(DEMO_STUDENT, len(CLASSES))
    before = model.fc8.weight.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, labels = torch.randn(8, 3, 96, 96), (torch.rand(8, len(CLASSES)) < 0.3).float()
    losses = []
    for step in range(8):
        loss = label_loss(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and not torch.equal(before, model.fc8.weight)
    path = tmp_path_factory.mktemp("student") / "last.pt"
    save_checkpoint(path, {"model": model.state_dict(), "config": to_dict(StudentConfig(model=DEMO_STUDENT)),
                           "classes": CLASSES, "input_convention": "torchvision", "kind": "student", "epoch": 0})
    return path


def _fresh_inputs(n: int = 3) -> torch.Tensor:
    """Other images than the exporter's own samples: random uint8 RGB normalised the torchvision way."""
    from mlkd.models.backbones import normalize

    return normalize(torch.from_numpy(np.random.default_rng(7).integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)),
                     "torchvision")


def test_student_caffe_export_runs_in_opencv_and_imports_back(trained_student, tmp_path, capsys):
    out, photo = tmp_path / "caffe", tmp_path / "scene.png"
    cv2.imwrite(str(photo), render_image(np.random.default_rng(3), image_size=120)[0][:, :, ::-1])  # RGB -> BGR file
    rc, stdout, err = _run(capsys, "export", "--checkpoint", str(trained_student), "--format", "caffe", "--out",
                           str(out), "--classifier-name", "fc8_synth", "--image", str(photo))
    assert rc == 0, err
    assert "verified with OpenCV" in stdout and "on 3 image(s)" in stdout
    assert "fc8_synth: max |OpenCV - PyTorch| = " in stdout and "prob: max |OpenCV - PyTorch|" in stdout
    net = read_prototxt(out / "student.prototxt")
    assert [l.name for l in net.layers] == ["conv1_1", "relu1_1", "pool1", "conv2_1", "relu2_1", "pool2", "conv3_1",
                                            "relu3_1", "pool3", "conv4_1", "relu4_1", "pool4", "fc6",
                                            "relu6", "drop6", "fc7", "relu7", "drop7", "fc8_synth", "prob"]
    manifest = json.loads((out / "export.json").read_text())
    (data,) = manifest["inputs"]
    assert (data["name"], data["convention"], data["channel_order"], data["shape"]) == ("data", "torchvision", "RGB",
                                                                                       ["N", 3, 96, 96])
    assert data["mean"] == [0.485, 0.456, 0.406] and data["std"] == [0.229, 0.224, 0.225]
    assert manifest["classes"] == CLASSES and set(manifest["outputs"]) == {"fc8_synth", "prob"}
    assert manifest["verification"]["images"] == ["synthetic scene", "uniform noise", str(photo)]
    assert manifest["verification"]["passed"] and "folded into fc6" in manifest["notes"][1]
    assert "channels in RGB order" in (out / "README.md").read_text()

    student = model_from_checkpoint(load_checkpoint(trained_student))
    x = _fresh_inputs()
    cv = cv2.dnn.readNetFromCaffe(str(out / "student.prototxt"), str(out / "student.caffemodel"))
    cv.setInput(x.numpy())
    logits, prob = cv.forward(["fc8_synth", "prob"])
    with torch.no_grad():
        ref = student(x)
    _close(capsys, "Caffe/OpenCV logits", logits, ref)
    _close(capsys, "Caffe/OpenCV probabilities", prob, torch.sigmoid(ref))

    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(CLASSES) + "\n")
    rc, stdout, err = _run(capsys, "import-caffe", "--arch", "student", "--prototxt", str(out / "student.prototxt"),
                           "--caffemodel", str(out / "student.caffemodel"), "--classes", str(classes), "--out",
                           str(tmp_path / "back.pt"), "--input-convention", "torchvision")
    assert rc == 0, err
    back = load_checkpoint(tmp_path / "back.pt", "student")
    assert back["input_convention"] == "torchvision" and back["model_config"]["roi_size"] == 6  # the folded fc6
    assert back["model_config"]["dropout"] == 0.25 and back["model_config"]["image_size"] == 96
    with torch.no_grad():
        _close(capsys, "imported back", model_from_checkpoint(back)(x).numpy(), ref, 1e-5)


def test_student_onnx_export_runs_in_onnxruntime_with_any_batch(trained_student, tmp_path, capsys):
    out = tmp_path / "onnx"
    rc, stdout, err = _run(capsys, "export", "--checkpoint", str(trained_student), "--format", "onnx", "--out",
                           str(out))
    assert rc == 0, err
    assert "logits: max |onnxruntime - PyTorch| = " in stdout
    model = onnx.load(str(out / "student.onnx"))
    assert model.opset_import[0].version == 17
    (inp,) = model.graph.input
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert (inp.name, dims) == ("images", ["batch", 3, 96, 96])
    assert [o.name for o in model.graph.output] == ["logits", "probabilities"]
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["opset"] == 17 and manifest["inputs"][0]["name"] == "images" and manifest["verification"]["passed"]

    student = model_from_checkpoint(load_checkpoint(trained_student))
    session = ort.InferenceSession(str(out / "student.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 5):
        x = _fresh_inputs(n)
        logits, prob = session.run(["logits", "probabilities"], {"images": x.numpy()})
        with torch.no_grad():
            ref = student(x)
        _close(capsys, f"ONNX logits (batch {n})", logits, ref)
        _close(capsys, f"ONNX probabilities (batch {n})", prob, torch.sigmoid(ref))


def test_resnet_head_student_refused_by_caffe_exported_by_onnx(tmp_path):
    """A student with the ResNet head (here on a tiny backbone, to stay fast): Caffe refuses it, ONNX takes it."""
    torch.manual_seed(0)
    student = Student(tiny((8, 16)), 3, head="resnet", hidden=16).eval()
    names, x = sample_inputs(32, "torchvision")
    with pytest.raises(ValueError, match="ResNet-head student cannot be written as Caffe layers .* --format onnx"):
        caffe_export.export_student_caffe(student, tmp_path, 32, "fc8", 1e-4, x)
    part = exporter.export_student_onnx(student, tmp_path, 32, 17, 1e-4, x)
    assert all(c.passed for c in part["checks"]), [c.line("onnxruntime") for c in part["checks"]]


def test_failed_verification_fails_the_command(trained_student, tmp_path, capsys, monkeypatch):
    """A converter that writes a wrong classifier bias: OpenCV disagrees, the command exits 1 and says so."""
    real = caffe_export.vgg_to_caffe

    def broken(*args, **kwargs):
        net, blobs = real(*args, **kwargs)
        blobs["fc8"].blobs[1] = blobs["fc8"].blobs[1] + 0.5
        return net, blobs

    monkeypatch.setattr(caffe_export, "vgg_to_caffe", broken)
    rc, _, err = _run(capsys, "export", "--checkpoint", str(trained_student), "--format", "caffe", "--out",
                      str(tmp_path / "bad"))
    assert rc == 1
    assert "does not reproduce PyTorch in OpenCV" in err and "fc8: max |OpenCV - PyTorch| = 5.000e-01" in err
    assert "FAILED" in err and "files left in" in err
    assert json.loads((tmp_path / "bad" / "export.json").read_text())["verification"]["passed"] is False


def test_export_refusals(trained_student, tmp_path, capsys):
    out = tmp_path / "x"
    assert _run(capsys, "export", "--checkpoint", str(trained_student), "--format", "onnx", "--out", str(out))[0] == 0
    rc, _, err = _run(capsys, "export", "--checkpoint", str(trained_student), "--format", "caffe", "--out", str(out))
    assert rc == 1 and f"{out} already holds an onnx export of {trained_student}, not a caffe export; pass --overwrite" \
        in err
    rc, _, err = _run(capsys, "export", "--checkpoint", str(trained_student), "--format", "onnx", "--out",
                      str(tmp_path / "y"), "--regions", "10")
    assert rc == 1 and "--regions apply to teachers" in err


# -- teacher ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=[False, True], ids=["plain", "dilated"])
def teacher_checkpoint(tmp_path_factory, request):
    """The demo teacher's architecture with the original WSDDN's score scaling and detection temperature; and the
    same with its last block dilated as OICR's conv5 (pool3 1x1 / stride 1, stride 4 instead of 8)."""
    torch.manual_seed(1)
    cfg = TeacherModelConfig(backbone="tiny", tiny_channels=(16, 32, 64, 64), input_convention="torchvision", hidden=64,
                             roi_size=4, dropout=0.25, score_scale=10.0, score_bias=1.0, det_temperature=2.0,
                             dilate_last_block=request.param)
    model = build_teacher(cfg, len(CLASSES))
    path = tmp_path_factory.mktemp("teacher") / "last.pt"
    config = to_dict(TeacherConfig(model=cfg, data=TeacherDataConfig(test_scale=160, max_proposals=40)))
    save_checkpoint(path, {"model": model.state_dict(), "config": config, "classes": CLASSES,
                           "input_convention": "torchvision", "kind": "teacher", "epoch": 0})
    return path


def test_teacher_caffe_export_and_weight_round_trip(teacher_checkpoint, tmp_path, capsys):
    out = tmp_path / "teacher"
    rc, stdout, err = _run(capsys, "export", "--checkpoint", str(teacher_checkpoint), "--format", "caffe", "--out",
                           str(out))
    assert rc == 0, err
    for name in ("relu4_1", "fc8_c", "fc8_d", "proposal_class_score", "image_level_score"):
        assert f"{name}: max |OpenCV - PyTorch| = " in stdout
    assert "weights: max |imported from the files - teacher| (every tensor) = 0.000e+00" in stdout
    net = read_prototxt(out / "teacher.prototxt", supported=None)
    assert net.inputs == {"data": (1, 3, 160, 160), "roi_pooling": (40, 64, 4, 4)}
    assert [l.name for l in net.layers][-9:] == ["fc8_c", "reshape_branch1", "fc8_d", "reshape_branch2", "temp_branch2",
                                                 "class_score", "proposal_score", "proposal_class_score",
                                                 "image_level_score"]
    dilated = load_checkpoint(teacher_checkpoint)["model_config"]["dilate_last_block"]
    pool3 = next(l for l in net.layers if l.name == "pool3").params["pooling_param"]
    conv4 = next(l for l in net.layers if l.name == "conv4_1").params["convolution_param"]
    assert (pool3["kernel_size"], pool3["stride"]) == ((1, 1) if dilated else (2, 2))
    assert (conv4["pad"], conv4.get("dilation")) == (([2], [2]) if dilated else ([1], None))
    manifest = json.loads((out / "export.json").read_text())
    pooling = manifest["inputs"][1]
    assert (pooling["shape"], pooling["score_scale"], pooling["score_bias"]) == ([40, 64, 4, 4], 10.0, 1.0)
    assert pooling["spatial_scale"] == (1 / 4 if dilated else 1 / 8)
    notes = " ".join(manifest["notes"])
    assert "WsdRoigen" in notes and "ROIPooling" in notes and "Softmax axis 1, over regions" in notes

    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(CLASSES) + "\n")
    rc, _, err = _run(capsys, "import-caffe", "--arch", "wsddn", "--prototxt", str(out / "teacher.prototxt"),
                      "--caffemodel", str(out / "teacher.caffemodel"), "--classes", str(classes), "--out",
                      str(tmp_path / "back.pt"), "--input-convention", "torchvision", "--set", "score_scale=10",
                      "--set", "score_bias=1")
    assert rc == 0, err
    original, back = load_checkpoint(teacher_checkpoint), load_checkpoint(tmp_path / "back.pt", "teacher")
    assert back["model_config"] == original["model_config"]  # det_temperature from the Power layer
    assert back["inference"]["image_size"] == 160
    state = model_from_checkpoint(back).state_dict()
    assert state.keys() == original["model"].keys()
    assert all(torch.equal(state[k], original["model"][k]) for k in state)
    if dilated:  # a 1x1 pool before a block that is not dilated is no mlkd backbone: refused, naming the layer
        (tmp_path / "undilated.prototxt").write_text((out / "teacher.prototxt").read_text().replace(
            "dilation: 2", "dilation: 1").replace("pad: 2", "pad: 1"))
        rc, _, err = _run(capsys, "import-caffe", "--arch", "wsddn", "--prototxt", str(tmp_path / "undilated.prototxt"),
                          "--caffemodel", str(out / "teacher.caffemodel"), "--classes", str(classes), "--out",
                          str(tmp_path / "no.pt"))
        assert rc == 1 and "prototxt layer 'conv4_1'" in err and "'dilation': (2, 2)" in err and "OICR's conv5" in err
        assert not (tmp_path / "no.pt").exists()


def test_teacher_export_refuses_onnx(teacher_checkpoint, tmp_path, capsys):
    rc, _, err = _run(capsys, "export", "--checkpoint", str(teacher_checkpoint), "--format", "onnx", "--out",
                      str(tmp_path / "t"))
    assert rc == 1 and "a teacher exports to --format caffe or safetensors only" in err


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf"])
def test_a_tolerance_that_is_not_finite_and_positive_is_a_usage_error(trained_student, tmp_path, capsys, value):
    with pytest.raises(SystemExit) as e:
        main(["export", "--checkpoint", str(trained_student), "--format", "onnx", "--out", str(tmp_path / "o"),
              "--tolerance", value])
    assert e.value.code == 2 and f"argument --tolerance: expected a finite number > 0, got '{value}'" in \
        capsys.readouterr().err
    with pytest.raises(ValueError, match="the tolerance must be a finite number > 0"):
        exporter.export_checkpoint(trained_student, "onnx", tmp_path / "o", tolerance=float(value))
    assert not (tmp_path / "o").exists()


def test_an_opset_onnx_cannot_export_is_a_clear_error(trained_student, tmp_path, capsys):
    low, high = supported_opsets()
    for opset in (low - 1, high + 1, 99):
        rc, _, err = _run(capsys, "export", "--checkpoint", str(trained_student), "--format", "onnx", "--out",
                          str(tmp_path / "o"), "--opset", str(opset))
        assert rc == 1 and f"ONNX opset {opset} is not one this installation exports: expected {low} to {high}" in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit):
        main(["export", "--checkpoint", str(trained_student), "--format", "onnx", "--out", str(tmp_path / "o"),
              "--opset", "0"])
    assert "argument --opset: expected an integer >= 1, got '0'" in capsys.readouterr().err
