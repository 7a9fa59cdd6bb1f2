"""`mlkd train-teacher`, `mlkd evaluate-teacher`, `mlkd visualize-teacher`."""

from __future__ import annotations

import argparse
from pathlib import Path

from mlkd.cli.common import (add_dataset_options, add_device_option, non_negative_int, parse_options, positive_int,
                             resolve_device)

# the VOC rules among mlkd.metrics.AP_MODES (mlic is a classification protocol)
DETECTION_AP_MODES = ("voc07", "voc07_devkit", "voc07_py", "voc_area")

TRAIN_DESCRIPTION = """\
Train the WSDDN teacher from image-level labels over cached proposals (docs/method.md). The config file holds
every knob (mlkd ships teacher_voc07, teacher_coco, teacher_coco_r50c4 (ResNet-50 C4), teacher_nuswide,
teacher_wsddn_voc07, teacher_voc07_oicr and teacher_coco_oicr (OICR refinement, model.refine: 3), teacher_demo,
teacher_demo_oicr: give the name or a file); --set overrides single keys. The run folder
(run.out) receives config.yaml, log.jsonl, curves.png and last.pt (written atomically after every epoch).

Several GPUs or nodes: launch the same command with torchrun, e.g.
  torchrun --nproc_per_node 8 -m mlkd train-teacher --config teacher_coco
(NCCL on GPUs, gloo on CPU; rank 0 writes logs and checkpoints)."""


def run_train(args: argparse.Namespace) -> int:
    from mlkd.utils.config import load_config, parse_override
    from mlkd.training.teacher import TeacherConfig, train_teacher

    cfg = load_config(TeacherConfig, args.config, args.set)
    path = train_teacher(cfg, resume=args.resume, explicit=[".".join(parse_override(s)[0]) for s in args.set])
    print(f"teacher checkpoint: {path}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from mlkd.evaluation.evaluate import evaluate_teacher, summary_line
    from mlkd.metrics import format_table

    kwargs = dict(options=parse_options(args.option), device=resolve_device(args.device), flip=args.flip,
                  workers=args.workers, detection=not args.no_detection, progress=not args.quiet, plots=args.plots,
                  detection_mode=args.detection_ap)
    if args.scales:
        kwargs["scales"] = args.scales
    if args.max_proposals is not None:
        kwargs["max_proposals"] = args.max_proposals
    report = evaluate_teacher(args.checkpoint, args.dataset, args.proposals, args.out, **kwargs)
    print(format_table(report["classification"], per_class=not args.summary))
    print("\nteacher: " + summary_line(report))
    if args.out:
        print(f"report written to {args.out}")
    if args.plots:
        print(f"plots written to {Path(args.plots) / 'index.html'}")
    return 0


def run_visualize(args: argparse.Namespace) -> int:
    from mlkd.evaluation.evaluate import visualize_teacher

    paths = visualize_teacher(args.checkpoint, args.dataset, args.proposals, args.out, num_images=args.num_images,
                              options=parse_options(args.option), device=resolve_device(args.device),
                              top_proposals=args.top_proposals, per_class=args.per_class, progress=not args.quiet)
    print(f"{len(paths)} figures written to {args.out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train-teacher", help="train the WSDDN teacher (weakly-supervised detector)",
                       description=TRAIN_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  mlkd train-teacher --config teacher_demo "
                              "--set run.out=runs/t1 --set optim.epochs=4")
    t.add_argument("--config", metavar="YAML|NAME",
                   help="config file, or the name of one shipped with mlkd (e.g. teacher_voc07; keys: model, data, "
                        "optim, run)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. optim.lr=1e-4 or data.scales=[480,576]; repeatable")
    t.add_argument("--resume", action="store_true", help="continue the run in run.out from its last.pt")
    t.set_defaults(func=run_train)

    e = sub.add_parser("evaluate-teacher", help="classification, detection AP and CorLoc of a teacher",
                       description="Evaluate a teacher checkpoint on a dataset: every classification metric of its "
                                   "image scores; on datasets with boxes, VOC detection AP at IoU 0.5 (per-class "
                                   "NMS 0.4 on region scores; --detection-ap names the variant) and CorLoc (+ the "
                                   "largest-proposal baseline). "
                                   "Single-scale at the training config's test scale unless --scales/--flip.")
    e.add_argument("--checkpoint", required=True, metavar="CKPT", help="teacher checkpoint (last.pt)")
    add_dataset_options(e)
    e.add_argument("--proposals", metavar="CACHE", help="proposal cache of that dataset (not for datalists)")
    e.add_argument("--scales", type=positive_int, nargs="+", metavar="PX",
                   help="test scales in pixels (several = multi-scale test)")
    e.add_argument("--flip", action="store_true", help="also average the horizontally flipped view")
    e.add_argument("--max-proposals", type=positive_int, metavar="R",
                   help="proposals per image (default: as trained)")
    e.add_argument("--no-detection", action="store_true", help="skip detection AP / CorLoc (faster)")
    e.add_argument("--detection-ap", choices=DETECTION_AP_MODES, default="voc07",
                   help="AP variant of detection AP (docs/evaluation.md): voc07 = 11-point with exact k/10 recall "
                        "thresholds (default), voc07_devkit = the MATLAB devkit's, bit for bit (what VOC 2007 papers "
                        "publish), voc07_py = Fast R-CNN's voc_eval.py thresholds, voc_area = VOC2010+ area")
    e.add_argument("--out", metavar="JSON", help="write the full report here")
    e.add_argument("--plots", metavar="DIR",
                   help="write charts and an index.html into this folder (created if missing; files of the same "
                        "names are replaced): as `mlkd evaluate --plots` (image scores), plus per-class detection "
                        "AP and CorLoc bars (with boxes), and the gallery draws the top-10 proposals by objectness")
    e.add_argument("--summary", action="store_true", help="no per-class AP rows in the table")
    e.add_argument("--workers", type=non_negative_int, default=2,
                   help="DataLoader workers (default 2; 0 = load in this process)")
    add_device_option(e)
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=run_evaluate)

    v = sub.add_parser("visualize-teacher", help="figures: top proposals by objectness, top classes, detections",
                       description="Draw, for the first --num-images images, the teacher's top proposals by "
                                   "objectness s' (green) with its top-3 classes and scores (the paper's example "
                                   "figure), and with --per-class the best detections of each present class.")
    v.add_argument("--checkpoint", required=True, metavar="CKPT", help="teacher checkpoint")
    add_dataset_options(v)
    v.add_argument("--proposals", metavar="CACHE", help="proposal cache of that dataset")
    v.add_argument("--out", required=True, metavar="DIR", help="folder for the PNG files")
    v.add_argument("--num-images", type=positive_int, default=8, metavar="N", help="images to draw (default 8)")
    v.add_argument("--top-proposals", type=positive_int, default=10, metavar="N",
                   help="proposals drawn per image (10)")
    v.add_argument("--per-class", action="store_true", help="also one figure per image with per-class detections")
    add_device_option(v)
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    v.set_defaults(func=run_visualize)
