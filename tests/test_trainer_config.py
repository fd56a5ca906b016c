"""RLAIFConfig validation and the trainer's input checks: every bad input raises before any compute."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
from toy import PROMPTS, CharTokenizer, count_a, tiny_gpt2  # noqa: E402

from rlaif_fast.trainer import RLAIFConfig, RLAIFTrainer, ValueModel  # noqa: E402


def test_defaults_follow_the_paper():
    cfg = RLAIFConfig()
    assert (cfg.algorithm, cfg.kl_coef, cfg.temperature, cfg.gamma) == ("reinforce_baseline", 0.05, 0.9, 1.0)
    assert cfg.mini_batch_size == cfg.batch_size


@pytest.mark.parametrize(
    "values, match",
    [
        ({"algorithm": "dpo"}, "algorithm='dpo'"),
        ({"batch_size": 6, "group_size": 4}, "group_size=4 does not divide batch_size=6"),
        ({"algorithm": "grpo", "group_size": 1}, "needs group_size >= 2"),
        ({"mini_batch_size": 3}, "mini_batch_size=3 must divide batch_size=8"),
        ({"kl_in": "loss", "kl_estimator": "k1"}, "zero expected gradient"),
        ({"zero_stage": 4}, "zero_stage=4"),
        ({"top_p": 0.0}, "top_p=0.0"),
        ({"learning_rate": float("nan")}, "learning_rate=nan"),
        ({"micro_batch_size": 0}, "micro_batch_size=0"),
        ({"bf16": "maybe"}, "bf16='maybe'"),
        ({"deepspeed_config": "/no/such.json"}, "is not a file"),
        ({"max_tokens_per_microbatch": 100}, r"max_tokens_per_microbatch=100 is below .* >= 288"),
        ({"max_tokens_per_microbatch": 300.0}, "max_tokens_per_microbatch=300.0 must be an integer"),
    ],
)
def test_bad_config_raises_with_the_rule(values, match):
    with pytest.raises(ValueError, match=match):
        RLAIFConfig(**values)


def test_ops_reference_is_refused_naming_its_new_name_naive():
    # ops="reference" meant the naive baseline; "reference" now names only the KL reference policy
    for make in (lambda: RLAIFConfig(ops="reference"), lambda: RLAIFConfig.from_dict({"ops": "reference"})):
        with pytest.raises(ValueError, match=r"ops='reference' is now called ops='naive'.*set ops='naive'"):
            make()
    assert RLAIFConfig(ops="naive").ops == "naive"


def test_from_dict_rejects_unknown_keys_with_a_hint():
    with pytest.raises(ValueError, match=r"'learning_rte' \(did you mean 'learning_rate'\?\)"):
        RLAIFConfig.from_dict({"learning_rte": 1e-5})
    with pytest.raises(TypeError, match="expects a dict"):
        RLAIFConfig.from_dict([("batch_size", 8)])


def test_from_yaml_section_and_roundtrip(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("rl:\n  algorithm: rloo\n  group_size: 4\n  batch_size: 16\n")
    cfg = RLAIFConfig.from_yaml(path, section="rl")
    assert (cfg.algorithm, cfg.group_size, cfg.prompts_per_step) == ("rloo", 4, 4)
    assert RLAIFConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="no section 'policy'"):
        RLAIFConfig.from_yaml(path, section="policy")


def _cfg(**kw):
    return RLAIFConfig(
        **{"batch_size": 4, "micro_batch_size": 2, "progress": False, "tensorboard": False, **kw}
    )


def _no_compute(monkeypatch):
    """Any forward of a model fails the test: the checks must fire first."""

    def boom(*a, **k):
        raise AssertionError("compute ran before the input check")

    monkeypatch.setattr("rlaif_fast.trainer.strategy.Strategy.__init__", boom)


@pytest.mark.parametrize("algorithm", ["ppo", "reinforce_baseline"])
def test_critic_algorithms_need_a_value_model(algorithm, monkeypatch):
    _no_compute(monkeypatch)
    with pytest.raises(ValueError, match="value_model is None"):
        RLAIFTrainer(tiny_gpt2(), CharTokenizer(), count_a, _cfg(algorithm=algorithm))


def test_critic_free_rejects_a_value_model(monkeypatch):
    _no_compute(monkeypatch)
    policy = tiny_gpt2()
    with pytest.raises(ValueError, match="critic-free"):
        RLAIFTrainer(
            policy,
            CharTokenizer(),
            count_a,
            _cfg(algorithm="grpo", group_size=2),
            value_model=ValueModel.from_policy(policy),
        )


def test_vocab_mismatch(monkeypatch):
    _no_compute(monkeypatch)
    with pytest.raises(ValueError, match="tokenizer has 30 tokens but the policy embeds only 16"):
        RLAIFTrainer(tiny_gpt2(), CharTokenizer(extra=16), count_a, _cfg(algorithm="rloo", group_size=2))


def test_reward_must_be_callable(monkeypatch):
    _no_compute(monkeypatch)
    with pytest.raises(TypeError, match="reward must be a callable"):
        RLAIFTrainer(tiny_gpt2(), CharTokenizer(), [1.0], _cfg(algorithm="rloo", group_size=2))


def test_zero3_refuses_a_model_it_cannot_shard(monkeypatch):
    _no_compute(monkeypatch)
    policy = tiny_gpt2()
    # int8 weights (a quantized layer): ZeRO-3 partitions floating-point parameters only
    policy.lm_head.register_parameter(
        "qweight", torch.nn.Parameter(torch.zeros(4, dtype=torch.int8), requires_grad=False)
    )
    with pytest.raises(ValueError, match="zero_stage=3 cannot shard policy parameter 'lm_head.qweight'"):
        RLAIFTrainer(policy, CharTokenizer(), count_a, _cfg(algorithm="rloo", group_size=2, zero_stage=3))


def _strategy_without_dist(cfg, world_size=2):
    from rlaif_fast.trainer.strategy import Strategy

    s = Strategy.__new__(Strategy)  # only the config logic: no process group
    s.config, s.world_size = cfg, world_size
    return s


def test_deepspeed_config_from_rlaif_config_and_user_json(tmp_path):
    cfg = _cfg(zero_stage=2, batch_size=8, micro_batch_size=2, max_grad_norm=0.5)
    ds = _strategy_without_dist(cfg).ds_config(micro_batch_size=2, grad_accum=2)
    assert ds["zero_optimization"] == {"stage": 2} and ds["train_batch_size"] == 8
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": False}  # CPU: no bf16
    user = tmp_path / "ds.json"
    user.write_text('{"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}')
    ds = _strategy_without_dist(_cfg(deepspeed_config=str(user))).ds_config(2, 2)
    assert ds["zero_optimization"]["stage"] == 3  # the user's JSON wins
    user.write_text('{"train_batch_size": 1024}')
    with pytest.raises(ValueError, match="sets train_batch_size=1024 but the RLAIFConfig sizes give 8"):
        _strategy_without_dist(_cfg(deepspeed_config=str(user))).ds_config(2, 2)


def test_per_rank_sizes_must_split_over_ranks():
    from rlaif_fast.trainer.checks import per_rank_sizes

    assert per_rank_sizes(_cfg(batch_size=8, micro_batch_size=2), 2) == {"batch": 4, "mini": 4}
    with pytest.raises(ValueError, match="micro_batch_size=3 must divide the per-rank mini-batch"):
        per_rank_sizes(_cfg(batch_size=8, micro_batch_size=3), 2)
    # with a token budget micro_batch_size does not cut the update, so it need not divide
    budget = _cfg(
        batch_size=8, micro_batch_size=3, max_prompt_len=8, max_new_tokens=8, max_tokens_per_microbatch=16
    )
    assert per_rank_sizes(budget, 2) == {"batch": 4, "mini": 4}
    with pytest.raises(ValueError, match="must be a multiple of group_size=4"):
        per_rank_sizes(_cfg(algorithm="grpo", group_size=4, batch_size=8, micro_batch_size=2), 4)


def test_token_budget_too_small_for_a_rollout_raises_before_the_update(tmp_path):
    """learn() can receive rollouts longer than max_prompt_len + max_new_tokens (sampled elsewhere): the
    budget check names the length and the fix, and no parameter moves."""
    from rlaif_fast.trainer import Rollouts

    cfg = _cfg(
        algorithm="rloo",
        group_size=2,
        max_prompt_len=4,
        max_new_tokens=4,
        max_tokens_per_microbatch=8,
        output_dir=str(tmp_path),
    )
    trainer = RLAIFTrainer(tiny_gpt2(), CharTokenizer(), count_a, cfg)
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    long = Rollouts(["ab"] * 4, ["a" * 9] * 4, [[1, 3, 4]] * 4, [[3] * 9] * 4)
    with pytest.raises(ValueError, match="a rollout of 12 tokens does not fit max_tokens_per_microbatch=8"):
        trainer.learn(long)
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters()))


# -------------------- bf16 references, Ctrl-C, resume, progress, external rollouts


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

    monkeypatch.setattr(cli, "load_callable", lambda spec, **labeler: count_a)
    monkeypatch.setattr(cli, "load_prompts", lambda path: PROMPTS)
    monkeypatch.setattr(cli, "load_policy", lambda policy, tok: (tiny_gpt2(), CharTokenizer()))
    monkeypatch.setattr(trainer_pkg, "RLAIFTrainer", FakeTrainer, raising=False)
    yaml_cfg = tmp_path / "run.yaml"
    yaml_cfg.write_text("batch_size: 4\nalgorithm: rloo\ngroup_size: 2\n")
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "config.json").write_text("{}")  # the policy path is checked before loading
    argv = [
        "--policy",
        str(tmp_path / "policy"),
        "--prompts",
        "x",
        "--reward",
        "m:f",
        "--config",
        str(yaml_cfg),
    ]
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
