"""Layer models/, above utils (CONTRIBUTING.md has the rule).

Backbones, the WSDDN teacher, its OICR refinement streams and its post-processing, the student classifier,
the region ops they share, their configs and builders, and :func:`~mlkd.models.build.model_from_checkpoint`."""

from mlkd.utils.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "build": ("build_student", "build_teacher", "model_from_checkpoint"),
    "configs": ("StudentModelConfig", "TeacherModelConfig"),
    "backbones": ("CONVENTIONS", "normalize"),
    "refine": ("pseudo_labels", "refine_loss", "refined_region_scores"),
    "student": ("Student",),
    "wsddn": ("NMS_IOU", "WSDDN", "class_detections", "wsddn_loss", "wsddn_scores"),
})
