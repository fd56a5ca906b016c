"""Distill AI soft labels into a reward model (``rlaif-fast train-rm`` / :func:`train_reward_model`).

Each step scores both sides of B pairs in one forward of 2B rows and minimizes the soft-label
Bradley-Terry loss (:func:`rlaif_fast.reward.loss.soft_bt_loss`). Reports pairwise accuracy against the
AI labels and, where the records carry ``human_a``, against the human choice (the paper's RM accuracy).
"""

from __future__ import annotations

import json
import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlaif_fast.config_cli import parse_config
from rlaif_fast.reward.loss import soft_bt_loss
from rlaif_fast.reward.metrics import pairwise_accuracy
from rlaif_fast.reward.model import RewardModel, RewardModelScorer, encode_pairs_side


def _as_record(p, i: int | str) -> dict:
    """A validated record; ``i`` names it in errors: a pair index, or ``"FILE:LINE"`` when read from a file."""
    where = i if isinstance(i, str) else f"pair {i}"
    rec = p if isinstance(p, dict) else vars(p)
    missing = [k for k in ("response_a", "response_b", "p_a") if k not in rec]
    if missing:
        raise ValueError(
            f"{where} lacks {missing}; records need context, response_a, response_b and p_a "
            "(the output of `rlaif-fast label`)"
        )
    raw = rec["p_a"]
    try:
        p_a = float(raw) if not isinstance(raw, bool) else math.nan
    except (TypeError, ValueError):
        p_a = math.nan
    if not 0.0 <= p_a <= 1.0:
        raise ValueError(f"{where} has p_a={raw!r}; soft labels must be numbers in [0, 1]")
    return {
        "context": rec.get("context", ""),
        "response_a": rec["response_a"],
        "response_b": rec["response_b"],
        "p_a": p_a,
        "human_a": rec.get("human_a"),
    }


def evaluate_reward_model(
    model: RewardModel, tokenizer, pairs, *, batch_size: int = 16, max_length: int = 512
) -> dict:
    """Pairwise accuracy against the AI label (p_a > 0.5) and, where known, against humans."""
    recs = [_as_record(p, i) for i, p in enumerate(pairs)]
    if not recs:
        return {}
    scorer = RewardModelScorer(model, tokenizer, batch_size=batch_size, max_length=max_length)
    ctx = [r["context"] for r in recs]
    r_a = scorer(ctx, [r["response_a"] for r in recs])
    r_b = scorer(ctx, [r["response_b"] for r in recs])
    out = {"acc_ai": pairwise_accuracy(r_a, r_b, [r["p_a"] for r in recs])}
    human = [(x, y, r["human_a"]) for x, y, r in zip(r_a, r_b, recs) if r["human_a"] is not None]
    if human:
        out["acc_human"] = pairwise_accuracy(*zip(*human))
    return out


def _disable_dropout(model) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


def train_reward_model(
    model: RewardModel,
    tokenizer,
    pairs,
    *,
    epochs: int = 1,
    lr: float = 1e-4,
    batch_size: int = 8,
    max_length: int = 512,
    eval_pairs=None,
    seed: int = 0,
    weight_decay: float = 0.0,
    strategy=None,
    optimizer: str = "adamw",
    disable_dropout: bool = True,
) -> dict:
    """Train ``model`` on records with context / response_a / response_b / p_a; return metrics.

    Returns ``{"loss": last-epoch mean loss, "losses": per-step, "train": {...}, "eval": {...}, "model"}``,
    ``model`` being the trained reward model (``model`` itself, trained in place, without a strategy).

    ``strategy``: a :class:`rlaif_fast.trainer.strategy.Strategy` (DeepSpeed ZeRO 0-3, bf16 where its
    config enables it) over all ranks: every step's ``batch_size`` pairs are split across ranks and the loss
    is scaled so that the update equals one rank's on the whole batch (a rank left without a pair runs a
    zero-weighted one, so every rank joins the ZeRO collectives). Afterwards the full weights are gathered
    into ``result["model"]`` (a plain module on the strategy's device, float32) on every rank.
    ``optimizer``: 'adamw', 'adafactor' (transformers' Adafactor, fixed learning rate) or 'sgd'.
    Dropout is off by default (``disable_dropout``), as in the RL trainer: the update is then the same on
    any number of ranks.
    """
    recs = [_as_record(p, i) for i, p in enumerate(pairs)]
    if not recs:
        raise ValueError("pairs is empty; give at least one labeled pair")
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"need epochs >= 1, batch_size >= 1, lr > 0; got {epochs!r}, {batch_size!r}, {lr!r}")
    if optimizer not in ("adamw", "adafactor", "sgd"):
        raise ValueError(
            f"optimizer={optimizer!r}; the reward model trains with 'adamw', 'adafactor' or 'sgd'"
        )
    if disable_dropout:
        _disable_dropout(model)
    rank, world = (0, 1) if strategy is None else (strategy.rank, strategy.world_size)
    plain = None
    if strategy is None:
        device = next(model.parameters()).device
        if optimizer == "adafactor":
            from transformers.optimization import Adafactor

            opt = Adafactor(
                model.parameters(),
                lr=lr,
                scale_parameter=False,
                relative_step=False,
                weight_decay=weight_decay,
            )
        elif optimizer == "sgd":
            opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=weight_decay)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        engine = model
    else:
        import copy

        device = strategy.device
        if strategy.zero_stage == 3:  # the module is partitioned in place: keep a plain copy to gather into
            plain = copy.deepcopy(model)
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]
        engine = strategy.prepare(model, groups, max(1, -(-batch_size // world)), 1, optimizer=optimizer)
        opt = None
    rng = random.Random(seed)
    losses: list[float] = []
    engine.train()
    for _ in range(epochs):
        order = list(range(len(recs)))
        rng.shuffle(order)
        for s in range(0, len(order), batch_size):
            b = [recs[i] for i in order[s : s + batch_size]]
            mine, weight = b[rank::world], 1.0
            if not mine:  # more ranks than pairs in this batch: a zero-weighted pair keeps this rank in step
                mine, weight = b[:1], 0.0
            ctx = [r["context"] for r in mine]
            # both sides in one forward: (2B, T)
            ids, mask = encode_pairs_side(
                tokenizer,
                ctx + ctx,
                [r["response_a"] for r in mine] + [r["response_b"] for r in mine],
                max_length,
                device,
            )
            r = engine(ids, mask)  # (2B,)
            p = torch.tensor([x["p_a"] for x in mine], dtype=r.dtype, device=r.device)
            # sum over my pairs / pairs of the whole batch: summed over ranks, the batch mean
            part = soft_bt_loss(r[: len(mine)], r[len(mine) :], p, reduction="sum") * (weight / len(b))
            if strategy is None:
                opt.zero_grad(set_to_none=True)
                part.backward()
                opt.step()
                losses.append(part.item())
            else:
                strategy.backward(part * world)  # DeepSpeed averages gradients over ranks
                strategy.step()
                losses.append(strategy.all_reduce(part.detach().float()).item())
    if strategy is not None:
        with strategy.gathered(engine.module):
            state = {
                k: v.detach().to("cpu", torch.float32).clone() for k, v in engine.module.state_dict().items()
            }
        trained = plain if plain is not None else engine.module
        trained.load_state_dict(state)
        model = trained.float().to(device)
    model.eval()
    steps = math.ceil(len(recs) / batch_size)
    result = {
        "loss": sum(losses[-steps:]) / steps,
        "losses": losses,
        "train": evaluate_reward_model(model, tokenizer, recs, max_length=max_length),
        "model": model,
    }
    if eval_pairs:
        result["eval"] = evaluate_reward_model(model, tokenizer, eval_pairs, max_length=max_length)
    return result


@dataclass
class RMTrainConfig:
    """Distill AI soft labels (the output of `rlaif-fast label`) into a reward model."""

    prefs: str = field(metadata={"help": "preferences JSONL with context, response_a, response_b, p_a"})
    base_model: str = field(metadata={"help": "local transformers model directory for the backbone"})
    out: str = field(metadata={"help": "directory to save the reward model and its tokenizer"})
    epochs: int = field(default=1, metadata={"help": "passes over the pairs"})
    lr: float = field(default=1e-5, metadata={"help": "AdamW learning rate"})
    batch_size: int = field(default=8, metadata={"help": "pairs per step (2x sequences per forward)"})
    max_length: int = field(
        default=512, metadata={"help": "tokens per sequence; the context is cut from its left"}
    )
    eval_fraction: float = field(default=0.1, metadata={"help": "fraction of pairs held out for evaluation"})
    seed: int = field(default=0, metadata={"help": "shuffle and split seed"})
    optimizer: str = field(
        default="adamw", metadata={"help": "adamw, adafactor (fixed learning rate) or sgd"}
    )
    zero_stage: int = field(
        default=0, metadata={"help": "DeepSpeed ZeRO stage 0-3 (launch with torchrun for several GPUs)"}
    )
    bf16: str = field(
        default="auto", metadata={"help": "auto (bf16 where the GPU supports it), true or false"}
    )

    def __post_init__(self):
        if self.optimizer not in ("adamw", "adafactor", "sgd"):
            raise ValueError(f"--optimizer {self.optimizer!r}; use adamw, adafactor or sgd")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if not Path(self.prefs).is_file():
            raise ValueError(f"--prefs {self.prefs!r} does not exist; run `rlaif-fast label` first")
        from rlaif_fast import _inputs

        # before hours of training, not at the save after them
        _inputs.check_model_path("--base-model", self.base_model)
        _inputs.check_writable_dir("--out", self.out)


def _read_jsonl(path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n}: malformed JSON ({exc.msg})") from None
                _as_record(row, f"{path}:{n}")  # a bad record names its line, not its place after shuffling
                rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    """``rlaif-fast train-rm``: prints the metrics as one JSON line; exit 2 on bad input."""
    try:
        cfg = parse_config(RMTrainConfig, argv, prog="rlaif-fast train-rm")
        from transformers import AutoModel, AutoTokenizer  # after parsing: `--help` stays light

        rows = _read_jsonl(cfg.prefs)
        random.Random(cfg.seed).shuffle(rows)
        n_eval = int(len(rows) * cfg.eval_fraction)
        tokenizer = AutoTokenizer.from_pretrained(cfg.base_model)
        model = RewardModel(AutoModel.from_pretrained(cfg.base_model))
        from rlaif_fast.trainer import RLAIFConfig
        from rlaif_fast.trainer.strategy import Strategy

        # the trainer's Strategy: this process's GPU, every rank of a torchrun launch, ZeRO and bf16
        strategy = Strategy(RLAIFConfig(output_dir=cfg.out, zero_stage=cfg.zero_stage, bf16=cfg.bf16))
        metrics = train_reward_model(
            model,
            tokenizer,
            rows[n_eval:],
            epochs=cfg.epochs,
            lr=cfg.lr,
            batch_size=cfg.batch_size,
            max_length=cfg.max_length,
            eval_pairs=rows[:n_eval],
            seed=cfg.seed,
            strategy=strategy,
            optimizer=cfg.optimizer,
        )
    except ValueError as exc:
        print(f"rlaif-fast train-rm: error: {exc}", file=sys.stderr)
        return 2
    if strategy.is_main:
        metrics["model"].save_pretrained(cfg.out)
        tokenizer.save_pretrained(cfg.out)
    metrics.pop("losses")
    metrics.pop("model")
    if strategy.is_main:
        print(json.dumps(metrics))
    strategy.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
