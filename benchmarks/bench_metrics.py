"""Time the metrics on an MS-COCO-val-sized problem: 40,137 images x 80 classes, ~2.9 labels per image.

Run: ``.venv/bin/python benchmarks/bench_metrics.py [--repeats 5]``. Prints the median wall time of each part.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Callable

import numpy as np

from mlkd.metrics import average_precision, evaluate_all, threshold_metrics


def make_problem(n: int, k: int, labels_per_image: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random float32 scores ``(n, k)`` mildly correlated with random multi-hot targets ``(n, k)``."""
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, k)) < labels_per_image / k).astype(np.int8)
    logits = rng.normal(size=(n, k)) + 2.0 * targets - 2.0
    scores = (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
    return scores, targets


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median wall-clock seconds of ``repeats`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=40137, help="N (default: MS-COCO val2014 size)")
    parser.add_argument("--classes", type=int, default=80, help="K (default: MS-COCO)")
    parser.add_argument("--labels-per-image", type=float, default=2.9, help="mean positives per image")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats; the median is printed")
    args = parser.parse_args()
    scores, targets = make_problem(args.images, args.classes, args.labels_per_image, seed=0)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"numpy {np.__version__}, python {platform.python_version()}")
    print(f"problem: {args.images} x {args.classes} float32, {targets.sum(1).mean():.2f} labels/image")
    parts = {
        "average_precision mlic": lambda: average_precision(scores, targets, "mlic"),
        "average_precision voc07": lambda: average_precision(scores, targets, "voc07"),
        "average_precision voc_area": lambda: average_precision(scores, targets, "voc_area"),
        "threshold_metrics p>=0.5": lambda: threshold_metrics(scores, targets, 0.5),
        "threshold_metrics top-3": lambda: threshold_metrics(scores, targets, None, top_k=3),
        "evaluate_all (everything)": lambda: evaluate_all(scores, targets),
    }
    for name, fn in parts.items():
        print(f"{name:<28} {median_time(fn, args.repeats):8.3f} s  (median of {args.repeats})")


if __name__ == "__main__":
    main()
