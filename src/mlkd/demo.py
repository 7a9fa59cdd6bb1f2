"""The end-to-end demo on the embedded synthetic dataset (what ``make demo`` runs).

So far it covers what exists: data -> proposals -> proposal recall -> metrics of two honest baselines
(a class-frequency prior for classification, the largest proposal for CorLoc). The teacher and student
stages join as they are built.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from mlkd.data import build_dataset
from mlkd.data.synthetic import generate
from mlkd.metrics import corloc, evaluate_all, format_table, report_to_json
from mlkd.proposals import ProposalCache, generate_proposals
from mlkd.proposals.recall import proposal_recall

PROPOSAL_METHODS = {"edge_boxes": {}, "selective_search": {"mode": "fast"}}


def _log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def prior_scores(train_labels: np.ndarray, n: int) -> np.ndarray:
    """Chance baseline: every image gets the training frequency of each class as its score ``(n, K)``."""
    freq = (train_labels == 1).mean(axis=0).astype(np.float32)
    return np.broadcast_to(freq, (n, len(freq))).copy()


def largest_proposal_corloc(dataset, cache) -> dict[str, Any]:
    """CorLoc of the baseline that answers every class with the image's largest proposal."""
    tops = []
    for r in dataset.records:
        boxes, _ = cache.get(r.image_id)
        if len(boxes) == 0:  # no proposal: an empty box, which can never hit
            big = np.zeros(4, np.float32)
        else:
            big = boxes[np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))]
        tops.append(np.tile(big, (dataset.num_classes, 1)))
    return corloc(np.stack(tops), dataset.label_matrix(), [r.boxes for r in dataset.records],
                  [r.box_labels for r in dataset.records], class_names=dataset.classes)


def run_demo(out: str | Path, num_images: int = 240, seed: int = 0, image_size: int = 160,
             workers: int = 2, max_proposals: int = 200) -> dict[str, Any]:
    """Run every stage into ``out`` and return (and write ``out/summary.json``) what was measured."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    summary: dict[str, Any] = {"seed": seed, "num_images": num_images, "image_size": image_size}

    _log(f"1/4 synthetic dataset: {num_images} images of ~{image_size}px -> {out / 'data'}")
    manifests = generate(out / "data", num_images, seed=seed, image_size=image_size)
    train, val = build_dataset(str(manifests["train"])), build_dataset(str(manifests["val"]))
    summary["dataset"] = {"classes": train.classes, "train": len(train), "val": len(val)}

    _log(f"2/4 proposals ({', '.join(PROPOSAL_METHODS)}), {workers} workers, at most {max_proposals} per image")
    caches, recall = {}, {}
    for method, params in PROPOSAL_METHODS.items():
        for split, ds in (("train", train), ("val", val)):
            path = out / "proposals" / f"{method}_{split}"
            report = generate_proposals(ds, method, {**params, "max_proposals": max_proposals}, path,
                                        workers=workers)
            if report.failed:
                _log(f"   {len(report.failed)} images failed: {sorted(report.failed)[:5]}")
            caches[method, split] = ProposalCache.open(path)
            ds_recall = proposal_recall(ds, caches[method, split], top_n=(None, 50, 10))
            recall[f"{method}/{split}"] = ds_recall
    summary["proposals"] = recall

    _log("3/4 proposal recall of ground-truth boxes (IoU >= 0.5)")
    for key, r in recall.items():
        rr = r["recall"]
        _log(f"   {key:28s} {r['mean_proposals']:6.1f} boxes/img  recall all {rr['all']['0.5']:.3f}  "
             f"top50 {rr['top50']['0.5']:.3f}  top10 {rr['top10']['0.5']:.3f}")

    _log("4/4 metrics of the baselines that later stages must beat")
    prior = evaluate_all(prior_scores(train.label_matrix(), len(val)), val.label_matrix(), class_names=val.classes)
    print(format_table(prior, per_class=False))
    summary["baselines"] = {"prior_val": json.loads(report_to_json(prior))}
    big = largest_proposal_corloc(train, caches["edge_boxes", "train"])
    summary["baselines"]["largest_proposal_corloc_train"] = big["corloc"]
    _log(f"   largest-proposal CorLoc on train (edge_boxes): {big['corloc']:.3f}")

    summary["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _log(f"done in {summary['seconds']} s; summary in {out / 'summary.json'}")
    return summary
