"""Datasets (one ``(image, target)`` contract), transforms that move boxes with images, synthetic data."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from mlkd.data.base import DatasetIdentity, ImageRecord, MultiLabelDataset, Transform, collate
from mlkd.data.custom import CustomDataset
from mlkd.data.transforms import (Compose, MultiScaleCollate, RandomHorizontalFlip, ResizeShorter, Warp,
                                  rescale_boxes)

# Dataset specs accepted by build_dataset: how each form is recognised -> its builder.
DATASET_FORMS: dict[str, str] = {
    "PATH.jsonl | PATH.ndjson": "custom format, JSON lines (mlkd.data.custom)",
    "PATH.csv": "custom format, CSV (mlkd.data.custom)",
}
_MANIFEST_BUILDERS: dict[str, Callable[..., MultiLabelDataset]] = {
    ".jsonl": CustomDataset, ".ndjson": CustomDataset, ".csv": CustomDataset,
}


def build_dataset(spec: str, transform: Transform | None = None, skip_missing: bool = False) -> MultiLabelDataset:
    """Build a dataset from a spec string (see ``DATASET_FORMS``): for now a path to a custom manifest.

    ``skip_missing`` drops listed images whose file does not exist instead of raising.
    """
    suffix = Path(spec).suffix.lower()
    if suffix not in _MANIFEST_BUILDERS:
        forms = "\n  ".join(f"{k:28s} {v}" for k, v in DATASET_FORMS.items())
        raise ValueError(f"unrecognised dataset spec {spec!r}; accepted forms:\n  {forms}")
    return _MANIFEST_BUILDERS[suffix](spec, transform=transform, skip_missing=skip_missing)


__all__ = [
    "DatasetIdentity", "ImageRecord", "MultiLabelDataset", "collate", "CustomDataset", "build_dataset",
    "DATASET_FORMS", "Compose", "MultiScaleCollate", "RandomHorizontalFlip", "ResizeShorter", "Warp",
    "rescale_boxes",
]
