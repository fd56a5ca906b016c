"""The trainer in one process: learning, invariance to micro-batching, kill-and-resume, non-finite
stops, the CLI end to end, and the real stories260K model. Tiny models; a few seconds per test."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
from toy import PROMPTS, CharTokenizer, count_a, hf_char_tokenizer, invariance_run, tiny_gpt2, tiny_llama  # noqa: E402

from rlaif_fast.trainer import NonFiniteError, RLAIFConfig, RLAIFTrainer, ValueModel  # noqa: E402

pytestmark = pytest.mark.slow


def _config(tmp_path, **kw):
    values = dict(
        batch_size=8,
        micro_batch_size=4,
        max_new_tokens=8,
        learning_rate=1e-2,
        progress=False,
        tensorboard=False,
        output_dir=str(tmp_path / "run"),
    )
    values.update(kw)
    return RLAIFConfig(**values)


def _trainer(policy, cfg, reward=count_a, tokenizer=None):
    value_model = ValueModel.from_policy(policy) if cfg.uses_critic else None
    return RLAIFTrainer(policy, tokenizer or CharTokenizer(), reward, cfg, value_model=value_model)


def test_every_policy_parameter_changes(tmp_path):
    """PPO on a tiny Llama (the critic-free path on the real stories260K is the last test)."""
    policy = tiny_llama()
    before = {k: v.detach().clone() for k, v in policy.named_parameters()}
    cfg = _config(tmp_path, algorithm="ppo", learning_rate=1e-3)
    trainer = _trainer(policy, cfg)
    for i in range(2):
        trainer.step(PROMPTS[i * cfg.prompts_per_step : (i + 1) * cfg.prompts_per_step])
    after = dict(trainer.policy.named_parameters())
    unchanged = [k for k, v in before.items() if torch.equal(v, after[k].detach())]
    assert not unchanged, f"parameters that did not change: {unchanged}"


@pytest.mark.parametrize(
    "variant",
    [
        dict(algorithm="grpo", group_size=4, kl_in="loss", kl_estimator="k3", entropy_coef=0.01),
        dict(algorithm="reinforce_baseline", kl_in="loss", kl_estimator="k3", loss_agg="seq-mean-token-mean"),
        dict(
            algorithm="ppo", adaptive_kl=True, kl_target=0.01, kl_horizon=100, ppo_epochs=2, mini_batch_size=4
        ),
        dict(algorithm="rloo", group_size=2, loss_agg="seq-mean-token-sum", ops="naive"),
    ],
)
def test_algorithm_variants_take_finite_steps(tmp_path, variant):
    trainer = _trainer(tiny_gpt2(), _config(tmp_path, **variant))
    first = trainer.step(PROMPTS[: trainer.config.prompts_per_step])
    second = trainer.step(PROMPTS[: trainer.config.prompts_per_step])
    for m in (first, second):
        assert all(v == v and abs(v) < 1e6 for v in m.values()), m
    if variant.get("adaptive_kl"):  # the coefficient moves towards the target: up above it, down below
        coefs = [first["kl_coef"], second["kl_coef"], trainer.kl_coef]
        for m, before, after in zip((first, second), coefs, coefs[1:]):
            assert (after - before) * (m["kl"] - trainer.config.kl_target) > 0, (m["kl"], coefs)


def test_reward_goes_up_on_the_toy_task(tmp_path):
    """REINFORCE with baseline (the paper's) learns to write 'a' for the rule reward."""
    cfg = _config(tmp_path, total_steps=8)
    summary = _trainer(tiny_gpt2(), cfg).train(PROMPTS)
    rewards = [h["reward"] for h in summary["history"]]
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2 + 0.1, rewards
    assert summary["stopped"] == "completed"
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 9))
    assert (tmp_path / "run" / "final" / "config.json").is_file()  # save_pretrained
    assert (tmp_path / "run" / "metrics.png").stat().st_size > 0


@pytest.mark.parametrize("algorithm", ["ppo", "reinforce_baseline"])
def test_grad_accumulation_1x8_equals_8x1(algorithm):
    """Plain SGD (Adam would hide a gradient of the wrong scale): one micro-batch of 8 or 8 of 1."""
    kw = dict(algorithm=algorithm, mini_batch_size=8, ppo_epochs=1, zero_stage=0)
    big, _ = invariance_run(steps=1, micro_batch_size=8, **kw)
    small, _ = invariance_run(steps=1, micro_batch_size=1, **kw)
    init = tiny_gpt2().state_dict()
    step = max(
        (big[k] - init[k[len("policy.") :]]).abs().max().item() for k in big if k.startswith("policy.")
    )
    diff = max((big[k] - small[k]).abs().max().item() for k in big)
    assert step > 1e-3  # the update is real
    assert diff <= 1e-5 * step, f"1x8 vs 8x1 differ by {diff:.3e} (update size {step:.3e})"


def test_token_budget_micro_batches_equal_fixed_size(monkeypatch):
    """Micro-batches cut to a padded-token budget (a varying count per mini-batch, the accumulation
    boundary set by the trainer) give the fixed-size update; clip_frac / approx_kl are token-weighted,
    so they do not depend on the split either (a mean of per-micro-batch means would)."""
    from rlaif_fast.trainer import batches

    counts = []
    real = batches.token_micro_batches

    def counting(*args, **kwargs):
        out = real(*args, **kwargs)
        counts.append(len(out))
        return out

    monkeypatch.setattr(batches, "token_micro_batches", counting)  # what the trainer's BatchLayout calls
    # rollouts of 3 prompt + 1..6 response tokens; fixed: one micro-batch of 8, budget: several
    kw = dict(steps=1, zero_stage=0, max_prompt_len=4, mini_batch_size=8, micro_batch_size=8)
    fixed, fixed_hist = invariance_run(**kw)
    budget, budget_hist = invariance_run(max_tokens_per_microbatch=12, **kw)
    assert min(counts) > 1, counts
    init = tiny_gpt2().state_dict()
    step = max(
        (fixed[k] - init[k[len("policy.") :]]).abs().max().item() for k in fixed if k.startswith("policy.")
    )
    diff = max((fixed[k] - budget[k]).abs().max().item() for k in fixed)
    assert step > 1e-3
    assert diff <= 1e-5 * step, (
        f"token-budget vs fixed micro-batches differ by {diff:.3e} (update {step:.3e})"
    )
    assert budget_hist[-1]["approx_kl"] > 1e-6  # the second epoch moved off-policy: the ratios are real
    for want, got in zip(fixed_hist, budget_hist):
        for key in ("policy_loss", "value_loss", "clip_frac", "approx_kl"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key


def test_kill_and_resume_matches_an_uninterrupted_run(tmp_path):
    full = _trainer(tiny_gpt2(), _config(tmp_path / "a", total_steps=4)).train(PROMPTS)["history"]

    def kill_after_two(step, metrics):
        if step == 2:
            raise KeyboardInterrupt  # what Ctrl-C does mid-run

    cfg = _config(tmp_path / "b", total_steps=4)
    first = _trainer(tiny_gpt2(), cfg).train(PROMPTS, callback=kill_after_two)
    assert first["stopped"] == "interrupted"
    ckpt = tmp_path / "b" / "run" / "checkpoints"
    assert (ckpt / "latest").read_text() == "step_000002"
    assert not list(ckpt.glob("*.tmp"))  # the atomic rename happened
    # as a restarted `rlaif-fast train --resume` would: the SFT policy again (it is also the KL reference),
    # then weights, optimizer, step, RNG from the checkpoint. Had they not loaded, step 3 would differ.
    resumed = _trainer(tiny_gpt2(), _config(tmp_path / "b", total_steps=4, resume=True)).train(PROMPTS)
    keys = ("reward", "kl", "entropy", "response_len", "policy_loss", "value_loss")
    for want, got in zip(full[2:], resumed["history"]):
        assert got["step"] == want["step"]
        for k in keys:
            assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-7), (k, want["step"])


def test_non_finite_reward_stops_with_the_batch_saved(tmp_path):
    def bad_reward(prompts, completions):
        return [float("nan")] + [1.0] * (len(completions) - 1)

    trainer = _trainer(tiny_gpt2(), _config(tmp_path, algorithm="rloo", group_size=2), reward=bad_reward)
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    with pytest.raises(NonFiniteError, match=r"step 0: 1 non-finite rewards.*step_000000_rank0\.pt"):
        trainer.train(PROMPTS)
    saved = torch.load(tmp_path / "run" / "nonfinite" / "step_000000_rank0.pt", weights_only=False)
    assert len(saved["completions"]) == 8 and torch.isnan(saved["scores"][0])
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters()))


def test_non_finite_loss_stops_before_the_update(tmp_path):
    policy = tiny_gpt2()
    trainer = _trainer(policy, _config(tmp_path, algorithm="ppo"))
    with torch.no_grad():
        trainer.engine.module.value.head.bias.fill_(float("inf"))  # values inf -> advantages NaN
    with pytest.raises(NonFiniteError, match="step 0: non-finite loss"):
        trainer.step(PROMPTS[:8])
    assert (tmp_path / "run" / "nonfinite" / "step_000000_rank0.pt").is_file()


def test_cli_train_end_to_end(tmp_path):
    from rlaif_fast.cli import main

    policy_dir = tmp_path / "policy"
    tiny_gpt2(vocab=14).save_pretrained(policy_dir)
    hf_char_tokenizer().save_pretrained(policy_dir)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:8]))
    yaml_cfg = tmp_path / "run.yaml"
    yaml_cfg.write_text("rl:\n  algorithm: rloo\n  group_size: 2\n  batch_size: 4\n  max_new_tokens: 4\n")
    out = tmp_path / "out"
    toy = Path(__file__).resolve().parent / "dist" / "toy.py"
    rc = main(
        [
            "train",
            "--policy",
            str(policy_dir),
            "--prompts",
            str(prompts),
            "--reward",
            f"{toy}:count_a",
            "--config",
            str(yaml_cfg),
            "--config-section",
            "rl",
            "--micro-batch-size",
            "2",
            "--output-dir",
            str(out),
            "--no-progress",
            "--tensorboard",
            "--learning-rate",
            "1e-3",
        ]
    )
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["stopped"] == "completed"  # 8 prompts / 2 per step
    assert (out / "final" / "model.safetensors").is_file()
    assert list((out / "tensorboard").iterdir())
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "final")  # the saved policy loads back


def test_stories260k_real_model_trains(shared_data, tmp_path):
    from rlaif_fast.models.llama2c import Llama2cTokenizer, load_llama2c

    folder = shared_data / "stories260K"
    policy = load_llama2c(folder / "stories260K.bin").train()
    tokenizer = Llama2cTokenizer(folder / "tok512.bin")
    before = {k: v.detach().clone() for k, v in policy.named_parameters()}
    cfg = _config(
        tmp_path, algorithm="rloo", group_size=4, batch_size=8, max_new_tokens=12, learning_rate=1e-3
    )
    trainer = RLAIFTrainer(policy, tokenizer, lambda p, c: [x.count("a") / max(len(x), 1) for x in c], cfg)
    metrics = trainer.step(["Once upon a time", "The cat"])
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values() if isinstance(v, float))
    after = dict(trainer.policy.named_parameters())
    unchanged = [k for k, v in before.items() if torch.equal(v, after[k].detach())]
    assert not unchanged, f"parameters that did not change: {unchanged}"


@pytest.mark.parametrize("disable", [True, False])
def test_dropout_is_disabled_by_default(tmp_path, disable):
    """With dropout on, two forwards of the same batch differ and the PPO ratio of an unchanged policy
    is not 1; the trainer zeroes every dropout rate unless told not to."""
    policy = tiny_gpt2()
    for m in policy.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.5
    trainer = _trainer(policy, _config(tmp_path, algorithm="rloo", group_size=2, disable_dropout=disable))
    model = trainer.policy.train()
    ids = torch.randint(3, 16, (2, 12))
    same = torch.equal(model(ids).logits, model(ids).logits)
    assert same is disable


def test_cli_reward_loads_a_train_rm_directory(tmp_path):
    """`rlaif-fast train --reward DIR` takes the output of `rlaif-fast train-rm` as the reward."""
    from transformers import GPT2Config, GPT2Model

    from rlaif_fast.reward import RewardModel, RewardModelScorer
    from rlaif_fast.trainer.cli import load_callable

    backbone = GPT2Model(GPT2Config(vocab_size=40, n_positions=32, n_embd=16, n_layer=1, n_head=2))
    RewardModel(backbone).save_pretrained(tmp_path / "rm")
    hf_char_tokenizer().save_pretrained(str(tmp_path / "rm"))
    scorer = load_callable(str(tmp_path / "rm"))
    assert isinstance(scorer, RewardModelScorer)
    scores = scorer(["ab", "b"], ["aaa", "c"])
    assert len(scores) == 2 and all(isinstance(x, float) for x in scores)
    with pytest.raises(ValueError, match="without reward_head.pt"):
        load_callable(str(tmp_path))
    # the model goes where it is told (the CLI passes nothing: this rank's GPU when there is one)
    on_meta = load_callable(str(tmp_path / "rm"), device="meta")
    assert {p.device.type for p in on_meta.model.parameters()} == {"meta"} and not on_meta.model.training


def test_ctrl_c_mid_step_finishes_the_step_then_resumes_exactly(tmp_path):
    """A real SIGINT in the middle of step 3 (while its rewards are computed): the step completes, the
    checkpoint is step 3, and the resumed run matches an uninterrupted one from step 4 on."""
    import os
    import signal

    full = _trainer(tiny_gpt2(), _config(tmp_path / "a", total_steps=5)).train(PROMPTS)["history"]
    calls = {"n": 0}

    def reward_with_ctrl_c(prompts, completions):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return count_a(prompts, completions)

    first = _trainer(tiny_gpt2(), _config(tmp_path / "b", total_steps=5), reward=reward_with_ctrl_c)
    summary = first.train(PROMPTS)
    assert summary["stopped"] == "interrupted"
    assert (tmp_path / "b" / "run" / "checkpoints" / "latest").read_text() == "step_000003"
    resumed = _trainer(tiny_gpt2(), _config(tmp_path / "b", total_steps=5, resume=True)).train(PROMPTS)
    assert [h["step"] for h in resumed["history"]] == [4, 5]
    for want, got in zip(full[3:], resumed["history"]):
        for k in ("reward", "kl", "entropy", "policy_loss"):
            assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-7), (k, want["step"])


def test_trainer_on_the_triton_kernels_equals_reference_ops(monkeypatch):
    """What a GPU runs: the trainer's fast ops on the Triton kernels (here through the interpreter) give
    the update of plain-torch reference ops (full logits, Python-loop GAE) on the same rollouts."""
    import importlib

    launched = {}
    for module, names in {
        "rlaif_fast.kernels.linear_logprobs": ["linear_logprobs_fwd", "linear_logprobs_bwd"],
        "rlaif_fast.ops.linear_gemm": ["linear_logprobs_fwd_gemm", "linear_logprobs_bwd_gemm"],
        "rlaif_fast.kernels.kl": ["shaped_rewards"],
        "rlaif_fast.kernels.advantages": ["gae"],
    }.items():
        mod = importlib.import_module(module)
        for name in names:
            real = getattr(mod, name)

            def counted(*args, _real=real, _name=name, **kwargs):
                launched[_name] = launched.get(_name, 0) + 1
                return _real(*args, **kwargs)

            monkeypatch.setattr(mod, name, counted)

    kw = dict(steps=1, zero_stage=0, kl_in="loss", kl_estimator="k3", entropy_coef=0.01)
    monkeypatch.setenv("RLAIF_FAST_BACKEND", "reference")
    want, want_hist = invariance_run(ops="naive", **kw)
    assert not launched
    monkeypatch.setenv("RLAIF_FAST_BACKEND", "triton")
    got, got_hist = invariance_run(ops="fast", **kw)
    assert launched.get("gae") and launched.get("shaped_rewards"), launched
    assert sum(v for k, v in launched.items() if k.startswith("linear_logprobs_fwd")) >= 2, launched
    assert sum(v for k, v in launched.items() if k.startswith("linear_logprobs_bwd")) >= 1, launched
    init = tiny_gpt2().state_dict()
    step = max(
        (want[k] - init[k[len("policy.") :]]).abs().max().item() for k in want if k.startswith("policy.")
    )
    diff = max((want[k] - got[k]).abs().max().item() for k in want)
    assert step > 1e-3
    assert diff <= 1e-5 * step, f"Triton vs reference ops differ by {diff:.3e} (update {step:.3e})"
    for key in ("policy_loss", "value_loss", "clip_frac", "approx_kl", "entropy"):
        assert got_hist[0][key] == pytest.approx(want_hist[0][key], rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_bf16_reference_matches_the_policy_dtype(zero_stage):
    """bf16=true: the KL reference computes in the policy's dtype (KL exactly 0 before the first
    update; it was fp32 beside a bf16 policy below ZeRO-3), and the update stays close to fp32's."""
    kw = dict(steps=1, zero_stage=zero_stage, ops="fast")
    f32, _ = invariance_run(bf16="false", **kw)
    b16, hist = invariance_run(bf16="true", **kw)
    assert hist[0]["kl"] == 0.0, hist[0]
    assert all(
        v.dtype == torch.bfloat16 for k, v in b16.items() if k.startswith("policy.") and v.is_floating_point()
    )
    init = tiny_gpt2().state_dict()
    step = max(
        (f32[k] - init[k[len("policy.") :]]).abs().max().item() for k in f32 if k.startswith("policy.")
    )
    diff = max((f32[k] - b16[k].float()).abs().max().item() for k in f32)
    assert step > 1e-2 and diff < 0.1 * step, (diff, step)


# -------------------- bf16 references, Ctrl-C, resume, progress, external rollouts


def _fresh_trainer(cfg, reward=count_a):
    policy = tiny_gpt2()
    value_model = ValueModel.from_policy(policy) if cfg.uses_critic else None
    return RLAIFTrainer(policy, CharTokenizer(), reward, cfg, value_model=value_model)


def _steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_bf16_from_the_deepspeed_json_also_casts_the_reference(tmp_path):
    """The user's DeepSpeed JSON wins over bf16=: when it turns bf16 on, the reference must compute in bf16
    like the policy, or the KL of an unchanged policy is not 0 at the first step."""
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"bf16": {"enabled": True}}))
    params, history = invariance_run(steps=1, zero_stage=0, bf16="false", deepspeed_config=str(ds))
    assert all(v.dtype == torch.bfloat16 for k, v in params.items() if k.startswith("policy."))
    assert history[0]["kl"] == 0.0, history[0]


@pytest.mark.slow
def test_second_ctrl_c_mid_step_does_not_overwrite_the_checkpoint(tmp_path):
    """A KeyboardInterrupt raised inside a step (the second Ctrl-C interrupts at once) leaves the weights
    between two steps: it must not be saved as the checkpoint of the last finished step."""
    kw = dict(total_steps=4, save_every=1, mini_batch_size=4)
    full = _fresh_trainer(_config(tmp_path / "a", **kw)).train(PROMPTS)["history"]

    trainer = _fresh_trainer(_config(tmp_path / "b", **kw))
    real_step, calls = trainer.strategy.step, {"n": 0}

    def step_then_interrupt():
        calls["n"] += 1
        if calls["n"] == 6:  # step 3 has 2 optimizer steps: the first (call 5) already moved the weights
            raise KeyboardInterrupt
        real_step()

    trainer.strategy.step = step_then_interrupt
    assert trainer.train(PROMPTS)["stopped"] == "interrupted"
    assert (tmp_path / "b" / "run" / "checkpoints" / "latest").read_text() == "step_000002"
    resumed = _fresh_trainer(_config(tmp_path / "b", resume=True, **kw)).train(PROMPTS)["history"]
    assert [h["step"] for h in resumed] == [3, 4]
    for want, got in zip(full[2:], resumed):
        for k in ("reward", "kl", "policy_loss", "value_loss"):
            assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-7), (k, want["step"])


@pytest.mark.slow
def test_last_step_is_not_saved_twice(tmp_path, monkeypatch):
    """total_steps a multiple of save_every: the final checkpoint was just written by the periodic save.
    Writing it again deletes the folder ``latest`` names first, so a kill then leaves no checkpoint."""
    from rlaif_fast.trainer import checkpoint as ckpt

    saves = []
    real = ckpt.save_checkpoint
    monkeypatch.setattr(
        ckpt, "save_checkpoint", lambda s, o, step, *a: saves.append(step) or real(s, o, step, *a)
    )
    _fresh_trainer(_config(tmp_path, total_steps=2, save_every=2)).train(PROMPTS)
    assert saves == [2]
    assert ckpt.latest_checkpoint(tmp_path / "run") is not None


@pytest.mark.slow
def test_resume_after_a_crash_does_not_repeat_metrics(tmp_path):
    """A crash (not Ctrl-C) after step 3 with the checkpoint at step 2: the resumed run redoes step 3, and
    metrics.jsonl must hold each step once (the one of the run that the checkpoint continues)."""

    def crash_at_three(step, metrics):
        if step == 3:
            raise RuntimeError("node lost")

    kw = dict(total_steps=4, save_every=2, tensorboard=True)
    with pytest.raises(RuntimeError, match="node lost"):
        _fresh_trainer(_config(tmp_path, **kw)).train(PROMPTS, callback=crash_at_three)
    assert _steps(tmp_path / "run" / "metrics.jsonl") == [1, 2, 3]
    _fresh_trainer(_config(tmp_path, resume=True, **kw)).train(PROMPTS)
    assert _steps(tmp_path / "run" / "metrics.jsonl") == [1, 2, 3, 4]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("reward")] == [1, 2, 3, 4]


def test_progress_bar_counts_steps_not_log_lines(tmp_path):
    from rlaif_fast.trainer.logging import MetricsLogger

    logger = MetricsLogger(tmp_path, enabled=True, tensorboard=False, progress=True, total=4, initial=0)
    for step in (2, 4):  # log_every=2
        logger.log(step, {"reward": 1.0})
    assert logger._bar.n == 4
    logger.close()


def test_update_stats_reduce_has_the_same_length_on_a_rank_with_only_empty_micro_batches():
    """A rank whose share of a mini-batch has no response token runs only empty micro-batches: its stats
    all-reduce must still carry the same keys as the other ranks' (a shorter tensor hangs or fails)."""
    from rlaif_fast.trainer.batches import ScoredBatch, train_batch
    from rlaif_fast.trainer.sampling import Rollouts
    from rlaif_fast.trainer.scoring import rl_ops
    from rlaif_fast.trainer.update import ActorCritic, empty_like, run_update

    cfg = RLAIFConfig(algorithm="ppo", batch_size=2, micro_batch_size=1, progress=False, tensorboard=False)
    policy = tiny_gpt2()
    model = ActorCritic(policy, ValueModel.from_policy(policy))
    rollouts = Rollouts(["ab"] * 2, ["a"] * 2, [[1, 3, 4]] * 2, [[3, 2]] * 2)
    real = train_batch(rollouts, [0], 0, fast=True, batch_width=5)
    data = ScoredBatch(
        **{k: torch.zeros(2, 2) for k in ("mask", "old_logp", "advantages", "returns", "old_values", "kl")}
    )

    class OneOfTwoRanks:
        world_size, grad_accum, rank = 2, 1, 0
        reduced = []

        def all_reduce(self, t, op="sum"):
            self.reduced.append(t.numel())
            return t

        set_boundary = backward = lambda self, *a: None
        step = lambda self: None  # noqa: E731

    sizes = []
    for batches in ([[real]], [[empty_like(real)]]):
        strategy = OneOfTwoRanks()
        strategy.reduced = []
        run_update(cfg, strategy, model, batches, data, 0.0, ops=rl_ops("fast"))
        sizes.append(strategy.reduced)
    assert sizes[0] == sizes[1], sizes


def test_learn_checks_external_rollouts_before_any_compute(tmp_path):
    """learn() on rollouts sampled elsewhere: empty prompts/responses and caller-given scores of the wrong
    length or non-finite fail with the rollout named, before any forward pass."""
    from rlaif_fast.trainer import NonFiniteError
    from rlaif_fast.trainer.sampling import Rollouts

    trainer = _fresh_trainer(_config(tmp_path))
    n = trainer.per_rank["batch"]

    def rollouts(responses, scores=None):
        return Rollouts(["p"] * n, ["c"] * n, [[1, 3, 4]] * n, responses, scores=scores)

    good = [[5, 6]] * n
    with pytest.raises(ValueError, match="rollout 2 has an empty response"):
        trainer.learn(rollouts(good[:2] + [[]] + good[3:]))
    with pytest.raises(ValueError, match="rollout 0 has an empty prompt"):
        trainer.learn(Rollouts(["p"] * n, ["c"] * n, [[]] + [[1]] * (n - 1), good))
    with pytest.raises(ValueError, match=f"rollouts.scores gave 3 scores for {n} completions"):
        trainer.learn(rollouts(good, scores=torch.zeros(3)))
    with pytest.raises(NonFiniteError, match="1 non-finite rewards"):
        trainer.learn(rollouts(good, scores=torch.tensor([0.0] * (n - 1) + [float("nan")])))
    metrics = trainer.learn(rollouts(good, scores=[1.0] * n))  # a plain list works
    assert metrics["reward"] == pytest.approx(1.0)


# -------------------- fast mode never falls back to the naive path


def test_fast_mode_fails_loudly_instead_of_running_the_naive_path(monkeypatch):
    # rl_ops and the batch padding caught ImportError/AttributeError and ran the naive math / Python
    # loop instead, while the run said ops="fast"
    import types

    from rlaif_fast.reference import rl as ref_rl
    from rlaif_fast.trainer import batches, scoring

    monkeypatch.setitem(sys.modules, "rlaif_fast.ops", types.ModuleType("rlaif_fast.ops"))
    with pytest.raises(
        ImportError, match=r"rlaif_fast\.ops\.kl_penalty is missing, so ops='fast' cannot run"
    ):
        scoring.rl_ops("fast")
    assert scoring.rl_ops("naive").gae is ref_rl.gae
    monkeypatch.setitem(sys.modules, "rlaif_fast.batching", None)
    with pytest.raises(ImportError):
        batches._pad_right([[1, 2]], [[3]], 0, 4, fast=True)
    ids, attn, _ = batches._pad_right([[1, 2]], [[3]], 0, 4, fast=False)  # the naive mode needs neither
    assert ids.tolist() == [[1, 2, 3, 0]] and attn.tolist() == [[1, 1, 1, 0]]


# -------------------- resuming: a moved folder, changed settings, the whole-run summary


def test_a_moved_run_resumes_and_a_changed_setting_is_refused(tmp_path):
    import shutil

    first = _trainer(tiny_gpt2(), _config(tmp_path / "a", total_steps=2)).train(PROMPTS)
    shutil.move(tmp_path / "a", tmp_path / "b")  # output_dir is where the run lives, not a setting
    with pytest.raises(ValueError, match=r"kl_coef 0\.05 -> 0\.2"):  # was: new value recorded, old one used
        _trainer(tiny_gpt2(), _config(tmp_path / "b", total_steps=3, resume=True, kl_coef=0.2))
    resumed = _trainer(tiny_gpt2(), _config(tmp_path / "b", total_steps=3, resume=True)).train(PROMPTS)
    assert [h["step"] for h in resumed["history"]] == [3]
    # the summary (summary.json of `rlaif-fast train`) covers the whole run, not the last segment
    assert resumed["reward_first"] == first["history"][0]["reward"] and resumed["resumed_at"] == 2
