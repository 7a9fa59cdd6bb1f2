"""`mlkd train-student`, `mlkd evaluate`."""

from __future__ import annotations

import argparse
from pathlib import Path

from mlkd.cli.common import (add_dataset_options, add_device_option, add_precision_options, non_negative_int,
                              parse_options, resolve_device)

TRAIN_DESCRIPTION = """\
Train the student classifier, without distillation (one stage with L_p) or distilling a trained teacher
(distill.teacher): the release's two stages (region features L_f, then predictions L_p + L_p') or one joint
stage. The config's `stages` list sets each stage's epochs, lr and loss weights (mlkd's student_* configs).
The teacher is frozen and never written. The run folder (run.out) receives config.yaml, log.jsonl,
curves.png, last.pt and, with cached soft targets, teacher_targets.pt.

Several GPUs or nodes: torchrun --nproc_per_node N -m mlkd train-student --config ..."""

PLOTS_HELP = ("write charts and an index.html into this folder (created if missing; files of the same names are "
              "replaced): per-class AP bars, precision-recall curves per class, score histograms of positives vs "
              "negatives, label co-occurrence, reliability, and the best and worst images by image AP")


def run_train(args: argparse.Namespace) -> int:
    from mlkd.utils.config import load_config, parse_override
    from mlkd.training.student import StudentConfig, train_student

    cfg = load_config(StudentConfig, args.config, args.set)
    path = train_student(cfg, resume=args.resume, explicit=[".".join(parse_override(s)[0]) for s in args.set])
    print(f"student checkpoint: {path}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from mlkd.evaluation.evaluate import evaluate_student
    from mlkd.metrics import format_table

    report = evaluate_student(args.checkpoint, args.dataset, args.out, parse_options(args.option),
                              resolve_device(args.device), args.workers, not args.quiet, args.scores, args.plots,
                              args.precision, args.calibration)
    print(format_table(report["classification"], per_class=not args.summary))
    index = Path(args.plots) / "index.html" if args.plots else None
    for path, what in ((args.out, "report"), (args.scores, "scores"), (index, "plots")):
        if path:
            print(f"{what} written to {path}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train-student", help="train the student, with or without distillation",
                       description=TRAIN_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  mlkd train-student --config student_demo\n"
                              "  mlkd train-student --config student_demo_kd "
                              "--set distill.teacher=runs/demo/teacher/last.pt")
    t.add_argument("--config", metavar="YAML|NAME",
                   help="config file, or the name of one shipped with mlkd (e.g. student_coco_kd; "
                        "keys: model, data, optim, run, distill, stages)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. optim.lr=1e-4 or distill.top_k=100; repeatable")
    t.add_argument("--resume", action="store_true", help="continue the run in run.out from its last.pt")
    t.set_defaults(func=run_train)

    e = sub.add_parser("evaluate", help="every multi-label metric of a student checkpoint on a dataset",
                       description="Evaluate a student: mAP (mlic, voc07, voc07_devkit, voc07_py, voc_area), "
                                   "CP/CR/CF1/OP/OR/OF1 at 0.5, top-3 variants; classes without positives are "
                                   "excluded and listed. Prints a "
                                   "table; --out writes the JSON report, --scores the (N, K) probabilities.")
    e.add_argument("--checkpoint", required=True, metavar="CKPT", help="student checkpoint (last.pt)")
    add_dataset_options(e)
    e.add_argument("--out", metavar="JSON", help="write the full report here")
    e.add_argument("--scores", metavar="NPY",
                   help="write the probabilities (N, K) as a .npy array to exactly this file (for `mlkd metrics`)")
    e.add_argument("--plots", metavar="DIR", help=PLOTS_HELP)
    e.add_argument("--summary", action="store_true", help="no per-class AP rows in the table")
    e.add_argument("--workers", type=non_negative_int, default=2,
                   help="DataLoader workers (default 2; 0 = load in this process)")
    add_device_option(e)
    add_precision_options(e)
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=run_evaluate)
