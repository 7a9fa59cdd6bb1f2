"""The end-to-end demo on the embedded synthetic dataset (what ``make demo`` runs).

Stages: synthetic data -> selective-search proposals -> teacher (WSDDN) -> student without distillation ->
student with mlkd's default distillation -> student with the release's two-stage distillation (-> optionally
the release's losses in one joint stage) -> evaluation of all on the held-out split -> the paper's
Table-3-style table, the distillation gain of every seed, and the example figure. Everything goes into one
run folder::

    RUN/data/            the dataset (custom format)          RUN/proposals/{train,val}/   LMDB caches
    RUN/seed<S>/teacher, student, student_kd, student_kd_release[, student_joint]/
                         runs (config.yaml, log.jsonl, curves.png, last.pt, kd_report.json)
    RUN/seed<S>/reports/*.json                                 full metric reports
    RUN/figure.png   RUN/summary.json

With ``teacher="oicr"`` the teacher has OICR refinement streams (``teacher_demo_oicr.yaml``) and everything that
depends on it is suffixed: ``teacher_oicr``, ``student_kd_oicr``, ..., ``figure_oicr.png``, ``summary_oicr.json``;
the student without distillation is shared with the WSDDN run in the same folder.

A rerun reuses what is complete (data, proposal caches, finished trainings) and resumes what is not.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from mlkd.data import build_dataset
from mlkd.data.base import read_image
from mlkd.data.images import image_cache
from mlkd.data.synthetic import generate
from mlkd.errors import BadInput, NotFound
from mlkd.evaluation.evaluate import evaluate_student_model, evaluate_teacher_model
from mlkd.evaluation.figures import grid, kd_figure, save_rgb
from mlkd.inference.predict import predict_teacher
from mlkd.metrics import report_to_json
from mlkd.models.build import model_from_checkpoint
from mlkd.proposals.attach import open_split
from mlkd.proposals.generate import generate_proposals
from mlkd.training.student import StudentConfig, train_student
from mlkd.training.teacher import TeacherConfig, train_teacher
from mlkd.utils.checkpoint import load_checkpoint
from mlkd.utils.config import CONFIG_DIR, load_config

logger = logging.getLogger(__name__)

PROPOSALS = ("selective_search", {"mode": "fast", "max_proposals": 200})
IMAGE_CACHE_MB = 256  # decoded images kept in memory: the default 600 images of 160 px take 46 MB
STUDENTS = {"student": ("student_demo.yaml", "student w/o KD"),
            "student_kd": ("student_demo_kd.yaml", "w/ KD (mlkd default)"),
            "student_kd_release": ("student_demo_kd_release.yaml", "w/ KD (release)"),
            "student_joint": ("student_demo_joint.yaml", "w/ KD (release, joint)")}
KD_VARIANTS = ("student_kd", "student_kd_release", "student_joint")
# --teacher: its config, the suffix of everything trained from it (the plain student is shared), its table title, its
# name in the log
TEACHERS = {"wsddn": ("teacher_demo.yaml", "", "teacher T-WDet", "WSDDN"),
            "oicr": ("teacher_demo_oicr.yaml", "_oicr", "teacher + OICR (K=3)", "WSDDN + OICR, K=3")}
COLUMNS = (("mAP", ("mAP", "mlic")), ("CF1", ("all_labels", "CF1")), ("OF1", ("all_labels", "OF1")),
           ("CF1-3", ("top_k_thresholded", "CF1")), ("OF1-3", ("top_k_thresholded", "OF1")))


def _log(msg: str) -> None:
    logger.info(f"[demo] {msg}")


def find_configs(configs: str | Path | None) -> Path:
    """The folder of the demo's YAML configs: ``configs``, or the ones shipped with mlkd."""
    path = Path(configs) if configs else CONFIG_DIR
    if not (path / "teacher_demo.yaml").is_file():
        raise NotFound(f"demo configs (teacher_demo.yaml, student_demo*.yaml) not found in {path}")
    return path


def _finished(out: Path, epochs: int) -> bool:
    """True when ``out/last.pt`` exists and has finished all ``epochs``."""
    if not (out / "last.pt").is_file():
        return False
    state = load_checkpoint(out / "last.pt")["train_state"]
    return state is not None and state["epoch"] + 1 >= epochs


def _train(train: Callable, cfg: Any, epochs: int) -> Path:
    out = Path(cfg.run.out)
    if not _finished(out, epochs):
        train(cfg, resume=(out / "last.pt").is_file())
    return out / "last.pt"


def prepare_data(out: Path, num_images: int, seed: int, image_size: int, workers: int,
                 progress: bool = True, look: str = "shapes") -> dict[str, Path]:
    """The synthetic dataset and its proposal caches (reused when already complete)."""
    meta = out / "data" / "meta.json"
    wanted = {"num_images": num_images, "seed": seed, "image_size": image_size, "look": look}
    found = json.loads(meta.read_text()) if meta.is_file() else {}
    if not all(found.get(k, "shapes" if k == "look" else None) == v for k, v in wanted.items()):
        _log(f"synthetic dataset: {num_images} images of ~{image_size} px (a quarter held out) -> {out / 'data'}")
        generate(out / "data", num_images, seed=seed, image_size=image_size, progress=progress, look=look)
    paths = {"train": out / "data" / "train.jsonl", "val": out / "data" / "val.jsonl"}
    for split in ("train", "val"):
        method, params = PROPOSALS
        _log(f"proposals ({method}, at most {params['max_proposals']} per image) for {split}, {workers} workers")
        report = generate_proposals(build_dataset(str(paths[split])), method, params, out / "proposals" / split,
                                    workers=workers, progress=progress)
        if report.failed:
            raise BadInput(f"proposals failed for {len(report.failed)} images: {sorted(report.failed)[:5]}")
    return paths


def _overrides(out: Path, seed: int, progress: bool) -> list[str]:
    return [f"data.train={out / 'data' / 'train.jsonl'}", f"data.val={out / 'data' / 'val.jsonl'}",
            f"data.train_proposals={out / 'proposals' / 'train'}", f"run.seed={seed}",
            f"run.progress={'true' if progress else 'false'}"]


def run_seed(out: Path, configs: Path, seed: int, joint: bool, progress: bool = True,
             teacher: str = "wsddn", students: Sequence[str] | None = None) -> dict[str, Any]:
    """Train and evaluate the teacher and the students for one seed (``students``: those of :data:`STUDENTS` to
    train, by default all but ``student_joint``, which ``joint`` adds); return their reports. A non-default
    ``teacher`` (:data:`TEACHERS`) trains into ``teacher<suffix>`` and distils ``student_kd<suffix>`` ...; the
    student without distillation does not depend on it and is shared."""
    run = out / f"seed{seed}"
    file, suffix, _, kind = TEACHERS[teacher]
    common = _overrides(out, seed, progress)
    tcfg = load_config(TeacherConfig, configs / file, common + [f"data.val_proposals={out / 'proposals' / 'val'}",
                                                                f"run.out={run / _run_name('teacher', suffix)}"])
    _log(f"seed {seed}: teacher ({kind}, {tcfg.optim.epochs} epochs) -> {tcfg.run.out}")
    teacher_ckpt = _train(train_teacher, tcfg, tcfg.optim.epochs)
    reports: dict[str, Any] = {"teacher": _teacher_reports(tcfg, teacher_ckpt, out)}
    chosen = [n for n in STUDENTS if n != "student_joint" or joint] if students is None else students
    for name in chosen:
        file, title = STUDENTS[name]
        folder = _run_name(name, suffix)
        scfg = load_config(StudentConfig, configs / file,
                           common + [f"run.out={run / folder}", f"distill.teacher={teacher_ckpt}"])
        reports[name] = _student_report(scfg, run / folder, title, seed)
    (run / "reports").mkdir(exist_ok=True)
    for name, report in reports.items():
        (run / "reports" / f"{_run_name(name, suffix)}.json").write_text(report_to_json(report) + "\n")
    return reports


def _run_name(name: str, suffix: str) -> str:
    """The folder (and report) name of a run: the teacher and the distilled students carry the teacher's suffix."""
    return name + suffix if name == "teacher" or name in KD_VARIANTS else name


def _student_report(cfg: StudentConfig, run: Path, title: str, seed: int) -> dict[str, Any]:
    """Train (or reuse) one student and evaluate it on the held-out split; its scores go to ``val_scores.npy``."""
    epochs = sum(s.epochs for s in cfg.stages)
    _log(f"seed {seed}: {title} ({' + '.join(f'{s.name} {s.epochs}' for s in cfg.stages)} epochs) -> {run}")
    ckpt = load_checkpoint(_train(train_student, cfg, epochs), "student")
    report = evaluate_student_model(model_from_checkpoint(ckpt), cfg.data.val, ckpt["classes"],
                                    cfg.model.input_convention, cfg.model.image_size, progress=False)
    np.save(run / "val_scores.npy", report.pop("scores"))
    return report


def _teacher_reports(cfg: TeacherConfig, ckpt_path: Path, out: Path) -> dict[str, Any]:
    """Teacher on val (classification, detection AP) and CorLoc on train (the WSOD protocol)."""
    ckpt = load_checkpoint(ckpt_path, "teacher")
    model = model_from_checkpoint(ckpt)
    kw = dict(scale=cfg.data.test_scale, max_proposals=cfg.data.max_proposals, progress=False)
    val = evaluate_teacher_model(model, cfg.data.val, cfg.data.val_proposals, ckpt["classes"],
                                 ckpt["input_convention"], **kw)
    train = evaluate_teacher_model(model, cfg.data.train, cfg.data.train_proposals, ckpt["classes"],
                                   ckpt["input_convention"], **kw)
    val["corloc_train"], val["corloc_largest_proposal_train"] = train["corloc"], train["corloc_largest_proposal"]
    return val


def _value(report: dict[str, Any], path: tuple[str, str]) -> float:
    return 100 * report["classification"][path[0]][path[1]]


def table(per_seed: list[dict[str, Any]], teacher: str = "wsddn") -> tuple[str, dict[str, Any]]:
    """The Table-3-style text (mean ± std over seeds, in %) and the same numbers as a dict."""
    names = [n for n in ("teacher", *STUDENTS) if n in per_seed[0]]
    titles = {"teacher": TEACHERS[teacher][2], **{k: v[1] for k, v in STUDENTS.items()}}
    stats: dict[str, Any] = {}
    lines = [f"{'model':<24}" + "".join(f"{c:>15}" for c, _ in COLUMNS)]
    for name in names:
        row = {c: [_value(r[name], p) for r in per_seed] for c, p in COLUMNS}
        stats[name] = {c: {"mean": float(np.mean(v)), "std": float(np.std(v)), "per_seed": v} for c, v in row.items()}
        lines.append(f"{titles[name]:<24}" + "".join(_cell(v) for v in row.values()))
    corloc = [100 * r["teacher"]["corloc_train"]["corloc"] for r in per_seed]
    base = [100 * r["teacher"]["corloc_largest_proposal_train"]["corloc"] for r in per_seed]
    det = [100 * r["teacher"]["detection"]["mAP"] for r in per_seed]
    variant = per_seed[0]["teacher"]["detection"]["ap_variant"]
    stats["teacher"].update(corloc_train={"mean": float(np.mean(corloc)), "per_seed": corloc},
                            largest_proposal_corloc_train={"mean": float(np.mean(base)), "per_seed": base},
                            detection_ap_val={"mean": float(np.mean(det)), "per_seed": det, "ap_variant": variant})
    lines += [f"(mAP: AP variant {COLUMNS[0][1][1]}, docs/evaluation.md)", "",
              f"teacher CorLoc (train) {_cell(corloc).strip()}  vs largest-proposal baseline {_cell(base).strip()}"
              f";  detection AP@0.5 (val, {variant}) {_cell(det).strip()}"]
    plain = stats["student"]["mAP"]["per_seed"]
    stats["kd_gain_mAP"] = {}
    lines.append("distillation gain in mAP over the student w/o KD, per seed (mean ± std):")
    for name in (n for n in KD_VARIANTS if n in stats):
        gain = [a - b for a, b in zip(stats[name]["mAP"]["per_seed"], plain)]
        stats["kd_gain_mAP"][name] = {"mean": float(np.mean(gain)), "std": float(np.std(gain)), "per_seed": gain}
        seeds = " ".join(f"{g:+.1f}" for g in gain)
        worse = sum(g < 0 for g in gain)
        lines.append(f"  {titles[name]:<22} {seeds:<24} {_cell(gain).strip()}"
                     + (f"   WORSE than w/o KD for {worse} seed(s)" if worse else ""))
    return "\n".join(lines), stats


def _cell(values: list[float]) -> str:
    return f"{np.mean(values):15.2f}" if len(values) == 1 else f"{np.mean(values):9.2f} ±{np.std(values):4.1f}"


def figure(out: Path, seed: int, num: int = 6, teacher: str = "wsddn") -> Path:
    """The paper's example figure for the first ``num`` held-out images: the teacher's top-10 proposals, the
    students' top-3 labels without and with distillation."""
    run, suffix = out / f"seed{seed}", TEACHERS[teacher][1]
    val = open_split(str(out / "data" / "val.jsonl"), proposals=str(out / "proposals" / "val"))
    ckpt = load_checkpoint(run / f"teacher{suffix}" / "last.pt", "teacher")
    plain, kd = (np.load(run / n / "val_scores.npy") for n in ("student", f"student_kd{suffix}"))
    chosen = np.arange(min(num, len(val)))  # the first held-out images: no picking of flattering examples
    first = val.view(indices=chosen)
    pred = predict_teacher(model_from_checkpoint(ckpt), first, ckpt["input_convention"], torch.device("cpu"),
                           (ckpt["inference"]["image_size"],), max_proposals=ckpt["inference"]["max_proposals"],
                           progress=False)
    figs = [kd_figure(read_image(r.path), pred["proposals"][i], pred["region_scores"][i], plain[j], kd[j], val.classes,
                      r.labels) for i, (r, j) in enumerate(zip(first.records, chosen))]
    return save_rgb(out / f"figure{suffix}.png", grid(figs, 2))


def run_demo(out: str | Path, num_images: int = 600, seed: int = 0, seeds: int = 1, image_size: int = 160,
             workers: int = 2, joint: bool = False, configs: str | Path | None = None,
             progress: bool = True, look: str = "shapes", teacher: str = "wsddn") -> dict[str, Any]:
    """Run every stage into ``out``; write ``out/summary.json`` (``summary_oicr.json`` for ``teacher="oicr"``);
    return the summary (its ``table`` is the text of the results table)."""
    if teacher not in TEACHERS:
        raise BadInput(f"the demo's teacher must be one of {list(TEACHERS)}, got {teacher!r}")
    out, cfg_dir = Path(out), find_configs(configs)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    prepare_data(out, num_images, seed, image_size, workers, progress, look)
    with image_cache(IMAGE_CACHE_MB):  # every run and evaluation of the demo reads the same few hundred images
        per_seed = [run_seed(out, cfg_dir, s, joint, progress, teacher) for s in range(seed, seed + seeds)]
        text, stats = table(per_seed, teacher)
        _log("example figure (teacher's top-10 proposals in green; top-3 labels, blue = correct, red = wrong)")
        fig = figure(out, seed, teacher=teacher)
    suffix = TEACHERS[teacher][1]
    summary = {"table": text, "look": look, "teacher": teacher, "num_images": num_images, "data_seed": seed,
               "seeds": list(range(seed, seed + seeds)), "image_size": image_size, "results": stats,
               "figure": str(fig), "configs": {"teacher": str(cfg_dir / TEACHERS[teacher][0]),
                                               **{name: str(cfg_dir / f) for name, (f, _) in STUDENTS.items()}},
               "seconds": round(time.perf_counter() - t0, 1)}
    (out / f"summary{suffix}.json").write_text(json.dumps(summary, indent=2) + "\n")
    _log(f"done in {summary['seconds']} s: figure {fig}, summary {out / f'summary{suffix}.json'}")
    return summary
