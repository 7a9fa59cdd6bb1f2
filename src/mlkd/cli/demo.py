"""`mlkd demo`: the end-to-end run on the embedded synthetic dataset."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "demo", help="end-to-end demo on a generated synthetic dataset",
        description="Generate the synthetic multi-label detection dataset, compute proposals with every "
                    "method into LMDB caches, measure their recall of the ground-truth boxes and report the "
                    "metrics of the baselines. Everything goes into one run folder with a summary.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="run folder (created; reruns reuse its proposal caches)")
    p.add_argument("--num-images", type=int, default=240, help="images to generate (a quarter held out as val)")
    p.add_argument("--seed", type=int, default=0, help="seed of the dataset")
    p.add_argument("--image-size", type=int, default=160, help="nominal image side in pixels")
    p.add_argument("--workers", type=int, default=2, help="processes for proposal generation (0 = in-process)")
    p.add_argument("--max-proposals", type=int, default=200, help="proposals kept per image")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from mlkd.demo import run_demo

    run_demo(args.out, num_images=args.num_images, seed=args.seed, image_size=args.image_size,
             workers=args.workers, max_proposals=args.max_proposals)
    return 0
