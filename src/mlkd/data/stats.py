"""Counts of a dataset from its records alone (nothing decoded) and a per-class frequency bar chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mlkd.data.base import MultiLabelDataset, check_class_order
from mlkd.errors import BadInput
from mlkd.utils.figure import agg_figure


def summarize(ds: MultiLabelDataset) -> dict[str, Any]:
    """Images, per-class positives / ignored / boxes ``(K,)``, label cardinality and density, exclusions, and
    proposals per image ``(N,)`` when proposals are attached (reads every record of the proposal store)."""
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
        "missing": list(ds.missing),
        "excluded": {k: len(v) for k, v in sorted(ds.excluded.items())},
        "proposals_per_image": (np.array([len(ds.proposals.get(r.image_id)[1]) for r in ds.records])
                                if ds.proposals is not None else None),
    }


def plot_class_frequencies(datasets: Sequence[MultiLabelDataset], out: str | Path, sort: bool = False,
                           fraction: bool = False, log: bool = False, title: str | None = None) -> Path:
    """Write a bar chart of the images per class (label 1) of one or more datasets (grouped bars) to ``out``.

    Args:
        datasets: datasets with the same class order (e.g. the train and test splits).
        out: image file (format from its suffix, e.g. ``.png``).
        sort: order classes by the first dataset's frequency, descending (default: class order).
        fraction: plot the fraction of each dataset's images instead of counts (compares splits of
            different sizes).
        log: logarithmic y axis (long-tailed sets such as NUS-WIDE).
        title: figure title (default: the dataset names and splits).
    """
    if not datasets:
        raise BadInput("plot_class_frequencies needs at least one dataset")
    first = datasets[0]
    for ds in datasets[1:]:
        check_class_order(first.classes, ds.classes, f"dataset {ds.name}/{ds.split}")
    counts = np.stack([(ds.label_matrix() == 1).sum(0) for ds in datasets]).astype(np.float64)  # (D, K)
    if fraction:
        counts /= np.maximum([[len(ds)] for ds in datasets], 1)
    order = np.argsort(-counts[0], kind="stable") if sort else np.arange(first.num_classes)
    k, d = first.num_classes, len(datasets)
    fig = agg_figure(figsize=(max(6.0, 0.16 * k * (1 + 0.5 * (d - 1)) + 1.5), 4.5))
    ax = fig.subplots()
    width = 0.8 / d
    for i, ds in enumerate(datasets):
        ax.bar(np.arange(k) + (i - (d - 1) / 2) * width, counts[i, order], width,
               label=f"{ds.name} {ds.split} ({len(ds)} images)")
    ax.set_xticks(np.arange(k), [first.classes[j] for j in order], rotation=90, fontsize=7)
    ax.set_xlim(-0.6, k - 0.4)
    ax.set_ylabel("fraction of images" if fraction else "images")
    if log:
        ax.set_yscale("log")
    ax.set_title(title or "images per class: " + ", ".join(f"{ds.name} {ds.split}" for ds in datasets))
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out
