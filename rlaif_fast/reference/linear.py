"""Reference log-probs from hidden states: materialize the full [N, V] logits and take log_softmax.

The oracle of the tests (in float64), the ``RLAIF_FAST_BACKEND=reference`` path, and the
"materialized logits" baseline of benchmarks/bench_linear.py. Conventions are those of
``rlaif_fast.reference.logprobs`` (ignored labels give 0 and no gradient, log-prob clamped to <= 0).
"""

from __future__ import annotations

import torch

from rlaif_fast.reference.logprobs import token_logprobs


def linear_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float | None = None,
) -> torch.Tensor:
    """z = softcap(scale·(h·Wᵀ + b)) / T with softcap(x) = cap·tanh(x / cap): (..., H) -> (..., V).

    Computed in fp32 (fp64 for fp64 inputs), whatever the input dtype.
    """
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    z = hidden.to(dtype) @ weight.to(dtype).T  # (..., V)
    if bias is not None:
        z = z + bias.to(dtype)
    if logit_scale is not None:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    softcap: float | None = None,
    logit_scale: float | None = None,
):
    """log softmax(z)[label] (and entropy of softmax(z)) with z from ``linear_logits``: (..., H) -> (...)."""
    z = linear_logits(hidden, weight, bias=bias, temperature=1.0, softcap=softcap, logit_scale=logit_scale)
    return token_logprobs(
        z, labels, temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy
    )
