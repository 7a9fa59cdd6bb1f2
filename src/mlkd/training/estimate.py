"""What a config costs before it is launched (``mlkd estimate``): real training steps of its real model at its
real sizes, on synthetic inputs, and what follows for the whole schedule and the caches.

- A teacher: one row per training scale: ``data.batch_size`` images at that scale (``warp``: S x S; ``shorter``:
  S x 4S/3 capped at ``max_size``; ``wsddn``: 3S/4 x S), each with ``data.max_proposals`` random boxes (2000 when
  unset), forward + backward + the optimizer's step; the schedule draws one scale per batch, so it uses their mean.
- A student: the plain step (L_p), the distilling step with the teacher's targets read from caches, and the
  same with the teacher run on the fly (its model, scale and proposal budget from ``distill.teacher``'s
  checkpoint, or, for a shipped config, from the shipped teacher config whose run folder it names), plus the
  teacher pass that fills the caches; each stage of the schedule costs what its teacher plan says.

Weights that are not on this machine are replaced by random ones (speed and memory do not depend on them); the
result says so. Random boxes repeat less after rounding than real proposals, so the distinct-region paths save
less here than in a real run: the estimate errs slow. Peak memory is the resident set's peak on the CPU (reset
per row where Linux allows) and ``max_memory_allocated`` on CUDA. Dataset sizes come from the dataset when it is
on this machine, else from the published split sizes.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch

from mlkd.data.build import build_dataset, parse_spec
from mlkd.distill.config import TeacherPlan
from mlkd.distill.feature_store import estimate_bytes
from mlkd.distill.objective import StudentObjective
from mlkd.errors import MlkdError, NotFound
from mlkd.models.build import build_student, build_teacher, model_from_checkpoint
from mlkd.models.configs import RELEASE_TEST_SCALE, TeacherModelConfig
from mlkd.training.optim import build_optimizer, param_groups
from mlkd.training.student import StudentConfig
from mlkd.training.teacher import TeacherConfig
from mlkd.utils.checkpoint import load_checkpoint
from mlkd.utils.config import load_config, packaged_configs, read_yaml, resolve_config
from mlkd.utils.device import autocast, resolve_amp

# published training-split sizes (images with labels) and class counts, for datasets not on this machine
KNOWN = {("coco", "train2014"): (82_081, 80), ("voc", "2007", "trainval"): (5_011, 20),
         ("voc", "2012", "trainval"): (11_540, 20), ("nuswide", "train"): (161_789, 81)}
DEFAULT_PROPOSALS = 2000  # per image when data.max_proposals is unset
RECORD_BYTES = 20  # a proposal in the LMDB cache: 4 float32 coordinates and a float32 score


@dataclasses.dataclass
class Row:
    """One measured step."""

    what: str
    seconds: float
    peak_mib: float


def estimate(config: str | Path, device: torch.device, steps: int = 1, world_size: int = 1,
             overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Measure ``config`` on ``device`` (``steps`` timed steps per row after one warm-up) and project its schedule
    for ``world_size`` processes; a dict of ``rows``, ``schedule``, ``caches`` and ``notes``."""
    data = read_yaml(resolve_config(config))
    student = "stages" in data or "distill" in data
    cfg = load_config(StudentConfig if student else TeacherConfig, config, overrides)
    notes: list[str] = []
    images, classes = dataset_size(cfg.data.train, notes)
    result = {"config": str(config), "kind": "student" if student else "teacher", "device": str(device),
              "images": images, "classes": classes, "world_size": world_size, "notes": notes}
    measure = _Measure(device, steps, resolve_amp(cfg.run.amp, device))
    if student:
        result.update(_student(cfg, measure, images, classes, world_size, notes))
    else:
        result.update(_teacher(cfg, measure, images, classes, world_size, notes))
    result["rows"] = [dataclasses.asdict(r) for r in result["rows"]]
    return result


def dataset_size(spec: str, notes: list[str]) -> tuple[int, int]:
    """Images and classes of the training split: the dataset's own when it is here, else the published sizes."""
    try:
        dataset = build_dataset(spec)
        return len(dataset), dataset.num_classes
    except MlkdError:
        name, fields = parse_spec(spec)
        known = KNOWN.get((name, *fields[1:]))
        if known is None:
            raise NotFound(f"dataset {spec} is not on this machine and its size is not known to mlkd; run the "
                            "estimate where the data is") from None
        notes.append(f"dataset {spec} is not on this machine: its published size ({known[0]} images, {known[1]} "
                     "classes) is used")
        return known


class _Measure:
    """Times a step function at one setting: a warm-up, then the mean of ``steps``; and its peak memory."""

    def __init__(self, device: torch.device, steps: int, amp: str) -> None:
        self.device, self.steps, self.amp = device, steps, amp

    def __call__(self, what: str, step: Callable[[], None]) -> Row:
        _reset_peak(self.device)
        with autocast(self.device, self.amp):
            step()  # the warm-up: allocations, and the first timing of the speed-only choices (autotune)
            seconds = []
            for _ in range(self.steps):
                _sync(self.device)
                t0 = time.perf_counter()
                step()
                _sync(self.device)
                seconds.append(time.perf_counter() - t0)
        return Row(what, sum(seconds) / len(seconds), _peak_mib(self.device))


def _teacher(cfg: TeacherConfig, measure: _Measure, images: int, classes: int, world_size: int,
             notes: list[str]) -> dict[str, Any]:
    model = _built(build_teacher, cfg.model, classes, notes).to(measure.device).train()
    optimizer = build_optimizer(param_groups(model, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.bias_lr_mult,
                                             cfg.optim.bias_decay), cfg.optim.optimizer, cfg.optim.lr,
                                cfg.optim.momentum)
    per_image = cfg.data.max_proposals or DEFAULT_PROPOSALS
    rows = []
    for scale in cfg.data.scales:
        h, w = _input_size(cfg, scale)
        batch = _teacher_batch(cfg.data.batch_size, h, w, per_image, classes, measure.device)
        rows.append(measure(f"teacher step at {h}x{w}, batch {cfg.data.batch_size}, {per_image} proposals",
                            lambda batch=batch: _step(model(**batch), optimizer)))
    steps = math.ceil(images / (cfg.data.batch_size * world_size)) * cfg.optim.epochs
    mean = sum(r.seconds for r in rows) / len(rows)
    return {"rows": rows, "schedule": {"steps": steps, "seconds": steps * mean},
            "caches": {"proposals_bytes": images * per_image * RECORD_BYTES}}


def _student(cfg: StudentConfig, measure: _Measure, images: int, classes: int, world_size: int,
             notes: list[str]) -> dict[str, Any]:
    d, size, b = cfg.distill, cfg.model.image_size, cfg.data.batch_size
    student = _built(build_student, cfg.model, classes, notes).to(measure.device).train()
    rows = {"plain": measure(f"student step at {size}, batch {b}, L_p", _student_step(
        StudentObjective(student, None), cfg, {"images": _images(b, size, size, measure.device),
                                               "labels": _labels(b, classes, measure.device)}))}
    schedule = {"steps": 0, "seconds": 0.0}
    caches: dict[str, Any] = {}
    distilling = [s for s in cfg.stages if s.distils]
    if distilling:
        teacher, scale, per_image = _kd_teacher(cfg, classes, notes)
        teacher = teacher.to(measure.device)
        soft, feature = any(s.uses_soft for s in distilling), any(s.uses_features for s in distilling)
        weights = (1.0, float(soft), float(feature))
        kept = d.top_k or per_image
        inputs = _kd_inputs(b, size, scale, per_image, classes, kept, teacher.feature_width, measure.device)
        for mode, plan in (("cached", TeacherPlan("cached" if soft else None, "cached" if feature else None)),
                           ("on the fly", TeacherPlan.live(soft, feature))):
            objective = StudentObjective(student, teacher, *weights, d.feature_layers, d.top_k, d.scale_init,
                                         d.feature_norm, d.feature_adapter, plan)
            given = {k: v for k, v in inputs.items() if _needed(k, plan)}
            rows[mode] = measure(f"distilling step, teacher targets {mode} (teacher at {scale}, {per_image} "
                                 f"proposals, L_f on {kept})", _student_step(objective, cfg, given))
        rows["teacher pass"] = _teacher_pass(measure, teacher, scale, per_image, classes)
        width = {layer: teacher.feature_width for layer in d.feature_layers}
        caches = {"proposals_bytes": images * per_image * RECORD_BYTES, "soft_targets_bytes": images * 2 * classes * 4,
                  "features_bytes": estimate_bytes(images, kept, width) if feature else 0,
                  "feature_cache_gb": d.feature_cache_gb}
        caches["features_fit"] = feature and 0 < caches["features_bytes"] <= d.feature_cache_gb * 2**30
        schedule["seconds"] += 2 * images / world_size * rows["teacher pass"].seconds / 4  # 4 images per pass row
    per_epoch = math.ceil(images / (b * world_size))
    for stage in cfg.stages:
        live = stage.uses_features and not caches.get("features_fit") or stage.uses_soft and not d.cache_soft_targets
        row = rows["plain"] if not stage.distils else rows["on the fly" if live else "cached"]
        schedule["steps"] += per_epoch * stage.epochs
        schedule["seconds"] += per_epoch * stage.epochs * row.seconds
    return {"rows": list(rows.values()), "schedule": schedule, "caches": caches}


def _built(builder: Callable[..., torch.nn.Module], model_cfg: Any, classes: int, notes: list[str]) -> torch.nn.Module:
    """The config's model; with random weights (said in ``notes``) when its ImageNet weights are not here."""
    try:
        return builder(model_cfg, classes)
    except MlkdError as e:
        if not model_cfg.weights:
            raise
        notes.append(f"model.weights {model_cfg.weights} not available here ({e}): random weights are used")
        return builder(dataclasses.replace(model_cfg, weights=None), classes)


def _kd_teacher(cfg: StudentConfig, classes: int, notes: list[str]) -> tuple[torch.nn.Module, int, int]:
    """The teacher a distilling config names, its input scale and proposals per image: from its checkpoint when
    it is here, else from the shipped teacher config that writes that checkpoint, else the release's VGG16."""
    d, per_image = cfg.distill, cfg.data.max_proposals or DEFAULT_PROPOSALS
    if d.teacher and Path(d.teacher).is_file():
        ckpt = load_checkpoint(d.teacher, "teacher")
        return model_from_checkpoint(ckpt), d.teacher_scale or ckpt["inference"]["image_size"], per_image
    shipped = [name for name in packaged_configs() if name.startswith("teacher_")
               and str(Path(load_config(TeacherConfig, name).run.out) / "last.pt") == str(d.teacher)]
    tcfg = load_config(TeacherConfig, shipped[0]).model if shipped else TeacherModelConfig()
    notes.append(f"teacher {d.teacher} is not here: "
                 + (f"the shipped {shipped[0]}'s model, random weights" if shipped else "the release's VGG16 teacher"))
    teacher = _built(build_teacher, dataclasses.replace(tcfg, weights=None), classes, notes)
    return teacher, d.teacher_scale or RELEASE_TEST_SCALE, per_image


def _kd_inputs(batch: int, size: int, scale: int, per_image: int, classes: int, kept: int, width: int,
               device: torch.device) -> dict[str, Any]:
    """Every input a distilling step may take: both views, proposals in both frames, and cached targets."""
    boxes = [_boxes(per_image, scale, scale, device) for _ in range(batch)]
    return {"images": _images(batch, size, size, device), "labels": _labels(batch, classes, device),
            "teacher_images": _images(batch, scale, scale, device), "proposals": boxes,
            "proposal_scores": [torch.rand(per_image, device=device) for _ in range(batch)],
            "student_proposals": [b * (size / scale) for b in boxes],
            "teacher_probs": torch.rand(batch, classes, device=device),
            "teacher_features": ({"fc7": torch.rand(batch * kept, width, device=device)},
                                 torch.cat([i * per_image + torch.arange(kept, device=device)
                                            for i in range(batch)]))}


def _needed(key: str, plan: TeacherPlan) -> bool:
    return {"teacher_images": plan.runs_teacher, "teacher_probs": plan.soft == "cached",
            "teacher_features": plan.features == "cached"}.get(key, True)


def _student_step(objective: StudentObjective, cfg: StudentConfig, inputs: dict[str, Any]) -> Callable[[], None]:
    optimizer = build_optimizer(param_groups(objective, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.bias_lr_mult,
                                             cfg.optim.bias_decay), cfg.optim.optimizer, cfg.optim.lr,
                                cfg.optim.momentum)
    return lambda: _step(objective(**inputs), optimizer)


def _teacher_pass(measure: _Measure, teacher: torch.nn.Module, scale: int, per_image: int, classes: int) -> Row:
    """The teacher's eval forward on 4 images (what filling its caches runs, per 4 views)."""
    inputs = {"images": _images(4, scale, scale, measure.device),
              "proposals": [_boxes(per_image, scale, scale, measure.device) for _ in range(4)]}
    teacher.eval()

    @torch.no_grad()
    def run() -> None:
        teacher(**inputs)
    return measure(f"teacher pass filling the caches, 4 images at {scale}", run)


def _step(losses: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
    sum(losses.values()).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _input_size(cfg: TeacherConfig, scale: int) -> tuple[int, int]:
    """``(H, W)`` of a training image at ``scale`` under the config's resize (a 4:3 landscape image)."""
    if cfg.data.resize == "warp":
        return scale, scale
    if cfg.data.resize == "shorter":
        return scale, min(round(scale * 4 / 3), cfg.data.max_size or 10**9)
    return round(scale * 3 / 4), scale


def _teacher_batch(batch: int, h: int, w: int, per_image: int, classes: int, device: torch.device) -> dict:
    return {"images": _images(batch, h, w, device), "proposals": [_boxes(per_image, h, w, device) for _ in range(batch)],
            "proposal_scores": [torch.rand(per_image, device=device) for _ in range(batch)],
            "labels": _labels(batch, classes, device)}


def _images(batch: int, h: int, w: int, device: torch.device) -> torch.Tensor:
    return torch.randn(batch, 3, h, w, device=device)


def _labels(batch: int, classes: int, device: torch.device) -> torch.Tensor:
    return (torch.rand(batch, classes, device=device) < 0.1).float()


def _boxes(n: int, h: int, w: int, device: torch.device) -> torch.Tensor:
    """``n`` random boxes of 5-80 % of the image's sides inside it, ``(n, 4)`` (x1, y1, x2, y2)."""
    size = torch.tensor([w, h], device=device, dtype=torch.float32)
    wh = (0.05 + 0.75 * torch.rand(n, 2, device=device)) * size
    xy = torch.rand(n, 2, device=device) * (size - wh)
    return torch.cat([xy, xy + wh], 1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # the resident set's peak back to its current size (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource  # elsewhere: the process's peak, not the row's

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def format_estimate(result: dict[str, Any]) -> str:
    """The estimate as the command line prints it."""
    lines = [f"mlkd estimate: {result['config']} ({result['kind']}) on {result['device']}; training set "
             f"{result['images']} images, {result['classes']} classes; {result['world_size']} process(es)"]
    lines += [f"  note: {n}" for n in result["notes"]]
    lines += ["", f"  {'step':<84} {'s/step':>8} {'peak MiB':>9}"]
    lines += [f"  {r['what']:<84} {r['seconds']:>8.2f} {r['peak_mib']:>9.0f}" for r in result["rows"]]
    s = result["schedule"]
    lines += ["", f"  full schedule: {s['steps']} steps per process, about {_duration(s['seconds'])} on this device"
                  + (" (with the teacher pass that fills the caches)" if result["kind"] == "student" and
                     result["caches"] else "")]
    c = result["caches"]
    if c:
        parts = [f"proposals {_size(c['proposals_bytes'])}"]
        if "soft_targets_bytes" in c:
            parts.append(f"teacher soft targets {_size(c['soft_targets_bytes'])}")
        if c.get("features_bytes"):
            fits = "fits" if c["features_fit"] else "does NOT fit: L_f runs the teacher on the fly"
            parts.append(f"teacher region features {_size(c['features_bytes'])} (distill.feature_cache_gb "
                         f"{c['feature_cache_gb']:g}: {fits})")
        lines.append("  disk: " + "; ".join(parts))
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 72 * 3600 else f"{seconds / 86400:.1f} days"


def _size(n: int) -> str:
    return next(f"{n / 1024 ** i:.1f} {unit}" for i, unit in ((3, "GB"), (2, "MB"), (1, "KB"), (0, "B"))
                if n >= 1024 ** i or i == 0)
