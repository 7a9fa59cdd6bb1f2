"""The deployed student, run in the precision asked for, as fast as this machine allows.

``StudentRuntime(model, precision, device)`` is called like the model: normalised images ``(B, 3, S, S)`` ->
logits ``(B, K)`` float32.

- ``fp32``: PyTorch float32, in the memory layout that is faster for this model on this CPU: channels_last or
  the default, timed the first time and remembered (:mod:`mlkd.utils.autotune`; oneDNN ran VGG16's
  convolutions ~1.5x faster channels_last on an AVX-512 CPU, slower on an AVX2 one, a tiny network's slower);
  the results of both equal up to float rounding.
- ``bf16``: autocast bfloat16 (the layout picked the same way), only where the hardware computes bf16 natively
  (:func:`mlkd.utils.device.native_bf16`); elsewhere it would be ~20x slower and is refused
  (:func:`mlkd.utils.device.resolve_amp`).
- ``int8``: onnxruntime on the CPU with the statically quantised model of :mod:`mlkd.export.quantize`
  (activation ranges from calibration images: the model's training images by default). Needs ``[export]``.

The mAP cost of each precision on the demo's held-out split and its speed are in docs/benchmarks.md.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from mlkd.errors import BadInput
from mlkd.models.build import model_from_checkpoint
from mlkd.utils import autotune
from mlkd.utils.device import autocast, resolve_amp

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "int8")


class StudentRuntime:
    """``runtime(images) -> logits``; see the module docstring for what each precision does."""

    def __init__(self, model: nn.Module, precision: str = "fp32", device: torch.device | str = "cpu",
                 image_size: int | None = None, calibration: Iterator[np.ndarray] | None = None) -> None:
        if precision not in PRECISIONS:
            raise BadInput(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
        self.precision, self.device = precision, torch.device(device)
        self.model = model.eval().to(self.device)
        self.session = None
        # refuses bf16 on a CPU without native bf16, saying why
        self.amp = resolve_amp("bf16", self.device, "precision") if precision == "bf16" else "none"
        if precision == "int8":
            if self.device.type != "cpu":
                raise BadInput("precision int8 runs on the CPU (onnxruntime); use fp32 or bf16 on a GPU")
            if image_size is None or calibration is None:
                raise BadInput("precision int8 needs the image size and calibration images")
            self.session = _int8_session(self.model, image_size, calibration)
        self.channels_last = self.device.type == "cpu" and self.session is None and image_size is not None and \
            _channels_last_is_faster(self.model, image_size, precision == "bf16")
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any], precision: str = "fp32", device: torch.device | str = "cpu",
                        calibration: str | None = None, model: nn.Module | None = None) -> "StudentRuntime":
        """The student of a checkpoint (or model folder) in ``precision`` at its image size. int8 calibrates on the
        dataset ``calibration`` (default: the training set the checkpoint records). ``model``: the checkpoint's
        model when the caller has built it already (:class:`mlkd.api.Classifier` keeps it)."""
        if calibration is not None and precision != "int8":
            raise BadInput(f"calibration (a dataset of training images) applies to precision int8, not {precision}")
        batches = None
        if precision == "int8":  # needs the [export] extra; imported here so that fp32 and bf16 never load it
            from mlkd.export.quantize import checkpoint_calibration_batches
            batches = checkpoint_calibration_batches(ckpt, calibration)
        model = model if model is not None else model_from_checkpoint(ckpt)
        return cls(model, precision, device, ckpt["inference"]["image_size"], batches)

    def eval(self) -> "StudentRuntime":
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.session is not None:
            logits = self.session.run(["logits"], {"images": images.cpu().numpy().astype(np.float32)})[0]
            return torch.from_numpy(logits)
        x = images.to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.amp):
            return self.model(x).float()


@torch.no_grad()
def _channels_last_is_faster(model: nn.Module, size: int, bf16: bool) -> bool:
    """Whether the whole model runs faster channels_last than in the default layout on a batch of 2 at ``size``:
    timed once per (machine, model, size, precision) and remembered (:func:`mlkd.utils.autotune.fastest`; with
    ``MLKD_AUTOTUNE=0`` the default layout). The model is left in the default layout."""
    x = torch.randn(2, 3, size, size)

    def run(fmt: torch.memory_format) -> None:
        model.to(memory_format=fmt)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(x.contiguous(memory_format=fmt))

    params = sum(p.numel() for p in model.parameters())
    name = f"runtime layout {type(model).__name__} {params} params {'bf16' if bf16 else 'fp32'}"
    choice = autotune.fastest(name, f"batch 2 at {size}", {"channels_last": lambda: run(torch.channels_last),
                                                            "default": lambda: run(torch.contiguous_format)},
                              "default", torch.device("cpu"))
    model.to(memory_format=torch.contiguous_format)
    return choice == "channels_last"


def _int8_session(model: nn.Module, image_size: int, calibration: Iterator[np.ndarray]):
    from mlkd.export.quantize import quantize_student, session  # the [export] extra, for int8 only

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mlkd_int8_") as tmp:
        path = quantize_student(model, image_size, calibration, Path(tmp) / "student_int8.onnx")
        out = session(path, torch.get_num_threads())
    logger.info(f"int8 model quantised and loaded in {time.perf_counter() - t0:.1f} s")
    return out
