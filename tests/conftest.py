"""Shared fixtures. Triton kernels run on CPU tensors through the interpreter (TRITON_INTERPRET=1),
which must be set before triton is first imported: this file runs before any test module."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # two xdist workers on two cores: one thread each, or they fight over the cores.
    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(params=["triton", "torch", "reference"])
def backend(request, monkeypatch):
    """Runs a test once per backend by forcing RLAIF_FAST_BACKEND (triton on CPU = the interpreter)."""
    monkeypatch.setenv("RLAIF_FAST_BACKEND", request.param)
    return request.param


@pytest.fixture
def shared_data() -> Path:
    """../shared/data (real data and the stories260K model); skips with a reason when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (a user's clone without the project's shared data)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
