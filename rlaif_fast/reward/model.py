"""The distilled reward model: a transformers backbone and a scalar head on the last non-pad token.

Padding may be on either side: the reward is read at each row's last position whose attention mask is 1,
and position ids count from each row's first real token, so a padded row scores what it would alone.
Saved as the backbone's own ``save_pretrained`` directory plus ``reward_head.pt`` and ``reward_config.json``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

HEAD_FILE = "reward_head.pt"
CONFIG_FILE = "reward_config.json"


class RewardModel(nn.Module):
    """r(x) = w . h_last(x) + b, with h_last the backbone's final hidden state at the last real token.

    Build it from a backbone (``transformers.AutoModel`` or the ``base_model`` of a causal LM), from a
    config (:meth:`from_config`, for tiny tests), or from a saved directory (:meth:`from_pretrained`).
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        hidden = getattr(backbone.config, "hidden_size", None) or getattr(backbone.config, "n_embd", None)
        if hidden is None:
            raise TypeError(f"cannot find hidden_size in the config of {type(backbone).__name__}")
        self.backbone = getattr(backbone, "base_model", backbone)
        self.config = self.backbone.config
        self.head = nn.Linear(hidden, 1)
        nn.init.normal_(self.head.weight, std=1.0 / (hidden + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_config(cls, config) -> RewardModel:
        from transformers import AutoModel

        return cls(AutoModel.from_config(config))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, attention_mask: (B, T) -> rewards (B,) in float32."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"input_ids and attention_mask must both be (B, T), got {tuple(input_ids.shape)} "
                f"and {tuple(attention_mask.shape)}"
            )
        if (attention_mask.sum(-1) == 0).any():
            raise ValueError("a row of attention_mask is all zeros; every sequence needs at least one token")
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        h = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state  # (B, T, H)
        t = attention_mask.shape[1]
        last = t - 1 - attention_mask.flip(-1).long().argmax(-1)  # (B,) last index with mask 1
        h_last = h[torch.arange(h.shape[0], device=h.device), last]  # (B, H)
        return self.head(h_last.to(self.head.weight.dtype)).squeeze(-1).float()  # (B,)

    def save_pretrained(self, path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(str(path))
        torch.save(self.head.state_dict(), path / HEAD_FILE)
        (path / CONFIG_FILE).write_text(
            json.dumps({"head": "linear_last_token", "hidden": self.head.in_features})
        )

    @classmethod
    def from_pretrained(cls, path) -> RewardModel:
        from transformers import AutoModel

        path = Path(path)
        if not (path / HEAD_FILE).is_file():
            raise ValueError(
                f"{str(path)!r} holds no {HEAD_FILE}; it was not saved by RewardModel.save_pretrained"
            )
        model = cls(AutoModel.from_pretrained(str(path)))
        # map_location: a head saved from a GPU run loads on a CPU-only machine (load_state_dict copies it over)
        model.head.load_state_dict(torch.load(path / HEAD_FILE, weights_only=True, map_location="cpu"))
        return model.eval()


def encode_pairs_side(
    tokenizer, contexts: Sequence[str], responses: Sequence[str], max_length: int, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) ids and mask of context + response, the context cut from its left to fit.

    The response is kept whole when it fits alone (it is what the reward judges); otherwise its end is cut.
    """
    rows = []
    for c, r in zip(contexts, responses):
        ctx = list(tokenizer(c, add_special_tokens=True)["input_ids"]) if c else []
        resp = list(tokenizer(r, add_special_tokens=not c)["input_ids"])
        resp = resp[:max_length]
        keep = min(max_length - len(resp), len(ctx))  # a negative slice start would cut a context that fits
        rows.append((ctx[len(ctx) - keep :] if keep else []) + resp)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


class RewardModelScorer:
    """``scorer(prompts, completions) -> list[float]``: a trained :class:`RewardModel` as the RL reward."""

    def __init__(self, model: RewardModel, tokenizer, *, batch_size: int = 16, max_length: int = 512):
        if int(batch_size) < 1 or int(max_length) < 1:
            raise ValueError(f"batch_size and max_length must be >= 1, got {batch_size!r}, {max_length!r}")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_length = int(batch_size), int(max_length)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions; give one each")
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        out: list[float] = []
        for s in range(0, len(prompts), self.batch_size):
            ids, mask = encode_pairs_side(
                self.tokenizer,
                prompts[s : s + self.batch_size],
                completions[s : s + self.batch_size],
                self.max_length,
                device,
            )
            out += self.model(ids, mask).tolist()
        self.model.train(was_training)
        return out
