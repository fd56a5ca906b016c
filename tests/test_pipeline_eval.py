"""Evaluation: the win rate judges every pair in both orders, splits ties, and reports the ground truth."""

import pytest
import torch

from rlaif_fast.feedback import PairwiseLabeler
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
    from rlaif_fast.feedback import pair_label_from_orders

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
