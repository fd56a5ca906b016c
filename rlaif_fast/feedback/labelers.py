"""AI labelers: the paper's debiased pairwise preference, d-RLAIF scores, and plain rule rewards.

Pairwise (Lee et al. 2023, arXiv 2309.00267, section 2.1): the labeler reads the pair in order (a, b)
and in order (b, a); in each order P(first is better) = softmax over the log-probs of the tokens "1" and
"2". The two estimates of P(a > b) are averaged, which cancels the labeler's position bias to first
order, and the result is kept soft (a number in [0, 1]) for the reward model's soft-label loss.

d-RLAIF (section 2.2.2): the labeler rates one response; s = sum_i i * P(i) over the score tokens
"1".."10" (P = softmax over their sequence log-probs), rescaled to [-1, 1] and used as the reward.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from rlaif_fast.feedback.templates import load_template

PAIR_CANDIDATES = ("1", "2")
SCORE_CANDIDATES = tuple(str(i) for i in range(1, 11))


@dataclass(frozen=True)
class PairLabel:
    """One AI preference.

    p_a: debiased soft label P(a > b) = (p_a_ab + p_a_ba) / 2, in [0, 1].
    p_a_ab: P(a > b) with a shown first; p_a_ba: P(a > b) with b shown first (= P("2") in that order).
    consistent: both orders preferred the same response (False = the labeler picked the same position).
    entropy: binary entropy of p_a in nats (0 = certain, ln 2 = undecided).
    rationales: the chain-of-thought rationales of the two orders, when chain of thought was used.
    """

    p_a: float
    p_a_ab: float
    p_a_ba: float
    consistent: bool
    entropy: float
    rationales: tuple[str, str] | None = None

    @property
    def preferred(self) -> int:
        """0 when a is preferred, 1 when b is, by the debiased label (ties go to a)."""
        return 0 if self.p_a >= 0.5 else 1

    def to_dict(self) -> dict:
        return asdict(self)


def _binary_entropy(p: float) -> float:
    return -sum(x * math.log(x) for x in (p, 1.0 - p) if x > 0.0)


def _check_texts(name: str, values, n: int | None = None) -> list[str]:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a list of str, got {type(values).__name__}")
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(v).__name__}")
    if n is not None and len(values) != n:
        raise ValueError(f"{name} has {len(values)} items but contexts has {n}; give one per context")
    return list(values)


def _check_nonempty(name: str, values: list[str]) -> None:
    for i, v in enumerate(values):
        if not v.strip():
            raise ValueError(f"{name}[{i}] is empty ({v!r}); the labeler cannot judge an empty response")


def pair_label_from_orders(p_first_ab: float, p_first_ba: float) -> PairLabel:
    """Combine P("1") of order (a, b) and P("1") of order (b, a) into a debiased :class:`PairLabel`."""
    p_ab, p_ba = float(p_first_ab), 1.0 - float(p_first_ba)
    p_a = 0.5 * (p_ab + p_ba)
    return PairLabel(
        p_a=p_a,
        p_a_ab=p_ab,
        p_a_ba=p_ba,
        consistent=(p_ab > 0.5) == (p_ba > 0.5),
        entropy=_binary_entropy(p_a),
    )


class PairwiseLabeler:
    """The RLAIF paper's AI preference labeler.

    Args:
        backend: an :class:`~rlaif_fast.feedback.HFBackend`, an
            :class:`~rlaif_fast.feedback.OpenAICompatibleBackend`, or anything with
            ``candidate_logprobs(prompts, candidates) -> (N, K)`` and ``generate(prompts, max_new_tokens)``.
        template: a :class:`Template`, a built-in name ("summarization", "summarization-detailed",
            "helpfulness", "harmlessness"), a template file, or a string with ``{context}``, ``{first}``,
            ``{second}``.
        chain_of_thought: two steps: generate a rationale greedily, then score "1"/"2" after it.
        max_rationale_tokens: length of the generated rationale.
    """

    def __init__(
        self,
        backend,
        template="summarization",
        *,
        chain_of_thought: bool = False,
        max_rationale_tokens: int = 64,
    ):
        self.backend = backend
        self.template = load_template(template)
        self.chain_of_thought = bool(chain_of_thought)
        self.max_rationale_tokens = int(max_rationale_tokens)
        check = getattr(backend, "check_candidates", None)
        if check is not None:  # a tokenizer without "1"/"2" fails here, before any model runs
            check(PAIR_CANDIDATES, single_token=True, probe=self.template.ending or "=")

    def _prompts(self, contexts, firsts, seconds):
        """Both orders of every pair, interleaved (a,b), (b,a), ... so that they share a batch."""
        parts = []
        for c, a, b in zip(contexts, firsts, seconds):
            parts.append(self.template.pairwise_parts(c, a, b, chain_of_thought=self.chain_of_thought))
            parts.append(self.template.pairwise_parts(c, b, a, chain_of_thought=self.chain_of_thought))
        return parts

    def label(
        self, contexts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str]
    ) -> list[PairLabel]:
        """Soft, position-debiased preferences P(a > b), one :class:`PairLabel` per pair."""
        contexts = _check_texts("contexts", contexts)
        responses_a = _check_texts("responses_a", responses_a, len(contexts))
        responses_b = _check_texts("responses_b", responses_b, len(contexts))
        _check_nonempty("responses_a", responses_a)
        _check_nonempty("responses_b", responses_b)
        if not contexts:
            return []
        prompts = self._prompts(contexts, responses_a, responses_b)
        rationales = None
        if self.chain_of_thought:
            rationales = self.backend.generate(prompts, max_new_tokens=self.max_rationale_tokens)
            # None: the backend failed to generate it (on_error="nan"); "" is a genuine empty rationale
            prompts = [p.extend((r or "") + "\n" + self.template.ending) for p, r in zip(prompts, rationales)]
        logp = self.backend.candidate_logprobs(prompts, PAIR_CANDIDATES)  # (2N, 2)
        p_first = torch.softmax(logp.double(), dim=-1)[:, 0].tolist()  # P("1") per prompt
        if rationales is not None:  # a pair whose rationale failed is failed (NaN), not judged without one
            p_first = [math.nan if r is None else x for x, r in zip(p_first, rationales)]
        labels = []
        for i in range(len(contexts)):
            lab = pair_label_from_orders(p_first[2 * i], p_first[2 * i + 1])
            if rationales is not None:
                lab = PairLabel(**{**lab.to_dict(), "rationales": (rationales[2 * i], rationales[2 * i + 1])})
            labels.append(lab)
        return labels

    __call__ = label


class ScoreLabeler:
    """d-RLAIF: the labeler's expected 1-10 rating, rescaled to [-1, 1], usable directly as a reward.

    ``score(contexts, responses)`` and ``labeler(prompts, completions)`` both return ``list[float]``.
    """

    def __init__(self, backend, template="summarization", *, min_score: int = 1, max_score: int = 10):
        if not (isinstance(min_score, int) and isinstance(max_score, int) and 0 <= min_score < max_score):
            raise ValueError(f"need integers 0 <= min_score < max_score, got {min_score!r}, {max_score!r}")
        self.backend = backend
        self.template = load_template(template)
        self.template.score_parts("", "x")  # a template without a score prompt fails here
        self.candidates = tuple(str(i) for i in range(min_score, max_score + 1))
        self._values = torch.arange(min_score, max_score + 1, dtype=torch.float64)
        check = getattr(backend, "check_candidates", None)
        if check is not None:
            check(self.candidates, single_token=False, probe=self.template.score_ending or "=")

    def expected_scores(self, contexts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """(N,) float64 expected rating sum_i i * P(i) on the template's scale."""
        contexts = _check_texts("contexts", contexts)
        responses = _check_texts("responses", responses, len(contexts))
        _check_nonempty("responses", responses)
        if not contexts:
            return torch.zeros(0, dtype=torch.float64)
        prompts = [self.template.score_parts(c, r) for c, r in zip(contexts, responses)]
        probs = torch.softmax(self.backend.candidate_logprobs(prompts, self.candidates).double(), dim=-1)
        return probs @ self._values  # (N,)

    def score(self, contexts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """Rewards in [-1, 1]: (s - min) / (max - min) * 2 - 1."""
        lo, hi = self._values[0], self._values[-1]
        s = self.expected_scores(contexts, responses)
        return ((s - lo) / (hi - lo) * 2 - 1).clamp(-1.0, 1.0).tolist()

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        return self.score(prompts, completions)


class RuleReward:
    """Any callable ``fn(prompts, completions) -> scores`` as a reward, with its output checked.

    For tasks with a checkable answer (arithmetic, unit tests) where no labeler is needed.
    """

    def __init__(self, fn: Callable[[list[str], list[str]], Sequence[float]]):
        if not callable(fn):
            raise TypeError(
                f"RuleReward needs a callable (prompts, completions) -> scores, got {type(fn).__name__}"
            )
        self.fn = fn

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        prompts = _check_texts("prompts", prompts)
        completions = _check_texts("completions", completions, len(prompts))
        out = self.fn(prompts, completions)
        if isinstance(out, torch.Tensor):
            out = out.detach().double().flatten().tolist()
        out = [float(x) for x in out]
        if len(out) != len(prompts):
            raise ValueError(
                f"the rule returned {len(out)} scores for {len(prompts)} completions; return one each"
            )
        bad = [(i, x) for i, x in enumerate(out) if not math.isfinite(x)]
        if bad:
            raise ValueError(f"the rule returned non-finite scores at (index, value) {bad[:5]}")
        return out
