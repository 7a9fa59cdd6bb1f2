"""Charts of an evaluation (``mlkd evaluate --plots``, ``mlkd evaluate-teacher --plots``): per-class bars,
precision-recall curves and score histograms as small multiples, label co-occurrence, reliability.

Each function takes arrays, writes one PNG (atomically) and returns its path. matplotlib is imported inside
the functions, so that importing this module (and the evaluation code that calls it) costs nothing; they draw
on an Agg canvas without pyplot, so they need no display and leave the caller's backend and figures alone.
The numbers come from :mod:`mlkd.metrics.curves`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mlkd.metrics.classification import check_scores_targets
from mlkd.metrics.curves import co_occurrence, curve_area, precision_recall_curve, reliability
from mlkd.utils.checkpoint import write_atomically
from mlkd.utils.figure import agg_figure

POSITIVE, NEGATIVE = "#d95f02", "#1b6ca8"  # orange / blue: told apart with colour-vision deficiencies
PANEL_INCHES = (2.3, 2.0)
DPI = 100


def _save(fig: Any, out: str | Path, dpi: int = DPI) -> Path:
    """Write ``fig`` as PNG to ``out`` (atomically: a failure leaves no partial file)."""
    return write_atomically(out, lambda f: fig.savefig(f, format="png", dpi=dpi), "plot")


def _panels(k: int, title: str) -> tuple[Any, list[Any]]:
    """A figure of ``k`` small panels, about 1.5 times as many columns as rows; unused panels are hidden."""
    cols = min(k, max(1, math.ceil(math.sqrt(1.5 * k))))
    rows = math.ceil(k / cols)
    fig = agg_figure(figsize=(PANEL_INCHES[0] * cols, PANEL_INCHES[1] * rows + 0.6))
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
    flat = list(axes.ravel())
    for ax in flat[k:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, flat[:k]


def _label_outer(axes: Sequence[Any], cols: int, k: int, xlabel: str, ylabel: str) -> None:
    """Axis labels on the left column and on the lowest panel of each column only (shared axes)."""
    for i, ax in enumerate(axes):
        if i % cols == 0:
            ax.set_ylabel(ylabel, fontsize=8)
        if i + cols >= k:
            ax.set_xlabel(xlabel, fontsize=8)
            ax.tick_params(labelbottom=True)
        ax.tick_params(labelsize=7)


def class_bars(values: Sequence[float], classes: Sequence[str], out: str | Path, title: str, xlabel: str,
               reference: Sequence[float] | None = None, reference_label: str | None = None) -> Path:
    """Horizontal bars of one value in [0, 1] per class, best at the top, the value printed at each bar and the
    mean (over non-NaN values) as a dashed line. NaN values (excluded classes) are listed at the bottom as
    "n/a". ``reference`` values (e.g. a baseline) are drawn as black ticks on the same rows."""
    v = np.asarray(values, np.float64)
    order = np.argsort(np.where(np.isnan(v), np.inf, -v), kind="stable")
    k = len(v)
    fig = agg_figure(figsize=(7.5, 0.26 * k + 1.4))
    ax = fig.subplots()
    y = np.arange(k)
    ax.barh(y, np.nan_to_num(v[order]), color=NEGATIVE, height=0.7)
    for row, c in enumerate(order):
        text = "n/a" if np.isnan(v[c]) else f"{100 * v[c]:.1f}"
        # on a white box, so that the mean line behind it does not strike the number through
        ax.text(np.nan_to_num(v[c]) + 0.01, row, text, va="center", fontsize=7, zorder=4,
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5})
    if reference is not None:
        ref = np.asarray(reference, np.float64)[order]
        name = reference_label or "reference"
        if not np.isnan(ref).all():
            name += f" (mean {100 * np.nanmean(ref):.1f})"
        ax.scatter(ref, y, marker="|", s=120, color="black", label=name, zorder=5, clip_on=False)
    if not np.isnan(v).all():
        mean = float(np.nanmean(v))
        ax.axvline(mean, color=POSITIVE, linestyle="--", label=f"mean {100 * mean:.1f}", zorder=1)
    ax.set_yticks(y, [str(classes[c]) for c in order], fontsize=8)
    ax.set_ylim(k - 0.5, -0.5)  # best at the top
    ax.set_xlim(0, 1.12)  # room for the printed value of a bar at 1.0
    ax.set(xlabel=xlabel, title=title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return _save(fig, out)


def pr_curves(scores: Any, targets: Any, classes: Sequence[str], out: str | Path, title: str) -> Path:
    """Precision-recall curves of every class, one small panel each (:func:`precision_recall_curve`): the step
    curve holds each point's precision back to the previous recall, so the shaded area is the class's ``mlic``
    AP shown in the panel's title."""
    s, t = check_scores_targets(scores, targets)
    k = s.shape[1]
    fig, axes = _panels(k, title)
    for c, ax in enumerate(axes):
        precision, recall, _ = precision_recall_curve(s, t, c)
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.05)
        if np.isnan(recall).all():
            ax.text(0.5, 0.5, "no positives", ha="center", va="center", fontsize=8, transform=ax.transAxes)
            ax.set_title(str(classes[c]), fontsize=8)
            continue
        ax.plot(recall, precision, drawstyle="steps-pre", color=NEGATIVE, linewidth=1.2)
        ax.fill_between(recall, precision, step="pre", color=NEGATIVE, alpha=0.15)
        ax.set_title(f"{classes[c]}  AP {100 * curve_area(precision, recall):.1f}", fontsize=8)
        ax.grid(alpha=0.3)
    _label_outer(axes, _columns(axes), k, "recall", "precision")
    fig.tight_layout()
    return _save(fig, out)


def _columns(axes: Sequence[Any]) -> int:
    """Columns of the grid the ``axes`` come from."""
    return axes[0].get_subplotspec().get_gridspec().ncols


def _histogram(ax: Any, p: np.ndarray, y: np.ndarray, bins: np.ndarray, legend: bool) -> None:
    """Positives and negatives of scores ``p`` as step histograms, each group as its share of its own count (the
    negatives far outnumber the positives), on a log scale so that tails show."""
    for mask, colour, name in ((~y, NEGATIVE, "negatives"), (y, POSITIVE, "positives")):
        if mask.any():
            ax.hist(p[mask], bins=bins, weights=np.full(mask.sum(), 1 / mask.sum()), histtype="step",
                    color=colour, linewidth=1.4, label=f"{name} ({mask.sum()})")
    ax.set_yscale("log")
    ax.axvline(0.5, color="grey", linestyle=":", linewidth=1)
    if legend:
        ax.legend(fontsize=7, loc="upper center")


def score_histogram(scores: Any, targets: Any, out: str | Path, title: str, bins: int = 20) -> Path:
    """Scores of all (image, class) pairs pooled: positives against negatives (ignored entries dropped)."""
    s, t = check_scores_targets(scores, targets)
    keep = t != -1
    edges = np.linspace(min(0.0, s.min()), max(1.0, s.max()), bins + 1)
    fig = agg_figure(figsize=(6.5, 4))
    ax = fig.subplots()
    _histogram(ax, s[keep], t[keep] == 1, edges, legend=True)
    ax.set(xlabel="score", ylabel="share of the group (log)", title=title)
    fig.tight_layout()
    return _save(fig, out)


def score_histograms(scores: Any, targets: Any, classes: Sequence[str], out: str | Path, title: str,
                     bins: int = 20) -> Path:
    """:func:`score_histogram` of each class in its own small panel."""
    s, t = check_scores_targets(scores, targets)
    edges = np.linspace(min(0.0, s.min()), max(1.0, s.max()), bins + 1)
    fig, axes = _panels(s.shape[1], title)
    for c, ax in enumerate(axes):
        keep = t[:, c] != -1
        _histogram(ax, s[keep, c], t[keep, c] == 1, edges, legend=False)
        ax.set_title(str(classes[c]), fontsize=8)
    _label_outer(axes, _columns(axes), s.shape[1], "score", "share")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, label=n) for c, n in ((NEGATIVE, "negatives"), (POSITIVE, "positives"))]
    spare = len(axes) < _columns(axes) * axes[0].get_subplotspec().get_gridspec().nrows
    fig.legend(handles=handles, loc="lower right" if spare else "upper right", fontsize=9)  # in an empty cell
    fig.tight_layout()
    return _save(fig, out)


def _heatmap(ax: Any, m: np.ndarray, classes: Sequence[str], title: str, cmap: str, vmin: float, vmax: float,
             annotate: bool, names_left: bool) -> Any:
    """One K x K matrix with class names below (and on the left if ``names_left``: the panels sit side by side
    in the same class order) and, for few classes, the counts in the cells."""
    im = ax.imshow(m, cmap=cmap, vmin=vmin, vmax=vmax)
    k = len(classes)
    size = 8 if k <= 20 else 5
    ax.set_xticks(range(k), [str(c) for c in classes], rotation=90, fontsize=size)
    ax.set_yticks(range(k), [str(c) for c in classes] if names_left else [], fontsize=size)
    ax.set_title(title, fontsize=10)
    if annotate:
        for i, j in np.ndindex(m.shape):
            dark = abs(m[i, j]) > 0.6 * max(abs(vmin), abs(vmax))  # saturated cells included
            ax.text(j, i, str(int(m[i, j])), ha="center", va="center", fontsize=7,
                    color="white" if dark else "black")
    return im


def co_occurrence_plot(scores: Any, targets: Any, classes: Sequence[str], out: str | Path, title: str,
                       threshold: float = 0.5) -> Path:
    """Three K x K heatmaps side by side: images labelled with both classes (ground truth), images predicted
    with both (score >= ``threshold``), and predicted minus ground truth (red: predicted together more often
    than they occur; blue: less). The diagonals count the images of each class; the colour scales span the
    off-diagonal cells, so the diagonal saturates (the counts are printed for up to 15 classes)."""
    from matplotlib.ticker import MaxNLocator

    gt, pred = co_occurrence(scores, targets, threshold)
    k = len(gt)
    side = min(max(3.6, 0.3 * k + 1.2), 12.0)  # 80 classes: cells of about 15 px, names in 5 pt
    # constrained layout keeps the class names, panels and colour bars from overlapping
    fig = agg_figure(figsize=(3 * side + 2.4, side + 1.6), layout="constrained")
    axes = fig.subplots(1, 3)
    # colour scales from the off-diagonal cells: the diagonal (images per class) would wash out the pairs
    off = ~np.eye(k, dtype=bool)
    top = max(int(gt[off].max(initial=0)), int(pred[off].max(initial=0)), 1)
    annotate = k <= 15
    for ax, m, name in ((axes[0], gt, "ground truth"), (axes[1], pred, f"predicted (score >= {threshold:g})")):
        im = _heatmap(ax, m, classes, f"{name}:\nimages with both", "Greens", 0, top, annotate, ax is axes[0])
    fig.colorbar(im, ax=axes[:2].tolist(), shrink=0.6, label="images", extend="max", ticks=MaxNLocator(integer=True))
    diff = pred - gt
    span = max(int(np.abs(diff[off]).max(initial=0)), 1)
    im = _heatmap(axes[2], diff, classes, "predicted - ground truth:\nred = predicted together too often",
                  "RdBu_r", -span, span, annotate, False)
    fig.colorbar(im, ax=axes[2], shrink=0.6, label="images", extend="both", ticks=MaxNLocator(integer=True))
    fig.suptitle(title)
    return _save(fig, out)


def calibration_plot(scores: Any, targets: Any, out: str | Path, title: str, bins: int = 10) -> Path:
    """Reliability diagram: per bin of the predicted probability, the observed frequency of positives (dots at
    the bin's mean score, with the bin's count printed) against the diagonal of perfect calibration; below, the
    number of (image, class) pairs per bin on a log scale. The title gives the expected calibration error."""
    r = reliability(scores, targets, bins)
    fig = agg_figure(figsize=(6, 6.6))
    ax, axc = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
    full = r["count"] > 0
    ax.plot(r["mean_score"][full], r["frequency"][full], marker="o", color=NEGATIVE, label="observed")
    ax.set(ylabel="fraction of positives", xlim=(0, 1), ylim=(-0.02, 1.05),
           title=f"{title}\nexpected calibration error {100 * r['ece']:.1f} % ({bins} bins)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    edges = r["edges"]
    axc.bar(edges[:-1], r["count"], width=np.diff(edges), align="edge", color=NEGATIVE, alpha=0.6,
            edgecolor="white", label="(image, class) pairs")
    axc.bar(edges[:-1], r["positives"], width=np.diff(edges), align="edge", color=POSITIVE, alpha=0.9,
            edgecolor="white", label="of which positives")
    for x, n in zip((edges[:-1] + edges[1:]) / 2, r["count"]):  # the counts behind each dot, in numbers
        axc.text(x, max(n, 1) * 1.15, str(n), ha="center", va="bottom", fontsize=7)
    axc.set(xlabel="predicted probability", ylabel="pairs (log)", yscale="log",
            ylim=(0.7, max(int(r["count"].max()), 1) * 12))  # room for the numbers and the legend
    axc.legend(loc="upper center", fontsize=7, ncols=2)
    fig.tight_layout()
    return _save(fig, out)
