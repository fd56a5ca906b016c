"""Model loaders that work offline: llama2.c checkpoints (the real stories260K) as transformers models.

Names resolve lazily: importing ``rlaif_fast.models`` does not import transformers.
"""

import importlib

_EXPORTS = {
    "load_llama2c": "llama2c",
    "Llama2cTokenizer": "llama2c",
}


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rlaif_fast.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"rlaif_fast.models.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = sorted(_EXPORTS)
