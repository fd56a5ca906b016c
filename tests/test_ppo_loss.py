"""PPO policy loss (from log-probs and fused from logits) and value loss against float64 references."""

import pytest
import torch
from helpers import assert_tolerance

from rlaif_fast.ops import ppo_loss_from_logprobs, ppo_policy_loss, value_loss
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
