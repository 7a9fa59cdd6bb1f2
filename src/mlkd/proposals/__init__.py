"""Object proposals: generation (selective search, EdgeBoxes), an LMDB cache with meta, importers/exporters.

Boxes are ``(x1, y1, x2, y2)`` float32, 0-based pixel edges of the image on disk, ``x2``/``y2`` exclusive.
"""

from mlkd.proposals.cache import BOX_CONVENTION, ProposalCache, make_meta, read_meta
from mlkd.proposals.convert import ImportReport, export_datalist, export_mat, import_datalist, import_mat
from mlkd.proposals.formats import read_datalist, read_mat_proposals, write_datalist, write_mat_proposals
from mlkd.proposals.generate import GenerateReport, generate_proposals, resolve_params
from mlkd.proposals.methods import METHODS, clean_boxes, edge_boxes, gradient_edge_map, selective_search
from mlkd.proposals.shards import MergeReport, merge_caches, parse_shard, shard_indices

__all__ = [
    "BOX_CONVENTION", "METHODS", "GenerateReport", "ImportReport", "MergeReport", "ProposalCache", "clean_boxes",
    "edge_boxes", "export_datalist", "export_mat", "generate_proposals", "gradient_edge_map", "import_datalist",
    "import_mat", "make_meta", "merge_caches", "parse_shard", "read_datalist", "read_mat_proposals", "read_meta",
    "resolve_params", "selective_search", "shard_indices", "write_datalist", "write_mat_proposals",
]
