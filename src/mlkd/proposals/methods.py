"""Object proposal methods for one image, and the post-processing every cache entry goes through.

Box convention (everywhere in mlkd): ``(x1, y1, x2, y2)`` float32, 0-based pixel *edges* of the image file on
disk, ``x2``/``y2`` exclusive: a box covering pixel columns ``a..b`` (inclusive) has ``x1 = a, x2 = b + 1``,
so ``width = x2 - x1`` and ``torchvision.ops.box_area``/``box_iou`` need no ``+1``. OpenCV returns ``(x, y, w, h)``
rectangles, converted as ``(x, y, x + w, y + h)``.

Scores: EdgeBoxes' own box scores are kept (the teacher can weight RoI features by them). Selective search has
no score: every box gets 1.0 (the teacher's "no score -> s_r = 1" case) and its ranking is kept as the order.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import inspect
import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from mlkd.data.boxes import check_boxes
from mlkd.errors import BadInput, NotFound

SS_MODES = ("fast", "quality")


def _check_rgb(img_rgb: np.ndarray) -> None:
    if not (isinstance(img_rgb, np.ndarray) and img_rgb.dtype == np.uint8 and img_rgb.ndim == 3
            and img_rgb.shape[2] == 3):
        got = f"{img_rgb.dtype} {img_rgb.shape}" if isinstance(img_rgb, np.ndarray) else type(img_rgb).__name__
        raise BadInput(f"expected an RGB uint8 image of shape (H, W, 3), got {got}")


def rects_to_boxes(rects: np.ndarray) -> np.ndarray:
    """OpenCV ``(x, y, w, h)`` rectangles ``(R, 4)`` -> boxes ``(R, 4)`` float32 ``(x1, y1, x2, y2)``."""
    r = np.asarray(rects, dtype=np.float32).reshape(-1, 4)
    return np.concatenate([r[:, :2], r[:, :2] + r[:, 2:]], axis=1)


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c") or ctypes.util.find_library("msvcrt")
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def _seed_c_rand(seed: int) -> None:
    # OpenCV's selective search ranks regions by level * std::rand(): without re-seeding the C generator the
    # order (and so the top-R cut) would depend on which images a worker process handled before.
    libc = _libc()
    if libc is not None:
        libc.srand(ctypes.c_uint(seed))


def selective_search(img_rgb: np.ndarray, mode: str = "fast", base_k: int = 150, inc_k: int = 150,
                     sigma: float = 0.8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Selective search (``cv2.ximgproc.segmentation``) on one image.

    Args:
        img_rgb: ``(H, W, 3)`` uint8 RGB.
        mode: ``"fast"`` (2 colour spaces, 2 strategies) or ``"quality"`` (more of both; ~3-5x slower).
        base_k, inc_k, sigma: Felzenszwalb graph segmentation parameters (OpenCV defaults).
        seed: seeds the pseudo-random ranking so a given image always yields the same order.

    Returns:
        boxes ``(R, 4)`` float32 ``(x1, y1, x2, y2)`` in OpenCV's rank order, scores ``(R,)`` float32 all 1.0.
    """
    _check_rgb(img_rgb)
    if mode not in SS_MODES:
        raise BadInput(f"unknown selective search mode {mode!r}; choose one of {list(SS_MODES)}")
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(cv2.cvtColor(img_rgb, cv2.COLOR_RGB2BGR))  # its colour-space strategies assume BGR
    if mode == "fast":
        ss.switchToSelectiveSearchFast(base_k, inc_k, sigma)
    else:
        ss.switchToSelectiveSearchQuality(base_k, inc_k, sigma)
    _seed_c_rand(seed)
    boxes = rects_to_boxes(ss.process())
    return boxes, np.ones(len(boxes), np.float32)


def gradient_edge_map(img_rgb: np.ndarray, sigma: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """A model-free edge map for EdgeBoxes: thinned colour-gradient magnitude and its orientation.

    1. Gaussian blur (``sigma``), then 3x3 Sobel gradients of each RGB channel (values in [0, 1]);
       per pixel the channel with the largest magnitude is kept (colour edges, as in colour Canny).
    2. Orientation = direction of the gradient, ``atan2(gy, gx) mod pi`` (x right, y down): the same
       convention as ``StructuredEdgeDetection.computeOrientation`` (the edge *normal*), which EdgeBoxes uses.
    3. Non-maximum suppression along that normal (neighbours at +-1 px, bilinear), so edges are 1 px thin
       like structured-edge NMS output.
    4. Divided by the image's largest thinned magnitude, so the map is in [0, 1] as EdgeBoxes expects
       (its ``edgeMinMag`` = 0.1 threshold then means "10% of the strongest edge").

    Returns:
        edges ``(H, W)`` float32 in [0, 1], orientation ``(H, W)`` float32 in [0, pi).
    """
    _check_rgb(img_rgb)
    img = img_rgb.astype(np.float32) / 255.0
    if sigma > 0:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    gx = cv2.Sobel(img, cv2.CV_32F, 1, 0, ksize=3)  # (H, W, 3)
    gy = cv2.Sobel(img, cv2.CV_32F, 0, 1, ksize=3)
    mag = gx * gx + gy * gy
    best = mag.argmax(axis=2)[..., None]  # (H, W, 1) strongest channel
    gx = np.take_along_axis(gx, best, axis=2)[..., 0]
    gy = np.take_along_axis(gy, best, axis=2)[..., 0]
    mag = np.sqrt(np.take_along_axis(mag, best, axis=2)[..., 0])
    orient = np.mod(np.arctan2(gy, gx), np.pi).astype(np.float32)
    edges = _edge_nms(mag, orient)
    top = float(edges.max())
    if top > 0:
        edges /= top
    return edges.astype(np.float32), orient


def _edge_nms(mag: np.ndarray, orient: np.ndarray) -> np.ndarray:
    """Zero every pixel weaker than one of its two neighbours along the edge normal ``orient``."""
    h, w = mag.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    dx, dy = np.cos(orient), np.sin(orient)
    keep = np.ones_like(mag, dtype=bool)
    for sign in (-1.0, 1.0):
        neighbour = cv2.remap(mag, xs + sign * dx, ys + sign * dy, cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_REPLICATE)
        keep &= mag >= neighbour
    return np.where(keep, mag, 0.0).astype(np.float32)


@functools.lru_cache(maxsize=2)
def _structured_edge_detector(model_path: str):
    if not Path(model_path).is_file():
        raise NotFound(f"structured edge model not found: {model_path} (expected e.g. model.yml.gz "
                                "from opencv_extra's ximgproc test data)")
    return cv2.ximgproc.createStructuredEdgeDetection(model_path)


def structured_edge_map(img_rgb: np.ndarray, model_path: str) -> tuple[np.ndarray, np.ndarray]:
    """Structured-forest edges (Dollar & Zitnick) with OpenCV's orientation and NMS: what EdgeBoxes was made for."""
    _check_rgb(img_rgb)
    sed = _structured_edge_detector(str(model_path))
    edges = sed.detectEdges(img_rgb.astype(np.float32) / 255.0)  # the detector expects RGB float in [0, 1]
    orient = sed.computeOrientation(edges)
    return sed.edgesNms(edges, orient), orient


def edge_boxes(img_rgb: np.ndarray, model_path: str | None = None, max_boxes: int = 1000, alpha: float = 0.65,
               beta: float = 0.75, min_score: float = 0.01, min_box_area: float = 1000.0,
               edge_sigma: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """EdgeBoxes (``cv2.ximgproc.createEdgeBoxes``) on one image.

    Args:
        img_rgb: ``(H, W, 3)`` uint8 RGB.
        model_path: a structured-edge model (``model.yml.gz``); ``None`` uses :func:`gradient_edge_map`.
        max_boxes, alpha, beta, min_score, min_box_area: EdgeBoxes parameters (OpenCV/Dollar defaults;
            ``beta`` is its own NMS IoU threshold, ``alpha`` the sliding-window step IoU).
        edge_sigma: blur of the gradient edge map (unused with a model).

    Returns:
        boxes ``(R, 4)`` float32 ``(x1, y1, x2, y2)``, scores ``(R,)`` float32 EdgeBoxes scores, best first.
    """
    if model_path:
        edges, orient = structured_edge_map(img_rgb, model_path)
    else:
        edges, orient = gradient_edge_map(img_rgb, edge_sigma)
    eb = cv2.ximgproc.createEdgeBoxes(alpha=alpha, beta=beta, minScore=min_score, maxBoxes=int(max_boxes),
                                      minBoxArea=min_box_area)
    found = eb.getBoundingBoxes(edges, orient)
    # the binding returns (rects, scores); both come back as empty tuples when nothing is found
    rects, scores = found if isinstance(found, tuple) and len(found) == 2 else (found, None)
    boxes = rects_to_boxes(np.asarray(rects))
    scores = np.asarray(scores if scores is not None else (), np.float32).reshape(-1)
    if len(scores) != len(boxes):
        raise RuntimeError(f"EdgeBoxes returned {len(boxes)} boxes but {len(scores)} scores")
    return boxes, scores


METHODS = {"selective_search": selective_search, "edge_boxes": edge_boxes}


def clean_boxes(boxes: np.ndarray, scores: np.ndarray, img_hw: tuple[int, int], min_size: float = 0.0,
                max_proposals: int | None = None, nms_iou: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Post-process raw proposals into what the cache stores.

    Steps, in order: the box validator (:func:`mlkd.data.boxes.check_boxes`, policy ``clip``: clip to the
    image, ``0 <= x <= W``, ``0 <= y <= H``, drop what has no area left; non-finite boxes refused; a method's
    inverted boxes are dropped rather than refused); drop boxes with width or height ``< min_size``; sort by
    score, best first, ties kept in input (rank) order; drop exact duplicates (first kept); if ``nms_iou`` is
    set, drop near-duplicates with ``torchvision.ops.nms`` (IoU ``> nms_iou``, e.g. 0.95; off by default, as in
    Fast R-CNN's pipeline); keep the first ``max_proposals``.

    Args:
        boxes: ``(R, 4)`` ``(x1, y1, x2, y2)`` pixels; scores: ``(R,)``; img_hw: ``(H, W)`` of the image.

    Returns:
        boxes ``(R', 4)`` float32 and scores ``(R',)`` float32, ``R' <= max_proposals``.
    """
    boxes = np.asarray(boxes, np.float32)
    scores = np.asarray(scores, np.float32)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise BadInput(f"boxes must have shape (R, 4), got {boxes.shape}")
    if scores.shape != (len(boxes),):
        raise BadInput(f"scores must have shape ({len(boxes)},) to match boxes, got {scores.shape}")
    if not np.isfinite(scores).all():
        raise BadInput("proposal scores must be finite (found NaN or inf)")
    if max_proposals is not None and max_proposals < 0:
        raise BadInput(f"max_proposals must be >= 0 or None, got {max_proposals}")
    # clipping is routine for proposals (methods return boxes touching or crossing the border), so the
    # report's counts are not shown
    boxes, report = check_boxes(boxes, (int(img_hw[0]), int(img_hw[1])), "clip", "proposals of the image",
                                overrides={"inverted": "drop"})
    scores = scores[report.keep]
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    keep = (bw >= min_size) & (bh >= min_size)
    boxes, scores = boxes[keep], scores[keep]
    order = np.argsort(-scores, kind="stable")
    boxes, scores = boxes[order], scores[order]
    _, first = np.unique(boxes, axis=0, return_index=True)
    first = np.sort(first)
    boxes, scores = boxes[first], scores[first]
    if nms_iou is not None and len(boxes):
        boxes, scores = _nms_in_order(boxes, scores, nms_iou)
    if max_proposals is not None:
        boxes, scores = boxes[:max_proposals], scores[:max_proposals]
    return np.ascontiguousarray(boxes), np.ascontiguousarray(scores)


def _nms_in_order(boxes: np.ndarray, scores: np.ndarray, iou: float) -> tuple[np.ndarray, np.ndarray]:
    """NMS on boxes already sorted best first; a strictly decreasing surrogate score keeps ties in rank order."""
    import torch  # lazy: only this optional step needs torch in the worker processes
    from torchvision.ops import nms

    if not 0.0 <= iou <= 1.0 or math.isnan(iou):
        raise BadInput(f"nms_iou must be in [0, 1], got {iou}")
    rank = torch.arange(len(boxes), 0, -1, dtype=torch.float32)
    kept = np.sort(nms(torch.from_numpy(boxes), rank, iou).numpy())
    return boxes[kept], scores[kept]


# -- parameters and the whole pipeline for one image ------------------------------------------------------
#: post-processing parameters (see ``clean_boxes``) and their defaults; stored in the cache meta
CLEAN_DEFAULTS: dict[str, Any] = {"max_proposals": 500, "min_size": 8, "nms_iou": None}


def resolve_params(method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every parameter of ``method`` and of the post-processing, defaults filled in, unknown names rejected.

    The result is what goes into the cache meta, so two caches with the same meta were built the same way.
    """
    if method not in METHODS:
        raise BadInput(f"unknown proposal method {method!r}; choose one of {sorted(METHODS)}")
    sig = inspect.signature(METHODS[method])
    defaults = {n: p.default for n, p in list(sig.parameters.items())[1:]}  # skip the image argument
    resolved = {**defaults, **CLEAN_DEFAULTS}
    unknown = sorted(set(params or {}) - set(resolved))
    if unknown:
        raise BadInput(f"unknown parameter(s) {unknown} for method {method!r}; valid: {sorted(resolved)}")
    resolved.update(params or {})
    _check_values(resolved)
    if method == "edge_boxes" and resolved["model_path"]:
        resolved["model_path"] = str(Path(resolved["model_path"]).resolve())
        if not Path(resolved["model_path"]).is_file():
            raise NotFound(f"structured edge model not found: {resolved['model_path']}")
    return resolved


def _check_values(p: dict[str, Any]) -> None:
    """Reject bad parameter values up front rather than as one failure per image."""
    if "mode" in p and p["mode"] not in SS_MODES:
        raise BadInput(f"unknown selective search mode {p['mode']!r}; choose one of {list(SS_MODES)}")
    if p["max_proposals"] is not None and (not isinstance(p["max_proposals"], int) or p["max_proposals"] < 1):
        raise BadInput(f"max_proposals must be a positive integer, got {p['max_proposals']!r}")
    if not p["min_size"] >= 0:
        raise BadInput(f"min_size must be >= 0 pixels, got {p['min_size']!r}")
    if p["nms_iou"] is not None and not 0.0 < p["nms_iou"] <= 1.0:
        raise BadInput(f"nms_iou must be in (0, 1] or None, got {p['nms_iou']!r}")


def propose(img_rgb: np.ndarray, method: str, params: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Proposals of one RGB image: ``method`` with its parameters, then :func:`clean_boxes` with the
    post-processing ones; ``params`` as returned by :func:`resolve_params`."""
    params = dict(params)
    clean = {k: params.pop(k) for k in CLEAN_DEFAULTS}
    boxes, scores = METHODS[method](img_rgb, **params)
    return clean_boxes(boxes, scores, img_rgb.shape[:2], **clean)
