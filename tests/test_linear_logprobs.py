"""linear_token_logprobs and linear_ppo_policy_loss against full-logits float64 truth, on every backend
(triton = the kernels under TRITON_INTERPRET=1), odd sizes, every dtype, with the tolerance rule."""

import pytest
import torch

from rlaif_fast.ops.linear import linear_ppo_policy_loss, linear_token_logprobs
from rlaif_fast.reference.linear import linear_token_logprobs as ref_linear
from tests.helpers import assert_tolerance, eager_linear_logprobs, scaled_atol

N, H, V = 37, 96, 2053
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# (bias, softcap, logit_scale, temperature)
VARIANTS = {
    "plain": (False, None, None, 1.0),
    "bias-cap-scale-temp": (True, 4.0, 0.75, 0.7),
}


def _inputs(dtype, with_bias, n=N, h=H, v=V):
    hidden = torch.randn(n, h, dtype=dtype)
    weight = (torch.randn(v, h) * h**-0.5 * 3).to(dtype)  # logits of a few units, like a trained head
    bias = torch.randn(v, dtype=dtype) if with_bias else None
    labels = torch.randint(0, v, (n,))
    labels[::7] = -100  # ignored positions
    return hidden, weight, bias, labels


_eager = eager_linear_logprobs
_atol = scaled_atol


def _leaves(*xs):
    return [None if x is None else x.detach().clone().requires_grad_() for x in xs]


def _grads(out, g_lp, g_ent, leaves):
    logp, ent = out
    (logp * g_lp.to(logp.dtype) + ent * g_ent.to(ent.dtype)).sum().backward()
    return [None if x is None else x.grad for x in leaves]


# (forward, backward) of the Triton backend: each of the four kernels in every dtype and variant, at the
# cost of two combinations (fused + gemm and gemm + gemm run in test_triton_impls_agree_and_env_selects)
IMPLS = {"fused-fwd-gemm-bwd": ("fused", "gemm"), "gemm-fwd-atomic-bwd": ("gemm", "atomic")}


def _cases():
    """(backend, variant, impl): every backend and variant with the default kernels; the second Triton
    pair only on the non-plain variants (the kernels share _transform / _grad_logits, so the plain
    branches run in the default pair), and forward= / backward= only where they choose (Triton)."""
    for backend in ("triton", "torch", "reference"):
        for variant in VARIANTS:
            for impl in IMPLS:
                if impl != "fused-fwd-gemm-bwd" and (backend != "triton" or variant == "plain"):
                    continue
                yield pytest.param(backend, variant, impl, id=f"{backend}-{variant}-{impl}")


@pytest.mark.parametrize(("backend_name", "variant", "impl"), list(_cases()))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_and_gradients_match_float64(monkeypatch, backend_name, dtype, variant, impl):
    monkeypatch.setenv("RLAIF_FAST_BACKEND", backend_name)
    fwd, bwd = IMPLS[impl]
    with_bias, cap, scale, temp = VARIANTS[variant]
    hidden, weight, bias, labels = _inputs(dtype, with_bias)
    kw = dict(softcap=cap, logit_scale=scale, temperature=temp)
    g_lp, g_ent = torch.randn(N, dtype=torch.float64), torch.randn(N, dtype=torch.float64)

    ours_in = _leaves(hidden, weight, bias)
    ours = linear_token_logprobs(
        ours_in[0],
        ours_in[1],
        labels,
        bias=ours_in[2],
        return_entropy=True,
        chunk_size=16,
        forward=fwd,
        backward=bwd,
        **kw,
    )
    ours_g = _grads(ours, g_lp, g_ent, ours_in)

    eager_in = _leaves(hidden, weight, bias)
    eager = _eager(eager_in[0], eager_in[1], labels, eager_in[2], cap, scale, temp)
    eager_g = _grads(eager, g_lp, g_ent, eager_in)

    truth_in = _leaves(*[None if x is None else x.double() for x in (hidden, weight, bias)])
    truth = ref_linear(truth_in[0], truth_in[1], labels, bias=truth_in[2], return_entropy=True, **kw)
    truth_g = _grads(truth, g_lp, g_ent, truth_in)

    assert ours[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    for name, o, e, t in [("logp", ours[0], eager[0], truth[0]), ("entropy", ours[1], eager[1], truth[1])]:
        assert_tolerance(o, e, t, atol=_atol(dtype, t), name=name)
    assert (ours[0] <= 0).all() and (ours[0][labels == -100] == 0).all()
    for name, o, e, t in zip(["d hidden", "d weight", "d bias"], ours_g, eager_g, truth_g):
        if t is None:
            continue
        assert o.dtype == dtype
        assert_tolerance(o, e, t, atol=_atol(dtype, t), name=name)
    # ignored tokens get no gradient at all
    assert (ours_g[0][labels == -100] == 0).all()


def test_gradcheck_float64(backend):
    hidden, weight, bias, labels = _inputs(torch.float64, True, n=4, h=5, v=7)
    labels[1] = -100
    leaves = _leaves(hidden, weight, bias)

    def f(h, w, b):
        return linear_token_logprobs(
            h, w, labels, bias=b, return_entropy=True, softcap=2.5, logit_scale=1.3, temperature=0.8
        )

    # fast mode (random projections) for the interpreter, which pays ~0.1 s per kernel launch
    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7, fast_mode=backend == "triton")


def test_leading_dims_noncontiguous_and_chunking(backend):
    base = torch.randn(3, 9, H)
    hidden = base[:, :-1]  # (3, 8, H), not contiguous: the usual logits[:, :-1] shift
    weight_t = torch.randn(H, 257)
    weight = weight_t.T  # (V, H) with stride(-1) != 1
    labels = torch.randint(0, 257, (3, 8))
    logp = linear_token_logprobs(hidden, weight, labels)
    assert logp.shape == (3, 8)
    want = ref_linear(hidden.double(), weight.double(), labels)
    assert (logp.double() - want).abs().max().item() < 1e-5
    for chunk in (1, 5, 1000):
        again = linear_token_logprobs(hidden, weight, labels, chunk_size=chunk)
        assert (again - logp).abs().max().item() < 1e-5


def test_frozen_weight_gets_only_hidden_gradient(backend):
    hidden, weight, _, labels = _inputs(torch.float32, False, n=9, v=301)
    h = hidden.clone().requires_grad_()
    linear_token_logprobs(h, weight, labels).sum().backward()
    h64 = hidden.double().requires_grad_()
    ref_linear(h64, weight.double(), labels).sum().backward()
    assert weight.grad is None
    assert (h.grad.double() - h64.grad).abs().max().item() < 1e-5


def test_confident_label_log_prob_is_clamped_to_zero(backend):
    hidden = torch.ones(2, 16) * 40.0
    weight = torch.zeros(33, 16)
    weight[5] = 1.0  # logit 640 for token 5, 0 elsewhere: p(5) rounds to exactly 1
    logp, ent = linear_token_logprobs(hidden, weight, torch.tensor([5, 6]), return_entropy=True)
    assert logp[0].item() == 0.0 and logp[1].item() < -600
    assert (ent >= 0).all() and torch.isfinite(ent).all()


@pytest.mark.parametrize("fwd, bwd", [("gemm", "gemm"), ("fused", "atomic")])
def test_triton_impls_agree_and_env_selects(monkeypatch, fwd, bwd):
    """Triton forwards and backwards picked by the environment when the arguments are absent; a
    frozen weight / absent bias skips those products (only d hidden is asked for)."""
    monkeypatch.setenv("RLAIF_FAST_BACKEND", "triton")
    monkeypatch.setenv("RLAIF_FAST_LINEAR_FORWARD", fwd)
    monkeypatch.setenv("RLAIF_FAST_LINEAR_BACKWARD", bwd)
    hidden, weight, _, labels = _inputs(torch.float32, False, n=19, v=301)
    h = hidden.clone().requires_grad_()
    logp, ent = linear_token_logprobs(h, weight, labels, return_entropy=True, softcap=3.0, chunk_size=7)
    (logp - 0.5 * ent).sum().backward()
    h64 = hidden.double().requires_grad_()
    lp64, ent64 = ref_linear(h64, weight.double(), labels, return_entropy=True, softcap=3.0)
    (lp64 - 0.5 * ent64).sum().backward()
    assert weight.grad is None
    assert (logp.double() - lp64).abs().max().item() < 1e-5
    assert (ent.double() - ent64).abs().max().item() < 1e-5
    assert (h.grad.double() - h64.grad).abs().max().item() < 1e-5
    monkeypatch.setenv("RLAIF_FAST_LINEAR_FORWARD", "triton")
    with pytest.raises(ValueError, match="RLAIF_FAST_LINEAR_FORWARD='triton'"):
        linear_token_logprobs(h, weight, labels)
    monkeypatch.setenv("RLAIF_FAST_LINEAR_FORWARD", fwd)
    monkeypatch.setenv("RLAIF_FAST_LINEAR_BACKWARD", "fast")
    with pytest.raises(ValueError, match="RLAIF_FAST_LINEAR_BACKWARD='fast'"):
        linear_token_logprobs(h, weight, labels)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(labels=torch.zeros(4, dtype=torch.float32)), TypeError, "integer tensor"),
        (dict(labels=torch.full((4,), 99)), ValueError, "outside"),
        (dict(labels=torch.zeros(5, dtype=torch.long)), ValueError, "labels must be hidden.shape"),
        (dict(weight=torch.randn(11, 7)), ValueError, r"\(V, H\)"),
        (dict(weight=torch.randn(11, 8, dtype=torch.float64)), TypeError, "share one dtype"),
        (dict(bias=torch.randn(3)), ValueError, "bias has shape"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(softcap=-1.0), ValueError, "softcap"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(backward="cublas"), ValueError, "backward='cublas'"),
        (dict(forward="cublas"), ValueError, "forward='cublas'"),
    ],
)
def test_bad_inputs_name_the_value(kwargs, err, match):
    args = dict(hidden=torch.randn(4, 8), weight=torch.randn(11, 8), labels=torch.zeros(4, dtype=torch.long))
    args.update(kwargs)
    hidden, weight, labels = args.pop("hidden"), args.pop("weight"), args.pop("labels")
    with pytest.raises(err, match=match):
        linear_token_logprobs(hidden, weight, labels, **args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_ppo_policy_loss_matches_float64(backend, dtype):
    from rlaif_fast.ops.ppo import ppo_loss_from_logprobs

    B, T, v = 3, 11, 509
    hidden, weight, bias, _ = _inputs(dtype, True, n=B * T, v=v)
    hidden = hidden.view(B, T, H)
    labels = torch.randint(0, v, (B, T))
    mask = torch.rand(B, T) > 0.3
    old_logp = ref_linear(hidden.double(), weight.double(), labels, bias=bias.double()).float()
    old_logp = old_logp + 0.3 * torch.randn(B, T)
    ref_logp = old_logp + 0.1 * torch.randn(B, T)
    adv = torch.randn(B, T)
    knobs = dict(
        clip_eps=0.2, clip_eps_high=0.28, kl_coef=0.05, entropy_coef=0.01, loss_agg="seq-mean-token-mean"
    )

    def full_logits_loss(h, w, b, out_dtype):
        # (B, T, V) logits materialized in the dtype of h, then the same loss function
        lp, ent = _eager(h, w, labels, b, None, None, 0.9)
        o = lambda x: x.to(out_dtype)
        return ppo_loss_from_logprobs(
            lp, o(old_logp), o(adv), mask, entropy=ent, ref_logp=o(ref_logp), **knobs
        )

    ours_in = _leaves(hidden, weight, bias)
    loss, stats = linear_ppo_policy_loss(
        ours_in[0], ours_in[1], labels, old_logp, adv, mask, bias=ours_in[2], ref_logp=ref_logp,
        temperature=0.9, **knobs,
    )  # fmt: skip
    loss.backward()
    eager_in = _leaves(hidden, weight, bias)
    e_loss, _ = full_logits_loss(*eager_in, torch.float32)
    e_loss.backward()
    truth_in = _leaves(hidden.double(), weight.double(), bias.double())
    t_loss, t_stats = full_logits_loss(*truth_in, torch.float64)
    t_loss.backward()

    assert_tolerance(loss, e_loss, t_loss, atol=_atol(dtype, t_loss), name="loss")
    for k in ("clip_frac", "entropy", "kl"):
        assert abs(stats[k].item() - t_stats[k].item()) < 1e-2, k
    for name, o, e, t in zip(["d hidden", "d weight", "d bias"], ours_in, eager_in, truth_in):
        assert_tolerance(o.grad, e.grad, t.grad, atol=_atol(dtype, t.grad), name=name)


def test_linear_ppo_policy_loss_on_policy_form_matches_float64(backend):
    """old_logp=None (the trainer's one-epoch shortcut): the old log-probs are the detached current ones,
    so the loss is -A·1 per token and its gradient that of -A·logp; entropy_stat=False drops the entropy
    pass (the stat becomes mean(-logp)); return_logprobs gives the detached log-probs."""
    from rlaif_fast.ops.ppo import ppo_loss_from_logprobs

    B, T, v = 2, 7, 257
    hidden, weight, bias, _ = _inputs(torch.float32, True, n=B * T, v=v)
    hidden = hidden.view(B, T, H)
    labels = torch.randint(0, v, (B, T))
    mask = torch.rand(B, T) > 0.3
    adv = torch.randn(B, T)
    ref_logp = torch.randn(B, T) - 5.0
    knobs = dict(clip_eps=0.2, kl_coef=0.1, kl_estimator="k3", loss_agg="token-mean")

    ours_in = _leaves(hidden, weight, bias)
    loss, stats, logp = linear_ppo_policy_loss(
        ours_in[0], ours_in[1], labels, None, adv, mask, bias=ours_in[2], ref_logp=ref_logp,
        temperature=0.7, entropy_stat=False, return_logprobs=True, **knobs,
    )  # fmt: skip
    loss.backward()
    truth_in = _leaves(hidden.double(), weight.double(), bias.double())
    t_lp, _ = _eager(truth_in[0], truth_in[1], labels, truth_in[2], None, None, 0.7)
    t_loss, t_stats = ppo_loss_from_logprobs(
        t_lp, t_lp.detach(), adv.double(), mask, ref_logp=ref_logp.double(), **knobs
    )
    t_loss.backward()
    eager_in = _leaves(hidden, weight, bias)
    e_lp, _ = _eager(eager_in[0], eager_in[1], labels, eager_in[2], None, None, 0.7)
    e_loss, _ = ppo_loss_from_logprobs(e_lp, e_lp.detach(), adv, mask, ref_logp=ref_logp, **knobs)
    e_loss.backward()
    assert not logp.requires_grad
    assert (logp.double() - t_lp.detach()).abs()[mask].max() < 1e-4
    assert_tolerance(loss, e_loss, t_loss, atol=_atol(torch.float32, t_loss), name="loss")
    assert abs(stats["entropy"].item() - t_stats["entropy"].item()) < 1e-4  # mean(-logp): no entropy pass
    assert stats["clip_frac"].item() == 0.0 and abs(stats["ratio_mean"].item() - 1.0) < 1e-6
    for name, o, e, t in zip(["d hidden", "d weight", "d bias"], ours_in, eager_in, truth_in):
        assert_tolerance(o.grad, e.grad, t.grad, atol=_atol(torch.float32, t.grad), name=name)

    # the selected form: only the M masked rows (M, H) and labels (M,) -> the same loss and gradients
    sel_in = _leaves(hidden, weight, bias)
    s_loss, _, s_logp = linear_ppo_policy_loss(
        sel_in[0][mask], sel_in[1], labels[mask], None, adv, mask, bias=sel_in[2], ref_logp=ref_logp,
        temperature=0.7, entropy_stat=False, return_logprobs=True, **knobs,
    )  # fmt: skip
    s_loss.backward()
    assert s_logp.shape == (B, T) and (s_logp[~mask] == 0).all()
    assert_tolerance(s_loss, e_loss, t_loss, atol=_atol(torch.float32, t_loss), name="selected loss")
    for name, o, e, t in zip(["d hidden", "d weight", "d bias"], sel_in, eager_in, truth_in):
        assert_tolerance(o.grad, e.grad, t.grad, atol=_atol(torch.float32, t.grad), name="selected " + name)
    with pytest.raises(ValueError, match="rows but mask selects"):
        linear_ppo_policy_loss(hidden[mask][:-1], weight, labels[mask][:-1], None, adv, mask)


@pytest.mark.slow
def test_gpu_benchmark_script_smoke_mode(tmp_path):
    """benchmarks/gpu/bench_linear.py --smoke: every code path of the lent-GPU script, on CPU."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu" / "bench_linear.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "linear.json").read_text())
    assert result["correctness"]["ok"]
    for path in ("gemm", "gemm-fwd", "atomic", "torch"):
        assert result["correctness"][f"{path}_ok"], path
    assert set(result["timing"]["paths"]) == {"gemm", "gemm-fwd", "atomic", "torch", "materialized"}
    assert all(r["fwd_bwd_ms"] > 0 for r in result["timing"]["paths"].values())
    t = result["timing"]
    assert result["accounting"]["gemm"]["flops"] == 6 * t["N"] * t["H"] * t["V"]


def test_backward_accounting_at_the_issue_size():
    """The analytic floor of benchmarks/results/linear.md: at N = 8192, H = 4096, V = 128256 the GEMM
    backward moves < 1/20 of the atomic one's bytes, and its d W GEMM sits above an H100's ridge."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu" / "bench_linear.py"
    spec = importlib.util.spec_from_file_location("bench_linear_gpu", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    acc = mod.accounting(8192, 4096, 128256)
    assert acc["gemm"]["flops"] == acc["atomic"]["flops"] == 6 * 8192 * 4096 * 128256
    assert acc["gemm"]["chunk_tokens"] == (1 << 28) // 128256 == 2092
    assert acc["gemm"]["bytes"] * 20 < acc["atomic"]["bytes"]
    assert acc["atomic"]["atomic_adds"] == 1002 * 8192 * 4096 + 128 * 128256 * 4096
    assert acc["gemm"]["dw_flop_per_byte"] > 989 / 3.35  # H100 SXM: bf16 dense TFLOP/s over TB/s
