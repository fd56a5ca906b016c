"""Labeler prompts as in the RLAIF paper (Lee et al. 2023, arXiv 2309.00267, section 2.1 and appendix).

A prompt has four parts: a preamble that states the task ("base": say which is better; "detailed": spell
out the criteria), optional few-shot exemplars, the sample (``Text - ... / Summary 1 - ... / Summary 2 -
...``) and an ending (``Preferred Summary=``) after which the labeler's next token is "1" or "2".
Chain of thought swaps the ending for an instruction to reason, then appends the rationale and the
ending. d-RLAIF uses the same shape with one response and an ending after which the next token is a
score "1".."10".

Placeholders are ``{context}``, ``{first}``, ``{second}`` (pairwise) and ``{context}``, ``{response}``
(score). They are substituted in one pass, so braces in the texts themselves are never re-read.
The context is rendered as a separate segment (:class:`PromptParts`) so that a backend with a length
limit can cut it from the left while the responses and the ending stay intact.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

_PLACEHOLDER = re.compile(r"\{(context|first|second|response)\}")
PAIRWISE_FIELDS = ("context", "first", "second")
SCORE_FIELDS = ("context", "response")


@dataclass(frozen=True)
class PromptParts:
    """A rendered prompt split so that only ``context`` may be truncated (from its left)."""

    head: str
    context: str
    tail: str

    @property
    def text(self) -> str:
        return self.head + self.context + self.tail

    def extend(self, suffix: str) -> PromptParts:
        return PromptParts(self.head, self.context, self.tail + suffix)


def _check_fields(name: str, text: str, required: tuple[str, ...]) -> None:
    found = _PLACEHOLDER.findall(text)
    for f in required:
        n = found.count(f)
        if n != 1:
            raise ValueError(
                f"template {name!r} must contain the placeholder {{{f}}} exactly once, found it {n} times in "
                f"{text[:120]!r}; add it (placeholders: {', '.join('{' + r + '}' for r in required)})"
            )


def _render_parts(sample: str, values: dict[str, str]) -> PromptParts:
    """Substitute placeholders in one pass; split around {context} so it can be truncated alone."""
    pre, post = sample.split("{context}", 1)
    sub = lambda s: _PLACEHOLDER.sub(lambda m: values[m.group(1)], s)
    return PromptParts(sub(pre), values["context"], sub(post))


@dataclass(frozen=True)
class Template:
    """A labeler prompt: preamble + exemplars + sample + ending, for pairwise and score labeling.

    Fields:
        name: label used in error messages and job summaries.
        preamble: task description placed first ("base" or "detailed" in the paper's terms).
        sample: pairwise sample with ``{context}``, ``{first}``, ``{second}`` exactly once each.
        ending: text after which the labeler's next token is "1" or "2" (e.g. ``Preferred Summary=``).
        exemplars: few-shot examples, dicts with context / first / second / preferred ("1" or "2").
        cot_ending: replaces ``ending`` in step one of chain of thought; the rationale is generated after it.
        score_preamble / score_sample / score_ending: the d-RLAIF prompt (``{context}``, ``{response}``).
    """

    name: str
    preamble: str
    sample: str
    ending: str
    exemplars: tuple[dict, ...] = ()
    cot_ending: str = (
        "\nConsider the coherence, accuracy, coverage, and overall quality of each response and explain "
        "which one is better.\nRationale:"
    )
    score_preamble: str = ""
    score_sample: str = ""
    score_ending: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        _check_fields(self.name, self.sample, PAIRWISE_FIELDS)
        for key in ("ending", "score_ending"):
            value = getattr(self, key)
            if value and value != value.rstrip():
                # BPE tokenizers join a trailing space with the digit (" 1" is one token): the local backend
                # would score "1" after a lone space while a served model scores " 1", and neither is the
                # token the labeler would emit after that text
                raise ValueError(
                    f"template {self.name!r} {key}={value!r} ends with whitespace; end it right before the "
                    f"answer (e.g. {value.rstrip()!r}), as the paper's 'Preferred Summary=' does"
                )
        if self.score_sample:
            _check_fields(self.name + ".score_sample", self.score_sample, SCORE_FIELDS)
        for i, ex in enumerate(self.exemplars):
            missing = [k for k in (*PAIRWISE_FIELDS, "preferred") if k not in ex]
            if missing or str(ex.get("preferred")) not in ("1", "2"):
                raise ValueError(
                    f"template {self.name!r} exemplar {i} must have context, first, second and preferred "
                    f"('1' or '2'); got keys {sorted(ex)} and preferred={ex.get('preferred')!r}"
                )

    # ---- pairwise ----
    def _few_shot(self) -> str:
        shots = []
        for ex in self.exemplars:
            p = _render_parts(self.sample, {k: str(ex[k]) for k in PAIRWISE_FIELDS})
            shots.append(p.text + self.ending + str(ex["preferred"]) + "\n\n")
        return "".join(shots)

    def pairwise_parts(self, context: str, first: str, second: str, *, chain_of_thought: bool = False):
        """The pairwise prompt as :class:`PromptParts`; with CoT it ends with the rationale instruction."""
        p = _render_parts(self.sample, {"context": context, "first": first, "second": second})
        ending = self.cot_ending if chain_of_thought else self.ending
        return PromptParts(self.preamble + self._few_shot() + p.head, p.context, p.tail + ending)

    def render_pairwise(
        self, context: str, first: str, second: str, *, chain_of_thought: bool = False
    ) -> str:
        """Exactly the text the labeler reads before its "1"/"2" token (use it to train a labeler)."""
        return self.pairwise_parts(context, first, second, chain_of_thought=chain_of_thought).text

    # ---- d-RLAIF score ----
    def score_parts(self, context: str, response: str) -> PromptParts:
        if not self.score_sample:
            raise ValueError(
                f"template {self.name!r} has no score_sample; give one with {{context}} and {{response}} "
                "to use it with ScoreLabeler"
            )
        p = _render_parts(self.score_sample, {"context": context, "response": response})
        return PromptParts(self.score_preamble + p.head, p.context, p.tail + self.score_ending)

    def render_score(self, context: str, response: str) -> str:
        """Exactly the text the labeler reads before its score token "1".."10"."""
        return self.score_parts(context, response).text

    # ---- construction ----
    @classmethod
    def from_string(cls, sample: str, *, name: str = "user", **fields) -> Template:
        """A user template from one string with named placeholders (the preamble may be inside it)."""
        if not isinstance(sample, str):
            raise TypeError(f"template must be a str, got {type(sample).__name__}")
        fields.setdefault("preamble", "")
        fields.setdefault("ending", "")
        return cls(name=name, sample=sample, **fields)

    @classmethod
    def from_file(cls, path) -> Template:
        """``.json``/``.yaml``/``.yml``: a mapping of Template fields; any other file: one pairwise sample string."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"template file {str(path)!r} does not exist")
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".json", ".yaml", ".yml"):
            if path.suffix == ".json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text)
            if not isinstance(data, dict):
                raise ValueError(f"template file {str(path)!r} must hold a mapping of template fields")
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(data) - known)
            if unknown:
                raise ValueError(
                    f"template file {str(path)!r} has unknown fields {unknown}; known: {sorted(known)}"
                )
            data.setdefault("name", path.stem)
            data.setdefault("preamble", "")
            data.setdefault("ending", "")
            data["exemplars"] = tuple(data.get("exemplars") or ())
            return cls(**data)
        return cls.from_string(text, name=path.stem)


def load_template(spec) -> Template:
    """A built-in name (see :data:`BUILTIN`), a path to a template file, or a string with placeholders."""
    from rlaif_fast.feedback.builtin_templates import BUILTIN

    if isinstance(spec, Template):
        return spec
    if not isinstance(spec, (str, Path)):
        raise TypeError(
            f"template must be a Template, a built-in name, a path or a string, got {type(spec).__name__}"
        )
    s = str(spec)
    if s in BUILTIN:
        return BUILTIN[s]
    if "{" not in s and Path(s).is_file():
        return Template.from_file(s)
    if _PLACEHOLDER.search(s) is None:
        raise ValueError(
            f"template {s[:80]!r} is neither a built-in ({sorted(BUILTIN)}), an existing file, nor a string with "
            "placeholders {context}, {first}, {second}"
        )
    return Template.from_string(s)
