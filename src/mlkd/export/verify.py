"""Numeric checks of exported models: sample inputs in a model's convention, and the comparison rule.

An export is only reported as done after another runtime (OpenCV's DNN module for Caffe files, onnxruntime for
ONNX) has produced the same outputs as PyTorch on the same inputs: ``max |other - PyTorch| <= tolerance * max(1,
max |PyTorch|)`` for every output (float32 arithmetic in a different order differs by ~1e-6 relative), where
probabilities are held to the scale of the logits they come from.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from mlkd.data.base import read_image
from mlkd.data.synthetic import render_image
from mlkd.data.transforms import Warp
from mlkd.errors import BadInput
from mlkd.models.backbones import CONVENTIONS, normalize

DEFAULT_TOLERANCE = 1e-4


@dataclasses.dataclass
class Check:
    """One compared output: ``name``, ``max_abs_diff`` and the ``allowed`` difference (tolerance x scale)."""

    name: str
    max_abs_diff: float
    allowed: float
    measure: str = ""  # what max_abs_diff measures, when not "max |runtime - PyTorch|"

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.allowed

    def line(self, runtime: str) -> str:
        verdict = "ok" if self.passed else "FAILED"
        measure = self.measure or f"max |{runtime} - PyTorch|"
        return f"{self.name}: {measure} = {self.max_abs_diff:.3e} (allowed {self.allowed:.1e}) {verdict}"


def compare(name: str, got: np.ndarray, ref: torch.Tensor | np.ndarray, tolerance: float,
            scale: float | None = None) -> Check:
    """Compare an output of another runtime with PyTorch's; shapes must agree up to size-1 axes. The allowed
    difference is ``tolerance * max(1, scale)``, ``scale`` defaulting to ``max |ref|``; give outputs computed from
    logits by a sigmoid or softmax (at most 1/4- and 1/2-Lipschitz) the logits' scale, which bounds their error."""
    ref = ref.detach().cpu().numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref)
    got = np.asarray(got, dtype=np.float32)
    if got.size != ref.size or got.squeeze().shape != ref.squeeze().shape:
        raise BadInput(f"{name}: the exported model gives shape {got.shape}, PyTorch {ref.shape}")
    diff = float(np.abs(got.reshape(ref.shape) - ref).max()) if ref.size else 0.0
    if scale is None:
        scale = float(np.abs(ref).max()) if ref.size else 1.0
    return Check(name, diff, tolerance * max(1.0, scale))


def require(checks: Sequence[Check], runtime: str, where: str | Path) -> None:
    """Raise ValueError listing every check when one failed (the files stay in ``where`` for inspection).
    ``runtime`` is e.g. "OpenCV 4.14.0 DNN"; its first word names it in the lines."""
    failed = [c for c in checks if not c.passed]
    if failed:
        lines = "\n  ".join(c.line(runtime.split()[0]) for c in checks)
        raise BadInput(f"the exported model does not reproduce PyTorch in {runtime}:\n  {lines}\n"
                         f"files left in {where} for inspection")


def sample_images(size: int, images: Sequence[str | Path] = (), seed: int = 0) -> tuple[list[str], torch.Tensor]:
    """uint8 RGB ``(N, 3, size, size)``: a synthetic scene, uniform noise, then each file of ``images``, warped."""
    rng = np.random.default_rng(seed)
    arrays = [("synthetic scene", render_image(rng, image_size=max(size, 64))[0]),
              ("uniform noise", rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8))]
    arrays += [(str(p), read_image(p)) for p in images]
    warp = Warp(size)
    batch = [warp(torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))), {})[0] for _, a in arrays]
    return [n for n, _ in arrays], torch.stack(batch)


def sample_inputs(size: int, convention: str, images: Sequence[str | Path] = (),
                  seed: int = 0) -> tuple[list[str], torch.Tensor]:
    """:func:`sample_images` normalised by ``convention``: float32 network input ``(N, 3, size, size)``."""
    names, batch = sample_images(size, images, seed)
    return names, normalize(batch, convention)


def describe_input(convention: str, size: int, name: str) -> dict[str, Any]:
    """How to turn an image into the input blob ``name``, for the manifest written beside exported files."""
    c = CONVENTIONS[convention]
    order = "BGR" if c["bgr"] else "RGB"
    return {"name": name, "shape": ["N", 3, size, size], "dtype": "float32", "layout": "NCHW",
            "convention": convention, "channel_order": order, "pixel_scale": c["scale"],
            "mean": list(c["mean"]), "std": list(c["std"]),
            "resize": f"warp the whole image to {size}x{size} (aspect ratio not kept; bilinear, antialiased)",
            "formula": f"x[c] = (pixel[c] * {c['scale']:.6g} - mean[c]) / std[c], pixels 0-255, channels in {order} "
                       "order"}


def random_boxes(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` boxes (x1, y1, x2, y2) inside a ``size`` image, and proposal scores in (0.05, 1)."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size * 0.7
    wh = (0.1 + 0.5 * torch.rand(n, 2, generator=g)) * size
    boxes = torch.cat([xy, (xy + wh).clamp(max=size - 1)], 1)
    return boxes, 0.05 + 0.95 * torch.rand(n, generator=g)
