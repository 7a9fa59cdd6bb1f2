"""Layer export/, above models, data and utils (CONTRIBUTING.md has the rule).

Models for other runtimes, each verified by another runtime: safetensors model folders,
Caffe (:mod:`mlkd.export.caffe`, the ``[caffe]`` extra), ONNX and int8 (the ``[export]`` extra)."""

from mlkd.utils.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "exporter": ("FORMATS", "export_checkpoint"),
    "safetensors": ("export_model_dir",),
    "onnx": ("export_onnx",),
    "quantize": ("INT8_TOLERANCE", "quantize_student"),
})
