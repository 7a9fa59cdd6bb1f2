"""What OICR refinement buys on the demo: the WSDDN teacher against the refined teacher (held-out mAP, CorLoc on
the training split, VOC07 detection AP@0.5 on the held-out split) and the default-recipe student distilled from
each, per synthetic look and training seed, same data and epochs. A refined teacher is measured with both kinds
of image scores (WSDDN's, its default; its refined ones): the second is the same weights with
``model.image_scores: refined``, evaluated and distilled from again.

    python benchmarks/refine_teacher.py --out runs/refine [--looks shapes badges] [--seeds 3] [--json FILE]

Each look is a demo run folder (``OUT/<look>``): a rerun reuses every finished training and resumes an interrupted
one, so the script can be stopped and started again. ``seed<S>/teacher`` and ``student*`` are what ``mlkd demo``
trains; ``teacher_oicr``, ``student_kd_oicr`` what ``mlkd demo --teacher oicr`` trains;
``teacher_oicr_refined``/``student_kd_oicr_refined`` the image-score variant. Prints a Markdown table per look
(mean ± std over seeds) and the machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from _common import describe, machine
from mlkd.data.images import image_cache
from mlkd.demo import IMAGE_CACHE_MB, _overrides, _student_report, _teacher_reports, prepare_data, run_seed
from mlkd.training.student import StudentConfig
from mlkd.training.teacher import TeacherConfig
from mlkd.utils.checkpoint import load_checkpoint, save_checkpoint
from mlkd.utils.config import CONFIG_DIR, load_config

ROWS = (("teacher", "WSDDN"), ("teacher_oicr", "OICR, WSDDN image scores"),
        ("teacher_oicr_refined", "OICR, refined image scores"))
STUDENT_ROWS = (("student", "w/o KD"), ("student_kd", "KD from WSDDN"), ("student_kd_oicr", "KD from OICR"),
                ("student_kd_oicr_refined", "KD from OICR, refined image scores"))


def refined_variant(run: Path, seed: int, out: Path, progress: bool) -> dict[str, Any]:
    """The OICR teacher's weights with refined image scores: its reports and a default-KD student from it."""
    source = run / "teacher_oicr" / "last.pt"
    target = run / "teacher_oicr_refined" / "last.pt"
    if not target.is_file():
        ckpt = load_checkpoint(source, "teacher")
        ckpt["model_config"] = {**ckpt["model_config"], "image_scores": "refined"}
        ckpt["config"]["model"]["image_scores"] = "refined"
        save_checkpoint(target, ckpt)
    tcfg = load_config(TeacherConfig, CONFIG_DIR / "teacher_demo_oicr.yaml",
                       _overrides(out, seed, progress) + [f"data.val_proposals={out / 'proposals' / 'val'}",
                                                          "model.image_scores=refined"])
    reports = {"teacher": _teacher_reports(tcfg, target, out)}
    scfg = load_config(StudentConfig, CONFIG_DIR / "student_demo_kd.yaml",
                       _overrides(out, seed, progress) + [f"run.out={run / 'student_kd_oicr_refined'}",
                                                          f"distill.teacher={target}"])
    reports["student_kd"] = _student_report(scfg, run / "student_kd_oicr_refined", "KD from OICR (refined)", seed)
    return reports


def numbers(teacher: dict[str, Any]) -> dict[str, float]:
    return {"mAP": 100 * teacher["classification"]["mAP"]["mlic"], "CorLoc": 100 * teacher["corloc_train"]["corloc"],
            "detAP": 100 * teacher["detection"]["mAP"]}


def measure_look(out: Path, look: str, seeds: int, progress: bool) -> list[dict[str, Any]]:
    prepare_data(out, 600, 0, 160, 2, progress, look)
    per_seed = []
    with image_cache(IMAGE_CACHE_MB):
        for seed in range(seeds):
            t0 = time.perf_counter()
            plain = run_seed(out, CONFIG_DIR, seed, False, progress, "wsddn", ("student", "student_kd"))
            oicr = run_seed(out, CONFIG_DIR, seed, False, progress, "oicr", ("student_kd",))
            refined = refined_variant(out / f"seed{seed}", seed, out, progress)
            per_seed.append({
                "seed": seed, "seconds": round(time.perf_counter() - t0, 1),
                "teacher": numbers(plain["teacher"]), "teacher_oicr": numbers(oicr["teacher"]),
                "teacher_oicr_refined": numbers(refined["teacher"]),
                "student": 100 * plain["student"]["classification"]["mAP"]["mlic"],
                "student_kd": 100 * plain["student_kd"]["classification"]["mAP"]["mlic"],
                "student_kd_oicr": 100 * oicr["student_kd"]["classification"]["mAP"]["mlic"],
                "student_kd_oicr_refined": 100 * refined["student_kd"]["classification"]["mAP"]["mlic"]})
            print(json.dumps({"look": look, **per_seed[-1]}), flush=True)
    return per_seed


def cell(values: list[float]) -> str:
    return f"{np.mean(values):.1f} ± {np.std(values):.1f}"


def markdown(look: str, per_seed: list[dict[str, Any]]) -> str:
    seeds = " / ".join(str(r["seed"]) for r in per_seed)
    lines = [f"**{look}** (seeds {seeds}; per seed, then mean ± std)", "",
             "| teacher | held-out mAP | CorLoc (train) | det AP@0.5 (held-out) |", "|---|---|---|---|"]
    for key, title in ROWS:
        row = [[r[key][m] for r in per_seed] for m in ("mAP", "CorLoc", "detAP")]
        lines.append(f"| {title} | " + " | ".join(f"{' / '.join(f'{v:.1f}' for v in col)} ({cell(col)})"
                                                    for col in row) + " |")
    lines += ["", "| student (default recipe) | held-out mAP | gain over w/o KD |", "|---|---|---|"]
    for key, title in STUDENT_ROWS:
        col = [r[key] for r in per_seed]
        gain = [r[key] - r["student"] for r in per_seed]
        lines.append(f"| {title} | {' / '.join(f'{v:.1f}' for v in col)} ({cell(col)}) | "
                     + ("" if key == "student" else f"{' / '.join(f'{g:+.1f}' for g in gain)} ({cell(gain)})") + " |")
    return "\n".join(lines)


def run(doc: str, measure: Callable[[Path, str, int, bool], list[dict[str, Any]]],
        table: Callable[[str, list[dict[str, Any]]], str]) -> None:
    """The command line of a demo comparison (this one, ``dilate_teacher.py``): ``measure`` each look into its
    folder, print ``table`` of each with the machine, and write the numbers with ``--json``."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/refine")
    p.add_argument("--looks", nargs="+", choices=("shapes", "badges"), default=["shapes", "badges"])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--json", help="also write every number and the machine to this file")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    info = machine(torch.device("cpu"))
    results = {look: measure(Path(args.out) / look, look, args.seeds, not args.quiet) for look in args.looks}
    print("\n" + describe(info) + "\n")
    for look, per_seed in results.items():
        print(table(look, per_seed) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "results": results}, indent=2) + "\n")


def main() -> None:
    run(__doc__, measure_look, markdown)


if __name__ == "__main__":
    main()
