"""The paper's evaluation numbers for AI labels and reward models (arXiv 2309.00267, section 3.3)."""

from __future__ import annotations

from collections.abc import Sequence


def _pairs(name_a, a, name_b, b):
    a, b = list(a), list(b)
    if len(a) != len(b):
        raise ValueError(f"{name_a} has {len(a)} items but {name_b} has {len(b)}; give one per pair")
    if not a:
        raise ValueError(f"{name_a} is empty; metrics need at least one pair")
    return a, b


def ai_human_alignment(p_a: Sequence[float], human_a: Sequence[bool]) -> float:
    """Fraction of pairs where the binarized soft label (p_a > 0.5) matches the human choice; ties count 1/2."""
    p_a, human_a = _pairs("p_a", p_a, "human_a", human_a)
    return sum(0.5 if p == 0.5 else float((p > 0.5) == bool(h)) for p, h in zip(p_a, human_a)) / len(p_a)


def position_bias_rate(p_a_ab: Sequence[float], p_a_ba: Sequence[float]) -> float:
    """Fraction of pairs where the labeler preferred the same position in both orders (inconsistent)."""
    p_a_ab, p_a_ba = _pairs("p_a_ab", p_a_ab, "p_a_ba", p_a_ba)
    return sum((x > 0.5) != (y > 0.5) for x, y in zip(p_a_ab, p_a_ba)) / len(p_a_ab)


def pairwise_accuracy(r_a: Sequence[float], r_b: Sequence[float], a_preferred: Sequence) -> float:
    """Fraction of pairs where the reward model ranks the preferred response higher; equal rewards count 1/2.

    ``a_preferred``: booleans, or soft labels p_a of any numeric type (a list, a tensor, a numpy array),
    binarized at 0.5; a label of exactly 0.5 prefers neither response and counts 1/2, as in
    :func:`ai_human_alignment`.
    """
    r_a, r_b = _pairs("r_a", r_a, "r_b", r_b)
    _, a_preferred = _pairs("r_a", r_a, "a_preferred", a_preferred)
    score = 0.0
    for x, y, pref in zip(r_a, r_b, a_preferred):
        # bool -> 0/1; a 0-dim tensor or numpy scalar -> its value (bool() of one would mean "nonzero")
        p = float(pref)
        score += 0.5 if x == y or p == 0.5 else float((x > y) == (p > 0.5))
    return score / len(r_a)
