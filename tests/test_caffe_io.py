"""Caffe model files: caffe_pb2 in sync with caffe.proto; readers checked on caffemodels encoded by hand in
protobuf's wire format (an independent check of field numbers and of the V1 legacy-shape handling); round trips
through the writers; clear errors for truncated, corrupt, missing and unsupported files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlkd.export.caffe import (CaffeLayer, CaffeNet, LayerBlobs, read_caffemodel, read_prototxt, write_caffemodel,
                               write_prototxt)
from mlkd.export.caffe import caffe_pb2
from mlkd.export.caffe.net import message_to_dict


# -- a minimal protobuf wire-format encoder / decoder, independent of the generated code ---------------
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _int(field: int, value: int) -> bytes:  # wire type 0
    return _varint(field << 3) + _varint(value)


def _bytes(field: int, payload: bytes | str) -> bytes:  # wire type 2: strings, messages, packed arrays
    payload = payload.encode() if isinstance(payload, str) else payload
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _floats(field: int, values: np.ndarray) -> bytes:  # packed little-endian float32
    return _bytes(field, np.asarray(values, "<f4").tobytes())


def _fields(buf: bytes) -> list[tuple[int, bytes | int]]:
    """Top-level (field number, value) pairs of a serialized message (varint and length-delimited only)."""
    out, i = [], 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        if key & 7 == 0:
            value, i = _read_varint(buf, i)
        elif key & 7 == 2:
            n, i = _read_varint(buf, i)
            value, i = buf[i:i + n], i + n
        else:
            raise AssertionError(f"unexpected wire type {key & 7}")
        out.append((key >> 3, value))
    return out


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        b = buf[i]
        n, shift, i = n | (b & 0x7F) << shift, shift + 7, i + 1
        if not b & 0x80:
            return n, i


# Field numbers from BVLC Caffe's caffe.proto, written out here rather than taken from caffe_pb2.
NET_NAME, NET_V1_LAYERS, NET_INPUT, NET_INPUT_DIM, NET_LAYER = 1, 2, 3, 4, 100
V1_BOTTOM, V1_TOP, V1_NAME, V1_TYPE, V1_BLOBS, V1_BLOBS_LR = 2, 3, 4, 5, 6, 7
V1_CONVOLUTION, V1_INNER_PRODUCT, V1_RELU = 4, 14, 18
L_NAME, L_TYPE, L_BOTTOM, L_TOP, L_PARAM, L_BLOBS, L_INCLUDE, L_IP_PARAM = 1, 2, 3, 4, 6, 7, 8, 117
B_NUM, B_CHANNELS, B_HEIGHT, B_WIDTH, B_DATA, B_SHAPE = 1, 2, 3, 4, 5, 7
ROI_POOLING_PARAM = 8266711  # Fast R-CNN fork's field, unknown to mlkd


def _legacy_blob(arr: np.ndarray, dims: tuple[int, int, int, int]) -> bytes:
    return b"".join(_int(f, d) for f, d in zip((B_NUM, B_CHANNELS, B_HEIGHT, B_WIDTH), dims)) + _floats(B_DATA, arr)


def _shaped_blob(arr: np.ndarray) -> bytes:
    return _bytes(B_SHAPE, _bytes(1, b"".join(_varint(d) for d in arr.shape))) + _floats(B_DATA, arr)


@pytest.fixture()
def weights():
    rng = np.random.default_rng(0)
    return {"conv_w": rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "conv_b": rng.normal(size=4).astype(np.float32),
            "fc_w": rng.normal(size=(5, 36)).astype(np.float32), "fc_b": rng.normal(size=5).astype(np.float32)}


def test_v1_caffemodel_encoded_by_hand_legacy_dims_normalised(tmp_path, weights):
    w = weights
    conv = (_bytes(V1_NAME, "conv1_1") + _int(V1_TYPE, V1_CONVOLUTION)
            + _bytes(V1_BOTTOM, "data") + _bytes(V1_TOP, "conv1_1")
            + _bytes(V1_BLOBS, _legacy_blob(w["conv_w"], (4, 3, 3, 3)))
            + _bytes(V1_BLOBS, _legacy_blob(w["conv_b"], (1, 1, 1, 4))) + _floats(V1_BLOBS_LR, [1, 2]))
    relu = _bytes(V1_NAME, "relu1_1") + _int(V1_TYPE, V1_RELU)
    fc = (_bytes(V1_NAME, "fc6") + _int(V1_TYPE, V1_INNER_PRODUCT)  # V1 InnerProduct: 1 x 1 x OUT x IN
          + _bytes(V1_BLOBS, _legacy_blob(w["fc_w"], (1, 1, 5, 36)))
          + _bytes(V1_BLOBS, _legacy_blob(w["fc_b"], (1, 1, 1, 5))))
    path = tmp_path / "v1.caffemodel"
    layers = b"".join(_bytes(NET_V1_LAYERS, m) for m in (conv, relu, fc))
    path.write_bytes(_bytes(NET_NAME, "VGG_ILSVRC_16_layers") + layers)
    layers = read_caffemodel(path)
    assert list(layers) == ["conv1_1", "fc6"]  # relu has no weights
    assert layers["conv1_1"].type == "Convolution" and layers["fc6"].type == "InnerProduct"
    got = layers["conv1_1"].blobs + layers["fc6"].blobs
    for arr, ref in zip(got, (w["conv_w"], w["conv_b"], w["fc_w"], w["fc_b"])):
        assert arr.shape == ref.shape and arr.dtype == np.float32
        np.testing.assert_array_equal(arr, ref)


def test_v2_caffemodel_encoded_by_hand_shapes_transpose_and_unknown_fields(tmp_path, weights):
    w = weights
    conv = (_bytes(L_NAME, "conv1_1") + _bytes(L_TYPE, "Convolution")
            + _bytes(L_BOTTOM, "data") + _bytes(L_TOP, "conv1_1")
            + _bytes(L_PARAM, _floats(3, [1.0])) + _bytes(L_INCLUDE, _int(1, 1))  # param {lr_mult: 1} include {TEST}
            + _bytes(L_BLOBS, _shaped_blob(w["conv_w"])) + _bytes(L_BLOBS, _shaped_blob(w["conv_b"])))
    roi = (_bytes(L_NAME, "roi_pool5") + _bytes(L_TYPE, "ROIPooling")
           + _bytes(ROI_POOLING_PARAM, _int(1, 7) + _int(2, 7)))
    fc = (_bytes(L_NAME, "fc8_c") + _bytes(L_TYPE, "InnerProduct") + _bytes(L_IP_PARAM, _int(6, 1))  # transpose: true
          + _bytes(L_BLOBS, _shaped_blob(np.ascontiguousarray(w["fc_w"].T))) + _bytes(L_BLOBS, _shaped_blob(w["fc_b"])))
    path = tmp_path / "v2.caffemodel"
    path.write_bytes(b"".join(_bytes(NET_LAYER, m) for m in (conv, roi, fc)))
    layers = read_caffemodel(path)
    assert {k: v.type for k, v in layers.items()} == {"conv1_1": "Convolution", "fc8_c": "InnerProduct"}
    np.testing.assert_array_equal(layers["conv1_1"].blobs[0], w["conv_w"])
    np.testing.assert_array_equal(layers["fc8_c"].blobs[0], w["fc_w"])  # (IN, OUT) on disk -> (OUT, IN)
    np.testing.assert_array_equal(layers["fc8_c"].blobs[1], w["fc_b"])


def _net() -> CaffeNet:
    return CaffeNet("tiny", {"data": (1, 3, 6, 6)}, [
        CaffeLayer("conv1_1", "Convolution", ["data"], ["conv1_1"],
                   {"convolution_param": {"num_output": 4, "pad": [1], "kernel_size": [3]}}),
        CaffeLayer("relu1_1", "ReLU", ["conv1_1"], ["conv1_1"]),
        CaffeLayer("fc6", "InnerProduct", ["conv1_1"], ["fc6"], {"inner_product_param": {"num_output": 5}}),
        CaffeLayer("prob", "Softmax", ["fc6"], ["prob"]),
    ])


def _blobs(w) -> dict[str, LayerBlobs]:
    return {"conv1_1": LayerBlobs("Convolution", [w["conv_w"], w["conv_b"]]),
            "fc6": LayerBlobs("InnerProduct", [np.zeros((5, 144), np.float32), w["fc_b"]])}


@pytest.mark.parametrize("version", [1, 2])
def test_written_caffemodel_uses_caffes_field_numbers_and_reads_back(tmp_path, weights, version):
    path = tmp_path / "m.caffemodel"
    write_caffemodel(path, _blobs(weights), net=_net(), version=version)
    top = _fields(path.read_bytes())
    layer_field, name_field, blob_field = ((NET_V1_LAYERS, V1_NAME, V1_BLOBS) if version == 1
                                           else (NET_LAYER, L_NAME, L_BLOBS))
    if version == 1:  # V1 inputs: input: "data", input_dim x 4
        assert [v for f, v in top if f in (NET_INPUT, NET_INPUT_DIM)] == [b"data", 1, 3, 6, 6]
    assert {f for f, _ in top} == {NET_NAME, layer_field} | ({NET_INPUT, NET_INPUT_DIM} if version == 1 else set())
    layers = [_fields(v) for f, v in top if f == layer_field]
    conv = next(fields for fields in layers if (name_field, b"conv1_1") in fields)
    assert ((V1_TYPE, V1_CONVOLUTION) if version == 1 else (L_TYPE, b"Convolution")) in conv
    bias = _fields([v for f, v in conv if f == blob_field][1])
    if version == 1:  # legacy 4-D size 1 x 1 x 1 x OUT, no shape
        assert [(f, v) for f, v in bias if f != B_DATA] == [(B_NUM, 1), (B_CHANNELS, 1), (B_HEIGHT, 1), (B_WIDTH, 4)]
    else:  # shape { dim: 4 } (packed), no legacy fields
        assert [f for f, _ in bias] == [B_DATA, B_SHAPE] or [f for f, _ in bias] == [B_SHAPE, B_DATA]
        assert _fields(dict(bias)[B_SHAPE]) == [(1, _varint(4))]
    back = read_caffemodel(path)
    for name, lb in _blobs(weights).items():
        assert back[name].type == lb.type
        for a, b in zip(back[name].blobs, lb.blobs):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("version", [1, 2])
def test_prototxt_round_trip(tmp_path, version):
    path = tmp_path / "net.prototxt"
    write_prototxt(path, _net(), version=version)
    assert ("layers {" in path.read_text()) == (version == 1)
    assert read_prototxt(path) == _net()


def test_caffemodel_without_net_holds_name_type_blobs(tmp_path, weights):
    write_caffemodel(tmp_path / "m.caffemodel", _blobs(weights))
    assert {k: v.type for k, v in read_caffemodel(tmp_path / "m.caffemodel").items()} == {
        "conv1_1": "Convolution", "fc6": "InnerProduct"}


V1_DEPLOY = """name: "VGG_ILSVRC_16_layers"
input: "data"
input_dim: 10
input_dim: 3
input_dim: 224
input_dim: 224
layers { bottom: "data" top: "conv1_1" name: "conv1_1" type: CONVOLUTION
  convolution_param { num_output: 64 pad: 1 kernel_size: 3 } }
layers { bottom: "conv1_1" top: "conv1_1" name: "relu1_1" type: RELU }
layers { bottom: "conv1_1" top: "pool1" name: "pool1" type: POOLING
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layers { bottom: "pool1" top: "fc6" name: "fc6" type: INNER_PRODUCT inner_product_param { num_output: 4096 } }
layers { bottom: "fc6" top: "fc6" name: "drop6" type: DROPOUT dropout_param { dropout_ratio: 0.5 } }
layers { bottom: "fc6" top: "prob" name: "prob" type: SOFTMAX }
"""

RELEASE_STYLE = """name: "WSDDN"
input: "data"
input_shape { dim: 1 dim: 3 dim: 672 dim: 672 }
layer { name: "rois" type: "Input" top: "rois" input_param { shape { dim: 500 dim: 5 } } }
layer { name: "conv1_1" type: "Convolution" bottom: "data" top: "conv1_1"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  convolution_param { num_output: 64 pad: 1 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "roi_pool5" type: "ROIPooling" bottom: "conv1_1" bottom: "rois" top: "pool5"
  roi_pooling_param { pooled_w: 7 pooled_h: 7 spatial_scale: 0.0625 score_scale: 1 } }
layer { name: "data_size224" type: "Interp" bottom: "data" top: "data_size224" interp_param { height: 224 } }
layer { name: "loss" type: "SigmoidCrossEntropyLoss" bottom: "pool5" include { phase: TRAIN } }
"""


def test_read_v1_deploy_prototxt_normalised(tmp_path):
    (tmp_path / "deploy.prototxt").write_text(V1_DEPLOY)
    net = read_prototxt(tmp_path / "deploy.prototxt")
    assert net.name == "VGG_ILSVRC_16_layers" and net.inputs == {"data": (10, 3, 224, 224)}
    assert [(l.name, l.type) for l in net.layers] == [("conv1_1", "Convolution"), ("relu1_1", "ReLU"),
                                                      ("pool1", "Pooling"), ("fc6", "InnerProduct"),
                                                      ("drop6", "Dropout"), ("prob", "Softmax")]
    assert net.layer("pool1").params == {"pooling_param": {"pool": "MAX", "kernel_size": 2, "stride": 2}}
    assert net.layer("drop6").bottoms == ["fc6"] and net.layer("drop6").tops == ["fc6"]


def test_release_style_prototxt_unknown_fields_skipped_unknown_types_listed(tmp_path):
    path = tmp_path / "train.prototxt"
    path.write_text(RELEASE_STYLE)
    with pytest.raises(ValueError) as err:
        read_prototxt(path)
    msg = str(err.value)
    assert "'roi_pool5' (ROIPooling)" in msg and "'loss' (SigmoidCrossEntropyLoss)" in msg and "(Interp)" in msg
    assert "'Convolution'" in msg and "'InnerProduct'" in msg and "supported=None" in msg
    net = read_prototxt(path, supported=None)
    assert net.inputs == {"data": (1, 3, 672, 672), "rois": (500, 5)}
    assert net.layer("data_size224").params == {}  # interp_param is unknown to mlkd's schema: skipped
    # the release fork's roi_pooling_param (score scaling included) is known
    assert net.layer("roi_pool5").params == {"roi_pooling_param": {"pooled_h": 7, "pooled_w": 7, "spatial_scale": 0.0625,
                                                                   "score_scale": 1.0}}
    assert net.layer("conv1_1").params["param"] == [{"lr_mult": 1.0, "decay_mult": 1.0},
                                                    {"lr_mult": 2.0, "decay_mult": 0.0}]
    assert net.layer("loss").params == {"include": [{"phase": "TRAIN"}]}


# -- errors ------------------------------------------------------------------------------------------
def test_truncated_caffemodel_names_file_and_size(tmp_path, weights):
    path = tmp_path / "m.caffemodel"
    write_caffemodel(path, _blobs(weights), version=1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"m\.caffemodel \(\d+ bytes\) is not a valid binary caffemodel.*truncated"):
        read_caffemodel(path)


def test_other_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="caffemodel file not found: .*nope.caffemodel"):
        read_caffemodel(tmp_path / "nope.caffemodel")
    with pytest.raises(FileNotFoundError, match="prototxt file not found"):
        read_prototxt(tmp_path / "nope.prototxt")
    (tmp_path / "empty.caffemodel").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.caffemodel \(0 bytes\) has no layer with weights"):
        read_caffemodel(tmp_path / "empty.caffemodel")
    (tmp_path / "bad.prototxt").write_text('layer { name: "a" type: "ReLU" \n  bogus { }')
    with pytest.raises(ValueError, match=r"bad.prototxt is not a valid Caffe prototxt: 2:"):
        read_prototxt(tmp_path / "bad.prototxt")
    (tmp_path / "bin.prototxt").write_bytes(b"\xff\xfe\x00\x80")
    with pytest.raises(ValueError, match="is not text"):
        read_prototxt(tmp_path / "bin.prototxt")
    (tmp_path / "v0.caffemodel").write_bytes(_bytes(NET_V1_LAYERS, _bytes(1, _bytes(1, "conv1"))))  # V0: nested 'layer'
    with pytest.raises(ValueError, match="V0"):
        read_caffemodel(tmp_path / "v0.caffemodel")


def test_blob_size_and_legacy_shape_errors(tmp_path):
    path = tmp_path / "m.caffemodel"
    blob = _bytes(B_SHAPE, _bytes(1, _varint(2) + _varint(3))) + _floats(B_DATA, np.zeros(5))
    path.write_bytes(_bytes(NET_LAYER, _bytes(L_NAME, "fc6") + _bytes(L_TYPE, "InnerProduct") + _bytes(L_BLOBS, blob)))
    with pytest.raises(ValueError, match=r"'fc6' \(InnerProduct\): blob 0 has shape \(2, 3\) \(6 values\) but stores 5"):
        read_caffemodel(path)
    blob = _legacy_blob(np.zeros(6), (2, 1, 1, 6 // 2))  # num != 1: not 1 x 1 x OUT x IN
    layer = _bytes(V1_NAME, "fc6") + _int(V1_TYPE, V1_INNER_PRODUCT) + _bytes(V1_BLOBS, blob)
    path.write_bytes(_bytes(NET_V1_LAYERS, layer))
    with pytest.raises(ValueError, match=r"blob 0 has legacy shape \(2, 1, 1, 3\); expected 2-D data padded"):
        read_caffemodel(path)


def test_writer_errors(tmp_path, weights):
    with pytest.raises(ValueError, match="'Input' has no V1 equivalent"):
        write_caffemodel(tmp_path / "x", {"data": LayerBlobs("Input", [])}, version=1)
    with pytest.raises(ValueError, match="version must be 1 .* or 2"):
        write_prototxt(tmp_path / "x", _net(), version=3)
    with pytest.raises(ValueError, match="version must be 1 .* or 2"):
        write_caffemodel(tmp_path / "x", _blobs(weights), version=0)
    with pytest.raises(ValueError, match="does not have; its layers"):
        write_caffemodel(tmp_path / "x", {"fc7": LayerBlobs("InnerProduct", [])}, net=_net())
    bad = CaffeNet("n", {}, [CaffeLayer("c", "Convolution", [], [], {"convolution_param": {"num_outputs": 3}})])
    with pytest.raises(ValueError, match="ConvolutionParameter has no field 'num_outputs'.*'num_output'"):
        write_prototxt(tmp_path / "x", bad)
    bad.layers[0].params = {"pooling_param": {"pool": "MEDIAN"}}
    with pytest.raises(ValueError, match="unknown value 'MEDIAN'; expected one of \\['MAX', 'AVE', 'STOCHASTIC'\\]"):
        write_prototxt(tmp_path / "x", bad)


# -- the generated code ---------------------------------------------------------------------------
def test_caffe_pb2_is_generated_from_caffe_proto(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (dev extra) regenerates caffe_pb2.py from caffe.proto")
    src = Path(caffe_pb2.__file__).resolve().parents[3]  # .../src
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", str(src), f"--python_out={tmp_path}",
                    str(src / "mlkd/export/caffe/caffe.proto")], check=True)
    generated = (tmp_path / "mlkd/export/caffe/caffe_pb2.py").read_text()
    assert generated == Path(caffe_pb2.__file__).read_text(), (
        "caffe_pb2.py differs from what grpcio-tools (pinned in the dev extra) makes of caffe.proto; regenerate it: "
        "python -m grpc_tools.protoc -I src --python_out=src src/mlkd/export/caffe/caffe.proto")


def test_schema_carries_caffes_field_numbers():
    numbers = {m.DESCRIPTOR.name: {f.name: f.number for f in m.DESCRIPTOR.fields} for m in
               (caffe_pb2.NetParameter, caffe_pb2.LayerParameter, caffe_pb2.V1LayerParameter, caffe_pb2.BlobProto)}
    assert numbers["NetParameter"].items() >= {"name": 1, "layers": 2, "input": 3, "input_dim": 4, "input_shape": 8,
                                               "layer": 100}.items()
    assert numbers["BlobProto"] == {"shape": 7, "data": 5, "diff": 6, "double_data": 8, "double_diff": 9,
                                    "num": 1, "channels": 2, "height": 3, "width": 4}
    assert message_to_dict(caffe_pb2.PoolingParameter(pool=1, kernel_size=3)) == {"pool": "AVE", "kernel_size": 3}
