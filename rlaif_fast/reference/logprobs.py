"""Reference log-probs, entropy and PPO losses, written for clarity: the oracle of the tests (in float64)
and the ``RLAIF_FAST_BACKEND=reference`` path.

Everything here materializes full [N, V] temporaries on purpose: it is the textbook formula, not the
fast path. Conventions (pinned here, followed by every backend):

- ignored labels (``labels == ignore_index``) give log-prob 0 and entropy 0, and no gradient;
- the log-prob is clamped to <= 0 (a rounding error must never produce a "probability" above 1);
- a mask is boolean in meaning: any nonzero entry counts the token once;
- loss aggregation ("loss_agg"), with per-token loss l[b, t] and mask m[b, t]:
    token-mean          sum_bt m l / sum_bt m
    seq-mean-token-mean mean over rows with >= 1 token of (sum_t m l / sum_t m)
    seq-mean-token-sum  mean over rows with >= 1 token of (sum_t m l)
  an all-masked batch gives a loss of 0 (and zero gradient), never NaN.
"""

from __future__ import annotations

import torch

from rlaif_fast.reference.rl import kl_penalty

LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def _out_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
):
    """log softmax(logits / T)[label] per position, and optionally the entropy of softmax(logits / T).

    logits (..., V) float, labels (...) int -> logp (...) fp32 (fp64 for fp64 logits), entropy (...).
    """
    out_dtype = _out_dtype(logits)
    z = logits.to(out_dtype) / temperature  # (..., V)
    logp_all = torch.log_softmax(z, dim=-1)  # (..., V)
    ignored = labels == ignore_index
    safe = torch.where(ignored, torch.zeros_like(labels), labels).long()
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(ignored, torch.zeros_like(logp), logp.clamp(max=0.0))
    if not return_entropy:
        return logp
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    entropy = torch.where(ignored, torch.zeros_like(entropy), entropy)
    return logp, entropy


def entropy(logits: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / T) over the last dimension: (..., V) -> (...)."""
    logp_all = torch.log_softmax(logits.to(_out_dtype(logits)) / temperature, dim=-1)
    return -(logp_all.exp() * logp_all).sum(-1)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_agg: str) -> torch.Tensor:
    """Reduce a per-token loss (B, T) under ``mask`` (B, T) by ``loss_agg`` (see the module docstring)."""
    m = (mask != 0).to(per_token.dtype)
    # where, not a multiply by m: a masked position may hold anything (nan * 0 = nan)
    masked = torch.where(mask != 0, per_token, torch.zeros_like(per_token))
    if loss_agg == "token-mean":
        return masked.sum() / m.sum().clamp(min=1.0)
    row_tokens = m.sum(-1)  # (B,)
    row_sum = masked.sum(-1)  # (B,)
    if loss_agg == "seq-mean-token-mean":
        per_row = row_sum / row_tokens.clamp(min=1.0)
    elif loss_agg == "seq-mean-token-sum":
        per_row = row_sum
    else:
        raise ValueError(f"loss_agg={loss_agg!r}; use one of {LOSS_AGGS}")
    rows = (row_tokens > 0).to(per_token.dtype)
    return (per_row * rows).sum() / rows.sum().clamp(min=1.0)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = (mask != 0).to(x.dtype)
    return torch.where(mask != 0, x, torch.zeros_like(x)).sum() / m.sum().clamp(min=1.0)


def ppo_loss_from_logprobs(
    logp,
    old_logp,
    advantages,
    mask,
    *,
    entropy=None,
    ref_logp=None,
    clip_eps=0.2,
    clip_eps_high=None,
    kl_coef=0.0,
    kl_estimator="k3",
    entropy_coef=0.0,
    loss_agg="token-mean",
):
    """Clipped PPO surrogate (Schulman et al. 2017, arXiv 1707.06347) + KL-in-loss - entropy bonus.

    per token: l = max(-A r, -A clip(r, 1 - eps, 1 + eps_high)) + kl_coef KL(logp, ref) - c_H H,
    r = exp(logp - old_logp); masked-out tokens are excluded before the exponential.
    """
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    valid = mask != 0
    log_ratio = torch.where(valid, logp - old_logp, torch.zeros_like(logp))
    ratio = torch.exp(log_ratio)
    surrogate = -advantages * ratio
    surrogate_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + eps_high)
    per_token = torch.maximum(surrogate, surrogate_clipped)
    stats = {
        "clip_frac": masked_mean((surrogate_clipped > surrogate).to(logp.dtype), mask),
        "approx_kl": masked_mean(0.5 * log_ratio * log_ratio, mask),
        "ratio_mean": masked_mean(ratio, mask),
    }
    if ref_logp is not None:
        kl = kl_penalty(logp, torch.where(valid, ref_logp, logp), kl_estimator)
        stats["kl"] = masked_mean(kl, mask)
        if kl_coef != 0.0:
            per_token = per_token + kl_coef * kl
    if entropy is not None:
        stats["entropy"] = masked_mean(entropy, mask)
        if entropy_coef != 0.0:
            per_token = per_token - entropy_coef * entropy
    else:
        # on-policy, the mean of -log p over sampled tokens is an unbiased estimate of the entropy
        stats["entropy"] = masked_mean(-logp, mask)
    loss = aggregate(per_token, mask, loss_agg)
    return loss, {k: v.detach() for k, v in stats.items()}


def ppo_policy_loss(
    logits,
    labels,
    old_logp,
    advantages,
    mask,
    *,
    ref_logp=None,
    clip_eps=0.2,
    clip_eps_high=None,
    kl_coef=0.0,
    kl_estimator="k3",
    entropy_coef=0.0,
    temperature=1.0,
    loss_agg="token-mean",
    ignore_index=-100,
):
    """The PPO loss from logits (B, T, V): token_logprobs with entropy, then ppo_loss_from_logprobs."""
    logp, ent = token_logprobs(
        logits, labels, temperature=temperature, ignore_index=ignore_index, return_entropy=True
    )
    return ppo_loss_from_logprobs(
        logp,
        old_logp.to(logp.dtype),
        advantages.to(logp.dtype),
        mask,
        entropy=ent,
        ref_logp=None if ref_logp is None else ref_logp.to(logp.dtype),
        clip_eps=clip_eps,
        clip_eps_high=clip_eps_high,
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
        entropy_coef=entropy_coef,
        loss_agg=loss_agg,
    )


def value_loss(values, old_values, returns, mask, clip_eps=None):
    """Token-mean of 0.5 (V - R)^2; with clip_eps, 0.5 max((V - R)^2, (V_clip - R)^2) where
    V_clip = old_V + clip(V - old_V, -eps, eps) (the PPO2 value clipping)."""
    valid = mask != 0
    err = torch.where(valid, values - returns, 0.0) ** 2
    clip_frac = torch.zeros((), dtype=values.dtype)
    if clip_eps is not None:
        v_clip = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
        err_clip = torch.where(valid, v_clip - returns, 0.0) ** 2
        clip_frac = masked_mean((err_clip > err).to(values.dtype), mask)
        err = torch.maximum(err, err_clip)
    loss = 0.5 * masked_mean(err, mask)
    stats = {"clip_frac": clip_frac, "value_mean": masked_mean(values, mask)}
    return loss, {k: v.detach() for k, v in stats.items()}
