"""Layer utils/, the ground floor: imports nothing of mlkd but errors and version (CONTRIBUTING.md has the rule).

Configs (YAML + ``--set``), checkpoints, devices and precision, process groups, optional
extras, LMDB environments, run logs and figures."""

from mlkd.utils.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "checkpoint": ("load_checkpoint", "make_checkpoint", "read_model_dir", "save_checkpoint", "write_atomically",
                   "write_model_dir"),
    "config": ("apply_overrides", "from_dict", "load_config", "packaged_configs", "resolve_config", "save_config",
               "to_dict"),
    "device": ("autocast", "native_bf16", "pick_device", "resolve_amp"),
    "distributed": ("DistInfo",),
    "figure": ("agg_figure",),
    "optional": ("MissingExtra", "optional_import"),
    "runlog": ("RunLog",),
})
