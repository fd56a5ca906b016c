"""Second review of the pipeline: shipped configs, prompt length vs the policy's context, failed labels."""

import math
from pathlib import Path

import pytest
import torch
import yaml

from rlaif_fast.feedback import PairwiseLabeler, load_template, pair_label_from_orders
from rlaif_fast.pipeline import evaluate as ev
from rlaif_fast.pipeline import files
from rlaif_fast.pipeline import task as T
from rlaif_fast.pipeline.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "rlaif_fast" / "pipeline" / "configs").glob("*.yaml")) + sorted(
    (ROOT / "examples").glob("*.yaml")
)


# ---- every shipped config parses, validates, and each key it sets reaches its stage ----------------------
@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_loads_and_its_keys_arrive(path, tmp_path):
    from rlaif_fast.pipeline.run import RL_OWNED, Run
    from rlaif_fast.trainer import RLAIFConfig

    raw = yaml.safe_load(path.read_text())
    if "sample" in raw and "output_dir" not in raw:  # a labeler template, not a run config
        template = load_template(path)
        assert template.render_pairwise("c", "a", "b") and template.render_score("c", "a")
        return
    cfg = RunConfig.from_yaml(path)
    for key, value in raw.items():  # nothing set in the file is dropped or replaced on the way in
        if key in ("template", "prompts_file") and (path.parent / value).is_file():
            value = str(path.parent / value)
        assert getattr(cfg, key) == value, key
    load_template(cfg.template)
    run = Run.__new__(Run)  # the user task's tokenizer is not here; the rl section is checked without it
    run.cfg, run.out = cfg, tmp_path
    settings = run._rl_settings()
    rl = RLAIFConfig.from_dict({**settings, "output_dir": str(tmp_path), "seed": 1})
    for key, value in (raw.get("rl") or {}).items():
        assert key not in RL_OWNED and getattr(rl, key) == value, key
    if cfg.task is not None:
        Run(cfg, progress=False)


# ---- a prompt longer than the policy's context keeps its last tokens instead of crashing ----------------
@pytest.fixture
def small_policy():
    from rlaif_fast.pipeline.sft import build_policy

    tok = T.build_tokenizer()
    return tok, build_policy(len(tok), dim=16, layers=1, max_positions=64).eval()


def test_prompt_longer_than_the_policy_context_is_cut_not_a_crash(small_policy):
    tok, policy = small_policy
    long = " ".join(["the cat is happy ."] * 20)  # 100 tokens, the policy has 64 positions
    assert len(tok.encode(long)) > 64
    out = ev.sample_completions(
        policy, tok, [long, T.make_prompt("cat")], max_new_tokens=8, temperature=0.9, seed=0
    )
    assert len(out) == 2
    assert ev.prompt_budget(policy, 256, 14) == 50 and ev.prompt_budget(policy, 10, 14) == 10
    with pytest.raises(ValueError, match="max_new_tokens=64 leaves no room"):
        ev.prompt_budget(policy, 256, 64)


def _run_with_sft(tmp_path, policy, tok, **settings):
    from rlaif_fast.pipeline.run import Run

    run = Run(RunConfig(output_dir=str(tmp_path / "out"), **settings), progress=False)
    policy.save_pretrained(run.sft_dir())
    tok.save_pretrained(run.sft_dir())
    files.write_json(run.out / "sft.json", {"steps": 0, "final_loss": None})
    return run


def test_rl_max_prompt_len_reaches_pair_sampling_and_rl_capped_to_the_context(
    small_policy, tmp_path, monkeypatch
):
    import rlaif_fast.trainer as trainer_mod
    from rlaif_fast.trainer import generation

    tok, policy = small_policy
    run = _run_with_sft(tmp_path, policy, tok, rl={"max_prompt_len": 5})
    seen = []
    real = generation.sample
    monkeypatch.setattr(
        generation, "sample", lambda *a, **k: seen.append(k["max_prompt_len"]) or real(*a, **k)
    )
    run._sample(policy, [T.make_prompt("cat")], seed=0)
    assert seen == [5]  # the rl section's prompt length is also the one pairs are sampled with

    class Stop(Exception):
        pass

    def fake_trainer(policy, tokenizer, reward, rl_cfg, **kw):
        raise Stop(rl_cfg.max_prompt_len)

    monkeypatch.setattr(trainer_mod, "RLAIFTrainer", fake_trainer)
    run = _run_with_sft(tmp_path / "b", policy, tok)  # no max_prompt_len: the trainer's 256 does not fit 64
    with pytest.raises(Stop) as got:
        run.stage_rl(1, policy, reward=None)
    assert got.value.args == (64 - run.cfg.max_new_tokens,)


# ---- failed labels (NaN) are counted as failed, not as ties, wins or losses --------------------------------
class NaNOnBackend:
    """P("1") = 0.8 for the response containing "happy" shown first, NaN log-probs for pairs with "FAIL"."""

    def candidate_logprobs(self, prompts, candidates):
        rows = []
        for p in prompts:
            first = p.text.split("Response 1 - ")[1].split("\n")[0]
            if "FAIL" in p.text:
                rows.append([math.nan, math.nan])
            else:
                p1 = 0.8 if "happy" in first else 0.2
                rows.append([math.log(p1), math.log(1 - p1)])
        return torch.tensor(rows, dtype=torch.float64)


def test_eval_leaves_failed_pairs_out_of_the_win_rate():
    labeler = PairwiseLabeler(NaNOnBackend(), "helpfulness")
    prompts = [T.make_prompt(t) for t in ("cat", "dog", "sun", "sea")]
    policy = ["the cat is happy .", "the dog is happy .", "the sun is happy .", "FAIL"]
    baseline = ["the cat is sad .", "the dog is sad .", "the sun is sad .", "the sea is sad ."]
    out = ev.compare(labeler, prompts, policy, baseline)
    assert out["win_rate"] == 1.0  # 3 of 3 judged pairs; the failed one is not a tie (it was 0.875)
    assert out["failed_pairs"] == 1 and out["pairs"] == 4
    assert out["mean_p_policy"] == pytest.approx(0.8) and out["position_bias"] == 0.0
    with pytest.raises(ValueError, match="failed on all 1 pairs"):
        ev.compare(labeler, prompts[:1], ["FAIL"], ["x"])


class HalfFailingLabeler:
    """Pair 0 failed (NaN both orders); the others prefer response a in both orders."""

    def label(self, prompts, a, b):
        return [pair_label_from_orders(math.nan, math.nan)] + [
            pair_label_from_orders(0.9, 0.1) for _ in prompts[1:]
        ]


def test_failed_labels_are_left_out_of_label_stats_and_the_reward_model(small_policy, tmp_path):
    tok, policy = small_policy
    run = _run_with_sft(tmp_path, policy, tok, pairs_per_iteration=12, rm_epochs=1, max_new_tokens=8)
    run._labeler = HalfFailingLabeler()
    rec = run.stage_label(1, policy)
    rm = run.stage_rm(1)  # before: "pair 0 has p_a=nan; soft labels must lie in [0, 1]", on every rerun
    assert rm["train_pairs"] + rm["held_out_pairs"] <= 11
    assert rec["failed_pairs"] == 1 and rec["position_bias"] == 0.0
    assert rec["mean_entropy"] == pytest.approx(
        -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    )  # NaN: not "certain"
