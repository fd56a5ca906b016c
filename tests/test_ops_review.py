"""Regression tests for bugs found in review of the ops, kernels and the TRL patch: each failed before its fix."""

import copy

import pytest
import torch

from rlaif_fast.ops import gae, ppo_loss_from_logprobs, ppo_policy_loss, token_logprobs
from rlaif_fast.reference import logprobs as ref_logprobs
from rlaif_fast.reference import rl as ref_rl


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


def test_trl_fused_lm_head_sees_the_images_of_a_vision_language_model():
    # the patched add_fused_lm_head ran get_decoder() (the text-only decoder) where TRL runs base_model:
    # pixel_values were dropped and M-RoPE positions lost, so VLM log-probs ignored the image
    transformers = pytest.importorskip("transformers")
    trl_utils = pytest.importorskip("trl.trainer.utils")
    from rlaif_fast.integrations import trl as integ

    cfg = transformers.Qwen2VLConfig(
        text_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            vocab_size=200, rope_scaling={"type": "mrope", "mrope_section": [4, 2, 2]}, bos_token_id=1,
            eos_token_id=2,
        ),
        vision_config=dict(
            depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, in_chans=3, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2,
        ),
        image_token_id=150, video_token_id=151, vision_start_token_id=152,
    )  # fmt: skip
    theirs = transformers.Qwen2VLForConditionalGeneration(cfg).eval()
    ours = copy.deepcopy(theirs)
    ids = torch.tensor([[5, 152, 150, 7, 8, 9, 10, 11]])
    labels = ids.masked_fill(torch.arange(8) < 4, -100)
    inputs = dict(
        input_ids=ids, pixel_values=torch.randn(4, 3 * 2 * 14 * 14), image_grid_thw=torch.tensor([[1, 2, 2]]),
        mm_token_type_ids=(ids == 150).long(), labels=labels, fused_lm_head=True,
    )  # fmt: skip
    trl_utils.add_fused_lm_head(theirs)
    try:
        assert integ.patch()
        trl_utils.add_fused_lm_head(ours)
        with torch.no_grad():
            want = theirs(**inputs).log_probs
            got = ours(**inputs).log_probs
    finally:
        integ.unpatch()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


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
