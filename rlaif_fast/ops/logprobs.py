"""Per-token log-probs (and entropy) of the sampled labels from logits, in one pass over [N, V].

Backends (``rlaif_fast._backend.select_backend``):
- triton: ``kernels/logprobs.py`` — forward reads the logits once, backward reads once and writes once;
- torch (CPU default): chunked over rows so no [N, V] fp32 temporary exists, forward or backward
  (the backward recomputes log_softmax per chunk; the saved entropy gives E[z'] without a pass);
- reference: ``rlaif_fast.reference.logprobs`` (full [N, V] temporaries, autograd through torch).
"""

from __future__ import annotations

import torch

from rlaif_fast._backend import select_backend
from rlaif_fast._checks import check_float, check_int, check_positive, check_same_device

# Bound on one chunk's fp32 temporary in the torch path (two such temporaries are alive at once).
# At V = 32000 that is 128 rows, the size at which per-chunk overheads stopped mattering on 2 cores
# (8-row chunks were 3-4x slower); see benchmarks/results/ops.md.
CHUNK_BYTES = 16 * 2**20


def check_labels_in_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """One reduction and one host sync: every label is ignore_index or in [0, vocab)."""
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if bool(bad.any()):
        pos = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"labels[{pos}] = {int(labels[pos])} is outside the vocabulary [0, {vocab}) and is not "
            f"ignore_index={ignore_index}; fix the labels or pass the right ignore_index"
        )


def widen_labels(labels):
    """int64 copies of uint8 / int8 / int16 labels (anything else as is). torch compares a small-int tensor with
    a scalar cast to its dtype: uint8 labels read ignore_index = -100 as 156 and V = 260 as 4."""
    if isinstance(labels, torch.Tensor) and labels.dtype in (torch.uint8, torch.int8, torch.int16):
        return labels.long()
    return labels


def check_logprob_inputs(logits, labels, temperature, ignore_index) -> float:
    check_float("logits", logits)
    check_int("labels", labels)
    if logits.dim() < 1 or tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"labels has shape {tuple(labels.shape)} but logits has shape {tuple(logits.shape)}; "
            "labels must be logits.shape[:-1] (did you forget to shift logits[:, :-1] / labels[:, 1:]?)"
        )
    check_same_device(logits=logits, labels=labels)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    temperature = check_positive("temperature", temperature)
    check_labels_in_range(labels, logits.shape[-1], ignore_index)
    return temperature


def _rows_view(logits: torch.Tensor):
    """Yield (first_row, (c, V) view) chunks covering logits (..., V) in row order, without copies."""
    V = logits.shape[-1]
    rows = max(1, CHUNK_BYTES // (4 * max(V, 1)))
    x = logits if logits.dim() >= 2 else logits.view(1, V)
    try:
        flat = x.view(-1, V)  # (N, V): works for contiguous logits
        parts = [(0, flat)]
    except RuntimeError:  # e.g. logits[:, :-1]: walk the leading index, each slice is a 2-D view
        lead = x.reshape(-1, x.shape[-2], V) if x.dim() > 3 else x
        parts = [(b * lead.shape[1], lead[b]) for b in range(lead.shape[0])]
    for first, part in parts:
        for start in range(0, part.shape[0], rows):
            yield first + start, part[start : start + rows]


def _scaled(chunk: torch.Tensor, dtype: torch.dtype, temperature: float) -> torch.Tensor:
    """z' = chunk / T in ``dtype``; aliases the logits when no work is needed, so never write into it."""
    z = chunk.to(dtype)
    return z if temperature == 1.0 else z / temperature


def _torch_forward(logits, labels, temperature, ignore_index, want_entropy):
    """Chunked forward; returns (logp, entropy, None): this path's backward recomputes log_softmax."""
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    lab = labels.reshape(-1)
    logp = torch.empty(lab.numel(), dtype=out_dtype, device=logits.device)
    ent = torch.zeros_like(logp)
    for r0, chunk in _rows_view(logits):
        r1 = r0 + chunk.shape[0]
        # one fused, vectorized kernel; torch.logsumexp + subtract took 2 more passes over the chunk
        log_p = torch.log_softmax(_scaled(chunk, out_dtype, temperature), dim=-1)  # (c, V)
        y = lab[r0:r1]
        use = y != ignore_index
        lp_y = log_p.gather(1, torch.where(use, y, 0).long().unsqueeze(1)).squeeze(1)
        logp[r0:r1] = torch.where(use, lp_y.clamp(max=0.0), 0.0)
        if want_entropy:
            # H = -Σ p log p: non-negative terms, so no cancellation of logit-sized numbers; p · log p is
            # formed in p's buffer. (A BLAS batched dot summed 10x less accurately at V = 2053.)
            h = log_p.exp().mul_(log_p).sum(-1).neg_()
            ent[r0:r1] = torch.where(use, h, 0.0)
    return logp, ent, None


def _torch_backward(logits, labels, grad_logp, grad_ent, ent, temperature, ignore_index):
    """d z_j = [(onehot_j - p_j) g_lp + g_H p_j (-H - log p_j)] / T, chunk by chunk (E[z'] - z' = -H - log p)."""
    out_dtype = ent.dtype
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    grad_rows = grad.view(-1, logits.shape[-1])  # (N, V), fresh and contiguous
    lab = labels.reshape(-1)
    g_lp_all = grad_logp.reshape(-1).to(out_dtype)
    g_h_all = None if grad_ent is None else grad_ent.reshape(-1).to(out_dtype)
    for r0, chunk in _rows_view(logits):
        r1 = r0 + chunk.shape[0]
        y = lab[r0:r1]
        use = y != ignore_index
        g_lp = (torch.where(use, g_lp_all[r0:r1], 0.0) / temperature).unsqueeze(1)  # (c, 1)
        log_p = torch.log_softmax(_scaled(chunk, out_dtype, temperature), dim=-1)  # (c, V), recomputed
        p = log_p.exp()  # (c, V)
        # same-dtype gradient: the last multiply writes straight into it, saving a copy pass
        out = grad_rows[r0:r1] if grad.dtype == out_dtype else None
        if g_h_all is None:
            d = torch.mul(p, -g_lp, out=out) if out is not None else p.mul_(-g_lp)
        else:
            g_h = (torch.where(use, g_h_all[r0:r1], 0.0) / temperature).unsqueeze(1)
            # p · (-g_H log p - g_H H - g_lp): two in-place passes over log_p, then the multiply by p
            log_p.mul_(-g_h).add_(-g_h * ent[r0:r1].unsqueeze(1) - g_lp)
            d = torch.mul(log_p, p, out=out) if out is not None else log_p.mul_(p)
        d.scatter_add_(1, torch.where(use, y, 0).long().unsqueeze(1), g_lp)
        if out is None:
            grad_rows[r0:r1] = d
    return grad


class _TorchTokenLogprobs(torch.autograd.Function):
    """CPU path: chunked torch forward; the backward recomputes log_softmax chunk by chunk."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, ignore_index, want_entropy):
        logp, ent, _ = _torch_forward(logits, labels, temperature, ignore_index, want_entropy)
        ctx.save_for_backward(logits, labels, ent)
        ctx.args = (temperature, ignore_index)
        ctx.set_materialize_grads(False)  # an unused entropy arrives as None: its term is skipped
        return logp.view(labels.shape), ent.view(labels.shape)

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        logits, labels, ent = ctx.saved_tensors
        if grad_logp is None and grad_ent is None:
            return (None,) * 5
        grad_logp = torch.zeros_like(ent) if grad_logp is None else grad_logp
        grad = _torch_backward(logits, labels, grad_logp, grad_ent, ent, *ctx.args)
        return grad, None, None, None, None


class _TritonTokenLogprobs(torch.autograd.Function):
    """Triton path: one read of the logits forward; one read and one write of d logits backward."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, ignore_index, want_entropy):
        from rlaif_fast.kernels.logprobs import logprobs_forward

        logp, ent, lse = logprobs_forward(logits, labels, temperature, ignore_index)
        ctx.save_for_backward(logits, labels, lse, ent)
        ctx.args = (temperature, ignore_index)
        ctx.set_materialize_grads(False)
        return logp.view(labels.shape), ent.view(labels.shape)

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        from rlaif_fast.kernels.logprobs import logprobs_backward

        logits, labels, lse, ent = ctx.saved_tensors
        if grad_logp is None and grad_ent is None:
            return (None,) * 5
        grad_logp = torch.zeros_like(ent) if grad_logp is None else grad_logp
        grad = logprobs_backward(logits, labels, grad_logp, grad_ent, lse, ent, *ctx.args)
        return grad, None, None, None, None


_FUNCTIONS = {"torch": _TorchTokenLogprobs, "triton": _TritonTokenLogprobs}


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
):
    """Log-prob of each label under softmax(logits / T), and optionally the entropy of that softmax.

    logits (..., V) fp32/bf16/fp16 (fp64 for gradchecks), labels (...) integer, with
    labels.shape == logits.shape[:-1]; non-contiguous logits such as ``logits[:, :-1]`` are read in
    place. Returns logp (...) in fp32 (fp64 for fp64 logits), and entropy (...) when ``return_entropy``:

        logp_i = z'_i[y_i] - logsumexp(z'_i),  z' = logits / T (in fp32),  clamped to <= 0
        H_i    = logsumexp(z'_i) - Σ_j softmax(z'_i)_j z'_ij

    Positions with labels == ignore_index give 0 (log-prob and entropy) and no gradient. Both outputs
    are differentiable w.r.t. the logits; the gradient is written once, into a new tensor.
    The sampling temperature of RLAIF's policy (0.9 in Lee et al. 2023, arXiv 2309.00267) must be the
    one passed here, or the log-probs are those of a different policy.
    """
    labels = widen_labels(labels)
    temperature = check_logprob_inputs(logits, labels, temperature, ignore_index)
    backend = select_backend(logits)
    if backend == "reference":
        from rlaif_fast.reference.logprobs import token_logprobs as reference

        return reference(
            logits, labels, temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy
        )
    logp, ent = _FUNCTIONS[backend].apply(logits, labels, temperature, ignore_index, return_entropy)
    return (logp, ent) if return_entropy else logp
