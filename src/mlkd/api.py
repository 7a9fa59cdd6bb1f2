"""The Python API: load a trained model and use it, in a few lines and with light imports.

    import mlkd
    clf = mlkd.load("runs/demo/seed0/student_kd/last.pt")     # a checkpoint, or a folder from `mlkd export`
    clf.predict("photo.jpg")                                    # {"circle_stripes": 0.93, "star_checker": 0.02, ...}
    clf.predict([pil_image, array_hwc_uint8], top_k=3)          # one dict per image, best first
    det = mlkd.load("runs/demo/seed0/teacher/last.pt")
    det.detect("photo.jpg")                                     # boxes, labels, scores (>= 0.05, at most 100)

Loading a model and predicting imports neither the training code nor DDP, LMDB, proposal caches, scipy or
matplotlib; :meth:`Detector.detect` computes proposals with OpenCV's methods, one image at a time.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from mlkd.data.base import read_image
from mlkd.data.boxes import check_boxes
from mlkd.data.transforms import Warp
from mlkd.errors import BadInput
from mlkd.inference.runtime import StudentRuntime
from mlkd.models.backbones import CONVENTIONS, normalize
from mlkd.models.build import model_from_checkpoint
from mlkd.models.wsddn import NMS_IOU, class_detections
from mlkd.proposals.methods import propose, resolve_params
from mlkd.utils import checks
from mlkd.utils.checkpoint import load_checkpoint

DETECTION_SCORE, MAX_DETECTIONS = 0.05, 100  # Detector.detect's defaults, as torchvision's detectors have them
ImageLike = Any  # a path, a PIL image, an (H, W, 3) / (H, W) uint8 array, or a (3, H, W) tensor
logger = logging.getLogger(__name__)


def load(path: str | Path, device: str | torch.device = "cpu", precision: str = "fp32",
         calibration: str | None = None) -> "Classifier | Detector":
    """A student checkpoint or model folder as a :class:`Classifier`, a teacher's as a :class:`Detector`.

    A classifier runs in ``precision`` (``fp32``, ``bf16`` where the hardware has it natively, ``int8`` on the
    CPU through onnxruntime: see :mod:`mlkd.inference.runtime`); int8 calibrates on the dataset ``calibration``
    (default: the training set the checkpoint records)."""
    ckpt = load_checkpoint(path)
    if ckpt["kind"] not in ("student", "teacher"):
        raise BadInput(f"{path} holds {ckpt['kind']}, not a trained student or teacher")
    model = model_from_checkpoint(ckpt)
    if ckpt["kind"] == "teacher":
        if precision != "fp32" or calibration is not None:
            raise BadInput("precision and calibration apply to students; a teacher (Detector) runs in fp32")
        return Detector(model, ckpt).to(device)
    return Classifier(model, ckpt, precision, calibration).to(device)


def to_rgb(image: ImageLike) -> np.ndarray:
    """Any accepted image as an RGB uint8 array ``(H, W, 3)``; a clear error for anything else."""
    if isinstance(image, (str, Path)):
        return read_image(image)
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image (PIL is not imported for this)
        return _not_empty(np.array(image.convert("RGB")))
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise BadInput(f"a tensor image must be (3, H, W) RGB, got shape {tuple(image.shape)}")
        _not_empty(image, tuple(image.shape[1:]))  # before min() and max(), which an empty tensor has not
        if image.dtype == torch.uint8:
            return image.permute(1, 2, 0).cpu().numpy()
        nonfinite = int((~torch.isfinite(image)).sum())  # NaN passes both comparisons below
        if not image.is_floating_point() or nonfinite or image.min() < 0 or image.max() > 1:
            found = f"{nonfinite} non-finite value(s)" if nonfinite else \
                f"values in [{float(image.min()):.3g}, {float(image.max()):.3g}]"
            raise BadInput(f"a tensor image must be uint8 (0-255) or float in [0, 1], got {image.dtype} with {found}")
        return (image * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise BadInput(f"an array image must be uint8, got {image.dtype}")
        if image.ndim == 2:
            return np.repeat(_not_empty(image)[:, :, None], 3, axis=2)
        if image.ndim == 3 and image.shape[2] == 3:
            return _not_empty(image)
        raise BadInput(f"an array image must be (H, W, 3) RGB or (H, W) grey, got shape {image.shape}")
    raise BadInput(f"cannot read an image from a {type(image).__name__}: give a path, a PIL image, an (H, W, 3) "
                    "uint8 array or a (3, H, W) tensor")


def _not_empty(image: Any, hw: tuple[int, ...] | None = None) -> Any:
    """``image`` unless its height ``hw[0]`` or width ``hw[1]`` (default: its first two dimensions) is 0: an empty
    crop would otherwise fail deep inside the resize."""
    h, w = hw if hw is not None else image.shape[:2]
    if h == 0 or w == 0:
        raise BadInput(f"the image has no pixels: shape {tuple(image.shape)}; expected at least 1 x 1")
    return image


def describe_image(image: ImageLike, index: int) -> str:
    """How an error names an image: its path, else its position and type."""
    return str(image) if isinstance(image, (str, Path)) else f"image {index} (a {type(image).__name__})"


def _check_finite(logits: torch.Tensor, items: Sequence[ImageLike], start: int, classes: Sequence[str]) -> None:
    """Raise naming the first image of the batch ``items[start:]`` whose logits are not all finite."""
    finite = torch.isfinite(logits)
    if bool(finite.all()):
        return
    row = int((~finite.all(1)).nonzero()[0])
    bad = [classes[k] for k in (~finite[row]).nonzero().flatten().tolist()]
    raise BadInput(f"the model's output for {describe_image(items[start + row], start + row)} is not finite (NaN or "
                   f"inf logits for {len(bad)} class(es): {bad[:5]}{' ...' if len(bad) > 5 else ''}); its weights are "
                   "damaged or its training diverged")


class _Loaded:
    """What both model kinds share: the network, its classes, input convention and size, and the device."""

    def __init__(self, model: torch.nn.Module, ckpt: dict[str, Any]) -> None:
        self.model = model.eval()
        self.classes: list[str] = list(ckpt["classes"])
        self.input_convention: str = ckpt["input_convention"]
        self.image_size: int = int(ckpt["inference"]["image_size"])
        self.device = torch.device("cpu")
        self.dataset: dict[str, Any] | None = ckpt.get("dataset")  # name, split, size and hashes of its training set
        self.trained_with: str | None = ckpt.get("mlkd_version")

    precision = "fp32"

    def to(self, device: str | torch.device) -> "_Loaded":
        """Move the model to ``device`` (e.g. "cuda"); returns self."""
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def __repr__(self) -> str:
        names = ", ".join(self.classes[:5]) + (f", ... ({len(self.classes)} classes)" if len(self.classes) > 5 else "")
        return (f"{type(self).__name__}(classes=[{names}], input={self.image_size}x{self.image_size} "
                f"{self.input_convention}, precision={self.precision}, device={self.device})")

    def describe(self) -> dict[str, Any]:
        """What the model is, JSON-ready: kind, classes, input, precision, device, the mlkd that trained it and the
        identity of its training set."""
        return {"kind": "teacher" if isinstance(self, Detector) else "student", "classes": self.classes,
                "input": self.input_description, "precision": self.precision, "device": str(self.device),
                "trained_with_mlkd": self.trained_with, "dataset": self.dataset}

    @property
    def input_description(self) -> dict[str, Any]:
        """The input convention in numbers: channel order, pixel scale, mean, std, and the warp size."""
        return {"convention": self.input_convention, **CONVENTIONS[self.input_convention], "size": self.image_size}

    def _warped(self, rgb: np.ndarray) -> torch.Tensor:
        return Warp(self.image_size)(torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1), {})[0]


class Classifier(_Loaded):
    """A trained student: multi-label probabilities of images (sigmoid of its logits), in ``precision``."""

    def __init__(self, model: torch.nn.Module, ckpt: dict[str, Any], precision: str = "fp32",
                 calibration: str | None = None) -> None:
        super().__init__(model, ckpt)
        self.precision, self._ckpt, self._calibration = precision, ckpt, calibration
        self._runtime: StudentRuntime | None = self._build(torch.device("cpu"))

    def _build(self, device: torch.device) -> StudentRuntime:
        return StudentRuntime.from_checkpoint(self._ckpt, self.precision, device, self._calibration, self.model)

    def to(self, device: str | torch.device) -> "Classifier":
        """Move the model to ``device`` (e.g. "cuda"); returns self."""
        if torch.device(device) != self.device:
            super().to(device)
            self._runtime = self._build(self.device)
        return self

    @torch.no_grad()
    def probabilities(self, images: ImageLike | Sequence[ImageLike], batch_size: int = 32) -> np.ndarray:
        """Probabilities ``(N, K)`` float32 of one image or a list of them, in the order of ``classes``.
        Non-finite logits (damaged weights, a diverged run) are an error naming the image, never NaN output."""
        batch_size = checks.integer(batch_size, "batch_size", low=1)
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        out = []
        for start in range(0, len(items), batch_size):
            x = torch.stack([self._warped(to_rgb(im)) for im in items[start:start + batch_size]])
            if self._runtime is None or self._runtime.model is not self.model:  # ``model`` was replaced
                self._runtime = self._build(self.device)
            logits = self._runtime(normalize(x.to(self.device), self.input_convention))
            _check_finite(logits, items, start, self.classes)
            out.append(torch.sigmoid(logits).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

    def predict(self, images: ImageLike | Sequence[ImageLike], threshold: float | Sequence[float] |
                Mapping[str, float] | None = None, top_k: int | None = None, as_arrays: bool = False,
                batch_size: int = 32) -> Any:
        """Labels of one image (a dict) or of a list of images (a list of dicts): ``{class: probability}``,
        best first; with ``top_k`` only the k best, with ``threshold`` (one value, one per class, or a mapping
        class -> value) only those at or above it. ``as_arrays=True`` returns the ``(N, K)`` probabilities."""
        cuts = self.cuts(threshold, top_k)  # arguments first: a typo is reported before the images are read
        probs = self.probabilities(images, batch_size)
        if as_arrays:
            return probs
        rows = self.labels(probs, cuts)
        return rows if isinstance(images, (list, tuple)) else rows[0]

    def cuts(self, threshold: Any = None, top_k: int | None = None) -> tuple[np.ndarray | None, int | None]:
        """``threshold`` and ``top_k`` as :meth:`predict` takes them, checked: ``((K,) thresholds or None, k or
        None)``; ``BadInput`` names the bad value."""
        return self._thresholds(threshold), checks.integer(top_k, "top_k", low=1, none="all")

    def labels(self, probabilities: np.ndarray, cuts: tuple[np.ndarray | None, int | None] = (None, None)
               ) -> list[dict[str, float]]:
        """``{class: probability}`` best first for each row of ``probabilities (N, K)``, cut by :meth:`cuts`."""
        limits, top_k = cuts
        rows = []
        for p in probabilities:
            order = np.argsort(-p, kind="stable")[:top_k]
            rows.append({self.classes[c]: float(p[c]) for c in order if limits is None or p[c] >= limits[c]})
        return rows

    def _thresholds(self, threshold: Any) -> np.ndarray | None:
        """``(K,)`` probabilities from one value, one per class, or a mapping class -> value (None: no cut)."""
        if threshold is None:
            return None
        if isinstance(threshold, np.ndarray) or torch.is_tensor(threshold):
            threshold = threshold.tolist()  # 0-d: a number; 1-d: a list of numbers
        if isinstance(threshold, Mapping):
            unknown = sorted(set(threshold) - set(self.classes), key=str)
            missing = [c for c in self.classes if c not in threshold]
            if unknown or missing:
                raise BadInput(f"thresholds must name exactly the model's classes; unknown {unknown}, "
                               f"missing {missing}")
            named = [(f"threshold[{c!r}]", threshold[c]) for c in self.classes]
        elif isinstance(threshold, (list, tuple)):
            if len(threshold) != len(self.classes):
                raise BadInput(f"threshold must be one number in [0, 1] or {len(self.classes)} of them (one per "
                               f"class, or a mapping class -> number), got {len(threshold)}")
            named = [(f"threshold[{i}]", value) for i, value in enumerate(threshold)]
        else:
            named = [("threshold", threshold)] * len(self.classes)
        return np.array([checks.probability(value, name) for name, value in named], np.float64)


class Detector(_Loaded):
    """A trained teacher (WSDDN): class scores of an image's proposals, detections after per-class NMS."""

    def __init__(self, model: torch.nn.Module, ckpt: dict[str, Any]) -> None:
        super().__init__(model, ckpt)
        self.max_proposals: int | None = ckpt["inference"].get("max_proposals")
        self.proposal_method: dict[str, Any] | None = ckpt["inference"].get("proposals")

    def proposals(self, image: ImageLike) -> tuple[np.ndarray, np.ndarray]:
        """Proposals of an image with the method the teacher was trained with (selective search "fast" when it
        is not recorded): boxes ``(R, 4)`` (x1, y1, x2, y2) pixels of the image, scores ``(R,)``."""
        method = self.proposal_method or {"method": "selective_search", "params": {"mode": "fast"}}
        params = resolve_params(method["method"], {**method["params"], "max_proposals": self.max_proposals or 500})
        return propose(to_rgb(image), method["method"], params)

    def detect(self, images: ImageLike | Sequence[ImageLike], proposals: Any = None, proposal_scores: Any = None,
               score_threshold: float = DETECTION_SCORE, max_detections: int | None = MAX_DETECTIONS,
               nms_iou: float = NMS_IOU, max_per_class: int = 100) -> dict[str, Any] | list[dict[str, Any]]:
        """The teacher on one image (a dict) or a list of images (a list of dicts). ``proposals (R, 4)``
        (x1, y1, x2, y2) in pixels of the image, with ``proposal_scores (R,)`` or without (every score 1);
        computed when None; for a list of images, lists with one entry per image. Non-finite and inverted
        proposals are refused, those partly outside the image clipped to it, those left empty dropped.

        Returns ``image_scores`` ``{class: p}``; ``boxes (D, 4)``, ``labels`` (D class names), ``scores (D,)`` of
        the detections: per-class NMS at ``nms_iou`` (at most ``max_per_class`` per class), then those scoring at
        least ``score_threshold``, the ``max_detections`` best (torchvision's detectors' defaults: 0.05 and 100;
        ``score_threshold=0, max_detections=None`` keeps every detection); ``proposals (R', 4)`` (those used,
        clipped; at most the teacher's ``max_proposals``), ``proposal_index (R',)`` (their positions among the
        given ones), their ``objectness (R',)`` (the sum of a region's class scores) and ``region_scores (R', K)``.
        """
        settings = {"score_threshold": checks.probability(score_threshold, "score_threshold"),
                    "max_detections": checks.integer(max_detections, "max_detections", low=1, none="all"),
                    "nms_iou": checks.probability(nms_iou, "nms_iou"),
                    "max_per_class": checks.integer(max_per_class, "max_per_class", low=1)}
        if not isinstance(images, (list, tuple)):
            return self._detect(images, 0, proposals, proposal_scores, settings)
        given = [(proposals, "proposals"), (proposal_scores, "proposal_scores")]
        for value, name in given:
            if value is not None and (not isinstance(value, (list, tuple)) or len(value) != len(images)):
                raise BadInput(f"with a list of {len(images)} images, {name} must be a list with one entry per image")
        return [self._detect(image, i, None if proposals is None else proposals[i],
                             None if proposal_scores is None else proposal_scores[i], settings)
                for i, image in enumerate(images)]

    def _regions(self, rgb: np.ndarray, where: str, proposals: Any, proposal_scores: Any
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The proposals the teacher sees: boxes ``(R', 4)`` float32 checked by the one box validator (clipped
        to the image, empty ones dropped), their scores ``(R',)`` and positions among the given ``(R',)``, cut
        to the teacher's recorded budget after validation (a dropped box takes no place)."""
        if proposals is None:
            if proposal_scores is not None:
                raise BadInput(f"proposal_scores given without proposals for {where}: give both, or neither (both "
                               "are then computed)")
            proposals, proposal_scores = self.proposals(rgb)
        try:
            given = np.array(proposals, np.float32)  # copied: the caller's array is never changed
        except (TypeError, ValueError) as e:
            raise BadInput(f"proposals of {where} must be an (R, 4) array of (x1, y1, x2, y2) pixels: {e}") from None
        if given.ndim != 2 or given.shape[1] != 4:  # (R, 5) boxes + scores would be scrambled by a reshape
            raise BadInput(f"proposals of {where} must be an (R, 4) array of (x1, y1, x2, y2) pixels, got shape "
                           f"{given.shape}")
        scores = np.ones(len(given), np.float32) if proposal_scores is None else \
            _proposal_scores(proposal_scores, len(given), where)
        boxes, report = check_boxes(given, rgb.shape[:2], "clip", f"proposals of {where}",
                                    name_box=lambda i: f"proposal {i}",
                                    hint="proposals are (x1, y1, x2, y2) corners, not (x, y, width, height)")
        if report.changed:
            logger.debug("proposals of %s: %s", where, report.summary())
        keep = report.keep[: self.max_proposals]
        if len(keep) == 0:
            raise BadInput(f"the image has no proposals ({where}: {len(given)} given, {report.num_dropped} dropped "
                           "as empty inside the image); the teacher needs at least one region")
        return boxes[: len(keep)], scores[keep], keep

    @torch.no_grad()
    def _detect(self, image: ImageLike, index: int, proposals: Any, proposal_scores: Any,
                settings: dict[str, Any]) -> dict[str, Any]:
        rgb = to_rgb(image)
        where = describe_image(image, index)
        boxes, scores, keep = self._regions(rgb, where, proposals, proposal_scores)
        target = {"proposals": torch.from_numpy(boxes)}
        x, target = Warp(self.image_size)(torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1), target)
        out = self.model(normalize(x[None].to(self.device), self.input_convention),
                         [target["proposals"].to(self.device)], [torch.from_numpy(scores).to(self.device)])[0]
        regions = out["region_scores"].float().cpu().numpy()
        if not np.isfinite(regions).all():  # the inputs are finite by now: the weights are to blame
            raise BadInput(f"the teacher gives non-finite scores for {where} (are its weights damaged?)")
        det_boxes, det_scores, det_labels = class_detections(boxes, regions, **settings)
        return {"image_scores": dict(zip(self.classes, out["image_scores"].float().cpu().tolist())),
                "boxes": det_boxes, "labels": [self.classes[c] for c in det_labels], "scores": det_scores,
                "proposals": boxes, "proposal_index": keep, "objectness": regions.sum(1), "region_scores": regions}


def _proposal_scores(proposal_scores: Any, count: int, where: str) -> np.ndarray:
    """``(count,)`` float32 finite scores, one per given proposal, or a BadInput naming the first bad one."""
    try:
        scores = np.array(proposal_scores, np.float32)
    except (TypeError, ValueError) as e:
        raise BadInput(f"proposal_scores of {where} must be a ({count},) array of numbers: {e}") from None
    if scores.shape != (count,):  # neither cut nor padded: a mismatch means they belong to other proposals
        raise BadInput(f"proposal_scores of {where} must be a ({count},) array, one per proposal, got shape "
                       f"{scores.shape}")
    bad = np.flatnonzero(~np.isfinite(scores))
    if len(bad):
        raise BadInput(f"proposal_scores of {where}: the score of proposal {bad[0]} is {scores[bad[0]]}; expected "
                       f"finite numbers ({len(bad)} are not)")
    return scores
