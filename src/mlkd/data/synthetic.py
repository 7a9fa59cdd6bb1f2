"""A synthetic multi-label detection dataset in which region-level detail matters: the first look, "shapes"
(:func:`generate` also writes the second, "badges": :mod:`mlkd.data.synthetic_badges`).

Each class is an (outline, texture) pair, e.g. ``circle_stripes``: outlines are circle, square, triangle,
hexagon, star (all left-right symmetric, so a horizontal flip never changes a class); class textures are
stripes, checker, dots and rings. The first 10 classes are the 5 outlines x {stripes, checker}; up to 20
classes add dots and rings. The design makes the whole-image, low-resolution view insufficient:

- **Texture is the fine detail.** Classes with the same outline differ only in texture, and a texture is a
  2-colour pattern (the object's colour and a darker shade of it) whose period is 2·d pixels with
  d = max(2, side / 10): fine on small objects, coarser on big ones. Every texture covers about half the
  object, so once an image is downsampled by more than ~d the pattern averages to one flat shade: the
  texture survives at the teacher's resolution (native or upsampled) but fades in a downsampled whole image,
  first on the small objects.
- **Colour is shared.** An object's colour is that of its outline (jittered), so colour tells the outline
  but never the texture; distractors reuse the same colours.
- **Distractors** (0-3 per image, never labelled): class outlines filled with a flat shade equal to a
  texture's mean, or with random speckle (same mean, no structure); and non-class outlines (cross, ring,
  bar) filled with class textures. So neither a colour histogram, nor an outline, nor a texture alone
  tells a class: the evidence is the outline *and* texture of one region.
- **Clutter**: a smooth random background, random lines (some in class colours), blobs, pixel noise.
- 1-4 objects per image, about a third of them small (side 7-12 % of the longer image side, drawn
  in patches of at least 10 px).
  Objects and distractors do not overlap, so every ground-truth box is the tight box of its visible shape.

Images are ``image_size`` on the longer side and 75-100 % of that on the other (random orientation).
Boxes are continuous pixel edges (x1, y1, x2, y2): a shape covering columns 10..19 has x1 = 10, x2 = 20.
Image ``i`` is drawn from ``numpy.random.default_rng([seed, i])``, so a dataset is deterministic for a seed
and a larger ``num_images`` only appends images. The output is the custom format of :mod:`mlkd.data.custom`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from tqdm import tqdm

from mlkd.data.custom import CLASSES_FILE, write_jsonl_annotations
from mlkd.data.synthetic_badges import badge_class_names, render_badges
from mlkd.errors import BadInput, CannotWrite

OUTLINE_COLOURS = {  # RGB; shared by every class (and distractor) of that outline
    "circle": (225, 60, 50), "square": (50, 100, 230), "triangle": (40, 185, 70),
    "hexagon": (235, 205, 40), "star": (205, 70, 210),
}
CLASS_TEXTURES = ("stripes", "checker", "dots", "rings")
DISTRACTOR_OUTLINES = ("cross", "ring", "bar")
DISTRACTOR_TEXTURES = ("solid", "speckle")
IMAGE_FORMATS = {"png": [cv2.IMWRITE_PNG_COMPRESSION, 1], "jpg": [cv2.IMWRITE_JPEG_QUALITY, 95]}
SMALL_FRACTION, SMALL_SIDE, LARGE_SIDE = 0.35, (0.07, 0.12), (0.12, 0.40)  # sides as fractions of image size
MIN_SIDE, MIN_IMAGE_SIZE = 10, 64


def class_names(num_classes: int = 10) -> list[str]:
    """The first ``num_classes`` names ``outline_texture``; texture-major so pairs share an outline."""
    names = [f"{o}_{t}" for t in CLASS_TEXTURES for o in OUTLINE_COLOURS]
    if not 2 <= num_classes <= len(names):
        raise BadInput(f"num_classes must be in [2, {len(names)}], got {num_classes}")
    return names[:num_classes]


def _poly(mask: np.ndarray, unit_points: np.ndarray) -> None:
    """Fill a polygon given in unit coordinates ([0, 1] x [0, 1]) scaled to the mask."""
    h, w = mask.shape
    pts = np.round(unit_points * [w - 1, h - 1]).astype(np.int32)
    cv2.fillPoly(mask, [pts], 255)


def _star_points(n: int = 5, inner: float = 0.45) -> np.ndarray:
    angles = -np.pi / 2 + np.arange(2 * n) * np.pi / n  # first vertex points up: symmetric left-right
    radius = np.where(np.arange(2 * n) % 2 == 0, 0.5, 0.5 * inner)
    return np.stack([0.5 + radius * np.cos(angles), 0.5 + radius * np.sin(angles)], 1)


def _ellipse(mask: np.ndarray, fraction: float = 1.0, value: int = 255) -> None:
    """Fill the ellipse inscribed in the mask, its axes scaled by ``fraction``, with ``value``."""
    h, w = mask.shape
    axes = (max(1, round((w - 1) / 2 * fraction)), max(1, round((h - 1) / 2 * fraction)))
    cv2.ellipse(mask, ((w - 1) // 2, (h - 1) // 2), axes, 0, 0, 360, value, -1)


def _ring(mask: np.ndarray) -> None:
    _ellipse(mask)
    _ellipse(mask, 0.55, 0)


def _cross(mask: np.ndarray) -> None:
    h, w = mask.shape
    cv2.rectangle(mask, (w // 3, 0), (w - 1 - w // 3, h - 1), 255, -1)
    cv2.rectangle(mask, (0, h // 3), (w - 1, h - 1 - h // 3), 255, -1)


HEXAGON = np.stack([0.5 + 0.5 * np.cos(np.arange(6) * np.pi / 3), 0.5 + 0.5 * np.sin(np.arange(6) * np.pi / 3)], 1)
SHAPES: dict[str, Callable[[np.ndarray], None]] = {  # each fills a uint8 mask (h, w) in place
    "circle": _ellipse,
    "square": lambda m: m.fill(255),
    "triangle": lambda m: _poly(m, np.array([[0.5, 0.0], [1.0, 1.0], [0.0, 1.0]])),
    "hexagon": lambda m: _poly(m, HEXAGON),
    "star": lambda m: _poly(m, _star_points()),
    "cross": _cross,
    "ring": _ring,
    "bar": lambda m: m.fill(255),
}


def _pattern(texture: str, h: int, w: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean ``(h, w)``: where the texture takes the object colour (about half of the area each)."""
    yy, xx = np.mgrid[0:h, 0:w]
    py, px = rng.integers(0, 2 * d, size=2)  # random phase: the pattern is not tied to the box corner
    if texture == "stripes":
        return ((yy + py) // d) % 2 == 0
    if texture == "checker":
        return (((yy + py) // d) + ((xx + px) // d)) % 2 == 0
    if texture == "dots":  # disc radius 0.4 * period covers ~50 % of each cell
        p = 2 * d + 1
        return ((yy + py) % p - p // 2) ** 2 + ((xx + px) % p - p // 2) ** 2 <= (0.4 * p) ** 2
    if texture == "rings":
        return (np.hypot(yy - (h - 1) / 2, xx - (w - 1) / 2) // d) % 2 == 0
    if texture == "speckle":
        return rng.random((h, w)) < 0.5
    raise BadInput(f"unknown texture {texture!r}")


def _paint(texture: str, colour: np.ndarray, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """``(h, w, 3)`` uint8 patch: a 2-colour texture, or the flat shade equal to a texture's mean."""
    fg = np.clip(colour + rng.normal(0, 12, 3), 0, 255)
    dark = fg * rng.uniform(0.2, 0.4)
    if texture == "solid":
        return np.broadcast_to((fg + dark) / 2, (h, w, 3)).astype(np.uint8)
    d = max(2, round(max(h, w) / 10))
    on = _pattern(texture, h, w, d, rng)[..., None]
    return np.where(on, fg, dark).astype(np.uint8)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth random field + lines (some in class colours) + blobs: clutter with no class meaning."""
    coarse = rng.uniform(15, 120, size=(rng.integers(3, 7), rng.integers(3, 7), 3)).astype(np.float32)
    img = np.ascontiguousarray(cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC).clip(0, 255).astype(np.uint8))
    palette = np.array(list(OUTLINE_COLOURS.values()))
    for _ in range(rng.integers(2, 6)):
        centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        axes = (int(rng.integers(w // 20, w // 6)), int(rng.integers(h // 20, h // 6)))
        colour = rng.uniform(20, 140, 3)
        cv2.ellipse(img, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour.tolist(), -1)
    for _ in range(rng.integers(3, 9)):
        p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        p2 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        colour = palette[rng.integers(len(palette))] * rng.uniform(0.5, 1.0) if rng.random() < 0.5 \
            else rng.uniform(20, 200, 3)
        cv2.line(img, p1, p2, colour.tolist(), int(rng.integers(1, 3)))
    return img


def _draw(img: np.ndarray, x0: int, y0: int, h: int, w: int, outline: str, texture: str, colour: np.ndarray,
          rng: np.random.Generator) -> tuple[int, int, int, int]:
    """Paint one shape with its top-left at (x0, y0); return its tight box (x1, y1, x2, y2), pixel edges."""
    mask = np.zeros((h, w), np.uint8)
    SHAPES[outline](mask)
    region = img[y0:y0 + h, x0:x0 + w]
    on = mask > 0
    region[on] = _paint(texture, colour, h, w, rng)[on]
    if min(h, w) >= 16:  # a crisp dark edge, inside the mask; on small shapes it would hide the texture
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(region, contours, -1, (colour * 0.15).tolist(), 1)
    ys, xs = np.nonzero(on)
    return x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1


def _place(rng: np.random.Generator, size: tuple[int, int], taken: list[tuple[int, int, int, int]],
           aspect: float, tries: int = 30) -> tuple[int, int, int, int] | None:
    """Pick a size and a free spot: (x0, y0, h, w) not touching any ``taken`` box, or None if none fits."""
    img_h, img_w = size
    lo, hi = SMALL_SIDE if rng.random() < SMALL_FRACTION else LARGE_SIDE
    side = max(MIN_SIDE, rng.uniform(lo, hi) * max(size))
    h = int(np.clip(round(side / np.sqrt(aspect)), MIN_SIDE, img_h))
    w = int(np.clip(round(side * np.sqrt(aspect)), MIN_SIDE, img_w))
    for _ in range(tries):
        x0, y0 = int(rng.integers(0, img_w - w + 1)), int(rng.integers(0, img_h - h + 1))
        # keep a 1-pixel gap to every taken box so that no shape touches or hides another
        if all(x0 + w + 1 <= tx1 or tx2 + 1 <= x0 or y0 + h + 1 <= ty1 or ty2 + 1 <= y0
               for tx1, ty1, tx2, ty2 in taken):
            taken.append((x0, y0, x0 + w, y0 + h))
            return x0, y0, h, w
    return None


def render_image(rng: np.random.Generator, num_classes: int = 10,
                 image_size: int = 160) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw one image.

    Returns:
        image (ndarray[H, W, 3] uint8 RGB), max(H, W) = ``image_size``;
        boxes (ndarray[M, 4] float32), (x1, y1, x2, y2) pixel edges of the M >= 1 labelled objects;
        box_labels (ndarray[M] int64), class indices into :func:`class_names`.
    """
    if image_size < MIN_IMAGE_SIZE:
        raise BadInput(f"image_size must be >= {MIN_IMAGE_SIZE} pixels, got {image_size}")
    names = class_names(num_classes)
    short = int(round(image_size * rng.uniform(0.75, 1.0)))
    h, w = (short, image_size) if rng.random() < 0.5 else (image_size, short)
    img = _background(rng, h, w)
    taken: list[tuple[int, int, int, int]] = []
    boxes, labels = [], []
    for k in rng.integers(0, num_classes, size=rng.integers(1, 5)):
        outline, texture = names[k].split("_")
        spot = _place(rng, (h, w), taken, rng.uniform(0.8, 1.25))
        if spot is not None:
            boxes.append(_draw(img, spot[0], spot[1], spot[2], spot[3], outline, texture,
                               np.array(OUTLINE_COLOURS[outline], float), rng))
            labels.append(int(k))
    for _ in range(rng.integers(0, 4)):
        _distractor(img, rng, taken)
    noisy = img.astype(np.float32) + rng.normal(0, 5, img.shape).astype(np.float32)
    assert boxes, "the first object always fits in an empty image"
    return noisy.clip(0, 255).astype(np.uint8), np.asarray(boxes, np.float32), np.asarray(labels, np.int64)


def _distractor(img: np.ndarray, rng: np.random.Generator, taken: list[tuple[int, int, int, int]]) -> None:
    """A class outline with a non-class fill, or a non-class outline with a class texture (unlabelled)."""
    palette = list(OUTLINE_COLOURS)
    if rng.random() < 0.5:
        outline = palette[rng.integers(len(palette))]
        texture, colour = DISTRACTOR_TEXTURES[rng.integers(2)], OUTLINE_COLOURS[outline]
        aspect = rng.uniform(0.8, 1.25)
    else:
        outline = DISTRACTOR_OUTLINES[rng.integers(len(DISTRACTOR_OUTLINES))]
        texture, colour = CLASS_TEXTURES[rng.integers(len(CLASS_TEXTURES))], OUTLINE_COLOURS[palette[rng.integers(5)]]
        aspect = (3.0 if rng.random() < 0.5 else 1 / 3) if outline == "bar" else rng.uniform(0.8, 1.25)
    spot = _place(rng, img.shape[:2], taken, aspect)
    if spot is not None:
        _draw(img, spot[0], spot[1], spot[2], spot[3], outline, texture, np.array(colour, float), rng)


LOOKS = {"shapes": (class_names, render_image), "badges": (badge_class_names, render_badges)}


def generate(out_dir: str | Path, num_images: int, seed: int = 0, image_size: int = 160,
             val_fraction: float = 0.25, num_classes: int = 10, image_format: str = "png",
             progress: bool = True, look: str = "shapes") -> dict[str, Path]:
    """Write the dataset under ``out_dir`` in the custom format; return ``{split: annotation file}``.

    ``look`` is ``shapes`` (this module: outlines with fine textures) or ``badges``
    (:mod:`mlkd.data.synthetic_badges`: nested colour pairs). Layout: ``images/{train,val}/NNNNNN.png``,
    ``train.jsonl``, ``val.jsonl`` (absent if ``val_fraction`` is 0), ``classes.txt`` and ``meta.json`` (the
    generator's arguments). Images ``0 .. n_train - 1`` form the train split and the last
    ``round(num_images * val_fraction)`` (at least 1 when the fraction is > 0) the val split.
    """
    if look not in LOOKS:
        raise BadInput(f"unknown look {look!r}; choose one of {sorted(LOOKS)}")
    names_of, render = LOOKS[look]
    if image_format not in IMAGE_FORMATS:
        raise BadInput(f"unknown image format {image_format!r}; choose one of {sorted(IMAGE_FORMATS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise BadInput(f"val_fraction must be in [0, 1), got {val_fraction}")
    num_val = max(1, round(num_images * val_fraction)) if val_fraction > 0 else 0
    if num_images < 1 or num_images - num_val < 1:
        raise BadInput(f"num_images={num_images} leaves no training image with val_fraction={val_fraction}")
    names = names_of(num_classes)
    out = Path(out_dir)
    rows: dict[str, list[dict]] = {"train": [], "val": []}
    for i in tqdm(range(num_images), desc="synth", unit="img", disable=not progress):
        split = "train" if i < num_images - num_val else "val"
        image, boxes, labels = render(np.random.default_rng([seed, i]), num_classes, image_size)
        rel = f"images/{split}/{i:06d}.{image_format}"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(out / rel), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), IMAGE_FORMATS[image_format]):
            raise CannotWrite(f"could not write image {out / rel}")
        rows[split].append({
            "path": rel,
            "labels": [names[k] for k in sorted(set(labels.tolist()))],
            "boxes": [[*map(int, b), names[k]] for b, k in zip(boxes.tolist(), labels.tolist())],
        })
    (out / CLASSES_FILE).write_text("".join(f"{c}\n" for c in names), encoding="utf-8")
    meta = dict(generator="mlkd.data.synthetic", look=look, num_images=num_images, seed=seed, image_size=image_size,
                val_fraction=val_fraction, num_classes=num_classes, image_format=image_format)
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    files = {}
    for split, split_rows in rows.items():
        if split_rows:
            files[split] = out / f"{split}.jsonl"
            write_jsonl_annotations(files[split], split_rows)
    return files
