"""Layer metrics/, above utils (CONTRIBUTING.md has the rule).

The evaluation protocols (docs/evaluation.md) of multi-label classification and
weakly-supervised detection."""

from mlkd.utils.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "classification": ("AP_MODES", "THRESHOLD_KEYS", "average_precision", "check_scores_targets", "evaluate_all",
                       "excluded_classes", "format_table", "mean_average_precision", "predicted_labels",
                       "report_to_json", "threshold_metrics", "top_k_mask"),
    "curves": ("co_occurrence", "curve_area", "per_image_ap", "precision_recall_curve", "reliability"),
    "detection": ("corloc", "detection_ap"),
})
