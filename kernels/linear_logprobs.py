"""Triton kernels: per-token log-prob (and entropy) of a label straight from hidden states and the
lm_head weight, never materializing the [N, V] logits.

Logits of one (token tile, vocabulary tile) are a tl.dot loop over H accumulating in fp32 (fp64 for
fp64 inputs): rounding each tile to bf16 before the softmax biases log-probs and entropy. Then

    u = h·Wᵀ + b,   z = transform(u) = softcap(scale·u) / T,   softcap(x) = cap·tanh(x / cap)

Forward (one program per token tile, loop over the vocabulary): online max m, Σexp(z − m) and
Σexp(z − m)·(z − m) (entropy = log Σe − Σe·(z − m)/Σe: two non-negative terms, where lse − E[z] loses
digits to cancellation), the label logit picked on the fly; keeps lse and the entropy per token for
the backward. Backward (one program per (token tile, vocabulary tile), the Cut Cross-Entropy layout):
recompute z, then
    dz = g_lp·(onehot − p) + g_H·p·(E[z] − z),   E[z] − z = (lse − z) − entropy,   du = dz · dz/du
then d hidden += du·W and d W += duᵀ·h tile by tile over H with fp32 atomics, d bias += Σ_n du.
FLOPs: 2·N·H·V forward, 6·N·H·V backward (recompute + two products).

The GEMM backward (``linear_logprobs_bwd_gemm``) does the same arithmetic with no atomics on d hidden /
d weight: per token chunk, cuBLAS recomputes U = h·Wᵀ with an fp32 output, one Triton epilogue
(``_dlogits_kernel``, sharing ``_transform`` and ``_grad_logits`` with the kernel above) turns U into
dU in the matmul dtype, and cuBLAS finishes with d hidden = dU·W and d W += dUᵀ·h (beta = 1, fp32).

Scalars (scale, cap, T) arrive as a small tensor in the accumulation dtype: a Python float would reach
the kernel as fp32 and a fp64 run would silently lose precision.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    # tanh via exp of a non-positive argument: no overflow, libdevice-free (runs in the interpreter)
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, params_ptr, rows, row_ok, cols, col_ok, H, stride_h, stride_w,
                 HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, ACC: tl.constexpr,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_H: tl.constexpr):  # fmt: skip
    """z (BLOCK_N, BLOCK_V) and t = tanh(scale·u / cap) (zeros without a cap) for one tile."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=ACC)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_ok = ks < H
        a = tl.load(
            h_ptr + rows[:, None] * stride_h + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
        )
        b = tl.load(
            w_ptr + cols[None, :] * stride_w + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0
        )
        if UPCAST:
            a, b = a.to(ACC), b.to(ACC)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)  # (BLOCK_N, BLOCK_V)
    return _transform(acc, b_ptr, params_ptr, cols, col_ok, HAS_BIAS, HAS_CAP, ACC, BLOCK_N, BLOCK_V)


@triton.jit
def _transform(acc, b_ptr, params_ptr, cols, col_ok, HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr,
               ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):  # fmt: skip
    """h·Wᵀ (BLOCK_N, BLOCK_V) -> z and t = tanh(scale·u / cap) (zeros without a cap)."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    scale = tl.load(params_ptr)
    inv_t = 1.0 / tl.load(params_ptr + 2)
    u = acc * scale
    if HAS_CAP:
        cap = tl.load(params_ptr + 1)
        t = _tanh(u / cap)
        z = cap * t * inv_t
    else:
        t = tl.zeros((BLOCK_N, BLOCK_V), dtype=ACC)
        z = u * inv_t
    return z, t


@triton.jit
def _fwd_kernel(h_ptr, w_ptr, b_ptr, params_ptr, labels_ptr, logp_ptr, ent_ptr, lse_ptr, hfull_ptr,
                N, V, H, stride_h, stride_w, ignore_index,
                HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, ENTROPY: tl.constexpr, ACC: tl.constexpr,
                PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_H: tl.constexpr, FROM_PRODUCTS: tl.constexpr = False):  # fmt: skip
    # FROM_PRODUCTS: h_ptr holds the (N, V) products h·Wᵀ of a library GEMM (row stride stride_h)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    y = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=ACC)
    l = tl.zeros((BLOCK_N,), dtype=ACC)  # Σ exp(z - m)
    s = tl.zeros((BLOCK_N,), dtype=ACC)  # Σ exp(z - m)·(z - m)
    zy = tl.zeros((BLOCK_N,), dtype=ACC)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_ok = cols < V
        if FROM_PRODUCTS:
            ok = row_ok[:, None] & col_ok[None, :]
            acc = tl.load(h_ptr + rows[:, None] * stride_h + cols[None, :], mask=ok, other=0.0).to(ACC)
            z, t = _transform(acc, b_ptr, params_ptr, cols, col_ok, HAS_BIAS, HAS_CAP, ACC, BLOCK_N, BLOCK_V)
        else:
            z, t = _logits_tile(h_ptr, w_ptr, b_ptr, params_ptr, rows, row_ok, cols, col_ok, H, stride_h, stride_w,
                                HAS_BIAS, HAS_CAP, ACC, PRECISION, UPCAST, BLOCK_N, BLOCK_V, BLOCK_H)  # fmt: skip
        z_in = tl.where(col_ok[None, :], z, 0.0)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])  # (BLOCK_N, BLOCK_V), 0 on padded columns
        if ENTROPY:
            # s = Σ e·(z − m) <= 0 term by term: no cancellation, unlike Σ e·z against m
            shift = tl.where(l > 0, m - m_new, 0.0) * l  # m = -inf before the first tile
            s = (s + shift) * alpha + tl.sum(e * (z_in - m_new[:, None]), axis=1)
        l = l * alpha + tl.sum(e, axis=1)
        zy += tl.sum(tl.where(cols[None, :] == y[:, None], z_in, 0.0), axis=1)
        m = m_new
    lse = m + tl.log(l)
    keep = y != ignore_index
    tl.store(logp_ptr + rows, tl.where(keep, tl.minimum(zy - lse, 0.0), 0.0), mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    if ENTROPY:
        ent = tl.log(l) - s / l  # = Σ p·(lse − z): two non-negative terms
        tl.store(ent_ptr + rows, tl.where(keep, ent, 0.0), mask=row_ok)
        tl.store(hfull_ptr + rows, ent, mask=row_ok)


@triton.jit
def _grad_logits(z, t, params_ptr, labels_ptr, lse_ptr, hfull_ptr, glp_ptr, gent_ptr, rows, row_ok, cols, col_ok,
                 ignore_index, HAS_CAP: tl.constexpr, ENTROPY: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """d loss / d u of one (rows, cols) tile, u = h·Wᵀ + b, from z and t = tanh(scale·u / cap)."""
    y = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    keep = row_ok & (y != ignore_index)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g_lp = tl.where(keep, tl.load(glp_ptr + rows, mask=row_ok, other=0.0).to(ACC), 0.0)
    p = tl.where(col_ok[None, :], tl.exp(z - lse[:, None]), 0.0)  # (BLOCK_N, BLOCK_V)
    dz = tl.where(cols[None, :] == y[:, None], g_lp[:, None], 0.0) - g_lp[:, None] * p
    if ENTROPY:
        h_full = tl.load(hfull_ptr + rows, mask=row_ok, other=0.0)
        g_h = tl.where(keep, tl.load(gent_ptr + rows, mask=row_ok, other=0.0).to(ACC), 0.0)
        dz += g_h[:, None] * p * ((lse[:, None] - z) - h_full[:, None])  # E[z] − z, cancellation-free
    # chain rule through z = cap·tanh(scale·u / cap) / T (or scale·u / T)
    du = dz * (tl.load(params_ptr) / tl.load(params_ptr + 2))
    if HAS_CAP:
        du = du * (1.0 - t * t)
    return tl.where(row_ok[:, None] & col_ok[None, :], du, 0.0)


@triton.jit
def _bwd_kernel(h_ptr, w_ptr, b_ptr, params_ptr, labels_ptr, lse_ptr, hfull_ptr, glp_ptr, gent_ptr,
                dh_ptr, dw_ptr, db_ptr, N, V, H, stride_h, stride_w, ignore_index,
                HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, ENTROPY: tl.constexpr, ACC: tl.constexpr,
                PRECISION: tl.constexpr, UPCAST: tl.constexpr, NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < V
    z, t = _logits_tile(h_ptr, w_ptr, b_ptr, params_ptr, rows, row_ok, cols, col_ok, H, stride_h, stride_w,
                        HAS_BIAS, HAS_CAP, ACC, PRECISION, UPCAST, BLOCK_N, BLOCK_V, BLOCK_H)  # fmt: skip
    du = _grad_logits(z, t, params_ptr, labels_ptr, lse_ptr, hfull_ptr, glp_ptr, gent_ptr, rows, row_ok, cols,
                      col_ok, ignore_index, HAS_CAP, ENTROPY, ACC)  # fmt: skip
    if NEED_DB:
        tl.atomic_add(db_ptr + cols, tl.sum(du, axis=0), mask=col_ok)
    du_in = du.to(h_ptr.dtype.element_ty)  # the input dtype feeds the tensor cores; products stay fp32
    if UPCAST:
        du_in = du_in.to(ACC)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_ok = ks < H
        if NEED_DH:
            w = tl.load(
                w_ptr + cols[:, None] * stride_w + ks[None, :],
                mask=col_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            if UPCAST:
                w = w.to(ACC)
            dh = tl.dot(du_in, w, input_precision=PRECISION, out_dtype=ACC)  # (BLOCK_N, BLOCK_H)
            tl.atomic_add(dh_ptr + rows[:, None] * H + ks[None, :], dh, mask=row_ok[:, None] & k_ok[None, :])
        if NEED_DW:
            a = tl.load(
                h_ptr + rows[:, None] * stride_h + ks[None, :],
                mask=row_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            if UPCAST:
                a = a.to(ACC)
            dw = tl.dot(tl.trans(du_in), a, input_precision=PRECISION, out_dtype=ACC)  # (BLOCK_V, BLOCK_H)
            tl.atomic_add(dw_ptr + cols[:, None] * H + ks[None, :], dw, mask=col_ok[:, None] & k_ok[None, :])


@triton.jit
def _dlogits_kernel(u_ptr, dz_ptr, db_ptr, b_ptr, params_ptr, labels_ptr, lse_ptr, hfull_ptr, glp_ptr, gent_ptr,
                    C, V, ignore_index, HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, ENTROPY: tl.constexpr,
                    NEED_DB: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):  # fmt: skip
    """The GEMM backward's epilogue: h·Wᵀ of one chunk (C, V) in the accumulation dtype -> d u (C, V) in
    the matmul dtype, one read and one write per element; d bias += Σ_rows d u with fp32 atomics."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < C
    col_ok = cols < V
    ok = row_ok[:, None] & col_ok[None, :]
    acc = tl.load(u_ptr + rows[:, None] * V + cols[None, :], mask=ok, other=0.0).to(ACC)
    z, t = _transform(acc, b_ptr, params_ptr, cols, col_ok, HAS_BIAS, HAS_CAP, ACC, BLOCK_N, BLOCK_V)
    du = _grad_logits(z, t, params_ptr, labels_ptr, lse_ptr, hfull_ptr, glp_ptr, gent_ptr, rows, row_ok, cols,
                      col_ok, ignore_index, HAS_CAP, ENTROPY, ACC)  # fmt: skip
    if NEED_DB:
        tl.atomic_add(db_ptr + cols, tl.sum(du, axis=0), mask=col_ok)
    tl.store(dz_ptr + rows[:, None] * V + cols[None, :], du.to(dz_ptr.dtype.element_ty), mask=ok)


_TL_ACC = {torch.float64: tl.float64}


def _on_gpu(t: torch.Tensor) -> bool:
    """Whether the launchers take their GPU branch for ``t`` (tile sizes, no interpreter upcast, cuBLAS GEMMs
    with an fp32 output). The one place they read ``is_cuda``: tests/test_cuda_branches.py forces it to run
    those branches on CPU tensors through the interpreter."""
    return t.is_cuda


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _blocks(hidden: torch.Tensor, V: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_V, BLOCK_H). RLAIF_FAST_LINEAR_BLOCKS="64,128,64" overrides (GPU tuning runs)."""
    override = os.environ.get("RLAIF_FAST_LINEAR_BLOCKS")
    if override:
        bn, bv, bh = (int(x) for x in override.split(","))
        return bn, bv, bh
    if _on_gpu(hidden):
        return 64, 128, 64
    # the interpreter runs a program per grid point in Python: few large tiles are fastest there
    return 32, 512, 128


def _upcast(hidden: torch.Tensor) -> bool:
    # the interpreter keeps bf16 as raw uint16 and its tl.dot would multiply the integers: upcast
    # the tiles first (exact: a product of two bf16 / fp16 values fits fp32), keep tensor cores on GPU
    return not _on_gpu(hidden) and hidden.dtype in (torch.bfloat16, torch.float16)


def _params(hidden: torch.Tensor, scale: float, softcap: float | None, temperature: float) -> torch.Tensor:
    return torch.tensor(
        [scale, softcap or 1.0, temperature], dtype=_acc_dtype(hidden.dtype), device=hidden.device
    )


def _fwd_outputs(hidden, N: int, acc, entropy: bool):
    """The forward's (logp, entropy, lse, h_full) buffers in the accumulation dtype; without entropy the
    two entropy outputs alias logp (the kernel does not write them)."""
    logp = torch.empty(N, dtype=acc, device=hidden.device)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp) if entropy else logp
    h_full = torch.empty_like(logp) if entropy else logp
    return logp, ent, lse, h_full


def linear_logprobs_fwd(hidden, weight, bias, labels, *, temperature, ignore_index, entropy, softcap, scale):
    """hidden (N, H), weight (V, H), bias (V,) or None, labels (N,) ->
    logp (N,), entropy (N,) or None, lse (N,), h_full (N,) (the entropy before
    masking, for the backward) or None, all in the accumulation dtype."""
    N, H = hidden.shape
    V = weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    logp, ent, lse, h_full = _fwd_outputs(hidden, N, acc, entropy)
    bn, bv, bh = _blocks(hidden, V)
    _fwd_kernel[(triton.cdiv(N, bn),)](
        hidden, weight, bias if bias is not None else weight, _params(hidden, scale, softcap, temperature),
        labels, logp, ent, lse, h_full, N, V, H, hidden.stride(0), weight.stride(0), ignore_index,
        HAS_BIAS=bias is not None, HAS_CAP=softcap is not None, ENTROPY=entropy,
        ACC=_TL_ACC.get(acc, tl.float32), PRECISION="ieee", UPCAST=_upcast(hidden), BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, num_warps=8,
    )  # fmt: skip
    return logp, (ent if entropy else None), lse, (h_full if entropy else None)


def linear_logprobs_bwd(hidden, weight, bias, labels, lse, h_full, grad_logp, grad_ent, *, temperature,
                        ignore_index, softcap, scale, need_dh=True, need_dw=True, need_db=True):  # fmt: skip
    """Recompute the logits per tile; return d hidden (N, H), d weight (V, H), d bias (V,) in the
    accumulation dtype (None where not needed)."""
    N, H = hidden.shape
    V = weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    need_db = need_db and bias is not None
    dh = torch.zeros((N, H) if need_dh else (1,), dtype=acc, device=hidden.device)
    dw = torch.zeros((V, H) if need_dw else (1,), dtype=acc, device=hidden.device)
    db = torch.zeros((V,) if need_db else (1,), dtype=acc, device=hidden.device)
    entropy = grad_ent is not None
    bn, bv, bh = _blocks(hidden, V)
    grid = (triton.cdiv(N, bn), triton.cdiv(V, bv))
    _bwd_kernel[grid](
        hidden, weight, bias if bias is not None else weight, _params(hidden, scale, softcap, temperature),
        labels, lse, h_full if entropy else lse, grad_logp, grad_ent if entropy else grad_logp, dh, dw, db,
        N, V, H, hidden.stride(0), weight.stride(0), ignore_index,
        HAS_BIAS=bias is not None, HAS_CAP=softcap is not None, ENTROPY=entropy,
        ACC=_TL_ACC.get(acc, tl.float32), PRECISION="ieee", UPCAST=_upcast(hidden), NEED_DH=need_dh, NEED_DW=need_dw, NEED_DB=need_db,
        BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, num_warps=8,
    )  # fmt: skip
    return (dh if need_dh else None), (dw if need_dw else None), (db if need_db else None)


def fwd_from_products(
    u, bias, params, labels, logp, ent, lse, h_full, *, ignore_index, softcap, entropy, acc
):
    """``_fwd_kernel`` on a chunk's precomputed logits U = h·Wᵀ (C, V) in the accumulation dtype
    (FROM_PRODUCTS): the online log-sum-exp, entropy and label pick, written into the given outputs.
    The GEMM and the chunk loop are ``rlaif_fast.ops.linear_gemm``'s."""
    n, V = u.shape
    bn, bv = (4, 1024) if _on_gpu(u) else (32, 1024)
    _fwd_kernel[(triton.cdiv(n, bn),)](
        u, u, bias if bias is not None else u, params, labels, logp, ent, lse, h_full, n, V, V, V, V, ignore_index,
        HAS_BIAS=bias is not None, HAS_CAP=softcap is not None, ENTROPY=entropy,
        ACC=_TL_ACC.get(acc, tl.float32), PRECISION="ieee", UPCAST=False, BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=16,
        FROM_PRODUCTS=True, num_warps=4,
    )  # fmt: skip


def dlogits_from_products(u, du, db, bias, params, labels, lse, h_full, grad_logp, grad_ent, *, ignore_index,
                          softcap, need_db, acc):  # fmt: skip
    """``_dlogits_kernel``: d logits dU (C, V) in the matmul dtype (and d bias summed into ``db``) from a
    chunk's precomputed U, for ``rlaif_fast.ops.linear_gemm``'s backward (dh = dU·W, dW += dUᵀ·h there)."""
    n, V = u.shape
    entropy = grad_ent is not None
    bn, bv = (16, 512) if _on_gpu(u) else (32, 1024)
    _dlogits_kernel[(triton.cdiv(n, bn), triton.cdiv(V, bv))](
        u, du, db, bias if bias is not None else u, params, labels, lse, h_full if entropy else lse,
        grad_logp, grad_ent if entropy else grad_logp, n, V, ignore_index,
        HAS_BIAS=bias is not None, HAS_CAP=softcap is not None, ENTROPY=entropy, NEED_DB=need_db,
        ACC=_TL_ACC.get(acc, tl.float32), BLOCK_N=bn, BLOCK_V=bv, num_warps=8,
    )  # fmt: skip
