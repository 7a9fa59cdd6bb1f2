"""`mlkd data`: write the synthetic dataset (`synth`), describe a dataset (`info`), plot its class
frequencies (`plot`), write or check a manifest of its images with file hashes (`manifest`)."""

from __future__ import annotations

import argparse
import warnings
from typing import Any

import numpy as np
from tqdm import tqdm

from mlkd.cli.common import parse_options, positive_int, ranged
from mlkd.data import DATASET_FORMS, MultiLabelDataset, build_dataset
from mlkd.data.base import read_image
from mlkd.data.manifest import (compare_with_manifest, hash_images, manifest_summary, read_image_manifest,
                                write_image_manifest)
from mlkd.data.stats import plot_class_frequencies, summarize
from mlkd.data.synthetic import IMAGE_FORMATS, LOOKS, generate

SYNTH_DESCRIPTION = """\
Write a synthetic multi-label detection dataset in the custom format: images/{train,val}/*.png,
train.jsonl, val.jsonl ({"path", "labels", "boxes": [[x1, y1, x2, y2, name], ...]}), classes.txt, meta.json.
Two looks. shapes: each class is an outline (circle, square, triangle, hexagon, star) with a fine texture
(stripes, checker, dots, rings); classes sharing an outline share its colour and differ only in texture, and
unlabelled distractors copy colours, outlines and textures. badges: each class is an ordered colour pair, one
colour outside and one inside a nested badge of random shape; the reversed pair is an unlabelled distractor
that averages to the same colour once downsampled. In both, a class is told by one region's detail, which
fades when the whole image is downsampled. Deterministic for a seed."""

FORMS_HELP = "Accepted --dataset forms:\n" + "\n".join(f"  {k:28s} {v}" for k, v in DATASET_FORMS.items())
INFO_DESCRIPTION = """\
Count images, labels per class, boxes, missing and left-out images of one or more datasets (e.g. each split),
without training anything. """ + FORMS_HELP
PLOT_DESCRIPTION = """\
Write a bar chart of the images per class (label 1) of one or more datasets with the same classes (grouped
bars, e.g. train and test). """ + FORMS_HELP
MANIFEST_DESCRIPTION = """\
Write a manifest of a dataset's images (a SHA-1 of each file, and the images left out and why: missing on disk,
no label, ...), so that two users can check that they evaluate the same images; or check a dataset against
one (--check). A NUS-WIDE dataset built with --option image_manifest=FILE keeps exactly that image set.
""" + FORMS_HELP


def _load(spec: str, options: dict[str, Any]) -> MultiLabelDataset:
    """Build a dataset with missing files dropped (they are reported, not warned about)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_dataset(spec, skip_missing=True, **options)


def _print_summary(ds: MultiLabelDataset, s: dict[str, Any], max_missing: int = 10) -> None:
    print(f"dataset {ds.name} / split {ds.split}: {s['images']} images, {s['classes']} classes "
          f"(labels hash {ds.identity.labels_hash}, images hash {ds.identity.images_hash})")
    print(f"label cardinality {s['cardinality']:.3f} labels/image, density {s['density']:.4f}, "
          f"{s['no_label_images']} images with no positive label")
    if s["boxes"] is not None:
        print(f"boxes: {s['boxes']} ({s['boxes'] / max(s['images'], 1):.2f} per image)")
    if getattr(ds, "box_report", None) is not None:
        print(f"box check: {ds.box_report.summary()}")
    per_image = s["proposals_per_image"]
    if per_image is not None and len(per_image):
        print(f"proposals: {per_image.sum()} ({per_image.mean():.1f} per image, "
              f"{per_image.min()}-{per_image.max()})")
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
    others = {k: v for k, v in s["excluded"].items() if k != "missing"}
    if others:
        print("left out: " + ", ".join(f"{v} {k}" for k, v in others.items()))


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
    options = parse_options(args.option)
    failed = 0
    for n, spec in enumerate(args.dataset):
        if n:
            print()
        ds = _load(spec, options)
        _print_summary(ds, summarize(ds))
        failed += _decode_all(ds) if args.decode else 0
    return 1 if failed else 0


def run_plot(args: argparse.Namespace) -> int:
    options = parse_options(args.option)
    datasets = [_load(spec, options) for spec in args.dataset]
    out = plot_class_frequencies(datasets, args.out, sort=args.sort, fraction=args.fraction, log=args.log,
                                 title=args.title)
    print(f"wrote {out}")
    return 0


def run_manifest(args: argparse.Namespace) -> int:
    ds = _load(args.dataset, parse_options(args.option))
    if args.check:
        manifest = read_image_manifest(args.check)
        problems = compare_with_manifest(ds, manifest, hash_images(ds, args.workers, not args.quiet))
        for line in problems:
            print(f"differs: {line}")
        print(f"{ds.name}/{ds.split}: {len(ds)} images " + ("do NOT match" if problems else "match") + f" {args.check}")
        return 1 if problems else 0
    counts = write_image_manifest(ds, args.out, args.workers, progress=not args.quiet)
    print(f"wrote {args.out}: {manifest_summary(counts)} (labels hash {ds.identity.labels_hash})")
    return 0


def _add_dataset_options(p: argparse.ArgumentParser, many: bool) -> None:
    p.add_argument("--dataset", required=True, metavar="SPEC", action="append" if many else "store",
                   help="dataset spec (forms above), e.g. voc:/data/voc:2007:test"
                        + ("; repeat for several datasets, e.g. the train and test splits" if many else ""))
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="a dataset option (listed with each form above; true/false for flags), e.g. "
                        "difficult=positive or keep_empty=true; repeatable")


def run_synth(args: argparse.Namespace) -> int:
    files = generate(args.out, args.num_images, seed=args.seed, image_size=args.image_size,
                     val_fraction=args.val_fraction, num_classes=args.num_classes, image_format=args.format,
                     progress=not args.quiet, look=args.look)
    for split, path in files.items():
        print(f"{split}: {path}")
    print(f"classes: {args.num_classes} ({', '.join(LOOKS[args.look][0](args.num_classes))})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="write the synthetic dataset; describe, plot or hash a dataset",
                       description="Dataset tools: `mlkd data synth` writes the synthetic dataset, `mlkd data info` "
                                   "describes any dataset, `mlkd data plot` draws its class frequencies, "
                                   "`mlkd data manifest` writes or checks a manifest of its images with file hashes.")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    data_sub = p.add_subparsers(dest="data_command", metavar="<subcommand>")

    s = data_sub.add_parser("synth", help="write the synthetic multi-label detection dataset",
                            description=SYNTH_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog="example:\n  mlkd data synth --out data/synth --num-images 200 --seed 0")
    s.add_argument("--out", required=True, metavar="DIR", help="output folder (created; files are overwritten)")
    s.add_argument("--num-images", type=positive_int, required=True, metavar="N",
                   help="images in total, train + val (a few hundred take seconds)")
    s.add_argument("--seed", type=int, default=0, help="seed: same seed and arguments, same dataset (default 0)")
    s.add_argument("--image-size", type=ranged(int, lambda v: v >= 64, "an integer >= 64"), default=160, metavar="PX",
                   help="longer image side in pixels; the other side is 75-100%% of it (default 160)")
    s.add_argument("--val-fraction", type=ranged(float, lambda v: 0 <= v < 1, "a number in [0, 1)"), default=0.25,
                   metavar="F",
                   help="fraction of the images in the val split, in [0, 1) (default 0.25)")
    s.add_argument("--num-classes", type=ranged(int, lambda v: 2 <= v <= 20, "an integer in [2, 20]"), default=10,
                   metavar="K",
                   help="number of classes, 2-20 (default 10: 5 outlines x {stripes, checker})")
    s.add_argument("--look", choices=sorted(LOOKS), default="shapes",
                   help="shapes (default): outlines with fine textures; badges: nested colour pairs whose arrangement "
                        "is the class, objects of mixed sizes (docs/demo.md: 'The synthetic dataset')")
    s.add_argument("--format", choices=sorted(IMAGE_FORMATS), default="png",
                   help="image file format; png (default) keeps the fine textures exact, jpg blurs them a bit")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=run_synth)

    i = data_sub.add_parser("info", help="counts per class, label cardinality, boxes, missing files",
                            description=INFO_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog="examples:\n  mlkd data info --dataset data/synth/train.jsonl\n"
                                   "  mlkd data info --dataset coco:/data/coco:train2014 "
                                   "--dataset coco:/data/coco:val2014")
    _add_dataset_options(i, many=True)
    i.add_argument("--decode", action="store_true",
                   help="also decode every image (progress bar) and report unreadable files and the size range; "
                        "exit code 1 if any fails")
    i.set_defaults(func=run_info)

    pl = data_sub.add_parser("plot", help="bar chart of the images per class (PNG)", description=PLOT_DESCRIPTION,
                             formatter_class=argparse.RawDescriptionHelpFormatter,
                             epilog="example:\n  mlkd data plot --dataset nuswide:/data/nus:train "
                                    "--dataset nuswide:/data/nus:test --fraction --sort --out nus.png")
    _add_dataset_options(pl, many=True)
    pl.add_argument("--out", required=True, metavar="PNG", help="image file to write (.png, .pdf or .svg)")
    pl.add_argument("--sort", action="store_true", help="order classes by frequency in the first dataset "
                                                        "(default: the dataset's class order)")
    pl.add_argument("--fraction", action="store_true",
                    help="plot the fraction of each dataset's images, to compare splits of different sizes")
    pl.add_argument("--log", action="store_true", help="logarithmic y axis, for long-tailed sets such as NUS-WIDE")
    pl.add_argument("--title", metavar="TEXT", help="figure title (default: the datasets' names and splits)")
    pl.set_defaults(func=run_plot)

    m = data_sub.add_parser("manifest", help="write (or --check) a manifest of the images with SHA-1 hashes",
                            description=MANIFEST_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog="examples:\n"
                                   "  mlkd data manifest --dataset nuswide:/data/nus:test --out nus_test.tsv\n"
                                   "  mlkd data manifest --dataset nuswide:/data/nus:test --check nus_test.tsv")
    _add_dataset_options(m, many=False)
    what = m.add_mutually_exclusive_group(required=True)
    what.add_argument("--out", metavar="FILE", help="manifest file to write (tab-separated text)")
    what.add_argument("--check", metavar="FILE", help="compare the dataset (ids, labels, file hashes) with this "
                                                      "manifest; exit code 1 if anything differs")
    m.add_argument("--workers", type=positive_int, default=4, metavar="N", help="threads hashing files (default 4)")
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    m.set_defaults(func=run_manifest)
