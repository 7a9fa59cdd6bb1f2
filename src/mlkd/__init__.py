"""mlkd: multi-label image classification by knowledge distillation from weakly-supervised detection."""

__version__ = "0.1.0"
