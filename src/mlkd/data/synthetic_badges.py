"""The second look of the synthetic dataset, "badges": classes told apart by how two colours are arranged.

Each object is a badge: an outer shape of one colour with an inner shape of another, nested, the inner one
covering half of the badge's area. A class is an ordered colour pair, e.g. ``orange_cyan`` (orange outside,
cyan inside). Five colours give 10 classes, each colour outside in two of them and inside in two others. What
makes it hard at low resolution, and different from the first look (shapes with fine textures):

- **The arrangement is the cue, not the colours.** The reversed pair (cyan outside, orange inside) is an
  unlabelled distractor, and so are badges of one class colour only. Since the inner
  shape covers half the badge, a badge and its reverse average to the *same* colour once downsampled below the
  badge's size: only a view that resolves the badge tells them apart.
- **Shape is no cue**: a badge's shape (disc, square or diamond, the inner one the same shape scaled by
  1/sqrt(2); all left-right symmetric, so flips keep classes) is drawn at random for every object.
- **Mixed sizes**: about 45 % of the objects are small (5-10 % of the longer image side), the others up to
  40 %; 1-4 objects and 0-4 distractors per image, never overlapping, so each box is the tight box of its
  badge.
- **Clutter of another kind** than the first look: a noisy tiled background with rectangles, some in class
  colours, and pixel noise.

Image ``i`` is drawn from ``numpy.random.default_rng([seed, i])`` like the first look (see
:mod:`mlkd.data.synthetic`, which writes either look).
"""

from __future__ import annotations

import cv2
import numpy as np

from mlkd.errors import BadInput

BADGE_COLOURS = {  # RGB
    "orange": (240, 140, 30), "cyan": (40, 200, 210), "violet": (130, 70, 220), "lime": (150, 220, 40),
    "pink": (240, 90, 160),
}
SMALL_FRACTION, SMALL_SIDE, LARGE_SIDE = 0.45, (0.05, 0.10), (0.10, 0.40)
MIN_SIDE = 8
INNER = 1 / np.sqrt(2)  # the inner shape's scale: half of the badge's area


def badge_classes() -> list[tuple[str, str]]:
    """The 10 (outer, inner) colour pairs: colour i outside of colours i+1 and i+2 (mod 5)."""
    colours = list(BADGE_COLOURS)
    return [(colours[i], colours[(i + step) % 5]) for step in (1, 2) for i in range(5)]


def badge_class_names(num_classes: int = 10) -> list[str]:
    names = [f"{outer}_{inner}" for outer, inner in badge_classes()]
    if not 2 <= num_classes <= len(names):
        raise BadInput(f"num_classes must be in [2, {len(names)}] for the badges look, got {num_classes}")
    return names[:num_classes]


def _shape(mask: np.ndarray, kind: str, scale: float, value: int) -> None:
    """Fill a centred disc, square or diamond covering ``scale`` of the mask's width and height."""
    h, w = mask.shape
    cx, cy, rx, ry = (w - 1) / 2, (h - 1) / 2, (w - 1) / 2 * scale, (h - 1) / 2 * scale
    if kind == "disc":
        cv2.ellipse(mask, (round(cx), round(cy)), (max(1, round(rx)), max(1, round(ry))), 0, 0, 360, value, -1)
        return
    corners = [(-1, -1), (1, -1), (1, 1), (-1, 1)] if kind == "square" else [(0, -1), (1, 0), (0, 1), (-1, 0)]
    pts = np.array([[cx + dx * rx, cy + dy * ry] for dx, dy in corners]).round().astype(np.int32)
    cv2.fillPoly(mask, [pts], value)


def _badge(img: np.ndarray, x0: int, y0: int, side: int, outer: np.ndarray, inner: np.ndarray | None,
           rng: np.random.Generator) -> tuple[int, int, int, int]:
    """Paint a badge (``inner`` None: one colour) with its top-left at (x0, y0); return its tight box."""
    kind = ("disc", "square", "diamond")[rng.integers(3)]
    mask = np.zeros((side, side), np.uint8)
    _shape(mask, kind, 1.0, 1)
    if inner is not None:  # the same shape scaled by 1/sqrt(2): inside the outer one, half of its area
        _shape(mask, kind, INNER, 2)
    region = img[y0:y0 + side, x0:x0 + side]
    jitter = rng.normal(0, 10, 3)
    region[mask == 1] = np.clip(outer + jitter, 0, 255)
    if inner is not None:
        region[mask == 2] = np.clip(inner + jitter, 0, 255)
    ys, xs = np.nonzero(mask)
    return x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1


def _spot(rng: np.random.Generator, size: tuple[int, int], taken: list[tuple[int, int, int, int]],
          tries: int = 30) -> tuple[int, int, int] | None:
    """A free square spot (x0, y0, side) with a 1-pixel gap to every taken box, or None."""
    h, w = size
    lo, hi = SMALL_SIDE if rng.random() < SMALL_FRACTION else LARGE_SIDE
    side = int(np.clip(round(rng.uniform(lo, hi) * max(size)), MIN_SIDE, min(size)))
    for _ in range(tries):
        x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        if all(x0 + side + 1 <= tx1 or tx2 + 1 <= x0 or y0 + side + 1 <= ty1 or ty2 + 1 <= y0
               for tx1, ty1, tx2, ty2 in taken):
            taken.append((x0, y0, x0 + side, y0 + side))
            return x0, y0, side
    return None


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    tile = int(rng.integers(6, 14))
    grid = rng.uniform(40, 110, size=(h // tile + 1, w // tile + 1, 3)).astype(np.float32)
    img = np.ascontiguousarray(np.kron(grid, np.ones((tile, tile, 1)))[:h, :w].astype(np.uint8))
    palette = np.array(list(BADGE_COLOURS.values()), float)
    for _ in range(rng.integers(3, 8)):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        colour = palette[rng.integers(5)] * rng.uniform(0.5, 0.9) if rng.random() < 0.5 else rng.uniform(30, 160, 3)
        cv2.rectangle(img, (x, y), (x + int(rng.integers(3, w // 4)), y + int(rng.integers(2, 6))), colour.tolist(), -1)
    return img


def render_badges(rng: np.random.Generator, num_classes: int = 10, image_size: int = 160
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image of the badges look: RGB uint8 ``(H, W, 3)`` with max(H, W) = ``image_size``, boxes
    ``(M, 4)`` float32 (x1, y1, x2, y2) pixel edges of the M >= 1 labelled badges, their class indices."""
    pairs = badge_classes()[:num_classes]
    badge_class_names(num_classes)  # checks num_classes
    short = int(round(image_size * rng.uniform(0.75, 1.0)))
    h, w = (short, image_size) if rng.random() < 0.5 else (image_size, short)
    img = _background(rng, h, w)
    taken: list[tuple[int, int, int, int]] = []
    boxes, labels = [], []
    for k in rng.integers(0, num_classes, size=rng.integers(1, 5)):
        spot = _spot(rng, (h, w), taken)
        if spot is not None:
            outer, inner = (np.array(BADGE_COLOURS[c], float) for c in pairs[k])
            boxes.append(_badge(img, *spot, outer, inner, rng))
            labels.append(int(k))
    for _ in range(rng.integers(0, 5)):
        spot = _spot(rng, (h, w), taken)
        if spot is None:
            continue
        outer, inner = pairs[rng.integers(num_classes)]
        colours = (inner, outer) if rng.random() < 0.6 else (outer, None)  # the reversed pair, or one colour
        _badge(img, *spot, np.array(BADGE_COLOURS[colours[0]], float),
               None if colours[1] is None else np.array(BADGE_COLOURS[colours[1]], float), rng)
    noisy = img.astype(np.float32) + rng.normal(0, 6, img.shape).astype(np.float32)
    assert boxes, "the first badge always fits in an empty image"
    return noisy.clip(0, 255).astype(np.uint8), np.asarray(boxes, np.float32), np.asarray(labels, np.int64)
