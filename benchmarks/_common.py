"""What the benchmarks share: a description of the machine (the CPU's capability and whether it has native
bfloat16, which decides whether bf16 can be fast at all), median timing, realistic proposals, JSON output."""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any, Callable

import numpy as np
import torch

from mlkd.data.synthetic import render_image
from mlkd.proposals.methods import propose, resolve_params
from mlkd.utils.device import cpu_model, native_bf16

# proposals as the recipes make them, every box kept (no cap): fast selective search and EdgeBoxes
PROPOSAL_METHODS = {"selective_search": {"mode": "fast", "max_proposals": None},
                    "edge_boxes": {"max_boxes": 2000, "max_proposals": None}}


def machine(device: torch.device) -> dict[str, Any]:
    """The figures every benchmark prints and writes beside its numbers."""
    info = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": native_bf16(device),
            "cpu": cpu_model(), "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def describe(info: dict[str, Any]) -> str:
    where = info.get("gpu") or f"{info['cpu']}, {info['cpus']} CPUs, {info['threads']} threads"
    return (f"machine: {where}; torch CPU capability {info['cpu_capability']}, native bf16 "
            f"{'yes' if info['native_bf16'] else 'NO (bf16 runs emulated, ~20x slower: not measured)'}; "
            f"torch {info['torch']}")


def timed(fn: Callable[[], object], repeats: int, device: torch.device, warmup: int = 1) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def synthetic_proposals(num_images: int, method: str, seed: int = 0, size: int = 500
                        ) -> list[tuple[np.ndarray, tuple[int, int]]]:
    """``(boxes (R, 4), (h, w))`` of ``num_images`` synthetic images (longer side ``size``, as VOC/COCO) under
    ``method`` (a key of :data:`PROPOSAL_METHODS`)."""
    rng = np.random.default_rng(seed)
    params = resolve_params(method, PROPOSAL_METHODS[method])
    out = []
    for _ in range(num_images):
        img, _, _ = render_image(rng, image_size=size)
        boxes, _ = propose(img, method, params)
        out.append((boxes, img.shape[:2]))
    return out


def warp_boxes(boxes: np.ndarray, hw: tuple[int, int], side: int) -> torch.Tensor:
    """Boxes of an ``hw`` image in pixels of the image warped to ``side x side`` (the teacher's and student's
    resize), float32 like the network inputs."""
    h, w = hw
    scale = np.array([side / w, side / h, side / w, side / h])
    return torch.from_numpy((boxes * scale).astype(np.float32))


def emit_json(figures: dict[str, Any]) -> None:
    """The ``--json`` output: one JSON object on the last line."""
    print(json.dumps(figures, sort_keys=True))


# What makes an AVX-512 machine compute as an AVX2-only one: PyTorch's own kernels and oneDNN's, both limited.
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def capability_classes() -> list[tuple[str, dict[str, str]]]:
    """The CPU classes a benchmark measures in one run: ``("native", {})`` and, where the CPU is more than AVX2,
    ``("avx2", AVX2_ENV)`` (emulated, for the subprocesses it starts). On an AVX2-only CPU the two are one."""
    native = torch.backends.cpu.get_cpu_capability()
    return [("native", {})] + ([("avx2", AVX2_ENV)] if native not in ("AVX2", "DEFAULT", "NO AVX") else [])


def suffixed(figures: dict[str, Any], suffix: str, keys: list[str]) -> None:
    """Copy ``keys`` of ``figures`` under ``key_<suffix>`` (the per-capability names the targets are read from)."""
    for key in keys:
        if key in figures:
            figures[f"{key}_{suffix}"] = figures[key]
