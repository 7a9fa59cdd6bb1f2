"""`mlkd data`: write the synthetic dataset (`synth`) and describe a dataset (`info`)."""

from __future__ import annotations

import argparse
import warnings
from typing import Any

import numpy as np
from tqdm import tqdm

from mlkd.data import DATASET_FORMS, MultiLabelDataset, build_dataset
from mlkd.data.base import read_image
from mlkd.data.synthetic import IMAGE_FORMATS, class_names, generate

SYNTH_DESCRIPTION = """\
Write a synthetic multi-label detection dataset in the custom format: images/{train,val}/*.png,
train.jsonl, val.jsonl ({"path", "labels", "boxes": [[x1, y1, x2, y2, name], ...]}), classes.txt, meta.json.
Each class is an outline (circle, square, triangle, hexagon, star) with a fine texture (stripes, checker,
dots, rings); classes sharing an outline share its colour and differ only in texture, and unlabelled
distractors copy colours, outlines and textures, so a class is told by one region's detail, which fades when
the whole image is downsampled. Deterministic for a seed."""

INFO_DESCRIPTION = """\
Count images, labels per class, boxes and missing image files of a dataset, without training anything.
Accepted --dataset forms:
""" + "\n".join(f"  {k:28s} {v}" for k, v in DATASET_FORMS.items())


def summarize(ds: MultiLabelDataset) -> dict[str, Any]:
    """Counts of a dataset from its records alone (no image is decoded)."""
    labels = ds.label_matrix()  # (N, K) in {1, 0, -1}
    positives = (labels == 1).sum(1)
    box_counts = np.zeros(ds.num_classes, np.int64)
    num_boxes, has_boxes = 0, False
    for r in ds.records:
        if r.boxes is not None:
            has_boxes = True
            num_boxes += len(r.boxes)
            np.add.at(box_counts, np.asarray(r.box_labels, np.int64), 1)
    return {
        "images": len(ds), "classes": ds.num_classes,
        "per_class_images": (labels == 1).sum(0), "per_class_ignored": (labels == -1).sum(0),
        "per_class_boxes": box_counts if has_boxes else None, "boxes": num_boxes if has_boxes else None,
        "cardinality": float(positives.mean()) if len(ds) else 0.0,
        "density": float(positives.mean() / max(ds.num_classes, 1)) if len(ds) else 0.0,
        "no_label_images": int((positives == 0).sum()),
        "missing": list(getattr(ds, "missing", [])),
    }


def _print_summary(ds: MultiLabelDataset, s: dict[str, Any], max_missing: int = 10) -> None:
    print(f"dataset {ds.name} / split {ds.split}: {s['images']} images, {s['classes']} classes "
          f"(manifest hash {ds.identity.manifest_hash})")
    print(f"label cardinality {s['cardinality']:.3f} labels/image, density {s['density']:.4f}, "
          f"{s['no_label_images']} images with no positive label")
    if s["boxes"] is not None:
        print(f"boxes: {s['boxes']} ({s['boxes'] / max(s['images'], 1):.2f} per image)")
    width = max(len(c) for c in ds.classes)
    header = f"{'class':{width}s} {'images':>7s} {'ignored':>8s}" + (f" {'boxes':>6s}" if s["boxes"] is not None else "")
    print(header)
    for k, name in enumerate(ds.classes):
        row = f"{name:{width}s} {s['per_class_images'][k]:7d} {s['per_class_ignored'][k]:8d}"
        print(row + (f" {s['per_class_boxes'][k]:6d}" if s["boxes"] is not None else ""))
    missing = s["missing"]
    print(f"missing image files: {len(missing)}")
    for image_id in missing[:max_missing]:
        print(f"  {image_id}")
    if len(missing) > max_missing:
        print(f"  ... and {len(missing) - max_missing} more")


def _decode_all(ds: MultiLabelDataset) -> int:
    """Decode every image (tqdm bar); print unreadable files and the size range; return how many failed."""
    bad, sizes = [], []
    for r in tqdm(ds.records, desc="decode", unit="img"):
        try:
            sizes.append(read_image(r.path).shape[:2])
        except OSError as e:
            bad.append(str(e))
    if sizes:
        hw = np.array(sizes)
        print(f"image sizes: H {hw[:, 0].min()}-{hw[:, 0].max()}, W {hw[:, 1].min()}-{hw[:, 1].max()}")
    print(f"unreadable image files: {len(bad)}")
    for message in bad[:10]:
        print(f"  {message}")
    return len(bad)


def run_info(args: argparse.Namespace) -> int:
    with warnings.catch_warnings():  # missing files are reported below, not as a warning
        warnings.simplefilter("ignore")
        ds = build_dataset(args.dataset, skip_missing=True)
    _print_summary(ds, summarize(ds))
    failed = _decode_all(ds) if args.decode else 0
    return 1 if failed else 0


def run_synth(args: argparse.Namespace) -> int:
    manifests = generate(args.out, args.num_images, seed=args.seed, image_size=args.image_size,
                         val_fraction=args.val_fraction, num_classes=args.num_classes,
                         image_format=args.format, progress=not args.quiet)
    for split, path in manifests.items():
        print(f"{split}: {path}")
    print(f"classes: {args.num_classes} ({', '.join(class_names(args.num_classes))})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="write the synthetic dataset, or describe a dataset",
                       description="Dataset tools: `mlkd data synth` writes the synthetic dataset, "
                                   "`mlkd data info` describes any dataset.")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    data_sub = p.add_subparsers(dest="data_command", metavar="<subcommand>")

    s = data_sub.add_parser("synth", help="write the synthetic multi-label detection dataset",
                            description=SYNTH_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog="example:\n  mlkd data synth --out data/synth --num-images 200 --seed 0")
    s.add_argument("--out", required=True, metavar="DIR", help="output folder (created; files are overwritten)")
    s.add_argument("--num-images", type=int, required=True, metavar="N",
                   help="images in total, train + val (a few hundred take seconds)")
    s.add_argument("--seed", type=int, default=0, help="seed: same seed and arguments, same dataset (default 0)")
    s.add_argument("--image-size", type=int, default=160, metavar="PX",
                   help="longer image side in pixels; the other side is 75-100%% of it (default 160)")
    s.add_argument("--val-fraction", type=float, default=0.25, metavar="F",
                   help="fraction of the images in the val split, in [0, 1) (default 0.25)")
    s.add_argument("--num-classes", type=int, default=10, metavar="K",
                   help="number of classes, 2-20 (default 10: 5 outlines x {stripes, checker})")
    s.add_argument("--format", choices=sorted(IMAGE_FORMATS), default="png",
                   help="image file format; png (default) keeps the fine textures exact, jpg blurs them a bit")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=run_synth)

    i = data_sub.add_parser("info", help="counts per class, label cardinality, boxes, missing files",
                            description=INFO_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog="example:\n  mlkd data info --dataset data/synth/train.jsonl")
    i.add_argument("--dataset", required=True, metavar="SPEC", help="dataset spec, e.g. a manifest path")
    i.add_argument("--decode", action="store_true",
                   help="also decode every image (progress bar) and report unreadable files and the size range; "
                        "exit code 1 if any fails")
    i.set_defaults(func=run_info)
