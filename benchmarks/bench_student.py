"""Student speed: inference in every precision mlkd offers (and the ones it measured and did not), and the
training cost of distillation.

1. Inference, VGG16 student at 224 x 224 (random weights; speed does not depend on them): images/s at batch 32
   and latency at batch 1 of torchvision's VGG16 (eager, float32: the baseline), then the mlkd student as
   `--precision fp32` runs it (the faster memory layout, channels_last for VGG16), `bf16` (autocast, only where
   the CPU has native bf16), `int8` (onnxruntime static quantisation, calibrated on random images here: speed does not depend on
   them), and, for comparison, eager float32 in the default layout, torch.compile and onnxruntime float32.
2. With ``--demo DIR`` (a finished `mlkd demo` run folder): the held-out mAP of that demo's distilled student
   (seed 0) in each offered precision (int8 calibrated on the demo's training images), its speed, and the drop
   against float32: ``map_drop`` is that of the fastest offered precision on the VGG16 student.
3. Training, seconds per step of one student batch with realistic proposals (fast selective search on
   synthetic 500 px images, warped to the teacher's 672 and the student's 224, 500 per image): plain (L_p),
   stage 1 (L_f) reading the teacher's cached region features, the default joint stage (L_p + L_p' + L_f, all
   from caches), and stage 1 running the VGG16 teacher on the fly (what the cache saves).

Run: ``python benchmarks/bench_student.py [--device cuda] [--demo runs/demo] [--json]``.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
import torchvision

from _common import describe, emit_json, machine, synthetic_proposals, timed, warp_boxes
from mlkd.distill.config import TeacherPlan
from mlkd.distill.objective import StudentObjective
from mlkd.inference.runtime import StudentRuntime
from mlkd.models.build import build_student, build_teacher
from mlkd.models.configs import StudentModelConfig, TeacherModelConfig

K = 80


def inference(device: torch.device, batch: int, repeats: int, compile_: bool) -> dict:
    """images/s at ``batch`` and seconds at batch 1 of each way of running the VGG16 student."""
    torch.manual_seed(0)
    student = build_student(StudentModelConfig(), K).eval()
    x, x1 = torch.randn(batch, 3, 224, 224), torch.randn(1, 3, 224, 224)
    calibration = [torch.randn(8, 3, 224, 224).numpy() for _ in range(2)]
    fast16 = machine(device)["native_bf16"]
    cases = {"torchvision vgg16, eager fp32 (baseline)": lambda: torchvision.models.vgg16().eval().to(device),
             "mlkd eager fp32 (default layout)": lambda: copy.deepcopy(student).to(device),
             "mlkd --precision fp32": lambda: StudentRuntime(copy.deepcopy(student), "fp32", device, 224)}
    if fast16:
        cases["mlkd --precision bf16"] = lambda: StudentRuntime(copy.deepcopy(student), "bf16", device, 224)
    if compile_:
        cases["torch.compile fp32 (not offered)"] = lambda: torch.compile(copy.deepcopy(student).to(device))
    if device.type == "cpu":
        cases["onnxruntime fp32 (not offered)"] = lambda: _ort_fp32(student)
        cases["mlkd --precision int8 (onnxruntime)"] = lambda: StudentRuntime(copy.deepcopy(student), "int8", device,
                                                                             224, iter(calibration))
    rows = {}
    for name, make in cases.items():
        run = make()
        with torch.no_grad():
            sec = timed(lambda: run(x.to(device)), repeats, device)
            sec1 = timed(lambda: run(x1.to(device)), max(repeats, 5), device)
        rows[name] = {"images_per_s": batch / sec, "batch1_ms": 1000 * sec1}
        base = rows[next(iter(rows))]["images_per_s"]
        print(f"  {name:<42} {batch / sec:8.1f} images/s  ({batch / sec / base:.2f}x)   batch 1: {1000 * sec1:7.1f} ms",
              flush=True)
    if not fast16:
        print("  mlkd --precision bf16: skipped, no native bf16 on this machine (it would be ~20x slower)")
    return rows


def _ort_fp32(student: torch.nn.Module):
    from mlkd.export.onnx import export_onnx
    from mlkd.export.quantize import deploy_model, session

    tmp = Path(tempfile.mkdtemp(prefix="bench_ort_"))
    export_onnx(deploy_model(copy.deepcopy(student), 224), tmp / "s.onnx", 224)
    sess = session(tmp / "s.onnx", torch.get_num_threads())
    return lambda images: sess.run(["logits"], {"images": images.numpy()})[0]


def demo_maps(demo: Path) -> dict:
    """Held-out mAP and speed of the demo's distilled student (seed 0) in each offered precision."""
    from mlkd.utils.checkpoint import load_checkpoint
    from mlkd.evaluation.evaluate import evaluate_student

    ckpt_path = demo / "seed0" / "student_kd" / "last.pt"
    ckpt = load_checkpoint(ckpt_path, "student")
    spec = str(demo / "data" / "val.jsonl")
    precisions = ["fp32", "int8"] + (["bf16"] if machine(torch.device("cpu"))["native_bf16"] else [])
    out = {}
    for p in precisions:
        report = evaluate_student(str(ckpt_path), spec, precision=p, progress=False,
                                  calibration=str(demo / "data" / "train.jsonl") if p == "int8" else None)
        out[p] = 100 * report["classification"]["mAP"]["mlic"]
    size = ckpt["inference"]["image_size"]
    x = torch.randn(32, 3, size, size)
    calibration = [torch.randn(8, 3, size, size).numpy()]
    speed = {}
    for p in precisions:
        from mlkd.models.build import model_from_checkpoint

        run = StudentRuntime(model_from_checkpoint(ckpt), p, "cpu", size, iter(calibration) if p == "int8" else None)
        speed[p] = 32 / timed(lambda: run(x), 5, torch.device("cpu"))
    eager = model_from_checkpoint(ckpt).eval()
    with torch.no_grad():
        speed["eager fp32"] = 32 / timed(lambda: eager(x), 5, torch.device("cpu"))
    for p in precisions:
        print(f"  demo student ({size} px), --precision {p:<5} held-out mAP {out[p]:6.2f} (drop "
              f"{out['fp32'] - out[p]:+.2f})   {speed[p]:8.1f} images/s ({speed[p] / speed['eager fp32']:.2f}x eager)")
    return {"map": out, "images_per_s": speed}


def training(device: torch.device, batch: int, proposals: int, repeats: int) -> dict:
    """Seconds per training step of the plain student, stage 1 and the joint stage (caches), stage 1 on the fly."""
    torch.manual_seed(0)
    student = build_student(StudentModelConfig(), K).to(device)
    teacher = build_teacher(TeacherModelConfig(), K).to(device)
    sets = synthetic_proposals(batch, "selective_search", seed=7)
    t_boxes = [warp_boxes(b, hw, 672)[:proposals] for b, hw in sets]
    s_boxes = [warp_boxes(b, hw, 224)[:proposals] for b, hw in sets]
    counts = [len(b) for b in t_boxes]
    gen = torch.Generator().manual_seed(0)
    d = device
    labels = (torch.rand(batch, K, generator=gen) < 0.05).float().to(d)
    images = torch.randn(batch, 3, 224, 224).to(d)
    regions = {"proposals": [b.to(d) for b in t_boxes], "student_proposals": [b.to(d) for b in s_boxes],
               "proposal_scores": [torch.rand(n, generator=gen).to(d) for n in counts]}
    cached = {"teacher_features": ({"fc7": torch.rand(sum(counts), 4096, generator=gen).to(d)},
                                   torch.arange(sum(counts), device=d)),
              "teacher_probs": torch.rand(batch, K, generator=gen).to(d)}
    cases = {
        "plain student (L_p)": (StudentObjective(student, None), {}),
        "stage 1 (L_f), cached teacher features": (StudentObjective(student, teacher, 0, 0, 1,
                                                                    plan=TeacherPlan(features="cached")),
                                                   {**regions, "teacher_features": cached["teacher_features"]}),
        "joint (L_p + L_p' + L_f), all cached": (StudentObjective(student, teacher, 1, 1, 1, feature_norm="relative",
                                                                  plan=TeacherPlan("cached", "cached")),
                                                {**regions, **cached}),
        "stage 1 (L_f), teacher on the fly": (StudentObjective(student, teacher, 0, 0, 1),
                                              {**regions, "teacher_images": torch.randn(batch, 3, 672, 672).to(d)}),
    }
    rows, base = {}, None
    for name, (model, extra) in cases.items():
        model.to(device).train()
        inputs = {"images": images, "labels": labels, **extra}
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-6, momentum=0.9)

        def step():
            loss = sum(model(**inputs).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
        sec = timed(step, repeats, device)
        base = base or sec
        rows[name] = sec
        print(f"  {name:<42} {sec:8.3f} s/step  ({sec / base:.2f}x the plain step)", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--batch", type=int, default=32, help="inference batch (default 32)")
    parser.add_argument("--train-batch", type=int, default=2, help="training batch (default 2: CPU-sized)")
    parser.add_argument("--proposals", type=int, default=500, help="proposals per image (default 500)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--demo", type=Path, help="a finished `mlkd demo` folder: mAP of each precision")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (its compilation is slow)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object (last line)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    figures = machine(device)
    print(describe(figures))
    print(f"inference, VGG16 student at 224, batch {args.batch} (and batch 1), {K} classes:")
    rows = inference(device, args.batch, args.repeats, not args.no_compile)
    base = rows["torchvision vgg16, eager fp32 (baseline)"]["images_per_s"]
    offered = {name.split("--precision ")[1].split()[0]: r for name, r in rows.items() if "--precision" in name}
    best = max(offered, key=lambda p: offered[p]["images_per_s"])
    figures["inference"] = rows
    figures["inference_ratio"] = offered[best]["images_per_s"] / base
    figures["inference_precision"] = best
    if args.demo:
        print(f"the demo's distilled student ({args.demo}), held-out split:")
        demo = demo_maps(args.demo)
        figures["demo"] = demo
        figures["map_drop"] = demo["map"]["fp32"] - demo["map"][best]
    print(f"training step, batch {args.train_batch}, {args.proposals} selective-search proposals per image:")
    steps = training(device, args.train_batch, args.proposals, args.repeats)
    figures["training"] = steps
    figures["stage1_step_ratio"] = steps["stage 1 (L_f), cached teacher features"] / steps["plain student (L_p)"]
    figures["joint_step_ratio"] = steps["joint (L_p + L_p' + L_f), all cached"] / steps["plain student (L_p)"]
    print(f"fastest offered precision: {best}, {figures['inference_ratio']:.2f}x torchvision eager float32 at batch "
          f"{args.batch}" + (f"; its mAP drop on the demo: {figures['map_drop']:+.2f}" if args.demo else ""))
    if args.json:
        emit_json(figures)


if __name__ == "__main__":
    main()
