"""Scoring: log-probs of the policy and the KL reference policy, values, KL and advantages of rollouts.

Everything per token lives in the *response layout*: (B, L) with L the longest response of the batch,
column j = response token j, so tensors of micro-batches padded to different widths stack cheaply and
no (B, T, V) tensor outlives one micro-batch.

The math of a mode is chosen once, when the trainer is built (``rl_ops(cfg.ops)``): ``ops='fast'`` runs
``rlaif_fast.ops`` (log-probs straight from hidden states, fused KL / GAE); ``ops='naive'`` is the
benchmark's baseline, what most trainers run: full logits and the plain-torch loops (``RLOps`` below).
In the trainer, "reference" means only the KL reference policy (``ref_logp``).
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from rlaif_fast.trainer.batches import TrainBatch

RL_OP_NAMES = ("kl_penalty", "kl_shaped_rewards", "gae", "group_advantages")


@dataclass(frozen=True)
class RLOps:
    """The per-token RL math of one ``ops`` mode, picked once by ``rl_ops``; the same signatures in both.

    kl_penalty(logp, ref_logp, estimator) -> (B, L); kl_shaped_rewards(scores, logp, ref_logp, mask,
    kl_coef, estimator) -> (rewards, kl); gae(rewards, values, mask, gamma, lam) -> (advantages, returns);
    group_advantages(scores, group_size, method, scale_by_std) -> (B,).
    """

    mode: str  # "fast" | "naive"
    kl_penalty: Callable
    kl_shaped_rewards: Callable
    gae: Callable
    group_advantages: Callable

    @property
    def fast(self) -> bool:
        return self.mode == "fast"


def rl_ops(mode: str) -> RLOps:
    """The math of ``mode``: "fast" = ``rlaif_fast.ops``; "naive" = the plain-torch loops (a Python loop
    over time for GAE, one over rows for the shaped rewards and the groups) that ``rlaif_fast.reference.rl``
    defines once, as the tests' oracle and the benchmarks' baseline. This is the trainer's only use of that
    package. A fast op that cannot load is an error: falling back would run the naive path while
    reporting the fast one."""
    if mode == "naive":
        plain = importlib.import_module("rlaif_fast.reference.rl")
        return RLOps("naive", *(getattr(plain, name) for name in RL_OP_NAMES))
    if mode != "fast":
        raise ValueError(f"ops={mode!r} is not a mode; use 'fast' or 'naive'")
    fast = importlib.import_module("rlaif_fast.ops")
    found = []
    for name in RL_OP_NAMES:
        try:
            found.append(getattr(fast, name))
        except AttributeError as e:
            raise ImportError(
                f"rlaif_fast.ops.{name} is missing, so ops='fast' cannot run; reinstall rlaif_fast "
                "(pip install -e .), or set ops='naive' to run the naive path on purpose"
            ) from e
    return RLOps("fast", *found)


class ValueModel(nn.Module):
    """A scalar value per position: the policy's transformer trunk + a linear head (B, T) -> values.

    ``from_policy`` copies the trunk (``policy.base_model``) so policy and critic train separately, as
    the paper's REINFORCE baseline and PPO do; the head starts at zero so the first baseline is 0.
    """

    def __init__(self, backbone: nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_policy(cls, policy: nn.Module) -> ValueModel:
        base = getattr(policy, "base_model", None)
        if base is None or base is policy:
            raise TypeError(
                f"{type(policy).__name__} has no separate base_model trunk; build ValueModel("
                "backbone, hidden_size) from the policy's transformer yourself"
            )
        hidden = policy.config.hidden_size
        return cls(copy.deepcopy(base), hidden)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids=None
    ) -> torch.Tensor:
        """Packed rows: ``attention_mask=None`` and ``position_ids`` restarting per sequence."""
        # no KV cache: transformers reads packed sequences from position_ids only without one
        kwargs = {} if position_ids is None else {"position_ids": position_ids, "use_cache": False}
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, **kwargs
        ).last_hidden_state  # (B, T, H)
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float()  # (B, T)


def _naive_logprobs(model, batch: TrainBatch, temperature: float, return_entropy: bool):
    """The naive mode: full (B, T, V) logits, log-softmax, gather: what most trainers do today."""
    if batch.position_ids is None:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (B, T, V)
    else:  # packed: the block-diagonal mask comes from the position ids
        logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
    return naive_logprobs_from_logits(logits, batch, temperature, return_entropy)


def naive_logprobs_from_logits(
    logits: torch.Tensor, batch: TrainBatch, temperature: float, return_entropy: bool
):
    """(logp, entropy or None), both (B, T), from full (B, T, V) logits: log-softmax over the vocabulary,
    gather; column t = log p(token t | tokens < t), column 0 = 0."""
    logits = logits[:, :-1].float() / temperature
    logp_all = torch.log_softmax(logits, dim=-1)  # (B, T-1, V)
    logp = logp_all.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    logp = torch.nn.functional.pad(logp, (1, 0))  # (B, T): column t = log p(token t | tokens < t)
    ent = None
    if return_entropy:
        ent = -(logp_all.exp() * logp_all).sum(-1)
        ent = torch.nn.functional.pad(ent, (1, 0))
    return logp, ent


def response_logprobs(
    model, batch: TrainBatch, *, temperature: float, fast: bool, return_entropy: bool = False
):
    """(logp, entropy or None), both (b, L) in the response layout, 0 on padding."""
    temperature = temperature if temperature > 0 else 1.0
    if fast:  # hidden states -> log-probs, never the (b, T, V) logits
        from rlaif_fast.ops import model_logprobs

        packed = batch.position_ids is not None
        out = model_logprobs(
            model,
            batch.input_ids,
            None if packed else batch.attention_mask,
            batch.response_mask,
            temperature=temperature,
            return_entropy=return_entropy,
            position_ids=batch.position_ids,
        )
        logp, ent = out if return_entropy else (out, None)
    else:
        logp, ent = _naive_logprobs(model, batch, temperature, return_entropy)
    logp = to_response_layout(logp, batch)  # (b, L)
    if ent is not None:
        ent = to_response_layout(ent, batch)
    return logp, ent


def to_response_layout(per_position: torch.Tensor, batch: TrainBatch, shift: int = 0) -> torch.Tensor:
    """(b, T) per-position values -> (b, L) per response token, 0 on padding. Packed batches hold one
    row whose ``resp_index`` are flat columns; ``shift=-1`` reads the position before each token."""
    index = batch.resp_index if not shift else (batch.resp_index + shift).clamp(min=0)
    if batch.position_ids is not None:
        return per_position.reshape(-1)[index] * batch.resp_mask
    return per_position.gather(1, index) * batch.resp_mask


def response_values(value_model, batch: TrainBatch) -> torch.Tensor:
    """(b, L) values of the state *before* each response token (the position that predicts it)."""
    if batch.position_ids is None:
        values = value_model(batch.input_ids, batch.attention_mask)  # (b, T)
    else:
        values = value_model(batch.input_ids, None, position_ids=batch.position_ids)  # (1, T)
    return to_response_layout(values, batch, shift=-1)


def stack_rows(parts: list[tuple[list[int], torch.Tensor]], n_rows: int, width: int) -> torch.Tensor:
    """Scatter micro-batch results (rows, (b, L_mb)) back into one (n_rows, width) tensor."""
    out = torch.zeros(n_rows, width)
    for rows, t in parts:
        out[rows, : t.shape[1]] = t.float()
    return out


def global_whiten(x: torch.Tensor, mask: torch.Tensor, all_reduce, eps: float = 1e-8) -> torch.Tensor:
    """Whiten over the valid entries of *all ranks* (unbiased variance), so 2 ranks equal 1 rank.

    Three scalars cross the wire (sum, sum of squares, count) instead of the whole batch.
    """
    m = mask.float()
    stats = torch.stack([(x * m).sum(), (x * x * m).sum(), m.sum()]).double()
    stats = all_reduce(stats)
    s, ss, n = stats.tolist()
    if n <= 1:
        return x * m
    mean = s / n
    var = (ss - n * mean * mean) / (n - 1)
    return (x - mean) / (max(var, 0.0) + eps) ** 0.5 * m


def advantages_and_returns(cfg, ops: RLOps, scores, logp, ref_logp, values, mask, kl_coef: float, all_reduce):
    """Per-token advantages and returns (B, L) for ``cfg.algorithm`` with the math ``ops`` (``rl_ops``);
    returns (adv, returns, kl (B, L)).

    reinforce_baseline: reward (1 - beta) * r at the last token, -beta * KL per token, gamma = 1,
    A_t = G_t - V_t (GAE with lambda = 1); ppo: the same rewards, GAE(gamma, lam); rloo / grpo: one
    sequence reward r - beta * sum_t KL_t, group baseline, broadcast to every token.
    """
    kl = (
        ops.kl_penalty(logp, ref_logp, cfg.kl_estimator) * mask
        if ref_logp is not None
        else torch.zeros_like(logp)
    )
    beta_reward = kl_coef if cfg.kl_in == "reward" else 0.0
    if cfg.algorithm in ("reinforce_baseline", "ppo"):
        # the paper's objective (1 - beta) r - beta KL; PPO keeps the usual r - beta KL
        r = scores * (1.0 - kl_coef) if cfg.algorithm == "reinforce_baseline" else scores
        rewards, _ = ops.kl_shaped_rewards(
            r, logp, ref_logp if ref_logp is not None else logp, mask, beta_reward, cfg.kl_estimator
        )
        lam = 1.0 if cfg.algorithm == "reinforce_baseline" else cfg.lam
        adv, returns = ops.gae(rewards.float(), values, mask, cfg.gamma, lam)
    else:
        seq_reward = scores - beta_reward * kl.sum(-1)  # (B,)
        method = cfg.algorithm
        seq_adv = ops.group_advantages(seq_reward, cfg.group_size, method, scale_by_std=(method == "grpo"))
        adv = seq_adv[:, None] * mask
        returns = torch.zeros_like(adv)
    if cfg.whiten_advantages:
        adv = global_whiten(adv, mask, all_reduce)
    return adv * mask, returns * mask, kl
