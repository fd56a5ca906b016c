"""gae, group_advantages, masked_mean and masked_whiten against the float64 reference (tolerance rule)."""

import math
import os

import pytest
import torch
from helpers import assert_backend_tolerance, assert_tolerance
from test_kl import _t, make_mask

from rlaif_fast import batching
from rlaif_fast.ops import advantages as adv_ops
from rlaif_fast.ops import (
    gae,
    group_advantages,
    masked_mean,
    masked_whiten,
)
from rlaif_fast.ops.advantages import discounted_reverse_cumsum
from rlaif_fast.reference import rl as ref
from rlaif_fast.reference import rl as ref_rl

GAMMA_LAM = [(1.0, 0.95), (0.9, 0.7), (0.99, 0.0), (1.0, 1.0)]
GAE_PATHS = ["triton", "cpp", "torch", "reference"]


def _use_gae_path(mp, path):
    """Force one implementation of gae: triton (interpreter), cpp (the extension's scan on CPU), torch
    (the chunked-matmul fallback the CPU runs without the extension) or reference."""
    if path == "cpp" and batching.backend() != "cpp":
        if os.environ.get(batching.NO_EXT_VAR) == "1":
            pytest.skip(f"{batching.NO_EXT_VAR}=1: the C++ backend is switched off on purpose")
        raise AssertionError("rlaif_fast._C is not built: the CPU gae scan cannot be tested")
    mp.setenv("RLAIF_FAST_BACKEND", "torch" if path in ("cpp", "torch") else path)
    if path == "torch":
        mp.setattr(adv_ops, "_extension", lambda: None)


@pytest.fixture(params=GAE_PATHS)
def gae_path(request, monkeypatch):
    _use_gae_path(monkeypatch, request.param)
    return request.param


def _gae_inputs(B, T, dtype):
    return torch.randn(B, T).to(dtype), torch.randn(B, T).to(dtype)


@pytest.mark.parametrize("gamma,lam", GAMMA_LAM)
@pytest.mark.parametrize("kind", ["holes", "left", "right"])
@pytest.mark.parametrize("T", [37, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_gae_matches_reference(gae_path, gamma, lam, kind, T, dtype):
    B = 5
    rewards, values = _gae_inputs(B, T, dtype)
    mask = make_mask(B, T, kind)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    eager = ref.gae(rewards, values, mask, gamma, lam)
    truth = ref.gae(rewards.double(), values.double(), mask, gamma, lam)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert adv.dtype == out_dtype and ret.dtype == out_dtype
    assert_backend_tolerance(gae_path, adv, eager[0], truth[0], dtype=dtype, name="advantages")
    assert_backend_tolerance(gae_path, ret, eager[1], truth[1], dtype=dtype, name="returns")
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


@pytest.mark.parametrize("kind", ["holes", "right"])
def test_gae_long_rows(gae_path, kind):
    # T = 1024 crosses 32 chunks of the torch path and the kernel's 1024-wide block edge is exact
    rewards, values = _gae_inputs(4, 1024, torch.float32)
    mask = make_mask(4, 1024, kind)
    adv, ret = gae(rewards, values, mask, 1.0, 0.95)
    eager = ref.gae(rewards, values, mask, 1.0, 0.95)
    truth = ref.gae(rewards.double(), values.double(), mask, 1.0, 0.95)
    assert_backend_tolerance(gae_path, adv, eager[0], truth[0], dtype=torch.float32, name="advantages")
    assert_backend_tolerance(gae_path, ret, eager[1], truth[1], dtype=torch.float32, name="returns")


def test_gae_non_contiguous_inputs(gae_path):
    # slices such as values[:, :-1] (the value head's extra position) or a transposed layout
    rewards, values = torch.randn(5, 38)[:, :-1], torch.randn(38, 5).t()[:, 1:]
    mask = make_mask(5, 38, "holes")[:, 1:]
    assert not (rewards.is_contiguous() or values.is_contiguous() or mask.is_contiguous())
    adv, ret = gae(rewards, values, mask, 0.9, 0.8)
    want = gae(rewards.contiguous(), values.contiguous(), mask.contiguous(), 0.9, 0.8)
    assert torch.equal(adv, want[0]) and torch.equal(ret, want[1])


@pytest.mark.parametrize("kind", ["holes", "left", "right"])
def test_gae_ignores_masked_entries(gae_path, kind):
    # masked tokens are cut out of the row: whatever their rewards and values, nothing changes, bit for bit
    rewards, values = _gae_inputs(5, 37, torch.float32)
    mask = make_mask(5, 37, kind)
    want = gae(rewards, values, mask, 0.9, 0.8)
    got = gae(*(torch.where(mask, x, 1e4 * torch.randn_like(x)) for x in (rewards, values)), mask, 0.9, 0.8)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_gae_cpu_scratch_buffers_never_leak(monkeypatch):
    # the CPU path keeps its intermediates in buffers reused across calls: the outputs must not alias them,
    # calls of other sizes, dtypes and mask layouts in between must not change them, and a rerun on the
    # now dirty buffers must give the same bits
    _use_gae_path(monkeypatch, "torch")
    rewards, values = _gae_inputs(4, 70, torch.float32)
    mask = make_mask(4, 70, "holes")
    adv, ret = gae(rewards, values, mask)
    kept = adv.clone(), ret.clone()
    for B, T, kind, dtype in [
        (3, 20, "holes", torch.float32),
        (6, 150, "holes", torch.float32),
        (4, 70, "right", torch.float32),
        (4, 70, "holes", torch.float64),
    ]:
        r, v = _gae_inputs(B, T, dtype)
        gae(r, v, make_mask(B, T, kind))
    assert torch.equal(adv, kept[0]) and torch.equal(ret, kept[1])
    again = gae(rewards, values, mask)
    assert torch.equal(again[0], adv) and torch.equal(again[1], ret)
    truth = ref.gae(rewards.double(), values.double(), mask, 1.0, 0.95)
    eager = ref.gae(rewards, values, mask, 1.0, 0.95)
    assert_tolerance(adv, eager[0], truth[0], name="advantages")


def test_gae_cpu_threads_do_not_share_scratch(monkeypatch):
    # two threads run the CPU path at once on different inputs of the same shape (same scratch sizes)
    from concurrent.futures import ThreadPoolExecutor

    _use_gae_path(monkeypatch, "torch")
    inputs = [(*_gae_inputs(8, 300, torch.float32), make_mask(8, 300, kind)) for kind in ("holes", "right")]
    want = [gae(*x) for x in inputs]

    def run(i):
        return all(torch.equal(gae(*inputs[i])[0], want[i][0]) for _ in range(30))

    with ThreadPoolExecutor(2) as pool:
        assert all(pool.map(run, [0, 1, 0, 1]))


def test_gae_masking_convention():
    # one row, hand-computed: valid tokens at t = 1 and t = 3 (hole at 2, padding at 0 and 4)
    g, l = 0.9, 0.5
    r = torch.tensor([[5.0, 1.0, 7.0, 2.0, 9.0]])
    v = torch.tensor([[3.0, 0.5, 8.0, 1.5, 4.0]])
    m = torch.tensor([[0, 1, 0, 1, 0]])
    a3 = 2.0 + g * 0.0 - 1.5  # the value after the last valid token is 0
    a1 = (1.0 + g * 1.5 - 0.5) + g * l * a3  # bootstraps from t = 3, skipping the hole
    want = torch.tensor([[0.0, a1, 0.0, a3, 0.0]])
    for impl in GAE_PATHS:
        with pytest.MonkeyPatch.context() as mp:
            _use_gae_path(mp, impl)
            adv, ret = gae(r, v, m, g, l)
        assert torch.allclose(adv, want), impl
        assert torch.allclose(ret, torch.where(m.bool(), want + v, 0.0)), impl


# ---- the C++ scan (csrc/gae.cpp): the reference loop's arithmetic, so equal to it bit for bit ----------


@pytest.mark.parametrize("B,T", [(1, 1), (3, 5), (8, 16), (9, 17), (13, 37), (16, 1024), (7, 300)])
@pytest.mark.parametrize("kind", ["holes", "left", "right"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gae_cpp_equals_the_reference_loop_bitwise(monkeypatch, B, T, kind, dtype):
    # full 8 x 16 tiles, partial tiles in rows (B % 8) and in time (T % 16), and a single step
    _use_gae_path(monkeypatch, "cpp")
    rewards, values = _gae_inputs(B, T, dtype)
    mask = make_mask(B, T, kind)
    for gamma, lam in GAMMA_LAM + [(0.0, 0.5)]:
        adv, ret = gae(rewards, values, mask, gamma, lam)
        want = ref.gae(rewards, values, mask, gamma, lam)
        assert torch.equal(adv, want[0]) and torch.equal(ret, want[1]), (gamma, lam)


def test_gae_cpp_runs_on_cpu_without_the_fallback(monkeypatch):
    # with the extension built, fp32 / fp64 / bf16 inputs on CPU never reach the chunked-matmul path
    _use_gae_path(monkeypatch, "cpp")

    def fail(*args, **kwargs):
        raise AssertionError("the torch fallback ran although rlaif_fast._C is built")

    monkeypatch.setattr(adv_ops, "_gae_torch", fail)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        rewards, values = _gae_inputs(4, 40, dtype)
        mask = make_mask(4, 40, "holes").to(torch.int64)  # any mask dtype: nonzero = valid
        adv, _ = gae(rewards, values, mask)
        out = torch.float64 if dtype == torch.float64 else torch.float32
        assert adv.dtype == out
        assert torch.equal(adv, ref.gae(rewards.to(out), values.to(out), mask, 1.0, 0.95)[0])


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
def test_gae_cpp_masked_nan_and_inf_never_leak(monkeypatch, poison):
    _use_gae_path(monkeypatch, "cpp")
    rewards, values = _gae_inputs(11, 45, torch.float32)
    mask = make_mask(11, 45, "holes")
    want = gae(rewards, values, mask, 0.9, 0.8)
    got = gae(*(torch.where(mask, x, poison) for x in (rewards, values)), mask, 0.9, 0.8)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_gae_cpp_threads_and_scalar_loop_agree_exactly():
    # above ~1M elements per thread the scan splits whole 8-row blocks across threads, and CPUs without
    # AVX2 run the scalar loop: the same bits either way
    from rlaif_fast import _C

    B, T = 2053, 1024
    rewards, values = _gae_inputs(B, T, torch.float32)
    mask = make_mask(B, T, "holes").view(torch.uint8)
    outs = []
    for threads, simd in ((1, True), (2, True), (3, True), (2, False)):
        adv, ret = torch.empty(B, T), torch.empty(B, T)
        args = (rewards.numpy(), values.numpy(), mask.numpy(), adv.numpy(), ret.numpy(), 1.0, 0.95, threads)
        _C.gae(*args, simd=simd)
        outs.append((adv, ret))
    for adv, ret in outs[1:]:
        assert torch.equal(adv, outs[0][0]) and torch.equal(ret, outs[0][1])
    assert torch.equal(outs[0][0][:40], ref.gae(rewards[:40], values[:40], mask[:40], 1.0, 0.95)[0])


def test_gae_cpp_rejects_bad_buffers():
    from rlaif_fast import _C

    r, v = torch.randn(4, 9), torch.randn(4, 9)
    m = torch.ones(4, 9, dtype=torch.uint8)
    adv, ret = torch.empty(4, 9), torch.empty(4, 9)

    def call(**over):
        args = dict(rewards=r.numpy(), values=v.numpy(), mask=m.numpy(), adv=adv.numpy(), ret=ret.numpy())
        args.update(over)
        _C.gae(**args, gamma=1.0, lam=0.95, num_threads=1)

    with pytest.raises(TypeError, match="rewards has dtype float16"):
        call(rewards=r.half().numpy())
    with pytest.raises(TypeError, match="values has dtype float64; expected float32"):
        call(values=v.double().numpy())
    with pytest.raises(TypeError, match="mask has dtype bool; expected uint8"):
        call(mask=m.bool().numpy())
    with pytest.raises(ValueError, match=r"adv must have shape \(4, 9\)"):
        call(adv=torch.empty(4, 8).numpy())
    with pytest.raises(ValueError, match="ret must be C-contiguous"):
        call(ret=torch.empty(9, 4).t().numpy())
    with pytest.raises(ValueError, match="lam=1.5.* outside"):
        _C.gae(r.numpy(), v.numpy(), m.numpy(), adv.numpy(), ret.numpy(), 1.0, 1.5, 1)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.8, 0.9)])
def test_gae_kernel_across_chunks(gamma, lam):
    # 8-wide chunks over T = 37: the scan's carry must cross chunk edges, also through all-masked chunks
    from rlaif_fast.kernels import advantages as kernels

    B, T = 6, 37
    rewards, values = _gae_inputs(B, T, torch.float32)
    mask = make_mask(B, T, "holes")
    mask[2, 8:24] = False  # two fully masked chunks between valid tokens
    got = kernels.gae(rewards, values, mask, gamma, lam, torch.float32, block_t=8)
    eager = ref.gae(rewards, values, mask, gamma, lam)
    truth = ref.gae(rewards.double(), values.double(), mask, gamma, lam)
    assert_tolerance(got[0], eager[0], truth[0], name="advantages")
    assert_tolerance(got[1], eager[1], truth[1], name="returns")


@pytest.mark.parametrize("c", [0.95, 0.3, 0.0, 1.0])
@pytest.mark.parametrize("T,chunk", [(37, 8), (37, 64), (1, 8), (64, 16)])
def test_discounted_reverse_cumsum(c, T, chunk):
    x = torch.randn(3, T)
    got = discounted_reverse_cumsum(x, c, chunk=chunk)
    truth = torch.zeros(3, T, dtype=torch.float64)
    eager = torch.zeros(3, T)
    acc64, acc32 = torch.zeros(3, dtype=torch.float64), torch.zeros(3)
    for t in reversed(range(T)):
        acc64 = x[:, t].double() + c * acc64
        acc32 = x[:, t] + c * acc32
        truth[:, t], eager[:, t] = acc64, acc32
    assert_tolerance(got, eager, truth, name="y")


def test_gae_small_discount_has_no_overflow():
    # the chunked path never divides by powers of gamma*lam: gamma*lam = 1e-3 over 200 tokens is fine
    rewards, values = _gae_inputs(2, 200, torch.float32)
    mask = torch.ones(2, 200, dtype=torch.bool)
    adv, _ = gae(rewards, values, mask, 0.01, 0.1)
    truth, _ = ref.gae(rewards.double(), values.double(), mask, 0.01, 0.1)
    eager, _ = ref.gae(rewards, values, mask, 0.01, 0.1)
    assert_tolerance(adv, eager, truth, name="advantages")


def test_gae_bad_inputs():
    r, v, m = torch.zeros(2, 5), torch.zeros(2, 5), torch.ones(2, 5)
    with pytest.raises(ValueError, match="gamma=1.5 is outside"):
        gae(r, v, m, gamma=1.5)
    with pytest.raises(ValueError, match="lam=-0.1 is outside"):
        gae(r, v, m, lam=-0.1)
    with pytest.raises(TypeError, match="lam must be a number"):
        gae(r, v, m, lam="high")
    with pytest.raises(ValueError, match=r"values has shape \(2, 4\)"):
        gae(r, v[:, :4], m)
    with pytest.raises(ValueError, match="rewards must have 2 dimensions"):
        gae(r[0], v[0], m[0])
    with pytest.raises(TypeError, match="values has dtype int64"):
        gae(r, v.long(), m)
    with pytest.raises(ValueError, match="mask is on meta"):
        gae(r, v, m.to("meta"))


@pytest.mark.parametrize("method", ["grpo", "rloo", "reinforce_baseline"])
@pytest.mark.parametrize("scale_by_std", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_advantages(backend, method, scale_by_std, dtype):
    scores = torch.randn(12).to(dtype)
    scores[4:8] = 0.5  # a group of equal scores: advantage 0, never NaN
    got = group_advantages(scores, 4, method, scale_by_std)
    eager = ref.group_advantages(scores.float(), 4, method, scale_by_std)
    truth = ref.group_advantages(scores.double(), 4, method, scale_by_std)
    assert_backend_tolerance(backend, got, eager, truth, dtype=torch.float32, name=method)
    assert torch.all(got[4:8] == 0)
    assert torch.allclose(got.view(3, 4).sum(1), torch.zeros(3), atol=1e-5)  # zero-mean per group


def test_group_advantages_formulas():
    s = torch.tensor([1.0, 2.0, 6.0])
    assert torch.allclose(group_advantages(s, 3, "rloo", scale_by_std=False), torch.tensor([-3.0, -1.5, 4.5]))
    assert torch.allclose(group_advantages(s, 3, "reinforce_baseline", scale_by_std=False), s - 3.0)
    grpo = group_advantages(s, 3, "grpo", eps=1e-12)
    assert torch.allclose(grpo, (s - 3.0) / s.std())  # unbiased std, as torch.std


def test_group_advantages_bad_inputs():
    s = torch.zeros(10)
    with pytest.raises(ValueError, match="group_size=4 does not divide the batch of 10"):
        group_advantages(s, 4)
    with pytest.raises(ValueError, match="group_size=1"):
        group_advantages(s, 1)
    with pytest.raises(TypeError, match="group_size must be an int, got 2.0"):
        group_advantages(s, 2.0)
    with pytest.raises(ValueError, match="method='ppo'"):
        group_advantages(s, 5, "ppo")
    with pytest.raises(ValueError, match="scores must have 1 dimensions"):
        group_advantages(s.view(2, 5), 5)
    with pytest.raises(ValueError, match="eps must be > 0"):
        group_advantages(s, 5, eps=0.0)


@pytest.mark.parametrize("dim", [None, 0, 1])
def test_masked_mean(dim):
    x = torch.randn(4, 37, dtype=torch.float64, requires_grad=True)
    mask = make_mask(4, 37, "holes")
    got = masked_mean(x, mask, dim)
    want = ref.masked_mean(x, mask, dim)
    assert torch.allclose(got, want)
    if dim == 1:
        assert got[1] == 0  # an empty row means 0, not NaN
    assert torch.autograd.gradcheck(lambda a: masked_mean(a, mask, dim), (x,))
    assert masked_mean(x, torch.zeros(4, 37)) == 0


@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_whiten(shift_mean, dtype):
    x = (3.0 + 2.0 * torch.randn(4, 37)).to(dtype)
    mask = make_mask(4, 37, "holes")
    got = masked_whiten(x, mask, shift_mean)
    eager = ref.masked_whiten(x, mask, shift_mean)
    truth = ref.masked_whiten(x.double(), mask, shift_mean)
    assert got.dtype == torch.float32
    assert_tolerance(got, eager, truth, dtype=dtype, name="whitened")
    assert (got[~mask] == 0).all()
    if shift_mean:
        v = got[mask].double()
        assert abs(v.mean().item()) < 1e-2 and abs(v.var(unbiased=True).item() - 1.0) < 2e-2


def test_masked_whiten_gradient_and_edge_cases():
    x = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    mask = make_mask(3, 11, "holes")
    assert torch.autograd.gradcheck(lambda a: masked_whiten(a, mask), (x,))
    one = torch.zeros(3, 11, dtype=torch.bool)
    one[2, 4] = True
    out = masked_whiten(x.detach(), one)  # a single valid entry: variance 0, whitened to 0, no NaN
    assert torch.isfinite(out).all() and (out == 0).all()
    assert (masked_whiten(x.detach(), torch.zeros(3, 11)) == 0).all()
    with pytest.raises(ValueError, match=r"mask has shape \(3, 10\)"):
        masked_whiten(x, mask[:, :10])


# -------------------- non-finite values at masked positions


def test_gae_torch_fallback_ignores_non_finite_masked_inputs(monkeypatch):
    # the scan without the C++ extension multiplied by the 0/1 mask: inf * 0 = NaN leaked into valid tokens
    import rlaif_fast.ops.advantages as adv_mod

    monkeypatch.setenv("RLAIF_FAST_BACKEND", "torch")
    monkeypatch.setattr(adv_mod, "_extension", lambda: None)
    contiguous = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0]])
    holes = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1], [1, 0, 1, 1, 0, 1]])
    for mask in (contiguous, holes):
        r = torch.randn(3, 6).masked_fill(mask == 0, float("inf"))
        v = torch.randn(3, 6).masked_fill(mask == 0, float("nan"))
        got = gae(r, v, mask, 0.9, 0.8)
        want = ref_rl.gae(r, v, mask, 0.9, 0.8)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)


# -------------------- by hand: expected values from plain floats and math, never from a reference function


def test_gae_by_hand_with_padding_and_holes(backend):
    # gamma = 0.9, lam = 0.8 (gamma lam = 0.72), valid tokens r = (0, 0, 1), V = (0.5, 0.6, 0.7), V after = 0:
    #   A2 = 1 - 0.7 = 0.3;  A1 = (0.9 * 0.7 - 0.6) + 0.72 * 0.3 = 0.246;  A0 = (0.9 * 0.6 - 0.5) + 0.72 * 0.246
    a2, a1 = 0.3, 0.03 + 0.72 * 0.3
    a0 = 0.04 + 0.72 * a1
    # row 1: left padding (garbage in the pad); row 2: hole at t = 1 (skipped: t0 bootstraps from t2)
    rewards = _t([[0.0, 0.0, 1.0, 0.0], [99.0, 0.0, 0.0, 1.0], [0.0, 99.0, 1.0, 0.0]])
    values = _t([[0.5, 0.6, 0.7, 0.0], [99.0, 0.5, 0.6, 0.7], [0.5, 99.0, 0.7, 0.0]])
    mask = _t([[1, 1, 1, 0], [0, 1, 1, 1], [1, 0, 1, 0]])
    h0 = (0.9 * 0.7 - 0.5) + 0.72 * a2
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    expect = _t([[a0, a1, a2, 0.0], [0.0, a0, a1, a2], [h0, 0.0, a2, 0.0]])
    torch.testing.assert_close(adv, expect)
    torch.testing.assert_close(ret, torch.where(mask != 0, expect + values, 0.0))


def test_group_advantages_by_hand(backend):
    # one group (1, 2, 3, 6): mean 3, deviations (-2, -1, 0, 3), unbiased var 14/3
    s = _t([1.0, 2.0, 3.0, 6.0])
    dev = [-2.0, -1.0, 0.0, 3.0]
    std = math.sqrt(14 / 3)
    torch.testing.assert_close(group_advantages(s, 4, "grpo"), _t([d / (std + 1e-6) for d in dev]))
    torch.testing.assert_close(group_advantages(s, 4, "grpo", scale_by_std=False), _t(dev))
    # rloo: s_i - mean of the other three: 1 - 11/3, 2 - 10/3, 3 - 3, 6 - 2
    loo = [1 - 11 / 3, 2 - 10 / 3, 0.0, 4.0]
    torch.testing.assert_close(group_advantages(s, 4, "rloo", scale_by_std=False), _t(loo))
    loo_std = math.sqrt(sum(x * x for x in loo) / 3)  # mean 0, unbiased
    torch.testing.assert_close(group_advantages(s, 4, "rloo"), _t([x / (loo_std + 1e-6) for x in loo]))
    torch.testing.assert_close(group_advantages(s, 4, "reinforce_baseline", scale_by_std=False), _t(dev))


def test_masked_whiten_by_hand(backend):
    # valid (1, 2, 3): mean 2, unbiased var 1 -> (-1, 0, 1); shift_mean=False adds the mean back: (1, 2, 3)
    x = _t([[1.0, 2.0], [3.0, 100.0]])
    mask = _t([[1, 1], [1, 0]])
    k = 1 / math.sqrt(1 + 1e-8)
    torch.testing.assert_close(masked_whiten(x, mask), _t([[-k, 0.0], [k, 0.0]]))
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=False), _t([[2 - k, 2.0], [2 + k, 0.0]]))


NAN, INF = float("nan"), float("inf")


def test_masked_whiten_ignores_non_finite_masked_entries():
    # the ops path multiplied by the 0/1 mask: inf * 0 = NaN made every valid output NaN; the reference
    # whitens x[valid] only. Valid (1, 2): mean 1.5, unbiased var 0.5
    x = _t([[1.0, 2.0, INF], [NAN, 0.0, 0.0]])
    mask = _t([[1, 1, 0], [0, 0, 0]])
    k = 0.5 / math.sqrt(0.5 + 1e-8)
    expect = _t([[-k, k, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(masked_whiten(x, mask), expect)
    torch.testing.assert_close(
        masked_whiten(x, mask, shift_mean=False), _t([[1.5 - k, 1.5 + k, 0.0], [0.0] * 3])
    )
    xg = x.clone().requires_grad_()
    masked_whiten(xg, mask).sum().backward()
    assert torch.isfinite(xg.grad).all()
