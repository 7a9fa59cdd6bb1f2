"""Layer evaluation/, above inference, proposals, models, metrics, data and utils (CONTRIBUTING.md has the rule).

Reports of trained models on datasets, their ``--plots`` pages and charts, and the
paper's example figure."""

from mlkd.utils.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "evaluate": ("evaluate_student", "evaluate_student_model", "evaluate_teacher", "evaluate_teacher_model",
                 "summary_line", "visualize_teacher"),
    "page": ("write_plots",),
    "figures": ("kd_figure", "teacher_figure"),
})
