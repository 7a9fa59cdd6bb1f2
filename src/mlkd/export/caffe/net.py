"""mlkd's in-memory view of Caffe model files, and its conversion to and from protobuf messages.

A Caffe model comes as two files: the network (``.prototxt``, text ``NetParameter``) and the weights
(``.caffemodel``, binary ``NetParameter`` whose layers carry ``blobs``). Both exist in two layouts: V2
(``layer { type: "Convolution" }``) and the older V1 (``layers { type: CONVOLUTION }``, blob sizes in the
legacy ``num/channels/height/width`` fields), which the ImageNet VGG16 model of the VGG group still uses.
mlkd normalises both to:

- :class:`CaffeNet` — name, inputs ``{blob name: shape}`` and the layers in order (:class:`CaffeLayer`,
  V2 type names, Input layers folded into ``inputs``);
- ``dict[layer name, LayerBlobs]`` — the weights of each layer that has any, as float32 numpy arrays in
  the shapes PyTorch uses: convolution ``(OUT, IN/groups, kH, kW)``, inner product ``(OUT, IN)``, biases
  ``(OUT,)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from mlkd.errors import BadInput, MissingEntry

# V1 enum name -> V2 type string, as Caffe's own upgrade (UpgradeV1LayerType) maps them.
V1_TO_V2_TYPE: dict[str, str] = {
    "ABSVAL": "AbsVal", "ACCURACY": "Accuracy", "ARGMAX": "ArgMax", "BNLL": "BNLL", "CONCAT": "Concat",
    "CONTRASTIVE_LOSS": "ContrastiveLoss", "CONVOLUTION": "Convolution", "DATA": "Data",
    "DECONVOLUTION": "Deconvolution", "DROPOUT": "Dropout", "DUMMY_DATA": "DummyData",
    "EUCLIDEAN_LOSS": "EuclideanLoss", "ELTWISE": "Eltwise", "EXP": "Exp", "FLATTEN": "Flatten",
    "HDF5_DATA": "HDF5Data", "HDF5_OUTPUT": "HDF5Output", "HINGE_LOSS": "HingeLoss", "IM2COL": "Im2col",
    "IMAGE_DATA": "ImageData", "INFOGAIN_LOSS": "InfogainLoss", "INNER_PRODUCT": "InnerProduct", "LRN": "LRN",
    "MEMORY_DATA": "MemoryData", "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss", "MVN": "MVN",
    "POOLING": "Pooling", "POWER": "Power", "RELU": "ReLU", "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss", "SILENCE": "Silence", "SOFTMAX": "Softmax",
    "SOFTMAX_LOSS": "SoftmaxWithLoss", "SPLIT": "Split", "SLICE": "Slice", "TANH": "TanH",
    "WINDOW_DATA": "WindowData", "THRESHOLD": "Threshold",
}
V2_TO_V1_TYPE: dict[str, str] = {v: k for k, v in V1_TO_V2_TYPE.items()}

# Layer types whose network mlkd converts (deploy networks of VGG-style classifiers).
SUPPORTED_TYPES: tuple[str, ...] = ("Input", "Convolution", "ReLU", "Pooling", "InnerProduct", "Dropout",
                                    "Softmax", "Sigmoid")

# Layer fields that are not parameters in CaffeLayer.params (V1-only ones included).
_STRUCTURE_FIELDS = frozenset({"name", "type", "bottom", "top", "blobs", "blobs_lr", "weight_decay"})


@dataclass
class LayerBlobs:
    """The weights of one layer: its V2 ``type`` and its blobs (float32 arrays, see the module docstring)."""

    type: str
    blobs: list[np.ndarray]


@dataclass
class CaffeLayer:
    """One layer of a network. ``params`` holds the layer's other fields as plain Python values keyed by
    their Caffe field name, e.g. ``{"convolution_param": {"num_output": 64, "pad": [1], "kernel_size": [3]}}``
    (enums as their names, e.g. ``{"pooling_param": {"pool": "MAX"}}``)."""

    name: str
    type: str
    bottoms: list[str] = field(default_factory=list)
    tops: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class CaffeNet:
    """A network: ``inputs`` maps each input blob name to its shape ``(N, C, H, W)``; ``layers`` in order."""

    name: str
    inputs: dict[str, tuple[int, ...]]
    layers: list[CaffeLayer]

    def layer(self, name: str) -> CaffeLayer:
        """The layer called ``name``; KeyError listing the layer names if there is none."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise MissingEntry(f"no layer {name!r} in network {self.name!r}; layers: {[l.name for l in self.layers]}")


# -- protobuf message <-> plain values --------------------------------------------------------------
def message_to_dict(msg: Message) -> dict[str, Any]:
    """Set fields of ``msg`` as plain values: nested messages as dicts, repeated fields as lists, enums as names."""
    return {fd.name: _field_value(fd, value) for fd, value in msg.ListFields()}


def _field_value(fd: FieldDescriptor, value: Any) -> Any:
    if fd.is_repeated:
        return [_scalar_value(fd, v) for v in value]
    return _scalar_value(fd, value)


def _scalar_value(fd: FieldDescriptor, value: Any) -> Any:
    if fd.message_type is not None:
        return message_to_dict(value)
    if fd.enum_type is not None:
        return fd.enum_type.values_by_number[value].name
    return value


def fill_message(msg: Message, values: dict[str, Any], where: str) -> None:
    """Set the fields of ``msg`` from plain values (the inverse of :func:`message_to_dict`).

    ``where`` names the place in the file for error messages (e.g. ``"layer 'conv1_1'"``).
    """
    fields = msg.DESCRIPTOR.fields_by_name
    for key, value in values.items():
        fd = fields.get(key)
        if fd is None:
            raise BadInput(f"{where}: {msg.DESCRIPTOR.name} has no field {key!r}; mlkd knows {sorted(fields)}")
        if fd.is_repeated and not isinstance(value, (list, tuple)):
            raise BadInput(f"{where}: {msg.DESCRIPTOR.name}.{key} is repeated; expected a list, got {value!r}")
        for item in (value if fd.is_repeated else [value]):
            _set_field(msg, fd, item, f"{where}: {msg.DESCRIPTOR.name}.{key}")


def _set_field(msg: Message, fd: FieldDescriptor, value: Any, where: str) -> None:
    if fd.message_type is not None:
        if not isinstance(value, dict):
            raise BadInput(f"{where} is a {fd.message_type.name} message; expected a dict, got {value!r}")
        sub = getattr(msg, fd.name).add() if fd.is_repeated else getattr(msg, fd.name)
        sub.SetInParent()  # an empty message still marks the field as present
        fill_message(sub, value, where)
        return
    if fd.enum_type is not None and isinstance(value, str):
        if value not in fd.enum_type.values_by_name:
            raise BadInput(f"{where}: unknown value {value!r}; expected one of {list(fd.enum_type.values_by_name)}")
        value = fd.enum_type.values_by_name[value].number
    try:
        if fd.is_repeated:
            getattr(msg, fd.name).append(value)
        else:
            setattr(msg, fd.name, value)
    except (TypeError, ValueError) as e:
        raise BadInput(f"{where}: cannot store {value!r}: {e}") from e


def layer_params(msg: Message) -> dict[str, Any]:
    """The parameter fields of a V1 or V2 layer message (everything but structure and weights)."""
    return {fd.name: _field_value(fd, v) for fd, v in msg.ListFields() if fd.name not in _STRUCTURE_FIELDS}
