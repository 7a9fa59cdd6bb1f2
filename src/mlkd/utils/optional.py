"""Optional dependencies: each one is an extra of the package (``pip install 'mlkd[caffe]'``), imported only by
the feature that needs it, and its absence is an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from mlkd.errors import MlkdError

EXTRAS = {"caffe": "protobuf", "mat": "scipy", "export": "onnx and onnxruntime", "tensorboard": "tensorboard",
          "timm": "timm", "serve": "FastAPI, uvicorn, python-multipart and prometheus-client"}


class MissingExtra(MlkdError, ImportError):
    """An optional dependency is not installed; the message says which extra brings it."""


def optional_import(module: str, extra: str, purpose: str) -> ModuleType:
    """``import module``, or :class:`MissingExtra` saying that ``purpose`` needs ``pip install 'mlkd[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtra(f"{purpose} needs {EXTRAS[extra]}: pip install 'mlkd[{extra}]' ({e})") from e
