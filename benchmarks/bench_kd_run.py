"""The cost of distillation for a whole run: wall time of the demo's student runs, each a fresh
`mlkd train-student` process on the demo's data and seed-0 teacher.

- plain: ``student_demo`` (L_p, 20 epochs);
- default KD: ``student_demo_kd`` (one joint stage, 20 epochs), including the teacher's soft targets and region
  features computed into their caches at the start;
- release KD: ``student_demo_kd_release`` (5 + 15 epochs, the teacher run on the fly in stage 1).

Every run validates on the held-out split after each epoch, as the demo does. ``kd_run_ratio_<class>`` = default
KD / plain, ``kd_release_run_ratio_<class>`` = release KD / plain (same number of epochs), for the CPU's own
capability (``native``) and, on a CPU beyond AVX2, with PyTorch's and oneDNN's kernels limited to AVX2 (``avx2``). Runs alternate over ``--repeats``
rounds and the median is used. Needs a demo folder with data, proposals and ``seed0/teacher/last.pt``
(``mlkd demo --out DIR`` makes one).

Run: ``python benchmarks/bench_kd_run.py --demo runs/demo [--repeats 1] [--json]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import capability_classes, describe, emit_json, machine

RUNS = {"plain": "student_demo", "default KD": "student_demo_kd", "release KD": "student_demo_kd_release"}


def train(config: str, demo: Path, out: Path, env: dict[str, str]) -> float:
    """Seconds of one `mlkd train-student` process, start to exit."""
    sets = [f"data.train={demo / 'data' / 'train.jsonl'}", f"data.val={demo / 'data' / 'val.jsonl'}",
            f"data.train_proposals={demo / 'proposals' / 'train'}", f"distill.teacher={demo / 'seed0' / 'teacher' / 'last.pt'}",
            f"run.out={out}", "run.progress=false", "distill.baseline=null"]
    if config == "student_demo":
        sets = [s for s in sets if not s.startswith(("data.train_proposals", "distill."))]
    cmd = [sys.executable, "-m", "mlkd", "train-student", "--config", config] + [a for s in sets for a in ("--set", s)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, required=True, help="a demo run folder (data, proposals, seed0 teacher)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of the three runs (median reported)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object (last line)")
    args = parser.parse_args()
    if not (args.demo / "seed0" / "teacher" / "last.pt").is_file():
        parser.error(f"--demo {args.demo}: no seed0/teacher/last.pt (run `mlkd demo --out {args.demo}` first)")
    figures = machine(torch.device("cpu"))
    print(describe(figures))
    for cls, env in capability_classes():
        print(f"-- {cls}: {'AVX2, emulated' if env else torch.backends.cpu.get_cpu_capability()}", flush=True)
        median = rounds(args, env)
        figures[f"seconds_{cls}"] = median
        figures[f"kd_run_ratio_{cls}"] = median["default KD"] / median["plain"]
        figures[f"kd_release_run_ratio_{cls}"] = median["release KD"] / median["plain"]
        print(f"whole run, same epochs: default KD {figures[f'kd_run_ratio_{cls}']:.2f}x plain, release KD "
              f"{figures[f'kd_release_run_ratio_{cls}']:.2f}x plain (caches included)")
    if len(capability_classes()) == 1:  # an AVX2 CPU: its native figures are the AVX2 ones
        figures.update({k.replace("_native", "_avx2"): v for k, v in list(figures.items()) if k.endswith("_native")})
        figures["avx2_is_native"] = True
    if args.json:
        emit_json(figures)


def rounds(args: argparse.Namespace, env: dict[str, str]) -> dict[str, float]:
    """The median seconds of each run over ``args.repeats`` alternating rounds, with ``env`` added."""
    times: dict[str, list[float]] = {name: [] for name in RUNS}
    with tempfile.TemporaryDirectory(prefix="bench_kd_run_") as tmp:
        for r in range(args.repeats):
            for name, config in RUNS.items():
                seconds = train(config, args.demo, Path(tmp) / f"{config}_{r}", env)
                times[name].append(seconds)
                print(f"  round {r + 1}: {name:<11} ({config}) {seconds:7.1f} s", flush=True)
    return {name: statistics.median(v) for name, v in times.items()}


if __name__ == "__main__":
    main()
