"""Layer distill/, above inference, proposals, models, data and utils (CONTRIBUTING.md has the rule).

The student's objective (L_p, L_p', L_f), the frozen teacher and its cached targets, and
where each stage gets them (:class:`~mlkd.distill.config.TeacherPlan`), the per-stage report."""

from mlkd.utils.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "config": ("DistillConfig", "StageConfig", "TeacherPlan"),
    "objective": ("StudentObjective", "feature_loss", "soft_label_loss"),
    "teacher": ("TEACHER_TEMPERATURE", "teacher_outputs"),
    "cache": ("FeatureCacheSpec", "TeacherTargets", "teacher_caches"),
    "feature_store": ("TeacherFeatures",),
    "prepare": ("DistillTeacher", "prepare_teacher"),
    "inputs": ("student_inputs",),
    "report": ("StageReport",),
})
