"""Model export and import for other frameworks, one subpackage each; none is imported here, so a missing
optional dependency only matters to the subpackage that needs it.

- :mod:`mlkd.export.caffe` — Caffe ``.prototxt`` / ``.caffemodel`` files (needs protobuf>=7.35.1,<8).
"""
