"""Triton kernels for the KL estimators and the KL-shaped per-token rewards.

Eager torch spends one kernel per arithmetic op on these: 4x the minimum bytes for the k3 forward, 5.6x
for the shaped rewards (benchmarks/results/rl.md). Here each op is one pass that reads the inputs once and
writes the outputs once (measured ratio 1.000), math in fp32 (fp64 when the outputs are fp64; kl_coef and
clamp arrive as fp32 scalars on a GPU). Estimators are a constexpr code: 0 = k1, 1 = k2, 2 = k3, 3 = abs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ESTIMATOR_CODE = {"k1": 0, "k2": 1, "k3": 2, "abs": 3}
_BLOCK = 1024


@triton.jit
def kl_value(d, ESTIMATOR: tl.constexpr):
    # d = logp - ref_logp, already in the compute dtype. The one definition of the estimators in Triton:
    # these kernels and the fused PPO loss (ppo_loss.py) call it (reference: rlaif_fast.reference.rl)
    if ESTIMATOR == 0:
        kl = d
    elif ESTIMATOR == 1:
        kl = 0.5 * d * d
    elif ESTIMATOR == 2:
        kl = tl.exp(-d) + d - 1.0
    else:
        kl = tl.abs(d)
    return kl


@triton.jit
def kl_slope(d, ESTIMATOR: tl.constexpr):
    # d KL / d logp (= -d KL / d ref_logp)
    if ESTIMATOR == 0:
        s = tl.full(d.shape, 1.0, d.dtype)
    elif ESTIMATOR == 1:
        s = d
    elif ESTIMATOR == 2:
        s = 1.0 - tl.exp(-d)
    else:
        s = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0)).to(d.dtype)
    return s


@triton.jit
def _kl_fwd_kernel(
    logp_ptr,
    ref_ptr,
    out_ptr,
    N,
    clamp,
    ESTIMATOR: tl.constexpr,
    HAS_CLAMP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    cdt = out_ptr.dtype.element_ty
    lp = tl.load(logp_ptr + offs, mask=inb, other=0.0).to(cdt)
    rf = tl.load(ref_ptr + offs, mask=inb, other=0.0).to(cdt)
    kl = kl_value(lp - rf, ESTIMATOR)
    if HAS_CLAMP:
        kl = tl.minimum(tl.maximum(kl, -clamp), clamp)
    tl.store(out_ptr + offs, kl, mask=inb)


@triton.jit
def _kl_bwd_kernel(
    grad_ptr,
    logp_ptr,
    ref_ptr,
    dlogp_ptr,
    dref_ptr,
    N,
    clamp,
    ESTIMATOR: tl.constexpr,
    HAS_CLAMP: tl.constexpr,
    WRITE_DREF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    cdt = grad_ptr.dtype.element_ty
    g = tl.load(grad_ptr + offs, mask=inb, other=0.0).to(cdt)
    lp = tl.load(logp_ptr + offs, mask=inb, other=0.0).to(cdt)
    rf = tl.load(ref_ptr + offs, mask=inb, other=0.0).to(cdt)
    d = lp - rf
    dl = g * kl_slope(d, ESTIMATOR)
    if HAS_CLAMP:
        # torch.clamp's rule: the gradient passes where the value lies inside [-clamp, clamp]
        kl = kl_value(d, ESTIMATOR)
        dl = tl.where((kl >= -clamp) & (kl <= clamp), dl, 0.0)
    tl.store(dlogp_ptr + offs, dl.to(dlogp_ptr.dtype.element_ty), mask=inb)
    if WRITE_DREF:
        tl.store(dref_ptr + offs, (-dl).to(dref_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _shaped_rewards_kernel(
    scores_ptr,
    logp_ptr,
    ref_ptr,
    mask_ptr,
    rew_ptr,
    kl_ptr,
    T,
    kl_coef,
    clamp,
    ESTIMATOR: tl.constexpr,
    HAS_CLAMP: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    # One program per row. Chunks run from the end of the row backwards so the first valid token met is
    # the row's last one: it gets the score, in the same single pass that writes every reward.
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    cdt = rew_ptr.dtype.element_ty
    score = tl.load(scores_ptr + row).to(cdt)
    found = tl.program_id(0) * 0  # int32 scalar: 1 once the last valid token has been seen
    n_chunks = tl.cdiv(T, BLOCK_T)
    for c in range(0, n_chunks):
        offs = (n_chunks - 1 - c) * BLOCK_T + tl.arange(0, BLOCK_T)
        inb = offs < T
        lp = tl.load(logp_ptr + base + offs, mask=inb, other=0.0).to(cdt)
        rf = tl.load(ref_ptr + base + offs, mask=inb, other=0.0).to(cdt)
        m = (tl.load(mask_ptr + base + offs, mask=inb, other=0) != 0) & inb
        kl = kl_value(lp - rf, ESTIMATOR)
        if HAS_CLAMP:
            kl = tl.minimum(tl.maximum(kl, -clamp), clamp)
        kl = tl.where(m, kl, 0.0)
        last = tl.max(tl.where(m, offs, -1), axis=0)
        is_last = (offs == last) & (found == 0)
        rew = tl.where(is_last, score, 0.0) - kl_coef * kl
        tl.store(rew_ptr + base + offs, rew, mask=inb)
        tl.store(kl_ptr + base + offs, kl.to(kl_ptr.dtype.element_ty), mask=inb)
        found = tl.maximum(found, (last >= 0).to(tl.int32))


def _clamp_args(clamp: float | None) -> tuple[float, bool]:
    return (0.0, False) if clamp is None else (float(clamp), True)


def kl_forward(
    logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str, clamp: float | None, out_dtype: torch.dtype
) -> torch.Tensor:
    """KL estimate of same-shape logp, ref_logp (any shape); math in out_dtype (fp32 or fp64)."""
    lp, rf = logp.contiguous(), ref_logp.contiguous()
    out = torch.empty(lp.shape, dtype=out_dtype, device=lp.device)
    n = lp.numel()
    if n:
        c, has_c = _clamp_args(clamp)
        grid = (triton.cdiv(n, _BLOCK),)
        _kl_fwd_kernel[grid](
            lp, rf, out, n, c, ESTIMATOR=ESTIMATOR_CODE[estimator], HAS_CLAMP=has_c, BLOCK=_BLOCK
        )
    return out


def kl_backward(
    grad: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    estimator: str,
    clamp: float | None,
    need_dref: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(d logp, d ref_logp or None) in the dtypes of logp and ref_logp."""
    g, lp, rf = grad.contiguous(), logp.contiguous(), ref_logp.contiguous()
    dlogp = torch.empty_like(lp)
    dref = torch.empty_like(rf) if need_dref else dlogp  # dummy pointer when not written
    n = lp.numel()
    if n:
        c, has_c = _clamp_args(clamp)
        grid = (triton.cdiv(n, _BLOCK),)
        _kl_bwd_kernel[grid](
            g,
            lp,
            rf,
            dlogp,
            dref,
            n,
            c,
            ESTIMATOR=ESTIMATOR_CODE[estimator],
            HAS_CLAMP=has_c,
            WRITE_DREF=need_dref,
            BLOCK=_BLOCK,
        )
    return dlogp, (dref if need_dref else None)


def shaped_rewards(
    scores: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: str,
    clamp: float | None,
    out_dtype: torch.dtype,
    block_t: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards, kl), both [B, T] in out_dtype, from scores [B] and logp, ref_logp, mask [B, T].

    ``block_t`` (a power of 2) overrides the chunk length; tests use a small one to cross chunk edges.
    """
    B, T = logp.shape
    lp, rf, sc = logp.contiguous(), ref_logp.contiguous(), scores.contiguous()
    m = mask.contiguous()
    if m.dtype == torch.bool:
        m = m.view(torch.uint8)  # same bytes; triton loads bytes, not i1
    rew = torch.empty((B, T), dtype=out_dtype, device=lp.device)
    kl = torch.empty((B, T), dtype=out_dtype, device=lp.device)
    if B and T:
        c, has_c = _clamp_args(clamp)
        if block_t is None:
            block_t = min(triton.next_power_of_2(T), 1024)
        _shaped_rewards_kernel[(B,)](
            sc,
            lp,
            rf,
            m,
            rew,
            kl,
            T,
            float(kl_coef),
            c,
            ESTIMATOR=ESTIMATOR_CODE[estimator],
            HAS_CLAMP=has_c,
            BLOCK_T=block_t,
        )
    return rew, kl
