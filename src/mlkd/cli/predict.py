"""`mlkd predict`: a student's labels for image files (top-k, per-class thresholds, annotated copies)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from mlkd.cli.common import add_device_option, add_precision_options, positive_int, resolve_device
from mlkd.errors import BadInput, NotFound
from mlkd.utils.checks import PROBABILITY

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_images(inputs: Sequence[str]) -> list[Path]:
    """Image paths from files, folders (their images, sorted) and ``.txt`` lists (one path per line)."""
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.suffix.lower() == ".txt" and p.is_file():
            paths += [Path(line.strip()) for line in p.read_text().splitlines() if line.strip()]
        elif p.is_file():
            paths.append(p)
        else:
            raise NotFound(f"no such image, folder or list: {p}")
    if not paths:
        raise BadInput(f"no images found in {list(inputs)} (image suffixes: {', '.join(IMAGE_SUFFIXES)})")
    return paths


def drop_duplicates(paths: Sequence[Path]) -> tuple[list[Path], list[tuple[Path, Path]]]:
    """``paths`` without the ones naming a file already listed (``./x.png`` after ``x.png``, a file after its
    folder), so no image is counted twice; the first spelling is kept. Also returns ``(dropped, kept)`` pairs."""
    first: dict[Path, Path] = {}
    unique, dropped = [], []
    for p in paths:
        real = p.resolve()  # symlinks and ".." too: what is read is the same file
        if real in first:
            dropped.append((p, first[real]))
        else:
            first[real] = p
            unique.append(p)
    return unique, dropped


def read_thresholds(spec: str | None, classes: Sequence[str]) -> np.ndarray | None:
    """Per-class thresholds ``(K,)`` from one number, or a file of ``class threshold`` lines covering every
    class (an unknown or missing class is an error naming it)."""
    if spec is None:
        return None
    try:
        value = float(spec)
    except ValueError:
        value = None
    if value is not None:
        if not PROBABILITY.ok(value):  # the API's rule for its threshold argument; refuses nan and inf
            raise BadInput(f"--thresholds {spec}: expected a probability in [0, 1] (or a file of 'class threshold' "
                           "lines)")
        return np.full(len(classes), value)
    path = Path(spec)
    if not path.is_file():
        raise NotFound(f"thresholds file not found: {path} (or give one number, e.g. 0.5)")
    values: dict[str, float] = {}
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, text = line.strip().rpartition(" ")
        name = name.strip()
        try:
            value = float(text)
        except ValueError:
            raise BadInput(f"{path}:{n}: expected 'class_name threshold', got {line!r}") from None
        if not PROBABILITY.ok(value):
            raise BadInput(f"{path}:{n}: threshold {text!r} of {name!r} is not a probability; expected a number in "
                           "[0, 1]")
        if name in values:
            raise BadInput(f"{path}:{n}: class {name!r} is listed twice; give each class one threshold")
        values[name] = value
    unknown = sorted(set(values) - set(classes))
    missing = [c for c in classes if c not in values]
    if unknown or missing:
        raise BadInput(f"{path}: thresholds must name exactly the model's classes; unknown {unknown}, "
                         f"missing {missing}")
    return np.array([values[c] for c in classes])


def output_names(paths: Sequence[Path]) -> list[str]:
    """File names for the annotated copies: ``<stem>_pred.png``, prefixed by the image's position in the list
    when two images share a stem (``a/x.jpg`` and ``b/x.png`` must not overwrite each other)."""
    stems = [p.stem for p in paths]
    return [f"{s}_pred.png" if stems.count(s) == 1 else f"{i:05d}_{s}_pred.png" for i, s in enumerate(stems)]


def run(args: argparse.Namespace) -> int:
    import mlkd
    from mlkd.utils.checkpoint import write_atomically
    from mlkd.data.base import read_image
    from mlkd.evaluation.figures import save_rgb, scaled, top_k_lines, with_panel

    if args.json and Path(args.json).is_dir():  # before the work, not after it
        raise BadInput(f"--json {args.json} is a folder; give a file path, e.g. {Path(args.json) / 'predictions.json'}")
    clf = mlkd.load(args.checkpoint, resolve_device(args.device), args.precision, args.calibration)
    if not isinstance(clf, mlkd.Classifier):
        raise BadInput(f"{args.checkpoint} is a teacher; `mlkd predict` classifies with a student")
    limits = read_thresholds(args.thresholds, clf.classes)
    paths, dropped = drop_duplicates(list_images(args.images))
    if dropped:
        shown = ", ".join(str(d) if d == k else f"{d} (= {k})" for d, k in dropped[:3])
        print(f"dropped {len(dropped)} path(s) naming an image already listed: {shown}"
              + (", ..." if len(dropped) > 3 else ""))
    names = output_names(paths)
    probs = []
    for start in tqdm(range(0, len(paths), args.batch_size), desc="predict", unit="batch", disable=args.quiet):
        chunk = paths[start:start + args.batch_size]
        batch = clf.probabilities(chunk, args.batch_size)  # given paths, its errors name the image file
        for i, (path, p) in enumerate(zip(chunk, batch)):
            best = np.argsort(-p, kind="stable")[:args.top_k]
            tqdm.write(f"{path}: " + ", ".join(f"{clf.classes[c]} {p[c]:.3f}" for c in best))
            if limits is not None:
                above = ", ".join(clf.classes[c] for c in np.flatnonzero(p >= limits)) or "none"
                tqdm.write(f"  above threshold: {above}")
            if args.out_dir:
                big, _ = scaled(read_image(path), 360)
                save_rgb(Path(args.out_dir) / names[start + i],
                         with_panel(big, top_k_lines(p, clf.classes, None, args.top_k)))
        probs.append(batch)
    if args.json:
        rows = [{"image": str(p), "probabilities": dict(zip(clf.classes, map(float, row)))}
                for p, row in zip(paths, np.concatenate(probs))]
        text = json.dumps(rows, indent=1) + "\n"
        write_atomically(args.json, lambda f: f.write(text.encode()), "probabilities")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="top-k labels of images with a student checkpoint or model folder",
                       description="Classify image files: prints each image's top-k labels with probabilities; "
                                   "with --thresholds (a file of 'class threshold' lines, or one number) also the "
                                   "labels above their class threshold; --out-dir writes annotated copies, --json "
                                   "every probability.",
                       epilog="examples:\n  mlkd predict --checkpoint runs/demo/seed0/student_kd/last.pt "
                              "runs/demo/data/images/val/ --top-k 3\n  mlkd predict --checkpoint model_dir/ "
                              "photo.jpg --thresholds 0.5 --json out.json",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="CKPT|DIR",
                   help="student checkpoint (last.pt) or model folder (`mlkd export --format safetensors`)")
    p.add_argument("images", nargs="+", metavar="PATH",
                   help="image files, folders (their images), or .txt files listing image paths; a file given "
                        "twice (./x.png and x.png, or a file and its folder) is classified once")
    p.add_argument("--top-k", type=positive_int, default=3, metavar="K", help="labels printed per image (default 3)")
    p.add_argument("--thresholds", metavar="FILE|P",
                   help="per-class thresholds file ('name value' per line) or one value for all classes; each in "
                        "[0, 1]")
    p.add_argument("--out-dir", metavar="DIR", help="write each image with its predictions drawn on it")
    p.add_argument("--json", metavar="FILE", help="write every image's probabilities (all classes) as JSON")
    p.add_argument("--batch-size", type=positive_int, default=16, metavar="B",
                   help="images per forward pass (default 16)")
    add_device_option(p)
    add_precision_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
