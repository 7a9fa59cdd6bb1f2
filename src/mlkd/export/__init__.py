"""Model export and import for other frameworks. Nothing is imported here, so a missing optional dependency only
matters to the module that needs it.

- :mod:`mlkd.export.caffe` — Caffe ``.prototxt`` / ``.caffemodel`` files and the conversions of VGG-style models
  and of the teacher (needs protobuf>=7.35.1,<8);
- :mod:`mlkd.export.caffe.importer` — ``mlkd import-caffe``: the release's models into mlkd weights files / checkpoints;
- :mod:`mlkd.export.exporter` — ``mlkd export``: checkpoints to Caffe or ONNX (:mod:`mlkd.export.onnx`, needs onnx
  and onnxruntime), each verified by another runtime (:mod:`mlkd.export.verify`).
"""
