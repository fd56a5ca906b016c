"""The demo's AI labeler: a tiny causal LM trained to answer the paper's pairwise prompt with "1" or "2",
and (when the template has a d-RLAIF score prompt) its score prompt with a rating "1".."10".

The demo has no LLM to ask, so it makes one for its task: a small GPT-2 is trained on exactly the prompt
text that ``rlaif_fast.feedback`` renders (preamble, ``Text - ...``, ``Summary 1 - ...``, ``Summary 2 - ...``,
``Preferred Summary=``) followed by the token of the sentence with the higher ground-truth score, and on
the score prompt followed by the ground truth bucketed to 1..10 (:func:`score_token`). After training it is
an ordinary ``transformers`` model and is queried ONLY through ``PairwiseLabeler`` / ``ScoreLabeler`` +
``HFBackend``, the path a user points at a real LLM. It is small (about a hundred thousand parameters, a few
hundred steps of training) and so imperfect: its alignment with the ground truth and its position bias are
real measurements, not constants.

The trained model is cached under ``cache_dir`` keyed by everything that shapes it (template text,
vocabulary, size, steps, seed): a second demo run loads it in a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

from . import task as T

Render = Callable[[str, str, str], str]
RenderScore = Callable[[str, str], str]


def score_token(gt: float) -> int:
    """The ground truth in [-1, 1] bucketed to the rating 1..10: ten equal-width bins, 1 = worst."""
    return 1 + min(9, max(0, int((gt + 1.0) / 2.0 * 10)))


def _random_sentence(rng: random.Random, topic: str) -> str:
    """A sentence spanning the polarity range; one in five is about another topic."""
    about = topic if rng.random() > 0.2 else rng.choice(T.TOPICS)
    return T.sample_sentence(rng, about, p_positive=rng.random())


def labeler_pairs(n: int, seed: int) -> list[tuple[str, str, str, int]]:
    """``n`` (prompt, first, second, winner) examples with distinct ground truths; winner is 1 or 2.

    Sentences span the whole polarity range (each draws its own share of positive words) and one in five
    is about another topic, so the labeler sees both parts of the score. Ties are redrawn.
    """
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        topic = rng.choice(T.TOPICS)
        prompt = T.make_prompt(topic)
        pair = [_random_sentence(rng, topic) for _ in range(2)]
        g1, g2 = T.ground_truth(prompt, pair[0]), T.ground_truth(prompt, pair[1])
        if abs(g1 - g2) < 1e-9:
            continue
        out.append((prompt, pair[0], pair[1], 1 if g1 > g2 else 2))
    return out


def labeler_scores(n: int, seed: int) -> list[tuple[str, str, int]]:
    """``n`` (prompt, response, rating) examples for the score prompt; rating = ``score_token(ground truth)``."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = T.make_prompt(rng.choice(T.TOPICS))
        response = _random_sentence(rng, T.topic_of(prompt))
        out.append((prompt, response, score_token(T.ground_truth(prompt, response))))
    return out


def cache_key(
    render: Render, dim: int, steps: int, seed: int, render_score: RenderScore | None = None
) -> str:
    """Hash of what determines the trained labeler; the template enters through one rendered example."""
    probe = render("<context>", "<first>", "<second>")
    score_probe = render_score("<context>", "<response>") if render_score is not None else None
    blob = json.dumps([probe, score_probe, T.vocabulary(), dim, steps, seed, "v3"])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_labeler_model(vocab_size: int, dim: int, max_positions: int, seed: int):
    """A small GPT-2 from a config (nothing downloaded): the same architecture as the demo policy."""
    from rlaif_fast.pipeline.sft import build_policy

    return build_policy(vocab_size, dim=dim, layers=2, max_positions=max_positions, seed=seed)


def train_labeler(
    render: Render,
    tokenizer,
    *,
    dim: int = 64,
    steps: int = 600,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
    render_score: RenderScore | None = None,
):
    """Train the labeler LM on rendered pairwise prompts; returns the model in eval mode.

    Loss: next-token cross-entropy (over the full vocabulary, as for any LM) of the answer token "1"/"2"
    at the prompt's last position. Both orders of every pair are in the data, so a position bias left in
    the model is a failure to learn, as in a real LLM, not a property of the data. With ``render_score``
    every step also carries ``batch_size // 2`` score prompts whose answer is the bucketed rating; they
    are drawn with their own generator, so the pairwise batches are the same with or without them.
    """
    import torch
    from tqdm.auto import tqdm

    from rlaif_fast.pipeline.sft import warmup_linear

    examples = labeler_pairs(steps * batch_size // 2 + batch_size, seed)
    enc, aux, answers = [], [], []
    for prompt, a, b, winner in examples:  # both orders of each pair
        for first, second, answer in ((a, b, winner), (b, a, 3 - winner)):
            ids = tokenizer(render(prompt, first, second), add_special_tokens=False)["input_ids"]
            enc.append(ids)
            aux.append(_aux_targets(tokenizer, ids, prompt, first, second))
            answers.append(answer)
    n_score = batch_size // 2 if render_score is not None else 0
    score_enc, score_aux, score_answers = [], [], []
    for prompt, response, rating in labeler_scores(steps * n_score, seed + 1) if n_score else []:
        ids = tokenizer(render_score(prompt, response), add_special_tokens=False)["input_ids"]
        score_enc.append(ids)
        score_aux.append(_aux_targets(tokenizer, ids, prompt, response))
        score_answers.append(rating)
    answer_ids = {k: _answer_token(tokenizer, str(k)) for k in range(1, 11 if n_score else 3)}
    # room for policy responses longer than the training sentences (positions past training are untrained)
    model = build_labeler_model(len(tokenizer), dim, max(128, max(len(x) for x in enc) + 32), seed)
    aux_head = torch.nn.Linear(dim, 4)  # dropped after training
    model.train()
    params = list(model.parameters()) + list(aux_head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = warmup_linear(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    score_gen = torch.Generator().manual_seed(seed + 1)
    bar = tqdm(range(steps), desc="labeler LM", disable=not progress, leave=False)
    for _ in bar:
        idx = torch.randint(len(enc), (batch_size,), generator=gen).tolist()
        sdx = torch.randint(max(1, len(score_enc)), (n_score,), generator=score_gen).tolist()
        seqs = [enc[i] for i in idx] + [score_enc[i] for i in sdx]
        ids, mask, last = _right_pad(seqs, tokenizer.pad_token_id)
        aux_t, _, _ = _right_pad([aux[i] for i in idx] + [score_aux[i] for i in sdx], 0.0)  # (B, T, 4)
        target = torch.tensor(
            [answer_ids[answers[i]] for i in idx] + [answer_ids[score_answers[i]] for i in sdx]
        )
        hidden = model.transformer(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, H)
        logits = model.lm_head(hidden[torch.arange(len(seqs)), last])  # (B, V): last position only
        aux_err = (aux_head(hidden) - aux_t).pow(2).sum(-1)  # (B, T)
        aux_loss = (aux_err * mask).sum() / mask.sum()
        loss = torch.nn.functional.cross_entropy(logits, target)
        opt.zero_grad(set_to_none=True)
        (loss + aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", aux=f"{aux_loss.item():.3f}")
    return model.eval()


def load_or_train_labeler(
    render: Render,
    tokenizer,
    cache_dir: str | Path,
    *,
    dim: int = 64,
    steps: int = 600,
    seed: int = 0,
    progress: bool = True,
    render_score: RenderScore | None = None,
):
    """The cached labeler for this template and size, training and saving it on first use."""
    from transformers import GPT2LMHeadModel

    path = Path(cache_dir) / f"labeler-{cache_key(render, dim, steps, seed, render_score)}"
    if (path / "config.json").is_file():
        return GPT2LMHeadModel.from_pretrained(path).eval(), path
    model = train_labeler(
        render, tokenizer, dim=dim, steps=steps, seed=seed, progress=progress, render_score=render_score
    )
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")  # one per process: two runs may train at once
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.replace(path)  # atomic: a killed demo never leaves a half-written cache entry
    except OSError:
        if not (path / "config.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another run published the same labeler first: keep it
    return model, path


def _answer_token(tokenizer, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        raise ValueError(f"the labeler's tokenizer has no single token for {text!r} (got ids {ids})")
    return ids[0]


def _aux_targets(tokenizer, ids: list[int], prompt: str, *candidates: str) -> list[list[float]]:
    """Per-token running features of the candidates: (sentiment 1, sentiment 2, topic 1, topic 2); a score
    prompt has one candidate, and its second-candidate features stay 0.

    Why: trained on the final answer alone, a 2-layer model stays at chance for thousands of steps (it
    must find both candidates and count words in each before the answer carries any gradient). These
    dense targets teach it to find and count first; the head that reads them is thrown away.
    """
    vocab = tokenizer.get_vocab()
    sign = {vocab[w]: 1.0 for w in T.POSITIVE} | {vocab[w]: -1.0 for w in T.NEGATIVE}
    topic = vocab.get(T.topic_of(prompt))
    rows, state = [], [0.0, 0.0, 0.0, 0.0]
    spans = _find_spans(ids, [tokenizer(x, add_special_tokens=False)["input_ids"] for x in candidates])
    for t, tok in enumerate(ids):
        for k, (lo, hi) in enumerate(spans):
            if lo <= t < hi:
                state[k] += sign.get(tok, 0.0)
                state[2 + k] = max(state[2 + k], float(tok == topic))
        rows.append(list(state))
    return rows


def _find_spans(ids: list[int], parts: list[list[int]]) -> list[tuple[int, int]]:
    """[lo, hi) of each part in ``ids``, searched in order, each after the previous (from the end of the
    context on, so a candidate never matches inside the prompt)."""
    spans, start = [], 0
    for part in parts:
        for lo in range(start, len(ids) - len(part) + 1):
            if ids[lo : lo + len(part)] == part:
                spans.append((lo, lo + len(part)))
                start = lo + len(part)
                break
        else:
            spans.append((0, 0))
    return spans


def _right_pad(seqs: list, pad_value):
    import torch

    width = max(len(s) for s in seqs)
    tail = (len(seqs[0][0]),) if isinstance(seqs[0][0], list) else ()
    dtype = torch.float32 if isinstance(pad_value, float) else torch.long
    ids = torch.full((len(seqs), width, *tail), pad_value, dtype=dtype)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=dtype)
        mask[i, : len(s)] = 1
    last = mask.sum(1) - 1  # (B,) index of the last real token
    return ids, mask, last
