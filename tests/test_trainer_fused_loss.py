"""The trainer's loss on the fused path (``ops.linear_ppo_policy_loss`` from the trunk's hidden states)
and the value head on the policy's own trunk (``ValueHead``): each gives the update of the split path."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
from toy import PROMPTS, CharTokenizer, count_a, tiny_llama  # noqa: E402

from rlaif_fast.trainer import (  # noqa: E402
    RLAIFConfig,
    RLAIFTrainer,
    ValueHead,
    ValueModel,
    update,  # noqa: E402
)

pytestmark = pytest.mark.slow
NAIVE = "naive" if "naive" in __import__("rlaif_fast.trainer.config", fromlist=["OPS"]).OPS else "reference"


def _reward(prompts, completions):
    """Varies between samples of one prompt (advantages != 0) and is never 0 (a value target)."""
    return [1.0 + count_a([p], [c])[0] + 0.25 * len(set(c)) for p, c in zip(prompts, completions)]


def _run(tmp_path, *, value=None, steps=2, **kw):
    torch.manual_seed(0)
    values = dict(
        batch_size=4, micro_batch_size=2, max_new_tokens=4, learning_rate=1e-2, kl_coef=0.1,
        progress=False, tensorboard=False, output_dir=str(tmp_path / "run"),
    )  # fmt: skip
    values.update(kw)
    cfg = RLAIFConfig(**values)
    policy = tiny_llama()
    v = {None: None, "model": ValueModel.from_policy, "head": ValueHead.from_policy}[value]
    trainer = RLAIFTrainer(policy, CharTokenizer(), _reward, cfg, value_model=v and v(policy))
    metrics = [trainer.step(PROMPTS[: cfg.batch_size // cfg.group_size]) for _ in range(steps)]
    params = {k: p.detach().clone() for k, p in trainer.engine.module.named_parameters()}
    return trainer, metrics, params


CASES = {
    # GRPO with the KL in the loss and an entropy bonus; the on-policy shortcut applies (old_logp=None)
    "grpo-kl-entropy": dict(
        algorithm="grpo", group_size=2, kl_in="loss", kl_estimator="k3", entropy_coef=0.01
    ),
    # two epochs: the old log-probs come from the scoring pass
    "rloo-2-epochs": dict(algorithm="rloo", group_size=2, ppo_epochs=2),
    "ppo-value-model": dict(algorithm="ppo", value="model"),
    "ppo-value-head": dict(algorithm="ppo", value="head"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fused_loss_gives_the_update_of_the_split_path(tmp_path, monkeypatch, case):
    calls = []
    real = update.ActorCritic._fused_policy_loss
    monkeypatch.setattr(
        update.ActorCritic, "_fused_policy_loss", lambda self, *a: calls.append(1) or real(self, *a)
    )
    _, fused, p_fused = _run(tmp_path, fused_loss=True, **CASES[case])
    assert calls, "the fused path did not run"
    n_fused = len(calls)
    _, split, p_split = _run(tmp_path, fused_loss=False, **CASES[case])
    assert len(calls) == n_fused  # the split path never calls it
    for k in p_fused:
        assert (p_fused[k] - p_split[k]).abs().max() <= 1e-6, k
    init = dict(tiny_llama().named_parameters())
    assert max((p_fused["policy." + k] - v).abs().max() for k, v in init.items()) > 1e-4  # it learned
    for a, b in zip(fused, split):
        for key in ("policy_loss", "clip_frac", "kl", "value_loss"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-6 * max(1.0, abs(b[key])), (key, a[key], b[key])


def test_value_head_reads_the_policy_trunk_once_and_trains(tmp_path, monkeypatch):
    """One backbone pass per micro-batch serves log-probs and values (a ValueModel runs its own trunk);
    the naive mode on the same ValueHead gives the same update; with LoRA and no value model the trainer
    builds a ValueHead itself, so no second trunk is held."""
    from rlaif_fast.ops import model as model_ops

    passes = []
    real = model_ops.backbone_hidden
    monkeypatch.setattr(model_ops, "backbone_hidden", lambda *a, **k: passes.append(1) or real(*a, **k))
    trainer, metrics, fast = _run(tmp_path, algorithm="ppo", value="head", steps=1, kl_coef=0.0)
    n_micro = 4 // 2
    # scoring (one pass) + the update (one pass) per micro-batch (no KL: no reference pass); the values
    # come from those passes' hidden states
    assert len(passes) == 2 * n_micro, len(passes)
    assert metrics[0]["value_loss"] > 0
    head = trainer.engine.module.value.head.weight
    assert head.abs().max() > 0  # started at zero, moved by the value loss

    _, _, naive = _run(tmp_path, algorithm="ppo", value="head", steps=1, kl_coef=0.0, ops=NAIVE)
    for k in fast:
        assert (fast[k] - naive[k]).abs().max() <= 1e-5, k

    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    trainer, metrics, params = _run(tmp_path, algorithm="ppo", steps=1, lora=lora)
    assert isinstance(trainer.engine.module.value, ValueHead)
    n_policy = sum(p.numel() for p in trainer.policy.parameters())
    n_all = sum(p.numel() for p in trainer.engine.module.parameters())
    assert n_all == n_policy + trainer.engine.module.value.head.weight.numel() + 1  # the head alone
    assert metrics[0]["value_loss"] > 0
