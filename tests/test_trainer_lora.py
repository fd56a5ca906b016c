"""LoRA through peft in the trainer: only the adapters (and the value model) train, the KL reference
is the base model (adapters off, no copy), and saved adapters / merged weights give the same outputs."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
from toy import PROMPTS, CharTokenizer, count_a, tiny_gpt2, tiny_llama  # noqa: E402

from rlaif_fast.trainer import RLAIFConfig, RLAIFTrainer, ValueModel  # noqa: E402
from rlaif_fast.trainer.batches import micro_batches  # noqa: E402
from rlaif_fast.trainer.sampling import Rollouts  # noqa: E402
from rlaif_fast.trainer.scoring import response_logprobs  # noqa: E402

pytestmark = pytest.mark.slow
LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]}


def _config(tmp_path, **kw):
    values = dict(
        algorithm="ppo", batch_size=4, micro_batch_size=2, max_new_tokens=4, learning_rate=1e-2,
        kl_coef=0.1, lora=LORA, progress=False, tensorboard=False, output_dir=str(tmp_path / "run"),
    )  # fmt: skip
    values.update(kw)
    return RLAIFConfig(**values)


def _trainer(cfg, policy=None):
    policy = policy if policy is not None else tiny_llama()
    value = ValueModel.from_policy(policy) if cfg.uses_critic else None
    return RLAIFTrainer(policy, CharTokenizer(), count_a, cfg, value_model=value)


def test_only_adapters_and_value_model_train_and_the_reference_is_the_base(tmp_path):
    base = tiny_llama()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    trainer = _trainer(_config(tmp_path), tiny_llama())
    assert trainer.ref is None and trainer.lora_reference  # no reference copy in memory
    model = trainer.engine.module
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    for i in range(2):
        trainer.step(PROMPTS[i * 4 : (i + 1) * 4])
    after = dict(model.named_parameters())
    changed = {k for k, v in before.items() if not torch.equal(v, after[k].detach())}
    lora = {k for k in before if ".lora_" in k}
    value = {k for k in before if k.startswith("value.")}
    assert lora and changed == lora | value, sorted(changed ^ (lora | value))[:5]
    # the reference log-probs (adapters off) are the untouched base model's
    r = Rollouts(["p"] * 2, ["c"] * 2, [[1, 3, 4], [1, 5]], [[3, 3, 2], [4, 6]])
    (b,) = micro_batches(r, [0, 1], 2, 0, fast=True, batch_width=5, packed=True)
    with torch.no_grad():
        ref = model(b, 0.9, reference=True)
        base.load_state_dict(base_state)
        want, _ = response_logprobs(base, b, temperature=0.9, fast=True)
        tuned, _, _ = model(b, 0.9)
    assert (ref - want).abs().max() <= 1e-6
    assert (tuned - want).abs().max() > 1e-4  # the adapters did move the policy


def test_save_and_load_adapters_and_merged_weights_give_the_same_outputs(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trainer = _trainer(_config(tmp_path, algorithm="grpo", group_size=2, kl_in="loss", kl_estimator="k3"))
    trainer.step(PROMPTS[:2])
    policy = trainer.policy
    ids = torch.tensor([[1, 3, 4, 5, 6]])
    with torch.no_grad():
        want = policy(input_ids=ids).logits
    trainer.save(tmp_path / "adapters")
    trainer.save(tmp_path / "merged", merged=True)
    assert (tmp_path / "adapters" / "adapter_config.json").is_file()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapters")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any(".lora_" in k for k in merged.state_dict())
    with torch.no_grad():
        got_adapters = loaded(input_ids=ids).logits
        got_merged = merged(input_ids=ids).logits
        base = tiny_llama()(input_ids=ids).logits
    assert (want - base).abs().max() > 1e-4  # the step changed the outputs: the checks below can fail
    assert (got_adapters - want).abs().max() <= 1e-5
    assert (got_merged - want).abs().max() <= 1e-5


def test_bad_lora_settings_fail_naming_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"lora\['r'\]"):
        RLAIFConfig(lora={"alpha": 8})
    with pytest.raises(ValueError, match="lora has unknown keys"):
        RLAIFConfig(lora={"r": 4, "rank": 4})
    with pytest.raises(ValueError, match=r"lora\['target_modules'\]"):
        RLAIFConfig(lora={"r": 4, "target_modules": "q_proj"})
    cfg = _config(tmp_path, lora={"r": 4, "target_modules": ["q_proj", "qkv"]})
    with pytest.raises(ValueError, match=r"lora\['target_modules'\] names \['qkv'\]"):
        _trainer(cfg)


def test_lora_kill_and_resume_matches_an_uninterrupted_run(tmp_path):
    """PPO with LoRA and the value head on the adapted trunk: 2 steps, a Ctrl-C, a restart from the base
    model with resume=True, 2 more steps == 4 uninterrupted steps (metrics, adapters, value head)."""
    kw = dict(total_steps=4, save_every=0)
    full = _trainer(_config(tmp_path / "a", **kw))
    want = full.train(PROMPTS)["history"]

    def kill_after_two(step, metrics):
        if step == 2:
            raise KeyboardInterrupt

    first = _trainer(_config(tmp_path / "b", **kw))
    assert first.train(PROMPTS, callback=kill_after_two)["stopped"] == "interrupted"
    # the checkpoint holds the adapters and the value head (and their optimizer state), not the frozen base
    saved = torch.load(
        tmp_path / "b/run/checkpoints/step_000002/state/mp_rank_00_model_states.pt", weights_only=False
    )["module"]
    assert saved and all(".lora_" in k or k.startswith("value.") for k in saved), sorted(saved)[:5]
    with pytest.raises(ValueError, match="frozen weights .* are not the ones this run was trained on"):
        _trainer(_config(tmp_path / "b", resume=True, **kw), tiny_llama(seed=1))  # another base model
    resumed = _trainer(_config(tmp_path / "b", resume=True, **kw))
    assert resumed.global_step == 2
    got = resumed.train(PROMPTS)["history"]
    assert [h["step"] for h in got] == [3, 4]
    for w, g in zip(want[2:], got):
        for k in ("reward", "kl", "entropy", "response_len", "policy_loss", "value_loss"):
            assert g[k] == pytest.approx(w[k], rel=1e-6, abs=1e-6), (k, w["step"])
    a = dict(full.engine.module.named_parameters())
    b = dict(resumed.engine.module.named_parameters())
    trained = [k for k, p in a.items() if p.requires_grad]
    assert any(".lora_" in k for k in trained) and any(k.startswith("value.") for k in trained)
    start = dict(first.engine.module.named_parameters())  # after step 2: the last two steps moved them
    assert max((a[k] - start[k]).abs().max().item() for k in trained) > 1e-4
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_merged_weights_of_conv1d_adapters_are_the_adapted_model_and_leave_it_untouched():
    """GPT-2's Conv1D layers (fan_in_fan_out): merged_named_weights (what a vLLM sync streams) and
    merged_state_dict (what save(merged=True) writes) both give a plain model with the adapted outputs,
    under the plain model's names, and neither changes the peft model."""
    from rlaif_fast.trainer.lora import apply_lora, merged_named_weights, merged_state_dict

    model = apply_lora(tiny_gpt2(), {"r": 4, "alpha": 8, "target_modules": ["c_attn", "c_fc"]})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:  # B = 0 at init: give the adapters an effect
                p.normal_(0.0, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    streamed, state = dict(merged_named_weights(model)), merged_state_dict(model)
    plain = tiny_gpt2(seed=1)
    assert sorted(streamed) == sorted(k for k, _ in plain.named_parameters())
    assert all(torch.equal(streamed[k], state[k]) for k in streamed)
    plain.load_state_dict(state)
    ids = torch.tensor([[1, 3, 4, 5, 6, 7]])
    with torch.no_grad():
        want, got = model(input_ids=ids).logits, plain(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    assert (want - base).abs().max() > 1e-2  # the adapters matter, so the check below can fail
    assert (got - want).abs().max() <= 1e-5
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
