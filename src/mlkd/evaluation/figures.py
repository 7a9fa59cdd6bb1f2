"""Figures: the paper's example figure (teacher's top proposals in green, top-3 predictions in blue if correct,
red if wrong), per-class teacher detections, and annotated predictions.

All drawing is OpenCV on RGB uint8 arrays; each figure is the image (scaled to ``height`` pixels) with a white
text panel on its right.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from mlkd.errors import CannotWrite

GREEN, BLUE, RED, BLACK = (0, 200, 0), (30, 90, 255), (230, 30, 30), (0, 0, 0)
PANEL_WIDTH, LINE = 300, 22


def scaled(image: np.ndarray, height: int) -> tuple[np.ndarray, float]:
    """The image resized to ``height`` pixels high (aspect kept) and the scale factor."""
    s = height / image.shape[0]
    return cv2.resize(image, (max(1, round(image.shape[1] * s)), height), interpolation=cv2.INTER_NEAREST), s


def draw_boxes(image: np.ndarray, boxes: np.ndarray, colour: tuple[int, int, int], scale: float = 1.0,
               labels: Sequence[str] | None = None) -> np.ndarray:
    """Draw ``boxes (R, 4)`` (x1, y1, x2, y2 pixels of the original image) on a copy of ``image``."""
    out = np.ascontiguousarray(image.copy())
    for i, b in enumerate(np.asarray(boxes, np.float64).reshape(-1, 4) * scale):
        p1, p2 = (int(round(b[0])), int(round(b[1]))), (int(round(b[2])) - 1, int(round(b[3])) - 1)
        cv2.rectangle(out, p1, p2, colour, 2)
        if labels is not None:
            cv2.putText(out, labels[i], (p1[0] + 2, p1[1] + 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, colour, 1, cv2.LINE_AA)
    return out


def with_panel(image: np.ndarray, lines: Sequence[tuple[str, tuple[int, int, int]]]) -> np.ndarray:
    """``image`` with a white panel on its right holding ``(text, colour)`` lines."""
    h = max(image.shape[0], LINE * (len(lines) + 1))
    panel = np.full((h, PANEL_WIDTH, 3), 255, np.uint8)
    for i, (text, colour) in enumerate(lines):
        cv2.putText(panel, text, (8, LINE * (i + 1)), cv2.FONT_HERSHEY_SIMPLEX, 0.5, colour, 1, cv2.LINE_AA)
    canvas = np.full((h, image.shape[1], 3), 255, np.uint8)
    canvas[: image.shape[0]] = image
    return np.concatenate([canvas, panel], axis=1)


def top_k_lines(probs: np.ndarray, classes: Sequence[str], labels: np.ndarray | None, k: int = 3,
                title: str | None = None) -> list[tuple[str, tuple[int, int, int]]]:
    """Text lines of the ``k`` best classes with their scores; blue when the class is in ``labels``
    (labels 1), red when it is not, black without labels."""
    lines = [(title, BLACK)] if title else []
    for c in np.argsort(-probs, kind="stable")[:k]:
        colour = BLACK if labels is None else (BLUE if labels[c] == 1 else RED)
        lines.append((f"  {classes[c]} {probs[c]:.2f}", colour))
    return lines


def save_rgb(path: str | Path, image: np.ndarray) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise CannotWrite(f"could not write {path}")
    return path


def top_by_objectness(regions: np.ndarray, n: int = 10) -> np.ndarray:
    """Indices of the ``n`` proposals of highest objectness s' = sum_k S (region scores ``(R, K)``), best first."""
    return np.argsort(-regions.sum(1), kind="stable")[:n]


def teacher_figure(image: np.ndarray, proposals: np.ndarray, regions: np.ndarray, image_scores: np.ndarray,
                   classes: Sequence[str], labels: np.ndarray | None, top_proposals: int = 10,
                   height: int = 360) -> np.ndarray:
    """The teacher side of the paper's figure: the ``top_proposals`` proposals by objectness s' = sum_k S in
    green (S: a refined teacher's refined region scores), and the teacher's top-3 classes by ``image_scores``."""
    top = top_by_objectness(regions, top_proposals)
    big, s = scaled(image, height)
    lines = top_k_lines(image_scores, classes, labels, 3, f"teacher top-3 (top-{len(top)} proposals)")
    return with_panel(draw_boxes(big, proposals[top], GREEN, s), lines)


def detections_figure(image: np.ndarray, boxes: np.ndarray, scores: np.ndarray, cls: np.ndarray,
                      classes: Sequence[str], labels: np.ndarray, height: int = 360) -> np.ndarray:
    """The teacher's detections ``boxes (D, 4)``, ``scores (D,)``, class indices ``cls (D,)`` (e.g. the best of
    each class after NMS: :func:`mlkd.models.wsddn.class_detections`) of the classes present in the image."""
    present = np.isin(cls, np.flatnonzero(labels == 1))
    big, s = scaled(image, height)
    names = [f"{classes[c]} {p:.2f}" for c, p in zip(cls[present], scores[present])]
    lines = [("detections of present classes", BLACK)] + [(f"  {n}", GREEN) for n in names]
    return with_panel(draw_boxes(big, boxes[present], GREEN, s, names), lines)


def kd_figure(image: np.ndarray, proposals: np.ndarray, regions: np.ndarray, plain: np.ndarray, kd: np.ndarray,
              classes: Sequence[str], labels: np.ndarray, height: int = 360) -> np.ndarray:
    """The paper's example figure: the teacher's top-10 proposals in green; the student's top-3 predictions
    without and with distillation (blue = correct, red = wrong)."""
    top = top_by_objectness(regions, 10)
    big, s = scaled(image, height)
    lines = [("labels:", BLACK)] + [(f"  {classes[c]}", BLACK) for c in np.flatnonzero(labels == 1)] + [("", BLACK)]
    lines += top_k_lines(plain, classes, labels, 3, "student without KD:") + [("", BLACK)]
    lines += top_k_lines(kd, classes, labels, 3, "student with KD:")
    return with_panel(draw_boxes(big, proposals[top], GREEN, s), lines)


def ranked_figure(image: np.ndarray, probs: np.ndarray, classes: Sequence[str], labels: np.ndarray,
                  header: Sequence[str], title: str, boxes: np.ndarray | None = None,
                  height: int = 300) -> np.ndarray:
    """One image of an evaluation gallery: ``boxes`` (e.g. the teacher's top proposals by objectness) in green;
    a panel with the ``header`` lines, the top-3 classes under ``title`` (blue correct, red wrong) and the true
    labels (1) that are not among them."""
    big, s = scaled(image, height)
    lines = [(h, BLACK) for h in header] + top_k_lines(probs, classes, labels, 3, title)
    missed = [c for c in np.flatnonzero(labels == 1) if c not in np.argsort(-probs, kind="stable")[:3]]
    if missed:
        lines += [("true labels not in the top-3:", BLACK)] + [(f"  {classes[c]} {probs[c]:.2f}", BLACK)
                                                                 for c in missed]
    drawn = big if boxes is None or len(boxes) == 0 else draw_boxes(big, boxes, GREEN, s)
    return with_panel(drawn, lines)


def grid(figures: Sequence[np.ndarray], columns: int = 2) -> np.ndarray:
    """Figures tiled in rows of ``columns`` (padded white to a common size)."""
    h = max(f.shape[0] for f in figures)
    w = max(f.shape[1] for f in figures)
    tiles = [np.pad(f, ((0, h - f.shape[0]), (0, w - f.shape[1]), (0, 0)), constant_values=255) for f in figures]
    tiles += [np.full((h, w, 3), 255, np.uint8)] * (-len(tiles) % columns)
    rows = [np.concatenate(tiles[i:i + columns], axis=1) for i in range(0, len(tiles), columns)]
    return np.concatenate(rows, axis=0)
