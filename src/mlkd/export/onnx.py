"""ONNX export of a classifier: input ``images`` ``(N, 3, S, S)``, outputs ``logits`` and ``probabilities``
(sigmoid of the logits) ``(N, K)``, the batch axis dynamic, the opset pinned.

The graph comes from PyTorch's TorchScript-based exporter (``dynamo=False``): it needs only ``onnx``, not the
``onnxscript`` package of the newer exporter, and handles these plain convolutional classifiers exactly.
Needs ``onnx`` and ``onnxruntime`` (``pip install 'mlkd[export]'``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mlkd.errors import BadInput
from mlkd.utils.optional import optional_import

DEFAULT_OPSET = 17
INPUT, OUTPUTS = "images", ("logits", "probabilities")


def _require() -> tuple[object, object]:
    """onnx and onnxruntime, imported on first use (the ``[export]`` extra)."""
    return (optional_import("onnx", "export", "ONNX export"),
            optional_import("onnxruntime", "export", "ONNX export"))


class WithProbabilities(nn.Module):
    """``images -> (logits, sigmoid(logits))``: both outputs of a multi-label classifier in one graph."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(images)
        return logits, torch.sigmoid(logits)


def supported_opsets() -> tuple[int, int]:
    """The lowest and highest opset this installation can export: what PyTorch's TorchScript exporter writes, capped
    by what the installed onnx knows (an opset outside gives errors deep inside torch or onnxruntime)."""
    onnx, _ = _require()
    # torch.onnx._constants is private: fall back to the range of torch 2.x when it moves
    constants = getattr(torch.onnx, "_constants", None)
    low, high = getattr(constants, "ONNX_MIN_OPSET", 7), getattr(constants, "ONNX_MAX_OPSET", 20)
    return low, min(high, onnx.defs.onnx_opset_version())


def check_opset(opset: int) -> None:
    """Refuse an opset outside :func:`supported_opsets`, naming the range and the versions it comes from."""
    low, high = supported_opsets()
    if not low <= opset <= high:
        onnx, _ = _require()
        raise BadInput(f"ONNX opset {opset} is not one this installation exports: expected {low} to {high} (torch "
                       f"{torch.__version__}, onnx {onnx.__version__}); the default is {DEFAULT_OPSET}")


def export_onnx(model: nn.Module, path: str | Path, image_size: int, opset: int = DEFAULT_OPSET) -> None:
    """Write ``model`` (images -> logits, in eval mode) as ONNX at ``path`` and check the file with onnx's checker."""
    onnx, _ = _require()
    wrapped = WithProbabilities(model).eval()
    example = torch.zeros(1, 3, image_size, image_size)
    axes = {name: {0: "batch"} for name in (INPUT, *OUTPUTS)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's notice (see module docstring)
        torch.onnx.export(wrapped, (example,), str(path), dynamo=False, opset_version=opset, input_names=[INPUT],
                          output_names=list(OUTPUTS), dynamic_axes=axes, do_constant_folding=True)
    loaded = onnx.load(str(path))
    onnx.checker.check_model(loaded)
    if loaded.opset_import[0].version != opset:
        raise BadInput(f"{path} has opset {loaded.opset_import[0].version}, expected {opset}")


def run_onnx(path: str | Path, images: torch.Tensor) -> dict[str, np.ndarray]:
    """Outputs of the ONNX file on ``images`` with onnxruntime's CPU provider (one thread: reproducible)."""
    _, ort = _require()
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {INPUT: images.numpy().astype(np.float32)})))


def runtime_name() -> str:
    """How the verification names onnxruntime, e.g. "onnxruntime 1.32.0 (CPU)"."""
    _, ort = _require()
    return f"onnxruntime {ort.__version__} (CPU)"
