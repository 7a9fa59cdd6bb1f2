"""Images/s of the data pipeline: JPEG decode + Warp(224) + horizontal flip through a DataLoader.

Writes ``--images`` synthetic JPEGs of MS-COCO size (640 x 480, textured so that they compress like photos,
~100 KB) into a temporary folder, lists them in a custom manifest, and times full passes of a ``DataLoader``
(batch 32, :func:`mlkd.data.collate`) for each ``--workers`` value, worker start-up included.

Run: ``.venv/bin/python benchmarks/bench_data.py [--images 300] [--workers 0 2] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader

from mlkd.data import Compose, CustomDataset, RandomHorizontalFlip, Warp, collate
from mlkd.data.base import read_image


def make_jpegs(folder: Path, n: int, seed: int = 0) -> Path:
    """``n`` 640 x 480 JPEGs (quality 90) with smooth colour fields, shapes and noise; returns a manifest."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        img = cv2.resize(small, (640, 480), interpolation=cv2.INTER_CUBIC)
        for _ in range(12):
            x, y = (int(v) for v in rng.integers(0, (640, 480)))
            cv2.circle(img, (x, y), int(rng.integers(10, 90)), [int(c) for c in rng.integers(0, 256, 3)], -1)
        img = cv2.add(img, rng.integers(0, 40, img.shape, dtype=np.uint8))
        assert cv2.imwrite(str(folder / f"{i:05d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        rows.append({"path": f"{i:05d}.jpg", "labels": ["object"]})
    manifest = folder / "bench.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def time_loader(ds: CustomDataset, workers: int, batch_size: int, repeats: int) -> float:
    """Median images/s over ``repeats`` full passes (worker start-up included)."""
    rates = []
    for _ in range(repeats):
        loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate)
        t0 = time.perf_counter()
        n = sum(len(images) for images, _ in loader)
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"machine: {cpu}, {os.cpu_count()} CPUs ({usable} usable), python {platform.python_version()}, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), opencv {cv2.__version__}, "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300, help="synthetic JPEGs to write (default 300)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader num_workers values")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--size", type=int, default=224, help="Warp size in pixels (default 224, the student's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per setting; the median is printed")
    args = parser.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        manifest = make_jpegs(Path(tmp), args.images)
        sizes = [p.stat().st_size for p in Path(tmp).glob("*.jpg")]
        print(f"data: {args.images} JPEGs 640x480, mean {np.mean(sizes) / 1024:.0f} KB; transform "
              f"Warp({args.size}) + RandomHorizontalFlip(0.5); batch {args.batch_size}")
        ds = CustomDataset(manifest, transform=Compose([Warp(args.size), RandomHorizontalFlip()]))
        t0 = time.perf_counter()
        for r in ds.records:
            read_image(r.path)
        print(f"{'decode only (read_image)':<34} {len(ds) / (time.perf_counter() - t0):8.1f} images/s")
        for workers in args.workers:
            rate = time_loader(ds, workers, args.batch_size, args.repeats)
            print(f"{f'DataLoader num_workers={workers}':<34} {rate:8.1f} images/s  (median of {args.repeats})")


if __name__ == "__main__":
    main()
