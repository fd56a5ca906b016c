"""token_logprobs: every backend against float64 truth under the tolerance rule, plus edge cases."""

import pytest
import torch
from helpers import assert_tolerance

from rlaif_fast.ops import ppo_policy_loss, token_logprobs
from rlaif_fast.reference import logprobs as ref_logprobs
from rlaif_fast.reference.logprobs import token_logprobs as reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def eager(logits, labels, temperature, ignore_index=-100):
    """What a user writes in plain torch, in the logits' own dtype (the tolerance rule's yardstick)."""
    logp_all = torch.log_softmax(logits / temperature, dim=-1)
    ignored = labels == ignore_index
    logp = logp_all.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    zero = torch.zeros_like(logp)
    return torch.where(ignored, zero, logp), torch.where(ignored, zero, ent)


def run(fn, base, labels, g_lp, g_h, temperature, *, dtype=None):
    """fn on base[:, :-1] (non-contiguous); returns logp, entropy and d base."""
    x = base.detach().to(dtype or base.dtype).requires_grad_()
    logp, ent = fn(x[:, :-1], labels, temperature)
    (logp * g_lp.to(logp.dtype)).sum().add((ent * g_h.to(ent.dtype)).sum()).backward()
    return logp, ent, x.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [2053, 1])
def test_forward_and_gradients_match_float64(backend, dtype, V):
    B, T, temperature = 2, 37, 0.7
    base = (torch.randn(B, T + 1, V) * 4).to(dtype)  # (B, T+1, V): sliced to [:, :-1] below
    labels = torch.randint(0, V, (B, T))
    labels[0, ::3] = -100
    g_lp, g_h = torch.randn(B, T), torch.randn(B, T)

    ops_fn = lambda x, y, t: token_logprobs(x, y, temperature=t, return_entropy=True)
    ref_fn = lambda x, y, t: reference(x, y, temperature=t, return_entropy=True)
    ours = run(ops_fn, base, labels, g_lp, g_h, temperature)
    truth = run(ref_fn, base, labels, g_lp, g_h, temperature, dtype=torch.float64)
    ref_eager = run(eager, base, labels, g_lp, g_h, temperature)

    assert ours[0].dtype == torch.float32 and ours[1].dtype == torch.float32
    assert ours[2].dtype == dtype and ours[2].shape == base.shape
    for name, o, e, t in zip(("logp", "entropy", "d logits"), ours, ref_eager, truth):
        assert_tolerance(o, e, t, dtype=dtype, name=f"{backend}/{dtype}/V={V} {name}")
    assert (ours[0] <= 0).all()
    ignored = labels == -100
    assert (ours[0][ignored] == 0).all() and (ours[1][ignored] == 0).all()
    assert (ours[2][:, :-1][ignored] == 0).all()


def test_logp_only_gradient(backend):
    logits = torch.randn(3, 11, 130, dtype=torch.float32)
    labels = torch.randint(0, 130, (3, 11))
    g = torch.randn(3, 11)
    x = logits.clone().requires_grad_()
    (token_logprobs(x, labels, temperature=1.3) * g).sum().backward()
    x_eager = logits.clone().requires_grad_()
    (eager(x_eager, labels, 1.3)[0] * g).sum().backward()  # the baseline: plain torch in fp32
    x64 = logits.double().requires_grad_()
    (reference(x64, labels, temperature=1.3) * g.double()).sum().backward()
    assert_tolerance(x.grad, x_eager.grad, x64.grad, dtype=torch.float32, name="d logits (logp only)")


def test_fully_ignored_rows_give_zero_and_no_gradient(backend):
    logits = torch.randn(2, 5, 33).requires_grad_()
    labels = torch.full((2, 5), -1)
    logp, ent = token_logprobs(logits, labels, ignore_index=-1, return_entropy=True)
    (logp.sum() + ent.sum()).backward()
    assert (logp == 0).all() and (ent == 0).all()
    assert (logits.grad == 0).all()


def test_logp_never_positive_on_a_peaked_row(backend):
    # one logit far above the rest: fp32 rounding of z_y - lse can land at +1 ulp without the clamp
    logits = torch.full((4, 8, 65), -30.0)
    labels = torch.randint(0, 65, (4, 8))
    logits.scatter_(-1, labels.unsqueeze(-1), 30.0)
    logits += torch.randn_like(logits) * 1e-3
    assert (token_logprobs(logits, labels) <= 0).all()


def test_gradcheck_float64(backend):
    logits = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1, -100, 6], [0, 3, 3]])
    fn = lambda x: token_logprobs(x, labels, temperature=0.8, return_entropy=True)
    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-7)


def test_offsets_past_int32(backend):
    # three rows whose last starts 2^31 + 6 elements in: an int32 row * stride product would wrap.
    # The 4.3 GB storage is allocated but never touched except for the three rows (no RSS cost).
    V, stride = 257, 2**30 + 3
    storage = torch.empty(2 * stride + V, dtype=torch.float16)
    x = storage.as_strided((3, 1, V), (stride, V, 1))
    src = torch.randn(3, 1, V, dtype=torch.float16)
    x.copy_(src)
    labels = torch.randint(0, V, (3, 1))
    logp, ent = token_logprobs(x, labels, return_entropy=True)
    want_lp, want_h = reference(src.double(), labels, return_entropy=True)
    torch.testing.assert_close(logp.double(), want_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent.double(), want_h, atol=1e-5, rtol=0)


def test_logits_are_not_modified(backend):
    logits = torch.randn(2, 4, 50, requires_grad=True)
    before = logits.detach().clone()
    logp, ent = token_logprobs(logits, torch.randint(0, 50, (2, 4)), return_entropy=True)
    (logp.sum() + ent.sum()).backward()
    assert torch.equal(logits.detach(), before)


@pytest.mark.parametrize(
    "kwargs, labels, exc, words",
    [
        ({}, torch.zeros(2, 4, dtype=torch.long), ValueError, ["(2, 4)", "(2, 3, 10)"]),
        ({}, torch.tensor([[1, 2, 10]]).expand(2, 3), ValueError, ["10", "[0, 10)"]),
        ({}, torch.tensor([[1, 2, -5]]).expand(2, 3), ValueError, ["-5", "ignore_index=-100"]),
        ({}, torch.zeros(2, 3), TypeError, ["float32", ".long()"]),
        ({"temperature": 0.0}, torch.zeros(2, 3, dtype=torch.long), ValueError, ["temperature", "0.0"]),
        ({"temperature": -1}, torch.zeros(2, 3, dtype=torch.long), ValueError, ["temperature", "-1"]),
        ({"ignore_index": 1.5}, torch.zeros(2, 3, dtype=torch.long), TypeError, ["ignore_index", "1.5"]),
    ],
)
def test_bad_inputs_raise_naming_the_value(kwargs, labels, exc, words):
    with pytest.raises(exc) as info:
        token_logprobs(torch.randn(2, 3, 10), labels, **kwargs)
    for word in words:
        assert word in str(info.value)


def test_bad_logits_dtype_and_device():
    with pytest.raises(TypeError, match="int64"):
        token_logprobs(torch.zeros(2, 3, 10, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="meta"):
        token_logprobs(torch.randn(2, 3, 10), torch.zeros(2, 3, dtype=torch.long, device="meta"))


def test_torch_path_never_allocates_a_full_fp32_copy(monkeypatch):
    # allocator-level accounting (every CPU allocation, kernel-internal temporaries included)
    import rlaif_fast.ops.logprobs as mod
    from rlaif_fast.bench import peak_memory

    monkeypatch.setenv("RLAIF_FAST_BACKEND", "torch")
    monkeypatch.setattr(mod, "CHUNK_BYTES", 64 * 2**10)
    N, V = 256, 2053
    full_fp32 = N * V * 4
    logits = torch.randn(N, V, dtype=torch.bfloat16)
    labels = torch.randint(0, V, (N,))
    x = logits.clone().requires_grad_()

    def forward():
        with torch.no_grad():
            token_logprobs(logits, labels, return_entropy=True)

    def forward_backward():
        logp, ent = token_logprobs(x, labels, return_entropy=True)
        (logp.sum() + ent.sum()).backward()

    assert peak_memory(forward) < full_fp32 / 8
    # the bf16 gradient itself is N·V·2 bytes; beyond it only chunk-sized temporaries
    assert peak_memory(forward_backward) < N * V * 2 + full_fp32 / 8
    # and the yardstick really would have failed: eager allocates the full fp32 copy
    assert peak_memory(lambda: torch.log_softmax(logits.float(), -1)) >= full_fp32


def test_bench_cli_prints_a_table(capsys):
    from rlaif_fast.cli import main

    assert main(["bench", "--n", "16", "--vocab", "100", "--repeat", "1", "--grad"]) == 0
    out = capsys.readouterr().out
    assert "rlaif_fast (torch path)" in out and "eager torch" in out


# -------------------- -inf logits and uint8 labels


def _masked_vocab_logits(B=2, T=3, V=11, dtype=torch.float32):
    """Logits with -inf on the last vocabulary entries, as a logits processor or a padded vocab leaves them."""
    z = torch.randn(B, T, V, dtype=dtype)
    z[..., V - 3 :] = float("-inf")
    return z


def test_logprob_gradient_is_finite_with_minus_inf_logits(backend):
    # triton's backward formed g_H * p * (E[z] - z) = 0 * 0 * inf = NaN at every -inf logit, even with no
    # entropy gradient at all: NaN weights after one step on the default CUDA path
    z = _masked_vocab_logits().requires_grad_()
    labels = torch.randint(0, 8, (2, 3))
    token_logprobs(z, labels, temperature=0.7).sum().backward()
    assert torch.isfinite(z.grad).all()
    z_ref = z.detach().clone().requires_grad_()
    ref_logprobs.token_logprobs(z_ref, labels, temperature=0.7).sum().backward()
    torch.testing.assert_close(z.grad, z_ref.grad)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_entropy_gradient_is_finite_with_minus_inf_logits(backend):
    # the triton forward gives a finite entropy for -inf logits (p = 0 there): its gradient must be finite too,
    # and equal to the gradient of the same logits with the -inf columns dropped (which carry zero gradient)
    z = _masked_vocab_logits().requires_grad_()
    labels = torch.randint(0, 8, (2, 3))
    lp, ent = token_logprobs(z, labels, return_entropy=True)
    (lp.sum() + ent.sum()).backward()
    finite = z.detach()[..., :-3].clone().requires_grad_()
    lp2, ent2 = ref_logprobs.token_logprobs(finite, labels, return_entropy=True)
    (lp2.sum() + ent2.sum()).backward()
    torch.testing.assert_close(z.grad[..., :-3], finite.grad)
    assert torch.equal(z.grad[..., -3:], torch.zeros_like(z.grad[..., -3:]))


def test_uint8_labels_are_not_mistaken_for_ignore_index(backend):
    # torch compares a uint8 tensor with -100 as with 156 (-100 mod 256): token 156 of a byte-level vocabulary
    # was silently ignored (log-prob 0, no gradient) on the torch and reference paths; triton widened first
    from rlaif_fast.ops import linear_token_logprobs

    V, H = 260, 8
    labels = torch.tensor([[156, 3, 255], [0, 156, 7]])
    z = torch.randn(2, 3, V)
    want = ref_logprobs.token_logprobs(z, labels)
    assert want[0, 0] != 0
    torch.testing.assert_close(token_logprobs(z, labels.to(torch.uint8)), want)
    h, w = torch.randn(2, 3, H), torch.randn(V, H)
    torch.testing.assert_close(
        linear_token_logprobs(h, w, labels.to(torch.uint8)), linear_token_logprobs(h, w, labels)
    )
    args = (torch.full((2, 3), -5.0), torch.randn(2, 3), torch.ones(2, 3))
    loss8, _ = ppo_policy_loss(z, labels.to(torch.uint8), *args)
    loss64, _ = ppo_policy_loss(z, labels, *args)
    torch.testing.assert_close(loss8, loss64)
