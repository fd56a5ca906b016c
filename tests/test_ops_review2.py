"""Second review of the ops' math: every expected value below is computed by hand (plain floats, ``math``),
never by a reference function, so a wrong reference cannot make the backends agree on a wrong answer."""

import math

import pytest
import torch

from rlaif_fast.ops import (
    gae,
    group_advantages,
    kl_penalty,
    kl_shaped_rewards,
    masked_whiten,
    ppo_loss_from_logprobs,
    ppo_policy_loss,
    token_logprobs,
    value_loss,
)

DT = torch.float64


def _t(x):
    return torch.tensor(x, dtype=DT)


# --------------------------------------------------------------------------------------------- PPO loss
#
# One row, four tokens, clip_eps = 0.2, clip_eps_high = 0.28 (DAPO clip-higher: r in [0.8, 1.28]):
#   t0: r = 1.5, A = +1: -A r = -1.5, -A clip = -1.28 -> l = -1.28, clipped, dl/dlogp = 0
#   t1: r = 0.5, A = +1: -0.5 vs -0.8             -> l = -0.5,  unclipped, dl/dlogp = -A r = -0.5
#   t2: r = 0.5, A = -1:  0.5 vs  0.8             -> l =  0.8,  clipped, dl/dlogp = 0
#   t3: r = 1.5, A = -1:  1.5 vs  1.28            -> l =  1.5,  unclipped, dl/dlogp = -A r = 1.5
RATIOS = [1.5, 0.5, 0.5, 1.5]
ADV = [1.0, 1.0, -1.0, -1.0]
LOSS = (-1.28 - 0.5 + 0.8 + 1.5) / 4
GRAD = [0.0, -0.5 / 4, 0.0, 1.5 / 4]
CLIP_FRAC = 0.5
APPROX_KL = 0.5 * (2 * math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2) / 4


def test_clip_higher_surrogate_by_hand():
    logp = _t([[-1.0, -2.0, -0.5, -3.0]]).requires_grad_()
    old = logp.detach() - _t([[math.log(r) for r in RATIOS]])
    loss, stats = ppo_loss_from_logprobs(
        logp, old, _t([ADV]), torch.ones(1, 4), clip_eps=0.2, clip_eps_high=0.28
    )
    loss.backward()
    assert loss.item() == pytest.approx(LOSS, abs=1e-12)
    torch.testing.assert_close(logp.grad, _t([GRAD]))
    assert stats["clip_frac"].item() == pytest.approx(CLIP_FRAC)
    assert stats["approx_kl"].item() == pytest.approx(APPROX_KL)
    assert stats["ratio_mean"].item() == pytest.approx(1.0)


def _two_logit_rows(logps):
    """Logits (1, T, 2) and labels 0 whose log-prob at label 0 is logps[t] by construction: z = (a, 0) with
    a = log(p / (1 - p))."""
    a = [math.log(math.exp(lp) / (1 - math.exp(lp))) for lp in logps]
    z = torch.stack([_t(a), torch.zeros(len(a), dtype=DT)], dim=-1).unsqueeze(0)
    return z, torch.zeros(1, len(a), dtype=torch.long)


def test_fused_clip_higher_surrogate_by_hand(backend):
    logps = [-1.0, -2.0, -0.5, -3.0]
    z, labels = _two_logit_rows(logps)
    z.requires_grad_()
    old = _t([[lp - math.log(r) for lp, r in zip(logps, RATIOS)]])
    loss, stats = ppo_policy_loss(
        z, labels, old, _t([ADV]), torch.ones(1, 4), clip_eps=0.2, clip_eps_high=0.28
    )
    loss.backward()
    assert loss.item() == pytest.approx(LOSS, abs=1e-9)
    assert stats["clip_frac"].item() == pytest.approx(CLIP_FRAC)
    assert stats["approx_kl"].item() == pytest.approx(APPROX_KL)
    # d logp / d z = onehot - p: (1 - p0, -(1 - p0)) for label 0
    expect = [[g * (1 - math.exp(lp)), -g * (1 - math.exp(lp))] for g, lp in zip(GRAD, logps)]
    torch.testing.assert_close(z.grad, _t([expect]))


def test_k3_kl_in_loss_and_its_gradient_by_hand(backend):
    # GRPO's estimator: pi_ref/pi - log(pi_ref/pi) - 1, with pi = 0.5, pi_ref = 0.25 -> 0.5 + ln 2 - 1;
    # d/d logp = 1 - pi_ref/pi = 0.5. A = 0, r = 1: the surrogate is 0 and the loss is kl_coef * k3.
    z, labels = _two_logit_rows([math.log(0.5)])
    z.requires_grad_()
    logp = _t([[math.log(0.5)]])
    ref = _t([[math.log(0.25)]])
    loss, stats = ppo_policy_loss(z, labels, logp, _t([[0.0]]), torch.ones(1, 1), ref_logp=ref, kl_coef=0.1)
    loss.backward()
    k3 = 0.5 + math.log(2) - 1
    assert loss.item() == pytest.approx(0.1 * k3, abs=1e-12)
    assert stats["kl"].item() == pytest.approx(k3, abs=1e-12)
    # dL/dz = 0.1 * 0.5 * (onehot - p) = 0.05 * (0.5, -0.5)
    torch.testing.assert_close(z.grad, _t([[[0.025, -0.025]]]))


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


def test_loss_agg_normalizations_by_hand(backend):
    # r = 1 everywhere, so l = -A. Row 0: tokens A = 1, 2, 3 (fourth masked); row 1: A = 4; row 2: empty.
    adv = _t([[1.0, 2.0, 3.0, 50.0], [4.0, 60.0, 70.0, 80.0], [90.0, 90.0, 90.0, 90.0]])
    mask = _t([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    logp = torch.full((3, 4), -1.0, dtype=DT)
    expect = {
        "token-mean": -(1 + 2 + 3 + 4) / 4,  # every valid token of the batch weighs the same
        "seq-mean-token-mean": -((1 + 2 + 3) / 3 + 4 / 1) / 2,  # over the 2 non-empty rows
        "seq-mean-token-sum": -((1 + 2 + 3) + 4) / 2,
    }
    z, labels = _two_logit_rows([-1.0] * 12)
    z, labels = z.view(3, 4, 2), labels.view(3, 4)
    for agg, value in expect.items():
        loss, _ = ppo_loss_from_logprobs(logp, logp, adv, mask, loss_agg=agg)
        assert loss.item() == pytest.approx(value, abs=1e-12), agg
        loss, _ = ppo_policy_loss(z, labels, logp, adv, mask, loss_agg=agg)
        assert loss.item() == pytest.approx(value, abs=1e-9), agg


def test_entropy_bonus_and_temperature_by_hand(backend):
    # logits (0, ln 3) at T = 2: z' = (0, ln 3 / 2), p = (1, sqrt 3) / (1 + sqrt 3)
    z = _t([[[0.0, math.log(3.0)]]])
    s3 = math.sqrt(3.0)
    p = [1 / (1 + s3), s3 / (1 + s3)]
    H = -sum(q * math.log(q) for q in p)
    lp, ent = token_logprobs(z, torch.tensor([[1]]), temperature=2.0, return_entropy=True)
    assert lp.item() == pytest.approx(math.log(p[1]), abs=1e-12)
    assert ent.item() == pytest.approx(H, abs=1e-12)
    # entropy bonus: l = surrogate - c H, A = 0 -> loss = -0.01 H
    loss, stats = ppo_policy_loss(
        z, torch.tensor([[1]]), lp, _t([[0.0]]), torch.ones(1, 1), entropy_coef=0.01, temperature=2.0
    )
    assert loss.item() == pytest.approx(-0.01 * H, abs=1e-12)
    assert stats["entropy"].item() == pytest.approx(H, abs=1e-12)


# --------------------------------------------------------------------------------------------- value loss


def test_value_loss_ppo2_clipping_by_hand():
    # t0: V = 1, old = 0.5, R = 2: (V - R)^2 = 1; V_clip = 0.5 + 0.2 = 0.7, (0.7 - 2)^2 = 1.69 -> 1.69 (clipped)
    # t1: V = 2, old = 2,   R = 1: 1 and 1 -> 1 (tie: not counted as clipped); t2 masked
    v = _t([[1.0, 2.0, 7.0]]).requires_grad_()
    loss, stats = value_loss(v, _t([[0.5, 2.0, 0.0]]), _t([[2.0, 1.0, 0.0]]), _t([[1, 1, 0]]), clip_eps=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.0) / 2)
    assert stats["clip_frac"].item() == pytest.approx(0.5)
    # d/dV: t0 the clipped branch is constant in V (V - old > eps): 0; t1: 0.5 * 2 (V - R) / 2 = 0.5
    torch.testing.assert_close(v.grad, _t([[0.0, 0.5, 0.0]]))
    loss, stats = value_loss(v.detach(), _t([[0.5, 2.0, 0.0]]), _t([[2.0, 1.0, 0.0]]), _t([[1, 1, 0]]))
    assert loss.item() == pytest.approx(0.5 * (1.0 + 1.0) / 2)


# --------------------------------------------------------------------------------------------- advantages


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


# ------------------------------------------------------------------------ masked positions hold anything
#
# The contract (reference/rl.py, ops/ppo.py): a masked position may hold any padding, NaN and inf included;
# it is excluded before any arithmetic. Each case below disagreed between the reference and the fast path.

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


@pytest.mark.parametrize("backend", ["reference"], indirect=True)
def test_reference_ppo_loss_ignores_nan_advantages_at_masked_tokens(backend):
    # RLAIF_FAST_BACKEND=reference aggregated with a multiply by the mask: NaN * 0 = NaN, where the triton
    # and torch paths give the loss of the valid tokens. Hand value: r = 1, l = -A on the one valid token
    z, labels = _two_logit_rows([-1.0, -1.0])
    logp = _t([[-1.0, -1.0]])
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        loss, _ = ppo_policy_loss(z, labels, logp, _t([[2.0, NAN]]), _t([[1, 0]]), loss_agg=agg)
        assert loss.item() == pytest.approx(-2.0), agg


def test_value_loss_ignores_nan_padding_in_returns():
    # returns / old values padded with NaN: the loss was finite but d values at the padding was
    # 0 * 2 (V - NaN) = NaN, which reaches every weight of the value head through its backward
    from rlaif_fast.reference.logprobs import value_loss as ref_value_loss

    v = _t([[1.0, 2.0, 3.0]]).requires_grad_()
    old, ret, mask = _t([[0.5, 2.0, NAN]]), _t([[2.0, 1.0, NAN]]), _t([[1, 1, 0]])
    for eps in (None, 0.2):
        v.grad = None
        loss, stats = value_loss(v, old, ret, mask, clip_eps=eps)
        loss.backward()
        expect = 0.5 * ((1.69 if eps else 1.0) + 1.0) / 2
        assert loss.item() == pytest.approx(expect)
        torch.testing.assert_close(v.grad, _t([[0.0 if eps else -0.5, 0.5, 0.0]]))
        ref_loss, ref_stats = ref_value_loss(v.detach(), old, ret, mask, clip_eps=eps)
        assert ref_loss.item() == pytest.approx(expect)
        assert ref_stats["value_mean"].item() == pytest.approx(stats["value_mean"].item())
