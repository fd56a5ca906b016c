"""Reference RL math: KL estimators, KL-shaped rewards, advantages, whitening, value loss."""

from __future__ import annotations

import torch


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate from the sampled token's log-probs (Schulman, "Approximating KL").

    k1 = logp - ref_logp                       (unbiased, signed)
    k2 = (logp - ref_logp)^2 / 2
    k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1   (unbiased, >= 0, low variance)
    abs = |logp - ref_logp|
    """
    d = logp - ref_logp
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return torch.exp(-d) + d - 1.0
    if estimator == "abs":
        return d.abs()
    raise ValueError(f"estimator={estimator!r}; use one of ('k1', 'k2', 'k3', 'abs')")
