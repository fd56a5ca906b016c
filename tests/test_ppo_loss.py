"""PPO policy loss (from log-probs and fused from logits) and value loss against float64 references."""

import math

import pytest
import torch
from helpers import assert_tolerance
from test_kl import DT, _t
from test_token_logprobs import _masked_vocab_logits

from rlaif_fast.ops import (
    ppo_loss_from_logprobs,
    ppo_policy_loss,
    token_logprobs,
    value_loss,
)
from rlaif_fast.reference import logprobs as ref
from rlaif_fast.reference.logprobs import LOSS_AGGS

STAT_KEYS = {"clip_frac", "approx_kl", "entropy", "ratio_mean", "kl"}
ESTIMATORS = ("k1", "k2", "k3", "abs")


def per_token_batch(B=4, T=37, dtype=torch.float64):
    """Random (B, T) PPO inputs with ratios spread across the clip range and one fully masked row."""
    logp = -torch.rand(B, T, dtype=dtype) * 4
    batch = dict(
        old_logp=logp + 0.3 * torch.randn(B, T, dtype=dtype),
        advantages=torch.randn(B, T, dtype=dtype),
        mask=torch.rand(B, T) > 0.25,
        ref_logp=logp + 0.2 * torch.randn(B, T, dtype=dtype),
    )
    batch["mask"][1] = False
    return logp, torch.rand(B, T, dtype=dtype) * 3, batch


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@pytest.mark.parametrize("kl_estimator", ESTIMATORS)
def test_from_logprobs_matches_reference(loss_agg, kl_estimator):
    logp, ent, batch = per_token_batch()
    opts = dict(
        kl_coef=0.1, kl_estimator=kl_estimator, entropy_coef=0.01, clip_eps_high=0.28, loss_agg=loss_agg
    )

    def grads(fn, dtype):
        lp = logp.detach().to(dtype).requires_grad_()
        h = ent.detach().to(dtype).requires_grad_()
        b = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in batch.items()}
        loss, stats = fn(
            lp, b["old_logp"], b["advantages"], b["mask"], entropy=h, ref_logp=b["ref_logp"], **opts
        )
        loss.backward()
        return loss, lp.grad, h.grad, stats

    truth = grads(ref.ppo_loss_from_logprobs, torch.float64)
    ours = grads(ppo_loss_from_logprobs, torch.float32)
    eager = grads(ref.ppo_loss_from_logprobs, torch.float32)
    for name, o, e, t in zip(("loss", "d logp", "d entropy"), ours[:3], eager[:3], truth[:3]):
        assert_tolerance(o, e, t, dtype=torch.float32, name=f"{loss_agg}/{kl_estimator} {name}")
    assert set(ours[3]) == STAT_KEYS
    for k, v in ours[3].items():
        assert v.dim() == 0 and not v.requires_grad
        assert_tolerance(v, eager[3][k], truth[3][k], dtype=torch.float32, name=f"stat {k}")
    assert 0 < truth[3]["clip_frac"] < 1  # the batch exercises both sides of the clip


def test_from_logprobs_gradcheck():
    logp, ent, b = per_token_batch(B=2, T=5)
    for agg in LOSS_AGGS:
        fn = lambda lp, h, agg=agg: ppo_loss_from_logprobs(
            lp,
            b["old_logp"],
            b["advantages"],
            b["mask"],
            entropy=h,
            ref_logp=b["ref_logp"],
            kl_coef=0.1,
            entropy_coef=0.02,
            loss_agg=agg,
        )[0]
        assert torch.autograd.gradcheck(fn, (logp.requires_grad_(), ent.requires_grad_()))


def test_all_masked_batch_gives_zero_loss_and_gradient():
    logp, ent, b = per_token_batch(B=2, T=5)
    logp.requires_grad_()
    for agg in LOSS_AGGS:
        loss, stats = ppo_loss_from_logprobs(
            logp, b["old_logp"] + 100.0, b["advantages"], torch.zeros(2, 5), loss_agg=agg
        )
        loss.backward()
        assert loss.item() == 0.0 and (logp.grad == 0).all()
        assert all(torch.isfinite(v) for v in stats.values())


def test_seq_mean_weights_every_sequence_equally():
    # two one-token-advantage sequences of 1 and 4 tokens: seq-mean-token-mean gives each half the loss
    logp = torch.zeros(2, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]])
    adv = torch.ones(2, 4, dtype=torch.float64)
    ppo_loss_from_logprobs(logp, logp.detach(), adv, mask, loss_agg="seq-mean-token-mean")[0].backward()
    assert torch.allclose(logp.grad[0, 0], torch.tensor(-0.5, dtype=torch.float64))
    assert torch.allclose(logp.grad[1], torch.full((4,), -0.125, dtype=torch.float64))


def ppo_inputs(B, T, V, dtype, temperature):
    base = (torch.randn(B, T + 1, V) * 3).to(dtype)  # (B, T+1, V): the loss reads base[:, :-1]
    labels = torch.randint(0, V, (B, T))
    mask = torch.rand(B, T) > 0.2
    mask[-1] = False  # a fully masked row
    labels[~mask] = -100  # padding labels at masked positions, as a collator writes them
    logp = ref.token_logprobs(base[:, :-1].double(), labels, temperature=temperature)
    batch = dict(
        old_logp=(logp + 0.3 * torch.randn(B, T, dtype=torch.float64)).float(),
        advantages=torch.randn(B, T),
        mask=mask,
        ref_logp=(logp + 0.2 * torch.randn(B, T, dtype=torch.float64)).float(),
    )
    return base, labels, batch


def eager_ppo(logits, labels, old_logp, advantages, mask, *, temperature, ref_logp=None, **opts):
    """Plain torch in the logits' dtype: log_softmax, gather, entropy, then the reference loss."""
    logp_all = torch.log_softmax(logits / temperature, dim=-1)
    logp = logp_all.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    dt = logits.dtype
    return ref.ppo_loss_from_logprobs(
        logp, old_logp.to(dt), advantages.to(dt), mask, entropy=ent, ref_logp=ref_logp.to(dt), **opts
    )


@pytest.mark.parametrize(
    "dtype, V, loss_agg, kl_estimator",
    [
        (torch.float32, 2053, "token-mean", "k3"),
        (torch.float32, 2053, "seq-mean-token-mean", "k1"),
        (torch.float32, 1, "seq-mean-token-sum", "k2"),
        (torch.bfloat16, 2053, "seq-mean-token-sum", "abs"),
        (torch.float16, 2053, "token-mean", "k3"),
    ],
)
def test_fused_policy_loss_matches_float64(backend, dtype, V, loss_agg, kl_estimator):
    B, T, temperature = 2, 37, 0.9
    base, labels, b = ppo_inputs(B, T, V, dtype, temperature)
    opts = dict(
        ref_logp=b["ref_logp"],
        clip_eps=0.2,
        clip_eps_high=0.28,
        kl_coef=0.05,
        kl_estimator=kl_estimator,
        entropy_coef=0.01,
        temperature=temperature,
        loss_agg=loss_agg,
    )

    def run(fn, dt):
        x = base.detach().to(dt).requires_grad_()
        loss, stats = fn(x[:, :-1], labels, b["old_logp"], b["advantages"], b["mask"], **opts)
        loss.backward()
        return loss, x.grad, stats

    ours = run(ppo_policy_loss, dtype)
    truth = run(ref.ppo_policy_loss, torch.float64)
    eager = run(eager_ppo, dtype)
    tag = f"{backend}/{dtype}/V={V}/{loss_agg}/{kl_estimator}"
    assert ours[1].dtype == dtype and ours[1].shape == base.shape
    assert_tolerance(ours[0], eager[0], truth[0], dtype=dtype, name=f"{tag} loss")
    assert_tolerance(ours[1], eager[1], truth[1], dtype=dtype, name=f"{tag} d logits")
    assert set(ours[2]) == STAT_KEYS
    for k, v in ours[2].items():
        assert v.dim() == 0 and not v.requires_grad
        assert_tolerance(v, eager[2][k], truth[2][k], dtype=dtype, name=f"{tag} stat {k}")
    assert (ours[1][-1] == 0).all()  # the fully masked row has no gradient


def test_fused_policy_loss_gradcheck(backend):
    B, T, V = 2, 3, 7
    logits = torch.randn(B, T, V, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (B, T))
    logp = ref.token_logprobs(logits.detach(), labels)
    old, adv, rl = (
        logp + 0.1 * torch.randn(B, T, dtype=torch.float64),
        torch.randn(B, T, dtype=torch.float64),
        logp - 0.1,
    )
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    fn = lambda x: ppo_policy_loss(
        x,
        labels,
        old,
        adv,
        mask,
        ref_logp=rl,
        kl_coef=0.1,
        entropy_coef=0.05,
        temperature=0.8,
        clip_eps=0.05,
        loss_agg="seq-mean-token-mean",
    )[0]
    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-7)


def test_fused_stats_without_reference_have_no_kl(backend):
    base, labels, b = ppo_inputs(2, 5, 40, torch.float32, 1.0)
    _, stats = ppo_policy_loss(base[:, :-1], labels, b["old_logp"], b["advantages"], b["mask"])
    assert set(stats) == STAT_KEYS - {"kl"}


@pytest.mark.parametrize("clip_eps", [None, 0.2])
def test_value_loss_matches_reference(clip_eps):
    B, T = 3, 37
    values = torch.randn(B, T, dtype=torch.float64)
    old, returns = (
        values + 0.3 * torch.randn(B, T, dtype=torch.float64),
        torch.randn(B, T, dtype=torch.float64),
    )
    mask = torch.rand(B, T) > 0.3

    def run(fn, dt):
        v = values.detach().to(dt).requires_grad_()
        loss, stats = fn(v, old.to(dt), returns.to(dt), mask, clip_eps=clip_eps)
        loss.backward()
        return loss, v.grad, stats

    ours, eager, truth = (
        run(value_loss, torch.float32),
        run(ref.value_loss, torch.float32),
        run(ref.value_loss, torch.float64),
    )
    assert_tolerance(ours[0], eager[0], truth[0], dtype=torch.float32, name="value loss")
    assert_tolerance(ours[1], eager[1], truth[1], dtype=torch.float32, name="d values")
    for k in truth[2]:
        assert_tolerance(ours[2][k], eager[2][k], truth[2][k], dtype=torch.float32, name=k)
    if clip_eps is not None:
        assert 0 < ours[2]["clip_frac"] < 1
    fn = lambda v: value_loss(v, old, returns, mask, clip_eps=clip_eps)[0]
    assert torch.autograd.gradcheck(fn, (values.clone().requires_grad_(),))


def _bad(**over):
    lp = -torch.rand(2, 3)
    args = dict(logp=lp, old_logp=lp.clone(), advantages=torch.randn(2, 3), mask=torch.ones(2, 3))
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over, exc, words",
    [
        (dict(clip_eps=0.0), ValueError, ["clip_eps", "0.0"]),
        (dict(clip_eps=-0.1), ValueError, ["clip_eps", "-0.1"]),
        (dict(clip_eps_high=0), ValueError, ["clip_eps_high", "0"]),
        (dict(kl_coef=0.1), ValueError, ["kl_coef=0.1", "ref_logp"]),
        (dict(kl_coef=-1.0, ref_logp=torch.zeros(2, 3)), ValueError, ["kl_coef", "-1.0"]),
        (dict(entropy_coef=0.01), ValueError, ["entropy_coef=0.01", "entropy"]),
        (dict(loss_agg="mean"), ValueError, ["'mean'", "token-mean"]),
        (dict(kl_estimator="k4", ref_logp=torch.zeros(2, 3)), ValueError, ["'k4'", "k3"]),
        (dict(advantages=torch.randn(2, 4)), ValueError, ["advantages", "(2, 4)", "(2, 3)"]),
        (dict(mask=[[1, 1, 1]]), TypeError, ["mask", "list"]),
        (dict(old_logp=torch.zeros(2, 3, dtype=torch.long)), TypeError, ["old_logp", "int64"]),
    ],
)
def test_from_logprobs_bad_inputs(over, exc, words):
    args = _bad(**{k: v for k, v in over.items() if k in ("logp", "old_logp", "advantages", "mask")})
    kwargs = {k: v for k, v in over.items() if k not in args}
    with pytest.raises(exc) as info:
        ppo_loss_from_logprobs(args["logp"], args["old_logp"], args["advantages"], args["mask"], **kwargs)
    for word in words:
        assert word in str(info.value)


def test_policy_loss_and_value_loss_bad_inputs():
    logits, labels = torch.randn(2, 3, 10), torch.randint(0, 10, (2, 3))
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="clip_eps must be > 0, got 0"):
        ppo_policy_loss(logits, labels, z, z, z, clip_eps=0)
    with pytest.raises(ValueError, match=r"labels\[\(0, 1\)\] = 10"):
        ppo_policy_loss(logits, torch.tensor([[0, 10, 0], [0, 0, 0]]), z, z, z)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        ppo_policy_loss(logits, labels, z, z, z, temperature=0)
    with pytest.raises(ValueError, match=r"old_logp has shape \(2, 2\)"):
        ppo_policy_loss(logits, labels, torch.zeros(2, 2), z, z)
    with pytest.raises(ValueError, match="clip_eps must be > 0, got -0.5"):
        value_loss(z, z, z, z, clip_eps=-0.5)
    with pytest.raises(ValueError, match=r"returns has shape \(3,\)"):
        value_loss(z, z, torch.zeros(3), z)


def test_gpu_benchmark_script_smoke(tmp_path, capsys):
    # the lent-GPU script runs its every path at tiny sizes on CPU, so it cannot rot between GPU sessions
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu" / "bench_ops.py"
    spec = importlib.util.spec_from_file_location("bench_ops", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--smoke", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "ops.json").read_text())["results"]
    assert [r["V"] for r in results] == [257, 1000]
    assert all(r["max_abs_err_logp"] < 1e-3 and r["ppo_fwd_bwd"]["ms"] > 0 for r in results)
    assert "| 1000 |" in capsys.readouterr().out


# -------------------- -inf logits, gradients through log-probs only


def test_fused_ppo_gradient_is_finite_with_minus_inf_logits(backend):
    z = _masked_vocab_logits().requires_grad_()
    labels = torch.randint(0, 8, (2, 3))
    old = torch.full((2, 3), -2.0)
    adv = torch.randn(2, 3)
    loss, _ = ppo_policy_loss(z, labels, old, adv, torch.ones(2, 3))
    loss.backward()
    assert torch.isfinite(z.grad).all()


def test_ppo_loss_from_logprobs_differentiates_logp_only():
    # the docstring: "Gradients flow into logp and entropy only" (ppo_policy_loss detaches the rest). Without
    # the detach a critic output inside the advantages, or an un-detached old_logp, received policy gradients
    logp = (torch.randn(2, 4) - 1).requires_grad_()
    critic = torch.randn(2, 4, requires_grad=True)
    advantages = critic * 2.0  # e.g. returns - values with values from the value head, not detached
    old = logp * 1.0  # on-policy, forgot .detach()
    ref = torch.randn(2, 4, requires_grad=True)
    mask = torch.ones(2, 4)
    loss, _ = ppo_loss_from_logprobs(logp, old, advantages, mask, ref_logp=ref, kl_coef=0.1)
    loss.backward()
    assert critic.grad is None and ref.grad is None
    g = logp.grad.clone()
    logp2 = logp.detach().clone().requires_grad_()
    loss2, _ = ppo_loss_from_logprobs(
        logp2, logp.detach(), advantages.detach(), mask, ref_logp=ref.detach(), kl_coef=0.1
    )
    loss2.backward()
    torch.testing.assert_close(g, logp2.grad)


# -------------------- by hand: expected values from plain floats and math, never from a reference function


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


NAN, INF = float("nan"), float("inf")


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
