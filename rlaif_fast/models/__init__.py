"""Model loaders that work offline: llama2.c checkpoints (the real stories260K) as transformers models.

Names resolve lazily: importing ``rlaif_fast.models`` does not import transformers.
"""

from rlaif_fast._lazy import lazy_exports

_EXPORTS = {
    "load_llama2c": "llama2c",
    "Llama2cTokenizer": "llama2c",
}


__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS, globals())
