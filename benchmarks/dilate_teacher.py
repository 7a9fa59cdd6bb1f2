"""What OICR's dilated conv5 (``model.dilate_last_block``) buys on the demo: the refined teacher of
``teacher_demo_oicr`` with its last block dilated (stride 8 -> 4 on the tiny backbone) against the same teacher
undilated, and the default-recipe student distilled from each, per synthetic look and training seed, same data
and epochs.

    python benchmarks/dilate_teacher.py --out runs/refine [--looks shapes badges] [--seeds 3] [--json FILE]

Run it on the folder of ``benchmarks/refine_teacher.py`` (same ``--out``): the undilated teacher and its student
are that script's ``teacher_oicr`` / ``student_kd_oicr`` (trained here if missing); the dilated ones go to
``seed<S>/teacher_oicr_dilated`` / ``student_kd_oicr_dilated``. A rerun reuses finished trainings and resumes an
interrupted one. Prints a Markdown table per look (per seed, then mean ± std) and the machine.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from refine_teacher import cell, numbers, run
from mlkd.data.images import image_cache
from mlkd.demo import IMAGE_CACHE_MB, _overrides, _student_report, _teacher_reports, _train, prepare_data, run_seed
from mlkd.training.student import StudentConfig
from mlkd.training.teacher import TeacherConfig, train_teacher
from mlkd.utils.config import CONFIG_DIR, load_config

ROWS = (("teacher_oicr", "student_kd_oicr", "OICR, conv5 as the release"),
        ("teacher_oicr_dilated", "student_kd_oicr_dilated", "OICR, last block dilated"))


def dilated_variant(out: Path, seed: int, progress: bool) -> dict[str, Any]:
    """Train (or reuse) the dilated refined teacher and a default-KD student from it; their reports."""
    folder, common = out / f"seed{seed}", _overrides(out, seed, progress)
    tcfg = load_config(TeacherConfig, CONFIG_DIR / "teacher_demo_oicr.yaml",
                       common + [f"data.val_proposals={out / 'proposals' / 'val'}", "model.dilate_last_block=true",
                                 f"run.out={folder / 'teacher_oicr_dilated'}"])
    t0 = time.perf_counter()
    ckpt = _train(train_teacher, tcfg, tcfg.optim.epochs)
    seconds = time.perf_counter() - t0
    reports = {"teacher": _teacher_reports(tcfg, ckpt, out), "teacher_seconds": seconds}
    scfg = load_config(StudentConfig, CONFIG_DIR / "student_demo_kd.yaml",
                       common + [f"run.out={folder / 'student_kd_oicr_dilated'}", f"distill.teacher={ckpt}"])
    reports["student_kd"] = _student_report(scfg, folder / "student_kd_oicr_dilated", "KD from OICR (dilated)", seed)
    return reports


def measure_look(out: Path, look: str, seeds: int, progress: bool) -> list[dict[str, Any]]:
    prepare_data(out, 600, 0, 160, 2, progress, look)
    per_seed = []
    with image_cache(IMAGE_CACHE_MB):
        for seed in range(seeds):
            plain = run_seed(out, CONFIG_DIR, seed, False, progress, "wsddn", ("student",))
            oicr = run_seed(out, CONFIG_DIR, seed, False, progress, "oicr", ("student_kd",))
            dilated = dilated_variant(out, seed, progress)
            per_seed.append({
                "seed": seed, "dilated_teacher_seconds": round(dilated["teacher_seconds"], 1),
                "teacher_oicr": numbers(oicr["teacher"]), "teacher_oicr_dilated": numbers(dilated["teacher"]),
                "student": 100 * plain["student"]["classification"]["mAP"]["mlic"],
                "student_kd_oicr": 100 * oicr["student_kd"]["classification"]["mAP"]["mlic"],
                "student_kd_oicr_dilated": 100 * dilated["student_kd"]["classification"]["mAP"]["mlic"]})
            print(json.dumps({"look": look, **per_seed[-1]}), flush=True)
    return per_seed


def markdown(look: str, per_seed: list[dict[str, Any]]) -> str:
    seeds = " / ".join(str(r["seed"]) for r in per_seed)
    lines = [f"**{look}** (seeds {seeds}; per seed, then mean ± std)", "",
             "| teacher | held-out mAP | CorLoc (train) | det AP@0.5 (held-out) | KD student mAP | gain over w/o KD |",
             "|---|---|---|---|---|---|"]
    for teacher, student, title in ROWS:
        cols = [[r[teacher][m] for r in per_seed] for m in ("mAP", "CorLoc", "detAP")]
        cols += [[r[student] for r in per_seed], [r[student] - r["student"] for r in per_seed]]
        fmt = ["{:.1f}"] * 4 + ["{:+.1f}"]
        lines.append(f"| {title} | " + " | ".join(f"{' / '.join(f.format(v) for v in col)} ({cell(col)})"
                                                    for f, col in zip(fmt, cols)) + " |")
    return "\n".join(lines)


def main() -> None:
    run(__doc__, measure_look, markdown)


if __name__ == "__main__":
    main()
