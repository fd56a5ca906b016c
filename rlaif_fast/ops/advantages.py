"""Advantages: masked GAE as a scan (never a Python loop over time), group baselines, masked whitening.

Masking convention (the same on every backend; ``rlaif_fast.reference.rl.gae`` is the oracle):
- a mask is "nonzero = valid token"; left padding, right padding and holes are all allowed;
- masked tokens are skipped as if cut out of the row: a valid token bootstraps from the next *valid*
  token (its value and its advantage), whatever lies between; their rewards and values are ignored;
- the value after the last valid token of a row is 0: the response ends there (gamma applies to it);
- advantages and returns are 0 at masked positions, and a row with an empty mask is all zeros.
For contiguous masks this is exactly the loop of TRL / OpenRLHF on the valid tokens; on masks with holes
(multi-turn: tool output masked out) it is verl's skip-the-hole rule.

CPU path, measured in benchmarks/bench_gae.py: the C++ extension's reverse scan (csrc/gae.cpp: 8 rows in
the lanes of one AVX2 register, 8x8 tiles transposed in registers, the reference loop's fp32 arithmetic in
its order, so the results equal the loop's bit for bit; ~0.2 ms at B=256, T=1024 on one core, about 100x
the Python loop). Without the extension (not built, ``RLAIF_FAST_NO_EXT=1``) a torch fallback:
A_t = delta_t + c * A_{t+1} with a constant c = gamma*lam
over contiguous valid tokens is a Toeplitz matrix product, so the row is cut into chunks of K tokens,
each chunk solved by one (K, K) matmul, and the chunk carries by one (nC, nC) matmul. Rows with holes
are first compacted (valid tokens moved to the front, in order) so that the coefficient stays constant.
Intermediates live in per-thread scratch buffers reused across calls (CPU only, up to 16 MiB each): at
this size a fresh buffer's page faults cost as much as the math. Only the two outputs are allocated.
No division by powers of c, so nothing overflows for small gamma*lam; tiny powers underflow to 0, which
is the true value to fp precision.
"""

from __future__ import annotations

import functools
import math
import threading

import torch

from rlaif_fast import _checks
from rlaif_fast._backend import select_backend
from rlaif_fast.reference import rl as ref

GROUP_METHODS = ref.GROUP_METHODS
_CHUNK = 32  # K: error at T = 1024 like the loop (K = 64: up to 2x); ~1 ms at B=256, T=1024 (rl.md)


def _check_mask(name: str, mask) -> None:
    _checks.check_tensor(name, mask, ndim=2)
    if mask.is_complex():
        raise TypeError(f"{name} has dtype {mask.dtype}; use a bool, integer or float 0/1 tensor")


def _check_unit(name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name}={value!r} is outside [0, 1]; a discount must lie in [0, 1]")
    return v


def _toeplitz(c: float, n: int, like: torch.Tensor) -> torch.Tensor:
    """(n, n) matrix M[s, t] = c^(s - t) for s >= t, else 0: (x @ M)[t] = sum_{s >= t} c^(s-t) x[s].
    Cached (read-only, never written in place): building it is ~8 small ops, 0.03 ms a call."""
    return _toeplitz_cached(float(c), n, like.dtype, like.device)


@functools.lru_cache(maxsize=64)
def _toeplitz_cached(c: float, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    ar = torch.arange(n, device=device)
    e = ar[:, None] - ar[None, :]
    base = torch.tensor(c, dtype=dtype, device=device)
    return torch.where(e >= 0, torch.pow(base, e.clamp(min=0).to(dtype)), 0.0)


@functools.lru_cache(maxsize=64)
def _reach(c: float, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(n,) read-only: c^(n - t), how much of what follows a chunk reaches its t-th token."""
    base = torch.tensor(c, dtype=dtype, device=device)
    return torch.pow(base, torch.arange(n, 0, -1, device=device, dtype=dtype))


def discounted_reverse_cumsum(
    x: torch.Tensor, c: float, chunk: int = _CHUNK, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """y_t = x_t + c * y_{t+1} (y_T = 0) along the last dim of x (B, T), without a loop over time.

    ``out``: optional buffer of at least B * ceil(T / chunk) * chunk elements of x's dtype that y is
    written into (the result is a view of it); by default a fresh one."""
    B, T = x.shape
    K = min(chunk, T)
    nC = -(-T // K)
    if nC * K != T:
        x = torch.cat([x, x.new_zeros(B, nC * K - T)], dim=1)  # zeros after the end change nothing
    if out is None:
        out = x.new_empty(B * nC * K)
    local = out.view(-1)[: B * nC * K].view(B * nC, K)
    torch.matmul(x.reshape(B * nC, K), _toeplitz(c, K, x), out=local)  # each chunk as if nothing followed
    local = local.view(B, nC, K)
    if nC > 1:
        heads = local[:, :, 0] @ _toeplitz(c**K, nC, x)  # (B, nC): y at each chunk's first token
        after = torch.cat([heads[:, 1:], heads.new_zeros(B, 1)], dim=1)  # y just after each chunk
        reach = _reach(float(c), K, x.dtype, x.device)  # c^(K - t)
        local.addcmul_(after[:, :, None], reach)  # in place: a fresh 1 MB buffer costs more than the op
    return local.view(B, nC * K)[:, :T]


_SCRATCH = threading.local()  # per thread, so two threads never write the same buffer
_SCRATCH_MAX_BYTES = 16 << 20  # larger: plain allocations. Pinned: <= 6 slots x 16 MiB per thread


def _on_host(t: torch.Tensor) -> bool:
    """CPU tensors take the C++ scan and the reused scratch buffers; any other device the chunked matmuls with
    plain allocations. One place, so tests/test_cuda_branches.py can run the device branch on CPU tensors."""
    return t.device.type == "cpu"


def _scratch(slot: str, shape: tuple[int, ...], dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
    """An uninitialized CPU tensor for intermediates that never leave this module, reused across calls.

    Why: glibc mmaps every fresh CPU buffer of >= 128 KiB and the kernel page-faults it in on first
    touch, on every call. At B=256, T=1024 (1 MB per fp32 tensor, 1 thread) the holes path took
    3.2-4.5 ms with fresh intermediates and 1.4 ms with reused ones; with MALLOC_MMAP_THRESHOLD_ raised
    the fresh ones also gave 1.4 ms, so the difference is page faults, not math."""
    n = math.prod(shape)
    if not _on_host(like) or n * dtype.itemsize > _SCRATCH_MAX_BYTES:
        return torch.empty(shape, dtype=dtype, device=like.device)
    bufs = _SCRATCH.__dict__.setdefault("bufs", {})
    buf = bufs.get((slot, dtype))
    if buf is None or buf.numel() < n:
        buf = bufs[slot, dtype] = torch.empty(n, dtype=dtype)
    return buf[:n].view(shape)


def _has_holes(valid: torch.Tensor) -> bool:
    # a row is contiguous iff it switches from masked to valid at most once (counting a start at t = 0)
    u = valid.view(torch.uint8)  # uint8 compares run ~5x faster than bool logic on CPU
    starts = (u[:, 1:] > u[:, :-1]).sum(1, dtype=torch.int32) + u[:, 0]  # int32: 0.05 vs 0.08 ms
    return bool((starts > 1).any())


def _compaction_index(valid: torch.Tensor) -> torch.Tensor:
    """(B, T) int64 (a scratch buffer): where each token goes when its row is compacted. The k-th valid
    token of a row goes to k (in order), every masked token to the scratch column T."""
    B, T = valid.shape
    # int32 arithmetic on the uint8 view and one cast at the end: bool -> int64 cumsum, where() and
    # masked_fill_ cost 4-10x more on CPU (0.27 ms here vs 1.7-1.9 ms, B=256, T=1024, 1 thread)
    u = valid.view(torch.uint8)
    d32 = torch.cumsum(u, 1, dtype=torch.int32, out=_scratch("dest32", (B, T), torch.int32, valid))
    d32.sub_(T + 1).mul_(u).add_(T)
    return _scratch("dest", (B, T), torch.int64, valid).copy_(d32)


def _gae_holes(rewards, values, valid, gamma, lam, out_dtype, chunk):
    # compact each row (valid tokens to the front, in order): the row is then right-padded and the
    # discount is the same at every step. Masked tokens all land in the scratch column T, which is zeroed
    # after the scatter, so their rewards and values need no masking pass.
    B, T = rewards.shape
    dest = _compaction_index(valid)  # (B, T)
    width = -(-(T + 1) // chunk) * chunk  # room for the scratch column, a whole number of chunks
    r_c = _scratch("r", (B, width), out_dtype, rewards).zero_().scatter_(1, dest, rewards.to(out_dtype))
    v_c = _scratch("v", (B, width), out_dtype, rewards).zero_().scatter_(1, dest, values.to(out_dtype))
    r_c[:, T] = 0.0
    v_c[:, T] = 0.0  # also the value after a full row's last token
    delta = r_c.sub_(v_c)  # 0 from each row's count on, the scratch column included
    delta[:, :-1].add_(v_c[:, 1:], alpha=gamma)
    y = discounted_reverse_cumsum(
        delta, gamma * lam, chunk, out=_scratch("y", (B * width,), out_dtype, rewards)
    )
    adv = y.gather(1, dest)  # the only fresh buffers are the outputs; masked tokens read column T: 0
    # where, not a multiply by the 0/1 mask: a masked inf / nan value must not reach the returns
    return adv, torch.where(valid, adv + values.to(out_dtype), 0.0)


def _gae_torch(rewards, values, valid, gamma, lam, out_dtype, chunk=_CHUNK):
    if _has_holes(valid):
        return _gae_holes(rewards, values, valid, gamma, lam, out_dtype, chunk)
    # contiguous rows: the next token is the next valid one or padding (value 0). Masked positions
    # before a left-padded row get garbage, but nothing flows from them to the valid tokens.
    B, T = rewards.shape
    # 0/1 float mask through uint8: bool -> float directly is 8x slower on CPU (0.145 vs 0.018 ms)
    m = _scratch("m", (B, T), out_dtype, rewards).copy_(valid.view(torch.uint8))
    # where, not a multiply by m: inf * 0 = nan would carry a masked inf / nan into the valid tokens
    zero = torch.zeros((), dtype=out_dtype, device=rewards.device)
    v = torch.where(valid, values.to(out_dtype), zero, out=_scratch("v", (B, T), out_dtype, rewards))
    delta = torch.where(valid, rewards.to(out_dtype), zero, out=_scratch("r", (B, T), out_dtype, rewards))
    delta.sub_(v)  # masked rewards and values are 0 from here on
    delta[:, :-1].add_(v[:, 1:], alpha=gamma)
    n = B * -(-T // min(chunk, T)) * min(chunk, T)
    y = discounted_reverse_cumsum(delta, gamma * lam, chunk, out=_scratch("y", (n,), out_dtype, rewards))
    adv = y * m  # the only fresh buffers are the outputs
    return adv, adv + v


def _extension():
    """rlaif_fast._C, or None when it is not built or RLAIF_FAST_NO_EXT=1 (loaded once, by batching)."""
    from rlaif_fast.batching import _C

    return _C


def _gae_cpp(ext, rewards, values, valid, gamma, lam, out_dtype):
    """The C++ scan: fp32 or fp64 storage (out_dtype), outputs allocated here and filled in place."""
    r = rewards.to(out_dtype).contiguous()
    v = values.to(out_dtype).contiguous()
    m = valid.contiguous().view(torch.uint8)
    adv, ret = torch.empty(r.shape, dtype=out_dtype), torch.empty(r.shape, dtype=out_dtype)
    ext.gae(r.numpy(), v.numpy(), m.numpy(), adv.numpy(), ret.numpy(), gamma, lam, torch.get_num_threads())
    return adv, ret


def _gae_cpu(rewards, values, valid, gamma, lam, out_dtype):
    ext = _extension()
    if ext is not None and out_dtype in (torch.float32, torch.float64):
        return _gae_cpp(ext, rewards, values, valid, gamma, lam, out_dtype)
    return _gae_torch(rewards, values, valid, gamma, lam, out_dtype)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2015, arXiv 1506.02438) over masked rows.

        delta_t = r_t + gamma * V_next(t) - V_t
        A_t     = delta_t + gamma * lam * A_next(t)
        R_t     = A_t + V_t                          (the lambda-return, the value target)

    where next(t) is the next valid token of the row (masking convention in the module docstring).

    Args:
        rewards: (B, T) per-token rewards, e.g. from ``kl_shaped_rewards``.
        values: (B, T) value estimates V_t of the same tokens.
        mask: (B, T) nonzero = valid response token; any padding, holes allowed.
        gamma, lam: discount and GAE lambda in [0, 1].

    Returns:
        (advantages, returns), both (B, T), 0 at masked positions, in the promoted input dtype but at
        least fp32. No gradient: they are targets of the update. CUDA: one Triton launch (a scan);
        CPU: the C++ extension's SIMD scan (equal to the reference loop bit for bit in fp32 and fp64), or
        chunked matmuls when the extension is not built; never a Python loop over time.
    """
    _checks.check_tensor("rewards", rewards, dtypes=_checks.FLOAT_DTYPES, ndim=2)
    _checks.check_tensor("values", values, dtypes=_checks.FLOAT_DTYPES, ndim=2)
    _check_mask("mask", mask)
    _checks.check_same_shape(rewards=rewards, values=values, mask=mask)
    _checks.check_same_device(rewards=rewards, values=values, mask=mask)
    gamma, lam = _check_unit("gamma", gamma), _check_unit("lam", lam)
    out_dtype = torch.promote_types(torch.promote_types(rewards.dtype, values.dtype), torch.float32)
    backend = select_backend(rewards)
    if rewards.numel() == 0:
        return rewards.new_zeros(rewards.shape, dtype=out_dtype), rewards.new_zeros(
            rewards.shape, dtype=out_dtype
        )
    with torch.no_grad():
        rewards, values = rewards.detach(), values.detach()
        if backend == "triton":
            from rlaif_fast.kernels import advantages as kernels

            return kernels.gae(rewards, values, mask, gamma, lam, out_dtype)
        if backend == "reference":
            return ref.gae(rewards.to(out_dtype), values.to(out_dtype), mask, gamma, lam)
        valid = mask if mask.dtype == torch.bool else mask != 0
        if _on_host(rewards):
            return _gae_cpu(rewards, values, valid, gamma, lam, out_dtype)
        return _gae_torch(rewards, values, valid, gamma, lam, out_dtype)


def group_advantages(
    scores: torch.Tensor,
    group_size: int,
    method: str = "grpo",
    scale_by_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Critic-free advantages, one per sequence, from groups of samples of the same prompt.

    scores (B,) with B = n_groups * group_size and each group contiguous (rows g*G .. g*G + G - 1).
    With mean_g the group mean and std an unbiased (Bessel-corrected) standard deviation:

        grpo:               A_i = (s_i - mean_g) / (std_g + eps)        (Shao et al. 2024, 2402.03300)
        rloo:               A_i = s_i - mean(other G-1 scores) = G/(G-1) (s_i - mean_g)
                                                                       (Ahmadian et al. 2024, 2402.14740)
        reinforce_baseline: A_i = s_i - mean_g                         (REINFORCE++-baseline, 2501.03262)

    ``scale_by_std``: for grpo, divide by the group's std (as above; False gives Dr. GRPO's s_i - mean_g);
    for rloo and reinforce_baseline, divide by the std of all B centered values + eps (batch scale, as
    REINFORCE++ does: a group of equal scores stays at 0 instead of being blown up). eps = 1e-6 as verl
    (TRL uses 1e-4, OpenRLHF 1e-9). A group of equal scores gets A = 0.

    Returns (B,) in the dtype of scores (at least fp32). group_size must be >= 2 and divide B.
    """
    _checks.check_tensor("scores", scores, dtypes=_checks.FLOAT_DTYPES, ndim=1)
    _checks.check_choice("method", method, GROUP_METHODS)
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int, got {group_size!r}")
    if group_size < 2:
        raise ValueError(f"group_size={group_size} leaves no baseline (every advantage is 0); use >= 2")
    B = scores.shape[0]
    if B % group_size != 0:
        raise ValueError(
            f"group_size={group_size} does not divide the batch of {B} scores; "
            f"B must be n_groups * group_size with each group contiguous"
        )
    eps = _checks.check_positive("eps", eps)
    dt = torch.promote_types(scores.dtype, torch.float32)
    if select_backend(scores) == "reference":
        return ref.group_advantages(scores.to(dt), group_size, method, scale_by_std, eps)
    s = scores.to(dt).view(-1, group_size)  # (n_groups, G)
    centered = s - s.mean(dim=1, keepdim=True)
    if method == "grpo":
        adv = centered / (s.std(dim=1, keepdim=True) + eps) if scale_by_std else centered
        return adv.view(B)
    if method == "rloo":
        centered = centered * (group_size / (group_size - 1))
    adv = centered.view(B)
    return adv / (adv.std() + eps) if scale_by_std else adv


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over the entries where mask is nonzero: sum(x * m) / sum(m), along ``dim`` or overall.

    x and mask have the same shape. Where nothing is valid the mean is 0 (not NaN), so a fully masked
    row logs 0. Differentiable in x.
    """
    _checks.check_float("x", x)
    _checks.check_tensor("mask", mask)
    _checks.check_same_shape(x=x, mask=mask)
    _checks.check_same_device(x=x, mask=mask)
    valid = (mask != 0).to(x.dtype)
    if dim is None:
        return (x * valid).sum() / valid.sum().clamp(min=1)
    return (x * valid).sum(dim) / valid.sum(dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, *, eps: float = 1e-8):
    """Whiten x over its valid entries: (x - mean) / sqrt(var + eps), 0 at masked positions.

    mean and var are taken over all valid entries (the whole batch, as TRL / verl whiten advantages);
    var is the *unbiased* variance, sum((x - mean)^2) / (n - 1), as TRL and verl (OpenRLHF divides by n).
    With a single valid entry the variance is taken as 0 (no NaN): the entry whitens to 0. With
    ``shift_mean=False`` the mean is added back (scale only), as TRL does for rewards. Differentiable in x.
    Returns x's shape in x's dtype promoted to at least fp32.
    """
    _checks.check_float("x", x)
    _checks.check_tensor("mask", mask)
    _checks.check_same_shape(x=x, mask=mask)
    _checks.check_same_device(x=x, mask=mask)
    eps = _checks.check_positive("eps", eps)
    valid = mask != 0
    x = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 sums of squares lose the variance
    n = valid.sum().to(x.dtype)
    # where, not a multiply by the 0/1 mask: a masked inf / nan must reach neither the statistics nor,
    # through 0 * inf in the backward, their gradients
    x = torch.where(valid, x, 0.0)
    mean = x.sum() / n.clamp(min=1)
    var = torch.where(valid, x - mean, 0.0).square().sum() / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(valid, out, 0.0)
