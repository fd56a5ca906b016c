"""KL estimators between the policy and the reference model, and the KL-shaped per-token rewards.

Estimators (Schulman, "Approximating KL Divergence", 2020), from the sampled token's log-probs with
d = logp - ref_logp:

    k1  = d                   unbiased, signed; its gradient is the unbiased one for a KL in the reward
    k2  = d^2 / 2             biased, >= 0
    k3  = exp(-d) + d - 1     unbiased, >= 0, low variance (its gradient is *not* the KL gradient:
                              TRL issues #4637, #4967 - prefer k1 in the reward)
    abs = |d|

Clamp convention: off by default (``clamp=None``, as TRL). OpenRLHF and verl clip to +-10, which bounds
k3's exp when the policy drifts far but biases the estimate and zeroes its gradient past the bound, so it
is an explicit choice: pass ``clamp=10.0`` to get their behaviour. The clamp applies to the estimate.
"""

from __future__ import annotations

import torch

from rlaif_fast import _checks
from rlaif_fast._backend import select_backend
from rlaif_fast.reference import rl as ref

ESTIMATORS = ref.KL_ESTIMATORS


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    # fp32 math (fp64 for fp64 inputs): bf16 log-prob differences lose the small KLs entirely
    dt = tensors[0].dtype
    for t in tensors[1:]:
        dt = torch.promote_types(dt, t.dtype)
    return torch.promote_types(dt, torch.float32)


def _check_estimator(estimator, clamp) -> float | None:
    _checks.check_choice("estimator", estimator, ESTIMATORS)
    if clamp is not None:
        clamp = _checks.check_positive("clamp", clamp)
    return clamp


def _slope(d: torch.Tensor, estimator: str) -> torch.Tensor:
    """d KL / d logp at d = logp - ref_logp (the torch path's backward)."""
    if estimator == "k1":
        return torch.ones_like(d)
    if estimator == "k2":
        return d
    if estimator == "k3":
        return -torch.expm1(-d)
    return torch.sign(d)


class _KLPenalty(torch.autograd.Function):
    """KL estimate with a hand-written backward: one fused pass each way on the triton backend, and no
    inf * 0 = NaN when a clamped k3 has overflowed exp(-d)."""

    @staticmethod
    def forward(ctx, logp, ref_logp, estimator, clamp, backend):
        out_dtype = _compute_dtype(logp, ref_logp)
        if backend == "triton":
            from rlaif_fast.kernels import kl as kernels

            kl = kernels.kl_forward(logp, ref_logp, estimator, clamp, out_dtype)
        else:
            kl = ref.kl_penalty(logp.to(out_dtype), ref_logp.to(out_dtype), estimator, clamp)
        ctx.save_for_backward(logp, ref_logp)
        ctx.estimator, ctx.clamp, ctx.backend = estimator, clamp, backend
        return kl.to(torch.promote_types(logp.dtype, ref_logp.dtype))

    @staticmethod
    def backward(ctx, grad):
        logp, ref_logp = ctx.saved_tensors
        need_logp, need_ref = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.backend == "triton":
            from rlaif_fast.kernels import kl as kernels

            g = grad.to(_compute_dtype(logp, ref_logp))
            dlogp, dref = kernels.kl_backward(g, logp, ref_logp, ctx.estimator, ctx.clamp, need_ref)
        else:
            cdt = _compute_dtype(logp, ref_logp)
            d = logp.to(cdt) - ref_logp.to(cdt)
            dl = grad.to(cdt) * _slope(d, ctx.estimator)
            if ctx.clamp is not None:
                kl = ref.kl_penalty(logp.to(cdt), ref_logp.to(cdt), ctx.estimator)
                dl = torch.where((kl >= -ctx.clamp) & (kl <= ctx.clamp), dl, 0.0)
            dlogp, dref = dl.to(logp.dtype), (-dl).to(ref_logp.dtype)
        return (dlogp if need_logp else None), (dref if need_ref else None), None, None, None


def kl_penalty(
    logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1", clamp: float | None = None
) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate from the log-probs of the sampled tokens.

    Args:
        logp: (...) policy log-probs of the sampled tokens, fp32/bf16/fp16/fp64.
        ref_logp: (...) reference log-probs of the same tokens, same shape and device.
        estimator: "k1" | "k2" | "k3" | "abs" (formulas in the module docstring).
        clamp: None (default, no clipping) or a bound c > 0: the estimate is clipped to [-c, c] and its
            gradient is 0 where clipped (torch.clamp's rule).

    Returns:
        (...) the estimate, in the promoted dtype of the inputs (computed in fp32 or fp64).
        Differentiable with respect to both inputs; d KL / d ref_logp = -d KL / d logp.
    """
    _checks.check_float("logp", logp)
    _checks.check_float("ref_logp", ref_logp)
    _checks.check_same_device(logp=logp, ref_logp=ref_logp)
    _checks.check_same_shape(logp=logp, ref_logp=ref_logp)
    clamp = _check_estimator(estimator, clamp)
    backend = select_backend(logp)
    if backend == "reference":
        return ref.kl_penalty(logp, ref_logp, estimator, clamp)
    return _KLPenalty.apply(logp, ref_logp, estimator, clamp, backend)


def _check_shaped_inputs(scores, logp, ref_logp, mask, kl_coef) -> float:
    _checks.check_float("scores", scores)
    _checks.check_tensor("logp", logp, dtypes=_checks.FLOAT_DTYPES, ndim=2)
    _checks.check_float("ref_logp", ref_logp)
    _checks.check_tensor("mask", mask, ndim=2)
    if mask.is_complex():
        raise TypeError(f"mask has dtype {mask.dtype}; use a bool, integer or float 0/1 tensor")
    _checks.check_same_shape(logp=logp, ref_logp=ref_logp, mask=mask)
    if scores.shape != (logp.shape[0],):
        raise ValueError(
            f"scores has shape {tuple(scores.shape)} but logp has shape {tuple(logp.shape)}; "
            f"scores must be [B] = ({logp.shape[0]},), one score per row"
        )
    _checks.check_same_device(logp=logp, ref_logp=ref_logp, mask=mask, scores=scores)
    return _checks.check_positive("kl_coef", kl_coef, allow_zero=True)


def kl_shaped_rewards(
    scores: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: str = "k1",
    *,
    clamp: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token RL rewards: the sequence score on the last response token, a KL penalty on every token.

        rewards[b, t] = -kl_coef * KL[b, t] * mask[b, t] + scores[b] * [t == last valid t of row b]

    This is the RLHF/RLAIF objective r - beta * KL(pi || pi_SFT) (Lee et al. 2023, arXiv 2309.00267,
    beta = 0.05 there) with the reward on the final token.

    Args:
        scores: (B,) one score per sequence (reward model, AI labeler or rule).
        logp, ref_logp: (B, T) log-probs of the sampled response tokens under the policy / reference.
        mask: (B, T) nonzero = response token. Left or right padding and holes are all fine; the score
            goes to the last nonzero of the row. A row with an empty mask gets no score and all zeros.
        kl_coef: beta >= 0.
        estimator: "k1" (default; the unbiased choice for a KL in the reward), "k2", "k3" or "abs".
        clamp: None or c > 0 (see ``kl_penalty``).

    Returns:
        (rewards, kl): both (B, T), 0 at masked positions, in the promoted input dtype but at least fp32;
        ``kl`` is the per-token estimate for logging. No gradient flows: rewards are constants of the
        RL update (use ``kl_penalty`` for a KL term inside the loss).
    """
    kl_coef = _check_shaped_inputs(scores, logp, ref_logp, mask, kl_coef)
    clamp = _check_estimator(estimator, clamp)
    backend = select_backend(logp)
    out_dtype = _compute_dtype(scores, logp, ref_logp)
    if logp.numel() == 0:
        return logp.new_zeros(logp.shape, dtype=out_dtype), logp.new_zeros(logp.shape, dtype=out_dtype)
    with torch.no_grad():
        if backend == "triton":
            from rlaif_fast.kernels import kl as kernels

            return kernels.shaped_rewards(scores, logp, ref_logp, mask, kl_coef, estimator, clamp, out_dtype)
        if backend == "reference":
            return ref.kl_shaped_rewards(
                scores.to(out_dtype),
                logp.to(out_dtype),
                ref_logp.to(out_dtype),
                mask,
                kl_coef,
                estimator,
                clamp,
            )
        return _shaped_rewards_torch(scores, logp, ref_logp, mask, kl_coef, estimator, clamp, out_dtype)


def _shaped_rewards_torch(scores, logp, ref_logp, mask, kl_coef, estimator, clamp, out_dtype):
    valid = mask != 0
    kl = ref.kl_penalty(logp.to(out_dtype), ref_logp.to(out_dtype), estimator, clamp)
    kl = kl.masked_fill_(~valid, 0.0)
    rewards = kl * -kl_coef  # (B, T)
    last = ref.last_valid_index(valid)  # (B,), -1 for an empty row
    rows = torch.nonzero(last >= 0).squeeze(1)
    rewards[rows, last[rows]] += scores[rows].to(out_dtype)
    return rewards, kl
