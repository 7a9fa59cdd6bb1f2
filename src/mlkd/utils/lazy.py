"""The one way a package's ``__init__`` hands on its public names: lazily (PEP 562), so that importing one module
of a package (``mlkd.proposals.methods`` to compute proposals for one image) does not import its siblings (the
LMDB cache, scipy) and ``mlkd.load`` stays light."""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def lazy_exports(package: str, modules: dict[str, tuple[str, ...]]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``__getattr__``, ``__dir__`` and ``__all__`` for the package ``package`` that re-exports, for each of its
    ``modules``, the names listed: ``{"cache": ("ProposalCache",)}`` makes ``package.ProposalCache`` import
    ``package.cache`` on first use."""
    where = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{where[name]}"), name)

    def __dir__() -> list[str]:  # what the package holds already (submodules, ...) and what it hands on
        return sorted(set(vars(sys.modules[package])) | set(where))

    return __getattr__, __dir__, sorted(where)
