"""kl_penalty and kl_shaped_rewards on every backend against the float64 reference (tolerance rule)."""

import math

import pytest
import torch
from helpers import assert_backend_tolerance, assert_tolerance

from rlaif_fast.ops import (
    kl_penalty,
    kl_shaped_rewards,
)
from rlaif_fast.reference import rl as ref

ESTIMATORS = ["k1", "k2", "k3", "abs"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _logps(shape, dtype, spread=1.0):
    # log-probs are <= 0; a spread around -2 gives both signs of logp - ref_logp
    logp = (-2.0 + spread * torch.randn(shape)).clamp(max=0.0).to(dtype)
    ref_logp = (-2.0 + spread * torch.randn(shape)).clamp(max=0.0).to(dtype)
    return logp, ref_logp


def eager_kl(logp, ref_logp, estimator, clamp=None):
    """What a user writes in plain torch, in the inputs' own dtype (the tolerance rule's yardstick)."""
    d = logp - ref_logp
    kl = {"k1": d, "k2": d * d / 2, "k3": torch.exp(-d) + d - 1, "abs": d.abs()}[estimator]
    return kl if clamp is None else kl.clamp(-clamp, clamp)


def make_mask(B, T, kind):
    """Masks of every layout the ops must accept: holes, left/right padding, full and empty rows."""
    lens = torch.randint(1, T + 1, (B, 1))
    pos = torch.arange(T)[None]
    if kind == "right":
        mask = pos < lens
    elif kind == "left":
        mask = pos >= T - lens
    else:  # holes
        mask = torch.rand(B, T) > 0.35
    mask[0] = True
    if B > 1:
        mask[1] = False  # an empty row
    return mask


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("clamp", [None, 0.6])
@pytest.mark.parametrize("shape", [(3, 37), (2, 1)])
def test_kl_penalty_forward_and_grads(backend, estimator, dtype, clamp, shape):
    logp, ref_logp = _logps(shape, dtype)
    grad = torch.randn(shape)

    def run(fn, a, b, out_dtype):
        a = a.detach().to(out_dtype).requires_grad_()
        b = b.detach().to(out_dtype).requires_grad_()
        out = fn(a, b, estimator, clamp)
        out.backward(grad.to(out.dtype))
        return out, a.grad, b.grad

    ours = run(kl_penalty, logp, ref_logp, dtype)
    eager = run(eager_kl, logp, ref_logp, dtype)
    truth = run(ref.kl_penalty, logp, ref_logp, torch.float64)
    assert ours[0].dtype == dtype and ours[1].dtype == dtype and ours[2].dtype == dtype
    for name, o, e, t in zip(("kl", "d logp", "d ref_logp"), ours, eager, truth):
        assert_backend_tolerance(backend, o, e, t, dtype=dtype, name=f"{estimator}/{name}")


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_every_backend_computes_in_fp32_and_returns_the_input_dtype(backend, estimator):
    # one dtype contract: bf16 in, fp32 math, bf16 out. k3 at d ~ 0.01 is ~5e-5: bf16 math loses it
    # (exp(-d) near 1 has a resolution of 2^-8), which the reference backend did before
    logp = torch.tensor([-1.0, -1.0, -2.0, -3.0], dtype=torch.bfloat16)
    ref_logp = (logp.float() + torch.tensor([0.01, -0.02, 0.015, 1.5])).to(torch.bfloat16)
    got = kl_penalty(logp, ref_logp, estimator)
    want = eager_kl(logp.float(), ref_logp.float(), estimator).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=2**-8, atol=0)


def test_kl_penalty_clamp_zeroes_the_gradient_where_clipped(backend):
    logp = torch.tensor([-0.1, -5.0, -1.0], requires_grad=True)
    ref_logp = torch.tensor([-5.0, -0.1, -1.2])
    out = kl_penalty(logp, ref_logp, "k1", clamp=1.0)
    out.sum().backward()
    assert torch.allclose(out, torch.tensor([1.0, -1.0, 0.2]))
    assert torch.equal(logp.grad, torch.tensor([0.0, 0.0, 1.0]))


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's numpy exp
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_kl_penalty_k3_far_drift_is_finite_when_clamped(impl, monkeypatch):
    # exp(-d) overflows fp32 at d = -100; the clamp must keep value and gradient finite. Eager autograd
    # (the "reference" backend) gives NaN here (inf * 0 in exp's backward): the reason for _KLPenalty.
    monkeypatch.setenv("RLAIF_FAST_BACKEND", impl)
    logp = torch.tensor([-100.0, -1.0], requires_grad=True)
    ref_logp = torch.tensor([0.0, -1.0])
    out = kl_penalty(logp, ref_logp, "k3", clamp=10.0)
    out.sum().backward()
    assert out.tolist() == [10.0, 0.0]
    assert torch.isfinite(logp.grad).all() and logp.grad[0] == 0.0


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_kl_penalty_gradcheck(backend, estimator):
    logp, ref_logp = _logps((2, 5), torch.float64)
    logp.requires_grad_()
    ref_logp.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: kl_penalty(a, b, estimator), (logp, ref_logp))


def test_non_contiguous_inputs(backend):
    # log-probs are usually sliced out of a longer [B, T + 1] tensor
    full_logp, full_ref = _logps((3, 38), torch.float32)
    logp, ref_logp = full_logp[:, :-1].requires_grad_(), full_ref.t().contiguous().t()[:, 1:]
    assert not (logp.is_contiguous() or ref_logp.is_contiguous())
    out = kl_penalty(logp, ref_logp, "k3")
    out.backward(torch.ones_like(out))
    want = ref.kl_penalty(logp.detach().double(), ref_logp.double(), "k3")
    assert torch.allclose(out.double(), want, atol=1e-6)
    assert torch.allclose(logp.grad.double(), -torch.expm1(ref_logp.double() - logp.detach().double()))
    mask, scores = make_mask(3, 37, "left")[:, :], torch.randn(6)[::2]
    got = kl_shaped_rewards(scores, logp.detach(), ref_logp, mask, 0.1)
    want = kl_shaped_rewards(
        scores.contiguous(), logp.detach().contiguous(), ref_logp.contiguous(), mask, 0.1
    )
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_kl_penalty_k3_is_nonnegative(backend):
    logp, ref_logp = _logps((4, 37), torch.float32, spread=3.0)
    assert (kl_penalty(logp, ref_logp, "k3") >= 0).all()


@pytest.mark.parametrize("estimator", ["k1", "k3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["holes", "left", "right"])
@pytest.mark.parametrize("T", [37, 1])
def test_kl_shaped_rewards(backend, estimator, dtype, kind, T):
    B, kl_coef = 5, 0.05
    logp, ref_logp = _logps((B, T), dtype)
    scores = torch.randn(B).to(dtype)
    mask = make_mask(B, T, kind)
    rewards, kl = kl_shaped_rewards(scores, logp, ref_logp, mask, kl_coef, estimator)
    eager = ref.kl_shaped_rewards(scores, logp, ref_logp, mask, kl_coef, estimator)
    d = torch.float64
    truth = ref.kl_shaped_rewards(scores.to(d), logp.to(d), ref_logp.to(d), mask, kl_coef, estimator)
    assert rewards.dtype == torch.float32 and kl.dtype == torch.float32
    assert_backend_tolerance(backend, rewards, eager[0], truth[0], dtype=dtype, name="rewards")
    assert_backend_tolerance(backend, kl, eager[1], truth[1], dtype=dtype, name="kl")
    # the empty row gets nothing, and the score lands exactly once per non-empty row
    assert (rewards[1] == 0).all() and (kl[~mask] == 0).all()
    score_part = rewards + kl_coef * kl
    assert torch.allclose(score_part.sum(1), torch.where(mask.any(1), scores.float(), 0.0), atol=1e-6)


@pytest.mark.parametrize("T", [37, 16])
def test_shaped_rewards_kernel_across_chunks(T):
    # T = 37 with 8-wide chunks: the last valid token may sit in any chunk, incl. the partial one
    from rlaif_fast.kernels import kl as kernels

    B = 6
    logp, ref_logp = _logps((B, T), torch.float32)
    scores = torch.randn(B)
    mask = make_mask(B, T, "holes")
    mask[2, 9:] = False  # last valid token in an early chunk
    mask[3] = False
    mask[3, 0] = True  # only the very first token
    got = kernels.shaped_rewards(scores, logp, ref_logp, mask, 0.1, "k2", None, torch.float32, block_t=8)
    d = torch.float64
    truth = ref.kl_shaped_rewards(scores.to(d), logp.to(d), ref_logp.to(d), mask, 0.1, "k2")
    eager = ref.kl_shaped_rewards(scores, logp, ref_logp, mask, 0.1, "k2")
    assert_tolerance(got[0], eager[0], truth[0], name="rewards")
    assert_tolerance(got[1], eager[1], truth[1], name="kl")


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_kl_shaped_rewards_with_clamp(backend, estimator):
    logp, ref_logp = _logps((4, 37), torch.float32, spread=2.0)
    scores, mask = torch.randn(4), make_mask(4, 37, "holes")
    got = kl_shaped_rewards(scores, logp, ref_logp, mask, 0.2, estimator, clamp=0.5)
    d = torch.float64
    truth = ref.kl_shaped_rewards(scores.to(d), logp.to(d), ref_logp.to(d), mask, 0.2, estimator, 0.5)
    eager = ref.kl_shaped_rewards(scores, logp, ref_logp, mask, 0.2, estimator, 0.5)
    assert got[1].abs().max() <= 0.5
    assert_backend_tolerance(backend, got[0], eager[0], truth[0], dtype=torch.float32, name="rewards")
    assert_backend_tolerance(backend, got[1], eager[1], truth[1], dtype=torch.float32, name="kl")


def test_kl_shaped_rewards_carry_no_gradient(backend):
    logp, ref_logp = _logps((2, 7), torch.float32)
    logp.requires_grad_()
    rewards, kl = kl_shaped_rewards(torch.randn(2), logp, ref_logp, torch.ones(2, 7), 0.1)
    assert not rewards.requires_grad and not kl.requires_grad


def test_kl_shaped_rewards_accepts_int_and_float_masks(backend):
    logp, ref_logp = _logps((3, 9), torch.float32)
    scores = torch.randn(3)
    mask = make_mask(3, 9, "holes")
    want = kl_shaped_rewards(scores, logp, ref_logp, mask, 0.1)
    for m in (mask.long(), mask.float()):
        got = kl_shaped_rewards(scores, logp, ref_logp, m, 0.1)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_bad_inputs_name_the_value():
    logp, ref_logp = _logps((2, 5), torch.float32)
    mask, scores = torch.ones(2, 5), torch.zeros(2)
    with pytest.raises(ValueError, match="estimator='k4'"):
        kl_penalty(logp, ref_logp, "k4")
    with pytest.raises(ValueError, match="clamp must be > 0, got -1"):
        kl_penalty(logp, ref_logp, clamp=-1)
    with pytest.raises(ValueError, match=r"ref_logp has shape \(2, 4\)"):
        kl_penalty(logp, ref_logp[:, :4])
    with pytest.raises(TypeError, match="logp has dtype int64"):
        kl_penalty(logp.long(), ref_logp)
    with pytest.raises(TypeError, match="must be a torch.Tensor, got list"):
        kl_penalty([0.0], ref_logp)
    with pytest.raises(ValueError, match="is on meta"):
        kl_penalty(logp, ref_logp.to("meta"))
    with pytest.raises(ValueError, match="kl_coef must be >= 0, got -0.1"):
        kl_shaped_rewards(scores, logp, ref_logp, mask, -0.1)
    with pytest.raises(ValueError, match=r"scores has shape \(3,\).*\(2,\)"):
        kl_shaped_rewards(torch.zeros(3), logp, ref_logp, mask, 0.1)
    with pytest.raises(ValueError, match=r"mask has shape \(2, 6\)"):
        kl_shaped_rewards(scores, logp, ref_logp, torch.ones(2, 6), 0.1)
    with pytest.raises(ValueError, match="logp must have 2 dimensions"):
        kl_shaped_rewards(scores, logp[0], ref_logp[0], mask[0], 0.1)
    with pytest.raises(ValueError, match="scores is on meta"):
        kl_shaped_rewards(scores.to("meta"), logp, ref_logp, mask, 0.1)
    with pytest.raises(ValueError, match="estimator='kl'"):
        kl_shaped_rewards(scores, logp, ref_logp, mask, 0.1, "kl")


# -------------------- by hand: expected values from plain floats and math, never from a reference function


DT = torch.float64


def _t(x):
    return torch.tensor(x, dtype=DT)


def test_kl_estimators_by_hand(backend):
    d = math.log(2)
    lp, ref = _t([math.log(0.5), math.log(0.25)]), _t([math.log(0.25), math.log(0.5)])
    expect = {
        "k1": [d, -d],
        "k2": [d * d / 2, d * d / 2],
        "k3": [0.5 + d - 1, 2 - d - 1],
        "abs": [d, d],
    }
    for est, values in expect.items():
        torch.testing.assert_close(kl_penalty(lp, ref, est), _t(values))


def test_kl_shaped_rewards_by_hand(backend):
    # k1 = logp - ref; the score lands on the last valid token: left padding, a hole, right padding
    logp = _t([[-1.0, -2.0, -3.0, -4.0, -5.0]] * 2)
    ref = _t([[-1.5, -2.0, -2.0, -4.5, -9.0]] * 2)
    mask = _t([[0, 1, 0, 1, 0], [1, 1, 1, 1, 1]])
    rewards, kl = kl_shaped_rewards(_t([5.0, 7.0]), logp, ref, mask, kl_coef=0.1)
    k1 = [0.5, 0.0, -1.0, 0.5, 4.0]
    torch.testing.assert_close(kl, _t([[0.0, 0.0, 0.0, 0.5, 0.0], k1]))
    torch.testing.assert_close(
        rewards, _t([[0.0, 0.0, 0.0, 5.0 - 0.05, 0.0], [-0.1 * x for x in k1[:4]] + [7.0 - 0.4]])
    )
