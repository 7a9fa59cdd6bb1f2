"""Speed-only choices decided by timing them on the machine at hand, once, and remembered (as ``cudnn.benchmark``
does for convolution algorithms).

A choice that pays on one CPU class can cost on another: running VGG16's conv1-conv2 channels_last makes its
forward + backward at 480 px 7 % faster on an AVX-512 CPU and 30 % slower on an AVX2 one. :func:`fastest` times
the candidates of a decision the first time a (machine, decision, shape class) is met and keeps the winner in
``autotune.json`` under the user's cache folder (``$MLKD_CACHE_DIR``, else ``$XDG_CACHE_HOME/mlkd``, else
``~/.cache/mlkd``), so every later run on the machine makes the same choice without timing again. Candidates
compute the same values up to float rounding; only the time differs.

``MLKD_AUTOTUNE=0`` turns timing off: every decision takes its fixed default (what mlkd did before it timed
anything), the same on every machine. The test suite runs that way, so its numbers do not depend on timings.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from mlkd.utils.device import cpu_model

logger = logging.getLogger(__name__)

ENV, CACHE_ENV = "MLKD_AUTOTUNE", "MLKD_CACHE_DIR"
FILE = "autotune.json"
MARGIN = 0.95  # a candidate replaces the default only when it takes less than this fraction of its time
_memory: dict[str, str] = {}  # this process's decisions (the file is read once per key)


def enabled() -> bool:
    """Whether decisions are timed (``MLKD_AUTOTUNE`` unset or not 0)."""
    return os.environ.get(ENV, "1") != "0"


def cache_file() -> Path:
    """Where decisions are remembered."""
    root = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlkd"
    return Path(root) / FILE


def machine_key(device: torch.device) -> str:
    """What a decision depends on besides its shape: the device (the CPU's model and capability, or the GPU's
    name), torch's version and the threads it runs with."""
    if device.type == "cuda":
        where = f"cuda {torch.cuda.get_device_name(device)}"
    else:
        isa = os.environ.get("ONEDNN_MAX_CPU_ISA")  # oneDNN's kernels limited (as to emulate an older CPU)
        where = (f"cpu {cpu_model()} {torch.backends.cpu.get_cpu_capability()}{f' onednn {isa}' if isa else ''} "
                 f"threads {torch.get_num_threads()}")
    return f"{where} torch {torch.__version__}"


def fastest(decision: str, shape: str, candidates: dict[str, Callable[[], Any]], default: str,
            device: torch.device, repeats: int = 2) -> str:
    """The name of the fastest of ``candidates`` (callables that each do the same work one way) for
    ``decision`` at the shape class ``shape`` on ``device``: remembered, or timed now (one warm-up, then the best
    of ``repeats``) and remembered. ``default`` when timing is off (:func:`enabled`)."""
    if default not in candidates:
        raise ValueError(f"autotune {decision}: the default {default!r} is not a candidate ({list(candidates)})")
    if not enabled():
        return default
    key = f"{machine_key(device)} | {decision} | {shape}"
    if key not in _memory:
        known = _read().get(key)
        if known in candidates:
            _memory[key] = known
        else:
            seconds = {name: _time(run, device, repeats) for name, run in candidates.items()}
            best = min(seconds, key=seconds.get)  # another candidate must beat the default clearly: timing noise
            _memory[key] = best if seconds[best] < MARGIN * seconds[default] else default  # must not flip it
            _remember(key, _memory[key])
            logger.info(f"autotune {decision} at {shape}: " + ", ".join(f"{n} {s * 1e3:.0f} ms" for n, s in
                                                                        seconds.items())
                        + f" -> {_memory[key]} (remembered in {cache_file()}; {ENV}=0 for the fixed default)")
    return _memory[key]


def _time(run: Callable[[], Any], device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def _read() -> dict[str, str]:
    """The remembered decisions; an unreadable file counts as empty (it is a cache: it is written again)."""
    try:
        data = json.loads(cache_file().read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        logger.warning(f"autotune: ignoring the unreadable {cache_file()} ({e}); decisions are timed again")
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(data, dict) \
        else {}


def _remember(key: str, choice: str) -> None:
    """Add one decision to the file (read again first: another process may have added others); a file that
    cannot be written only means the decision is timed again next time."""
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**_read(), key: choice}, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as e:
        logger.debug(f"autotune: cannot remember the decision in {path} ({e})")


def size_class(pixels: int) -> str:
    """A shape class of an image area: powers of two of pixels (480 x 480 and 576 x 576 share one), so a
    multi-scale run times a handful of classes, not every size."""
    return f"~2^{max(int(pixels), 1).bit_length() - 1} px"
