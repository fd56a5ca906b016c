"""Reference RL math: KL estimators, KL-shaped rewards, advantages, whitening.

Written for clarity, not speed: these are the oracles of ``tests/test_kl.py`` and
``tests/test_advantages.py`` (run in float64) and the baselines of ``benchmarks/bench_gae.py``. The
conventions pinned here are the contract the fast paths in ``rlaif_fast.ops`` must reproduce:

- masks are "nonzero = valid token"; a mask may be left- or right-padded and may have holes.
- GAE skips masked tokens as if they were cut out of the row: each valid token bootstraps from the next
  *valid* token, and the value after the last valid token is 0 (the episode ends there).
- every output is 0 at masked positions.
"""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3", "abs")
GROUP_METHODS = ("grpo", "rloo", "reinforce_baseline")


def kl_penalty(
    logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1", clamp: float | None = None
) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate from the sampled token's log-probs (Schulman, "Approximating KL").

    With d = logp - ref_logp:
    k1 = d                       (unbiased, signed)
    k2 = d^2 / 2
    k3 = exp(-d) + d - 1         (unbiased, >= 0, low variance)
    abs = |d|
    ``clamp`` (None = off) clips the estimate to [-clamp, clamp].

    Dtype contract (the same on every backend): the math runs in fp32 (fp64 for fp64 inputs) and the result
    comes back in the promoted input dtype. bf16 math would lose small KLs entirely (k3 at d = 0.01 is
    5e-5, below bf16's resolution of exp(-d) near 1).
    """
    out_dtype = torch.promote_types(logp.dtype, ref_logp.dtype)
    compute = torch.promote_types(out_dtype, torch.float32)
    d = logp.to(compute) - ref_logp.to(compute)
    if estimator == "k1":
        kl = d
    elif estimator == "k2":
        kl = 0.5 * d * d
    elif estimator == "k3":
        kl = torch.exp(-d) + d - 1.0
    elif estimator == "abs":
        kl = d.abs()
    else:
        raise ValueError(f"estimator={estimator!r}; use one of {KL_ESTIMATORS}")
    if clamp is not None:
        kl = kl.clamp(-clamp, clamp)
    return kl.to(out_dtype)


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last nonzero of each row of mask [B, T]; -1 for an empty row. Returns [B] int64."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand(mask.shape)
    return torch.where(mask != 0, positions, -1).max(dim=1).values


def kl_shaped_rewards(
    scores: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: str = "k1",
    clamp: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards [B, T]: -kl_coef * KL at each valid token, plus scores[b] at the row's last valid
    token (no score for an empty row). Returns (rewards, kl), both 0 at masked positions."""
    valid = mask != 0
    kl = torch.where(valid, kl_penalty(logp, ref_logp, estimator, clamp), 0.0)
    rewards = -kl_coef * kl
    last = last_valid_index(valid)
    for b in range(rewards.shape[0]):
        if last[b] >= 0:
            rewards[b, last[b]] += scores[b]
    return rewards, kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2015, arXiv 1506.02438) with the textbook loop
    over time, the one TRL / OpenRLHF / verl run, extended to skip masked tokens:

        delta_t = r_t + gamma * V_next - V_t,   A_t = delta_t + gamma * lam * A_next,   R_t = A_t + V_t

    where "next" is the next valid token of the row (V_next = A_next = 0 after the last one).
    Returns (advantages, returns), both [B, T] and 0 at masked positions.
    """
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    next_value = rewards.new_zeros(B)
    next_adv = rewards.new_zeros(B)
    for t in reversed(range(T)):
        m = mask[:, t] != 0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = torch.where(m, a, 0.0)
        next_adv = torch.where(m, a, next_adv)
        next_value = torch.where(m, values[:, t], next_value)
    valid = mask != 0
    returns = torch.where(valid, adv + values, 0.0)
    return adv, returns


def group_advantages(
    scores: torch.Tensor, group_size: int, method: str = "grpo", scale_by_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Critic-free advantages from one score per sequence; scores [B], groups of ``group_size`` contiguous.

    grpo:               (s_i - mean_g) / (std_g + eps), std_g the unbiased std of the group
    rloo:               s_i - mean of the other G-1 scores of the group = G/(G-1) * (s_i - mean_g)
    reinforce_baseline: s_i - mean_g
    For rloo and reinforce_baseline, scale_by_std divides by (unbiased std over the whole batch of the
    centered values + eps), as REINFORCE++-baseline does; for grpo it selects the per-group division.
    """
    G = group_size
    out = torch.empty_like(scores)
    for start in range(0, scores.shape[0], G):
        g = scores[start : start + G]
        mean = g.sum() / G
        if method == "grpo":
            a = g - mean
            if scale_by_std:
                std = ((g - mean) ** 2).sum().div(G - 1).sqrt()
                a = a / (std + eps)
        elif method == "rloo":
            a = torch.stack([g[i] - (g.sum() - g[i]) / (G - 1) for i in range(G)])
        elif method == "reinforce_baseline":
            a = g - mean
        else:
            raise ValueError(f"method={method!r}; use one of {GROUP_METHODS}")
        out[start : start + G] = a
    if method != "grpo" and scale_by_std:
        n = out.numel()
        centered = out - out.sum() / n
        std = (centered**2).sum().div(n - 1).sqrt()
        out = out / (std + eps)
    return out


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over the valid entries (along ``dim``, or all); 0 where nothing is valid."""
    valid = (mask != 0).to(x.dtype)
    if dim is None:
        n = valid.sum()
        return (x * valid).sum() / n if n > 0 else (x * 0).sum()
    n = valid.sum(dim)
    return torch.where(n > 0, (x * valid).sum(dim) / n.clamp(min=1), 0.0)


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the valid entries, var unbiased (divides by n - 1; 0 when n = 1).
    With shift_mean=False the mean is added back. 0 at masked positions."""
    valid = mask != 0
    vals = x[valid]
    n = vals.numel()
    if n == 0:
        return torch.zeros_like(x)
    mean = vals.sum() / n
    var = ((vals - mean) ** 2).sum() / (n - 1) if n > 1 else x.new_zeros(())
    out = (x - mean) / torch.sqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(valid, out, 0.0)
