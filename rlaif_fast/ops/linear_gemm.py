"""The GEMM variant of ``linear_token_logprobs``: library matmuls (cuBLAS on a GPU) per token chunk around
the Triton epilogues of ``rlaif_fast.kernels.linear_logprobs`` (which holds the kernels and their launchers
only). Selected with ``forward="gemm"`` / ``backward="gemm"`` of ``rlaif_fast.ops.linear``.
"""

from __future__ import annotations

import torch

from rlaif_fast.kernels import linear_logprobs as K

# Tokens per chunk C = 2^28 / V (2092 at V = 128256): the chunk holds C·V fp32 logits + C·V d logits in
# the matmul dtype (1 GiB + 0.5 GiB in bf16, vs 6 GiB for full fp32 logits at N = 8192). C sets the
# arithmetic intensity of d W += dUᵀ·h, which reads and writes the (V, H) fp32 d W once per chunk:
# 2·V·C·H FLOPs over 8·V·H bytes ≈ C / 4 FLOP/byte (462 here with dU and h read too), above an H100's
# ~295 (989 TFLOP/s over 3.35 TB/s); at C = 1046 it would sit near the ridge. benchmarks/gpu/bench_linear.py --chunks sweeps it.
_GEMM_CHUNK_ELEMS = 1 << 28


# Which cuBLAS routes this process could not take (torch versions differ in their ``out_dtype`` support):
# each fallback is correct but slower, and benchmarks/gpu/bench_linear.py prints this set.
GEMM_FALLBACKS: set[str] = set()


def _mm_acc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in the accumulation dtype. On CUDA, bf16 / fp16 operands stay on the tensor cores and cuBLAS
    writes its fp32 accumulator out (``out_dtype``): no bf16 rounding of the logits before the softmax.
    CPU has no ``out_dtype`` kernel: upcast there (exact — a product of two bf16 / fp16 values fits fp32)."""
    acc = K._acc_dtype(a.dtype)
    if K._on_gpu(a) and a.dtype != acc and "mm out_dtype" not in GEMM_FALLBACKS:
        try:
            return torch.mm(a, b, out_dtype=acc)
        except (RuntimeError, TypeError):
            GEMM_FALLBACKS.add("mm out_dtype")
    return torch.mm(a.to(acc), b.to(acc))


def _addmm_acc_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out += a @ b with out in the accumulation dtype (d weight summed over chunks in fp32)."""
    if K._on_gpu(a) and a.dtype != out.dtype and "addmm out_dtype" not in GEMM_FALLBACKS:
        try:  # cuBLAS beta = 1 into the fp32 accumulator: one pass over out, no temporary
            torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
            return
        except (RuntimeError, TypeError):  # older torch: self must share the operands' dtype
            GEMM_FALLBACKS.add("addmm out_dtype")
    out.add_(_mm_acc(a, b))  # a (V, H) fp32 temporary and one more pass over out


def linear_logprobs_fwd_gemm(hidden, weight, bias, labels, *, temperature, ignore_index, entropy, softcap, scale,
                             chunk=None):  # fmt: skip
    """``linear_logprobs_fwd`` from a library GEMM per token chunk: U = h_c·Wᵀ (fp32 out), then
    ``_fwd_kernel`` with FROM_PRODUCTS reads U once (the online log-sum-exp, entropy and label pick).
    Costs 8 bytes of traffic per logit that the fused forward does not move; buys cuBLAS's matmul."""
    N, H = hidden.shape
    V = weight.shape[0]
    acc = K._acc_dtype(hidden.dtype)
    logp, ent, lse, h_full = K._fwd_outputs(hidden, N, acc, entropy)
    params = K._params(hidden, scale, softcap, temperature)
    w_mm = weight if K._on_gpu(hidden) else weight.to(acc)
    step = chunk or max(1, _GEMM_CHUNK_ELEMS // max(V, 1))
    for s in range(0, N, step):
        e = min(s + step, N)
        u = _mm_acc(hidden[s:e], w_mm.T)  # (C, V) in the accumulation dtype
        K.fwd_from_products(
            u, bias, params, labels[s:e], logp[s:e], ent[s:e], lse[s:e], h_full[s:e],
            ignore_index=ignore_index, softcap=softcap, entropy=entropy, acc=acc,
        )  # fmt: skip
        del u  # before the next chunk's product exists
    return logp, (ent if entropy else None), lse, (h_full if entropy else None)


def linear_logprobs_bwd_gemm(hidden, weight, bias, labels, lse, h_full, grad_logp, grad_ent, *, temperature,
                             ignore_index, softcap, scale, chunk=None, need_dh=True, need_dw=True,
                             need_db=True):  # fmt: skip
    """The same gradients as ``linear_logprobs_bwd`` from three library GEMMs per token chunk and one
    Triton epilogue, no atomics on d hidden / d weight:

        U = h_c·Wᵀ (fp32 out)  ->  dU = _dlogits_kernel(U) (matmul dtype)  ->  dh_c = dU·W,  dW += dUᵀ·h_c

    Returns d hidden (N, H) in the input dtype (one rounding of an fp32-accumulated product over all V),
    d weight (V, H) and d bias (V,) in the accumulation dtype; None where not needed."""
    N, H = hidden.shape
    V = weight.shape[0]
    acc = K._acc_dtype(hidden.dtype)
    need_db = need_db and bias is not None
    entropy = grad_ent is not None
    dh = torch.empty((N, H), dtype=hidden.dtype, device=hidden.device) if need_dh else None
    dw = torch.zeros((V, H), dtype=acc, device=hidden.device) if need_dw else None
    db = torch.zeros((V,) if need_db else (1,), dtype=acc, device=hidden.device)
    params = K._params(hidden, scale, softcap, temperature)
    w_mm = weight if K._on_gpu(hidden) else weight.to(acc)  # CPU: upcast W once, not once per chunk
    step = chunk or max(1, _GEMM_CHUNK_ELEMS // max(V, 1))
    for s in range(0, N, step):
        e = min(s + step, N)
        h_c = hidden[s:e]  # (C, H)
        u = _mm_acc(h_c, w_mm.T)  # (C, V) in the accumulation dtype
        du = torch.empty((e - s, V), dtype=hidden.dtype, device=hidden.device)  # the matmul dtype
        K.dlogits_from_products(
            u, du, db, bias, params, labels[s:e], lse[s:e], h_full[s:e] if entropy else None, grad_logp[s:e],
            grad_ent[s:e] if entropy else None, ignore_index=ignore_index, softcap=softcap, need_db=need_db,
            acc=acc,
        )  # fmt: skip
        del u
        if dh is not None:
            if K._on_gpu(hidden):
                torch.mm(du, weight, out=dh[s:e])  # fp32 accumulate inside cuBLAS, one rounding
            else:
                dh[s:e] = torch.mm(du.to(acc), w_mm)
        if dw is not None:
            _addmm_acc_(dw, du.T, h_c)
        del du  # before the next chunk's U exists: one chunk's buffers at a time
    return dh, dw, (db if need_db else None)
