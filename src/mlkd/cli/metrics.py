"""`mlkd metrics`: every multi-label classification metric of saved scores, as a table and/or JSON."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from mlkd.errors import BadInput, NotFound
from mlkd.metrics import AP_MODES, evaluate_all, format_table, report_to_json

DESCRIPTION = """\
Score multi-label predictions against labels with every standard protocol, each variant named:
  mAP in three named AP variants: mlic (non-interpolated, as ML-GCN/ASL; = sklearn), voc07 (11-point),
  voc_area (VOC2010+ area under the interpolated PR curve); classes with no positives are excluded and listed;
  CP, CR, CF1, OP, OR, OF1 at --threshold, for the top-k labels with p >= threshold, and for plain top-k."""

EPILOG = """\
examples:
  mlkd metrics --scores scores.npy --targets targets.npy --classes classes.txt
  mlkd metrics --scores scores.npy --targets targets.npy --ap-mode mlic --json report.json
  mlkd metrics --scores scores.npy --targets targets.npy --json > report.json   # JSON only, on stdout"""


def load_array(path: str, what: str) -> np.ndarray:
    """Load a ``.npy`` file (no pickles); a clear error naming ``what`` and the path."""
    p = Path(path)
    if not p.is_file():
        raise NotFound(f"{what} file not found: {p}")
    try:
        return np.load(p, allow_pickle=False)
    except ValueError as e:
        raise BadInput(f"cannot read {what} from {p} as a numeric .npy array: {e}") from e


def load_class_names(path: str) -> list[str]:
    """One class name per line, in score-column order; blank lines are skipped."""
    p = Path(path)
    if not p.is_file():
        raise NotFound(f"class names file not found: {p}")
    return [line.strip() for line in p.read_text().splitlines() if line.strip()]


def run(args: argparse.Namespace) -> int:
    scores = load_array(args.scores, "scores")
    targets = load_array(args.targets, "targets")
    names = load_class_names(args.classes) if args.classes else None
    modes = AP_MODES if args.ap_mode == "all" else (args.ap_mode,)
    report = evaluate_all(scores, targets, names, threshold=args.threshold, ap_modes=modes, top_k=args.top_k)
    text = report_to_json(report)
    if args.json == "-":
        print(text)
        return 0
    print(format_table(report, per_class=not args.summary))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
        print(f"\nfull report written to {args.json}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("metrics", help="mAP (mlic/voc07/voc_area), CP/CR/CF1, OP/OR/OF1 and top-k of saved scores",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scores", required=True, metavar="S.npy",
                   help="(N, K) float array, one row per image, one column per class: probabilities "
                        "(e.g. sigmoid outputs) so that --threshold makes sense; AP only uses the ranking")
    p.add_argument("--targets", required=True, metavar="T.npy",
                   help="(N, K) array in the same row/column order: 1 present, 0 absent, -1 ignore "
                        "(e.g. VOC 'difficult'; the entry is dropped from that class)")
    p.add_argument("--classes", metavar="FILE",
                   help="text file with the K class names, one per line, in column order (shown in the table)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="a label is predicted when its score is >= this (default 0.5, the ML-GCN protocol)")
    p.add_argument("--top-k", type=int, default=3, metavar="K",
                   help="k of the top-k variants: a label is predicted if among the image's k best (default 3)")
    p.add_argument("--ap-mode", choices=("all", *AP_MODES), default="all",
                   help="which AP variant(s) to compute: mlic = non-interpolated (the MLIC papers' mAP), "
                        "voc07 = 11-point, voc_area = VOC2010+; default all")
    p.add_argument("--json", nargs="?", const="-", metavar="OUT",
                   help="write the full report (per-class AP, excluded classes, ...) as JSON to OUT; "
                        "'--json' alone prints only the JSON on stdout instead of the table")
    p.add_argument("--summary", action="store_true", help="omit the per-class AP rows from the table")
    p.set_defaults(func=run)
