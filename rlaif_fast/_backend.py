"""Which implementation an op runs: Triton kernels, the chunked torch path, or the plain reference.

Default: Triton for CUDA tensors when triton imports, the torch path otherwise.
``RLAIF_FAST_BACKEND=triton|torch|reference`` forces one; tests force ``triton`` on CPU tensors with
``TRITON_INTERPRET=1`` so the kernels themselves are exercised without a GPU.
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("triton", "torch", "reference")
ENV_VAR = "RLAIF_FAST_BACKEND"


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken triton install is "not available"
        return False
    return True


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def forced_backend() -> str | None:
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if not value or value == "auto":
        return None
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r} is not a backend; use one of {BACKENDS} or 'auto'.")
    return value


def select_backend(tensor: torch.Tensor, impl: str | None = None) -> str:
    """Pick the backend for an op whose main input is ``tensor``.

    ``impl`` (an op argument) wins over the environment, which wins over the device default.
    Forcing ``triton`` on CPU tensors requires ``TRITON_INTERPRET=1``: the error says so.
    """
    choice = impl if impl not in (None, "auto") else forced_backend()
    if choice is not None and choice not in BACKENDS:
        raise ValueError(f"impl={choice!r} is not a backend; use one of {BACKENDS} or 'auto'.")
    if choice is None:
        return "triton" if tensor.is_cuda and triton_available() else "torch"
    if choice == "triton":
        if not triton_available():
            raise RuntimeError(
                "the triton backend was requested but triton does not import; pip install triton"
            )
        if not tensor.is_cuda and not triton_interpreted():
            raise RuntimeError(
                "the triton backend on CPU tensors needs the interpreter: set TRITON_INTERPRET=1 "
                "before importing rlaif_fast, or use RLAIF_FAST_BACKEND=torch"
            )
    return choice
