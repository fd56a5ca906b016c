"""Regression tests for trainer bugs found in review; each failed before its fix."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
from test_trainer_train import _config  # noqa: E402
from toy import PROMPTS, CharTokenizer, count_a, invariance_run, tiny_gpt2  # noqa: E402

from rlaif_fast.trainer import RLAIFConfig, RLAIFTrainer, ValueModel  # noqa: E402


def _trainer(cfg, reward=count_a):
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
    full = _trainer(_config(tmp_path / "a", **kw)).train(PROMPTS)["history"]

    trainer = _trainer(_config(tmp_path / "b", **kw))
    real_step, calls = trainer.strategy.step, {"n": 0}

    def step_then_interrupt():
        calls["n"] += 1
        if calls["n"] == 6:  # step 3 has 2 optimizer steps: the first (call 5) already moved the weights
            raise KeyboardInterrupt
        real_step()

    trainer.strategy.step = step_then_interrupt
    assert trainer.train(PROMPTS)["stopped"] == "interrupted"
    assert (tmp_path / "b" / "run" / "checkpoints" / "latest").read_text() == "step_000002"
    resumed = _trainer(_config(tmp_path / "b", resume=True, **kw)).train(PROMPTS)["history"]
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
    _trainer(_config(tmp_path, total_steps=2, save_every=2)).train(PROMPTS)
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
        _trainer(_config(tmp_path, **kw)).train(PROMPTS, callback=crash_at_three)
    assert _steps(tmp_path / "run" / "metrics.jsonl") == [1, 2, 3]
    _trainer(_config(tmp_path, resume=True, **kw)).train(PROMPTS)
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


def test_yaml_batch_size_overridden_by_a_flag_keeps_the_default_mini_batch(tmp_path, monkeypatch):
    """mini_batch_size defaults to batch_size: a --batch-size flag over a YAML batch_size must not keep
    the YAML's derived mini_batch_size (a silent extra optimizer step per batch, or a divisibility error)."""
    import rlaif_fast.trainer as trainer_pkg
    from rlaif_fast.trainer import cli

    seen = {}

    class Stop(Exception):
        pass

    class FakeTrainer:
        def __init__(self, policy, tokenizer, reward, config, value_model=None):
            seen["config"] = config
            raise Stop

    monkeypatch.setattr(cli, "load_callable", lambda spec: count_a)
    monkeypatch.setattr(cli, "load_prompts", lambda path: PROMPTS)
    monkeypatch.setattr(cli, "load_policy", lambda policy, tok: (tiny_gpt2(), CharTokenizer()))
    monkeypatch.setattr(trainer_pkg, "RLAIFTrainer", FakeTrainer, raising=False)
    yaml_cfg = tmp_path / "run.yaml"
    yaml_cfg.write_text("batch_size: 4\nalgorithm: rloo\ngroup_size: 2\n")
    argv = ["--policy", "p", "--prompts", "x", "--reward", "m:f", "--config", str(yaml_cfg)]
    with pytest.raises(Stop):
        cli.main([*argv, "--batch-size", "8"])
    assert (seen["config"].batch_size, seen["config"].mini_batch_size) == (8, 8)
    with pytest.raises(Stop):  # 6 is not a multiple of the YAML-derived 4: it raised before
        cli.main([*argv, "--batch-size", "6"])
    assert seen["config"].mini_batch_size == 6


@pytest.mark.parametrize(
    "values, match",
    [
        ({"algorithm": "ppo", "clip_eps": 0.0}, r"clip_eps=0.0 must be > 0"),
        ({"algorithm": "grpo", "group_size": 2, "clip_eps": 0}, r"clip_eps=0 must be > 0"),
        ({"adaptive_kl": True, "kl_coef": 0.0}, r"adaptive_kl=True needs kl_coef > 0"),
        ({"algorithm": "reinforce_baseline", "kl_coef": 1.5}, r"kl_coef=1.5: .* inverts the reward"),
        (
            {"algorithm": "rloo", "group_size": 2, "temperature": 0.0},
            r"temperature=0 \(greedy\).*every advantage 0",
        ),
    ],
)
def test_config_rejects_values_that_fail_only_at_the_first_update(values, match):
    with pytest.raises(ValueError, match=match):
        RLAIFConfig(**values)


def test_reinforce_ignores_clip_eps_so_zero_is_accepted():
    assert RLAIFConfig(algorithm="reinforce_baseline", clip_eps=0.0).clip_eps == 0.0


def test_update_stats_reduce_has_the_same_length_on_a_rank_with_only_empty_micro_batches():
    """A rank whose share of a mini-batch has no response token runs only empty micro-batches: its stats
    all-reduce must still carry the same keys as the other ranks' (a shorter tensor hangs or fails)."""
    from rlaif_fast.trainer.generation import Rollouts, train_batch
    from rlaif_fast.trainer.update import ActorCritic, empty_like, run_update

    cfg = RLAIFConfig(algorithm="ppo", batch_size=2, micro_batch_size=1, progress=False, tensorboard=False)
    policy = tiny_gpt2()
    model = ActorCritic(policy, ValueModel.from_policy(policy))
    rollouts = Rollouts(["ab"] * 2, ["a"] * 2, [[1, 3, 4]] * 2, [[3, 2]] * 2)
    real = train_batch(rollouts, [0], 0, fast=True, batch_width=5)
    data = {k: torch.zeros(2, 2) for k in ("old_logp", "advantages", "returns", "old_values", "kl")}

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
        run_update(cfg, strategy, model, batches, data, 0.0)
        sizes.append(strategy.reduced)
    assert sizes[0] == sizes[1], sizes


def test_learn_checks_external_rollouts_before_any_compute(tmp_path):
    """learn() on rollouts sampled elsewhere: empty prompts/responses and caller-given scores of the wrong
    length or non-finite fail with the rollout named, before any forward pass."""
    from rlaif_fast.trainer import NonFiniteError
    from rlaif_fast.trainer.generation import Rollouts

    trainer = _trainer(_config(tmp_path))
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
