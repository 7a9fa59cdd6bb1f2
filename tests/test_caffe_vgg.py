"""VGG-style models <-> Caffe, checked against OpenCV's DNN module, an independent Caffe reader and runtime:
hand-written V1 / V2 prototxts with random caffemodels imported into PyTorch, PyTorch students exported to Caffe,
the pooling-rounding guard, and strict name / shape checks on import."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from mlkd.export.caffe import (CaffeNet, LayerBlobs, export_vgg, feature_sizes, features_to_caffe, import_vgg_weights,
                               read_caffemodel, vgg_layer_names, vgg_name_map, write_caffemodel, write_prototxt)

cv2.setNumThreads(1)
torch.set_num_threads(1)


class TinyVGG(nn.Module):
    """The student contract in miniature: 2 conv blocks (8, 16 channels) + fc6 / fc7 (32) / fc8 (K = 5)."""

    def __init__(self, size: int = 32, ceil_mode: bool = False) -> None:
        super().__init__()
        pool = lambda: nn.MaxPool2d(2, 2, ceil_mode=ceil_mode)  # noqa: E731
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), pool(),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(inplace=True),
                                      nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(inplace=True), pool())
        side = feature_sizes(self.features, (size, size), caffe=False)[-1][0]
        self.fc6, self.fc7, self.fc8 = nn.Linear(16 * side * side, 32), nn.Linear(32, 32), nn.Linear(32, 5)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).flatten(1)  # (B, C*H*W), Caffe's InnerProduct flattening order
        x = self.drop(torch.relu(self.fc6(x)))
        return self.fc8(self.drop(torch.relu(self.fc7(x))))


def _opencv(prototxt, caffemodel, x: torch.Tensor, outputs: list[str]) -> list[np.ndarray]:
    net = cv2.dnn.readNetFromCaffe(str(prototxt), str(caffemodel))
    net.setInput(x.numpy())
    return list(net.forward(outputs))


def _assert_close(name: str, got: np.ndarray, ref: torch.Tensor) -> None:
    ref = ref.detach().numpy()
    assert got.shape == ref.shape, (name, got.shape, ref.shape)
    diff, scale = float(np.abs(got - ref).max()), max(1.0, float(np.abs(ref).max()))
    print(f"{name}: max |OpenCV - PyTorch| = {diff:.2e} (output scale {scale:.2f})")
    assert diff <= 1e-4 * scale


# -- hand-written Caffe files -> PyTorch ----------------------------------------------------------
_CONVS = [("conv1_1", "data", 8), ("pool1", "conv1_1", 0), ("conv2_1", "pool1", 16), ("conv2_2", "conv2_1", 16),
          ("pool2", "conv2_2", 0)]


def _prototxt_text(version: int, classifier: str) -> str:
    """The TinyVGG deploy network written out as text, in the style of VGG16's V1 deploy file or as V2."""
    if version == 1:
        head = 'name: "tiny"\ninput: "data"\ninput_dim: 1\ninput_dim: 3\ninput_dim: 32\ninput_dim: 32\n'
        layer = lambda name, kind, bottom, top, extra="": (  # noqa: E731
            f'layers {{ bottom: "{bottom}" top: "{top}" name: "{name}" type: {kind} {extra}}}\n')
        kinds = {"conv": "CONVOLUTION", "relu": "RELU", "pool": "POOLING", "fc": "INNER_PRODUCT", "drop": "DROPOUT",
                 "out": "SOFTMAX"}
    else:
        head = ('name: "tiny"\nlayer { name: "data" type: "Input" top: "data"\n'
                '  input_param { shape { dim: 1 dim: 3 dim: 32 dim: 32 } } }\n')
        layer = lambda name, kind, bottom, top, extra="": (  # noqa: E731
            f'layer {{ name: "{name}" type: "{kind}" bottom: "{bottom}" top: "{top}" {extra}}}\n')
        kinds = {"conv": "Convolution", "relu": "ReLU", "pool": "Pooling", "fc": "InnerProduct", "drop": "Dropout",
                 "out": "Sigmoid"}
    text = head
    for name, bottom, out in _CONVS:
        if name.startswith("pool"):
            text += layer(name, kinds["pool"], bottom, name, "pooling_param { pool: MAX kernel_size: 2 stride: 2 } ")
        else:
            conv = f"convolution_param {{ num_output: {out} pad: 1 kernel_size: 3 }} "
            text += layer(name, kinds["conv"], bottom, name, conv)
            text += layer(name.replace("conv", "relu"), kinds["relu"], name, name)
    for name, bottom, out in (("fc6", "pool2", 32), ("fc7", "fc6", 32)):
        text += layer(name, kinds["fc"], bottom, name, f"inner_product_param {{ num_output: {out} }} ")
        text += layer(name.replace("fc", "relu"), kinds["relu"], name, name)
        text += layer(name.replace("fc", "drop"), kinds["drop"], name, name, "dropout_param { dropout_ratio: 0.5 } ")
    text += layer(classifier, kinds["fc"], "fc7", classifier, "inner_product_param { num_output: 5 } ")
    return text + layer("prob", kinds["out"], classifier, "prob")


def _random_caffe_weights(classifier: str, seed: int = 0) -> dict[str, LayerBlobs]:
    rng = np.random.default_rng(seed)
    shapes = {"conv1_1": (8, 3, 3, 3), "conv2_1": (16, 8, 3, 3), "conv2_2": (16, 16, 3, 3), "fc6": (32, 16 * 8 * 8),
              "fc7": (32, 32), classifier: (5, 32)}
    out = {}
    for name, s in shapes.items():
        gain = 0.02 if name == classifier else 2.0  # He init; a small classifier keeps the softmax unsaturated
        weight = rng.normal(size=s) * np.sqrt(gain / np.prod(s[1:]))
        bias = rng.normal(scale=0.1, size=s[0])
        out[name] = LayerBlobs("Convolution" if len(s) == 4 else "InnerProduct",
                               [weight.astype(np.float32), bias.astype(np.float32)])
    return out


@pytest.mark.parametrize("version, classifier", [(1, "fc8"), (2, "fc8_coco")])
def test_caffe_model_imported_into_pytorch_matches_opencv(tmp_path, version, classifier):
    prototxt, caffemodel = tmp_path / "deploy.prototxt", tmp_path / "weights.caffemodel"
    prototxt.write_text(_prototxt_text(version, classifier))
    write_caffemodel(caffemodel, _random_caffe_weights(classifier), version=version)

    model = TinyVGG().eval()
    names = vgg_name_map(model.features, heads={"fc6": "fc6", "fc7": "fc7", "fc8": classifier})
    model.load_state_dict(import_vgg_weights(read_caffemodel(caffemodel), names, expected=model.state_dict()))

    x = np.random.default_rng(1).uniform(-120, 150, size=(2, 3, 32, 32))  # BGR minus mean, Caffe's input range
    x = torch.from_numpy(x.astype(np.float32))
    logits, prob = _opencv(prototxt, caffemodel, x, [classifier, "prob"])
    with torch.no_grad():
        ref = model(x)
    _assert_close(f"V{version} {classifier}", logits, ref)
    _assert_close(f"V{version} prob", prob, torch.softmax(ref, 1) if version == 1 else torch.sigmoid(ref))


# -- PyTorch -> Caffe ---------------------------------------------------------------------------------
@pytest.mark.parametrize("version, output", [(2, "sigmoid"), (1, "softmax")])
def test_exported_student_runs_in_opencv_like_pytorch(tmp_path, version, output):
    torch.manual_seed(0)
    model = TinyVGG().eval()
    prototxt, caffemodel = tmp_path / "student.prototxt", tmp_path / "student.caffemodel"
    net = export_vgg(model, prototxt, caffemodel, input_size=32, classifier_name="fc8_coco", output=output,
                     version=version)
    assert [l.name for l in net.layers] == ["conv1_1", "relu1_1", "pool1", "conv2_1", "relu2_1", "conv2_2",
                                            "relu2_2", "pool2", "fc6", "relu6", "drop6", "fc7", "relu7", "drop7",
                                            "fc8_coco", "prob"]
    assert net.inputs == {"data": (1, 3, 32, 32)}
    x = torch.randn(3, 3, 32, 32) * 60
    logits, prob = _opencv(prototxt, caffemodel, x, ["fc8_coco", "prob"])
    with torch.no_grad():
        ref = model(x)
    _assert_close(f"export V{version} fc8_coco", logits, ref)
    expected = torch.sigmoid(ref) if output == "sigmoid" else torch.softmax(ref, 1)
    _assert_close(f"export V{version} {output}", prob, expected)

    back = import_vgg_weights(read_caffemodel(caffemodel), vgg_name_map(model.features, {"fc6": "fc6", "fc7": "fc7",
                                                                                         "fc8": "fc8_coco"}))
    state = model.state_dict()
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_pool_rounding_guard(tmp_path):
    """At 34x34 pool2 sees 17x17: Caffe (ceil) makes 9x9, PyTorch (floor) 8x8. OpenCV shows the difference is real,
    export refuses the size, and a ceil-mode model exports and matches at that size."""
    model = TinyVGG(size=32).eval()
    layers, blobs, _ = features_to_caffe(model.features)
    write_prototxt(tmp_path / "f.prototxt", CaffeNet("f", {"data": (1, 3, 34, 34)}, layers))
    write_caffemodel(tmp_path / "f.caffemodel", blobs)
    x = torch.randn(1, 3, 34, 34)
    (pool2,) = _opencv(tmp_path / "f.prototxt", tmp_path / "f.caffemodel", x, ["pool2"])
    assert pool2.shape[-2:] == (9, 9) and model.features(x).shape[-2:] == (8, 8)

    with pytest.raises(ValueError, match=r"input size 34x34: pool2 \(features.7\) gives 9x9 in Caffe .* but 8x8 in "
                                         r"PyTorch; .*nearest: \[28, 32, 36, 40\]\).*ceil_mode=True"):
        export_vgg(model, tmp_path / "a.prototxt", tmp_path / "a.caffemodel", input_size=34)

    torch.manual_seed(1)
    ceil_model = TinyVGG(size=34, ceil_mode=True).eval()
    export_vgg(ceil_model, tmp_path / "c.prototxt", tmp_path / "c.caffemodel", input_size=34)
    (logits,) = _opencv(tmp_path / "c.prototxt", tmp_path / "c.caffemodel", x * 50, ["fc8"])
    with torch.no_grad():
        _assert_close("ceil-mode 34x34 fc8", logits, ceil_model(x * 50))


# -- names and checks -----------------------------------------------------------------------------------
def test_vgg16_layer_names_follow_caffe_vgg16():
    with torch.device("meta"):
        features = torchvision.models.vgg16().features
    expected_convs = dict(zip([0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28],
                              ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
                               "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3"]))
    names = vgg_layer_names(features)
    assert {i: n for i, n in names.items() if n.startswith("conv")} == expected_convs
    assert {i: n for i, n in names.items() if n.startswith("pool")} == {4: "pool1", 9: "pool2", 16: "pool3",
                                                                         23: "pool4", 30: "pool5"}
    assert names[1] == "relu1_1" and names[29] == "relu5_3"
    teacher = vgg_name_map(features, heads={"fc6": "fc6", "fc7": "fc7", "fc8_c": "fc8_c", "fc8_d": "fc8_d"})
    assert teacher["features.28"] == "conv5_3" and list(teacher)[-4:] == ["fc6", "fc7", "fc8_c", "fc8_d"]
    assert len(teacher) == 17


def test_import_reports_missing_unexpected_and_shape_mismatches():
    model = TinyVGG()
    names = vgg_name_map(model.features, heads={"fc6": "fc6", "fc7": "fc7", "fc8": "fc8_coco"})
    layers = _random_caffe_weights("fc8_voc")
    with pytest.raises(ValueError, match=r"missing \['fc8_coco'\], unexpected \['fc8_voc'\]; expected \[.*'fc8_coco'.*"
                                         r"found \[.*'fc8_voc'"):
        import_vgg_weights(layers, names)
    # ImageNet-style start: map everything but the classifier, ignore the caffemodel's own classifier
    no_fc8 = {k: v for k, v in names.items() if k != "fc8"}
    state = import_vgg_weights(layers, no_fc8, expected=model.state_dict(), ignore={"fc8_voc"})
    assert "fc8.weight" not in state and state["fc6.weight"].shape == (32, 1024)
    layers["fc6"].blobs[0] = np.zeros((32, 2048), np.float32)
    with pytest.raises(ValueError, match=r"fc6.weight: Caffe 'fc6' has \(32, 2048\), model expects \(32, 1024\)"):
        import_vgg_weights(layers, no_fc8, expected=model.state_dict(), ignore={"fc8_voc"})
    layers["fc6"].blobs = [np.zeros((32, 1024), np.float32)]  # weights only: no bias in Caffe
    with pytest.raises(ValueError, match="fc6.bias: model has a bias, Caffe 'fc6' has none"):
        import_vgg_weights(layers, no_fc8, expected=model.state_dict(), ignore={"fc8_voc"})


def test_export_rejects_models_outside_the_contract(tmp_path):
    model = TinyVGG()
    del model.fc7
    with pytest.raises(ValueError, match=r"VGG contract .* wrong: fc7 \(missing\)"):
        export_vgg(model, tmp_path / "a", tmp_path / "b", 32)
    model = TinyVGG()
    model.features.insert(1, nn.BatchNorm2d(8))
    with pytest.raises(ValueError, match=r"features.1 is a BatchNorm2d; .*\['Conv2d', 'ReLU', 'MaxPool2d'\]"):
        export_vgg(model, tmp_path / "a", tmp_path / "b", 32)
    with pytest.raises(ValueError, match=r"fc6 takes 1024 inputs but at input size 64x64 the features are 16x16x16"):
        export_vgg(TinyVGG(), tmp_path / "a", tmp_path / "b", 64)
    with pytest.raises(ValueError, match="output must be one of"):
        export_vgg(TinyVGG(), tmp_path / "a", tmp_path / "b", 32, output="tanh")
