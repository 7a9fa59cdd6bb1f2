"""Caffe model files: read and write ``.caffemodel`` / ``.prototxt`` (V1 and V2), (normalised views in net.py).

Importing this package raises ImportError with the install command when protobuf is missing or too old.
"""

from mlkd.export.caffe.io import net_to_message, read_caffemodel, read_prototxt, write_caffemodel, write_prototxt
from mlkd.export.caffe.net import SUPPORTED_TYPES, V1_TO_V2_TYPE, CaffeLayer, CaffeNet, LayerBlobs

__all__ = [
    "SUPPORTED_TYPES", "V1_TO_V2_TYPE", "CaffeLayer", "CaffeNet", "LayerBlobs", "net_to_message", "read_caffemodel",
    "read_prototxt", "write_caffemodel", "write_prototxt",
]
