"""Transforms that move ``boxes`` and ``proposals`` with the image, and a multi-scale collate function.

Every transform is a callable ``(image, target) -> (image, target)`` where ``image`` is ``Tensor[3, H, W]``
uint8 and ``target`` is the dict of :mod:`mlkd.data.base`. The boxes in ``target["boxes"]`` and
``target["proposals"]`` (``Tensor[R, 4]``, (x1, y1, x2, y2) pixels of the *current* image, 0-based) are moved
with the pixels, and ``target["size"]`` (``Tensor[2]`` int64) is set to the returned image's (H, W).
The input dict is never modified: a shallow copy is returned.

Box coordinates are continuous pixel-edge coordinates, the torchvision convention: a box covering pixel
columns 10..19 has x1 = 10, x2 = 20. Then resizing multiplies by the scale and a horizontal flip maps
x -> W - x exactly, so flipping twice is the identity and a warp followed by its inverse is too.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from torch.utils.data import get_worker_info
from torchvision.tv_tensors import BoundingBoxFormat

from mlkd.data.base import Transform, collate
from mlkd.errors import BadInput

Target = dict[str, Any]
BOX_KEYS = ("boxes", "proposals")  # every key whose value lives in the image's pixel frame


def _check_image(image: torch.Tensor) -> tuple[int, int]:
    """Return (H, W) of a ``Tensor[3, H, W]``; ``ValueError`` naming the bad shape otherwise."""
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise BadInput(f"expected an image Tensor[3, H, W], got {got}")
    return int(image.shape[1]), int(image.shape[2])


def _check_boxes(boxes: torch.Tensor, what: str = "boxes") -> None:
    if not isinstance(boxes, torch.Tensor) or boxes.ndim != 2 or boxes.shape[1] != 4:
        got = tuple(boxes.shape) if isinstance(boxes, torch.Tensor) else type(boxes).__name__
        raise BadInput(f"expected {what} as Tensor[R, 4] (x1, y1, x2, y2), got {got}")


def _hw(size: int | Sequence[int], what: str) -> tuple[int, int]:
    """Normalise ``size`` (an int or an (h, w) pair) to a positive (h, w) tuple."""
    hw = (size, size) if isinstance(size, (int, np.integer)) else tuple(size) if isinstance(size, Sequence) else ()
    if len(hw) != 2 or not all(_is_positive_int(v) for v in hw):
        raise BadInput(f"{what} must be a positive int or an (h, w) pair of positive ints, got {size!r}")
    return int(hw[0]), int(hw[1])


def _is_positive_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0


def rescale_boxes(boxes: torch.Tensor, from_hw: Sequence[int], to_hw: Sequence[int]) -> torch.Tensor:
    """Map boxes from an image of size ``from_hw`` to the same image resized to ``to_hw``.

    Args:
        boxes (Tensor[R, 4]): (x1, y1, x2, y2) pixels of the ``from_hw`` image.
        from_hw, to_hw: (H, W) of the source and destination frames, e.g. (672, 672) -> (224, 224) to move
            teacher proposals into the student's frame.

    Returns:
        Tensor[R, 4] of the same dtype: x scaled by to_W / from_W, y by to_H / from_H (no clamping).
    """
    _check_boxes(boxes)
    src, dst = _hw(tuple(int(v) for v in from_hw), "from_hw"), _hw(tuple(int(v) for v in to_hw), "to_hw")
    out, _ = F.resize_bounding_boxes(boxes, canvas_size=src, size=list(dst), clamping_mode=None)
    return out


def _resize(image: torch.Tensor, target: Target, hw: tuple[int, int]) -> tuple[torch.Tensor, Target]:
    """Resize pixels (bilinear, antialiased) and every box key of ``target`` to ``hw`` = (H, W)."""
    old = _check_image(image)
    target = dict(target)
    if old != hw:
        image = F.resize(image, list(hw), antialias=True)
        for key in BOX_KEYS:
            if key in target:
                target[key] = rescale_boxes(target[key], old, hw)
    target["size"] = torch.tensor(hw, dtype=torch.int64)
    return image, target


class Warp:
    """Resize to a fixed size ignoring aspect (the release warps every image to 672 x 672).

    Args:
        size: an int for a ``size x size`` square, or an (h, w) pair.
    """

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = _hw(size, "Warp size")

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        return _resize(image, target, self.size)

    def __repr__(self) -> str:
        return f"Warp(size={self.size})"


def shorter_side_size(hw: Sequence[int], size: int, max_size: int | None = None) -> tuple[int, int]:
    """(H, W) after scaling ``hw`` so its shorter side is ``size``, unless the longer side would then
    exceed ``max_size``, in which case the longer side becomes ``max_size`` (Fast R-CNN's rule)."""
    h, w = hw
    scale = size / min(h, w)
    if max_size is not None and max(h, w) * scale > max_size:
        scale = max_size / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


class ResizeShorter:
    """Aspect-preserving resize: the shorter side becomes ``size``, the longer one is capped at ``max_size``.
    (The original WSDDN code sizes its images differently: :class:`ResizeWSDDN`.)

    Args:
        size: target length of the shorter side, pixels.
        max_size: cap on the longer side (None = no cap). Must be >= ``size``.
    """

    def __init__(self, size: int, max_size: int | None = None) -> None:
        if not _is_positive_int(size):
            raise BadInput(f"ResizeShorter size must be a positive int, got {size!r}")
        if max_size is not None and (not isinstance(max_size, (int, np.integer)) or max_size < size):
            raise BadInput(f"ResizeShorter max_size must be an int >= size ({size}) or None, got {max_size!r}")
        self.size, self.max_size = int(size), max_size

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        hw = shorter_side_size(_check_image(image), self.size, self.max_size)
        return _resize(image, target, hw)

    def __repr__(self) -> str:
        return f"ResizeShorter(size={self.size}, max_size={self.max_size})"


def wsddn_reader_size(hw: Sequence[int], size: int) -> tuple[int, int]:
    """(H, W) that the original WSDDN code's image reader gives an (H, W) image at scale ``size``.

    ``cnn_wsddn_get_batch.m`` computes the height that would make the *longer* side ``size``,
    ``floor(min(size/H, size/W) * H)`` (MATLAB doubles), and passes it to MatConvNet's ``vl_imreadjpeg`` as a
    scalar ``'Resize'``, which sets the *shorter* side to it: both sides are multiplied by ``target / min(H, W)``
    and rounded (float32 and ``roundf``, half away from zero, in the MatConvNet that WSDDN pins). The net
    effect is that the **width** becomes ``size``: a landscape image gets its longer side about ``size`` and
    its shorter side about ``size * H / W``; a portrait image gets its shorter side ``size`` (or ``size - 1``,
    when the double product falls just below it) and its longer side about ``size * H / W``. The floor of the
    target height can take up to W / H pixels off a landscape image's width (575 instead of 576 for a
    375 x 500 VOC image at 576).
    """
    h, w = (int(v) for v in hw)
    target = max(1, math.floor(min(size / h, size / w) * h))  # the reader refuses a size below 1
    scale = max(np.float32(target) / np.float32(w), np.float32(target) / np.float32(h))  # float32, as the C++
    return tuple(max(1, math.floor(float(np.float32(n) * scale) + 0.5)) for n in (h, w))  # type: ignore[return-value]


class ResizeWSDDN:
    """Aspect-preserving resize as the original WSDDN code reads its images (:func:`wsddn_reader_size`): the
    width becomes ``size``, whatever the orientation; ``max_size`` (not in the original, None = no cap) then
    caps the longer side.

    Args:
        size: the scale passed to the reader, pixels.
        max_size: cap on the longer side, or None as in the original. Must be >= ``size``.
    """

    def __init__(self, size: int, max_size: int | None = None) -> None:
        if not _is_positive_int(size):
            raise BadInput(f"ResizeWSDDN size must be a positive int, got {size!r}")
        if max_size is not None and (not isinstance(max_size, (int, np.integer)) or max_size < size):
            raise BadInput(f"ResizeWSDDN max_size must be an int >= size ({size}) or None, got {max_size!r}")
        self.size, self.max_size = int(size), max_size

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        old = _check_image(image)
        hw = wsddn_reader_size(old, self.size)
        if self.max_size is not None and max(hw) > self.max_size:
            hw = shorter_side_size(old, self.max_size, self.max_size)  # longer side = max_size
        return _resize(image, target, hw)

    def __repr__(self) -> str:
        return f"ResizeWSDDN(size={self.size}, max_size={self.max_size})"


class RandomHorizontalFlip:
    """Flip the image left-right with probability ``p``; boxes map x -> W - x (x1, x2 swap roles).

    ``target["flipped"]`` records whether the returned image is mirrored (two flips cancel).

    Args:
        p: flip probability in [0, 1].
        generator: a ``torch.Generator`` for reproducible draws. With ``None`` the global torch RNG is used,
            which ``DataLoader`` seeds differently in each worker; a generator passed here is copied into each
            worker with the same state, so workers would flip in lockstep.
    """

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None) -> None:
        if not 0.0 <= float(p) <= 1.0:
            raise BadInput(f"flip probability p must be in [0, 1], got {p!r}")
        self.p, self.generator = float(p), generator

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        hw = _check_image(image)
        target = dict(target)
        flip = torch.rand(1, generator=self.generator).item() < self.p
        target["flipped"] = bool(target.get("flipped", False)) ^ flip  # cached teacher outputs are looked up by it
        if flip:
            image = F.horizontal_flip(image)
            for key in BOX_KEYS:
                if key in target:
                    _check_boxes(target[key], key)
                    target[key] = F.horizontal_flip_bounding_boxes(
                        target[key], format=BoundingBoxFormat.XYXY, canvas_size=hw)
        target["size"] = torch.tensor(hw, dtype=torch.int64)
        return image, target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        return "Compose([" + ", ".join(repr(t) for t in self.transforms) + "])"


class KeepTopProposals:
    """Keep the first ``n`` proposals (caches store them best first); a transform, so it runs in the workers."""

    def __init__(self, n: int) -> None:
        if n < 1:
            raise BadInput(f"max_proposals must be >= 1, got {n}")
        self.n = n

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        target = dict(target)
        for key in ("proposals", "proposal_scores"):
            if key in target:
                target[key] = target[key][: self.n]
        return image, target

    def __repr__(self) -> str:
        return f"KeepTopProposals({self.n})"


# How MultiScaleCollate resizes each image to the batch's scale.
RESIZERS: dict[str, Callable[[int, int | None], Transform]] = {
    "warp": lambda scale, max_size: Warp(scale),
    "shorter": lambda scale, max_size: ResizeShorter(scale, max_size),
    "wsddn": lambda scale, max_size: ResizeWSDDN(scale, max_size),
}


class MultiScaleCollate:
    """A ``collate_fn`` that draws ONE scale per batch and resizes every image of the batch to it.

    The release trains the teacher with one scale per batch drawn from {480, 576, 672, 736, 832} and warps
    each image to ``scale x scale``; boxes and proposals move with the pixels, ``target["size"]`` records
    the result, then ``base`` (default :func:`mlkd.data.base.collate`) stacks the batch.

    Determinism: the scale of a batch is a function of ``(seed, epoch, worker id, call counter)`` only —
    the n-th call of this object (per ``DataLoader`` worker process; the main process counts as worker -1)
    draws ``scales[rng(seed, epoch, worker, n)]``. Workers hold copies, so each counts its own calls;
    non-persistent workers restart their counters every epoch, so call :meth:`set_epoch` before each epoch
    to vary the sequence across epochs. :meth:`scale_for_call` tells which scale a given call draws.

    Args:
        scales: candidate sizes (pixels), e.g. ``(480, 576, 672, 736, 832)``.
        base: the collate function applied after resizing.
        seed: seed of the scale sequence.
        resize: ``"warp"`` (square ``scale x scale``, the release), ``"shorter"`` (shorter side = scale, longer
            side capped at ``max_size``) or ``"wsddn"`` (as the original WSDDN code reads images: the width
            becomes the scale, see :func:`wsddn_reader_size`; the WSDDN preset). With the last two, batches of
            mixed aspect come back as lists from the default ``base``.
        max_size: cap on the longer side for ``resize="shorter"`` and ``"wsddn"``.
    """

    def __init__(self, scales: Sequence[int], base: Callable = collate, seed: int = 0, resize: str = "warp",
                 max_size: int | None = None) -> None:
        scales = tuple(scales)
        if not scales or not all(_is_positive_int(s) for s in scales):
            raise BadInput(f"scales must be a non-empty sequence of positive ints, got {scales!r}")
        if resize not in RESIZERS:
            raise BadInput(f"unknown resize mode {resize!r}; choose one of {sorted(RESIZERS)}")
        self.scales, self.base, self.seed = tuple(int(s) for s in scales), base, int(seed)
        self.resize, self.max_size = resize, max_size
        self.epoch, self.calls = 0, 0

    def set_epoch(self, epoch: int) -> None:
        """Start the scale sequence of ``epoch`` (resets the call counter)."""
        self.epoch, self.calls = int(epoch), 0

    def scale_for_call(self, call: int, worker: int = -1) -> int:
        """The scale that the ``call``-th batch (0-based) of ``worker`` draws in the current epoch."""
        rng = np.random.default_rng([self.seed, self.epoch, worker + 1, call])
        return self.scales[int(rng.integers(len(self.scales)))]

    def __call__(self, batch: list[tuple[torch.Tensor, Target]]) -> Any:
        info = get_worker_info()
        scale = self.scale_for_call(self.calls, info.id if info is not None else -1)
        self.calls += 1
        resizer = RESIZERS[self.resize](scale, self.max_size)
        return self.base([resizer(image, target) for image, target in batch])

    def __repr__(self) -> str:
        return f"MultiScaleCollate(scales={self.scales}, seed={self.seed}, resize={self.resize!r})"


class TeacherStudentViews:
    """The two views of one image that distillation needs: the teacher's and the student's.

    Flips (with probability ``flip``) once for both views, warps the image to ``teacher_size`` (proposals
    move with it) and to ``student_size`` (the other boxes move with it), and rescales the teacher-frame
    proposals into the student's frame (the release: 672 -> 224). Returns ``(student image, target)`` with
    ``target["teacher_image"]`` (``Tensor[3, H_T, W_T]`` uint8; left out with ``teacher_image=False``, when the
    teacher's outputs are cached), ``target["proposals"]`` (teacher frame), ``target["student_proposals"]`` and
    ``target["flipped"]`` (bool, to look up cached teacher outputs).
    """

    def __init__(self, teacher_size: int | Sequence[int], student_size: int | Sequence[int], flip: float = 0.5,
                 generator: torch.Generator | None = None, teacher_image: bool = True) -> None:
        self.teacher, self.student = Warp(teacher_size), Warp(student_size)
        self.flipper = RandomHorizontalFlip(flip, generator)
        self.with_teacher_image = teacher_image

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        image, target = self.flipper(image, target)
        student_image, student_target = self.student(image, {k: v for k, v in target.items() if k != "proposals"})
        if "proposals" in target:
            proposals = {"proposals": target["proposals"]}
            if self.with_teacher_image:
                student_target["teacher_image"], proposals = self.teacher(image, proposals)
            else:  # the same boxes Warp would give, without resizing the pixels
                proposals["proposals"] = rescale_boxes(proposals["proposals"], _check_image(image), self.teacher.size)
            student_target["proposals"] = proposals["proposals"]
            student_target["student_proposals"] = rescale_boxes(proposals["proposals"], self.teacher.size,
                                                                self.student.size)
        elif self.with_teacher_image:
            student_target["teacher_image"], _ = self.teacher(image, {})
        return student_image, student_target

    def __repr__(self) -> str:
        return (f"TeacherStudentViews(teacher={self.teacher.size}, student={self.student.size}, "
                f"flip={self.flipper.p}, teacher_image={self.with_teacher_image})")
