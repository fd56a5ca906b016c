"""The PPO policy loss (clipped surrogate + KL-in-loss + entropy bonus) and the clipped value loss.

Two entry points for the policy loss:

- ``ppo_loss_from_logprobs``: plain differentiable torch on per-token [B, T] tensors. Use it when the
  log-probs come from elsewhere (hidden-state log-probs, a model wrapper); it is cheap, O(B·T).
- ``ppo_policy_loss``: from the logits [B, T, V]. On the triton backend one kernel reads the logits once
  and produces log-prob, entropy and the per-token loss together; the backward writes d logits once.
  On the torch backend it is the chunked ``token_logprobs`` followed by ``ppo_loss_from_logprobs``,
  which never materializes an [N, V] fp32 temporary either.

Loss aggregation (``loss_agg``), with per-token loss l[b, t] and mask m[b, t] (nonzero = counted):
    "token-mean"           sum_bt m l / sum_bt m                       (every token weighs the same)
    "seq-mean-token-mean"  mean over rows with >= 1 token of sum_t m l / sum_t m   (every sequence)
    "seq-mean-token-sum"   mean over rows with >= 1 token of sum_t m l  (Dr. GRPO style, no length bias)
An all-masked batch gives loss 0 and zero gradient, never NaN.

Data parallelism: every reduction is over the local batch. Under DDP / ZeRO the gradients are averaged
over ranks, so "token-mean" equals the global token mean only when every rank holds the same number of
tokens (and the seq-mean variants when every rank holds the same number of non-empty rows); otherwise
each rank's tokens are weighted by 1 / (ranks · local count). This is what TRL and OpenRLHF do too.
"""

from __future__ import annotations

import math

import torch

from rlaif_fast._backend import select_backend
from rlaif_fast._checks import check_choice, check_float, check_positive, check_same_device, check_same_shape
from rlaif_fast.reference.logprobs import LOSS_AGGS
from rlaif_fast.reference.rl import kl_penalty

KL_ESTIMATORS = ("k1", "k2", "k3", "abs")


def _check_coef(name: str, value, *, allow_negative: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or (v < 0 and not allow_negative):
        rule = "a finite number" if allow_negative else "a finite number >= 0"
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    return v


def _check_mask(mask, like: torch.Tensor, like_name: str) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor (bool or 0/1), got {type(mask).__name__}")
    check_same_shape(**{like_name: like, "mask": mask})
    check_same_device(**{like_name: like, "mask": mask})
    return mask if mask.dtype == torch.bool else mask != 0


def _check_per_token(anchor_name: str, anchor: torch.Tensor, mask, kl_coef: float, **named) -> torch.Tensor:
    """Float per-token tensors of ``anchor``'s shape and device; a KL term needs ref_logp. Returns the
    boolean mask."""
    for name, t in named.items():
        if t is not None:
            check_float(name, t)
    check_same_shape(**{anchor_name: anchor}, **named)
    check_same_device(**{anchor_name: anchor}, **named)
    mask = _check_mask(mask, anchor, anchor_name)
    if kl_coef != 0.0 and named.get("ref_logp") is None:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logp (the reference policy's log-probs); pass it")
    return mask


def check_loss_options(clip_eps, clip_eps_high, kl_coef, kl_estimator, entropy_coef, loss_agg):
    """Shared checks of the PPO loss options; returns (clip_eps, eps_high, kl_coef, entropy_coef)."""
    clip_eps = check_positive("clip_eps", clip_eps)
    eps_high = clip_eps if clip_eps_high is None else check_positive("clip_eps_high", clip_eps_high)
    kl_coef = _check_coef("kl_coef", kl_coef)
    entropy_coef = _check_coef("entropy_coef", entropy_coef, allow_negative=True)
    check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    check_choice("loss_agg", loss_agg, LOSS_AGGS)
    return clip_eps, eps_high, kl_coef, entropy_coef


def token_weights(mask: torch.Tensor, loss_agg: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-token weights w (same shape as mask) with loss = sum(w * l) for the chosen ``loss_agg``.

    Rows are the leading dimensions, tokens the last one. O(B·T), computed once per loss call.
    """
    m = mask.to(dtype)
    if loss_agg == "token-mean":
        return m / m.sum().clamp(min=1.0)
    row_tokens = m.sum(-1, keepdim=True)  # (B, 1)
    n_rows = (row_tokens > 0).to(dtype).sum().clamp(min=1.0)
    if loss_agg == "seq-mean-token-mean":
        return m / (row_tokens.clamp(min=1.0) * n_rows)
    return m / n_rows  # seq-mean-token-sum


def _masked_mean(x: torch.Tensor, mask: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return (torch.where(mask, x, torch.zeros_like(x)).sum() / count).detach()


def ppo_loss_from_logprobs(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    entropy: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    loss_agg: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO loss from per-token log-probs (Schulman et al. 2017, arXiv 1707.06347).

    All tensors (B, T) (any leading shape; the last dimension is time). Per token, r = exp(logp - old_logp):

        l = max(-A·r, -A·clip(r, 1 - clip_eps, 1 + clip_eps_high))       clipped surrogate
            + kl_coef · KL_est(logp, ref_logp)                            KL-in-loss (GRPO style)
            - entropy_coef · entropy                                      entropy bonus

    reduced by ``loss_agg`` (see the module docstring). ``clip_eps_high`` > ``clip_eps`` is DAPO's
    "clip-higher"; None means symmetric. ``kl_estimator`` is k1, k2, k3 or abs
    (``rlaif_fast.reference.rl.kl_penalty``). Gradients flow into ``logp`` and ``entropy`` only.

    Returns (loss 0-d, stats): detached 0-d token means of "clip_frac" (tokens whose clipped term is
    active), "approx_kl" (0.5·(logp - old_logp)²), "ratio_mean", "entropy" (of ``entropy`` when given,
    else the sampled-token estimate mean(-logp)), and "kl" when ``ref_logp`` is given.
    """
    check_float("logp", logp)
    clip_eps, eps_high, kl_coef, entropy_coef = check_loss_options(
        clip_eps, clip_eps_high, kl_coef, kl_estimator, entropy_coef, loss_agg
    )
    mask = _check_per_token(
        "logp",
        logp,
        mask,
        kl_coef,
        old_logp=old_logp,
        advantages=advantages,
        entropy=entropy,
        ref_logp=ref_logp,
    )
    if entropy_coef != 0.0 and entropy is None:
        raise ValueError(
            f"entropy_coef={entropy_coef} needs entropy; pass token_logprobs(..., return_entropy=True)[1]"
        )

    # constants of the update, as in ppo_policy_loss: no gradient into a critic or an un-detached old_logp
    old_logp, advantages = old_logp.detach(), advantages.detach()
    ref_logp = None if ref_logp is None else ref_logp.detach()
    dtype = logp.dtype
    zero = torch.zeros_like(logp)
    # masked positions may hold anything (padding): zero the log-ratio before exp so no inf/NaN leaks
    log_ratio = torch.where(mask, logp - old_logp.to(dtype), zero)  # (B, T)
    ratio = torch.exp(log_ratio)
    adv = advantages.to(dtype)
    surrogate = -adv * ratio
    surrogate_clipped = -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + eps_high)
    per_token = torch.maximum(surrogate, surrogate_clipped)

    count = mask.sum().clamp(min=1).to(dtype)
    stats = {
        "clip_frac": _masked_mean((surrogate_clipped > surrogate).to(dtype), mask, count),
        "approx_kl": _masked_mean(0.5 * log_ratio * log_ratio, mask, count),
        "ratio_mean": _masked_mean(ratio, mask, count),
    }
    if ref_logp is not None:
        kl = kl_penalty(logp, torch.where(mask, ref_logp.to(dtype), logp), kl_estimator)
        stats["kl"] = _masked_mean(kl, mask, count)
        if kl_coef != 0.0:
            per_token = per_token + kl_coef * kl
    if entropy is not None:
        stats["entropy"] = _masked_mean(entropy.to(dtype), mask, count)
        if entropy_coef != 0.0:
            per_token = per_token - entropy_coef * entropy.to(dtype)
    else:
        stats["entropy"] = _masked_mean(-logp, mask, count)

    weights = token_weights(mask, loss_agg, dtype)
    loss = (torch.where(mask, per_token, zero) * weights).sum()
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-mean squared error of the value head, optionally PPO2-clipped.

    All tensors (B, T). Without clipping: 0.5 · mean_m (V - R)². With ``clip_eps``:
    V_clip = old_V + clip(V - old_V, -clip_eps, clip_eps), loss = 0.5 · mean_m max((V - R)², (V_clip - R)²)
    (Schulman et al. 2017; the OpenAI baselines ppo2 convention). The mean is over the local tokens with
    mask != 0 (see the module docstring for data parallelism). Returns (loss, stats) with detached 0-d
    "clip_frac" (tokens where the clipped error is the larger one; 0 without clipping) and "value_mean".
    """
    for name, t in (("values", values), ("old_values", old_values), ("returns", returns)):
        check_float(name, t)
    check_same_shape(values=values, old_values=old_values, returns=returns)
    check_same_device(values=values, old_values=old_values, returns=returns)
    mask = _check_mask(mask, values, "values")
    if clip_eps is not None:
        clip_eps = check_positive("clip_eps", clip_eps)

    dtype = values.dtype
    zero = torch.zeros_like(values)
    count = mask.sum().clamp(min=1).to(dtype)
    # masked positions may hold anything (padding): zero the error before squaring, so that a nan / inf there
    # gives no nan gradient (0 * 2 (V - nan) = nan) into the value head
    err = torch.where(mask, values - returns.to(dtype), zero) ** 2  # (B, T)
    clip_frac = torch.zeros((), dtype=dtype, device=values.device)
    if clip_eps is not None:
        old = old_values.to(dtype)
        v_clip = old + torch.clamp(values - old, -clip_eps, clip_eps)
        err_clip = torch.where(mask, v_clip - returns.to(dtype), zero) ** 2
        clip_frac = _masked_mean((err_clip > err).to(dtype), mask, count)
        err = torch.maximum(err, err_clip)
    loss = 0.5 * torch.where(mask, err, zero).sum() / count
    stats = {"clip_frac": clip_frac.detach(), "value_mean": _masked_mean(values, mask, count)}
    return loss, stats


class _FusedPPOLoss(torch.autograd.Function):
    """Triton path: one kernel pass over the logits forward, one (logprobs_backward) backward."""

    @staticmethod
    def forward(ctx, logits, labels, old_logp, advantages, weights, ref_logp, opts):
        from rlaif_fast.kernels.ppo_loss import ppo_forward

        out = ppo_forward(logits, labels, old_logp, advantages, weights, ref_logp, **opts)
        ctx.save_for_backward(logits, labels, weights, out["coef"], out["lse"], out["entropy"])
        ctx.opts = opts
        ctx.mark_non_differentiable(out["logp"], out["entropy"], out["log_ratio"], out["clipped"], out["kl"])
        return out["loss"].sum(), out["logp"], out["entropy"], out["log_ratio"], out["clipped"], out["kl"]

    @staticmethod
    def backward(ctx, grad_loss, *_):
        from rlaif_fast.kernels.logprobs import logprobs_backward

        logits, labels, weights, coef, lse, ent = ctx.saved_tensors
        opts = ctx.opts
        g_lp = coef * grad_loss
        g_h = None
        if opts["entropy_coef"] != 0.0:
            g_h = weights.reshape(-1).to(coef.dtype) * (-opts["entropy_coef"] * grad_loss)
        grad = logprobs_backward(
            logits, labels, g_lp, g_h, lse, ent, opts["temperature"], opts["ignore_index"]
        )
        return grad, None, None, None, None, None, None


def ppo_policy_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
    loss_agg: str = "token-mean",
    ignore_index: int = -100,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO loss straight from the logits: log-prob, ratio, surrogate, KL and entropy in one pass.

    logits (B, T, V) fp32/bf16/fp16 (non-contiguous ``logits[:, :-1]`` is fine), labels (B, T) integer,
    old_logp / advantages / mask / ref_logp (B, T). The per-token loss is that of
    ``ppo_loss_from_logprobs`` with logp, entropy = ``token_logprobs(logits / temperature, labels)``;
    ``loss_agg`` and data-parallel behaviour are in the module docstring. The gradient flows into the
    logits only: old_logp, advantages and ref_logp are constants of the update.

    Returns (loss 0-d, stats) with the same stats as ``ppo_loss_from_logprobs`` ("entropy" is the true
    entropy of softmax(logits / T) here).
    """
    from rlaif_fast.ops.logprobs import check_logprob_inputs, token_logprobs, widen_labels

    labels = widen_labels(labels)
    temperature = check_logprob_inputs(logits, labels, temperature, ignore_index)
    clip_eps, eps_high, kl_coef, entropy_coef = check_loss_options(
        clip_eps, clip_eps_high, kl_coef, kl_estimator, entropy_coef, loss_agg
    )
    # labels share the logits' device (check_logprob_inputs), so they anchor shape and device alike
    mask = _check_per_token(
        "labels", labels, mask, kl_coef, old_logp=old_logp, advantages=advantages, ref_logp=ref_logp
    )

    backend = select_backend(logits)
    # the surrogate's knobs, the same for all three paths
    knobs = dict(
        clip_eps=clip_eps,
        clip_eps_high=eps_high,
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
        entropy_coef=entropy_coef,
    )
    old_logp, advantages = old_logp.detach(), advantages.detach()
    ref_logp = None if ref_logp is None else ref_logp.detach()
    if backend == "reference":
        from rlaif_fast.reference.logprobs import ppo_policy_loss as reference

        return reference(
            logits, labels, old_logp, advantages, mask, ref_logp=ref_logp, temperature=temperature,
            loss_agg=loss_agg, ignore_index=ignore_index, **knobs,
        )  # fmt: skip
    if backend == "torch":
        logp, ent = token_logprobs(
            logits, labels, temperature=temperature, ignore_index=ignore_index, return_entropy=True
        )
        return ppo_loss_from_logprobs(
            logp, old_logp, advantages, mask, entropy=ent, ref_logp=ref_logp, loss_agg=loss_agg, **knobs
        )
    opts = dict(temperature=temperature, ignore_index=ignore_index, **knobs)
    weights = token_weights(mask, loss_agg, torch.float64 if logits.dtype == torch.float64 else torch.float32)
    loss, logp, ent, log_ratio, clipped, kl = _FusedPPOLoss.apply(
        logits, labels, old_logp, advantages, weights, ref_logp, opts
    )
    m = mask.reshape(-1)
    count = m.sum().clamp(min=1).to(logp.dtype)
    stats = {
        "clip_frac": _masked_mean(clipped, m, count),
        "approx_kl": _masked_mean(0.5 * log_ratio * log_ratio, m, count),
        "ratio_mean": _masked_mean(torch.exp(log_ratio), m, count),
        "entropy": _masked_mean(ent, m, count),
    }
    if ref_logp is not None:
        stats["kl"] = _masked_mean(kl, m, count)
    return loss, stats
