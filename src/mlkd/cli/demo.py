"""`mlkd demo`: the end-to-end run on the embedded synthetic dataset."""

from __future__ import annotations

import argparse

from mlkd.cli.common import non_negative_int, positive_int, ranged

DESCRIPTION = """\
The whole system on a generated synthetic dataset, sized for a laptop CPU: data -> selective-search proposals
(LMDB caches) -> the WSDDN teacher -> the student without distillation -> the student with mlkd's default
distillation (one joint stage, relative L_f) -> the student with the release's two-stage distillation
(--joint: also the release's losses in one stage) -> every metric on the held-out split. Prints a table
like the paper's Table 3 (mAP, CF1, OF1, top-3 CF1/OF1; teacher CorLoc against the largest-proposal
baseline) and writes the paper's example figure (teacher's top-10 proposals in green; the students' top-3
labels, blue correct, red wrong) and summary.json into the run folder. --seeds N retrains the teacher and
students with N seeds on the same data and reports mean ± std and each recipe's distillation gain per seed
(flagging any seed where a distilled student is worse than the one without distillation). A rerun
reuses finished stages and resumes interrupted ones."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="end-to-end demo: data, proposals, teacher, students, table and figure",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  mlkd demo --out runs/demo\n  mlkd demo --out runs/demo3 --seeds 3")
    p.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    p.add_argument("--num-images", type=ranged(int, lambda v: v >= 8, "an integer >= 8"), default=600,
                   help="images to generate, a quarter held out (default 600)")
    p.add_argument("--seed", type=int, default=0, help="seed of the dataset and of the first training run (default 0)")
    p.add_argument("--seeds", type=positive_int, default=1, help="training seeds to average over (default 1)")
    p.add_argument("--image-size", type=ranged(int, lambda v: v >= 64, "an integer >= 64"), default=160,
                   help="longer image side of the dataset in pixels (160)")
    p.add_argument("--workers", type=non_negative_int, default=2, help="processes for proposal generation (default 2)")
    p.add_argument("--look", choices=("shapes", "badges"), default="shapes",
                   help="the synthetic dataset's look (see `mlkd data synth --help`; default shapes)")
    p.add_argument("--teacher", choices=("wsddn", "oicr"), default="wsddn",
                   help="the teacher: WSDDN (default) or WSDDN with 3 OICR refinement streams (teacher_demo_oicr.yaml; "
                        "its runs are suffixed _oicr, the student w/o KD is shared)")
    p.add_argument("--joint", action="store_true", help="also train a student with the release's losses in one joint stage (about 1 minute more per seed)")
    p.add_argument("--configs", metavar="DIR",
                   help="folder with teacher_demo.yaml and student_demo*.yaml (default: the ones shipped with mlkd)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from mlkd.demo import run_demo

    summary = run_demo(args.out, num_images=args.num_images, seed=args.seed, seeds=args.seeds,
                       image_size=args.image_size, workers=args.workers, joint=args.joint, configs=args.configs,
                       progress=not args.quiet, look=args.look, teacher=args.teacher)
    print("\n" + summary["table"] + "\n", flush=True)
    return 0
