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

from rlaif_fast.trainer.batches import TrainBatch
from rlaif_fast.trainer.scoring import response_logprobs, response_values


class ActorCritic(nn.Module):
    """Policy (+ value model) as one module, so one DeepSpeed engine and one optimizer train both."""

    def __init__(self, policy: nn.Module, value_model: nn.Module | None):
        super().__init__()
        self.policy = policy
        self.value = value_model

    def forward(
        self, batch: TrainBatch, temperature: float, fast: bool, return_entropy: bool, reference: bool = False
    ):
        if reference:  # LoRA: the reference policy is the same model with its adapters off (trainer/lora.py)
            with self.policy.disable_adapter():
                return response_logprobs(self.policy, batch, temperature=temperature, fast=fast)[0]
        logp, ent = response_logprobs(
            self.policy, batch, temperature=temperature, fast=fast, return_entropy=return_entropy
        )
        values = response_values(self.value, batch) if self.value is not None else None
        return logp, ent, values


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


def micro_loss(cfg, model, batch: TrainBatch, data: dict, kl_coef: float, scale_pg: float, scale_v: float):
    """Loss of one micro-batch, rescaled for data-parallel invariance; returns (loss, stats).

    reinforce_baseline: the paper's -log pi(y_t) * stopgrad(A_t), no ratio and no clipping;
    ppo / rloo / grpo: the clipped surrogate of ``rlaif_fast.ops.ppo_loss_from_logprobs``.
    """
    from rlaif_fast.ops import ppo_loss_from_logprobs, value_loss
    from rlaif_fast.reference.rl import kl_penalty

    width = batch.resp_mask.shape[1]
    take = lambda name: data[name][batch.rows, :width].to(batch.resp_mask.device)  # (b, L)
    mask = batch.resp_mask
    logp, ent, values = model(batch, cfg.temperature, cfg.ops == "fast", cfg.entropy_coef > 0)
    kl_loss_coef = kl_coef if cfg.kl_in == "loss" else 0.0
    ref_logp = take("ref_logp") if "ref_logp" in data else None
    if data.get("on_policy"):
        # the on-policy shortcut (one epoch, one mini-batch): the old policy is this very forward, so
        # its detached log-probs are the old ones (ratio 1) and no separate scoring pass was run; they
        # are kept for the step's metrics
        data["old_logp"][batch.rows, :width] = logp.detach().to(data["old_logp"].device, torch.float32)
    old_logp = take("old_logp") if not data.get("on_policy") else logp.detach()
    if cfg.algorithm == "reinforce_baseline":
        per_token = -logp * take("advantages")
        if kl_loss_coef:
            per_token = per_token + kl_loss_coef * kl_penalty(logp, ref_logp, cfg.kl_estimator)
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
    logp, _, values = model(batch, cfg.temperature, cfg.ops == "fast", False)
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


def run_update(cfg, strategy, model, batches: list[list[TrainBatch]], data: dict, kl_coef: float) -> dict:
    """``ppo_epochs`` passes; each inner list of micro-batches is one optimizer step (one mini-batch).

    Every rank must hold the same number of micro-batches per mini-batch (empty ones pad the short
    lists). The trainer marks the last one as DeepSpeed's accumulation boundary, so the count may
    change from one mini-batch to the next. Returns the metrics averaged over optimizer steps: losses
    summed over micro-batches and ranks, clip_frac / approx_kl weighted by tokens.
    """
    totals: dict[str, float] = {}
    n_steps = 0
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
                    loss, stats = micro_loss(cfg, model, b, data, kl_coef, scale_pg, scale_v)
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
    return {k: v / max(n_steps, 1) for k, v in totals.items()}
