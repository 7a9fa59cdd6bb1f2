"""Layer training/, above distill, inference, proposals, models, metrics, data and utils (CONTRIBUTING.md has the rule).

The loop over stages (settings + hooks), run folders, and the teacher's and the student's
recipes."""

from mlkd.utils.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "config": ("DataConfig", "OptimConfig", "RunConfig"),
    "loop": ("Hooks", "LoopSettings", "Stage", "StageParts", "run_stages", "train_one_epoch"),
    "optim": ("build_optimizer", "param_groups"),
    "run_folder": ("RunFolder",),
    "teacher": ("TeacherConfig", "TeacherDataConfig", "train_teacher"),
    "student": ("StudentConfig", "train_student"),
})
