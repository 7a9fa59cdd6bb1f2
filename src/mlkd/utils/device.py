"""Where and in which precision models run: the device choice, whether the hardware has a fast 16-bit float
type, and the autocast context."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
import sys
from pathlib import Path

import torch

from mlkd.errors import BadInput


def pick_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: the local GPU if there is one, else the CPU; ``cuda`` without a GPU is an error."""
    if preference not in ("auto", "cpu", "cuda"):
        raise BadInput(f"device must be auto, cpu or cuda, got {preference!r}")
    if preference == "cuda" and not torch.cuda.is_available():
        raise BadInput("device cuda asked for, but no CUDA device is available (use cpu or auto)")
    if preference in ("cuda", "auto") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def autocast(device: torch.device, amp: str):
    """``torch.autocast`` for an ``amp`` that :func:`resolve_amp` resolved for ``device`` ("none", "bf16" or
    "fp16"): what may run where is decided there, once."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively (a GPU that supports it; a CPU with AVX512-BF16 or AMX).
    Without it, CPU bf16 runs through conversions and is about 20x slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            return True
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo, where platform.processor() is often empty), else what
    :mod:`platform` says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return set()
    return {flag for line in cpuinfo.read_text().splitlines() if line.startswith("flags")
            for flag in line.split(":", 1)[1].split()}


def resolve_amp(amp: str, device: torch.device, setting: str = "run.amp") -> str:
    """The autocast type to use for ``amp`` in {"auto", "none", "bf16", "fp16"} on ``device``: ``auto`` picks
    bf16 where it is native (CPU or GPU), fp16 on a GPU without it, else none; an explicit ``bf16`` on a CPU
    without native bf16 is an error saying why (it would be ~20x slower, not faster), and so is fp16 off CUDA.
    ``setting`` is what the user set (``run.amp`` of a training config, ``precision`` of a deployed student): the
    error names it and what to use instead."""
    if amp not in ("auto", "none", "bf16", "fp16"):
        raise BadInput(f"amp must be auto, none, bf16 or fp16, got {amp!r}")
    fast = native_bf16(device)
    if amp == "auto":
        return "bf16" if fast else ("fp16" if device.type == "cuda" else "none")
    instead = _INSTEAD.get(setting, f"another {setting}")
    if amp == "bf16" and not fast and device.type == "cpu":
        raise BadInput(f"{setting}=bf16 on a CPU without native bfloat16 (torch CPU capability "
                       f"{torch.backends.cpu.get_cpu_capability()}, no AVX512-BF16 or AMX): bf16 would be about 20x "
                       f"slower than float32 there; use {instead}")
    if amp == "fp16" and device.type != "cuda":
        raise BadInput(f"{setting}=fp16 needs a CUDA device; use {instead}")
    return amp


# what to use instead of a refused 16-bit type, per setting that asks for one
_INSTEAD = {"run.amp": "run.amp=auto (bf16 where it is native, else float32) or none",
            "precision": "precision fp32 (or int8 on the CPU)"}


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
KEEP_MEMORY_ENV = "MLKD_KEEP_FREED_MEMORY"


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks for reuse instead of handing them back to the kernel at once.

    PyTorch's CPU tensors come from ``malloc``; glibc serves every block above its mmap threshold (at most
    32 MiB) with a fresh ``mmap`` and unmaps it on free, so every training step faults in its large tensors
    page by page again (VGG16's fc6 gradient alone is 411 MB). Raising the mmap and trim thresholds to 2 GiB
    lets freed blocks be reused: on the teacher step at 480 px this removes about two thirds of the page faults
    (``benchmarks/bench_teacher.py``). The process's peak memory is unchanged; its resident size no longer
    shrinks after the peak. Done for the ``mlkd`` command line, never on import; ``MLKD_KEEP_FREED_MEMORY=0``
    turns it off. Returns whether the thresholds were set (False off glibc Linux or when turned off).
    """
    if os.environ.get(KEEP_MEMORY_ENV, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    limit = 2**31 - 1  # the largest int mallopt takes
    raised = bool(mallopt(_M_MMAP_THRESHOLD, limit))
    if not raised:  # glibc versions that cap the threshold at half their heap size (32 MiB on 64-bit)
        mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    return bool(mallopt(_M_TRIM_THRESHOLD, limit)) and raised
