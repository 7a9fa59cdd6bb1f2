"""Layer models/, above utils (CONTRIBUTING.md has the rule).

Backbones, the WSDDN teacher and its post-processing, the student classifier, the region ops
they share, their configs and builders, and :func:`~mlkd.models.build.model_from_checkpoint`."""

from mlkd.utils.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "build": ("build_student", "build_teacher", "model_from_checkpoint"),
    "configs": ("StudentModelConfig", "TeacherModelConfig"),
    "backbones": ("CONVENTIONS", "normalize"),
    "student": ("Student",),
    "wsddn": ("NMS_IOU", "WSDDN", "class_detections", "wsddn_loss", "wsddn_scores"),
})
