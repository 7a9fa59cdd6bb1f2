"""Object proposals: generation (selective search, EdgeBoxes), an LMDB cache with meta, importers/exporters.

Boxes are ``(x1, y1, x2, y2)`` float32, 0-based pixel edges of the image on disk, ``x2``/``y2`` exclusive.

The names below are loaded on first use, so that importing one submodule (e.g. :mod:`mlkd.proposals.methods`
to compute proposals for one image) does not load LMDB or scipy.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "attach": ("check_cache_matches", "open_split"),
    "cache": ("BOX_CONVENTION", "ProposalCache", "make_meta", "read_meta"),
    "convert": ("ImportReport", "export_datalist", "export_mat", "import_datalist", "import_mat"),
    "formats": ("read_datalist", "read_mat_proposals", "write_datalist", "write_mat_proposals"),
    "generate": ("GenerateReport", "generate_proposals", "resolve_params"),
    "methods": ("METHODS", "clean_boxes", "edge_boxes", "gradient_edge_map", "selective_search"),
    "shards": ("MergeReport", "merge_caches", "parse_shard", "shard_indices"),
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'mlkd.proposals' has no attribute {name!r}")
    return getattr(importlib.import_module(f"mlkd.proposals.{_MODULE_OF[name]}"), name)
