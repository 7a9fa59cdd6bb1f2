"""Seconds per training iteration of the VGG16 WSDDN teacher, and its peak memory, against a naive reference.

One iteration = forward + backward + SGD step of ``build_teacher(TeacherModelConfig(backbone="vgg16"), 20)``
(random weights, dropout on) on ONE ``size x size`` image with R random valid proposals, float32 and under
``torch.autocast`` bfloat16. Each configuration runs in a fresh subprocess, so its peak memory is its own:
on the CPU the process's peak resident set (``VmHWM`` of ``/proc/self/status``, reset after set-up so the
"iteration" column is the growth above the set-up RSS); on CUDA ``torch.cuda.max_memory_allocated``.

The reference is the straightforward implementation with no optimisations: per image, each proposal's RoI is
cropped with its own ``roi_pool`` call (a Python loop over regions), the crops are stacked, fc6/fc7 run on the
stack (the same layers and parameters), then per image ordinary softmaxes (no segment operations) and the
clamped log loss with a Python loop over classes. Both share the backbone, so the speed-up is what the
vectorised RoI pooling and the segment ops buy on top of the same convolutions and matrix products. Before
timing, the reference's loss is checked against mlkd's on the same input and dropout masks.

Run: ``python benchmarks/bench_teacher.py [--device cuda] [--proposals 2000 500] [--repeats 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.ops import roi_pool

from mlkd.models.build import build_teacher
from mlkd.models.configs import TeacherModelConfig
from mlkd.models.wsddn import P_CLAMP, WSDDN

NUM_CLASSES = 20


def random_boxes(gen: torch.Generator, n: int, size: int) -> torch.Tensor:
    """``n`` valid (x1, y1, x2, y2) boxes inside a ``size x size`` image, sides 16 px .. the whole image."""
    wh = torch.rand(n, 2, generator=gen) * (size - 16) + 16
    xy = torch.rand(n, 2, generator=gen) * (size - wh)
    return torch.cat([xy, xy + wh], 1)


def reference_loss(model: WSDDN, images: torch.Tensor, proposals: list[torch.Tensor], scores: list[torch.Tensor],
                   labels: torch.Tensor) -> torch.Tensor:
    """The WSDDN loss, written per image and per region (see the module docstring)."""
    fmap = model.backbone(images)  # (B, C, h, w)
    total = fmap.new_zeros((), dtype=torch.float32)
    for i, (boxes, s) in enumerate(zip(proposals, scores)):
        image_fmap = fmap[i:i + 1].float()  # torchvision's CPU roi_pool has no bfloat16 kernel: pool in float32
        crops = []
        for r in range(len(boxes)):
            crop = roi_pool(image_fmap, [boxes[r:r + 1]], model.roi_size, 1.0 / model.backbone.stride)
            crops.append(crop * (model.score_scale * s[r] + model.score_bias))
        x = torch.cat(crops).to(fmap.dtype).flatten(1)  # (R, C * s * s)
        phi = model.drop(F.relu(model.fc7(model.drop(F.relu(model.fc6(x))))))
        s_cls = F.softmax(model.fc8_c(phi).float() / model.cls_temperature, dim=1)  # over classes
        s_det = F.softmax(model.fc8_d(phi).float() / model.det_temperature, dim=0)  # over this image's regions
        for k in range(labels.shape[1]):
            if labels[i, k] < 0:
                continue
            p = (s_cls[:, k] * s_det[:, k]).sum().clamp(P_CLAMP, 1 - P_CLAMP)
            total = total - (p.log() if labels[i, k] == 1 else (1 - p).log())
    return total / len(proposals)


def setup(args: argparse.Namespace, device: torch.device):
    torch.manual_seed(0)
    model = build_teacher(TeacherModelConfig(backbone="vgg16"), NUM_CLASSES).to(device).train()
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(1, 3, args.size, args.size, generator=gen).to(device)
    proposals = [random_boxes(gen, args.num_proposals, args.size).to(device)]
    scores = [torch.rand(args.num_proposals, generator=gen).to(device)]
    labels = torch.zeros(1, NUM_CLASSES)
    labels[0, [3, 11]] = 1
    labels[0, 7] = -1  # an ignored class
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9, weight_decay=5e-4)
    return model, (images, proposals, scores, labels.to(device)), optimizer


def loss_of(impl: str, model: WSDDN, inputs) -> torch.Tensor:
    if impl == "mlkd":
        return sum(model(*inputs).values())
    return reference_loss(model, *inputs)


def check_agreement(model: WSDDN, inputs, autocast, tolerance: float) -> float:
    """|reference - mlkd| / mlkd of the loss on the same input and dropout masks; raises if they disagree."""
    values = []
    with torch.no_grad(), autocast():
        for impl in ("mlkd", "reference"):
            torch.manual_seed(2)  # the same dropout masks
            values.append(float(loss_of(impl, model, inputs)))
    rel = abs(values[1] - values[0]) / abs(values[0])
    if not rel < tolerance:
        raise AssertionError(f"reference loss {values[1]} != mlkd loss {values[0]} (relative {rel:.1e})")
    return rel


def vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def worker(args: argparse.Namespace) -> dict:
    """Time one configuration in this (fresh) process; return its numbers."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, inputs, optimizer = setup(args, device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=args.precision == "bf16")  # noqa: E731
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    tolerance = 1e-4 if args.precision == "fp32" else 2e-2
    agreement = check_agreement(model, inputs, autocast, tolerance) if args.impl == "reference" else None

    def step() -> None:
        with autocast():
            loss = loss_of(args.impl, model, inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    setup_rss = vm_kib("VmRSS")
    try:  # reset the peak RSS to the current RSS (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(args.warmup + args.repeats):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    out = {"seconds": statistics.median(times), "all_seconds": times, "agreement": agreement}
    if device.type == "cuda":
        out["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["setup_mib"] = None
    else:
        out["peak_mib"] = vm_kib("VmHWM") / 1024
        out["setup_mib"] = setup_rss / 1024
    return out


def run_config(args: argparse.Namespace, impl: str, precision: str, num_proposals: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--impl", impl, "--precision", precision, "--num-proposals",
           str(num_proposals), "--size", str(args.size), "--repeats", str(args.repeats), "--warmup",
           str(args.warmup), "--device", args.device, "--threads", str(args.threads or 0)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to run (default cpu)")
    parser.add_argument("--size", type=int, default=480, help="image side in pixels (default 480)")
    parser.add_argument("--proposals", type=int, nargs="+", default=[2000, 500], help="R values (2000 500)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16"),
                        help="fp32 and/or bf16 autocast")
    parser.add_argument("--repeats", type=int, default=2, help="timed iterations; the median is printed (2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first (1)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=("mlkd", "reference"), help=argparse.SUPPRESS)
    parser.add_argument("--precision", choices=("fp32", "bf16"), help=argparse.SUPPRESS)
    parser.add_argument("--num-proposals", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    where = torch.cuda.get_device_name() if args.device == "cuda" else \
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads"
    print(f"machine: {where}; torch {torch.__version__}, python {platform.python_version()}")
    print(f"VGG16 WSDDN teacher, {NUM_CLASSES} classes, one {args.size}x{args.size} image, SGD step; median of "
          f"{args.repeats} after {args.warmup} warm-up; memory = peak "
          f"{'CUDA allocated' if args.device == 'cuda' else 'RSS of a fresh process (set-up RSS in brackets)'}")
    print(f"{'R':>5} {'precision':>9} {'impl':>9} {'s/iter':>8} {'peak MiB':>16} {'speed-up':>9} {'loss check':>11}")
    for r in args.proposals:
        for precision in args.precisions:
            res = {impl: run_config(args, impl, precision, r) for impl in ("mlkd", "reference")}
            for impl, x in res.items():
                mem = f"{x['peak_mib']:.0f}" + (f" ({x['setup_mib']:.0f})" if x["setup_mib"] else "")
                speedup = f"{res['reference']['seconds'] / x['seconds']:.2f}x" if impl == "mlkd" else ""
                check = f"rel {x['agreement']:.1e}" if x["agreement"] is not None else ""
                print(f"{r:>5} {precision:>9} {impl:>9} {x['seconds']:>8.3f} {mem:>16} {speedup:>9} {check:>11}",
                      flush=True)


if __name__ == "__main__":
    main()
