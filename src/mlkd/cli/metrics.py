"""`mlkd metrics`: every multi-label classification metric of saved scores, as a table and/or JSON."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from mlkd.cli.common import positive_int, probability
from mlkd.errors import BadInput, NotFound
from mlkd.metrics import AP_MODES, evaluate_all, format_table, report_to_json

DESCRIPTION = """\
Score multi-label predictions against labels with every standard protocol, each variant named:
  mAP in five named AP variants: mlic (non-interpolated; = sklearn, tied scores entering together; = ML-GCN/ASL's
  sort-based AP when no positive is tied), voc07 (11-point, recall thresholds exactly k/10), voc07_devkit (the
  official MATLAB devkit's 11-point AP, bit for bit: what VOC 2007 papers publish), voc07_py (the same with the
  np.arange thresholds of the Python ports, e.g. Fast R-CNN's voc_eval.py), voc_area (VOC2010+ area under the
  interpolated PR curve); classes with no positives are excluded and listed;
  CP, CR, CF1, OP, OR, OF1 at --threshold, for the top-k labels with p >= threshold, and for plain top-k."""

EPILOG = """\
examples:
  mlkd metrics --scores scores.npy --targets targets.npy --classes classes.txt
  mlkd metrics --scores scores.npy --targets targets.npy --ap-mode mlic --json report.json
  mlkd metrics --scores scores.npy --targets targets.npy --ap-mode voc07_devkit   # VOC 2007 papers' mAP
  mlkd metrics --scores logits.npy --targets targets.npy --logits   # raw outputs: sigmoid first
  mlkd metrics --scores scores.npy --targets targets.npy --json > report.json   # JSON only, on stdout"""


NPY_MAGIC, ZIP_MAGIC = b"\x93NUMPY", b"PK\x03\x04"
EXPECTED = "a .npy array of shape (N, K), one row per image, one column per class (numpy.save)"


def load_array(path: str, what: str) -> np.ndarray:
    """A 2-D numeric array from a ``.npy`` file (never unpickled). Anything else is an error saying what the file
    is (a .npz archive, a text file, ...) and what is expected."""
    p = Path(path)
    if not p.is_file():
        raise NotFound(f"{what} file not found: {p}")
    with open(p, "rb") as f:
        head = f.read(1024)
    if not head.startswith(NPY_MAGIC):
        raise BadInput(f"{what} file {p} is {_describe(p, head)}; expected {EXPECTED}")
    try:
        arr = np.load(p, allow_pickle=False)
    except ValueError as e:  # an object (pickled) array, a damaged header, truncated data
        raise BadInput(f"cannot read {what} file {p} as a numeric .npy array ({e}); expected {EXPECTED}") from e
    if arr.ndim != 2 or arr.dtype.kind not in "biuf":
        raise BadInput(f"{what} file {p} holds a {arr.dtype} array of shape {arr.shape}; expected {EXPECTED}")
    return arr


def _describe(path: Path, head: bytes) -> str:
    """What a file that is not a .npy array is, in a few words, with how to convert it when that is easy."""
    if head.startswith(ZIP_MAGIC):
        try:
            with np.load(path, allow_pickle=False) as archive:
                names = list(archive.files)
        except Exception:  # noqa: BLE001 - a damaged zip: say what it looks like, the error below says what to give
            return "a zip file (not a .npz numpy archive)"
        first = names[0] if names else "name"
        return (f"a .npz archive of {len(names)} array(s) {names}, not one array (save one as .npy, e.g. "
                f"numpy.save('out.npy', numpy.load('{path}')['{first}']))")
    if b"\0" not in head:
        try:
            head.decode("utf-8")
            return "a text file (convert it, e.g. numpy.save('out.npy', numpy.loadtxt(...)))"
        except UnicodeDecodeError:
            pass
    return "not a .npy file (it does not start with the .npy header)"


def to_probabilities(scores: np.ndarray, path: str, logits: bool) -> np.ndarray:
    """Finite scores in [0, 1]: probabilities as they are, or the sigmoid of ``logits``; the threshold metrics
    (p >= --threshold) need probabilities, so anything else is an error naming the file."""
    s = scores.astype(np.float64)
    bad = ~np.isfinite(s)
    if bad.any():
        i, k = np.argwhere(bad)[0]
        raise BadInput(f"scores {path} hold {int(bad.sum())} non-finite values (NaN or inf; the first at image {i}, "
                       f"class {k}); expected finite scores")
    if logits:
        e = np.exp(-np.abs(s))  # the sigmoid without overflow on either side
        return np.where(s >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    if s.min() < 0 or s.max() > 1:
        raise BadInput(f"scores {path} range over [{s.min():.4g}, {s.max():.4g}], outside [0, 1]: the threshold "
                       "metrics need probabilities. If they are logits (raw model outputs) pass --logits to apply a "
                       "sigmoid first; otherwise save probabilities")
    return s


def load_class_names(path: str) -> list[str]:
    """One class name per line, in score-column order; blank lines are skipped."""
    p = Path(path)
    if not p.is_file():
        raise NotFound(f"class names file not found: {p}")
    return [line.strip() for line in p.read_text().splitlines() if line.strip()]


def run(args: argparse.Namespace) -> int:
    scores = load_array(args.scores, "scores")
    targets = load_array(args.targets, "targets")
    if scores.shape != targets.shape:
        raise BadInput(f"scores {args.scores} have shape {scores.shape} but targets {args.targets} have shape "
                       f"{targets.shape}; expected the same (N images, K classes), rows and columns in the same order")
    scores = to_probabilities(scores, args.scores, args.logits)
    names = load_class_names(args.classes) if args.classes else None
    if names is not None and len(names) != scores.shape[1]:
        raise BadInput(f"{args.classes} lists {len(names)} class names but scores {args.scores} have "
                       f"{scores.shape[1]} columns; expected one name per column")
    modes = AP_MODES if args.ap_mode == "all" else (args.ap_mode,)
    report = evaluate_all(scores, targets, names, threshold=args.threshold, ap_modes=modes, top_k=args.top_k)
    text = report_to_json(report)
    if args.json == "-":
        print(text)
        return 0
    print(format_table(report, per_class=not args.summary))
    if args.json:
        from mlkd.utils.checkpoint import write_atomically  # here: it imports safetensors, which `mlkd --help` needs not

        write_atomically(args.json, lambda f: f.write((text + "\n").encode()), "report")
        print(f"\nfull report written to {args.json}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("metrics", help="mAP (mlic/voc07/voc07_devkit/voc07_py/voc_area), CP/CR/CF1, OP/OR/OF1 and "
                                       "top-k of saved scores",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scores", required=True, metavar="S.npy",
                   help="(N, K) float array (.npy), one row per image, one column per class: probabilities in "
                        "[0, 1] (e.g. sigmoid outputs) so that --threshold makes sense, or logits with --logits; "
                        "AP only uses the ranking")
    p.add_argument("--logits", action="store_true",
                   help="the scores are logits (raw outputs, any real number): apply a sigmoid first, so --threshold "
                        "and the top-k variants see probabilities (in float64, logits above ~36 all become 1.0 and "
                        "tie). Without it, scores outside [0, 1] are refused")
    p.add_argument("--targets", required=True, metavar="T.npy",
                   help="(N, K) array in the same row/column order: 1 present, 0 absent, -1 ignore "
                        "(e.g. VOC 'difficult'; the entry is dropped from that class)")
    p.add_argument("--classes", metavar="FILE",
                   help="text file with the K class names, one per line, in column order (shown in the table)")
    p.add_argument("--threshold", type=probability, default=0.5,
                   help="a label is predicted when its score is >= this (default 0.5, the ML-GCN protocol)")
    p.add_argument("--top-k", type=positive_int, default=3, metavar="K",
                   help="k of the top-k variants: a label is predicted if among the image's k best (default 3)")
    p.add_argument("--ap-mode", choices=("all", *AP_MODES), default="all",
                   help="which AP variant(s) to compute: mlic = non-interpolated (the MLIC papers' mAP), "
                        "voc07 = 11-point with exact thresholds, voc07_devkit = the MATLAB devkit's 11-point, "
                        "voc07_py = the Python ports' 11-point, voc_area = VOC2010+; default all")
    p.add_argument("--json", nargs="?", const="-", metavar="OUT",
                   help="write the full report (per-class AP, excluded classes, ...) as JSON to OUT; "
                        "'--json' alone prints only the JSON on stdout instead of the table")
    p.add_argument("--summary", action="store_true", help="omit the per-class AP rows from the table")
    p.set_defaults(func=run)
