"""Read and write Caffe model files: ``.caffemodel`` (binary) and ``.prototxt`` (text), V1 and V2 layouts.

Readers accept both layouts and return mlkd's normalised view (:mod:`mlkd.export.caffe.net`); writers write
V2 by default and V1 on request (``version=1``: ``layers`` with type enums, inputs as ``input``/``input_dim``,
blob sizes in the legacy 4-D fields, as in the ImageNet VGG16 files).

Fields mlkd's schema does not know are skipped: the binary parser ignores unknown field numbers and the text
reader unknown field names, so files of Caffe forks (e.g. the release's ``interp_param``) read fine. A file cut
exactly between two top-level layers is still a valid message and cannot be told from a smaller model;
any other truncation is reported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Collection, Mapping

import numpy as np

from mlkd.errors import BadInput, NotFound
from mlkd.export.caffe.net import (SUPPORTED_TYPES, V1_TO_V2_TYPE, V2_TO_V1_TYPE, CaffeLayer, CaffeNet, LayerBlobs,
                                   fill_message, layer_params)

from mlkd.utils.optional import MissingExtra

try:
    from google.protobuf import text_format
    from google.protobuf.message import DecodeError, Message

    from mlkd.export.caffe import caffe_pb2 as pb
except Exception as e:  # ImportError, or protobuf's VersionError for a runtime older than the generated code
    raise MissingExtra(f"Caffe model files need protobuf>=7.35.1,<8: pip install 'mlkd[caffe]' ({e})") from e

# Expected ndim of (weights, bias) per layer type, used to drop the leading 1s of legacy 4-D blob sizes.
_BLOB_NDIMS: dict[str, tuple[int, int]] = {"Convolution": (4, 1), "Deconvolution": (4, 1), "InnerProduct": (2, 1)}


# -- reading ----------------------------------------------------------------------------------------
def read_caffemodel(path: str | Path) -> dict[str, LayerBlobs]:
    """Weights of a binary ``.caffemodel``: ``{layer name: LayerBlobs(type, blobs)}`` for each layer with blobs.

    Blob shapes come from ``shape`` or, in V1 files, from ``num/channels/height/width``; the legacy 4-D sizes of
    inner-product and convolution blobs are reduced to PyTorch's: weights ``(OUT, IN)`` (transposed back when the
    layer says ``transpose: true``) and ``(OUT, IN/groups, kH, kW)``, biases ``(OUT,)``. Arrays are float32.
    """
    path = _existing(path, "caffemodel")
    msg = pb.NetParameter()
    try:
        msg.ParseFromString(path.read_bytes())
    except DecodeError as e:
        raise BadInput(f"{path} ({path.stat().st_size} bytes) is not a valid binary caffemodel: protobuf could not "
                         f"decode it ({e}); the file is truncated or corrupt, or not a caffemodel (a .prototxt is "
                         "text: read it with read_prototxt)") from e
    out: dict[str, LayerBlobs] = {}
    for m, layer_type in _layer_messages(msg, str(path)):
        if not m.blobs:
            continue
        if m.name in out:
            raise BadInput(f"{path}: two layers named {m.name!r} carry weights; layer names must be unique")
        where = f"{path}: layer {m.name!r} ({layer_type})"
        blobs = [_blob_to_array(b, layer_type, i, where) for i, b in enumerate(m.blobs)]
        if layer_type == "InnerProduct" and m.inner_product_param.transpose:
            blobs[0] = np.ascontiguousarray(blobs[0].T)  # stored (IN, OUT)
        out[m.name] = LayerBlobs(layer_type, blobs)
    if not out:
        raise BadInput(f"{path} ({path.stat().st_size} bytes) has no layer with weights; expected a trained "
                         ".caffemodel (binary NetParameter with blobs)")
    return out


def read_prototxt(path: str | Path, supported: Collection[str] | None = SUPPORTED_TYPES) -> CaffeNet:
    """The network of a text ``.prototxt`` (V1 or V2) as a :class:`CaffeNet`.

    Inputs given as ``input`` + ``input_shape``/``input_dim`` or as Input layers all end up in ``net.inputs``.
    ``supported``: layer types allowed (default: those mlkd converts, ``SUPPORTED_TYPES``); ``None`` reads any.
    """
    path = _existing(path, "prototxt")
    msg = pb.NetParameter()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"{path} is not text ({e}); a binary .caffemodel? Read it with read_caffemodel") from e
    try:
        text_format.Parse(text, msg, allow_unknown_field=True)
        net = _net_from_message(msg, str(path))
    except text_format.ParseError as e:
        raise BadInput(f"{path} is not a valid Caffe prototxt: {e}") from e
    except RecursionError:  # protobuf's text parser recurses once per nested { }
        raise BadInput(f"{path} is not a valid Caffe prototxt: its {{ }} blocks are nested too deeply for Python's "
                       f"parser (a Caffe network nests a few levels)") from None
    if supported is not None:
        bad = [f"{l.name!r} ({l.type})" for l in net.layers if l.type not in supported]
        if bad:
            raise BadInput(f"{path}: unsupported layer type in {', '.join(bad)}; mlkd supports {sorted(supported)} "
                             "(pass supported=None to read the network anyway)")
    return net


def _existing(path: str | Path, kind: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"Caffe {kind} file not found: {path}")
    return path


def _layer_messages(msg: Any, where: str) -> list[tuple[Any, str]]:
    """The layer messages of a NetParameter with their V2 type names; V1 and V2 layers are not mixed."""
    if len(msg.layer) and len(msg.layers):
        raise BadInput(f"{where} mixes V2 'layer' and V1 'layers' entries; Caffe accepts one kind per file")
    if len(msg.layer):
        return [(m, m.type) for m in msg.layer]
    out = []
    for i, m in enumerate(msg.layers):
        enum_name = pb.V1LayerParameter.LayerType.Name(m.type)
        if not m.name and enum_name == "NONE":
            raise BadInput(f"{where}: V1 layer #{i} has no name and no type: this looks like a V0 (pre-2014) file; "
                             "upgrade it with Caffe's upgrade_net_proto_binary / upgrade_net_proto_text first")
        out.append((m, V1_TO_V2_TYPE.get(enum_name, enum_name)))
    return out


def _blob_to_array(blob: Any, layer_type: str, index: int, where: str) -> np.ndarray:
    """One BlobProto -> float32 array in PyTorch's layout (see :func:`read_caffemodel`)."""
    legacy = not blob.HasField("shape")
    if legacy:
        shape: tuple[int, ...] = (blob.num, blob.channels, blob.height, blob.width)
    else:
        shape = tuple(int(d) for d in blob.shape.dim)
    data = blob.data if len(blob.data) else blob.double_data
    count = int(np.prod(shape, dtype=np.int64))
    if count != len(data):
        raise BadInput(f"{where}: blob {index} has shape {shape} ({count} values) but stores {len(data)} values"
                         + (" (float16 raw_data of NVIDIA's Caffe is not supported)" if len(data) == 0 else ""))
    arr = np.array(data, dtype=np.float32).reshape(shape)
    _check_finite(arr, layer_type, index, where)
    ndims = _BLOB_NDIMS.get(layer_type)
    if legacy and ndims is not None and index < 2:
        arr = _drop_leading_ones(arr, ndims[index], f"{where}: blob {index}")
    return arr


def _check_finite(arr: np.ndarray, layer_type: str, index: int, where: str) -> None:
    """Refuse NaN / inf weights: no model trains or runs with them, so the run diverged or the file is damaged."""
    bad = ~np.isfinite(arr)
    if bad.any():
        role = ("weights", "bias")[index] if layer_type in _BLOB_NDIMS and index < 2 else "values"
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise BadInput(f"{where}: blob {index} ({role}, shape {arr.shape}) holds {int(bad.sum())} non-finite values "
                       f"(NaN or inf; the first at index {first}); expected finite weights: the training diverged or "
                       "the file is damaged")


def _drop_leading_ones(arr: np.ndarray, ndim: int, where: str) -> np.ndarray:
    """Legacy ``(1, 1, OUT, IN)`` -> ``(OUT, IN)`` etc.; anything but leading 1s is an error."""
    lead = arr.shape[: arr.ndim - ndim]
    if any(d != 1 for d in lead):
        raise BadInput(f"{where} has legacy shape {arr.shape}; expected {ndim}-D data padded with leading 1s "
                         f"(e.g. {(1,) * (4 - ndim) + ('...',) * ndim})")
    return arr.reshape(arr.shape[arr.ndim - ndim:])


def _net_from_message(msg: Any, where: str) -> CaffeNet:
    inputs = _net_inputs(msg, where)
    layers = []
    for m, layer_type in _layer_messages(msg, where):
        if layer_type == "Input":
            shapes = [tuple(int(d) for d in s.dim) for s in m.input_param.shape]
            if len(shapes) not in (1, len(m.top)):
                raise BadInput(f"{where}: Input layer {m.name!r} has {len(m.top)} tops but {len(shapes)} shapes")
            inputs.update({top: shapes[min(i, len(shapes) - 1)] for i, top in enumerate(m.top)})
            continue
        layers.append(CaffeLayer(m.name, layer_type, list(m.bottom), list(m.top), layer_params(m)))
    return CaffeNet(msg.name, inputs, layers)


def _net_inputs(msg: Any, where: str) -> dict[str, tuple[int, ...]]:
    """Net-level inputs: ``input`` names with one ``input_shape`` each or 4 ``input_dim`` values each."""
    names = list(msg.input)
    if len(msg.input_shape) == len(names):
        return {n: tuple(int(d) for d in s.dim) for n, s in zip(names, msg.input_shape)}
    if not len(msg.input_shape) and len(msg.input_dim) == 4 * len(names):
        dims = [int(d) for d in msg.input_dim]
        return {n: tuple(dims[4 * i: 4 * i + 4]) for i, n in enumerate(names)}
    raise BadInput(f"{where}: inputs {names} need one input_shape or four input_dim values each; found "
                     f"{len(msg.input_shape)} input_shape and {len(msg.input_dim)} input_dim")


# -- writing ----------------------------------------------------------------------------------------
def write_prototxt(path: str | Path, net: CaffeNet, version: int = 2) -> None:
    """Write ``net`` as a text prototxt: V2 (inputs as Input layers) or V1 (``input`` + 4 ``input_dim``)."""
    Path(path).write_text(text_format.MessageToString(net_to_message(net, version)), encoding="utf-8")


def write_caffemodel(path: str | Path, layers: Mapping[str, LayerBlobs], net: CaffeNet | None = None,
                     version: int = 2) -> None:
    """Write weights as a binary caffemodel, V2 (blob ``shape``) or V1 (legacy 4-D sizes, type enums).

    With ``net`` the file also holds the network (as Caffe's own snapshots do) and every layer in ``layers``
    must be one of its layers; without it, the file holds one layer per entry: name, type and blobs.
    """
    _check_version(version)
    msg = net_to_message(net, version) if net is not None else pb.NetParameter()
    entries = msg.layer if version == 2 else msg.layers
    by_name = {m.name: m for m in entries}
    for name, lb in layers.items():
        m = by_name.get(name)
        if m is None:
            if net is not None:
                raise BadInput(f"weights for layer {name!r}, which network {net.name!r} does not have; its layers: "
                                 f"{[l.name for l in net.layers]}")
            m = entries.add()
            m.name = name
            _set_type(m, lb.type, version, f"layer {name!r}")
        elif net is not None and net.layer(name).type != lb.type:
            raise BadInput(f"weights for layer {name!r} are for a {lb.type} layer, but the network's {name!r} is a "
                             f"{net.layer(name).type} layer")
        transpose = lb.type == "InnerProduct" and m.inner_product_param.transpose
        for i, arr in enumerate(lb.blobs):
            arr = np.asarray(arr, dtype=np.float32)
            _array_to_blob(arr.T if transpose and i == 0 else arr, m.blobs.add(), version, f"layer {name!r} blob {i}")
    Path(path).write_bytes(msg.SerializeToString())


def net_to_message(net: CaffeNet, version: int = 2) -> Message:
    """A :class:`CaffeNet` as a ``NetParameter`` message (V2 or V1 layout)."""
    _check_version(version)
    msg = pb.NetParameter(name=net.name)
    for name, shape in net.inputs.items():
        if version == 1:
            if len(shape) != 4:
                raise BadInput(f"V1 input {name!r} needs a 4-D shape (N, C, H, W), got {shape}")
            msg.input.append(name)
            msg.input_dim.extend(int(d) for d in shape)
        else:
            m = msg.layer.add(name=name, type="Input", top=[name])
            m.input_param.shape.add().dim.extend(int(d) for d in shape)
    for layer in net.layers:
        m = msg.layer.add() if version == 2 else msg.layers.add()
        m.name = layer.name
        _set_type(m, layer.type, version, f"layer {layer.name!r}")
        m.bottom.extend(layer.bottoms)
        m.top.extend(layer.tops)
        fill_message(m, layer.params, f"layer {layer.name!r}")
    return msg


def _check_version(version: int) -> None:
    if version not in (1, 2):
        raise BadInput(f"Caffe file version must be 1 (V1 'layers') or 2 (V2 'layer'), got {version!r}")


def _set_type(m: Any, layer_type: str, version: int, where: str) -> None:
    if version == 2:
        m.type = layer_type
        return
    if layer_type not in V2_TO_V1_TYPE:
        raise BadInput(f"{where}: type {layer_type!r} has no V1 equivalent; V1 types: {sorted(V2_TO_V1_TYPE)}")
    m.type = pb.V1LayerParameter.LayerType.Value(V2_TO_V1_TYPE[layer_type])


def _array_to_blob(arr: np.ndarray, blob: Any, version: int, where: str) -> None:
    if version == 1:
        if arr.ndim > 4:
            raise BadInput(f"{where}: V1 blobs are at most 4-D, got shape {arr.shape}")
        blob.num, blob.channels, blob.height, blob.width = (1,) * (4 - arr.ndim) + arr.shape
    else:
        blob.shape.dim.extend(arr.shape)
    blob.MergeFromString(_packed_floats(_BLOB_DATA_FIELD, arr))


_BLOB_DATA_FIELD = pb.BlobProto.DESCRIPTOR.fields_by_name["data"].number


def _packed_floats(field_number: int, arr: np.ndarray) -> bytes:
    """``arr`` as the wire encoding of a packed float field (key, length, little-endian float32 values).

    Merging these bytes costs a copy; ``blob.data.extend`` would build one Python float per value (VGG16: 138M).
    """
    payload = np.ascontiguousarray(arr, dtype="<f4").tobytes()
    return _varint(field_number << 3 | 2) + _varint(len(payload)) + payload


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))
