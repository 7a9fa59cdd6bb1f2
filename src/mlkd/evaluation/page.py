"""The ``--plots DIR`` folder of ``mlkd evaluate`` and ``mlkd evaluate-teacher``: every chart of
:mod:`mlkd.evaluation.charts`, a gallery of the best and worst images, and an ``index.html`` that shows them with the
key numbers (plain HTML and CSS: no script, nothing fetched, opens from the folder).

The gallery ranks images by their **image AP**: the image's classes ranked by its scores with its labels as
positives (:func:`mlkd.metrics.per_image_ap`); 1 means every true label outranks every other class. It needs
no threshold, so it also ranks a model whose probabilities all stay under 0.5.
"""

from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from mlkd.data.base import read_image
from mlkd.errors import BadInput, CannotWrite
from mlkd.evaluation.charts import (calibration_plot, class_bars, co_occurrence_plot, pr_curves, score_histogram,
                               score_histograms)
from mlkd.evaluation.figures import grid, ranked_figure, top_by_objectness
from mlkd.metrics.classification import check_scores_targets
from mlkd.metrics.curves import per_image_ap, reliability
from mlkd.utils.checkpoint import write_atomically

logger = logging.getLogger(__name__)

GALLERY_SIZE = 6
TOP_PROPOSALS = 10
TILE_GAP = 12  # white pixels between the gallery's tiles

# what each file shows, in the order of the page: (file, caption)
CAPTIONS = {
    "ap_per_class.png": "Per-class AP (mlic, the mAP's protocol), best first; the dashed line is the mAP.",
    "pr_curves.png": "Precision-recall curve of every class. Each step holds a point's precision back to the "
                     "previous recall, so the shaded area is exactly the AP in the panel's title.",
    "scores_pooled.png": "Scores of all (image, class) pairs: positives against negatives, each as its share of "
                         "its own count (log scale). The dotted line is the 0.5 threshold of CF1 / OF1.",
    "scores_per_class.png": "The same per class.",
    "co_occurrence.png": "Label co-occurrence: images labelled with both classes, images predicted with both "
                         "(score >= 0.5), and their difference (red: predicted together more often than true). "
                         "The diagonals count the images of each class; the colours are scaled to the other "
                         "cells, so the diagonal saturates.",
    "calibration.png": "Reliability: per bin of the predicted probability, the observed fraction of positives "
                       "(n = pairs in the bin); on the diagonal a score of p is right a fraction p of the time.",
    "detection_ap_per_class.png": "Per-class detection AP (VOC07 11-point, IoU 0.5, per-class NMS 0.4 on the "
                                  "region scores); the dashed line is the detection mAP.",
    "corloc_per_class.png": "Per-class CorLoc: the share of positive images whose top-scoring proposal hits a box "
                            "of the class (IoU 0.5); black ticks: the largest-proposal baseline.",
    "gallery_best.jpg": "The images of highest image AP.",
    "gallery_worst.jpg": "The images of lowest image AP.",
}

# the page's sections: (title, note, files, side by side); the galleries are full width to stay readable
SECTIONS = [
    ("Per-class bars", "", ["ap_per_class.png", "detection_ap_per_class.png", "corloc_per_class.png"], True),
    ("Precision-recall", "", ["pr_curves.png"], False),
    ("Scores", "", ["scores_pooled.png", "calibration.png", "scores_per_class.png"], True),
    ("Label co-occurrence", "", ["co_occurrence.png"], False),
    ("Gallery", "Images ranked by image AP: the image's classes ranked by its scores, its labels as positives (1 "
                "when every true label comes before every other class; ties: more labels first). Top-3 classes in "
                "blue when correct, red when wrong.", ["gallery_best.jpg", "gallery_worst.jpg"], False),
]

CSS = """body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;max-width:1240px;
margin:0 auto;padding:16px 24px;color:#222;line-height:1.4}h1{font-size:1.5em;margin-bottom:4px}
h2{font-size:1.2em;margin-top:32px;border-bottom:1px solid #ddd}.meta{color:#555;font-size:.9em}
table{border-collapse:collapse;margin:8px 0;font-size:.88em}td,th{border:1px solid #ccc;padding:2px 8px;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.key td:last-child{font-weight:600}figure{margin:16px 0}figure img{max-width:100%;border:1px solid #ddd}
figcaption{color:#444;font-size:.9em;max-width:900px}.thumbs{display:flex;flex-wrap:wrap;gap:12px}
.thumbs figure{flex:1 1 560px}.tables{display:flex;flex-wrap:wrap;column-gap:32px;align-items:flex-start}"""


def check_plots_folder(out: str | Path | None) -> None:
    """Refuse a ``--plots`` path that exists and is not a folder, before anything is evaluated."""
    if out and Path(out).exists() and not Path(out).is_dir():
        raise BadInput(f"the plots folder {out} is a file; give a folder (created if missing), e.g. "
                       f"{Path(out).with_suffix('')}_plots")


def gallery_order(image_ap: np.ndarray, num_labels: np.ndarray, n: int = GALLERY_SIZE
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the ``n`` best and the ``n`` worst images by image AP (NaN: no label, left out). Among the
    best, ties (many images rank their labels perfectly) go to the image with more labels, the harder case;
    then to the lower index."""
    idx = np.flatnonzero(~np.isnan(image_ap))
    best = idx[np.lexsort((idx, -num_labels[idx], -image_ap[idx]))][:n]
    worst = idx[np.argsort(image_ap[idx], kind="stable")][:n]
    return best, worst


def _gallery(out: Path, which: str, order: np.ndarray, image_ap: np.ndarray, scores: np.ndarray,
             targets: np.ndarray, classes: Sequence[str], ids: Sequence[str], paths: Sequence[str | Path],
             kind: str, proposals: Sequence[np.ndarray] | None, regions: Sequence[np.ndarray] | None) -> Path:
    """A grid of :func:`mlkd.evaluation.figures.ranked_figure` of the images ``order``, written as JPEG (photos)."""
    figures = []
    for rank, i in enumerate(order, 1):
        boxes = None
        title = f"{kind} top-3:"
        if proposals is not None and regions is not None:
            boxes = proposals[i][top_by_objectness(regions[i], TOP_PROPOSALS)]
            title = f"{kind} top-3 (top-{len(boxes)} proposals):"
        header = [f"{which} #{rank}: image AP {image_ap[i]:.2f}", _short(str(ids[i]), 34)]
        fig = ranked_figure(read_image(paths[i]), scores[i], classes, targets[i], header, title, boxes)
        figures.append(np.pad(fig, ((0, TILE_GAP), (0, TILE_GAP), (0, 0)), constant_values=255))
    if not figures:  # no image has a label: a blank tile rather than a missing file
        figures = [np.full((60, 300, 3), 255, np.uint8)]
    image = grid(figures, columns=2)
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise CannotWrite(f"could not encode the gallery {out}")
    return write_atomically(out, lambda f: f.write(data.tobytes()), "gallery")


def _short(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters with a leading ellipsis (ids end with what tells them apart)."""
    return text if len(text) <= width else "..." + text[-(width - 3):]


def write_plots(out: str | Path, kind: str, report: dict[str, Any], scores: Any, targets: Any,
                image_ids: Sequence[str], image_paths: Sequence[str | Path],
                proposals: Sequence[np.ndarray] | None = None, region_scores: Sequence[np.ndarray] | None = None,
                gallery_size: int = GALLERY_SIZE) -> list[Path]:
    """Write every chart, the galleries and ``index.html`` of an evaluation into the folder ``out``.

    ``kind`` is ``"student"`` or ``"teacher"``; ``report`` the evaluation's report (``classification`` and, for a
    teacher with boxes, ``detection`` / ``corloc`` / ``corloc_largest_proposal``); ``scores`` ``(N, K)`` the
    probabilities (a teacher's image scores) and ``targets`` ``(N, K)`` the labels, rows in the order of
    ``image_ids`` / ``image_paths``. With a teacher's ``proposals`` and ``region_scores`` the gallery draws its
    top proposals by objectness. Returns the paths written, ``index.html`` last.
    """
    if kind not in ("student", "teacher"):
        raise BadInput(f"kind must be 'student' or 'teacher', got {kind!r}")
    s, t = check_scores_targets(scores, targets)
    if len(image_ids) != len(s) or len(image_paths) != len(s):
        raise BadInput(f"{len(image_ids)} image ids and {len(image_paths)} paths for {len(s)} score rows")
    check_plots_folder(out)
    out = Path(out)
    cls = report["classification"]
    classes = cls["class_names"] or [str(c) for c in range(s.shape[1])]
    what = f"{kind}, {_dataset_name(report)}"
    files = [
        class_bars(cls["ap"]["mlic"], classes, out / "ap_per_class.png", f"{what}: per-class AP (mlic)", "AP"),
        pr_curves(s, t, classes, out / "pr_curves.png", f"{what}: precision-recall curves"),
        score_histogram(s, t, out / "scores_pooled.png", f"{what}: scores of positives and negatives"),
        score_histograms(s, t, classes, out / "scores_per_class.png", f"{what}: scores per class"),
        co_occurrence_plot(s, t, classes, out / "co_occurrence.png", f"{what}: label co-occurrence",
                           cls["threshold"]),
        calibration_plot(s, t, out / "calibration.png", f"{what}: reliability"),
    ]
    if "detection" in report:
        files.append(class_bars(report["detection"]["ap"], classes, out / "detection_ap_per_class.png",
                                f"{what}: detection AP@0.5 (VOC07)", "detection AP"))
        files.append(class_bars(report["corloc"]["per_class"], classes, out / "corloc_per_class.png",
                                f"{what}: CorLoc", "CorLoc",
                                reference=report["corloc_largest_proposal"]["per_class"],
                                reference_label="largest proposal"))
    image_ap = per_image_ap(s, t)
    best, worst = gallery_order(image_ap, (t == 1).sum(1), gallery_size)
    for which, order in (("best", best), ("worst", worst)):
        files.append(_gallery(out / f"gallery_{which}.jpg", which, order, image_ap, s, t, classes, image_ids,
                              image_paths, kind, proposals, region_scores))
    page = index_html(kind, report, [f.name for f in files], reliability(s, t)["ece"],
                      float(np.nanmean(image_ap)) if (~np.isnan(image_ap)).any() else float("nan"))
    files.append(write_atomically(out / "index.html", lambda f: f.write(page.encode()), "index"))
    logger.info(f"{len(files)} plot files written to {out}")
    return files


def _dataset_name(report: dict[str, Any]) -> str:
    d = report.get("dataset") or {}
    return f"{d.get('name', 'dataset')}/{d.get('split', '?')}"


def _pct(x: Any) -> str:
    return "n/a" if x is None or np.isnan(float(x)) else f"{100 * float(x):.2f}"


def key_numbers(report: dict[str, Any], ece: float, mean_image_ap: float) -> list[tuple[str, str]]:
    """The rows of the page's key-number table: (what, value in %)."""
    c = report["classification"]
    thr, k = c["threshold"], c["k"]
    rows = [(f"mAP ({mode})", _pct(v)) for mode, v in c["mAP"].items()]
    for key, rule in (("all_labels", f"p >= {thr:g}"), ("top_k", f"top-{k}")):
        rows += [(f"CF1 ({rule})", _pct(c[key]["CF1"])), (f"OF1 ({rule})", _pct(c[key]["OF1"]))]
    rows += [("mean image AP (gallery's ranking)", _pct(mean_image_ap)),
             ("expected calibration error (10 bins)", _pct(ece))]
    if "detection" in report:
        rows += [("detection mAP@0.5 (VOC07)", _pct(report["detection"]["mAP"])),
                 ("CorLoc", _pct(report["corloc"]["corloc"])),
                 ("CorLoc of the largest-proposal baseline", _pct(report["corloc_largest_proposal"]["corloc"]))]
    return rows


def _per_class_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-class table: positives, AP of every mode, and the teacher's detection numbers."""
    c = report["classification"]
    names = c["class_names"] or [str(i) for i in range(c["num_classes"])]
    head = ["class", "positives"] + [f"AP {m}" for m in c["ap"]]
    extra = []
    if "detection" in report:
        head += ["detection AP", "CorLoc"]
        extra = [report["detection"]["ap"], report["corloc"]["per_class"]]
    rows = []
    for i, name in enumerate(names):
        rows.append([name, str(c["num_positives"][i])] + [_pct(c["ap"][m][i]) for m in c["ap"]]
                    + [_pct(float(v[i])) for v in extra])
    return head, rows


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], css_class: str = "") -> str:
    e = html.escape
    out = [f'<table class="{css_class}">' if css_class else "<table>",
           "<tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{e(v)}</td>" for v in row) + "</tr>" for row in rows]
    return "\n".join(out + ["</table>"])


def _figure(name: str) -> str:
    e = html.escape
    return (f'<figure><a href="{e(name)}"><img src="{e(name)}" alt="{e(name)}"></a>'
            f"<figcaption><b>{e(name)}</b>: {e(CAPTIONS.get(name, ''))}</figcaption></figure>")


def index_html(kind: str, report: dict[str, Any], files: Sequence[str], ece: float, mean_image_ap: float) -> str:
    """The page: what was evaluated, the key numbers (in %), every file with a caption, the per-class table."""
    e = html.escape
    c = report["classification"]
    meta = [f"{c['num_images']} images, {c['num_classes']} classes, dataset {_dataset_name(report)}"]
    if report.get("checkpoint"):
        meta.append(f"checkpoint {report['checkpoint']}")
    if report.get("settings"):
        meta.append("settings " + ", ".join(f"{k}={v}" for k, v in report["settings"].items()))
    excluded = ", ".join(x["name"] or str(x["index"]) for x in c["excluded_classes"])
    sections = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>mlkd evaluation: {e(kind)} on {e(_dataset_name(report))}</title>", f"<style>{CSS}</style>",
        "</head><body>", f"<h1>mlkd evaluation: {e(kind)}</h1>",
        "".join(f'<div class="meta">{e(m)}</div>' for m in meta),
        '<div class="tables"><div><h2>Key numbers (%)</h2>',
        _table(["metric", "value"], key_numbers(report, ece, mean_image_ap), "key"),
        f'<p class="meta">Excluded from mAP (no positives): {e(excluded)}</p>' if excluded else "",
        '<p class="meta">Definitions: docs/evaluation.md of mlkd.</p></div>',
        "<div><h2>Per class (%)</h2>", _table(*_per_class_rows(report)), "</div></div>",
    ]
    for title, note, names, side_by_side in SECTIONS:
        present = [n for n in names if n in files]
        if present:
            sections += [f"<h2>{e(title)}</h2>", f'<p class="meta">{e(note)}</p>' if note else "",
                         '<div class="thumbs">' if side_by_side else "<div>", *map(_figure, present), "</div>"]
    sections.append("</body></html>")
    return "\n".join(s for s in sections if s) + "\n"
