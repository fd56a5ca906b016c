"""`rlaif-fast run` end to end on a tiny config, stage-wise resume, `rlaif-fast eval`, and the demo labeler."""

import json
import math

import pytest
import torch

from rlaif_fast import cli
from rlaif_fast.feedback import load_template, pair_label_from_orders
from rlaif_fast.pipeline import evaluate as ev
from rlaif_fast.pipeline import files
from rlaif_fast.pipeline import labeler_model as L
from rlaif_fast.pipeline import task as T
from rlaif_fast.pipeline.config import RunConfig, packaged_config

TINY = """
output_dir: {out}
seed: 0
sft_steps: 20
labeler_steps: 10
template: {template}
pairs_per_iteration: 12
rm_epochs: 1
max_new_tokens: 8
eval_prompts: 6
rl:
  batch_size: 4
  micro_batch_size: 4
  total_steps: 2
"""


@pytest.fixture
def tiny_config(tmp_path, monkeypatch):
    from rlaif_fast.pipeline.config import packaged_config

    monkeypatch.setenv("RLAIF_FAST_CACHE", str(tmp_path / "cache"))
    template = packaged_config("demo").parent / "demo_template.yaml"
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.format(out=tmp_path / "out", template=template))
    return path, tmp_path / "out"


@pytest.mark.slow
def test_run_end_to_end_then_resume_then_eval(tiny_config, capsys):
    path, out = tiny_config
    assert cli.main(["run", str(path), "--no-progress"]) == 0
    assert "# RLAIF run report" in capsys.readouterr().out

    rep = json.loads((out / "report.json").read_text())
    for key in (
        "labeler_alignment",
        "labeler_position_bias",
        "rm_accuracy_ai",
        "win_rate_vs_sft",
        "gt_sft",
        "gt_policy",
        "gt_improved",
    ):
        assert key in rep, key
    assert 0.0 <= rep["win_rate_vs_sft"] <= 1.0 and 0.0 <= rep["labeler_position_bias"] <= 1.0
    assert (out / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    assert "AI labeler alignment" in (out / "report.md").read_text()

    pairs = [json.loads(x) for x in (out / "iter_1" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 12
    for p in pairs:  # soft labels, averaged over both orders
        assert 0.0 <= p["p_a"] <= 1.0 and p["p_a"] == pytest.approx((p["p_a_ab"] + p["p_a_ba"]) / 2)
        assert p["response_a"].strip() and p["response_b"].strip()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rl_rows = [r for r in rows if r.get("kind") != "eval"]
    assert len(rl_rows) == 2 and all({"reward", "kl", "entropy"} <= set(r) for r in rl_rows)
    assert [r["kind"] for r in rows if "kind" in r] == ["eval"]

    # resume: finished stages are skipped (records untouched), a missing one is redone identically
    records = ["sft.json", "iter_1/label.json", "iter_1/rm.json", "iter_1/rl.json"]
    before = {r: (out / r).stat().st_mtime_ns for r in records}
    first_eval = json.loads((out / "iter_1" / "eval.json").read_text())
    (out / "iter_1" / "eval.json").unlink()
    assert cli.main(["run", str(path), "--no-progress"]) == 0
    assert {r: (out / r).stat().st_mtime_ns for r in records} == before
    assert json.loads((out / "iter_1" / "eval.json").read_text()) == first_eval

    # rlaif-fast eval: the final policy against SFT, and SFT against itself
    assert cli.main(["eval", str(path), "--out", str(out / "e.json")]) == 0
    result = json.loads((out / "e.json").read_text())
    assert result["win_rate"] == pytest.approx(first_eval["win_rate"])
    sft = str(out / "sft")
    assert cli.main(["eval", str(path), "--policy", sft, "--n", "4", "--out", str(out / "self.json")]) == 0
    same = json.loads((out / "self.json").read_text())
    assert same["win_rate"] == 0.5 and same["gt_policy"] == same["gt_baseline"]  # same seed, same model


def test_eval_without_a_run_says_what_to_do(tiny_config, capsys):
    path, _ = tiny_config
    assert cli.main(["eval", str(path)]) == 2
    assert "does not exist; run `rlaif-fast run" in capsys.readouterr().err


def test_demo_labeler_is_cached_and_trained_on_dense_targets(tmp_path, monkeypatch):

    tok = T.build_tokenizer()
    render = load_template("helpfulness").render_pairwise
    model, where = L.load_or_train_labeler(render, tok, tmp_path, steps=2, progress=False)
    monkeypatch.setattr(L, "train_labeler", lambda *a, **k: pytest.fail("the cached labeler was retrained"))
    again, where2 = L.load_or_train_labeler(render, tok, tmp_path, steps=2, progress=False)
    assert where == where2 and (where / "config.json").is_file()
    assert L.cache_key(render, 64, 2, 0) != L.cache_key(render, 64, 3, 0)

    prompt, first, second = T.make_prompt("cat"), "the happy cat is kind .", "the cat is sad ."
    ids = tok(render(prompt, first, second), add_special_tokens=False)["input_ids"]
    rows = L._aux_targets(tok, ids, prompt, first, second)
    assert rows[-1] == [2.0, -1.0, 1.0, 1.0]  # sentiment of each candidate, topic seen in each
    assert rows[0] == [0.0, 0.0, 0.0, 0.0]


def test_labeler_pairs_have_distinct_ground_truths_and_balanced_winners():
    pairs = L.labeler_pairs(400, seed=0)
    assert all(T.ground_truth(p, a) != T.ground_truth(p, b) for p, a, b, _ in pairs)
    assert all((w == 1) == (T.ground_truth(p, a) > T.ground_truth(p, b)) for p, a, b, w in pairs)
    assert 0.4 < sum(w == 1 for *_, w in pairs) / len(pairs) < 0.6


def test_resume_refuses_an_output_dir_made_with_another_config(tmp_path):
    from rlaif_fast.pipeline.config import RunConfig
    from rlaif_fast.pipeline.run import Run

    out = tmp_path / "out"
    out.mkdir()
    old = RunConfig(output_dir=str(out), iterations=1).to_dict()
    (out / "config.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match=r"different config \(changed: iterations\)"):
        Run(RunConfig(output_dir=str(out), iterations=2), progress=False).run()
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]  # nothing computed


@pytest.mark.slow
def test_demo_command_checks_its_promise(tmp_path, monkeypatch, capsys):
    """`rlaif-fast demo` on shrunken settings: it exits 0 exactly when the ground truth improved."""
    monkeypatch.setenv("RLAIF_FAST_CACHE", str(tmp_path / "cache"))
    small = [
        "sft_steps=20",
        "labeler_steps=10",
        "pairs_per_iteration=12",
        "rm_epochs=1",
        "iterations=1",
        "eval_prompts=6",
        "max_new_tokens=8",
        "rl={batch_size: 4, micro_batch_size: 4, total_steps: 2}",
    ]
    argv = ["demo", "--no-progress", "--out", str(tmp_path / "demo")]
    for s in small:
        argv += ["--set", s]
    status = cli.main(argv)
    rep = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert status == (0 if rep["gt_improved"] else 1)
    assert "demo finished in" in capsys.readouterr().out


def test_set_overrides_parse_as_yaml_and_reject_garbage():
    from rlaif_fast.pipeline.run import parse_overrides

    assert parse_overrides(["iterations=2", "template=a=b", "rl={kl_coef: 0.1}"]) == {
        "iterations": 2,
        "template": "a=b",
        "rl": {"kl_coef": 0.1},
    }
    with pytest.raises(ValueError, match="must look like key=value"):
        parse_overrides(["iterations"])
    with pytest.raises(ValueError, match="section.key=value"):
        parse_overrides(["rl..kl_coef=1"])
    assert parse_overrides(["rl.kl_coef=0.2", "rl.total_steps=3"]) == {
        "rl": {"kl_coef": 0.2, "total_steps": 3}
    }


def test_dotted_set_changes_one_setting_of_a_section(tmp_path):
    from rlaif_fast.pipeline.config import RunConfig
    from rlaif_fast.pipeline.run import parse_overrides

    path = tmp_path / "run.yaml"
    path.write_text("rl:\n  algorithm: rloo\n  group_size: 2\n  kl_coef: 0.1\n")
    cfg = RunConfig.from_yaml(path, parse_overrides(["rl.kl_coef=0.2"]))
    assert cfg.rl == {"algorithm": "rloo", "group_size": 2, "kl_coef": 0.2}
    cfg = RunConfig.from_yaml(path, parse_overrides(["rl={kl_coef: 0.3}"]))  # a mapping merges the same way
    assert cfg.rl == {"algorithm": "rloo", "group_size": 2, "kl_coef": 0.3}


@pytest.mark.slow
def test_ctrl_c_during_rl_saves_then_the_rerun_continues(tiny_config, monkeypatch):
    from rlaif_fast.trainer.trainer import RLAIFTrainer

    path, out = tiny_config
    real_step = RLAIFTrainer.step

    def interrupted_step(self, prompts):
        if self.global_step == 1:  # Ctrl-C during the second RL step
            raise KeyboardInterrupt
        return real_step(self, prompts)

    monkeypatch.setattr(RLAIFTrainer, "step", interrupted_step)
    assert cli.main(["run", str(path), "--no-progress"]) == 130
    assert not (out / "iter_1" / "rl.json").exists()
    assert list((out / "iter_1" / "rl").glob("**/*"))  # the trainer's checkpoint is there
    monkeypatch.setattr(RLAIFTrainer, "step", real_step)
    assert cli.main(["run", str(path), "--no-progress"]) == 0
    history = json.loads((out / "iter_1" / "rl.json").read_text())["history"]
    assert [row["step"] for row in history] == [1, 2]  # step 1 kept from before, step 2 run after


def test_score_token_buckets_the_ground_truth_into_ten_equal_bins():
    grid = (-1.0, -0.81, -0.79, -0.01, 0.0, 0.79, 0.81, 1.0)
    assert [L.score_token(g) for g in grid] == [1, 1, 2, 5, 6, 9, 10, 10]
    examples = L.labeler_scores(300, seed=0)
    assert all(r == L.score_token(T.ground_truth(p, x)) for p, x, r in examples)
    # the task's ground truth takes few values (polarity of 0-2 sentiment words, topic +-0.2), so the
    # ratings are few too; they must still reach both ends of the scale the sentences can
    ratings = {r for *_, r in examples}
    assert len(ratings) >= 5 and min(ratings) <= 2 and max(ratings) >= 9


def test_average_ranks_and_correlations_match_hand_computed_values():

    from rlaif_fast.pipeline.stages import _average_ranks, _pearson, _score_agreement

    x = torch.tensor([3.0, 1.0, 3.0, 2.0], dtype=torch.float64)
    assert _average_ranks(x).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert _pearson(x, x.neg()) == pytest.approx(-1.0) and _pearson(x, torch.ones(4)) is None
    prompts = [T.make_prompt("cat")] * 4
    responses = ["the happy cat .", "the sad dog .", "the cat .", "the kind happy cat ."]
    gt = T.ground_truth_reward(prompts, responses)  # 0.6, -0.6, 0.2, 0.733...
    got = _score_agreement(prompts, responses, [0.5, -0.9, 0.6, 0.8], T.ground_truth_reward)
    assert got["score_gt_spearman"] == pytest.approx(0.8)  # ranks (3,1,2,4) vs (2,1,3,4): 1 - 6*2/60
    mx, my = sum(gt) / 4, 0.25
    sx = [g - mx for g in gt]
    sy = [s - my for s in (0.5, -0.9, 0.6, 0.8)]
    ref = sum(a * b for a, b in zip(sx, sy)) / (sum(a * a for a in sx) * sum(b * b for b in sy)) ** 0.5
    assert got["score_gt_pearson"] == pytest.approx(ref, rel=1e-12)


def test_demo_labeler_is_trained_on_the_score_prompt(tmp_path):
    """With the template's score prompt in training, the labeler answers it with ratings (an untrained
    model spreads its mass over the whole vocabulary, a pairwise-only one on "1"/"2"), and the score
    prompt enters the cache key."""

    from rlaif_fast.feedback import HFBackend, ScoreLabeler, load_template
    from rlaif_fast.pipeline.config import packaged_config

    tok = T.build_tokenizer()
    tpl = load_template(packaged_config("demo").parent / "demo_template.yaml")
    assert L.cache_key(tpl.render_pairwise, 64, 2, 0) != L.cache_key(
        tpl.render_pairwise, 64, 2, 0, tpl.render_score
    )
    model = L.train_labeler(tpl.render_pairwise, tok, steps=40, progress=False, render_score=tpl.render_score)
    ex = L.labeler_scores(32, seed=7)
    ids = tok([tpl.render_score(p, r) for p, r, _ in ex], add_special_tokens=False, padding=True)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids["input_ids"]), attention_mask=torch.tensor(ids["attention_mask"])
        )
    last = torch.tensor(ids["attention_mask"]).sum(1) - 1
    probs = out.logits[torch.arange(len(ex)), last].softmax(-1)  # (N, V)
    # "3".."10" are never a pairwise answer: mass there comes from the score prompts alone
    rating_ids = [tok.convert_tokens_to_ids(str(i)) for i in range(3, 11)]
    assert probs[:, rating_ids].sum(-1).min() > 0.3
    scores = ScoreLabeler(HFBackend(model, tok), tpl).score([p for p, *_ in ex], [r for _, r, _ in ex])
    assert all(-1.0 <= s <= 1.0 for s in scores)


@pytest.mark.slow
def test_run_direct_rlaif_end_to_end(tiny_config, capsys):
    """feedback: direct with the demo labeler: no reward model, the ScoreLabeler is the RL reward, and the
    report carries the labeler's score-vs-ground-truth correlations."""
    path, out = tiny_config
    assert cli.main(["run", str(path), "--no-progress", "--set", "feedback=direct"]) == 0
    assert "d-RLAIF score vs ground truth, Spearman" in capsys.readouterr().out
    rep = json.loads((out / "report.json").read_text())
    assert rep["feedback"] == "direct" and rep["rm_accuracy_ai"] is None
    assert not (out / "iter_1" / "rm.json").exists()
    for key in ("labeler_score_gt_pearson", "labeler_score_gt_spearman"):
        assert -1.0 <= rep[key] <= 1.0, key
    pairs = [json.loads(x) for x in (out / "iter_1" / "pairs.jsonl").read_text().splitlines()]
    scores = [p["score_a"] for p in pairs] + [p["score_b"] for p in pairs]
    assert all(-1.0 <= s <= 1.0 for s in scores)
    assert rep["labeler_score_mean"] == pytest.approx(sum(scores) / len(scores))
    # the saved scores are the cached labeler's ScoreLabeler output, reproducible after the run
    from rlaif_fast.pipeline.config import RunConfig
    from rlaif_fast.pipeline.run import Run

    run = Run(RunConfig.from_yaml(path, {"feedback": "direct"}), progress=False)
    p = pairs[0]
    assert run.score_labeler().score([p["context"]], [p["response_a"]])[0] == pytest.approx(
        p["score_a"], abs=1e-6
    )
    assert "gt_improved" in rep and rep["gt_sft"] is not None
    # a rollout that stopped at once is scored as "(empty)", not a crash of the RL step
    from rlaif_fast.pipeline.models import DirectReward

    reward = DirectReward(run.score_labeler())
    assert reward([p["context"]] * 2, ["", "(empty)"]) == pytest.approx(
        run.score_labeler().score([p["context"]], ["(empty)"]) * 2, abs=1e-6
    )


# -------------------- older runs, Ctrl-C in the demo, the report, the labeler cache


def test_config_json_of_an_older_run_without_file_hashes_still_resumes(tmp_path):
    from rlaif_fast.pipeline.run import Run

    template = tmp_path / "t.yaml"
    template.write_text((packaged_config("demo").parent / "demo_template.yaml").read_text())
    cfg = RunConfig(output_dir=str(tmp_path / "out"), template=str(template))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text(json.dumps(cfg.to_dict()))
    Run(cfg, progress=False)._check_same_config()


# ---- demo: Ctrl-C returns 130 with the resume hint, no traceback and no stale report ---------------------
def test_interrupted_demo_returns_130_without_reading_a_report(tmp_path, monkeypatch, capsys):
    from rlaif_fast.pipeline import run as run_mod

    monkeypatch.setattr(run_mod, "finish", lambda cfg, progress, **kw: 130)
    out = tmp_path / "demo"
    assert cli.main(["demo", "--no-progress", "--out", str(out)]) == 130  # no report.json yet
    out.mkdir()
    (out / "report.json").write_text(json.dumps({"gt_improved": False, "gt_sft": 0.1, "gt_policy": 0.0}))
    assert cli.main(["demo", "--no-progress", "--out", str(out)]) == 130  # a stale one is not reported
    printed = capsys.readouterr().out
    assert "demo finished" not in printed and "did NOT improve" not in printed


# ---- report: RL steps are the trainer's steps, not its logged rows -----------------------------------------
def test_report_counts_rl_steps_not_logged_rows():
    from rlaif_fast.pipeline import report

    history = [{"iteration": 1, "step": s, "reward": 0.1, "kl": 0.0} for s in (5, 10)]  # log_every: 5
    result = {
        "sft": {},
        "iterations": [
            {
                "iteration": 1,
                "label": {"position_bias": 0.1, "alignment": 0.8},
                "rl": {"summary": {"steps": 10, "stopped": "completed"}, "history": history},
                "eval": {"win_rate": 0.6},
            }
        ],
    }
    rep = report.build_report(result, RunConfig())
    assert rep["per_iteration"][0]["rl_steps"] == 10
    assert "| 1 | 80.0% | 10.0% | n/a | n/a | 10 | 60.0% | n/a |" in report.render_markdown(rep)


# ---- demo labeler cache: two runs that train the same labeler at once both finish ------------------------
def test_labeler_cache_published_meanwhile_by_another_run_is_kept(tmp_path, monkeypatch):
    from rlaif_fast.pipeline import labeler_model as L

    tok = T.build_tokenizer()
    render = load_template("helpfulness").render_pairwise
    real = L.train_labeler
    entry = tmp_path / f"labeler-{L.cache_key(render, 64, 2, 0)}"

    def train_while_another_run_publishes_first(*args, **kwargs):
        model = real(*args, **kwargs)
        model.save_pretrained(entry)  # the other run, same key, finished and renamed its copy first
        tok.save_pretrained(entry)
        return model

    monkeypatch.setattr(L, "train_labeler", train_while_another_run_publishes_first)
    model, where = L.load_or_train_labeler(render, tok, tmp_path, steps=2, progress=False)
    assert where == entry and (where / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [entry.name]  # no temporary folder left behind


# -------------------- long prompts, rl_max_prompt_len, failed labels


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
    from rlaif_fast.trainer import sampling

    tok, policy = small_policy
    run = _run_with_sft(tmp_path, policy, tok, rl={"max_prompt_len": 5})
    seen = []
    real = sampling.sample
    monkeypatch.setattr(sampling, "sample", lambda *a, **k: seen.append(k["max_prompt_len"]) or real(*a, **k))
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
