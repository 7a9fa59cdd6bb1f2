"""The one validator every box goes through on its way into mlkd: annotations, imported and generated proposals,
proposal caches read back.

Boxes are ``(R, 4)`` float32 ``(x1, y1, x2, y2)``, 0-based pixel edges of the image file, ``x2``/``y2`` exclusive
(conventions.md). A box has at most one defect, the first of :data:`DEFECTS` that applies:

- ``non_finite``: a coordinate is NaN or +-inf;
- ``inverted``: ``x2 < x1`` or ``y2 < y1``;
- ``zero_area``: ``x2 == x1`` or ``y2 == y1``;
- ``out_of_image``: beyond ``[0, W] x [0, H]`` (only checked where the image size is known).

What happens to a defective box depends on the policy (:data:`BOX_POLICIES`):

- ``refuse``: any defect is a :class:`~mlkd.errors.BadInput` naming where, the count of each defect and the first
  bad boxes;
- ``clip``: out-of-image boxes are clipped to the image, and dropped when nothing is left inside it; zero-area
  boxes are dropped; non-finite and inverted boxes are refused (no clipping can say what they meant);
- ``drop``: every defective box is dropped.

Nothing is changed silently: every call returns a :class:`BoxReport` with the counts, which callers sum and show.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from mlkd.errors import BadInput

BOX_POLICIES = ("refuse", "clip", "drop")
DEFECTS = ("non_finite", "inverted", "zero_area", "out_of_image")
DEFECT_TEXT = {"non_finite": "non-finite (NaN or inf)", "inverted": "inverted (x2 < x1 or y2 < y1)",
               "zero_area": "zero-area (x2 == x1 or y2 == y1)", "out_of_image": "out-of-image"}
# What each policy does with each defect: "refuse", "clip" (out_of_image only) or "drop".
ACTIONS: dict[str, dict[str, str]] = {
    "refuse": dict.fromkeys(DEFECTS, "refuse"),
    "clip": {"non_finite": "refuse", "inverted": "refuse", "zero_area": "drop", "out_of_image": "clip"},
    "drop": dict.fromkeys(DEFECTS, "drop"),
}
MAX_SHOWN = 5  # bad boxes quoted in an error or kept as examples in a report


def check_policy(policy: str, what: str = "bad_boxes") -> str:
    """``policy`` if it is one of :data:`BOX_POLICIES`, else a ``BadInput`` naming ``what`` and the valid ones."""
    if policy not in BOX_POLICIES:
        raise BadInput(f"{what} must be one of {list(BOX_POLICIES)}, got {policy!r}")
    return policy


@dataclass
class BoxReport:
    """What a check found and did. Sums over many checks with :meth:`add`.

    ``found``: boxes per defect (each box under its first defect); ``clipped``: out-of-image boxes clipped and kept;
    ``dropped``: boxes removed per defect (``out_of_image``: nothing was left inside the image after clipping);
    ``unsized``: boxes whose image size was unknown, so out-of-image was not checked; ``examples``: up to
    :data:`MAX_SHOWN` ``"where: box [..] defect -> action"`` lines; ``keep``: ``(M',)`` int64 positions of the
    kept input boxes, in input order (of the last check only; empty after :meth:`add`).
    """

    total: int = 0
    found: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DEFECTS, 0))
    clipped: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DEFECTS, 0))
    unsized: int = 0
    examples: list[str] = field(default_factory=list)
    keep: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    @property
    def changed(self) -> bool:
        """True when a box was clipped or dropped."""
        return bool(self.clipped or self.num_dropped)

    def add(self, other: "BoxReport") -> None:
        """Add ``other``'s counts and examples to this report."""
        self.total += other.total
        self.clipped += other.clipped
        self.unsized += other.unsized
        for d in DEFECTS:
            self.found[d] += other.found[d]
            self.dropped[d] += other.dropped[d]
        self.examples += other.examples[:MAX_SHOWN - len(self.examples)]
        self.keep = np.zeros(0, np.int64)

    def summary(self) -> str:
        """One line, e.g. ``"1200 boxes checked: 3 out-of-image clipped to the image, 1 zero-area dropped"``."""
        parts = [f"{self.clipped} out-of-image clipped to the image"] if self.clipped else []
        parts += [f"{n} {DEFECT_TEXT[d].split(' (')[0]} dropped" + (" (entirely outside the image)"
                                                                     if d == "out_of_image" else "")
                  for d, n in self.dropped.items() if n]
        text = ", ".join(parts) or "none defective"
        if self.unsized:
            text += f"; {self.unsized} not checked against their image (size unknown)"
        return f"{self.total} boxes checked: {text}"


def classify(boxes: np.ndarray, image_hw: tuple[int, int] | np.ndarray | None) -> np.ndarray:
    """``(R,)`` int8: 0 for a valid box, else ``1 + DEFECTS.index(first defect)``.

    ``boxes``: ``(R, 4)`` x1y1x2y2; ``image_hw``: ``(H, W)`` of the image, an ``(R, 2)`` array of each box's
    image size (rows of NaN: size unknown), or None (out-of-image not checked).
    """
    b = np.asarray(boxes).reshape(-1, 4)
    with np.errstate(invalid="ignore"):
        x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
        code = np.zeros(len(b), np.int8)
        if image_hw is not None:  # lowest priority first: later assignments win
            hw = np.broadcast_to(np.asarray(image_hw, np.float64).reshape(-1, 2), (len(b), 2))
            code[(x1 < 0) | (y1 < 0) | (x2 > hw[:, 1]) | (y2 > hw[:, 0])] = 4  # NaN sizes compare False
        code[(x2 == x1) | (y2 == y1)] = 3
        code[(x2 < x1) | (y2 < y1)] = 2
        code[~np.isfinite(b).all(axis=1)] = 1
    return code


def _describe(box: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box.tolist()) + "]"


def _refusal(where: str, boxes: np.ndarray, code: np.ndarray, refused: np.ndarray, policy: str, sized: bool,
             name_box: Callable[[int], str], hint: str) -> BadInput:
    counts = ", ".join(f"{int((code[refused] == k + 1).sum())} {DEFECT_TEXT[d]}" for k, d in enumerate(DEFECTS)
                       if (code[refused] == k + 1).any())
    idx = np.flatnonzero(refused)
    first = "; ".join(f"{name_box(int(i))}: x1y1x2y2 {_describe(boxes[i])} "
                      f"{DEFECT_TEXT[DEFECTS[code[i] - 1]].split(' (')[0]}" for i in idx[:MAX_SHOWN])
    inside = " inside the image [0, W] x [0, H]" if sized else ""
    why = (" (policy 'clip' refuses non-finite and inverted boxes: only 'drop' removes them)"
           if policy == "clip" else "")
    return BadInput(f"{where}: {len(idx)} of {len(boxes)} boxes are defective{why}: {counts}; first: {first}"
                    f"{'' if len(idx) <= MAX_SHOWN else f' ... and {len(idx) - MAX_SHOWN} more'}; expected finite "
                    f"(x1, y1, x2, y2) pixels with x1 < x2 and y1 < y2{inside}{'; ' + hint if hint else ''}")


def _clip_to_image(boxes: np.ndarray, rows: np.ndarray, image_hw: tuple[int, int] | np.ndarray) -> np.ndarray:
    """Clip ``boxes[rows]`` in place to their images; the mask of rows that clipping left empty."""
    hw = np.broadcast_to(np.asarray(image_hw, np.float32).reshape(-1, 2), (len(boxes), 2))[rows]
    boxes[rows] = np.clip(boxes[rows], 0.0, np.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], axis=1))
    return rows & ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]))


def check_boxes(boxes: np.ndarray, image_hw: tuple[int, int] | np.ndarray | None, policy: str, where: str,
                name_box: Callable[[int], str] | None = None, hint: str = "",
                overrides: Mapping[str, str] | None = None) -> tuple[np.ndarray, BoxReport]:
    """Validate boxes under ``policy`` (module docstring); return the kept boxes and a report.

    Args:
        boxes: ``(R, 4)`` ``(x1, y1, x2, y2)`` pixels, any float dtype (checked as the float32 mlkd stores).
        image_hw: ``(H, W)`` of their image, an ``(R, 2)`` array of each box's image size (NaN rows: unknown),
            or None: out-of-image is then not checked.
        policy: ``"refuse"``, ``"clip"`` or ``"drop"``.
        where: names the source in messages (a file, ``file:line``, an image id and its cache).
        name_box: box position -> how the message names it (default ``"box i"``, 0-based).
        hint: appended to a refusal, e.g. how to choose another policy.
        overrides: defect -> action replacing the policy's, for internal callers (proposal generation drops the
            inverted boxes of a method instead of refusing them).

    Returns:
        boxes ``(R', 4)`` float32 (clipped where the policy clips) and the :class:`BoxReport`
        (``report.keep`` indexes the input rows kept, for their labels and scores).
    """
    actions = {**ACTIONS[check_policy(policy, "box policy")], **(overrides or {})}
    b = np.array(boxes, np.float32)
    if b.size == 0:
        b = b.reshape(0, 4)
    elif b.ndim != 2 or b.shape[1] != 4:
        raise BadInput(f"{where}: boxes must be an (R, 4) array of (x1, y1, x2, y2), got shape {b.shape}")
    code = classify(b, image_hw)
    report = BoxReport(total=len(b), keep=np.arange(len(b), dtype=np.int64))
    if image_hw is not None and np.ndim(image_hw) == 2:
        report.unsized = int(np.isnan(np.asarray(image_hw, np.float64)).any(axis=1).sum())
    elif image_hw is None:
        report.unsized = len(b)
    if not code.any():
        return b, report
    name_box = name_box or (lambda i: f"box {i}")
    refused = np.zeros(len(b), bool)
    for k, d in enumerate(DEFECTS):
        report.found[d] = int((code == k + 1).sum())
        if actions[d] == "refuse":
            refused |= code == k + 1
    if refused.any():
        raise _refusal(where, b, code, refused, policy, image_hw is not None, name_box, hint)
    drop = np.zeros(len(b), bool)
    for k, d in enumerate(DEFECTS):
        if actions[d] == "drop":
            drop |= code == k + 1
    out = b.copy()
    clip = code == 4 if actions["out_of_image"] == "clip" else np.zeros(len(b), bool)
    if clip.any():
        empty = _clip_to_image(out, clip, image_hw)
        report.clipped = int((clip & ~empty).sum())
        drop |= empty
    for k, d in enumerate(DEFECTS):
        report.dropped[d] = int((drop & (code == k + 1)).sum())
    report.keep = np.flatnonzero(~drop)
    report.examples = [f"{where}: {name_box(int(i))}: x1y1x2y2 {_describe(b[i])} {DEFECT_TEXT[DEFECTS[code[i] - 1]]}"
                       f" -> {'dropped' if drop[i] else 'clipped to ' + _describe(out[i])}"
                       for i in np.flatnonzero(code)[:MAX_SHOWN]]
    return np.ascontiguousarray(out[~drop]), report
