"""Teacher speed: one WSDDN training step of mlkd against the per-region path, and how many RoIs are distinct.

One step = forward + backward + SGD step of the VGG16 WSDDN (``build_teacher``, 20 classes, random weights,
dropout on) on ONE ``size x size`` image with R proposals. The proposals are real ones: fast selective search
on synthetic 500 px images (VOC/COCO-sized), warped to the image like the teacher's input, the first R of
several images' boxes. Each configuration runs in a fresh subprocess, so its peak memory is its own (CPU: the
peak resident set above the set-up; CUDA: ``max_memory_allocated``).

- ``reference``: the per-region path, what a straightforward PyTorch WSDDN costs: one ``roi_pool`` over all R
  boxes, the proposal-score scaling, fc6 and fc7 on all R rows, the two softmaxes, the loss. Written here from
  the model's own layers, independently of mlkd's forward.
  Its backbone is the plain layer stack, its optimizer ``torch.optim.SGD`` as PyTorch builds it by default, its
  process's allocator glibc's default.
- ``mlkd``: what ``mlkd train-teacher`` runs: ``model(images, proposals, scores, labels)`` with its speed-only
  choices timed on this machine and remembered (``mlkd.utils.autotune``: conv1-conv2 channels_last or not,
  ``ConvBackbone``; RoI pooling and fc6's product once per distinct rounded region or per region,
  ``WSDDN.distinct_rois``), mlkd's optimizer (``training.optim.build_optimizer``: fused SGD over Caffe-style
  groups) and the command line's allocator setting (``device.keep_freed_memory``); with ``--freeze``, also fixed
  backbone blocks (``model.freeze``). The first (warm-up) step times the choices the first time they are met.
- ``mlkd distinct only``: the distinct-RoI forward alone (forced), with the reference's layout, optimizer and
  allocator, so that the table shows what each part is worth.

Every ratio is measured for the CPU's own capability (keys ``_native``) and, on a CPU beyond AVX2, again with
PyTorch's and oneDNN's kernels limited to AVX2 (``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``, keys
``_avx2``): speed choices that pay on one class can cost on the other. On an AVX2 CPU both are the same run.

Before timing, both paths' image scores (eval mode) and losses (train mode, same dropout masks) are compared
on the same input; the largest image-score difference is reported. bf16 autocast is timed only where the
hardware has native bf16 (elsewhere it would be ~20x slower: it is reported as skipped, not as a result).

The distinct-RoI fraction (distinct rounded RoIs / all) is reported for selective search and EdgeBoxes at every
training scale of the VGG16 recipes (stride 16) and at the student's 224.

Run: ``python benchmarks/bench_teacher.py [--device cuda] [--proposals 2000 500] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_pool

from _common import (PROPOSAL_METHODS, capability_classes, describe, emit_json, machine, suffixed,
                     synthetic_proposals, timed, warp_boxes)
from mlkd.models.build import build_teacher
from mlkd.models.configs import TeacherModelConfig
from mlkd.models.ops import roi_pool_cells
from mlkd.models.wsddn import P_CLAMP, WSDDN
from mlkd.training.optim import build_optimizer, param_groups
from mlkd.utils.device import keep_freed_memory

NUM_CLASSES = 20
TEACHER_SCALES = (480, 576, 672, 736, 832)
STUDENT_SIZE = 224


def reference_scores(model: WSDDN, images: torch.Tensor, boxes: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Image scores ``(K,)`` of one image, every region computed on its own row."""
    fmap = model.backbone.features(images)  # the plain stack, one layout
    rois = torch.cat([boxes.new_zeros(len(boxes), 1), boxes], 1).float()
    pooled = roi_pool(fmap.float(), rois, model.roi_size, 1.0 / model.backbone.stride).to(fmap.dtype)
    x = (pooled * (model.score_scale * scores + model.score_bias)[:, None, None, None].to(fmap.dtype)).flatten(1)
    phi = model.drop(F.relu(model.fc7(model.drop(F.relu(model.fc6(x))))))
    s_cls = F.softmax(model.fc8_c(phi).float() / model.cls_temperature, dim=1)  # over classes
    s_det = F.softmax(model.fc8_d(phi).float() / model.det_temperature, dim=0)  # over the regions
    return (s_cls * s_det).sum(0)


def reference_loss(model: WSDDN, images, boxes, scores, labels) -> torch.Tensor:
    p = reference_scores(model, images, boxes, scores).clamp(P_CLAMP, 1 - P_CLAMP)
    y = labels[0]
    return -(torch.where(y == 1, p.log(), (1 - p).log()) * (y >= 0)).sum()


def setup(size: int, boxes: np.ndarray, device: torch.device, freeze: tuple[str, ...] = ()):
    torch.manual_seed(0)
    model = build_teacher(TeacherModelConfig(backbone="vgg16", freeze=freeze), NUM_CLASSES).to(device).train()
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(1, 3, size, size, generator=gen).to(device)
    b = torch.from_numpy(boxes).to(device)
    s = torch.rand(len(boxes), generator=gen).to(device)
    labels = torch.zeros(1, NUM_CLASSES)
    labels[0, [3, 11]] = 1
    labels[0, 7] = -1  # an ignored class
    return model, (images, b, s, labels.to(device))


def loss_of(impl: str, model: WSDDN, inputs) -> torch.Tensor:
    images, boxes, scores, labels = inputs
    if impl != "reference":
        return sum(model(images, [boxes], [scores], labels).values())
    return reference_loss(model, images, boxes, scores, labels)


def agreement(size: int, boxes: np.ndarray, device: torch.device, amp: bool) -> dict:
    """Image scores of mlkd (autocast bf16 when ``amp``) against the float32 reference, and the losses."""
    model, inputs = setup(size, boxes, device)
    images, b, s, labels = inputs
    with torch.no_grad():
        model.eval()
        ref = reference_scores(model, images, b, s)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            new = model(images, [b], [s])[0]["image_scores"].float()
        model.train()
        losses = []
        for impl in ("mlkd", "reference"):
            torch.manual_seed(2)  # the same dropout masks
            losses.append(float(loss_of(impl, model, inputs)))
    return {"max_abs_diff_image_scores": float((new - ref).abs().max()),
            "loss_rel_diff": abs(losses[0] - losses[1]) / abs(losses[1])}


def vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def worker(args: argparse.Namespace) -> dict:
    """Time one configuration in this (fresh) process."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    freeze = tuple(args.freeze) if args.impl == "mlkd" else ()
    model, inputs = setup(args.size, np.load(args.boxes), device, freeze)
    if args.impl == "mlkd":  # as `mlkd train-teacher` runs it
        keep_freed_memory()
        optimizer = build_optimizer(param_groups(model, 1e-6, 5e-4), "sgd", 1e-6, 0.9)
    else:
        model.backbone.layout_switch = None  # one layout throughout (the reference reads .features anyway)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-6, momentum=0.9,
                                    weight_decay=5e-4)
    on = args.precision == "bf16"

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on):
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
    seconds = timed(step, args.repeats, device, args.warmup)
    if device.type == "cuda":
        return {"seconds": seconds, "peak_mib": torch.cuda.max_memory_allocated(device) / 2**20, "setup_mib": None}
    return {"seconds": seconds, "peak_mib": vm_kib("VmHWM") / 1024, "setup_mib": setup_rss / 1024}


def run_config(args: argparse.Namespace, impl: str, precision: str, boxes_file: Path, freeze: list[str],
               env: dict[str, str]) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--impl", impl, "--precision", precision, "--boxes",
           str(boxes_file), "--size", str(args.size), "--repeats", str(args.repeats), "--warmup", str(args.warmup),
           "--device", args.device, "--threads", str(args.threads or 0), "--freeze", *freeze]
    if impl != "mlkd":  # the reference and "distinct only" take no timed choice: the distinct path, forced
        env = {**env, "MLKD_AUTOTUNE": "0"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def distinct_fractions(images: int) -> dict[str, dict[str, float]]:
    """Per method and scale: distinct rounded RoIs / all RoIs, pooled over ``images`` synthetic images."""
    out: dict[str, dict[str, float]] = {}
    for method in PROPOSAL_METHODS:
        sets = synthetic_proposals(images, method, seed=1)
        out[method] = {"boxes_per_image": float(np.mean([len(b) for b, _ in sets]))}
        for side in (*TEACHER_SCALES, STUDENT_SIZE):
            distinct = total = 0
            for boxes, hw in sets:
                cells = roi_pool_cells(warp_boxes(boxes, hw, side), torch.zeros(len(boxes), dtype=torch.int64), 16)
                distinct, total = distinct + len(torch.unique(cells, dim=0)), total + len(boxes)
            out[method][str(side)] = distinct / total
    return out


def step_boxes(r: int, size: int) -> np.ndarray:
    """The first ``r`` fast selective-search boxes of synthetic images (in order), warped to ``size``."""
    parts, n, seed = [], 0, 0
    while n < r:
        for boxes, hw in synthetic_proposals(2, "selective_search", seed=100 + seed):
            parts.append(warp_boxes(boxes, hw, size).numpy())
            n += len(boxes)
        seed += 1
    return np.concatenate(parts)[:r]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to run (default cpu)")
    parser.add_argument("--size", type=int, default=480, help="image side in pixels (default 480)")
    parser.add_argument("--proposals", type=int, nargs="+", default=[2000, 500], help="R values (2000 500)")
    parser.add_argument("--freeze", nargs="*", default=[], help="also time mlkd with these blocks frozen "
                        "(e.g. conv1 conv2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed iterations; the median is reported (3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first (1)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--fraction-images", type=int, default=8, help="images for the distinct fractions (8)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object (last line)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=("mlkd", "mlkd-distinct", "reference"), help=argparse.SUPPRESS)
    parser.add_argument("--precision", choices=("fp32", "bf16"), help=argparse.SUPPRESS)
    parser.add_argument("--boxes", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "cuda" and not args.worker and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    return args


def time_proposals(args: argparse.Namespace, r: int, device: torch.device, fast16: bool, figures: dict,
                   tmp: Path, env: dict[str, str]) -> None:
    """Every path's step at ``r`` proposals per image, printed as a table row each and added to ``figures``."""
    boxes = step_boxes(r, args.size)
    boxes_file = tmp / f"boxes{r}.npy"
    np.save(boxes_file, boxes)
    cells = roi_pool_cells(torch.from_numpy(boxes), torch.zeros(r, dtype=torch.int64), 16)
    distinct = len(torch.unique(cells, dim=0)) / r
    check = agreement(args.size, boxes, device, amp=False)
    if not check["loss_rel_diff"] < 1e-4:
        raise AssertionError(f"mlkd and reference losses differ (relative {check['loss_rel_diff']:.1e})")
    figures[f"max_abs_diff_image_scores_r{r}"] = check["max_abs_diff_image_scores"]
    cases = [("reference", "fp32", []), ("mlkd-distinct", "fp32", []), ("mlkd", "fp32", [])]
    if args.freeze:
        cases.append(("mlkd", "fp32", args.freeze))
    if fast16:
        cases.append(("mlkd", "bf16", []))
        figures[f"bf16_max_abs_diff_image_scores_r{r}"] = agreement(args.size, boxes, device, True)[
            "max_abs_diff_image_scores"]
    base = None
    for impl, precision, freeze in cases:
        x = run_config(args, impl, precision, boxes_file, freeze, env)
        base = base or x["seconds"]
        ratio = x["seconds"] / base
        label = {"mlkd-distinct": "mlkd distinct only"}.get(impl, impl) + f" {precision}" + \
            (f" freeze {'+'.join(freeze)}" if freeze else "")
        mem = f"{x['peak_mib']:.0f}" + (f" ({x['setup_mib']:.0f})" if x["setup_mib"] else "")
        print(f"{r:>5} {distinct:>8.2f} {label:>28} {x['seconds']:>8.3f} {mem:>14} {ratio:>6.2f}x", flush=True)
        if impl == "mlkd":
            figures[f"step_ratio_{precision}_r{r}" + ("_freeze" if freeze else "")] = ratio
        elif impl == "mlkd-distinct":
            figures[f"step_ratio_distinct_only_r{r}"] = ratio
    figures[f"distinct_fraction_r{r}"] = distinct
    if not fast16:
        print(f"{r:>5}          mlkd bf16: skipped, no native bf16 on this CPU")


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    device = torch.device(args.device)
    figures = machine(device)
    print(describe(figures))
    fractions = distinct_fractions(args.fraction_images)
    figures["distinct_roi_fraction"] = fractions
    print("distinct RoIs after rounding to stride-16 cells (fraction of all boxes), per method and image side:")
    for method, row in fractions.items():
        cells = " ".join(f"{k}:{v:.2f}" for k, v in row.items() if k != "boxes_per_image")
        print(f"  {method:<17} {row['boxes_per_image']:.0f} boxes/image  {cells}")
    print(f"VGG16 WSDDN step, one {args.size}x{args.size} image, {NUM_CLASSES} classes, SGD; median of "
          f"{args.repeats} after {args.warmup} warm-up; time ratio to the float32 per-region reference")
    print(f"{'R':>5} {'distinct':>8} {'path':>28} {'s/step':>8} {'peak MiB':>14} {'ratio':>7}")
    ratios = [f"step_ratio_{p}_r{r}" for r in args.proposals for p in ("fp32", "distinct_only", "bf16")]
    with tempfile.TemporaryDirectory() as tmp:
        for name, env in capability_classes():
            emulated = " ".join(f"{k}={v}" for k, v in env.items())
            print(f"-- {name}: {f'AVX2, emulated with {emulated}' if env else torch.backends.cpu.get_cpu_capability()}")
            for r in args.proposals:
                time_proposals(args, r, device, figures["native_bf16"] and not env, figures, Path(tmp), env)
            suffixed(figures, name, ratios + [f"step_ratio_fp32_r{r}_freeze" for r in args.proposals])
    if len(capability_classes()) == 1:  # an AVX2 CPU: its native figures are the AVX2 ones
        suffixed(figures, "avx2", [k[:-len("_native")] for k in list(figures) if k.endswith("_native")])
        figures["avx2_is_native"] = True
    figures["max_abs_diff_image_scores"] = max(v for k, v in figures.items()
                                               if k.startswith("max_abs_diff_image_scores_r"))
    print(f"largest |image score difference| to the reference, float32: {figures['max_abs_diff_image_scores']:.1e}"
          + "".join(f"; bf16 R={r}: {figures[f'bf16_max_abs_diff_image_scores_r{r}']:.1e}"
                    for r in args.proposals if f"bf16_max_abs_diff_image_scores_r{r}" in figures))
    if args.json:
        emit_json(figures)


if __name__ == "__main__":
    main()
