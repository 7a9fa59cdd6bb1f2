"""Layer cli/, the top floor: the ``mlkd`` command line, one module per command, over the library (it prints;
the library logs)."""

from mlkd.utils.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "app": ("build_parser", "main"),
})
