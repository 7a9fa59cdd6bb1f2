"""Student backbones: the parameter count and inference speed of a student on each backbone mlkd builds (its own
VGG16 and torchvision ResNet-50, and timm's), 80 classes, random weights (speed does not depend on them), run as
`--precision fp32` runs it (:class:`mlkd.inference.runtime.StudentRuntime`: float32, the faster memory layout, picked by
timing both). Parameters are the student's at inference: the region path's adapter, which only training uses, is
not counted.

Each backbone's speed is the median of rounds that time one batch of every backbone in turn, so load from other
work on the machine is spread over all of them. On a machine whose cores other work shares, ``--threads 1``
keeps torch's threads from waiting on each other (with two threads on two busy cores, torchvision's and timm's
ResNet-50, the same network, timed 5.9 and 11.2 images/s in one run).

Run: ``python benchmarks/bench_backbones.py [--image-size 224] [--batch 8] [--rounds 5] [--threads N]
[--only vgg16 timm/resnet50 ...] [--json]``. timm backbones need the ``[timm]`` extra; without it they are
reported as skipped.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from _common import describe, emit_json, machine, timed
from mlkd.inference.runtime import StudentRuntime
from mlkd.models.build import build_student
from mlkd.models.configs import StudentModelConfig
from mlkd.utils.optional import MissingExtra

K = 80
# backbone -> the input convention of its usual pretrained weights (speed does not depend on it)
BACKBONES = {"vgg16": "caffe", "resnet50": "torchvision", "timm/resnet50": "torchvision",
             "timm/convnext_tiny": "torchvision", "timm/efficientnet_b0": "torchvision",
             "timm/vit_small_patch16_224": "inception"}


def build(backbone: str, convention: str, size: int) -> tuple[StudentRuntime, dict]:
    """The student on ``backbone`` at ``size`` x ``size`` as ``--precision fp32`` runs it, and its figures:
    parameters (the student's at inference and its backbone's), the last feature map, the memory layout."""
    torch.manual_seed(0)
    cfg = StudentModelConfig(backbone=backbone, input_convention=convention, image_size=size)
    student = build_student(cfg, K).eval()
    params = sum(p.numel() for n, p in student.named_parameters() if not n.startswith("adapter."))
    backbone_params = sum(p.numel() for p in student.backbone.parameters())
    runtime = StudentRuntime(student, "fp32", "cpu", size)
    return runtime, {"backbone": backbone, "head": student.head, "params": params, "backbone_params": backbone_params,
                     "map_channels": student.backbone.out_channels, "map_side": size // student.backbone.stride,
                     "channels_last": runtime.channels_last}


def measure(runtimes: dict[str, StudentRuntime], size: int, batch: int, rounds: int) -> dict[str, float]:
    """images/s of each runtime: the median of ``rounds`` rounds, each timing one batch of every runtime in turn,
    so that other work on a shared machine slows all of them alike rather than whichever ran at the time."""
    x = torch.randn(batch, 3, size, size)
    cpu = torch.device("cpu")
    for runtime in runtimes.values():
        runtime(x)  # the warm-up batch
    seconds = {name: [] for name in runtimes}
    for _ in range(rounds):
        for name, runtime in runtimes.items():
            seconds[name].append(timed(lambda: runtime(x), 1, cpu, warmup=0))
    return {name: batch / statistics.median(s) for name, s in seconds.items()}


def table(rows: list[dict], size: int) -> str:
    """The figures as a Markdown table (as docs/benchmarks.md shows them)."""
    heads = {"vgg": "pool5, fc6, fc7, fc8", "resnet": "average pool, fc"}
    lines = [f"| student backbone | head | parameters | of which backbone | last map at {size} | images/s |",
             "| --- | --- | ---: | ---: | --- | ---: |"]
    for r in rows:
        layout = ", channels_last" if r["channels_last"] else ""
        fmap = f"{r['map_channels']} × {r['map_side']} × {r['map_side']}"
        lines.append(f"| `{r['backbone']}` | {heads[r['head']]} | {r['params'] / 1e6:.1f} M | "
                     f"{r['backbone_params'] / 1e6:.1f} M | {fmap} | {r['images_per_s']:.1f}{layout} |")
    return "\n".join(lines)


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=positive, default=224, help="student input side S (default 224)")
    parser.add_argument("--batch", type=positive, default=8, help="inference batch (default 8)")
    parser.add_argument("--rounds", type=positive, default=5,
                        help="rounds of one timed batch per backbone, the median kept (default 5)")
    parser.add_argument("--threads", type=positive, help="torch threads (default: torch's, one per core)")
    parser.add_argument("--only", nargs="+", choices=list(BACKBONES), metavar="BACKBONE",
                        help=f"measure only these backbones, of {list(BACKBONES)}")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object (last line)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    size = args.image_size
    figures = {"machine": machine(torch.device("cpu")), "image_size": size, "batch": args.batch, "classes": K,
               "rounds": args.rounds, "rows": [], "skipped": {}}
    if hasattr(os, "getloadavg"):  # other work on the machine slows every row: say how busy it was
        figures["machine"]["load_before"] = round(os.getloadavg()[0], 2)
    print(describe(figures["machine"]))
    print(f"student inference, --precision fp32, {size} x {size}, batch {args.batch}, {K} classes, random weights, "
          f"median of {args.rounds} rounds" + (f"; 1-min load average {figures['machine']['load_before']} before"
                                                 if "load_before" in figures["machine"] else ""))
    runtimes = {}
    for backbone in args.only or BACKBONES:
        try:
            runtimes[backbone], row = build(backbone, BACKBONES[backbone], size)
        except MissingExtra as e:
            figures["skipped"][backbone] = str(e)
            print(f"  {backbone:28s} skipped: {e}")
            continue
        figures["rows"].append(row)
    speed = measure(runtimes, size, args.batch, args.rounds)
    for row in figures["rows"]:
        row["images_per_s"] = speed[row["backbone"]]
        print(f"  {row['backbone']:28s} {row['params'] / 1e6:6.1f} M params ({row['backbone_params'] / 1e6:5.1f} M "
              f"backbone), map {row['map_channels']} x {row['map_side']}^2, {row['images_per_s']:6.1f} images/s"
              f"{' (channels_last)' if row['channels_last'] else ''}")
    print(table(figures["rows"], size))
    if args.json:
        emit_json(figures)


if __name__ == "__main__":
    main()
