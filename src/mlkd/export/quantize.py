"""int8 students through onnxruntime: static quantisation of the exported ONNX graph.

The float32 graph (:func:`mlkd.export.onnx.export_onnx`) goes through onnxruntime's pre-processing (shape
inference and graph optimisation, which folds and fuses what the quantiser then handles as one operator), then
``quantize_static``: weights int8 per output channel, activations uint8 with ranges measured on calibration
images (min/max over them), operators in onnxruntime's QOperator form (QLinearConv, QLinearMatMul, ...), whose
CPU kernels use VNNI where the CPU has it. On a CPU without VNNI (AVX2 only) the weights use 7 bits
(``reduce_range``), which avoids the saturation of the u8 x s8 products there.

Calibration images should be training images (never the images one evaluates on); 64 are enough for the
activation ranges of these plain convolutional classifiers. Needs the ``[export]`` extra.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from mlkd.data import build_dataset
from mlkd.data.transforms import Warp
from mlkd.errors import BadInput, MlkdError
from mlkd.export.onnx import DEFAULT_OPSET, INPUT, export_onnx
from mlkd.export.vgg_view import VggDeployView
from mlkd.models.backbones import normalize
from mlkd.utils.device import cpu_flags
from mlkd.utils.optional import optional_import

logger = logging.getLogger(__name__)

# the largest |int8 - float32| probability an exported int8 model may give on its calibration images
INT8_TOLERANCE = 0.1
# what is quantised: the convolutions (and the max pools between them, which then stay in int8). The fully
# connected layers stay float32: on the demo's distilled student, quantising them too cost 0.36 held-out mAP
# where the convolutions alone cost 0.01, and at 224 they are under 1 % of VGG16's multiply-adds.
INT8_OPS = ("Conv", "MaxPool")


def has_vnni() -> bool:
    """Whether the CPU has the int8 dot-product instructions (AVX512-VNNI or AVX-VNNI)."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni"})


def deploy_model(student: nn.Module, image_size: int) -> nn.Module:
    """The student as the graph ONNX exports: a VGG head as a plain VGG classifier, a ResNet head as it is."""
    return VggDeployView(student, image_size).eval() if student.head == "vgg" else student.eval()


def quantize_student(student: nn.Module, image_size: int, calibration: Iterable[np.ndarray], out: str | Path,
                     opset: int = DEFAULT_OPSET) -> Path:
    """Write the int8 ONNX model of ``student`` to ``out``. ``calibration`` yields normalised float32 batches
    ``(B, 3, S, S)`` (the model's input convention). Returns ``out``."""
    optional_import("onnx", "export", "int8 quantisation")
    quantization = optional_import("onnxruntime.quantization", "export", "int8 quantisation")
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = Path(out)
    batches = iter(calibration)

    class Reader(quantization.CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(batches, None)
            return None if batch is None else {INPUT: np.ascontiguousarray(batch, np.float32)}

    with tempfile.TemporaryDirectory(prefix="mlkd_int8_") as tmp:
        fp32, pre = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx"
        export_onnx(deploy_model(student, image_size), fp32, image_size, opset)
        quant_pre_process(str(fp32), str(pre))
        vnni = has_vnni()
        quantization.quantize_static(str(pre), str(out), Reader(), quant_format=quantization.QuantFormat.QOperator,
                                     per_channel=True, reduce_range=not vnni,
                                     activation_type=quantization.QuantType.QUInt8,
                                     weight_type=quantization.QuantType.QInt8,
                                     calibrate_method=quantization.CalibrationMethod.MinMax,
                                     op_types_to_quantize=list(INT8_OPS))
    logger.debug(f"int8 model written to {out} (weights per channel{'' if vnni else ', 7-bit: no VNNI on this CPU'})")
    return out


def session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session for ``path`` with ``threads`` intra-op threads (None: onnxruntime's default)."""
    ort = optional_import("onnxruntime", "export", "running an ONNX model")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def batched(arrays: Iterable[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    """Stack single images ``(3, S, S)`` into batches of ``batch_size``."""
    pending: list[np.ndarray] = []
    for a in arrays:
        pending.append(a)
        if len(pending) == batch_size:
            yield np.stack(pending)
            pending = []
    if pending:
        yield np.stack(pending)


CALIBRATION_IMAGES = 64  # images int8 calibration measures activation ranges on


def calibration_batches(spec: str, options: dict[str, Any] | None, image_size: int, convention: str,
                        count: int = CALIBRATION_IMAGES, batch_size: int = 16) -> Iterator[np.ndarray]:
    """Normalised float32 batches of ``count`` images spread evenly over the dataset ``spec`` (in its order),
    warped to ``image_size``: what int8 quantisation measures activation ranges on."""
    dataset = build_dataset(spec, **(options or {}))
    if len(dataset) == 0:
        raise BadInput(f"calibration dataset {spec} has no images")
    picks = np.unique(np.linspace(0, len(dataset) - 1, min(count, len(dataset))).round().astype(int))
    view = dataset.view(transform=Warp(image_size), indices=picks.tolist())
    for start in range(0, len(view), batch_size):
        images = torch.stack([view[i][0] for i in range(start, min(start + batch_size, len(view)))])
        yield normalize(images, convention).numpy()


def checkpoint_calibration(ckpt: dict[str, Any], given: str | None) -> tuple[str, dict[str, Any] | None]:
    """The dataset to calibrate int8 on: ``given``, else the training set recorded in the checkpoint's config.
    An error says how to give one when neither is usable."""
    if given:
        return given, None
    data = (ckpt.get("config") or {}).get("data") or {}
    spec = data.get("train")
    if not spec:
        raise BadInput("precision int8 needs calibration images and the checkpoint records no training set: give "
                       "--calibration SPEC (a dataset of training images, e.g. path/to/train.jsonl)")
    try:
        build_dataset(spec, **(data.get("options") or {}))
    except MlkdError as e:
        raise BadInput(f"precision int8 calibrates on the model's training set {spec}, which cannot be opened "
                       f"here ({e}); give --calibration SPEC (a dataset of training images)") from None
    return spec, data.get("options")


def checkpoint_calibration_batches(ckpt: dict[str, Any], given: str | None) -> Iterator[np.ndarray]:
    """:func:`calibration_batches` of a checkpoint's student: the dataset ``given``, else its training set
    (:func:`checkpoint_calibration`), at its image size and input convention."""
    return calibration_batches(*checkpoint_calibration(ckpt, given), ckpt["inference"]["image_size"],
                               ckpt["input_convention"])
