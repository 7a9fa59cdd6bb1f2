"""Layer proposals/, above data and utils (CONTRIBUTING.md has the rule).

Generation (selective search, EdgeBoxes), an LMDB cache with meta,
importers/exporters.

Boxes are ``(x1, y1, x2, y2)`` float32, 0-based pixel edges of the image on disk, ``x2``/``y2`` exclusive."""

from mlkd.utils.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "attach": ("check_cache_matches", "open_split", "require_proposals"),
    "cache": ("BOX_CONVENTION", "ProposalCache", "make_meta", "read_meta"),
    "convert": ("ImportReport", "export_datalist", "export_mat", "import_datalist", "import_mat"),
    "formats": ("read_datalist", "read_mat_proposals", "write_datalist", "write_mat_proposals"),
    "generate": ("GenerateReport", "generate_proposals", "resolve_params"),
    "methods": ("METHODS", "clean_boxes", "edge_boxes", "gradient_edge_map", "propose", "selective_search"),
    "recall": ("proposal_recall",),
    "shards": ("MergeReport", "merge_caches", "parse_shard", "shard_indices"),
})
