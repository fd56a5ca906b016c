"""The update: losses per micro-batch, gradient accumulation, one optimizer step per mini-batch.

Data-parallel invariance: DeepSpeed divides each micro-batch loss by its gradient_accumulation_steps
(gas) and averages gradients over ranks. Each micro-batch loss is therefore rescaled from "mean over my
tokens" to "sum over my tokens / tokens of the whole mini-batch on all ranks" times (ranks x gas), which
makes 2 ranks x 4 rollouts, 1 rank x 8, 8 micro-batches of 1 and token-budget micro-batches of any
count give the same gradient. With a token budget gas is 1 and the trainer sets the boundary itself.
"""

from __future__ import annotations

import torch
from torch import nn

from rlaif_fast.trainer.batches import ScoredBatch, TrainBatch
from rlaif_fast.trainer.scoring import (
    RLOps,
    naive_logprobs_from_logits,
    response_logprobs,
    response_values,
    rl_ops,
    to_response_layout,
)


class ValueHead(nn.Module):
    """A value head on the policy's own trunk: values = head(the policy backbone's last hidden states).

    One backbone forward then serves log-probs and values (``ActorCritic.forward``), and no second trunk
    is held or trained: with LoRA the trunk is the adapted policy (the value loss reaches the adapters
    too, scaled by ``vf_coef``). ``ValueModel`` keeps a separate trunk, as the paper's baseline does.
    The head starts at zero, so the first baseline is 0.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_policy(cls, policy: nn.Module) -> ValueHead:
        config = (
            policy.config.get_text_config() if hasattr(policy.config, "get_text_config") else policy.config
        )
        return cls(config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(b, T, H) hidden states -> (b, T) fp32 values."""
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float()


def _response_tokens(hidden: torch.Tensor, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(h (M, H), labels (M,)) of the batch's M response tokens, in the row-major order of ``resp_mask``:
    each token's id and the hidden state of the position before it (the one that predicts it)."""
    flat = batch.resp_index  # (b, L) columns; packed batches: already flat columns of their one row
    if batch.position_ids is None:  # padded rows: offset each row's columns
        width = batch.input_ids.shape[1]
        flat = flat + torch.arange(flat.shape[0], device=flat.device)[:, None] * width
    flat = flat[batch.resp_mask.bool()]  # (M,)
    return hidden.reshape(-1, hidden.shape[-1])[flat - 1], batch.input_ids.reshape(-1)[flat]


class ActorCritic(nn.Module):
    """Policy (+ value model or value head) as one module, so one DeepSpeed engine and one optimizer train
    both, and everything that reads the weights runs inside ``forward`` (ZeRO-3 gathers them there)."""

    def __init__(self, policy: nn.Module, value_model: nn.Module | None, ops: RLOps | None = None):
        super().__init__()
        self.policy = policy
        self.value = value_model
        self.shared_trunk = isinstance(value_model, ValueHead)
        self.rl_ops = ops if ops is not None else rl_ops("fast")  # the mode, chosen once (the trainer's)

    def forward(
        self,
        batch: TrainBatch,
        temperature: float,
        *,
        return_entropy: bool = False,
        reference: bool = False,
        policy_loss: dict | None = None,
    ):
        """(logp, entropy or None, values or None), each (b, L); ``reference``: the KL reference's logp
        alone (LoRA: the adapters off); ``policy_loss``: the fused clipped loss instead (see
        ``_fused_policy_loss``). Log-probs as the mode ``self.rl_ops`` computes them."""
        fast = self.rl_ops.fast
        if reference:  # LoRA: the reference policy is the same model with its adapters off (trainer/lora.py)
            with self.policy.disable_adapter():
                return response_logprobs(self.policy, batch, temperature=temperature, fast=fast)[0]
        if policy_loss is not None:
            return self._fused_policy_loss(batch, temperature, policy_loss)
        if not self.shared_trunk:
            logp, ent = response_logprobs(
                self.policy, batch, temperature=temperature, fast=fast, return_entropy=return_entropy
            )
            values = response_values(self.value, batch) if self.value is not None else None
            return logp, ent, values
        hidden = self._trunk(batch)  # (b, T, H): one backbone pass for both heads
        if fast:
            logp, ent = self._logprobs(hidden, batch, temperature, return_entropy)
        else:
            logp, ent = response_logprobs_from_hidden(self.policy, hidden, batch, temperature, return_entropy)
        return logp, ent, self._values(hidden, batch)

    def _trunk(self, batch: TrainBatch) -> torch.Tensor:
        from rlaif_fast.ops.model import backbone_hidden

        packed = batch.position_ids is not None
        return backbone_hidden(
            self.policy, batch.input_ids, None if packed else batch.attention_mask, batch.position_ids
        )

    def _values(self, hidden: torch.Tensor, batch: TrainBatch) -> torch.Tensor | None:
        """(b, L) values: a ValueHead reads the policy trunk's ``hidden``, a ValueModel runs its own."""
        if self.value is None:
            return None
        if not self.shared_trunk:
            return response_values(self.value, batch)
        # the value of the state before each response token: the position that predicts it
        return to_response_layout(self.value(hidden), batch, shift=-1)

    def _logprobs(self, hidden, batch, temperature, return_entropy):
        from rlaif_fast.ops.model import hidden_logprobs

        h, labels = _response_tokens(hidden, batch)  # (M, H), (M,)
        out = hidden_logprobs(
            self.policy, h, labels, temperature=temperature if temperature > 0 else 1.0,
            return_entropy=return_entropy,
        )  # fmt: skip
        where = batch.resp_mask.bool()
        back = lambda v: v.new_zeros(where.shape).masked_scatter(where, v)  # (M,) -> (b, L), differentiable
        return (back(out[0]), back(out[1])) if return_entropy else (back(out), None)

    def _fused_policy_loss(self, batch: TrainBatch, temperature: float, opts: dict):
        """``rlaif_fast.ops.linear_ppo_policy_loss`` straight from the trunk's hidden states of the M
        response tokens (M, H): log-probs, clipped surrogate, KL-in-loss and entropy bonus in one call,
        never a (b, T, V) logit. Returns (loss, stats, detached logp (b, L), values or None)."""
        from rlaif_fast.ops import linear_ppo_policy_loss
        from rlaif_fast.ops.model import output_head

        hidden = self._trunk(batch)  # (b, T, H)
        weight, bias, knobs = output_head(self.policy)
        h, labels = _response_tokens(hidden, batch)  # (M, H), (M,): padding never reaches the head
        if h.dtype != weight.dtype:
            h = h.to(weight.dtype)
        loss, stats, logp = linear_ppo_policy_loss(
            h, weight, labels, opts["old_logp"], opts["advantages"], batch.resp_mask, bias=bias,
            temperature=temperature if temperature > 0 else 1.0, entropy_stat=False, return_logprobs=True,
            **opts["loss"], **knobs,
        )  # fmt: skip
        return loss, stats, logp, self._values(hidden, batch)


def response_logprobs_from_hidden(policy, hidden, batch, temperature, return_entropy):
    """The naive mode's log-probs from given hidden states: full (b, T, V) logits through the head."""
    from rlaif_fast.ops.model import apply_head_transform, output_head

    weight, bias, knobs = output_head(policy)
    logits = apply_head_transform(torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias), knobs)
    t = temperature if temperature > 0 else 1.0
    logp, ent = naive_logprobs_from_logits(logits, batch, t, return_entropy)  # (b, T) each
    return to_response_layout(logp, batch), (to_response_layout(ent, batch) if ent is not None else None)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_agg: str) -> torch.Tensor:
    """Reduce (b, L) per-token losses the way ``rlaif_fast.ops.ppo_loss_from_logprobs`` does."""
    m = mask.float()
    if loss_agg == "token-mean":
        return (per_token * m).sum() / m.sum().clamp(min=1)
    rows = (m.sum(-1) > 0).float().sum().clamp(min=1)
    if loss_agg == "seq-mean-token-mean":
        return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).sum() / rows
    return (per_token * m).sum() / rows


def local_units(mask: torch.Tensor, loss_agg: str) -> float:
    """How many units (tokens, or non-empty sequences) a local mean of ``loss_agg`` averages over."""
    if loss_agg == "token-mean":
        return float(mask.sum())
    return float((mask.sum(-1) > 0).sum())


def micro_loss(
    cfg,
    model,
    batch: TrainBatch,
    scored: ScoredBatch,
    kl_coef: float,
    scale_pg: float,
    scale_v: float,
    ops: RLOps,
):
    """Loss of one micro-batch, rescaled for data-parallel invariance; returns (loss, stats).

    reinforce_baseline: the paper's -log pi(y_t) * stopgrad(A_t), no ratio and no clipping;
    ppo / rloo / grpo: the clipped surrogate of ``rlaif_fast.ops.ppo_loss_from_logprobs``. ``ops``: the
    mode's math (``scoring.rl_ops``), for the KL term of reinforce_baseline and the fused-loss choice.
    """
    from rlaif_fast.ops import ppo_loss_from_logprobs, value_loss

    width = batch.resp_mask.shape[1]
    take = lambda name: getattr(scored, name)[batch.rows, :width].to(batch.resp_mask.device)  # (b, L)
    mask = batch.resp_mask
    fast = ops.fast
    kl_loss_coef = kl_coef if cfg.kl_in == "loss" else 0.0
    ref_logp = take("ref_logp") if scored.ref_logp is not None else None
    on_policy = scored.on_policy
    if fast and cfg.fused_loss and cfg.algorithm != "reinforce_baseline":
        # the fused path: ops.linear_ppo_policy_loss from the trunk's hidden states, inside the engine's
        # forward (ZeRO-3 gathers the head there); on-policy, the old log-probs are the detached current
        opts = {
            "old_logp": None if on_policy else take("old_logp"),
            "advantages": take("advantages"),
            "loss": dict(
                ref_logp=ref_logp, clip_eps=cfg.clip_eps, kl_coef=kl_loss_coef,
                kl_estimator=cfg.kl_estimator, entropy_coef=cfg.entropy_coef, loss_agg=cfg.loss_agg,
            ),
        }  # fmt: skip
        pg, stats, logp, values = model(batch, cfg.temperature, policy_loss=opts)
        if on_policy:  # kept for the step's metrics (no separate scoring pass was run)
            scored.old_logp[batch.rows, :width] = logp.to(scored.old_logp.device, torch.float32)
    else:
        logp, ent, values = model(batch, cfg.temperature, return_entropy=cfg.entropy_coef > 0)
        if on_policy:
            # the on-policy shortcut (one epoch, one mini-batch): the old policy is this very forward, so
            # its detached log-probs are the old ones (ratio 1) and no separate scoring pass was run; they
            # are kept for the step's metrics
            scored.old_logp[batch.rows, :width] = logp.detach().to(scored.old_logp.device, torch.float32)
        old_logp = take("old_logp") if not on_policy else logp.detach()
        if cfg.algorithm == "reinforce_baseline":
            per_token = -logp * take("advantages")
            if kl_loss_coef:
                per_token = per_token + kl_loss_coef * ops.kl_penalty(logp, ref_logp, cfg.kl_estimator)
            if cfg.entropy_coef:
                per_token = per_token - cfg.entropy_coef * ent
            pg, stats = aggregate(per_token, mask, cfg.loss_agg), {}
        else:
            pg, stats = ppo_loss_from_logprobs(
                logp,
                old_logp,
                take("advantages"),
                mask,
                entropy=ent,
                ref_logp=ref_logp,
                clip_eps=cfg.clip_eps,
                kl_coef=kl_loss_coef,
                kl_estimator=cfg.kl_estimator,
                entropy_coef=cfg.entropy_coef,
                loss_agg=cfg.loss_agg,
            )
    loss = pg * scale_pg
    out = {"policy_loss": float(pg.detach()) * scale_pg}
    out.update({k: float(v) for k, v in stats.items() if k in ("clip_frac", "approx_kl")})
    if values is not None:
        clip = cfg.value_clip_eps if cfg.algorithm == "ppo" else None
        vl, _ = value_loss(values, take("old_values"), take("returns"), mask, clip_eps=clip)
        loss = loss + cfg.vf_coef * vl * scale_v
        out["value_loss"] = float(vl.detach()) * scale_v
    return loss, out


def empty_like(batch: TrainBatch) -> TrainBatch:
    """A one-row micro-batch with no response tokens: it contributes zero loss and zero gradient but runs
    the forward/backward (and so the ZeRO collectives) that a rank with fewer micro-batches must join."""
    return TrainBatch(
        batch.input_ids[:1],
        batch.attention_mask[:1],
        batch.response_mask[:1],
        batch.resp_index[:1],
        torch.zeros_like(batch.resp_mask[:1]),
        batch.rows[:1],
        position_ids=None if batch.position_ids is None else batch.position_ids[:1],
    )


def _zero_loss(cfg, model, batch: TrainBatch) -> torch.Tensor:
    """0 x the outputs of an empty micro-batch: every trained parameter gets a (zero) gradient, as on
    the ranks that run a real one, so ZeRO's per-parameter reductions line up."""
    logp, _, values = model(batch, cfg.temperature)
    loss = (logp * 0).sum()
    return loss + (values * 0).sum() if values is not None else loss


def _check_finite(strategy, loss: torch.Tensor, batch: TrainBatch) -> None:
    """Collective: if the loss is NaN/inf on any rank, every rank raises (before its backward), so no rank
    is left waiting in a ZeRO reduction that the failing one never joins. One scalar per micro-batch."""
    bad_here = not bool(torch.isfinite(loss.detach()).all())
    bad = strategy.all_reduce(torch.tensor([float(bad_here)], dtype=torch.float64)).item()
    if bad > 0:
        where = f"rows {batch.rows} of rank {strategy.rank}" if bad_here else f"{int(bad)} other rank(s)"
        raise FloatingPointError(f"non-finite loss in a micro-batch ({where})")


def run_update(
    cfg,
    strategy,
    model,
    batches: list[list[TrainBatch]],
    scored: ScoredBatch,
    kl_coef: float,
    *,
    ops: RLOps,
) -> dict:
    """``ppo_epochs`` passes; each inner list of micro-batches is one optimizer step (one mini-batch);
    ``scored``: the rows the micro-batches index, ``ops``: the mode's math (``scoring.rl_ops``).

    Every rank must hold the same number of micro-batches per mini-batch (empty ones pad the short
    lists). The trainer marks the last one as DeepSpeed's accumulation boundary, so the count may
    change from one mini-batch to the next. Returns the metrics averaged over optimizer steps: losses
    summed over micro-batches and ranks, clip_frac / approx_kl weighted by tokens.
    """
    totals: dict[str, float] = {}
    n_steps = 0
    # the update's token slots (micro-batch rows x width) over the real tokens in them: 1.00 when packed
    slots = sum(float(b.input_ids.numel()) for mini in batches for b in mini if float(b.resp_mask.sum()) > 0)
    real = sum(
        float(b.attention_mask.sum()) for mini in batches for b in mini if float(b.resp_mask.sum()) > 0
    )
    ranks, gas = strategy.world_size, strategy.grad_accum
    for _ in range(cfg.ppo_epochs):
        for mini in batches:
            # global units of the mini-batch: token counts cross ranks as one 2-element all-reduce
            local = torch.tensor(
                [
                    sum(local_units(b.resp_mask, cfg.loss_agg) for b in mini),
                    sum(float(b.resp_mask.sum()) for b in mini),
                ],
                dtype=torch.float64,
            )
            units, tokens = strategy.all_reduce(local).tolist()
            # every key any rank can report, so a rank whose share is all empty micro-batches (no stats of
            # its own) reduces a tensor of the same length as the others
            keys = ["policy_loss"] + (
                ["clip_frac", "approx_kl"] if cfg.algorithm != "reinforce_baseline" else []
            )
            sums = dict.fromkeys(keys + (["value_loss"] if cfg.uses_critic else []), 0.0)
            for i, b in enumerate(mini):
                strategy.set_boundary(i == len(mini) - 1)
                n_tok = float(b.resp_mask.sum())
                if n_tok == 0:
                    loss, stats = _zero_loss(cfg, model, b), {}
                else:
                    # the engine divides by gas and averages over ranks: undo both, then weigh by units
                    scale_pg = local_units(b.resp_mask, cfg.loss_agg) / max(units, 1.0) * ranks * gas
                    scale_v = n_tok / max(tokens, 1.0) * ranks * gas
                    loss, stats = micro_loss(cfg, model, b, scored, kl_coef, scale_pg, scale_v, ops)
                _check_finite(strategy, loss, b)
                strategy.backward(loss)
                strategy.step()  # DeepSpeed only steps the optimizer at the accumulation boundary
                for k, v in stats.items():
                    # losses are already fractions of the global mini-batch; ratios are token means
                    w = 1.0 / (ranks * gas) if k.endswith("_loss") else n_tok / max(tokens, 1.0)
                    sums[k] = sums.get(k, 0.0) + v * w
            keys = sorted(sums)  # the same order on every rank
            reduced = strategy.all_reduce(torch.tensor([sums[k] for k in keys], dtype=torch.float64)).tolist()
            for k, v in zip(keys, reduced):
                totals[k] = totals.get(k, 0.0) + v
            n_steps += 1
    out = {k: v / max(n_steps, 1) for k, v in totals.items()}
    slots, real = strategy.all_reduce(torch.tensor([slots, real], dtype=torch.float64)).tolist()
    out["padded_tokens_ratio"] = slots / max(real, 1.0)
    return out
