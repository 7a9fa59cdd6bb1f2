"""`mlkd proposals`: generate object proposals into an LMDB cache; merge shards; import, export, inspect caches."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mlkd.cli.common import non_negative_float, non_negative_int, parse_options, positive_int, ranged
from mlkd.data import DATASET_FORMS, MultiLabelDataset, build_dataset
from mlkd.data.boxes import BOX_POLICIES
from mlkd.errors import BadInput
from mlkd.proposals.attach import check_cache_matches
from mlkd.proposals.cache import ProposalCache
from mlkd.proposals.convert import export_datalist, export_mat, import_datalist, import_mat
from mlkd.proposals.generate import CLEAN_DEFAULTS, default_workers, generate_proposals
from mlkd.proposals.recall import proposal_recall
from mlkd.proposals.shards import merge_caches, parse_shard

OPTION_HELP = ("dataset option, e.g. difficult=positive (as in `mlkd data info`); repeatable. Proposals depend on "
               "the images only, so options that change labels do not change the cache")


def _dataset(args: argparse.Namespace) -> MultiLabelDataset:
    return build_dataset(args.dataset, **parse_options(args.option))


def _add_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help=OPTION_HELP)

DESCRIPTION = """\
Compute object proposals for every image of a dataset into an LMDB cache (CACHE/data.mdb + CACHE/meta.json).

  mlkd proposals --dataset SPEC --method selective_search|edge_boxes --out CACHE [options]

Boxes are (x1, y1, x2, y2) float32 pixel edges of the image on disk; boxes smaller than --min-size are
dropped, exact duplicates removed, at most --max-proposals kept (best score first). EdgeBoxes scores are
stored as proposal scores; selective search has none (1.0, rank order kept). Images run in parallel in
--workers processes. An image that cannot be read is reported (CACHE/failures.json) and skipped, the rest
is cached; re-running the same command resumes, computing only what is missing. The meta records the
method, every parameter and the dataset identity; a dataset refuses a cache whose meta does not match.

Other actions: `mlkd proposals merge|import|export|info --help`.

Dataset specs:
""" + "\n".join(f"  {k:28s} {v}" for k, v in DATASET_FORMS.items())

EPILOG = """\
examples:
  mlkd proposals --dataset data/synth/train.jsonl --method edge_boxes --out cache/eb_train
  mlkd proposals --dataset data/synth/train.jsonl --method selective_search --mode quality --out cache/ss
  # on a cluster: 4 jobs, then one merge
  mlkd proposals --dataset D --method edge_boxes --shard 0/4 --out cache/part0   (... 1/4, 2/4, 3/4)
  mlkd proposals merge --out cache/eb --dataset D cache/part0 cache/part1 cache/part2 cache/part3"""


def _method_params(args: argparse.Namespace) -> dict:
    params = {"max_proposals": args.max_proposals, "min_size": args.min_size, "nms_iou": args.nms_iou}
    if args.method == "selective_search":
        if args.edge_model:
            raise BadInput("--edge-model is an EdgeBoxes option; it does not apply to selective_search")
        params["mode"] = args.mode
    elif args.edge_model:
        params["model_path"] = args.edge_model
    return params


def run_generate(args: argparse.Namespace) -> int:
    missing = [flag for flag, v in (("--dataset", args.dataset), ("--method", args.method), ("--out", args.out))
               if v is None]
    if missing:
        raise BadInput(f"generating proposals needs {', '.join(missing)} (see `mlkd proposals --help`)")
    dataset = _dataset(args)
    shard = parse_shard(args.shard) if args.shard else None
    workers = default_workers() if args.workers is None else args.workers
    report = generate_proposals(dataset, args.method, _method_params(args), args.out, workers=workers,
                                shard=shard, progress=not args.quiet)
    rate = report.processed / report.seconds if report.seconds else 0.0
    print(f"{args.out}: {report.processed} images computed ({rate:.1f} img/s, {report.mean_boxes:.1f} boxes/img), "
          f"{report.skipped} already cached, {len(report.failed)} failed")
    for image_id, error in sorted(report.failed.items())[:20]:
        print(f"  failed {image_id}: {error}")
    if report.empty:
        print(f"{len(report.empty)} images have no proposal (the teacher cannot use them; drop them from the dataset "
              f"or lower --min-size): {', '.join(sorted(report.empty)[:10])}{' ...' if len(report.empty) > 10 else ''}")
    if report.failed:
        print(f"all failures are listed in {Path(args.out) / 'failures.json'}; fix or drop those images and "
              "re-run the same command to compute only them")
        return 1
    return 0


def run_merge(args: argparse.Namespace) -> int:
    dataset = _dataset(args) if args.dataset else None
    report = merge_caches(args.out, args.shards, dataset=dataset, progress=not args.quiet)
    print(f"{report.cache_path}: {report.num_images} of {report.expected} images")
    if report.missing_shards:
        print(f"  shards never given: {report.missing_shards}")
    if not report.complete:
        print(f"  {report.missing_count} images missing, e.g. {report.missing_ids[:10]}")
        return 1
    return 0


def run_import(args: argparse.Namespace) -> int:
    dataset = _dataset(args)
    if args.format == "mat":
        if args.root:
            raise BadInput("--root applies to datalist files (their image paths); .mat files list image ids")
        report = import_mat(args.file, dataset, args.out, allow_missing=args.allow_missing, progress=not args.quiet,
                            bad_boxes=args.bad_boxes)
    else:
        report = import_datalist(args.file, dataset, args.out, root=args.root, allow_missing=args.allow_missing,
                                 progress=not args.quiet, bad_boxes=args.bad_boxes)
    print(f"{report.cache_path}: imported proposals of {report.imported} images from {args.file}")
    print(f"  --bad-boxes {args.bad_boxes}: {report.boxes.summary()}")
    for example in report.boxes.examples if report.boxes.changed else []:
        print(f"    e.g. {example}")
    if report.extra:
        print(f"  {len(report.extra)} entries of the file are not in the dataset (ignored), e.g. {report.extra[:5]}")
    if report.missing:
        print(f"  {len(report.missing)} dataset images have no entry in the file, e.g. {report.missing[:5]}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    dataset = _dataset(args)
    with ProposalCache.open(args.cache) as cache:
        if args.format == "mat":
            export_mat(args.out, dataset, cache, progress=not args.quiet)
        else:
            ignored = export_datalist(args.out, dataset, cache, relative_to=args.relative_to, progress=not args.quiet)
            if ignored:
                print(f"  note: {ignored} 'ignore' (-1) labels have no datalist form and were written as 0")
    print(f"{args.out}: {len(dataset)} images written as {args.format}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    with ProposalCache.open(args.cache) as cache:
        meta = cache.meta
        ds = meta["dataset"]
        print(f"{cache.path}: {len(cache)} images, method {meta['method']}")
        print(f"  parameters: {json.dumps(meta['params'], sort_keys=True)}")
        print(f"  dataset: {ds['name']}/{ds['split']}, {ds['num_images']} images, {len(ds['classes'])} classes, "
              f"images hash {ds.get('images_hash', '(v1 cache: none)')}")
        print(f"  boxes: {meta['box_convention']}")
        if meta["shard"]:
            print(f"  shard {meta['shard']['index']}/{meta['shard']['count']}")
        failures = cache.read_failures()
        print(f"  failed images in the last run: {len(failures)}")
        if "empty_images" in meta:
            empty = meta["empty_images"]
            print(f"  images with no proposal: {len(empty)}" + (f" ({', '.join(empty[:10])}"
                                                                f"{' ...' if len(empty) > 10 else ''})" if empty else ""))
        if args.dataset:
            dataset = _dataset(args)
            check_cache_matches(dataset, cache)
            if all(r.boxes is not None for r in dataset.records):
                r = proposal_recall(dataset, cache, top_n=(None, 100, 10))
                print(f"  {r['mean_proposals']:.1f} proposals/img, {r['images_without_proposals']} images with none; "
                      f"recall of {r['num_gt']} GT boxes at IoU 0.5/0.7:")
                for budget, values in r["recall"].items():
                    print(f"    {budget:>6}: {values['0.5']:.3f} / {values['0.7']:.3f}")
    return 0


def _add_generate_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", metavar="SPEC", help="dataset spec (forms listed above), e.g. data/synth/train.jsonl")
    _add_option(p)
    p.add_argument("--method", choices=("selective_search", "edge_boxes"),
                   help="edge_boxes: the release's choice (scores kept); selective_search: WSDDN's (no scores)")
    p.add_argument("--out", metavar="CACHE", help="cache directory (created; an existing one with the same "
                                                  "settings is resumed)")
    p.add_argument("--max-proposals", type=positive_int, default=CLEAN_DEFAULTS["max_proposals"], metavar="R",
                   help="keep at most R boxes per image, best first (release: 500)")
    p.add_argument("--min-size", type=non_negative_float, default=CLEAN_DEFAULTS["min_size"], metavar="PX",
                   help="drop boxes narrower or shorter than this many pixels")
    p.add_argument("--nms-iou", type=ranged(float, lambda v: 0 < v <= 1, "a number in (0, 1]"), default=None,
                   metavar="T",
                   help="also drop near-duplicates with IoU > T (e.g. 0.95); off by default, as in Fast R-CNN")
    p.add_argument("--mode", choices=("fast", "quality"), default="fast",
                   help="selective search strategy set: fast, or quality (~3-5x slower, more recall)")
    p.add_argument("--edge-model", metavar="FILE",
                   help="EdgeBoxes: structured-forest edge model (model.yml.gz from opencv_extra) if you have it; "
                        "without it a colour-gradient edge map is used (see mlkd.proposals.methods)")
    p.add_argument("--workers", type=non_negative_int, default=None, metavar="N",
                   help="worker processes (default: one per CPU core; 0 = in this process)")
    p.add_argument("--shard", metavar="i/n", help="only the images with index %% n == i (merge the n caches "
                                                   "with `mlkd proposals merge`)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("proposals", help="object proposals into an LMDB cache (also merge/import/export/info)",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_generate_options(p)
    p.set_defaults(func=run_generate)
    actions = p.add_subparsers(dest="proposals_action", metavar="[merge|import|export|info]")

    m = actions.add_parser("merge", help="join shard caches into one", description=(
        "Copy the caches of `--shard i/n` runs into one cache. They must agree on method, parameters and "
        "dataset; with --dataset the missing image ids are listed exactly. Exit code 1 if images are missing."))
    m.add_argument("--out", required=True, metavar="CACHE", help="the merged cache directory (must not exist)")
    m.add_argument("--dataset", metavar="SPEC", help="the dataset the shards were computed for (to list gaps)")
    m.add_argument("shards", nargs="+", metavar="SHARD_CACHE", help="the shard cache directories")
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_option(m)
    m.set_defaults(func=run_merge)

    i = actions.add_parser("import", help="import a WSDDN .mat or a release datalist file", description=(
        "Import proposals of other tools into a cache for a dataset. mat: WSDDN / Fast R-CNN layout "
        "(variables images, boxes = cell of R x 4 [y1 x1 y2 x2] 1-based, optional boxScores), image ids must "
        "be the dataset's. datalist: the original release's `path y_1..y_K (x1 y1 x2 y2 score) x R` lines, "
        "matched to dataset images by path; their labels must agree with the dataset's. Every box is checked against "
        "its image (--bad-boxes); a NaN or infinite proposal score is an error naming the image and the proposal."))
    i.add_argument("--format", required=True, choices=("mat", "datalist"), help="the file's format")
    i.add_argument("--file", required=True, metavar="FILE", help="the .mat or datalist file")
    i.add_argument("--dataset", required=True, metavar="SPEC", help="the dataset the proposals belong to")
    i.add_argument("--out", required=True, metavar="CACHE", help="the new cache directory")
    i.add_argument("--root", metavar="DIR", help="datalist: folder its relative paths start from "
                                                 "(default: the datalist's folder)")
    i.add_argument("--allow-missing", action="store_true",
                   help="import even if some dataset images have no entry (they are listed)")
    i.add_argument("--bad-boxes", choices=BOX_POLICIES, default="refuse",
                   help="boxes that are non-finite, inverted (x2 < x1), zero-area or beyond the image (size read from "
                        "its file header): refuse = error naming them (default); clip = clip out-of-image boxes to "
                        "the image and drop zero-area ones (non-finite and inverted are still refused); drop = drop "
                        "every defective box. The counts are printed")
    i.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_option(i)
    i.set_defaults(func=run_import)

    e = actions.add_parser("export", help="write a cache as a datalist or a WSDDN .mat", description=(
        "Write a dataset's cached proposals in the release's datalist format (labels + boxes + scores per line; "
        "'ignore' labels become 0) or as a WSDDN-layout .mat (1-based [y1 x1 y2 x2])."))
    e.add_argument("--cache", required=True, metavar="CACHE", help="the proposal cache")
    e.add_argument("--dataset", required=True, metavar="SPEC", help="the dataset the cache was built for")
    e.add_argument("--format", required=True, choices=("datalist", "mat"), help="output format")
    e.add_argument("--out", required=True, metavar="FILE", help="output file")
    e.add_argument("--relative-to", metavar="DIR", help="datalist: write image paths relative to DIR")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_option(e)
    e.set_defaults(func=run_export)

    n = actions.add_parser("info", help="what a cache holds; recall of ground-truth boxes", description=(
        "Print a cache's method, parameters, dataset identity and failures; with --dataset (which must match "
        "the cache) also the recall of its ground-truth boxes at IoU 0.5/0.7 for all, top-100 and top-10 boxes."))
    n.add_argument("--cache", required=True, metavar="CACHE", help="the proposal cache")
    n.add_argument("--dataset", metavar="SPEC", help="the dataset, for recall (needs boxes)")
    _add_option(n)
    n.set_defaults(func=run_info)
