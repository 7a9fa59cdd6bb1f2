"""Proposal generation throughput (images/s) with 1 and 2 worker processes, on VOC/COCO-sized images.

Writes ``--images`` synthetic images with the longer side 500 px (the other 375-500 px, as VOC / COCO) to a
temporary folder, then times ``generate_proposals`` into a fresh LMDB cache for each method and worker count.
The pool start-up is included, but not the one-off start of the fork server. Run:

    .venv/bin/python benchmarks/bench_proposals.py [--images 64] [--methods edge_boxes selective_search]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
from pathlib import Path

import cv2

from mlkd.data import CustomDataset
from mlkd.data.synthetic import generate
from mlkd.proposals import generate_proposals

PARAMS = {"edge_boxes": {}, "selective_search": {"mode": "fast"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="images per run")
    parser.add_argument("--size", type=int, default=500, help="longer image side in pixels")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time")
    parser.add_argument("--methods", nargs="+", default=list(PARAMS), choices=list(PARAMS))
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"opencv {cv2.__version__}, python {platform.python_version()}")
    tmp = Path(tempfile.mkdtemp(prefix="bench_proposals_"))
    try:
        manifest = generate(tmp / "data", args.images, seed=0, image_size=args.size, val_fraction=0.0,
                            image_format="jpg", progress=False)["train"]
        dataset = CustomDataset(manifest)
        print(f"data: {len(dataset)} JPEGs, longer side {args.size} px; 500 proposals kept per image")
        warm = CustomDataset(manifest)
        warm.records = warm.records[:2]  # starts the fork server once, so no timed run pays for its imports
        generate_proposals(warm, "edge_boxes", {}, tmp / "warm-up", workers=1, progress=False)
        for method in args.methods:
            rates = {}
            for workers in args.workers:
                out = tmp / f"{method}_{workers}"
                report = generate_proposals(dataset, method, PARAMS[method], out, workers=workers, progress=False)
                rates[workers] = report.processed / report.seconds
                print(f"{method:<17} workers={workers}  {rates[workers]:7.2f} images/s  "
                      f"({report.mean_boxes:.0f} boxes/img, {report.seconds:.1f} s)")
            if len(rates) > 1:
                lo, hi = min(rates), max(rates)
                print(f"{method:<17} speed-up {hi} vs {lo} workers: {rates[hi] / rates[lo]:.2f}x")
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
