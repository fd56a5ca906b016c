"""Triton kernel for masked GAE: the whole reverse recurrence as one associative scan, one launch per batch.

Per row, the state after position t is (A, V): the advantage and value of the first valid token at or
after t. Going backwards, each position applies an affine map to that state:

    valid t:   A <- (r_t - V_t) + gamma * V + gamma*lam * A,   V <- V_t
    masked t:  identity (the token is skipped, so holes in the mask cost nothing)

Affine maps compose associatively, so the recurrence is a scan over maps
    x -> P x + u,   P = [[p, q], [0, s]],   u = (ua, uv)
(five scalars). One program per row walks the row's chunks from the end, scanning each chunk and applying
the carried state of the chunks after it. The chunk is loaded in reversed order and scanned forward
rather than with ``reverse=True``: triton's reverse scan has returned wrong results for non-commutative
combines (triton-lang/triton#4362). Reads r, V, mask once and writes A, R once: the minimum bytes.
Math in fp32 (fp64 for fp64 outputs); gamma and gamma*lam arrive as fp32 scalars on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _compose(p1, q1, s1, ua1, uv1, p2, q2, s2, ua2, uv2):
    # 1 = the maps of the later positions (already scanned), 2 = the earlier position: returns 2 o 1
    p = p2 * p1
    q = p2 * q1 + q2 * s1
    s = s2 * s1
    ua = p2 * ua1 + q2 * uv1 + ua2
    uv = s2 * uv1 + uv2
    return p, q, s, ua, uv


@triton.jit
def _gae_kernel(r_ptr, v_ptr, m_ptr, adv_ptr, ret_ptr, T, gamma, gamma_lam, BLOCK_T: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    cdt = adv_ptr.dtype.element_ty
    lane = tl.arange(0, BLOCK_T)
    # carried state from the chunks to the right: (A, V) of the first valid token after this chunk
    carry_a = tl.sum(tl.zeros([BLOCK_T], dtype=cdt), axis=0)
    carry_v = tl.sum(tl.zeros([BLOCK_T], dtype=cdt), axis=0)
    n_chunks = tl.cdiv(T, BLOCK_T)
    for c in range(0, n_chunks):
        # time positions of this chunk, latest first
        offs = (n_chunks - c) * BLOCK_T - 1 - lane
        inb = offs < T
        r = tl.load(r_ptr + base + offs, mask=inb, other=0.0).to(cdt)
        v = tl.load(v_ptr + base + offs, mask=inb, other=0.0).to(cdt)
        m = (tl.load(m_ptr + base + offs, mask=inb, other=0) != 0) & inb
        one = tl.full([BLOCK_T], 1.0, cdt)
        zero = tl.zeros([BLOCK_T], dtype=cdt)
        p = tl.where(m, gamma_lam, one).to(cdt)
        q = tl.where(m, gamma, zero).to(cdt)
        s = tl.where(m, zero, one)
        ua = tl.where(m, r - v, zero)
        uv = tl.where(m, v, zero)
        p, q, s, ua, uv = tl.associative_scan((p, q, s, ua, uv), 0, _compose)
        a = p * carry_a + q * carry_v + ua  # (BLOCK_T,) advantage of the first valid token at or after
        vv = s * carry_v + uv
        tl.store(adv_ptr + base + offs, tl.where(m, a, zero), mask=inb)
        tl.store(ret_ptr + base + offs, tl.where(m, a + v, zero), mask=inb)
        first = lane == BLOCK_T - 1  # the chunk's earliest position carries into the next chunk
        carry_a = tl.sum(tl.where(first, a, zero), axis=0)
        carry_v = tl.sum(tl.where(first, vv, zero), axis=0)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
    out_dtype: torch.dtype,
    block_t: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) [B, T] in out_dtype; one launch, one program per row.

    ``block_t`` (a power of 2) overrides the chunk length; tests use a small one to cross chunk edges.
    """
    B, T = rewards.shape
    r, v, m = rewards.contiguous(), values.contiguous(), mask.contiguous()
    if m.dtype == torch.bool:
        m = m.view(torch.uint8)  # same bytes; triton loads bytes, not i1
    adv = torch.empty((B, T), dtype=out_dtype, device=r.device)
    ret = torch.empty((B, T), dtype=out_dtype, device=r.device)
    if B and T:
        if block_t is None:
            block_t = min(triton.next_power_of_2(T), 1024)
        _gae_kernel[(B,)](r, v, m, adv, ret, T, float(gamma), float(gamma) * float(lam), BLOCK_T=block_t)
    return adv, ret
