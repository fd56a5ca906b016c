"""Evaluation: the win rate judges every pair in both orders, splits ties, and reports the ground truth."""

import json
import math

import pytest
import torch

from rlaif_fast import cli
from rlaif_fast.feedback import PairwiseLabeler, pair_label_from_orders
from rlaif_fast.pipeline import evaluate as ev
from rlaif_fast.pipeline import task as T


class ScriptedBackend:
    """A labeler backend whose "1"/"2" log-probs come from a rule over the two responses it is shown.

    ``judge(first, second) -> P("1")``; every prompt it sees is recorded, so tests can check the orders.
    """

    def __init__(self, judge):
        self.judge, self.seen = judge, []

    def candidate_logprobs(self, prompts, candidates):
        assert tuple(candidates) == ("1", "2")
        rows = []
        for p in prompts:
            text = p.text
            first = text.split("Response 1 - ")[1].split("\n")[0]
            second = text.split("Response 2 - ")[1].split("\n")[0]
            self.seen.append((first, second))
            p1 = self.judge(first, second)
            rows.append([torch.tensor(p1).log(), torch.tensor(1 - p1).log()])
        return torch.tensor(rows, dtype=torch.float64)


def _labeler(judge):
    return PairwiseLabeler(ScriptedBackend(judge), "helpfulness")


PROMPTS = [T.make_prompt(t) for t in ("cat", "dog", "sun", "sea")]
GOOD = ["the cat is happy .", "the dog is kind .", "the sun is warm .", "the sea is calm ."]
BAD = ["the cat is sad .", "the dog is cruel .", "the sun is cold .", "the sea is grim ."]


def test_every_pair_is_judged_in_both_orders():
    labeler = _labeler(lambda a, b: 0.7)
    ev.compare(labeler, PROMPTS, GOOD, BAD)
    seen = labeler.backend.seen
    assert sorted(seen) == sorted([(g, b) for g, b in zip(GOOD, BAD)] + [(b, g) for g, b in zip(GOOD, BAD)])


def test_a_pure_position_bias_is_a_tie_not_a_win():
    # always says "1" with p = 0.9: a single order would give the policy a 100% win rate
    out = ev.compare(_labeler(lambda a, b: 0.9), PROMPTS, GOOD, BAD)
    assert out["win_rate"] == pytest.approx(0.5)
    assert out["mean_p_policy"] == pytest.approx(0.5)
    assert out["position_bias"] == 1.0


def test_content_preference_survives_the_order_swap_and_ground_truth_is_reported():
    happy = lambda a, b: 0.8 if T.polarity(a) > T.polarity(b) else 0.2
    out = ev.compare(_labeler(happy), PROMPTS, GOOD, BAD, T.ground_truth_reward)
    assert out["win_rate"] == 1.0 and out["position_bias"] == 0.0
    assert out["gt_win_rate"] == 1.0
    assert out["gt_policy"] == pytest.approx(0.8 * 0.5 + 0.2)
    assert out["gt_baseline"] == pytest.approx(-0.8 * 0.5 + 0.2)
    reverse = ev.compare(_labeler(happy), PROMPTS, BAD, GOOD)
    assert reverse["win_rate"] == 0.0


def test_identical_and_empty_responses_are_ties():
    # a content-blind labeler sees the same text in both orders: p_a is exactly 0.5
    out = ev.compare(_labeler(lambda a, b: 0.6), PROMPTS, ["", "x", "", "y"], ["", "x", " ", "y"])
    assert out["win_rate"] == 0.5


def test_win_rate_splits_ties():

    labels = [
        pair_label_from_orders(0.9, 0.1),
        pair_label_from_orders(0.2, 0.8),
        pair_label_from_orders(0.6, 0.6),
    ]
    assert [lab.p_a for lab in labels] == pytest.approx([0.9, 0.2, 0.5])
    assert ev.win_rate(labels) == pytest.approx((1 + 0 + 0.5) / 3)
    with pytest.raises(ValueError, match="at least one"):
        ev.win_rate([])


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="one of each per prompt"):
        ev.compare(_labeler(lambda a, b: 0.5), PROMPTS, GOOD[:3], BAD)


# -------------------- eval's n and --out


# ---- rlaif-fast eval: --n 0 is refused, --out may name a new folder ---------------------------------------
@pytest.fixture
def eval_setup(tmp_path, monkeypatch):
    from rlaif_fast.pipeline.run import Run
    from rlaif_fast.pipeline.sft import build_policy

    tok = T.build_tokenizer()
    policy_dir = tmp_path / "a policy"
    build_policy(len(tok), dim=16, layers=1).save_pretrained(policy_dir)
    path = tmp_path / "c.yaml"
    path.write_text(f"output_dir: {tmp_path / 'out'}\n")
    seen = []

    def fake_evaluate(self, policy, baseline, n=None):
        seen.append(n)
        return {"pairs": n, "win_rate": 0.5}

    monkeypatch.setattr(Run, "evaluate", fake_evaluate)
    return ["eval", str(path), "--policy", str(policy_dir), "--baseline", str(policy_dir)], tmp_path, seen


def test_eval_refuses_n_zero(eval_setup, capsys):
    argv, _, seen = eval_setup
    assert cli.main(argv + ["--n", "0"]) == 2
    assert "rlaif-fast eval: error: --n must be >= 1, got 0" in capsys.readouterr().err
    assert seen == []


def test_eval_out_in_a_new_folder_keeps_the_result(eval_setup):
    argv, tmp_path, seen = eval_setup
    out = tmp_path / "results" / "e.json"
    assert cli.main(argv + ["--n", "3", "--out", str(out)]) == 0
    assert seen == [3] and json.loads(out.read_text()) == {"pairs": 3, "win_rate": 0.5}


# -------------------- failed pairs


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
