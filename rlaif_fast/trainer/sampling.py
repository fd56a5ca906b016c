"""Rollout sampling: prompts -> token ids -> completions with the policy (transformers' ``generate``).

Prompts are left-padded (``left_pad``), so every prompt's last token sits in the same column, and
sampled with the KV cache, temperature and top-p, stopping at EOS. The result is a ``Rollouts``: token
ids without padding, which ``batches.py`` lays out as training micro-batches (and
``rollout_vllm.py`` fills from a vLLM engine instead).
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
