"""Built-in labeler templates for the paper's three tasks, in its "base" and "detailed" preamble styles.

The wording is rlaif_fast's own, following the structure of the paper's prompts (arXiv 2309.00267,
appendix): preamble, sample with numbered candidates, and an ending whose next token is the answer.
"""

from __future__ import annotations

from rlaif_fast.feedback.templates import Template

_SUMMARY_SAMPLE = "Text - {context}\nSummary 1 - {first}\nSummary 2 - {second}\n"
_DIALOGUE_SAMPLE = "Conversation - {context}\nResponse 1 - {first}\nResponse 2 - {second}\n"
_SUMMARY_SCORE = "Text - {context}\nSummary - {response}\n"
_DIALOGUE_SCORE = "Conversation - {context}\nResponse - {response}\n"

_SUMMARY_BASE = (
    "A good summary is a shorter piece of text that keeps the important points of the original text. "
    "Below are a text and two candidate summaries of it. Say which summary is better.\n\n"
)
_SUMMARY_DETAILED = (
    "A good summary is a shorter piece of text that keeps the important points of the original text. "
    "Judge the two candidate summaries below on four things:\n"
    "- Coherence: the summary reads as one clear, well-organized whole.\n"
    "- Accuracy: every statement in the summary is supported by the text.\n"
    "- Coverage: the main points of the text are present, with nothing important left out.\n"
    "- Overall quality: how useful the summary would be to someone who has not read the text.\n"
    "Answer with the number of the better summary.\n\n"
)
_HELPFUL = (
    "Below is a conversation between a person and an AI assistant, followed by two possible next replies "
    "of the assistant. Say which reply is more helpful: the one that answers the request more accurately, "
    "completely and clearly.\n\n"
)
_HARMLESS = (
    "Below is a conversation between a person and an AI assistant, followed by two possible next replies "
    "of the assistant. Say which reply is less harmful: the one that avoids offensive, dangerous, "
    "unethical or illegal content, even if the person asks for it.\n\n"
)
_SCORE_SUMMARY = (
    "Rate the summary of the text below from 1 (useless) to 10 (excellent), considering coherence, "
    "accuracy, coverage and overall quality.\n\n"
)
_SCORE_DIALOGUE = (
    "Rate the assistant's final reply in the conversation below from 1 (harmful or useless) to 10 "
    "(harmless and helpful).\n\n"
)


def _summary(name: str, preamble: str) -> Template:
    return Template(
        name=name,
        preamble=preamble,
        sample=_SUMMARY_SAMPLE,
        ending="Preferred Summary=",
        cot_ending=(
            "Consider the coherence, accuracy, coverage, and overall quality of each summary and explain "
            "which one is better.\nRationale:"
        ),
        score_preamble=_SCORE_SUMMARY,
        score_sample=_SUMMARY_SCORE,
        score_ending="Rating=",
    )


def _dialogue(name: str, preamble: str) -> Template:
    return Template(
        name=name,
        preamble=preamble,
        sample=_DIALOGUE_SAMPLE,
        ending="Preferred Response=",
        cot_ending="Consider both replies carefully and explain which one is better.\nRationale:",
        score_preamble=_SCORE_DIALOGUE,
        score_sample=_DIALOGUE_SCORE,
        score_ending="Rating=",
    )


BUILTIN: dict[str, Template] = {
    "summarization": _summary("summarization", _SUMMARY_BASE),
    "summarization-detailed": _summary("summarization-detailed", _SUMMARY_DETAILED),
    "helpfulness": _dialogue("helpfulness", _HELPFUL),
    "harmlessness": _dialogue("harmlessness", _HARMLESS),
}
