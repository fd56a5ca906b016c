"""The optional SFT stage: a config-built policy for the embedded task, fitted to its demonstrations.

The paper starts RL from an SFT policy and keeps it as the KL anchor and the win-rate baseline; the demo
does the same with a tiny GPT-2 that learns the toy language from 50/50-sentiment sentences (so SFT
writes as many sad sentences as happy ones, and RL has something to fix).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def build_policy(vocab_size: int, *, dim: int = 64, layers: int = 2, max_positions: int = 64, seed: int = 0):
    """A tiny GPT-2 built from a config (nothing downloaded); ids 0-3 are [PAD] [UNK] [BOS] [EOS]."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab_size,
        n_positions=max_positions,
        n_embd=dim,
        n_layer=layers,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(cfg)


def sft_batch(tokenizer, pairs: Sequence[tuple[str, str]]):
    """Right-padded ``prompt + completion + EOS`` ids with labels on the completion and EOS only.

    Returns input_ids (B, T), attention_mask (B, T), labels (B, T) with -100 on prompt and padding.
    """
    from rlaif_fast.batching import pad_rollouts

    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p, _ in pairs]
    completions = [
        tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for _, c in pairs
    ]
    out = pad_rollouts(prompts, completions, tokenizer.pad_token_id, padding_side="right")
    labels = out.input_ids.masked_fill(out.response_mask == 0, -100)  # the loss is on the completion only
    return out.input_ids, out.attention_mask, labels


def warmup_linear(opt, steps: int, warmup: float = 0.1):
    """Linear warm-up over the first 10% of ``steps``, then linear decay to 0; defined for any steps >= 1."""
    up = max(1, int(warmup * steps))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: (i + 1) / up if i < up else max(0.0, (steps - i) / max(1, steps - up))
    )


def train_sft(
    policy,
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    *,
    steps: int,
    lr: float = 3e-3,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Fit ``policy`` to (prompt, completion) demonstrations with next-token cross-entropy on the
    completion; returns the loss per step. Batches are drawn with replacement from a seeded generator."""
    from tqdm.auto import tqdm

    if not pairs:
        raise ValueError("SFT got no (prompt, completion) pairs; set sft_steps: 0 to skip SFT")
    policy.train()
    opt = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=0.0)
    sched = warmup_linear(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in tqdm(range(steps), desc="SFT", disable=not progress, leave=False):
        idx = torch.randint(len(pairs), (batch_size,), generator=gen).tolist()
        ids, mask, labels = sft_batch(tokenizer, [pairs[i] for i in idx])
        loss = policy(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    policy.eval()
    return losses
