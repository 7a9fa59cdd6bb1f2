"""``mlkd predict``: a student's labels for image files (top-k, per-class thresholds, annotated copies)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from mlkd.checkpoint import load_checkpoint
from mlkd.data.base import read_image
from mlkd.data.transforms import Warp
from mlkd.models.backbones import normalize

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_images(inputs: Sequence[str]) -> list[Path]:
    """Image paths from files, folders (their images, sorted) and ``.txt`` lists (one path per line)."""
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.suffix.lower() == ".txt" and p.is_file():
            paths += [Path(line.strip()) for line in p.read_text().splitlines() if line.strip()]
        elif p.is_file():
            paths.append(p)
        else:
            raise FileNotFoundError(f"no such image, folder or list: {p}")
    if not paths:
        raise ValueError(f"no images found in {list(inputs)} (image suffixes: {', '.join(IMAGE_SUFFIXES)})")
    return paths


def read_thresholds(spec: str | None, classes: Sequence[str]) -> np.ndarray | None:
    """Per-class thresholds ``(K,)`` from one number, or a file of ``class threshold`` lines covering every
    class (an unknown or missing class is an error naming it)."""
    if spec is None:
        return None
    try:
        return np.full(len(classes), float(spec))
    except ValueError:
        pass
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"thresholds file not found: {path} (or give one number, e.g. 0.5)")
    values: dict[str, float] = {}
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, value = line.strip().rpartition(" ")
        try:
            values[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"{path}:{n}: expected 'class_name threshold', got {line!r}") from None
    unknown = sorted(set(values) - set(classes))
    missing = [c for c in classes if c not in values]
    if unknown or missing:
        raise ValueError(f"{path}: thresholds must name exactly the model's classes; unknown {unknown}, "
                         f"missing {missing}")
    return np.array([values[c] for c in classes])


@torch.no_grad()
def predict_images(checkpoint: str, inputs: Sequence[str], top_k: int = 3, thresholds: str | None = None,
                   out_dir: str | None = None, device: torch.device = torch.device("cpu"),
                   batch_size: int = 16) -> np.ndarray:
    """Print each image's top-k labels (and those over their thresholds); return the probabilities (N, K)."""
    from mlkd.student import student_from_checkpoint
    from mlkd.viz import save_rgb, scaled, top_k_lines, with_panel

    ckpt = load_checkpoint(checkpoint, "student")
    classes, convention = ckpt["classes"], ckpt["input_convention"]
    warp = Warp(ckpt["config"]["model"]["image_size"])
    model = student_from_checkpoint(ckpt).to(device)
    limits = read_thresholds(thresholds, classes)
    paths = list_images(inputs)
    probs = []
    for start in range(0, len(paths), batch_size):
        images = [read_image(p) for p in paths[start:start + batch_size]]
        x = torch.stack([warp(torch.from_numpy(im).permute(2, 0, 1), {})[0] for im in images])
        batch = torch.sigmoid(model(normalize(x.to(device), convention)).float()).cpu().numpy()
        for path, image, p in zip(paths[start:start + batch_size], images, batch):
            best = np.argsort(-p, kind="stable")[:top_k]
            print(f"{path}: " + ", ".join(f"{classes[c]} {p[c]:.3f}" for c in best))
            if limits is not None:
                print("  above threshold: " + (", ".join(classes[c] for c in np.flatnonzero(p >= limits)) or "none"))
            if out_dir:
                big, _ = scaled(image, 360)
                save_rgb(Path(out_dir) / f"{path.stem}_pred.png", with_panel(big, top_k_lines(p, classes, None, top_k)))
        probs.append(batch)
    return np.concatenate(probs)
