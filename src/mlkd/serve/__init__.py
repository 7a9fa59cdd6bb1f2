"""Layer serve/, above api (CONTRIBUTING.md has the rule).

``mlkd serve``: a trained model behind an HTTP API with dynamic batching, limits, metrics and a web page."""

from mlkd.utils.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "app": ("ServeSettings", "create_app"),
    "batcher": ("Batcher", "QueueFull"),
    "server": ("serve",),
})
