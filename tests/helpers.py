"""Test utilities: the tolerance rule and a torchrun launcher for the multi-rank tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

# "small atol" of the tolerance rule, per input dtype
ATOL = {torch.float64: 1e-10, torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def assert_tolerance(ours, eager, truth, *, atol: float | None = None, dtype=None, name: str = "value"):
    """The project's tolerance rule (ARCHITECTURE.md):

        max |ours - truth| <= max |eager torch in the same dtype - truth| + atol

    ``truth`` is computed in float64. ``atol`` defaults to ATOL[dtype] (dtype: of the inputs).
    """
    if atol is None:
        atol = ATOL[dtype if dtype is not None else ours.dtype]
    truth = truth.detach().double()
    err_ours = (ours.detach().double() - truth).abs()
    err_eager = (eager.detach().double() - truth).abs()
    assert torch.isfinite(ours.detach().double()).all() == torch.isfinite(truth).all(), (
        f"{name}: non-finite values"
    )
    m_ours = err_ours.max().item() if err_ours.numel() else 0.0
    m_eager = err_eager.max().item() if err_eager.numel() else 0.0
    assert m_ours <= m_eager + atol, (
        f"{name}: max |ours - truth| = {m_ours:.3e} exceeds max |eager - truth| = {m_eager:.3e} + atol {atol:.1e}"
    )


def eager_linear_logprobs(hidden, weight, labels, bias, softcap, scale, temperature):
    """What users run today, in the input dtype: logits materialized by F.linear, then log_softmax (the
    tolerance rule's baseline for the hidden-state log-prob ops)."""
    from rlaif_fast.reference.logprobs import token_logprobs as ref_token_logprobs

    z = torch.nn.functional.linear(hidden, weight, bias)  # (N, V) in the input dtype
    if scale is not None:
        z = z * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return ref_token_logprobs(z, labels, temperature=temperature, return_entropy=True)


def scaled_atol(dtype, truth):
    """The rule's "small atol" is sized for unit-scale values; log-probs (~20) and gradients summed over
    tokens (~10) are larger, so it scales with max |truth| (a relative floor of 2e-6 in fp32)."""
    return ATOL[dtype] * max(1.0, truth.detach().abs().max().item())


def assert_backend_tolerance(backend: str, ours, eager, truth, *, dtype, name: str = "value"):
    """The tolerance rule for an op run on ``backend``. The "reference" backend *is* the eager torch
    formula (run in fp32), so measuring it against eager would compare it with itself and could not
    fail: it is held to float64 truth instead, within the dtype's atol scaled to the values."""
    if backend == "reference":
        assert_tolerance(ours, truth, truth, atol=scaled_atol(dtype, truth), name=f"reference/{name}")
    else:
        assert_tolerance(ours, eager, truth, dtype=dtype, name=f"{backend}/{name}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(script: str | Path, *args: str, nproc: int = 2, timeout: float = 300, env=None):
    """Run ``script`` under torchrun with ``nproc`` CPU ranks over gloo; return the CompletedProcess.

    Raises AssertionError with both streams when it fails, so the test log shows every rank's error.
    """
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(script),
        *args,
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
    assert proc.returncode == 0, (
        f"torchrun failed ({proc.returncode})\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr}"
    )
    return proc
