"""Proposal files of other tools: WSDDN / selective-search ``.mat`` files and the original release's datalist.

``.mat`` (as released with WSDDN and the selective-search / EdgeBoxes proposal sets for Fast R-CNN):
variables ``images`` (cell array of image ids, or numbers), ``boxes`` (cell array of ``R x 4`` arrays
``[y1 x1 y2 x2]``, 1-based, inclusive) and optionally ``boxScores`` (cell array of ``R x 1``; absent -> 1.0).
Scores are returned as float32, as written; the import (:mod:`mlkd.proposals.convert`) refuses non-finite ones.
Conversion to mlkd's ``(x1, y1, x2, y2)`` (0-based, ``x2`` exclusive)::

    x1 = x1_mat - 1,  y1 = y1_mat - 1,  x2 = x2_mat,  y2 = y2_mat     (and back: x1_mat = x1 + 1, x2_mat = x2)

i.e. the inclusive 1-based last pixel ``x2_mat`` is the exclusive 0-based right edge: same pixels, no rounding.

The release's datalist lines are read and written by :mod:`mlkd.data.datalist` (a datalist is also a dataset);
they are re-exported here beside the ``.mat`` functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

from mlkd.data.datalist import (DatalistEntry, format_datalist_line, parse_datalist_line, read_datalist,
                                write_datalist)
from mlkd.errors import BadInput, NotFound
from mlkd.utils.optional import optional_import

__all__ = ["DatalistEntry", "boxes_to_mat", "format_datalist_line", "mat_to_boxes", "parse_datalist_line",
           "read_datalist", "read_mat_proposals", "write_datalist", "write_mat_proposals"]


def _scipy_io():
    """scipy.io, imported on first use: only .mat files need it (the ``[mat]`` extra)."""
    return optional_import("scipy.io", "mat", "reading or writing .mat proposal files")


# -- .mat ------------------------------------------------------------------------------------------------
def mat_to_boxes(yxyx_1based: np.ndarray) -> np.ndarray:
    """``(R, 4)`` ``[y1 x1 y2 x2]`` 1-based inclusive -> ``(R, 4)`` float32 ``(x1, y1, x2, y2)`` 0-based exclusive."""
    b = np.asarray(yxyx_1based, np.float64).reshape(-1, 4)
    return np.stack([b[:, 1] - 1, b[:, 0] - 1, b[:, 3], b[:, 2]], axis=1).astype(np.float32)


def boxes_to_mat(boxes: np.ndarray) -> np.ndarray:
    """Inverse of :func:`mat_to_boxes`: ``(R, 4)`` ``(x1, y1, x2, y2)`` -> ``(R, 4)`` float64 ``[y1 x1 y2 x2]``."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.stack([b[:, 1] + 1, b[:, 0] + 1, b[:, 3], b[:, 2]], axis=1)


def _cell_to_id(value: object) -> str:
    """One entry of the ``images`` cell array (a string, or a number such as a COCO id) -> an id string."""
    arr = np.asarray(value)
    if arr.dtype.kind in "US":
        return "".join(str(s) for s in arr.ravel()).strip()
    if arr.size == 1 and np.issubdtype(arr.dtype, np.number):
        v = arr.item()
        return str(int(v)) if float(v).is_integer() else str(v)
    raise BadInput(f"cannot read an image id from {arr!r}")


def read_mat_proposals(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read a proposals ``.mat`` file: ``image id -> (boxes (R, 4) float32 x1y1x2y2, scores (R,) float32)``."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"proposal .mat file not found: {path}")
    try:
        mat = _scipy_io().loadmat(str(path), squeeze_me=False)
    except NotImplementedError as e:  # MATLAB v7.3 files are HDF5
        raise BadInput(f"{path} is a MATLAB v7.3 (HDF5) file; re-save it in MATLAB with save(..., '-v7')") from e
    except (ValueError, TypeError, OSError, IndexError) as e:  # scipy raises IndexError on short files
        raise BadInput(f"cannot read {path} as a MATLAB .mat file: {e}") from e
    found = sorted(k for k in mat if not k.startswith("__"))
    for var in ("images", "boxes"):
        if var not in mat:
            raise BadInput(f"{path} has no variable {var!r} (found {found}); expected 'images' (ids) and "
                             "'boxes' (cell array of R x 4 [y1 x1 y2 x2], 1-based), optionally 'boxScores'")
    images = mat["images"]
    ids = [s.strip() for s in images.ravel()] if images.dtype.kind == "U" else [_cell_to_id(v) for v in images.ravel()]
    cells = mat["boxes"].ravel()
    score_cells = mat["boxScores"].ravel() if "boxScores" in mat else None
    if len(cells) != len(ids) or (score_cells is not None and len(score_cells) != len(ids)):
        raise BadInput(f"{path}: {len(ids)} images but {len(cells)} 'boxes' entries"
                         + ("" if score_cells is None else f" and {len(score_cells)} 'boxScores' entries"))
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for i, (image_id, cell) in enumerate(zip(ids, cells)):
        if image_id in out:
            raise BadInput(f"{path}: image {image_id!r} is listed twice (entries {ids.index(image_id) + 1} and "
                           f"{i + 1} of 'images'); which boxes belong to it?")
        raw = np.asarray(cell)
        if raw.size and (raw.ndim != 2 or raw.shape[1] != 4):
            raise BadInput(f"{path}: boxes{{{i + 1}}} (image {image_id!r}) has shape {raw.shape}, expected R x 4")
        boxes = mat_to_boxes(raw)
        with np.errstate(over="ignore"):  # a score beyond float32 becomes inf, which the import refuses by name
            scores = (np.ones(len(boxes), np.float32) if score_cells is None
                      else np.asarray(score_cells[i], np.float32).reshape(-1))
        if len(scores) != len(boxes):
            raise BadInput(f"{path}: image {image_id!r} has {len(boxes)} boxes but {len(scores)} boxScores")
        out[image_id] = (boxes, scores)
    return out


def write_mat_proposals(path: str | Path, items: Iterable[tuple[str, np.ndarray, np.ndarray]]) -> None:
    """Write ``(image_id, boxes (R, 4) x1y1x2y2, scores (R,))`` items as a WSDDN-layout ``.mat`` (cell arrays)."""
    items = list(items)
    n = len(items)
    images, boxes, scores = (np.empty((n, 1), dtype=object) for _ in range(3))
    for i, (image_id, b, s) in enumerate(items):
        images[i, 0] = str(image_id)
        boxes[i, 0] = boxes_to_mat(b)
        scores[i, 0] = np.asarray(s, np.float64).reshape(-1, 1)
    _scipy_io().savemat(str(path), {"images": images, "boxes": boxes, "boxScores": scores}, do_compression=True)
