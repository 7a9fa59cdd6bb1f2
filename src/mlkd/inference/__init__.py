"""Layer inference/, above export, models, data and utils (CONTRIBUTING.md has the rule).

A trained model over a whole dataset, and the deployed student in fp32 / bf16 / int8."""

from mlkd.utils.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "predict": ("predict_student", "predict_teacher", "teacher_view"),
    "runtime": ("PRECISIONS", "StudentRuntime"),
})
