"""Log-probs (and entropy) of labels straight from hidden states and the lm_head weight, and the PPO
policy loss computed the same way: a policy step never holds the [N, V] logits.

At N = 8192 tokens and V = 152064 the logits alone are 2.5 GB in bf16, times policy and reference:
the most reported out-of-memory of RLHF trainers. Here CUDA tensors run the tiled Triton kernels of
``kernels/linear_logprobs.py`` (logits live only as (tile, tile) blocks in registers); CPU tensors run
a torch path chunked over tokens whose extra memory is O(chunk·V), never O(N·V).
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch

from rlaif_fast import _checks
from rlaif_fast._backend import select_backend
from rlaif_fast.ops.logprobs import widen_labels
from rlaif_fast.reference import linear as _ref

# elements of one (chunk, V) fp32 temporary of the torch path: 32 MiB, 262 tokens at V = 32000.
# Fewer tokens per chunk re-read W more often: at 128 tokens the matmuls ran 1.6x slower (2 CPU cores).
_CHUNK_ELEMS = 1 << 23

# The Triton backend's backward: "gemm" (default) recomputes each token chunk's logits with cuBLAS, turns
# them into d logits in one Triton pass, then d hidden = dU·W and d W += dUᵀ·h as two more GEMMs;
# "atomic" is the Cut Cross-Entropy layout, one kernel per (token tile, vocabulary tile) adding into d
# hidden and d weight with fp32 atomics (~V / 128 = 1000 adds per d hidden element at V = 128256).
# Default "gemm": three GEMMs that cuBLAS runs near peak plus ~14 bytes per logit moved around them
# (results/linear.md) beat a hand-tiled kernel bound by atomics — to be confirmed on the first GPU run
# with benchmarks/gpu/bench_linear.py, which times both. RLAIF_FAST_LINEAR_BACKWARD=gemm|atomic sets it
# for a whole run; the ``backward=`` argument wins over the environment.
BACKWARDS = ("gemm", "atomic")
BACKWARD_ENV = "RLAIF_FAST_LINEAR_BACKWARD"
# The Triton backend's forward: "fused" (default: one kernel, tl.dot tiles and the online log-sum-exp,
# the logits never leave registers) or "gemm" (cuBLAS per token chunk writes fp32 products, the same
# kernel reads them back: 8 more bytes per logit, but a library matmul). Unmeasured on a GPU so far: the
# default stays the kernel that moves fewer bytes; bench_linear.py times both (variant "gemm-fwd").
FORWARDS = ("fused", "gemm")
FORWARD_ENV = "RLAIF_FAST_LINEAR_FORWARD"


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclasses.dataclass(frozen=True)
class _Knobs:
    """The scalar settings of one call, shared by forward, backward and both backends."""

    temperature: float
    ignore_index: int
    entropy: bool
    softcap: float | None
    scale: float
    chunk: int | None
    backend: str
    backward: str = "gemm"
    forward: str = "fused"


# ---------------------------------------------------------------------------------------------------
# torch path: chunks of tokens, fp32 logits of one chunk at a time. Every (C, V) step runs in place on
# the matmul's output: log-probs alone hold one (C, V) buffer, entropy adds one, soft-capping one more.


def _chunk_logits(h, w, b, k: _Knobs):
    """z (C, V) in the accumulation dtype: one new buffer, the transforms in place."""
    z = h @ w.T  # (C, V)
    if b is not None:
        z.add_(b)
    if k.scale != 1.0:
        z.mul_(k.scale)
    if k.softcap is not None:
        z.div_(k.softcap).tanh_().mul_(k.softcap)
    return z.div_(k.temperature) if k.temperature != 1.0 else z


def _chunks(N: int, V: int, chunk: int | None):
    step = chunk or max(1, _CHUNK_ELEMS // max(V, 1))
    return [(s, min(s + step, N)) for s in range(0, N, step)]


def _torch_fwd(h, w, b, y, k: _Knobs):
    N = h.shape[0]
    acc = _acc_dtype(h.dtype)
    w, b = w.to(acc), (b.to(acc) if b is not None else None)  # no copy for fp32 / fp64 weights
    lse = torch.empty(N, dtype=acc, device=h.device)
    logp = torch.empty_like(lse)
    h_full = torch.empty_like(lse) if k.entropy else None  # entropy before masking ignored labels
    keep = y != k.ignore_index
    safe_y = torch.where(keep, y, torch.zeros_like(y)).long()
    for s, e in _chunks(N, w.shape[0], k.chunk):
        z = _chunk_logits(h[s:e].to(acc), w, b, k)  # (C, V)
        z_y = z.gather(1, safe_y[s:e, None])[:, 0]
        m = z.amax(dim=1)
        z.sub_(m[:, None])  # z − m <= 0
        if k.entropy:
            ex = z.exp()  # (C, V)
            l = ex.sum(1)
            # entropy = log l − Σ e·(z − m) / l: two non-negative terms; lse − E[z] would cancel digits
            h_full[s:e] = l.log() - ex.mul_(z).sum(1) / l
            del ex
        else:
            l = z.exp_().sum(1)
        lse[s:e] = m + l.log()
        logp[s:e] = (z_y - lse[s:e]).clamp_(max=0.0)
    logp = torch.where(keep, logp, torch.zeros_like(logp))
    ent = torch.where(keep, h_full, torch.zeros_like(h_full)) if k.entropy else None
    return logp, ent, lse, h_full


def _torch_bwd(h, w, b, y, lse, h_full, g_lp, g_ent, k: _Knobs, need):
    """Recompute each chunk's logits; dz = g_lp·(onehot − p) + g_H·p·(E[z] − z) with
    E[z] − z = −log p − entropy, then the chain rule through the cap, the scale and T."""
    acc = _acc_dtype(h.dtype)
    w_acc, b_acc = w.to(acc), (b.to(acc) if b is not None else None)
    keep = y != k.ignore_index
    g_lp = torch.where(keep, g_lp.to(acc), 0.0)
    g_ent = torch.where(keep, g_ent.to(acc), 0.0) if g_ent is not None else None
    safe_y = torch.where(keep, y, torch.zeros_like(y)).long()
    dh = torch.empty(h.shape, dtype=acc, device=h.device) if need[0] else None
    dw = torch.zeros(w.shape, dtype=acc, device=h.device) if need[1] else None
    db = torch.zeros(w.shape[0], dtype=acc, device=h.device) if need[2] and b is not None else None
    for s, e in _chunks(h.shape[0], w.shape[0], k.chunk):
        h_c = h[s:e].to(acc)
        z = _chunk_logits(h_c, w_acc, b_acc, k)  # (C, V)
        d_cap = None
        if k.softcap is not None:  # 1 − tanh², tanh recovered from z = cap·tanh / T
            d_cap = z.mul(k.temperature / k.softcap).square_().neg_().add_(1.0)
        logp_all = z.sub_(lse[s:e, None])
        if g_ent is not None:
            p = logp_all.exp()  # (C, V)
            # g_H·(−log p − entropy) − g_lp, then times p, in z's buffer
            dz = logp_all.neg_().sub_(h_full[s:e, None]).mul_(g_ent[s:e, None]).sub_(g_lp[s:e, None]).mul_(p)
            del p
        else:
            dz = logp_all.exp_().mul_(-g_lp[s:e, None])
        dz.scatter_add_(1, safe_y[s:e, None], g_lp[s:e, None])
        if k.scale != k.temperature:
            dz.mul_(k.scale / k.temperature)
        if d_cap is not None:
            dz.mul_(d_cap)
            del d_cap
        if dh is not None:
            torch.matmul(dz, w_acc, out=dh[s:e])
        if dw is not None:
            dw.addmm_(dz.T, h_c)
        if db is not None:
            db += dz.sum(0)
    return dh, dw, db


# ---------------------------------------------------------------------------------------------------
# autograd


class _LinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, k: _Knobs):
        if k.backend == "triton" and k.forward == "gemm":
            from rlaif_fast.ops.linear_gemm import linear_logprobs_fwd_gemm

            logp, ent, lse, h_full = linear_logprobs_fwd_gemm(
                hidden, weight, bias, labels, temperature=k.temperature, ignore_index=k.ignore_index,
                entropy=k.entropy, softcap=k.softcap, scale=k.scale, chunk=k.chunk,
            )  # fmt: skip
        elif k.backend == "triton":
            from rlaif_fast.kernels.linear_logprobs import linear_logprobs_fwd

            logp, ent, lse, h_full = linear_logprobs_fwd(
                hidden, weight, bias, labels, temperature=k.temperature, ignore_index=k.ignore_index,
                entropy=k.entropy, softcap=k.softcap, scale=k.scale,
            )  # fmt: skip
        else:
            logp, ent, lse, h_full = _torch_fwd(hidden, weight, bias, labels, k)
        ctx.save_for_backward(hidden, weight, bias, labels, lse, h_full)
        ctx.k = k
        if ent is None:
            ent = logp.new_zeros(0)  # placeholder output; never differentiated
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, bias, labels, lse, h_full = ctx.saved_tensors
        k = ctx.k
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        if not any(need):
            return None, None, None, None, None
        g_lp = g_lp.contiguous()
        g_ent = g_ent.contiguous() if k.entropy else None
        if k.backend == "triton" and k.backward == "gemm":
            from rlaif_fast.ops.linear_gemm import linear_logprobs_bwd_gemm

            dh, dw, db = linear_logprobs_bwd_gemm(
                hidden, weight, bias, labels, lse, h_full, g_lp, g_ent, temperature=k.temperature,
                ignore_index=k.ignore_index, softcap=k.softcap, scale=k.scale, chunk=k.chunk,
                need_dh=need[0], need_dw=need[1], need_db=need[2],
            )  # fmt: skip
        elif k.backend == "triton":
            from rlaif_fast.kernels.linear_logprobs import linear_logprobs_bwd

            dh, dw, db = linear_logprobs_bwd(
                hidden, weight, bias, labels, lse, h_full, g_lp, g_ent, temperature=k.temperature,
                ignore_index=k.ignore_index, softcap=k.softcap, scale=k.scale,
                need_dh=need[0], need_dw=need[1], need_db=need[2],
            )  # fmt: skip
        else:
            dh, dw, db = _torch_bwd(hidden, weight, bias, labels, lse, h_full, g_lp, g_ent, k, need)
        dh = dh.to(hidden.dtype) if dh is not None else None
        dw = dw.to(weight.dtype) if dw is not None else None
        db = db.to(bias.dtype) if db is not None else None
        return dh, dw, db, None, None


def _check_inputs(hidden, weight, labels, bias, temperature, softcap, logit_scale, chunk_size, ignore_index):
    _checks.check_float("hidden", hidden)
    _checks.check_tensor("hidden", hidden, min_ndim=1)
    _checks.check_float("weight", weight)
    _checks.check_tensor("weight", weight, ndim=2)
    _checks.check_int("labels", labels)
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise TypeError(
            f"hidden ({hidden.dtype}), weight ({weight.dtype}) and bias "
            f"({None if bias is None else bias.dtype}) must share one dtype; cast them with .to(hidden.dtype)"
        )
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight has shape {tuple(weight.shape)} but hidden has H = {hidden.shape[-1]}; "
            "weight must be the lm_head weight of shape (V, H)"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias has shape {tuple(bias.shape)}; expected (V,) = ({weight.shape[0]},)")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"labels has shape {tuple(labels.shape)} but hidden has shape {tuple(hidden.shape)}; "
            "labels must be hidden.shape[:-1]"
        )
    _checks.check_same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)
    _checks.check_positive("temperature", temperature)
    if softcap is not None:
        _checks.check_positive("softcap", softcap)
    if logit_scale is not None and not math.isfinite(_checks.check_positive("logit_scale", logit_scale)):
        raise ValueError(f"logit_scale must be finite, got {logit_scale!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None (automatic), got {chunk_size!r}")
    # range check on CPU only: on CUDA it would cost a host sync per call
    if not labels.is_cuda and labels.numel():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= weight.shape[0]))
        if bad.any():
            raise ValueError(
                f"labels hold {labels[bad][0].item()}, outside [0, V = {weight.shape[0]}) and not "
                f"ignore_index = {ignore_index}; mark unused positions with ignore_index"
            )


def _select_impl(what: str, value: str | None, choices: tuple[str, ...], env: str, default: str) -> str:
    """The argument, else the environment variable, else the default; unknown names raise."""
    if value is not None:
        if value not in choices:
            raise ValueError(f"{what}={value!r} is not a Triton {what}; use one of {choices} or None")
        return value
    value = os.environ.get(env, "").strip().lower() or default
    if value not in choices:
        raise ValueError(f"{env}={value!r} is not a Triton {what}; set it to one of {choices}")
    return value


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    softcap: float | None = None,
    logit_scale: float | None = None,
    backward: str | None = None,
    forward: str | None = None,
):
    """Log-prob of each label (and the entropy) from hidden states, never materializing [N, V] logits.

    hidden (..., H) and weight (V, H) of one float dtype, bias (V,) or None, labels (...) int.

        z = softcap(s·(h·Wᵀ + b)) / T,   softcap(x) = cap·tanh(x / cap),  s = logit_scale
        logp = z[label] − logsumexp(z)  (clamped to <= 0),   H = logsumexp(z) − Σ softmax(z)·z

    The temperature divides in fp32 inside (bf16 division widens the rollout/train log-prob gap).
    Ignored labels (``== ignore_index``) give 0 and no gradient, for log-prob and entropy alike.
    Returns logp (...) in fp32 (fp64 for fp64 inputs), and entropy (...) when ``return_entropy``.
    Gradients reach hidden, weight and bias. ``chunk_size``: tokens per chunk of the CPU torch path
    (default: 2^23 / V) and of the Triton GEMM backward (default: 2^28 / V). ``backward``: "gemm" or
    "atomic", the Triton backend's backward (default: $RLAIF_FAST_LINEAR_BACKWARD, else "gemm"; the
    other backends ignore it); ``forward``: "fused" or "gemm" likewise ($RLAIF_FAST_LINEAR_FORWARD, else
    "fused"). Labels are range-checked on CPU only (on CUDA it would be a host sync).
    Cut Cross-Entropy (Wijmans et al. 2024, arXiv 2411.09009) is the same idea for the CE loss.
    """
    labels = widen_labels(labels)
    _check_inputs(hidden, weight, labels, bias, temperature, softcap, logit_scale, chunk_size, ignore_index)
    bwd = _select_impl("backward", backward, BACKWARDS, BACKWARD_ENV, "gemm")
    fwd = _select_impl("forward", forward, FORWARDS, FORWARD_ENV, "fused")
    backend = select_backend(hidden)
    if backend == "reference":
        return _ref.linear_token_logprobs(
            hidden, weight, labels, bias=bias, temperature=temperature, ignore_index=ignore_index,
            return_entropy=return_entropy, softcap=softcap, logit_scale=logit_scale,
        )  # fmt: skip
    lead = hidden.shape[:-1]
    h2 = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    if h2.shape[0] == 0:
        backend = "torch"  # no tokens (an all-masked micro-batch): no kernel launch over an empty grid
    k = _Knobs(
        float(temperature), int(ignore_index), bool(return_entropy), None if softcap is None else float(softcap),
        1.0 if logit_scale is None else float(logit_scale), chunk_size, backend, bwd, fwd,
    )  # fmt: skip
    logp, ent = _LinearTokenLogprobs.apply(h2, w, bias, labels.reshape(-1).contiguous(), k)
    if return_entropy:
        return logp.view(lead), ent.view(lead)
    return logp.view(lead)


def linear_ppo_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    loss_agg: str = "token-mean",
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    softcap: float | None = None,
    logit_scale: float | None = None,
    entropy_stat: bool = True,
    return_logprobs: bool = False,
):
    """The PPO policy loss of ``rlaif_fast.ops.ppo_loss_from_logprobs`` with log-probs and entropy taken
    from hidden states (B, T, H) by ``linear_token_logprobs``: a policy step never holds [N, V] logits.

    labels, old_logp, advantages, mask (and ref_logp): (B, T). Or ``hidden`` (M, H) and ``labels`` (M,) of
    only the M positions where ``mask`` (B, T) is set, in row-major order: padding then never reaches the
    head (the log-probs are scattered back to (B, T)). ``old_logp=None`` is the on-policy case
    (one epoch over one mini-batch): the old log-probs are the detached current ones (ratio 1, the
    gradient of -A·logp), so no separate scoring pass is needed. The entropy feeds the stats and, when
    ``entropy_coef`` != 0, the bonus; ``entropy_stat=False`` skips it when the bonus is off (free in the
    Triton kernel, one more (C, V) pass each way on the CPU path; the stat is then mean(-logp)).
    Returns (loss, stats) as ``ppo_loss_from_logprobs`` does, and the detached log-probs (B, T) third
    when ``return_logprobs``. PPO: Schulman et al. 2017, arXiv 1707.06347.
    """
    from rlaif_fast.ops.ppo import ppo_loss_from_logprobs

    with_entropy = entropy_stat or entropy_coef != 0.0
    selected = hidden.dim() == 2 and labels.dim() == 1 and mask.dim() == 2
    if selected and hidden.device.type == "cpu" and hidden.shape[0] != int(mask.sum()):
        raise ValueError(
            f"hidden holds {hidden.shape[0]} rows but mask selects {int(mask.sum())} positions; pass the "
            "(M, H) hidden states of exactly the masked positions (row-major), or (B, T, H) and (B, T) labels"
        )
    out = linear_token_logprobs(
        hidden, weight, labels, bias=bias, temperature=temperature, ignore_index=ignore_index,
        return_entropy=with_entropy, chunk_size=chunk_size, softcap=softcap, logit_scale=logit_scale,
    )  # fmt: skip
    logp, entropy = out if with_entropy else (out, None)
    if selected:  # back to (B, T): masked_scatter is differentiable, padding never reached the head
        where = mask.bool()
        logp = logp.new_zeros(mask.shape).masked_scatter(where, logp)
        if entropy is not None:
            entropy = entropy.new_zeros(mask.shape).masked_scatter(where, entropy)
    loss, stats = ppo_loss_from_logprobs(
        logp, logp.detach() if old_logp is None else old_logp, advantages, mask, entropy=entropy,
        ref_logp=ref_logp, clip_eps=clip_eps, clip_eps_high=clip_eps_high, kl_coef=kl_coef,
        kl_estimator=kl_estimator, entropy_coef=entropy_coef, loss_agg=loss_agg,
    )  # fmt: skip
    return (loss, stats, logp.detach()) if return_logprobs else (loss, stats)
