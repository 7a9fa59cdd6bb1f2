"""Student speed: inference throughput and the training cost of distillation.

1. Inference, images/s of the VGG16 student at 224 x 224 (batch 32 by default): float32 eager, channels_last,
   and bf16 autocast (CPU) / fp16 autocast (CUDA), against a plain torchvision VGG16 (eager, float32) measured
   in the same run.
2. Training, seconds per step (forward + backward + SGD step) of one student batch: plain (L_p), stage 1
   (L_f: the frozen VGG16 teacher runs at 672 on 500 proposals per image), stage 2 with cached teacher targets
   (L_p + L_p') and stage 2 computing the targets on the fly. The ratio to the plain step is the cost of
   distillation. Weights are random (speed does not depend on them).

Run: ``.venv/bin/python benchmarks/bench_student.py [--device cuda] [--batch 32] [--train-batch 2]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Callable

import torch
import torchvision

from mlkd.distill import StudentObjective
from mlkd.models.build import build_student, build_teacher
from mlkd.models.configs import StudentModelConfig, TeacherModelConfig

K = 80


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def autocast(device: torch.device, on: bool):
    dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    return torch.autocast(device.type, dtype=dtype, enabled=on)


def inference(device: torch.device, batch: int, repeats: int) -> None:
    x = torch.randn(batch, 3, 224, 224, device=device)
    student = build_student(StudentModelConfig(), K).to(device).eval()
    baseline = torchvision.models.vgg16().to(device).eval()
    cases = {
        "torchvision vgg16 (baseline), float32": (baseline, x, False),
        "mlkd student, float32": (student, x, False),
        "mlkd student, channels_last": (student, x.contiguous(memory_format=torch.channels_last), False),
        f"mlkd student, {'bf16' if device.type == 'cpu' else 'fp16'} autocast": (student, x, True),
    }
    base = None
    for name, (model, inp, amp) in cases.items():
        if "channels_last" in name:
            model = model.to(memory_format=torch.channels_last)
        with torch.no_grad(), autocast(device, amp):
            sec = timed(lambda: model(inp), repeats, device)
        rate = batch / sec
        base = base or rate
        print(f"  {name:<42} {rate:8.1f} images/s  ({rate / base:.2f}x baseline)")
        if "channels_last" in name:
            student.to(memory_format=torch.contiguous_format)


def training(device: torch.device, batch: int, proposals: int, repeats: int) -> None:
    student = build_student(StudentModelConfig(), K).to(device)
    teacher = build_teacher(TeacherModelConfig(), K).to(device)
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(batch, proposals, 2, generator=gen) * 600
    boxes = torch.cat([xy, xy + 16 + torch.rand(batch, proposals, 2, generator=gen) * 400], 2).clamp(max=672)
    inputs = {"images": torch.randn(batch, 3, 224, 224), "labels": (torch.rand(batch, K, generator=gen) < 0.05).float(),
              "teacher_images": torch.randn(batch, 3, 672, 672), "proposals": list(boxes),
              "proposal_scores": [torch.rand(proposals) for _ in range(batch)], "student_proposals": list(boxes / 3)}
    inputs = {k: [v.to(device) for v in x] if isinstance(x, list) else x.to(device) for k, x in inputs.items()}
    cached = torch.rand(batch, K, device=device)
    cases = {
        "plain student (L_p)": (StudentObjective(student, None), {}),
        "stage 1 (L_f, teacher on the fly)": (StudentObjective(student, teacher, 0, 0, 1), {}),
        "stage 2 (L_p + L_p', cached targets)": (StudentObjective(student, teacher, 1, 1, 0), {"teacher_probs": cached}),
        "stage 2 (L_p + L_p', teacher on the fly)": (StudentObjective(student, teacher, 1, 1, 0), {}),
    }
    base = None
    for name, (model, extra) in cases.items():
        model.to(device).train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-6, momentum=0.9)
        args = {**inputs, **extra} if model.teacher is not None else {"images": inputs["images"],
                                                                       "labels": inputs["labels"]}

        def step():
            loss = sum(model(**args).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
        sec = timed(step, repeats, device)
        base = base or sec
        print(f"  {name:<42} {sec:8.3f} s/step  ({sec / base:.2f}x the plain step)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--batch", type=int, default=32, help="inference batch (default 32)")
    parser.add_argument("--train-batch", type=int, default=2, help="training batch (default 2: CPU-sized)")
    parser.add_argument("--proposals", type=int, default=500, help="teacher proposals per image (default 500)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"machine: {name}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"inference, VGG16 student at 224, batch {args.batch}, {K} classes:")
    inference(device, args.batch, args.repeats)
    print(f"training step, batch {args.train_batch}, teacher at 672 with {args.proposals} proposals per image:")
    training(device, args.train_batch, args.proposals, args.repeats)


if __name__ == "__main__":
    main()
