"""Padding-free packed micro-batches, the on-policy shortcut and gradient checkpointing in the trainer:
each equals the plain padded path (log-probs, values, KL, the update). Tiny models, SGD (Adam would
hide a gradient of the wrong scale)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
from toy import PROMPTS, CharTokenizer, count_a, invariance_run, tiny_gpt2, tiny_llama  # noqa: E402

from rlaif_fast.trainer import RLAIFConfig, RLAIFTrainer, ValueModel  # noqa: E402
from rlaif_fast.trainer.batches import micro_batches  # noqa: E402
from rlaif_fast.trainer.sampling import Rollouts  # noqa: E402
from rlaif_fast.trainer.scoring import response_logprobs, response_values  # noqa: E402

pytestmark = pytest.mark.slow

ROLLOUTS = Rollouts(["p"] * 3, ["c"] * 3, [[1, 3, 4], [1, 5], [1, 6, 7, 8]], [[3, 3, 2], [4], [5, 6, 9, 9]])


def _update_size_and_diff(a: dict, b: dict) -> tuple[float, float]:
    init = tiny_gpt2().state_dict()
    step = max((a[k] - init[k[len("policy.") :]]).abs().max().item() for k in a if k.startswith("policy."))
    return step, max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_packed_logprobs_values_and_grads_equal_padded(make):
    """One packed row vs right padding: log-probs, values and their gradients. The negative control
    (positions running on across the boundary, i.e. attention leaking) differs, so the check can fail."""
    policy = make()
    value = ValueModel.from_policy(policy)
    torch.nn.init.normal_(value.head.weight)
    out = {}
    for packed in (False, True):
        policy.zero_grad()
        value.zero_grad()
        (b,) = micro_batches(ROLLOUTS, [0, 1, 2], 3, 0, fast=True, batch_width=7, packed=packed)
        assert (b.input_ids.shape[0] == 1) == packed
        logp, _ = response_logprobs(policy, b, temperature=0.7, fast=True)
        values = response_values(value, b)
        (logp.sum() + values.square().sum()).backward()
        grads = [p.grad.clone() for p in list(policy.parameters()) + list(value.parameters())]
        out[packed] = (logp.detach(), values.detach(), grads, b)
    (lp0, v0, g0, _), (lp1, v1, g1, packed_batch) = out[False], out[True]
    assert lp0.abs().sum() > 0 and v0.abs().sum() > 0
    assert (lp0 - lp1).abs().max() <= 1e-5
    assert (v0 - v1).abs().max() <= 1e-5 * max(1.0, v0.abs().max().item())
    for a, b in zip(g0, g1):
        assert (a - b).abs().max() <= 1e-5 * max(1.0, a.abs().max().item())
    # positions 0..T-1 without restarts: the last rollouts attend to the earlier ones
    packed_batch.position_ids = torch.arange(packed_batch.input_ids.shape[1])[None]
    with torch.no_grad():
        leaked, _ = response_logprobs(policy, packed_batch, temperature=0.7, fast=True)
    assert (leaked - lp0).abs().max() > 1e-3


@pytest.mark.parametrize(
    "variant",
    [
        dict(algorithm="ppo"),
        dict(algorithm="reinforce_baseline", max_tokens_per_microbatch=24, max_prompt_len=4),
        dict(algorithm="rloo", group_size=2, temperature=0.9, fixed_lengths=False),
        dict(
            algorithm="grpo",
            group_size=2,
            temperature=0.9,
            fixed_lengths=False,
            kl_in="loss",
            kl_estimator="k3",
        ),
    ],
    ids=["ppo", "reinforce_budget", "rloo", "grpo"],
)
def test_packed_update_equals_padded(variant):
    """Every algorithm: the same parameters after a step (policy and value model) and the same KL."""
    padded, hist_a = invariance_run(steps=1, packing=False, **variant)
    packed, hist_b = invariance_run(steps=1, packing=True, **variant)
    step, diff = _update_size_and_diff(padded, packed)
    assert step > 1e-3
    assert diff <= 1e-5 * step, f"packed vs padded differ by {diff:.3e} (update {step:.3e})"
    assert hist_a[0]["kl"] == pytest.approx(hist_b[0]["kl"], rel=1e-5, abs=1e-7)
    assert hist_a[0]["policy_loss"] == pytest.approx(hist_b[0]["policy_loss"], rel=1e-5, abs=1e-7)
    # the padding the update ran on: none when packed
    assert hist_b[0]["padded_tokens_ratio"] == 1.0
    if variant.get("fixed_lengths") is False:  # rollouts of different lengths: the padded rows carry pads
        assert hist_a[0]["padded_tokens_ratio"] > 1.0


def test_on_policy_shortcut_skips_a_forward_and_gives_the_same_update(monkeypatch):
    """One epoch over one mini-batch, KL in the loss: the old log-probs come from the training forward
    (one policy pass fewer per micro-batch), and the update and metrics are the separate pass's."""
    from rlaif_fast.trainer import trainer as trainer_module
    from rlaif_fast.trainer.update import ActorCritic

    calls = []
    real_forward = ActorCritic.forward

    def counting(self, batch, *args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return real_forward(self, batch, *args, **kwargs)

    monkeypatch.setattr(ActorCritic, "forward", counting)
    kw = dict(
        steps=2, algorithm="grpo", group_size=2, temperature=0.9, fixed_lengths=False, ppo_epochs=1,
        mini_batch_size=8, kl_in="loss", kl_estimator="k3",
    )  # fmt: skip
    short, hist_short = invariance_run(**kw)
    short_calls = list(calls)
    calls.clear()
    monkeypatch.setattr(trainer_module.RLAIFTrainer, "_on_policy_shortcut", lambda self: False)
    full, hist_full = invariance_run(**kw)
    assert short_calls.count(False) == 0 and calls.count(False) == 8  # no no-grad scoring pass
    assert short_calls.count(True) == calls.count(True) == 8
    step, diff = _update_size_and_diff(full, short)
    assert step > 1e-3
    assert diff <= 1e-5 * step, f"shortcut vs separate pass differ by {diff:.3e} (update {step:.3e})"
    for short_step, full_step in zip(hist_short, hist_full):
        for key in ("kl", "entropy", "policy_loss", "clip_frac"):
            assert short_step[key] == pytest.approx(full_step[key], rel=1e-5, abs=1e-7), key
    assert hist_short[1]["kl"] > 0  # the second step's policy has moved off the reference


def test_gradient_checkpointing_equals_without(monkeypatch):
    from transformers.models.gpt2 import modeling_gpt2

    calls = []
    real = modeling_gpt2.GPT2Block.forward

    def counting(self, *args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return real(self, *args, **kwargs)

    monkeypatch.setattr(modeling_gpt2.GPT2Block, "forward", counting)
    plain, _ = invariance_run(steps=1, gradient_checkpointing=False)
    plain_calls = len(calls)
    calls.clear()
    ckpt, _ = invariance_run(steps=1, gradient_checkpointing=True)
    assert len(calls) > plain_calls  # the layers ran again in the backward (recomputed)
    step, diff = _update_size_and_diff(plain, ckpt)
    assert step > 1e-3
    assert diff <= 1e-5 * step, f"checkpointed vs plain differ by {diff:.3e} (update {step:.3e})"


def test_gradient_checkpointing_works_on_a_model_loaded_in_eval_mode(monkeypatch):
    """from_pretrained returns a model in eval mode, where transformers skips checkpointing: the trainer
    trains in training mode, so the layers still run again in the backward."""
    from transformers.models.gpt2 import modeling_gpt2

    calls = []
    real = modeling_gpt2.GPT2Block.forward
    monkeypatch.setattr(
        modeling_gpt2.GPT2Block, "forward", lambda self, *a, **k: calls.append(1) or real(self, *a, **k)
    )
    counts = {}
    for ckpt in (False, True):
        calls.clear()
        trainer = _trainer(tiny_gpt2().eval(), gradient_checkpointing=ckpt)
        trainer.step(PROMPTS[:4])
        counts[ckpt] = len(calls)
    assert counts[True] > counts[False], counts  # recomputed in the backward


def _trainer(policy, **kw):
    values = dict(
        algorithm="ppo", batch_size=4, micro_batch_size=2, max_new_tokens=4, progress=False,
        tensorboard=False, output_dir="/tmp/rlaif_packing_checks",
    )  # fmt: skip
    values.update(kw)
    cfg = RLAIFConfig(**values)
    value = ValueModel.from_policy(policy) if cfg.uses_critic else None
    return RLAIFTrainer(policy, CharTokenizer(), count_a, cfg, value_model=value)


def test_packing_choices_fail_naming_the_key():
    with pytest.raises(ValueError, match="packing=True needs ops='fast'"):
        RLAIFConfig(packing=True, ops="naive")
    with pytest.raises(ValueError, match="packing="):
        RLAIFConfig(packing="yes")
    with pytest.raises(ValueError, match="gradient_checkpointing="):
        RLAIFConfig(gradient_checkpointing="yes")
    policy = tiny_llama()
    policy.config._attn_implementation = "my_kernel"
    with pytest.raises(ValueError, match=r"packing=True but the policy uses attn_implementation='my_kernel'"):
        _trainer(policy, packing=True)
    # auto (None) pads that model, and sdpa too (a packed row costs sum(n)^2 attention there)
    assert _trainer(policy, packing=None).packing is False
    assert _trainer(tiny_llama(), packing=None).packing is False
    assert _trainer(tiny_llama(), packing=True).packing is True


def test_a_model_that_leaks_across_packed_sequences_is_refused(monkeypatch):
    """A model that ignores position-id restarts (here: transformers' packed-sequence detection turned
    off) fails the probe, with packing named."""
    from transformers import masking_utils

    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(ValueError, match=r"packing=True but the policy .* lets attention cross"):
        _trainer(tiny_llama(), packing=True)
    assert _trainer(tiny_llama(), packing=None).packing is False
    trainer = _trainer(tiny_llama(), packing=False)
    assert trainer.step(PROMPTS[:4])["kl"] >= 0
