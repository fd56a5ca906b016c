"""The demo's embedded task: "write a happy sentence about X", in a word-level toy language.

Why a toy language: the whole RLAIF loop (SFT, an LM labeler, a reward model, RL, evaluation) must run
offline on 2 CPU cores in a few minutes, and the result must be checkable. Every sentence is built from a
few hundred words, so a policy of a few hundred thousand parameters learns the language in seconds, and
the ground truth is a function of the text:

    polarity(c) = (#positive - #negative) / (#positive + #negative + 1)       in (-1, 1)
    topic(c)    = +1 if the prompt's topic word appears in c, else -1
    score(c)    = 0.8 * polarity(c) + 0.2 * topic(c)                           in [-1, 1]

The SFT data mixes positive and negative adjectives 50/50, so the SFT policy scores about 0.2 and there is
room to improve; the AI labeler is an LM trained to prefer the higher-scoring sentence, so its preferences
carry this signal imperfectly, as a real labeler's do.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

TOPICS = (
    "cat dog bird fish horse garden river forest city village house ship train king queen child "
    "teacher doctor farmer baker robot moon sun sea mountain road market school song book"
).split()
POSITIVE = (
    "good happy kind bright warm lovely gentle brave calm clever joyful cheerful friendly sweet proud "
    "lucky graceful wonderful peaceful pleasant"
).split()
NEGATIVE = (
    "bad sad cruel dark cold gloomy angry lonely nasty bitter tired scary grim dull rude broken ugly "
    "awful noisy weak"
).split()
NEUTRAL_ADJ = "old big small little red blue green tall young round".split()
VERBS = "sat walked sang slept stood ran looked waited rested stayed".split()
FUNCTION = "the a is was and very so with near by in on under of to it".split()
PROMPT_WORDS = "write happy sentence about".split()
# Words that the labeler's prompt templates use; anything else there becomes [UNK], which is harmless.
TEMPLATE_WORDS = (
    "text summary summaries preferred which better more is a an the of and or to be given two above below "
    "response responses dialogue context explain first second answer rationale consider overall quality "
    "helpful harmless coherence accuracy coverage task goal you are expert rate score from how good say "
    "happier topic request conversation reply replies assistant person"
).split()
PUNCT = [".", ",", ":", ";", "-", "=", "?", "!", "(", ")", "'", '"', "/", "[", "]", "#", "*", "_"]
DIGITS = [str(i) for i in range(11)]
SPECIAL = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]

_POS, _NEG = frozenset(POSITIVE), frozenset(NEGATIVE)
_WORD = re.compile(r"\w+|[^\w\s]+")

# Sentence patterns. Slots: T topic, A sentiment adjective, N neutral adjective, X other noun, V verb.
PATTERNS = (
    "the T is A .",
    "the T is A and A .",
    "the A T V near the X .",
    "a N T V with a A X .",
    "the T looked A , very A .",
    "the T was so A .",
    "the N T is A .",
    "a A T V by the A X .",
)


def words(text: str) -> list[str]:
    """The tokenizer's pre-tokenization: words and runs of punctuation, lower-cased."""
    return _WORD.findall(text.lower())


def polarity(completion: str) -> float:
    """(#positive - #negative) / (#positive + #negative + 1): more sentiment words, stronger polarity."""
    ws = words(completion)
    pos = sum(w in _POS for w in ws)
    neg = sum(w in _NEG for w in ws)
    return (pos - neg) / (pos + neg + 1)


def topic_of(prompt: str) -> str:
    """The topic word of a task prompt ("write a happy sentence about the cat :" -> "cat")."""
    ws = words(prompt)
    if "about" not in ws:
        raise ValueError(f"prompt {prompt!r} is not a task prompt; build prompts with make_prompt(topic)")
    tail = [w for w in ws[ws.index("about") + 1 :] if w not in ("the", "a", ":")]
    if not tail:
        raise ValueError(f"prompt {prompt!r} names no topic after 'about'")
    return tail[0]


def ground_truth(prompt: str, completion: str) -> float:
    """score = 0.8 * polarity + 0.2 * (+1 if the prompt's topic is mentioned else -1), in [-1, 1]."""
    topic = +1.0 if topic_of(prompt) in words(completion) else -1.0
    return 0.8 * polarity(completion) + 0.2 * topic


def ground_truth_reward(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """The ground truth as a reward callable ``(prompts, completions) -> list[float]`` (for evaluation)."""
    if len(prompts) != len(completions):
        raise ValueError(
            f"got {len(prompts)} prompts but {len(completions)} completions; pass one per prompt"
        )
    return [ground_truth(p, c) for p, c in zip(prompts, completions)]


def make_prompt(topic: str) -> str:
    if topic not in TOPICS:
        raise ValueError(f"topic {topic!r} is not in the task's vocabulary; use one of TOPICS")
    return f"write a happy sentence about the {topic} :"


def sample_sentence(rng: random.Random, topic: str, p_positive: float = 0.5) -> str:
    """One sentence about ``topic``; each sentiment slot is positive with probability ``p_positive``."""
    out = []
    for slot in rng.choice(PATTERNS).split():
        if slot == "T":
            out.append(topic)
        elif slot == "A":
            out.append(rng.choice(POSITIVE if rng.random() < p_positive else NEGATIVE))
        elif slot == "N":
            out.append(rng.choice(NEUTRAL_ADJ))
        elif slot == "X":
            out.append(rng.choice([t for t in TOPICS if t != topic]))
        elif slot == "V":
            out.append(rng.choice(VERBS))
        else:
            out.append(slot)
    return " ".join(out)


@dataclass(frozen=True)
class Split:
    """Disjoint prompt sets: training topics are seen by SFT and RL, eval topics only at evaluation."""

    train: list[str]
    eval: list[str]


def prompt_split(n_eval_topics: int = 6) -> Split:
    """Fixed split of the 30 topics; evaluation prompts use topics the RL stage never trained on."""
    if not 0 < n_eval_topics < len(TOPICS):
        raise ValueError(f"n_eval_topics={n_eval_topics}; use 1..{len(TOPICS) - 1}")
    eval_topics = TOPICS[-n_eval_topics:]
    train_topics = TOPICS[:-n_eval_topics]
    return Split([make_prompt(t) for t in train_topics], [make_prompt(t) for t in eval_topics])


def sft_corpus(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` (prompt, completion) pairs over all topics, sentiment mixed 50/50 (so SFT leaves room for RL)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        out.append((make_prompt(topic), sample_sentence(rng, topic, p_positive=0.5)))
    return out


def vocabulary() -> list[str]:
    """Every token of the toy language, special tokens first (ids 0..3), deduplicated in a fixed order."""
    seen: dict[str, None] = {}
    for group in (
        SPECIAL,
        PUNCT,
        DIGITS,
        TOPICS,
        POSITIVE,
        NEGATIVE,
        NEUTRAL_ADJ,
        VERBS,
        FUNCTION,
        PROMPT_WORDS,
        TEMPLATE_WORDS,
    ):
        for w in group:
            seen.setdefault(w, None)
    return list(seen)


def build_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` for the toy language, built offline with ``tokenizers``.

    Lower-cases, splits words from punctuation (so "Summary=" is "summary", "="), maps unknown words to
    [UNK], and appends [EOS] to nothing by itself (the trainer adds EOS where it needs one).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # joins tokens with single spaces: the inverse of the pre-tokenizer for this language
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]"
    )
