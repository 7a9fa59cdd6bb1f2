"""mlkd: multi-label image classification by knowledge distillation from weakly-supervised detection.

``mlkd.load(path)`` returns a trained student as a :class:`~mlkd.api.Classifier` or a teacher as a
:class:`~mlkd.api.Detector` (see :mod:`mlkd.api`). Like every package face of mlkd, this one hands its names on
lazily: ``import mlkd`` is cheap, and the API is imported on first use.
"""

from mlkd.utils.lazy import lazy_exports
from mlkd.version import __version__

__getattr__, __dir__, _api = lazy_exports(__name__, {"api": ("Classifier", "Detector", "load")})
__all__ = [*_api, "__version__"]
