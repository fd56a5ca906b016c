"""The launchers' CUDA-only branches, RUN on CPU tensors through the interpreter and checked against float64.

Every other test hands the launchers CPU tensors, so they take their CPU branch: interpreter-sized tiles,
bf16 tiles upcast before ``tl.dot``, W upcast once, plain fp32 matmuls. On a GPU they take another one:
``linear_logprobs`` tiles of (64, 128, 64), the GEMM forward's (4, 1024) and the GEMM backward's (16, 512)
epilogue tiles, bf16 straight into ``tl.dot``, cuBLAS with an fp32 output (``out_dtype``), d hidden written
by ``torch.mm(..., out=dh[s:e])`` in the input dtype, and the fallbacks taken when a torch build lacks
``out_dtype``. Here those branches run, with three test-only shims:

- ``kernels.linear_logprobs._on_gpu`` (the launchers' one read of ``is_cuda``) answers True;
- ``torch.mm`` / ``torch.addmm`` accept ``out_dtype`` on CPU as cuBLAS does: the call is first checked on
  the ``meta`` device (torch's own shape / dtype rules for it) plus the CUDA kernel's self-dtype rule, then
  computed from operands upcast to the output dtype (exact for bf16 / fp16 products, like the tensor cores).
  A second mode raises instead, as a torch without ``out_dtype`` does, so the fallbacks run too;
- the interpreter's ``tl.dot`` multiplies bf16 operands as numbers: it keeps bf16 as raw uint16 bits and
  would multiply the integers (why the CPU branch upcasts), so the shim widens those bits to fp32 first.

Sizes are small but put a ragged edge on every tile of the CUDA branch: N = 70 tokens (64-row tiles: 64 + 6;
4-row tiles: ..., 2; 16-row tiles: ..., 6), V = 1100 (128-wide tiles: 8 full + 76; 512: 2 + 76; 1024:
1 + 76), H = 96 (64-deep: 64 + 32), GEMM chunks of 24 + 24 + 22 tokens, ignored labels, labels in the last
ragged vocabulary tile. No block size is shrunk. The default GEMM chunk (2^28 / V tokens) is exercised by
lowering ``_GEMM_CHUNK_ELEMS`` so that 2^28 / V's formula gives 29-token chunks at V = 1100 (said where).

The ops whose CUDA behaviour is only the backend choice (``select_backend``: Triton by default for CUDA
tensors) run on a tensor subclass that answers ``is_cuda = True`` with no backend forced; the torch GAE path
on a non-CPU device (plain allocations instead of reused scratch buffers) runs with ``_on_host`` answering
False and those fresh buffers filled with NaN, as uninitialized GPU memory may be.
"""

from __future__ import annotations

import numpy as np
import pytest
import rlaif_fast.kernels.linear_logprobs as lin
import torch
from triton.runtime import interpreter

import rlaif_fast.ops.linear_gemm as gemm
from rlaif_fast import _backend
from rlaif_fast.ops import advantages as adv_ops
from rlaif_fast.ops.advantages import gae
from rlaif_fast.ops.kl import kl_penalty
from rlaif_fast.ops.linear import linear_token_logprobs
from rlaif_fast.ops.logprobs import token_logprobs
from rlaif_fast.ops.ppo import ppo_policy_loss
from rlaif_fast.reference import rl as ref_rl
from rlaif_fast.reference.linear import linear_token_logprobs as ref_linear
from rlaif_fast.reference.logprobs import ppo_policy_loss as ref_ppo
from rlaif_fast.reference.logprobs import token_logprobs as ref_token_logprobs
from tests.helpers import assert_tolerance, eager_linear_logprobs, scaled_atol

B, T, H, V = 2, 35, 96, 1100  # N = 70 tokens
N = B * T
CHUNK = 24  # GEMM chunks of 24, 24, 22 tokens


# ---------------------------------------------------------------------------------------------------
# shims


def _cublas_like(monkeypatch, *, has_out_dtype: bool) -> list[str]:
    """Give torch.mm / torch.addmm cuBLAS's ``out_dtype`` on CPU (or refuse it, as an older torch does).
    Returns the list of ``out_dtype`` calls made."""
    calls: list[str] = []
    real_mm, real_addmm = torch.mm, torch.addmm

    def mm(a, b, *args, out_dtype=None, **kwargs):
        if out_dtype is None or a.device.type == "meta":  # meta: addmm's own meta check calls torch.mm
            return (
                real_mm(a, b, *args, out_dtype=out_dtype, **kwargs)
                if out_dtype
                else real_mm(a, b, *args, **kwargs)
            )
        calls.append("mm")
        if not has_out_dtype:
            raise RuntimeError("simulated torch without mm(out_dtype=)")
        assert not args and not kwargs, (args, kwargs)
        real_mm(a.to("meta"), b.to("meta"), out_dtype=out_dtype)  # torch's shape and dtype rules
        return real_mm(a.to(out_dtype), b.to(out_dtype))

    def addmm(self, a, b, *args, out_dtype=None, out=None, **kwargs):
        if out_dtype is None:
            extra = {} if out is None else {"out": out}
            return real_addmm(self, a, b, *args, **kwargs, **extra)
        calls.append("addmm")
        if not has_out_dtype:
            raise RuntimeError("simulated torch without addmm(out_dtype=)")
        assert not args and not kwargs, (args, kwargs)
        meta_out = None if out is None else out.to("meta")
        real_addmm(self.to("meta"), a.to("meta"), b.to("meta"), out_dtype=out_dtype, out=meta_out)
        # CUDA's _addmm_dtype_out_cuda: mat1 and mat2 share a dtype, self has the output's or theirs
        assert a.dtype == b.dtype and self.dtype in (out_dtype, a.dtype), (self.dtype, a.dtype, b.dtype)
        res = real_addmm(self.to(out_dtype), a.to(out_dtype), b.to(out_dtype))
        if out is None:
            return res
        return out.copy_(res)

    monkeypatch.setattr(torch, "mm", mm)
    monkeypatch.setattr(torch, "addmm", addmm)
    return calls


def _bf16_bits_to_fp32(data: np.ndarray) -> np.ndarray:
    return (data.astype(np.uint32) << 16).view(np.float32)


def _tensor_core_dot(monkeypatch):
    """The interpreter's tl.dot on bf16 operands (raw uint16 bits there): widen the bits to fp32 first."""
    real = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == interpreter.tl.bfloat16 or b.dtype.scalar == interpreter.tl.bfloat16:
            wide = [
                interpreter.TensorHandle(_bf16_bits_to_fp32(x.data), interpreter.tl.float32)
                if x.dtype.scalar == interpreter.tl.bfloat16
                else x
                for x in (a, b)
            ]
            return real(self, wide[0], wide[1], d, input_precision, max_num_imprecise_acc)
        return real(self, a, b, d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)


def _spy_launches(monkeypatch) -> list[tuple[str, dict]]:
    """Record (kernel name, constexprs and options) of every linear_logprobs launch."""
    launches: list[tuple[str, dict]] = []
    for name in ("_fwd_kernel", "_bwd_kernel", "_dlogits_kernel"):
        kernel = getattr(lin, name)
        real_run = kernel.run

        def run(*args, _name=name, _real=real_run, **kwargs):
            launches.append((_name, {k: v for k, v in kwargs.items() if k.isupper() or k == "num_warps"}))
            return _real(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", run)
    return launches


@pytest.fixture
def gpu_branch(monkeypatch):
    """linear_logprobs' launchers on their CUDA branch, with cuBLAS out_dtype available."""
    monkeypatch.setenv("RLAIF_FAST_BACKEND", "triton")
    monkeypatch.setattr(lin, "_on_gpu", lambda t: True)
    monkeypatch.setattr(gemm, "GEMM_FALLBACKS", set())
    _tensor_core_dot(monkeypatch)
    return monkeypatch


# ---------------------------------------------------------------------------------------------------
# linear_token_logprobs: the four kernels and the GEMM glue on their CUDA branch

# (bias, softcap, logit_scale, temperature)
VARIANTS = {"plain": (False, None, None, 1.0), "bias-cap-scale-temp": (True, 4.0, 0.75, 0.7)}
# (forward, backward): every kernel and both GEMM launchers in two combinations
IMPLS = {"fused-fwd-gemm-bwd": ("fused", "gemm"), "gemm-fwd-atomic-bwd": ("gemm", "atomic")}


def _linear_inputs(dtype, with_bias):
    hidden = torch.randn(B, T, H, dtype=dtype)
    weight = (torch.randn(V, H) * H**-0.5 * 3).to(dtype)
    bias = torch.randn(V, dtype=dtype) if with_bias else None
    labels = torch.randint(0, V, (B, T))
    labels[:, ::7] = -100  # ignored rows, in every GEMM chunk and every 64-row tile
    labels[0, 1], labels[1, 2], labels[1, -1] = V - 1, 1024, 0  # the last ragged vocabulary tile, edges
    return hidden, weight, bias, labels


def _leaves(*xs):
    return [None if x is None else x.detach().clone().requires_grad_() for x in xs]


def _backward(out, g_lp, g_ent, leaves):
    logp, ent = out
    (logp * g_lp.to(logp.dtype) + ent * g_ent.to(ent.dtype)).sum().backward()
    return [None if x is None else x.grad for x in leaves]


_eager_linear = eager_linear_logprobs
_atol = scaled_atol


def _check_linear(dtype, variant, fwd, bwd, chunk_size=CHUNK):
    """Forward and all gradients of linear_token_logprobs vs float64 truth (tolerance rule vs eager)."""
    with_bias, cap, scale, temp = VARIANTS[variant]
    hidden, weight, bias, labels = _linear_inputs(dtype, with_bias)
    kw = dict(softcap=cap, logit_scale=scale, temperature=temp)
    g_lp, g_ent = torch.randn(B, T, dtype=torch.float64), torch.randn(B, T, dtype=torch.float64)

    ours_in = _leaves(hidden, weight, bias)
    ours = linear_token_logprobs(
        ours_in[0], ours_in[1], labels, bias=ours_in[2], return_entropy=True, chunk_size=chunk_size,
        forward=fwd, backward=bwd, **kw,
    )  # fmt: skip
    ours_g = _backward(ours, g_lp, g_ent, ours_in)

    eager_in = _leaves(hidden, weight, bias)
    eager_g = _backward(_eager_linear(eager_in[0], eager_in[1], labels, eager_in[2], cap, scale, temp), g_lp, g_ent,
                        eager_in)  # fmt: skip
    eager = _eager_linear(hidden, weight, labels, bias, cap, scale, temp)

    truth_in = _leaves(*[None if x is None else x.double() for x in (hidden, weight, bias)])
    truth = ref_linear(truth_in[0], truth_in[1], labels, bias=truth_in[2], return_entropy=True, **kw)
    truth_g = _backward(truth, g_lp, g_ent, truth_in)

    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert ours[0].dtype == acc and ours[0].shape == (B, T)
    for name, o, e, t in [("logp", ours[0], eager[0], truth[0]), ("entropy", ours[1], eager[1], truth[1])]:
        assert_tolerance(o, e, t, atol=_atol(dtype, t), name=name)
    ignored = labels == -100
    assert (ours[0] <= 0).all() and (ours[0][ignored] == 0).all() and (ours[1][ignored] == 0).all()
    for name, o, e, t in zip(["d hidden", "d weight", "d bias"], ours_g, eager_g, truth_g):
        if t is None:
            continue
        assert o.dtype == dtype, name
        assert_tolerance(o, e, t, atol=_atol(dtype, t), name=name)
    assert (ours_g[0][ignored] == 0).all()  # an ignored token gets no gradient


def _check_cuda_launches(launches, dtype, fwd, bwd):
    """The launches were those of the CUDA branch: its tiles, and bf16 / fp16 straight into tl.dot."""
    names = [name for name, _ in launches]
    expect_fwd = "_fwd_kernel"
    expect_bwd = "_dlogits_kernel" if bwd == "gemm" else "_bwd_kernel"
    assert names.count(expect_fwd) == (3 if fwd == "gemm" else 1), names  # one launch per GEMM chunk
    assert names.count(expect_bwd) == (3 if bwd == "gemm" else 1), names
    for name, kw in launches:
        if name == "_fwd_kernel" and kw.get("FROM_PRODUCTS"):
            assert (kw["BLOCK_N"], kw["BLOCK_V"], kw["num_warps"]) == (4, 1024, 4), kw
        elif name in ("_fwd_kernel", "_bwd_kernel"):
            assert (kw["BLOCK_N"], kw["BLOCK_V"], kw["BLOCK_H"], kw["num_warps"]) == (64, 128, 64, 8), kw
            assert kw["UPCAST"] is False, kw  # the CPU branch upcasts bf16 / fp16 tiles
        else:
            assert (kw["BLOCK_N"], kw["BLOCK_V"], kw["num_warps"]) == (16, 512, 8), kw


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_cuda_branch_matches_float64(gpu_branch, dtype, variant, impl):
    calls = _cublas_like(gpu_branch, has_out_dtype=True)
    launches = _spy_launches(gpu_branch)
    fwd, bwd = IMPLS[impl]
    _check_linear(dtype, variant, fwd, bwd)
    _check_cuda_launches(launches, dtype, fwd, bwd)
    assert gemm.GEMM_FALLBACKS == set()
    if dtype == torch.bfloat16:  # cuBLAS's fp32 output for every bf16 GEMM: U per chunk, d W += dUᵀ·h
        expect = (["mm"] * 3 if fwd == "gemm" else []) + (["mm", "addmm"] * 3 if bwd == "gemm" else [])
        assert calls == expect
    else:
        assert calls == []  # fp32 operands: plain GEMMs, already in the accumulation dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=str)
def test_linear_cuda_branch_other_dtypes(gpu_branch, dtype):
    """fp16 (out_dtype GEMMs, fp16 d logits) and fp64 (fp64 accumulation, no out_dtype) on the GEMM pair."""
    calls = _cublas_like(gpu_branch, has_out_dtype=True)
    _check_linear(dtype, "bias-cap-scale-temp", "gemm", "gemm")
    assert calls == (["mm"] * 3 + ["mm", "addmm"] * 3 if dtype == torch.float16 else [])


def test_linear_cuda_branch_without_out_dtype_falls_back(gpu_branch):
    """A torch whose cuBLAS GEMMs lack out_dtype: each route is tried once, recorded, then never again."""
    calls = _cublas_like(gpu_branch, has_out_dtype=False)
    _check_linear(torch.bfloat16, "bias-cap-scale-temp", "gemm", "gemm")
    assert gemm.GEMM_FALLBACKS == {"mm out_dtype", "addmm out_dtype"}
    assert calls == ["mm", "addmm"]  # the first chunk's tries; later chunks go straight to the fallback


def test_linear_cuda_branch_only_addmm_falls_back(gpu_branch):
    """mm(out_dtype) present, addmm(out_dtype) absent: d W += mm(dUᵀ, h, out_dtype=fp32) per chunk."""
    calls = _cublas_like(gpu_branch, has_out_dtype=True)
    real_addmm = torch.addmm

    def addmm(self, a, b, *args, out_dtype=None, **kwargs):
        if out_dtype is not None:
            calls.append("addmm refused")
            raise TypeError("simulated: addmm() got an unexpected keyword argument 'out_dtype'")
        return real_addmm(self, a, b, *args, **kwargs)

    gpu_branch.setattr(torch, "addmm", addmm)
    _check_linear(torch.bfloat16, "plain", "fused", "gemm")
    assert gemm.GEMM_FALLBACKS == {"addmm out_dtype"}
    assert calls == ["mm", "addmm refused", "mm", "mm", "mm", "mm", "mm"]


def test_linear_cuda_branch_default_gemm_chunk(gpu_branch):
    """chunk_size=None: the GEMM launchers' own C = _GEMM_CHUNK_ELEMS // V, lowered here from 2^28 to
    29·V + 500 so that C = 29 at V = 1100 (chunks of 29 + 29 + 12 tokens), as 2^28 gives 1765 at V = 152064."""
    _cublas_like(gpu_branch, has_out_dtype=True)
    gpu_branch.setattr(gemm, "_GEMM_CHUNK_ELEMS", 29 * V + 500)
    launches = _spy_launches(gpu_branch)
    _check_linear(torch.bfloat16, "bias-cap-scale-temp", "gemm", "gemm", chunk_size=None)
    assert [name for name, _ in launches] == ["_fwd_kernel"] * 3 + ["_dlogits_kernel"] * 3


def test_linear_cuda_branch_frozen_weight(gpu_branch):
    """need_dw = need_db = False on the CUDA GEMM backward (a frozen lm_head): d hidden alone, still right."""
    calls = _cublas_like(gpu_branch, has_out_dtype=True)
    hidden, weight, bias, labels = _linear_inputs(torch.bfloat16, True)
    h = hidden.detach().clone().requires_grad_()
    h64 = hidden.double().requires_grad_()
    kw = dict(bias=bias, softcap=4.0, temperature=0.7)
    linear_token_logprobs(h, weight, labels, chunk_size=CHUNK, backward="gemm", **kw).sum().backward()
    b64 = bias.double()
    ref_linear(h64, weight.double(), labels, **{**kw, "bias": b64}).sum().backward()
    h_e = hidden.detach().clone().requires_grad_()
    _eager_linear(h_e, weight, labels, bias, 4.0, None, 0.7)[0].sum().backward()
    assert_tolerance(h.grad, h_e.grad, h64.grad, atol=_atol(torch.bfloat16, h64.grad), name="d hidden")
    assert calls == ["mm"] * 3  # no d W product at all


# ---------------------------------------------------------------------------------------------------
# ops whose CUDA behaviour is the backend choice: auto selects Triton for CUDA tensors


class _ClaimsCuda(torch.Tensor):
    """A CPU tensor that answers is_cuda = True (as in benchmarks/gpu/compile_check.py, but with storage)."""

    @property
    def is_cuda(self) -> bool:  # noqa: D102
        return True


def _cuda(x: torch.Tensor) -> torch.Tensor:
    return torch.Tensor._make_subclass(_ClaimsCuda, x, x.requires_grad)


@pytest.fixture
def auto_backend(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    return monkeypatch


def test_auto_backend_on_cuda_is_triton_and_runs(auto_backend):
    assert _backend.select_backend(_cuda(torch.zeros(1))) == "triton"
    assert _backend.select_backend(torch.zeros(1)) == "torch"
    auto_backend.setattr(_backend, "triton_interpreted", lambda: False)  # a GPU box runs no interpreter
    assert _backend.select_backend(_cuda(torch.zeros(1))) == "triton"


def test_token_logprobs_auto_on_cuda(auto_backend):
    """Non-contiguous bf16 logits[:, :-1] at V = 4099 (a 4096 block plus a 3-wide tail), T = 0.7."""
    Bt, Tt, Vt = 2, 6, 4099
    full = (torch.randn(Bt, Tt + 1, Vt) * 3).to(torch.bfloat16)
    labels = torch.randint(0, Vt, (Bt, Tt))
    labels[0, 0], labels[1, 3], labels[0, 5] = -100, Vt - 1, Vt - 2
    g_lp, g_ent = torch.randn(Bt, Tt, dtype=torch.float64), torch.randn(Bt, Tt, dtype=torch.float64)

    x = _cuda(full).requires_grad_()
    logp, ent = token_logprobs(x[:, :-1], _cuda(labels), temperature=0.7, return_entropy=True)
    _backward((logp, ent), g_lp, g_ent, [x])

    def _truth(inp, dt):
        leaf = inp.detach().to(dt).requires_grad_()
        out = ref_token_logprobs(leaf[:, :-1], labels, temperature=0.7, return_entropy=True)
        _backward(out, g_lp, g_ent, [leaf])
        return out, leaf.grad

    (t_lp, t_ent), t_g = _truth(full, torch.float64)
    (e_lp, e_ent), e_g = _truth(full, torch.bfloat16)
    for name, o, e, t in [
        ("logp", logp, e_lp, t_lp),
        ("entropy", ent, e_ent, t_ent),
        ("d logits", x.grad, e_g, t_g),
    ]:
        assert_tolerance(o, e, t, atol=_atol(torch.bfloat16, t), name=name)


def test_ppo_policy_loss_auto_on_cuda(auto_backend):
    Bt, Tt, Vt = 3, 5, 257
    logits = torch.randn(Bt, Tt, Vt) * 2
    labels = torch.randint(0, Vt, (Bt, Tt))
    labels[2, 4] = -100
    old, ref_lp = -torch.rand(Bt, Tt) * 5, -torch.rand(Bt, Tt) * 5
    advantages = torch.randn(Bt, Tt)
    mask = torch.ones(Bt, Tt)
    mask[1, 3:] = 0
    kw = dict(ref_logp=ref_lp, kl_coef=0.1, entropy_coef=0.01, temperature=0.9, clip_eps=0.2)

    x = _cuda(logits).requires_grad_()
    loss, _ = ppo_policy_loss(x, _cuda(labels), _cuda(old), _cuda(advantages), _cuda(mask), **kw)
    loss.backward()
    x64 = logits.double().requires_grad_()
    loss64, _ = ref_ppo(
        x64, labels, old.double(), advantages.double(), mask, **{**kw, "ref_logp": ref_lp.double()}
    )
    loss64.backward()
    x32 = logits.clone().requires_grad_()
    loss32, _ = ref_ppo(x32, labels, old, advantages, mask, **kw)
    loss32.backward()
    f32 = torch.float32
    assert_tolerance(
        loss.reshape(1), loss32.reshape(1), loss64.reshape(1), atol=_atol(f32, loss64), name="loss"
    )
    assert_tolerance(x.grad, x32.grad, x64.grad, atol=_atol(f32, x64.grad), name="d logits")


def test_kl_and_gae_auto_on_cuda(auto_backend):
    lp, rf = -torch.rand(3, 1030) * 4, -torch.rand(3, 1030) * 4  # 3090 values: 3 blocks of 1024 + 18
    lp_c = _cuda(lp).requires_grad_()
    kl = kl_penalty(lp_c, _cuda(rf), "k3")
    kl.sum().backward()
    lp64 = lp.double().requires_grad_()
    kl64 = ref_rl.kl_penalty(lp64, rf.double(), "k3")
    kl64.sum().backward()
    lp32 = lp.clone().requires_grad_()
    kl32 = ref_rl.kl_penalty(lp32, rf, "k3")
    kl32.sum().backward()
    assert_tolerance(kl, kl32, kl64, atol=_atol(torch.float32, kl64), name="kl")
    assert_tolerance(lp_c.grad, lp32.grad, lp64.grad, atol=_atol(torch.float32, lp64.grad), name="d logp")

    r, v = torch.randn(3, 1030), torch.randn(3, 1030)  # T = 1030: the 1024-token scan chunk plus 6
    m = torch.rand(3, 1030) > 0.2
    m[1, :40] = False
    m[2] = False
    adv, ret = gae(_cuda(r), _cuda(v), _cuda(m), 0.99, 0.95)
    a64, r64 = ref_rl.gae(r.double(), v.double(), m, 0.99, 0.95)
    a32, r32 = ref_rl.gae(r, v, m, 0.99, 0.95)
    assert_tolerance(adv, a32, a64, atol=_atol(torch.float32, a64), name="advantages")
    assert_tolerance(ret, r32, r64, atol=_atol(torch.float32, r64), name="returns")


def test_gae_torch_backend_off_host_uses_fresh_buffers(monkeypatch):
    """RLAIF_FAST_BACKEND=torch on a GPU: the chunked-matmul GAE with plain allocations (no C++ scan, no
    reused scratch), here filled with NaN as fresh device memory may hold anything; holes and left padding."""
    monkeypatch.setenv(_backend.ENV_VAR, "torch")
    monkeypatch.setattr(adv_ops, "_on_host", lambda t: False)
    real_scratch = adv_ops._scratch
    fresh = []

    def poisoned(slot, shape, dtype, like):
        buf = real_scratch(slot, shape, dtype, like)
        fresh.append(buf)
        return buf.fill_(float("nan")) if buf.is_floating_point() else buf.fill_(-(2**30))

    monkeypatch.setattr(adv_ops, "_scratch", poisoned)
    for holes in (False, True):
        r, v = torch.randn(4, 77), torch.randn(4, 77)
        m = torch.zeros(4, 77, dtype=torch.bool)
        m[0, 5:] = True  # left padding
        m[1, :60] = True  # right padding
        if holes:
            m[2, ::3] = True
        m[3] = False
        adv, ret = gae(r, v, m, 0.99, 0.95)
        a64, r64 = ref_rl.gae(r.double(), v.double(), m, 0.99, 0.95)
        a32, r32 = ref_rl.gae(r, v, m, 0.99, 0.95)
        assert_tolerance(adv, a32, a64, atol=_atol(torch.float32, a64), name="advantages")
        assert_tolerance(ret, r32, r64, atol=_atol(torch.float32, r64), name="returns")
    scratch_reused = adv_ops._SCRATCH.__dict__.get("bufs", {}).values()
    assert fresh and not any(b.untyped_storage().data_ptr() == s.untyped_storage().data_ptr()
                             for b in fresh for s in scratch_reused)  # fmt: skip
