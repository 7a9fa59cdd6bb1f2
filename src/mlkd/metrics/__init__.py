"""Evaluation protocols (docs/evaluation.md): multi-label classification and weakly-supervised detection."""

from mlkd.metrics.classification import (
    AP_MODES,
    THRESHOLD_KEYS,
    average_precision,
    check_scores_targets,
    evaluate_all,
    excluded_classes,
    format_table,
    mean_average_precision,
    predicted_labels,
    report_to_json,
    threshold_metrics,
    top_k_mask,
)
from mlkd.metrics.curves import co_occurrence, curve_area, per_image_ap, precision_recall_curve, reliability
from mlkd.metrics.detection import corloc, detection_ap

__all__ = [
    "AP_MODES", "THRESHOLD_KEYS", "average_precision", "check_scores_targets", "evaluate_all",
    "excluded_classes", "format_table", "mean_average_precision", "predicted_labels", "report_to_json", "threshold_metrics",
    "top_k_mask", "corloc", "detection_ap", "co_occurrence", "curve_area", "per_image_ap", "precision_recall_curve",
    "reliability",
]
