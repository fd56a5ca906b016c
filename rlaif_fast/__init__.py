"""rlaif_fast: reinforcement learning from AI feedback (Lee et al. 2023, arXiv 2309.00267), fast.

``import rlaif_fast`` is deliberately light: it imports neither torch-heavy submodules, nor
transformers, nor deepspeed, and never queries a GPU. Subpackages load on first attribute access.
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = {
    "ops",
    "batching",
    "feedback",
    "reward",
    "trainer",
    "integrations",
    "models",
    "pipeline",
    "reference",
    "cli",
}


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"rlaif_fast.{name}")
    raise AttributeError(f"module 'rlaif_fast' has no attribute {name!r}")


def __dir__():  # tab completion and the traceback's "Did you mean: 'ops'?" see the lazy subpackages too
    return sorted(set(globals()) | _SUBMODULES)


__all__ = sorted(_SUBMODULES) + ["__version__"]
