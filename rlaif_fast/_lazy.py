"""Lazy package exports: ``name -> submodule``, imported on first attribute access.

Keeps ``import rlaif_fast.<package>`` free of transformers, deepspeed and triton until a name that needs
them is used.
"""

from __future__ import annotations

import importlib


def lazy_exports(package: str, exports: dict[str, str], namespace: dict):
    """Return ``(__getattr__, __dir__, __all__)`` for ``package`` whose public ``name`` lives in
    ``package.exports[name]``; resolved names are cached in the package's ``namespace``."""

    def __getattr__(name):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = value
        return value

    def __dir__():
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__, sorted(exports)
