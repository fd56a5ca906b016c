"""Rollouts: sample completions with the policy, then lay them out as training batches.

Sampling goes through transformers' ``generate`` (KV cache, temperature, top-p, stop at EOS) on
left-padded prompts, so every prompt's last token sits in the same column. Training batches are
right-padded instead (prompt at position 0, as during generation once HF derives positions from the
mask), and each micro-batch is padded only to its own longest rollout when ``ops='fast'``
(``rlaif_fast.batching``) or to the longest of the whole batch when ``ops='reference'``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Rollouts:
    """A batch of sampled rollouts on one rank, token ids without padding."""

    prompts: list[str]
    completions: list[str]
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    scores: torch.Tensor | None = None  # (B,) rewards from the reward callable
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def lengths(self) -> list[int]:
        return [len(p) + len(r) for p, r in zip(self.prompt_ids, self.response_ids)]


def tokenizer_vocab_size(tokenizer) -> int:
    """Number of token ids the tokenizer can emit (``len(tokenizer)`` counts added special tokens)."""
    try:
        return len(tokenizer)
    except TypeError:
        return int(tokenizer.vocab_size)


def special_ids(tokenizer) -> tuple[int, int]:
    """(pad_id, eos_id); a tokenizer without a pad token pads with EOS, which the masks hide."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError(
            f"the tokenizer {type(tokenizer).__name__} has no eos_token_id; sampling needs one "
            "to stop completions: set tokenizer.eos_token_id"
        )
    pad = getattr(tokenizer, "pad_token_id", None)
    return (eos if pad is None else pad), eos


def encode_prompts(tokenizer, prompts: list[str], max_prompt_len: int) -> list[list[int]]:
    """Token ids of each prompt, keeping the last ``max_prompt_len`` tokens of long ones."""
    out = []
    for i, text in enumerate(prompts):
        if not isinstance(text, str):
            raise TypeError(f"prompts[{i}] is a {type(text).__name__}; prompts must be strings")
        ids = list(tokenizer.encode(text))
        if not ids:
            raise ValueError(f"prompts[{i}]={text!r} encodes to no tokens; drop empty prompts")
        out.append(ids[-max_prompt_len:])
    return out


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, T), sequences aligned to the right edge."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids, mask


@torch.no_grad()
def sample(
    policy,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    max_prompt_len: int,
    device: torch.device | str = "cpu",
    synced: bool = False,
) -> Rollouts:
    """Sample one completion per prompt (repeat prompts for groups). Temperature 0 decodes greedily.

    ``synced``: keep every rank decoding until all are done (ZeRO-3 gathers weights collectively, so a
    rank that stopped early at EOS would leave the others waiting forever).
    """
    pad_id, eos_id = special_ids(tokenizer)
    prompt_ids = encode_prompts(tokenizer, prompts, max_prompt_len)
    ids, mask = left_pad(prompt_ids, pad_id)
    greedy = temperature == 0
    kwargs = dict(
        do_sample=not greedy,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        use_cache=True,
        synced_gpus=synced,
    )
    if not greedy:
        kwargs.update(temperature=float(temperature), top_p=float(top_p), top_k=0)
    was_training = policy.training
    policy.eval()  # dropout off while sampling; the update turns it back on if the model had it on
    out = policy.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
    policy.train(was_training)
    new = out[:, ids.shape[1] :].cpu()  # (B, <= max_new_tokens)
    response_ids = []
    for row in new.tolist():
        # keep EOS (its log-prob is trained: stopping is an action), drop what generate padded after it
        cut = row.index(eos_id) + 1 if eos_id in row else len(row)
        response_ids.append(row[:cut])
    completions = [tokenizer.decode(r, skip_special_tokens=True) for r in response_ids]
    return Rollouts(list(prompts), completions, prompt_ids, response_ids)


@dataclass
class TrainBatch:
    """One right-padded micro-batch. ``resp_index[b, j]`` is the column of response token j of row b."""

    input_ids: torch.Tensor  # (b, T)
    attention_mask: torch.Tensor  # (b, T)
    response_mask: torch.Tensor  # (b, T) 1 on response tokens
    resp_index: torch.Tensor  # (b, L) column of each response token, clamped to T - 1 on padding
    resp_mask: torch.Tensor  # (b, L) 1 where response token j exists
    rows: list[int]  # rows of the rank's batch that this micro-batch holds
    # packed (trainer/packing.py): one row (1, T), positions restarting per rollout, resp_index flat columns
    position_ids: torch.Tensor | None = None


def _pad_right_python(prompt_ids, response_ids, pad_id, width):
    b = len(prompt_ids)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    attn = torch.zeros((b, width), dtype=torch.long)
    resp = torch.zeros((b, width), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r, dtype=torch.long)
        attn[i, :n] = 1
        resp[i, len(p) : n] = 1
    return ids, attn, resp


def _pad_right(prompt_ids, response_ids, pad_id, width, fast: bool):
    if fast:  # no fallback: an import error here is a broken install, not a reason to run the slow loop
        from rlaif_fast.batching import pad_rollouts

        out = pad_rollouts(
            prompt_ids, response_ids, pad_id, padding_side="right", max_len=width, truncation="error"
        )
        return out.input_ids, out.attention_mask, out.response_mask.long()
    return _pad_right_python(prompt_ids, response_ids, pad_id, width)


def train_batch(
    rollouts: Rollouts, chunk: list[int], pad_id: int, *, fast: bool, batch_width: int
) -> TrainBatch:
    """Rows ``chunk`` of ``rollouts`` as one right-padded micro-batch: to its own longest rollout when
    ``fast``, to ``batch_width`` otherwise."""
    lengths = rollouts.lengths()
    p = [rollouts.prompt_ids[i] for i in chunk]
    r = [rollouts.response_ids[i] for i in chunk]
    width = max(lengths[i] for i in chunk) if fast else batch_width
    ids, attn, resp = _pad_right(p, r, pad_id, width, fast)
    longest = max(max(len(x) for x in r), 1)
    j = torch.arange(longest)
    starts = torch.tensor([len(x) for x in p])
    resp_len = torch.tensor([len(x) for x in r])
    resp_index = (starts[:, None] + j[None, :]).clamp(max=width - 1)  # (b, L)
    resp_mask = (j[None, :] < resp_len[:, None]).float()  # (b, L)
    return TrainBatch(ids, attn, resp, resp_index, resp_mask, list(chunk))


def micro_batches(
    rollouts: Rollouts,
    rows: list[int],
    micro_batch_size: int,
    pad_id: int,
    *,
    fast: bool,
    batch_width: int,
    packed: bool = False,
) -> list[TrainBatch]:
    """Split ``rows`` into micro-batches of ``micro_batch_size``.

    fast: rows sorted by length so each micro-batch pads to its own longest rollout (padding to the
    batch's longest inflates the work about 2x on sampled lengths). reference: original order, every
    micro-batch padded to ``batch_width``. Losses are sums over tokens, so the order does not change
    the update. packed: each micro-batch is one row without padding (trainer/packing.py).
    """
    lengths = rollouts.lengths()
    order = sorted(rows, key=lambda i: lengths[i]) if fast else list(rows)
    if packed:
        from rlaif_fast.trainer.packing import packed_batch

        return [
            packed_batch(rollouts, order[start : start + micro_batch_size])
            for start in range(0, len(order), micro_batch_size)
        ]
    return [
        train_batch(
            rollouts, order[start : start + micro_batch_size], pad_id, fast=fast, batch_width=batch_width
        )
        for start in range(0, len(order), micro_batch_size)
    ]


def token_micro_batches(
    rollouts: Rollouts,
    rows: list[int],
    max_tokens: int,
    pad_id: int,
    *,
    fast: bool,
    batch_width: int,
    rank: int = 0,
    ranks: int = 1,
    packed: bool = False,
) -> list[TrainBatch]:
    """Split ``rows`` into micro-batches of at most ``max_tokens`` padded tokens (rows x padded width).

    The plan is ``rlaif_fast.batching.balanced_microbatches`` over ``rows`` for ``ranks`` ranks, and
    this returns rank ``rank``'s share: with one rank, all of ``rows``; with several, ``rows`` are the
    global mini-batch (every rank plans the same, deterministically, and takes its own micro-batches).
    Rollouts of similar length share a micro-batch, so short rollouts run many to a forward and long
    ones few. reference: every row counts as ``batch_width`` tokens, the width it is padded to, so the
    budget bounds the work actually done in both modes. The count varies with the lengths sampled.
    """
    from rlaif_fast.batching import balanced_microbatches

    lengths = rollouts.lengths()
    sizes = [lengths[i] if fast else batch_width for i in rows]
    longest = max(sizes)
    if longest > max_tokens:
        raise ValueError(
            f"a rollout of {longest} tokens does not fit max_tokens_per_microbatch={max_tokens}; raise it "
            f"to at least max_prompt_len + max_new_tokens"
        )
    plan = balanced_microbatches(sizes, max_tokens=max_tokens, num_ranks=ranks)
    if packed:  # one row of at most max_tokens real tokens (the plan bounds rows x longest >= the sum)
        from rlaif_fast.trainer.packing import packed_batch

        return [packed_batch(rollouts, [rows[k] for k in mb]) for mb in plan.microbatches[rank] if mb]
    return [
        train_batch(rollouts, [rows[k] for k in mb], pad_id, fast=fast, batch_width=batch_width)
        for mb in plan.microbatches[rank]
        if mb
    ]
