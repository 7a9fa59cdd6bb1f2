"""mlkd: multi-label image classification by knowledge distillation from weakly-supervised detection.

``mlkd.load(path)`` returns a trained student as a :class:`~mlkd.api.Classifier` or a teacher as a
:class:`~mlkd.api.Detector` (see :mod:`mlkd.api`). The API is imported on first use, so ``import mlkd`` is cheap.
"""

from __future__ import annotations

from typing import Any

from mlkd.version import __version__

__all__ = ["Classifier", "Detector", "load", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("load", "Classifier", "Detector"):
        from mlkd import api

        return getattr(api, name)
    raise AttributeError(f"module 'mlkd' has no attribute {name!r}")
