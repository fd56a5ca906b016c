"""Fused PPO policy loss from logits: one forward pass over [N, V], one backward pass.

Forward, one program per row (token): the online logsumexp / entropy pass of ``logprobs.py``, then the
per-token epilogue in registers —

    logp = z'_y - lse,  r = exp(logp - old_logp)   (log-ratio zeroed where the weight is 0)
    l    = max(-A r, -A clip(r, 1 - eps, 1 + eps_high)) + kl_coef KL_est(logp, ref) - ent_coef H

— and writes, per row, the weighted loss w·l, the coefficient d(w·l)/d logp for the backward, and the
few numbers the stats need. ``w`` is the per-token weight of the chosen loss aggregation (computed in
torch on [B, T]; 0 on masked tokens). The backward is ``logprobs.logprobs_backward`` with
g_lp = coef·g and g_H = -w·ent_coef·g: one more read of the logits and one write of d logits.

The surrogate's gradient follows torch.maximum/clamp: -A·r where the unclipped term is the max
(or tied), 0 where the clipped term is strictly larger (the ratio is outside the clip range).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kl import ESTIMATOR_CODE, kl_slope, kl_value
from .logprobs import acc_dtype, as_rows, block_size, num_warps, row_logp_entropy


@triton.jit
def _ppo_fwd_kernel(
    logits_ptr,
    labels_ptr,
    old_ptr,
    adv_ptr,
    w_ptr,
    ref_ptr,
    logp_ptr,
    ent_ptr,
    lse_ptr,
    loss_ptr,
    coef_ptr,
    log_ratio_ptr,
    clipped_ptr,
    kl_ptr,
    T,
    V,
    stride_b,
    stride_t,
    temperature,
    ignore_index,
    clip_low,
    clip_high,
    kl_coef,
    ent_coef,
    HAS_REF: tl.constexpr,
    KL_KIND: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    _, _, use, logp, ent, lse = row_logp_entropy(
        logits_ptr, labels_ptr, row, T, V, stride_b, stride_t, temperature, ignore_index, ACC, BLOCK
    )

    w = tl.load(w_ptr + row).to(ACC)
    counted = w != 0
    adv = tl.load(adv_ptr + row).to(ACC)
    log_ratio = tl.where(counted, logp - tl.load(old_ptr + row).to(ACC), 0.0)
    ratio = tl.exp(log_ratio)
    s1 = -adv * ratio
    s2 = -adv * tl.minimum(tl.maximum(ratio, clip_low), clip_high)
    clipped = s2 > s1
    loss = tl.maximum(s1, s2) - ent_coef * ent
    coef = tl.where(clipped, 0.0, -adv * ratio)
    if HAS_REF:
        ref = tl.where(counted, tl.load(ref_ptr + row).to(ACC), logp)
        kl, dkl = kl_value(logp - ref, KL_KIND), kl_slope(logp - ref, KL_KIND)
        loss += kl_coef * kl
        coef += kl_coef * dkl
    else:
        kl = tl.zeros((), ACC)
    tl.store(logp_ptr + row, logp)
    tl.store(ent_ptr + row, ent)
    tl.store(lse_ptr + row, lse)
    tl.store(loss_ptr + row, tl.where(counted, w * loss, 0.0))
    tl.store(coef_ptr + row, tl.where(counted & use, w * coef, 0.0))
    tl.store(log_ratio_ptr + row, log_ratio)
    tl.store(clipped_ptr + row, clipped.to(ACC))
    tl.store(kl_ptr + row, kl)


def ppo_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    ref_logp: torch.Tensor | None,
    *,
    temperature: float,
    ignore_index: int,
    clip_eps: float,
    clip_eps_high: float,
    kl_coef: float,
    kl_estimator: str,
    entropy_coef: float,
) -> dict[str, torch.Tensor]:
    """Launch the fused forward. Per-token inputs (...) matching labels; returns (N,) tensors by name:
    logp, entropy, lse, loss (w·l), coef (d(w·l)/d logp), log_ratio, clipped (0/1), kl (0 without ref)."""
    x = as_rows(logits)  # (B, T, V)
    B, T, V = x.shape
    N = B * T
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    flat = lambda t: t.reshape(-1).to(dtype).contiguous()
    old, adv, w = flat(old_logp), flat(advantages), flat(weights)
    ref = flat(ref_logp) if ref_logp is not None else old  # placeholder, unread without HAS_REF
    names = ("logp", "entropy", "lse", "loss", "coef", "log_ratio", "clipped", "kl")
    out = {name: torch.empty(N, dtype=dtype, device=logits.device) for name in names}
    if N == 0:
        return out
    _ppo_fwd_kernel[(N,)](
        x,
        labels.reshape(-1).to(torch.int64).contiguous(),
        old,
        adv,
        w,
        ref,
        *out.values(),
        T,
        V,
        x.stride(0),
        x.stride(1),
        float(temperature),
        int(ignore_index),
        1.0 - float(clip_eps),
        1.0 + float(clip_eps_high),
        float(kl_coef),
        float(entropy_coef),
        HAS_REF=ref_logp is not None,
        KL_KIND=ESTIMATOR_CODE[kl_estimator],
        ACC=acc_dtype(logits.dtype),
        BLOCK=block_size(V),
        num_warps=num_warps(block_size(V)),
    )
    return out
