"""RLAIFTrainer: the RL loop of RLAIF (Lee et al. 2023, arXiv 2309.00267), top to bottom.

How each algorithm departs from its textbook form (read this before the code):
- reinforce_baseline: the paper's "REINFORCE with a baseline". The sequence reward sits on the last
  token, gamma = 1, and the objective is (1 - beta) * r - beta * KL(pi || pi_SFT) with beta = kl_coef
  (0.05 in the paper), KL as a per-token k1 penalty in the reward. Loss -sum_t log pi(y_t) *
  stopgrad(G_t - V_t) with no ratio and no clipping; the value model regresses G_t by squared error.
  Departure: advantages are whitened over the batch (whiten_advantages=False restores the paper's).
- ppo: GAE(gamma, lam) on the same per-token rewards (without the (1 - beta) factor), clipped surrogate
  (Schulman et al. 2017), value loss clipped around the rollout-time values; advantages whitened.
- rloo / grpo: no critic. One reward per sequence, r - beta * sum_t KL_t when the KL is in the reward;
  the baseline is the other samples of the prompt (rloo: leave-one-out mean; grpo: group mean and std),
  broadcast to every token and trained with the clipped surrogate.
- KL: kl_in='reward' (per-token shaping; k1 is the unbiased choice) or kl_in='loss' (added to the loss,
  k3, GRPO style). kl_coef is fixed, or adapted towards kl_target (Ziegler et al. 2019) when
  adaptive_kl is set.
- All losses are sums over tokens divided by the tokens of the whole mini-batch on all ranks, so the
  update does not depend on the number of ranks or micro-batches (see update.py).
- Micro-batches: micro_batch_size rows each, or (max_tokens_per_microbatch) cut per rank to a
  padded-token budget by rlaif_fast.batching.balanced_microbatches, the count varying per step; ranks
  with fewer run empty (zero-loss) micro-batches so all join the same ZeRO collectives. A NaN/inf loss
  on any rank stops every rank before its backward.
"""

from __future__ import annotations

import copy
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from rlaif_fast.trainer import checkpoint as ckpt
from rlaif_fast.trainer.batches import BatchLayout, ScoredBatch
from rlaif_fast.trainer.checks import check_inputs, per_rank_sizes
from rlaif_fast.trainer.config import RLAIFConfig
from rlaif_fast.trainer.logging import MetricsLogger, plot_metrics
from rlaif_fast.trainer.sampling import Rollouts, encode_prompts, sample, special_ids
from rlaif_fast.trainer.scoring import advantages_and_returns, response_logprobs, rl_ops, stack_rows
from rlaif_fast.trainer.update import ActorCritic, ValueHead, empty_like, run_update

RewardFn = Callable[[list[str], list[str]], Sequence[float]]


def _disable_dropout(module) -> None:
    """p = 0 in every dropout layer (the trainer's default, as TRL and OpenRLHF do for RL)."""
    if module is None:
        return
    for m in module.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.p = 0.0
        # attention implementations that take the rate as a float (Llama, Qwen) rather than a module
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


class _GracefulInterrupt:
    """The first Ctrl-C (SIGINT) asks the loop to stop after the current step, so the checkpoint it
    writes is consistent (a step cut in half would leave weights or RNG between two steps); the second
    one interrupts at once. Only the main thread can install a signal handler; elsewhere it is inert."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\nCtrl-C: stopping after this step and saving a checkpoint (press again to abort now)",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


class _RefScorer(torch.nn.Module):
    """forward(batch) = the KL reference policy's response log-probs (b, L); see RLAIFTrainer.__init__."""

    def __init__(self, ref_policy, fast: bool):
        super().__init__()
        self.policy, self.fast = ref_policy, fast

    def forward(self, batch, temperature: float) -> torch.Tensor:
        return response_logprobs(self.policy, batch, temperature=temperature, fast=self.fast)[0]


class NonFiniteError(FloatingPointError):
    """A reward or loss was NaN/inf; the message names the step and the file holding the batch."""


class RLAIFTrainer:
    """RL fine-tuning of ``policy`` against ``reward`` with a KL leash to ``ref_policy`` (default: a frozen
    copy of the initial policy, i.e. the SFT model). ``value_model`` is required by reinforce_baseline
    and ppo (``ValueModel.from_policy(policy)`` builds one). Every input is checked before any compute.
    """

    def __init__(
        self, policy, tokenizer, reward: RewardFn, config: RLAIFConfig, ref_policy=None, value_model=None
    ):
        self.config = cfg = config
        check_inputs(cfg, policy, tokenizer, reward, value_model)
        self.tokenizer, self.reward = tokenizer, reward
        self.pad_id, _ = special_ids(tokenizer)
        # the mode's math, chosen once: rlaif_fast.ops, or the naive baseline's plain-torch loops
        self.rl_ops = rl_ops(cfg.ops)
        from rlaif_fast.trainer.strategy import Strategy

        self.strategy = Strategy(cfg)
        self.per_rank = per_rank_sizes(cfg, self.strategy.world_size)
        torch.manual_seed(cfg.seed + self.strategy.rank)  # sampling differs across ranks, repeatably
        self.lora_reference = False
        if cfg.lora is not None:
            from rlaif_fast.trainer.lora import apply_lora

            policy = apply_lora(policy, cfg.lora)
            # the KL reference is the policy with its adapters off: no copy (unless one was given)
            self.lora_reference = ref_policy is None and cfg.kl_coef > 0
            if cfg.uses_critic and value_model is None:  # the critic: a head on the adapted trunk, no copy
                value_model = ValueHead.from_policy(policy)
        if ref_policy is None and cfg.kl_coef > 0 and not self.lora_reference:
            ref_policy = copy.deepcopy(policy)
        # packing is decided on the unsharded models (a small probe forward; trainer/packing.py)
        from rlaif_fast.trainer.packing import resolve_packing

        self.packing = resolve_packing(cfg, policy, value_model)
        # the micro-batch layout, chosen once: fast (sorted, padded per micro-batch), naive, or packed
        self.layout = BatchLayout(self.pad_id, fast=self.rl_ops.fast, packed=self.packing)
        if cfg.gradient_checkpointing:
            _enable_gradient_checkpointing(policy, value_model)
        # the reference scores through a module of its own, so that under ZeRO-3 its sharded weights are
        # gathered for the whole log-prob computation (the output embedding is read outside lm_head)
        self.ref = None
        if ref_policy is not None:
            self.ref = self.strategy.prepare_frozen(
                _RefScorer(ref_policy, self.rl_ops.fast), cfg.micro_batch_size
            )
            self.strategy.register_external(
                getattr(self.ref, "module", self.ref), [ref_policy.get_output_embeddings().weight]
            )
        if cfg.disable_dropout:
            for module in (policy, value_model):
                _disable_dropout(module)
        self.model = ActorCritic(policy, value_model, self.rl_ops)
        # training mode for the update (sampling switches to eval and back): from_pretrained returns a model
        # in eval mode, where transformers skips gradient checkpointing (it checks self.training) and dropout
        # (kept only with disable_dropout=False) would silently stay off
        self.model.train()
        groups = [{"params": [p for p in policy.parameters() if p.requires_grad], "lr": cfg.learning_rate}]
        if value_model is not None:
            groups.append(
                {"params": list(value_model.parameters()), "lr": cfg.value_learning_rate or cfg.learning_rate}
            )
        if cfg.max_tokens_per_microbatch is None:
            micro, accum = cfg.micro_batch_size, self.per_rank["mini"] // cfg.micro_batch_size
        else:  # micro-batches vary in rows and count: the trainer marks each boundary (update.py)
            micro, accum = self.per_rank["mini"], 1
        self.engine = self.strategy.prepare(self.model, groups, micro, accum)
        # the fast log-probs read the output embedding outside lm_head.forward: ZeRO-3 must gather it
        # for the whole ActorCritic forward
        self.strategy.register_external(self.model, [policy.get_output_embeddings().weight])
        self.global_step = 0
        self.kl_coef = cfg.kl_coef
        # rollout_engine="vllm": an in-process vLLM engine samples; the policy version counts the weight
        # changes (updates, checkpoint loads) so the engine is synced before it samples with stale ones
        self.rollout_engine, self._policy_version = None, 0
        if cfg.rollout_engine == "vllm":
            from rlaif_fast.trainer.rollout_vllm import VLLMRolloutEngine

            self.rollout_engine = VLLMRolloutEngine(
                policy, tokenizer, cfg, rank=self.strategy.rank, world_size=self.strategy.world_size
            )
        self._checkpoint_step = None  # the step of the checkpoint saved or loaded last
        if cfg.resume and (latest := ckpt.latest_checkpoint(cfg.output_dir)) is not None:
            ckpt.check_resume_config(latest, cfg.to_json())
            self.load(latest)

    # ---- one RL step ------------------------------------------------------------------------------
    @property
    def policy(self):
        return self.engine.module.policy

    def generate(self, prompts: Sequence[str], *, temperature: float | None = None) -> list[str]:
        """Completions of ``prompts`` (this rank's list) with the sampling settings of the config."""
        cfg = self.config
        t = cfg.temperature if temperature is None else temperature
        if self.rollout_engine is not None:
            self._sync_rollout_engine()
            return self.rollout_engine.sample(list(prompts), temperature=t).completions
        return sample(
            self.policy,
            self.tokenizer,
            list(prompts),
            max_new_tokens=cfg.max_new_tokens,
            temperature=t,
            top_p=cfg.top_p,
            max_prompt_len=cfg.max_prompt_len,
            device=self.strategy.device,
            synced=self.strategy.zero_stage == 3 and self.strategy.world_size > 1,
        ).completions

    def step(self, prompts: Sequence[str]) -> dict:
        """One RL step on ``prompts``: the global batch of ``batch_size // group_size`` prompts (the same list
        on every rank; rank r samples and trains on its slice). Returns the step's metrics."""
        cfg, rank = self.config, self.strategy.rank
        if len(prompts) != cfg.prompts_per_step:
            raise ValueError(
                f"step() got {len(prompts)} prompts; it takes batch_size // group_size = "
                f"{cfg.prompts_per_step}"
            )
        t0 = time.perf_counter()
        # every rank checks the whole list (the same everywhere), so a prompt that cannot be sampled stops all
        # ranks, not only the one whose slice holds it while the others wait for it in a collective
        encode_prompts(self.tokenizer, list(prompts), cfg.max_prompt_len)
        mine = [prompts[g // cfg.group_size] for g in self._my_rows(rank)]
        sync_s = self._sync_rollout_engine()
        t_gen = time.perf_counter()
        if self.rollout_engine is not None:
            rollouts = self.rollout_engine.sample(mine, step=self.global_step)
            self.rollout_engine.sleep()  # GPU: free the engine's memory for the update (no-op on CPU)
        else:
            rollouts = sample(
                self.policy,
                self.tokenizer,
                mine,
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                max_prompt_len=cfg.max_prompt_len,
                device=self.strategy.device,
                synced=self.strategy.zero_stage == 3 and self.strategy.world_size > 1,
            )
        timing = {"time_weight_sync": sync_s, "time_generate": time.perf_counter() - t_gen}
        metrics = self.learn(rollouts, t0=t0)
        return {**metrics, **timing}

    def _sync_rollout_engine(self) -> float:
        """Push the policy's weights into the rollout engine when they changed since its last sync (all
        ranks together: a collective under ZeRO-3); returns the seconds it took (0 when nothing to do)."""
        engine = self.rollout_engine
        if engine is None or engine.synced_version == self._policy_version:
            return 0.0
        self.strategy.release_gathered()  # ZeRO-3: no parameter left whole by the update during the sync
        return engine.sync(self.policy, self._policy_version)

    def learn(self, rollouts, *, t0: float | None = None) -> dict:
        """Score ``rollouts`` (this rank's ``Rollouts``, e.g. sampled by another engine) and update on them.

        Rows are laid out as ``step`` lays them: with several ranks, rank r holds slice r of every global
        mini-batch. Rewards come from the reward callable unless ``rollouts.scores`` is already set.
        """
        cfg = self.config
        t0 = time.perf_counter() if t0 is None else t0
        # a rank that raised alone would leave the others waiting in the step's next collective: the checks
        # and the reward (a labeler can fail on one rank) are agreed on by all ranks before any compute
        error = None
        t_reward = time.perf_counter()
        try:
            self._check_rollouts(rollouts)
            if rollouts.scores is None:
                scores = self._as_scores(
                    rollouts, self.reward(rollouts.prompts, rollouts.completions), "the reward"
                )
            else:  # given by the caller: the same checks as the reward callable's
                scores = self._as_scores(rollouts, rollouts.scores, "rollouts.scores")
        except Exception as err:  # noqa: BLE001 - re-raised below, on this rank as it was
            error = err
        self._raise_on_every_rank(error, "the rollout checks or the reward")
        rollouts.scores = self._checked_scores(rollouts, scores)
        t_score = time.perf_counter()
        scored = self._score(rollouts)
        from rlaif_fast.trainer.rollout_vllm import sampler_mismatch

        # TIS reweights the advantages before the update; without it the comparison is a metric only, read
        # after the update when the on-policy shortcut fills the old log-probs there
        mismatch = (
            {}
            if scored.on_policy
            else sampler_mismatch(scored, rollouts, cfg.tis_cap, self.strategy.all_reduce)
        )
        t_update = time.perf_counter()
        batches, update_scored = self._mini_batches(rollouts, scored)
        try:
            stats = run_update(
                cfg, self.strategy, self.engine, batches, update_scored, self.kl_coef, ops=self.rl_ops
            )
        except FloatingPointError as err:
            self._dump_nonfinite(rollouts, str(err))
        if scored.on_policy and scored.ref_logp is not None:  # the KL metric, now that old_logp is known
            scored.kl = (
                self.rl_ops.kl_penalty(scored.old_logp, scored.ref_logp, cfg.kl_estimator) * scored.mask
            )
        if scored.on_policy:
            mismatch = sampler_mismatch(scored, rollouts, None, self.strategy.all_reduce)
        self._policy_version += 1  # the rollout engine now holds stale weights
        done = time.perf_counter()
        metrics = self._metrics(rollouts, scored, stats, done - t0)
        metrics.update(
            mismatch,
            time_reward=t_score - t_reward,
            time_score=t_update - t_score,
            time_update=done - t_update,
        )
        self._adapt_kl(metrics["kl"])
        self.global_step += 1
        return metrics

    def _my_rows(self, rank: int) -> list[int]:
        """Global rollout rows of this rank. Global mini-batch m is rows [m*M, (m+1)*M) on any number of
        ranks; rank r holds slice r of each, so every optimizer step sees the same rollouts at any scale."""
        cfg, world = self.config, self.strategy.world_size
        per = cfg.mini_batch_size // world
        return [
            m * cfg.mini_batch_size + rank * per + j
            for m in range(cfg.batch_size // cfg.mini_batch_size)
            for j in range(per)
        ]

    def _check_rollouts(self, rollouts) -> None:
        if len(rollouts) != self.per_rank["batch"]:
            raise ValueError(
                f"learn() got {len(rollouts)} rollouts; each rank takes batch_size / ranks = "
                f"{self.per_rank['batch']}"
            )
        for i, (p, r) in enumerate(zip(rollouts.prompt_ids, rollouts.response_ids)):
            if not len(p) or not len(r):
                raise ValueError(
                    f"rollout {i} has an empty {'prompt' if not len(p) else 'response'}: every rollout needs at "
                    "least one prompt token and one response token (keep the EOS the policy sampled)"
                )

    def _raise_on_every_rank(self, error: Exception | None, what: str) -> None:
        """Collective: when ``error`` happened on any rank, every rank raises (this one its own error)."""
        failed = self.strategy.all_reduce(
            torch.tensor([float(error is not None)], dtype=torch.float64)
        ).item()
        if error is not None:
            raise error
        if failed > 0:
            raise RuntimeError(
                f"step {self.global_step}: {what} failed on {int(failed)} other rank(s) (their log has the "
                "error); stopped every rank"
            )

    @staticmethod
    def _as_scores(rollouts, scores, source: str) -> torch.Tensor:
        """One float per rollout as a (B,) fp32 tensor."""
        if isinstance(scores, torch.Tensor):
            scores = scores.detach().cpu().reshape(-1).tolist()
        if len(scores) != len(rollouts):
            raise ValueError(
                f"{source} gave {len(scores)} scores for {len(rollouts)} completions; it must "
                "give one float per completion"
            )
        return torch.as_tensor([float(s) for s in scores], dtype=torch.float32)

    def _checked_scores(self, rollouts, scores: torch.Tensor) -> torch.Tensor:
        """``scores`` when finite on every rank; a non-finite one on any rank stops all."""
        bad = self.strategy.all_reduce((~torch.isfinite(scores)).sum().double())
        if bad > 0:
            rollouts.scores = scores
            self._dump_nonfinite(rollouts, f"{int(bad)} non-finite rewards")
        return scores

    @torch.no_grad()
    def _score(self, rollouts) -> ScoredBatch:
        """Rollout-time log-probs of the policy and the KL reference policy and values, all (B, L); then
        the KL and advantages."""
        cfg = self.config
        n = len(rollouts)
        width = max(len(r) for r in rollouts.response_ids)
        parts: dict[str, list] = {"old_logp": [], "ref_logp": [], "old_values": [], "mask": []}
        on_policy = self._on_policy_shortcut()
        for b in self.layout.micro_batches(
            rollouts, list(range(n)), cfg.micro_batch_size, batch_width=max(rollouts.lengths())
        ):
            b = b.to(self.strategy.device)
            parts["mask"].append((b.rows, b.resp_mask.cpu()))
            if not on_policy:  # the shortcut takes the old log-probs from the training forward instead
                # through the engine: under ZeRO-3 that is what gathers the sharded weights
                logp, _, values = self.engine(b, cfg.temperature)
                parts["old_logp"].append((b.rows, logp.cpu()))
                if values is not None:
                    parts["old_values"].append((b.rows, values.cpu()))
            if self.lora_reference:  # the same engine with the adapters off (no reference copy)
                ref = self.engine(b, cfg.temperature, reference=True)
                parts["ref_logp"].append((b.rows, ref.cpu()))
            elif self.ref is not None:
                ref = self.ref(b, cfg.temperature)
                parts["ref_logp"].append((b.rows, ref.cpu()))
        stacked = {k: stack_rows(v, n, width) for k, v in parts.items() if v}
        # on-policy: filled by the update's forward (update.micro_loss), read by the metrics after it
        old_logp = torch.zeros(n, width) if on_policy else stacked["old_logp"]
        ref_logp, values = stacked.get("ref_logp"), stacked.get("old_values")
        adv, ret, kl = advantages_and_returns(
            cfg,
            self.rl_ops,
            rollouts.scores,
            old_logp,
            ref_logp,
            values if values is not None else torch.zeros(n, width),
            stacked["mask"],
            self.kl_coef,
            self.strategy.all_reduce,
        )
        return ScoredBatch(
            mask=stacked["mask"],
            old_logp=old_logp,
            advantages=adv,
            kl=kl,
            ref_logp=ref_logp,
            old_values=values,
            returns=ret if values is not None else None,
            on_policy=on_policy,
        )

    def _on_policy_shortcut(self) -> bool:
        """True when the update is exactly on-policy and nothing before it reads the old log-probs: one
        epoch over one mini-batch (the old policy is the policy of the training forward), no KL in the
        reward (it would shape the advantages before the update), no critic (its values come from the
        scoring pass), no truncated importance sampling (its weights need the old log-probs before the
        update; the sampler comparison alone is read after it) and the rows trained where they were
        scored. Then the scoring pass skips the policy forward and the update takes the detached log-probs of its own forward as the old ones (ratio 1, the same loss)."""
        cfg = self.config
        kl_in_reward = cfg.kl_in == "reward" and cfg.kl_coef > 0
        moved = (
            cfg.max_tokens_per_microbatch is not None
            and self.strategy.world_size > 1
            and cfg.token_balance == "global"
        )
        return (
            cfg.ppo_epochs == 1
            and cfg.mini_batch_size == cfg.batch_size
            and not kl_in_reward
            and not cfg.uses_critic
            and cfg.tis_cap is None
            and not moved
        )

    def _mini_batches(self, rollouts, scored: ScoredBatch) -> tuple[list[list], ScoredBatch]:
        """(micro-batches of every mini-batch for this rank, the scored rows they index).

        No budget: ``micro_batch_size`` rows of this rank at a time. With ``max_tokens_per_microbatch``,
        cut to the budget by ``balanced_microbatches``: ``token_balance="global"`` on several ranks plans
        each global mini-batch over all ranks' rows (gathered on every rank with their data) and takes
        this rank's share; ``"per_rank"`` plans this rank's rows alone. Counts can still differ across
        ranks, so the shorter lists get empty micro-batches up to the longest."""
        cfg, mini = self.config, self.per_rank["mini"]
        layout, width = self.layout, max(rollouts.lengths())
        budget = cfg.max_tokens_per_microbatch
        world, rank = self.strategy.world_size, self.strategy.rank
        if budget is not None:  # decided on all ranks together: a rank raising alone would hang the rest
            width = int(self.strategy.all_reduce(torch.tensor([float(width)]), op="max").item())
            if width > budget:
                raise ValueError(
                    f"a rollout of {width} tokens does not fit max_tokens_per_microbatch={budget}; "
                    "raise it to the longest prompt + response that learn() receives"
                )
        out = []
        if budget is not None and world > 1 and cfg.token_balance == "global":
            everyone, scored = self._gather_rows(rollouts, scored)
            n = len(rollouts)
            for start in range(0, n, mini):
                rows = [r * n + i for r in range(world) for i in range(start, start + mini)]
                out.append(layout.token_micro_batches(everyone, rows, budget, width, rank=rank, ranks=world))
        else:
            for start in range(0, len(rollouts), mini):
                rows = list(range(start, start + mini))
                if budget is None:
                    out.append(layout.micro_batches(rollouts, rows, cfg.micro_batch_size, width))
                else:
                    out.append(layout.token_micro_batches(rollouts, rows, budget, width))
        if budget is not None:
            counts = torch.tensor([float(len(m)) for m in out], dtype=torch.float64)
            most = self.strategy.all_reduce(counts, op="max").tolist()
            for mbs, k in zip(out, most):
                # a rank the global plan gave no row of this mini-batch shapes its empties on a local row
                template = mbs[-1] if mbs else layout.one(rollouts, [0], width)
                mbs.extend(empty_like(template) for _ in range(int(k) - len(mbs)))
        return [[b.to(self.strategy.device) for b in mbs] for mbs in out], scored

    def _gather_rows(self, rollouts, scored: ScoredBatch) -> tuple[Rollouts, ScoredBatch]:
        """Every rank's token ids and scored rows on every rank, row ``r * n + i`` being row ``i`` of
        rank ``r`` (one all_gather of CPU tensors; (B, L) tensors padded to the widest rank)."""
        mine = {"prompt_ids": rollouts.prompt_ids, "response_ids": rollouts.response_ids, "scored": scored}
        everyone = self.strategy.all_gather_object(mine)
        merged = ScoredBatch.cat([d["scored"] for d in everyone])
        prompt_ids = [ids for d in everyone for ids in d["prompt_ids"]]
        response_ids = [ids for d in everyone for ids in d["response_ids"]]
        blank = [""] * len(prompt_ids)
        return Rollouts(blank, blank, prompt_ids, response_ids), merged

    def _metrics(self, rollouts, scored: ScoredBatch, stats, seconds) -> dict:
        mask = scored.mask
        local = torch.tensor(
            [
                float(rollouts.scores.sum()),
                float(scored.kl.sum()),
                float(mask.sum()),
                float((-scored.old_logp * mask).sum()),
                float(len(rollouts)),
                float(sum(rollouts.lengths())),
            ],
            dtype=torch.float64,
        )
        s_reward, s_kl, tokens, s_nll, n, all_tokens = self.strategy.all_reduce(local).tolist()
        return {
            "reward": s_reward / n,
            "kl": s_kl / n,
            "entropy": s_nll / max(tokens, 1.0),
            "response_len": tokens / n,
            "kl_coef": self.kl_coef,
            "tokens": all_tokens,
            "step_seconds": seconds,
            **stats,
        }

    def _adapt_kl(self, kl: float) -> None:
        cfg = self.config
        if cfg.adaptive_kl and math.isfinite(kl):
            error = max(min(kl / cfg.kl_target - 1.0, 0.2), -0.2)
            self.kl_coef *= 1.0 + error * cfg.batch_size / cfg.kl_horizon

    def _dump_nonfinite(self, rollouts, reason: str):
        folder = Path(self.config.output_dir) / "nonfinite"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step_{self.global_step:06d}_rank{self.strategy.rank}.pt"
        torch.save(
            {
                "step": self.global_step,
                "reason": reason,
                "prompts": rollouts.prompts,
                "completions": rollouts.completions,
                "prompt_ids": rollouts.prompt_ids,
                "response_ids": rollouts.response_ids,
                "scores": rollouts.scores,
            },
            path,
        )
        raise NonFiniteError(
            f"step {self.global_step}: {reason}; stopped before updating the policy. "
            f"The batch is saved in {path}"
        )

    # ---- the loop ---------------------------------------------------------------------------------
    def _prompts_for_step(self, prompts: Sequence[str], step: int) -> list[str]:
        """Step k always reads the same prompts (a fixed shuffle per epoch): resuming needs only k."""
        per, n = self.config.prompts_per_step, len(prompts)
        steps_per_epoch = n // per
        epoch, i = divmod(step, steps_per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed + epoch)).tolist()
        return [prompts[j] for j in order[i * per : (i + 1) * per]]

    def train(self, prompts: Sequence[str], *, callback: Callable[[int, dict], None] | None = None) -> dict:
        """Run RL steps up to ``total_steps`` (default one pass over ``prompts``); returns the summary.

        Checkpoints every ``save_every`` steps and at the end; Ctrl-C saves one and returns the summary.
        """
        cfg = self.config
        if len(prompts) < cfg.prompts_per_step:
            raise ValueError(
                f"{len(prompts)} prompts cannot fill one step of batch_size // group_size = "
                f"{cfg.prompts_per_step}; lower batch_size or add prompts"
            )
        total = cfg.total_steps or len(prompts) // cfg.prompts_per_step
        logger = MetricsLogger(
            cfg.output_dir,
            enabled=self.strategy.is_main,
            tensorboard=cfg.tensorboard,
            progress=cfg.progress,
            total=total,
            initial=self.global_step,
        )
        stopped = "completed"
        # the state is the one an uninterrupted run has after global_step steps: a checkpoint resumes it
        between_steps = True
        try:
            with _GracefulInterrupt() as interrupt:
                while self.global_step < total:
                    between_steps = False
                    metrics = self.step(self._prompts_for_step(prompts, self.global_step))
                    between_steps = True
                    if self.global_step % cfg.log_every == 0:
                        logger.log(self.global_step, metrics)
                    if callback is not None:
                        callback(self.global_step, metrics)
                    if cfg.save_every and self.global_step % cfg.save_every == 0:
                        self.save_checkpoint()
                    # every rank must stop after the same step, or the others hang in a collective
                    flag = torch.tensor([float(interrupt.requested)], device=self.strategy.device)
                    if self.strategy.all_reduce(flag).item() > 0:
                        raise KeyboardInterrupt
        except KeyboardInterrupt:
            # At a step boundary (the first Ctrl-C waits for the step to finish) the checkpoint is exactly
            # the state an uninterrupted run has after global_step steps. Mid-step (a second Ctrl-C) the
            # weights and RNG are part-way into the next step: the last checkpoint stays the latest.
            stopped = "interrupted"
            if not between_steps:
                print(
                    f"interrupted inside step {self.global_step + 1}: no checkpoint written; resume "
                    "continues from the latest one",
                    file=sys.stderr,
                    flush=True,
                )
            elif self._checkpoint_step != self.global_step:
                self.save_checkpoint()
        finally:
            logger.close()
        if stopped == "completed":
            if self._checkpoint_step != self.global_step:  # a rewrite first deletes what `latest` names
                self.save_checkpoint()
            self.save(Path(cfg.output_dir) / "final")
        summary = logger.summary(self.global_step, stopped)
        if self.strategy.is_main and logger.history:
            plot_metrics(logger.full_history, Path(cfg.output_dir) / "metrics.png")
        summary["history"] = logger.history
        return summary

    # ---- persistence ------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        state = {"global_step": self.global_step, "kl_coef": self.kl_coef}
        folder = ckpt.save_checkpoint(
            self.strategy, self.config.output_dir, self.global_step, state, self.config.to_json()
        )
        self._checkpoint_step = self.global_step
        return folder

    def load(self, folder: str | Path) -> None:
        """Resume from a checkpoint folder: weights, optimizer, step, KL coefficient and RNG states."""
        state = ckpt.load_checkpoint(self.strategy, Path(folder))
        self.global_step, self.kl_coef = state["global_step"], state["kl_coef"]
        self._checkpoint_step = self.global_step
        self._policy_version += 1  # new weights: the rollout engine resyncs before it samples

    def save(self, path: str | Path, *, merged: bool = False) -> None:
        """The policy (and tokenizer) with ``save_pretrained``, full weights even under ZeRO-3. With LoRA
        that is the adapters (``peft.PeftModel.from_pretrained(base, path)`` loads them); ``merged=True``
        writes a plain transformers model with the adapters folded into the weights instead."""
        with self.strategy.gathered(self.policy):
            if self.strategy.is_main:
                if merged and self.config.lora is not None:
                    from rlaif_fast.trainer.lora import save_merged

                    save_merged(self.policy, path)
                else:
                    self.policy.save_pretrained(str(path), safe_serialization=True)
                if hasattr(self.tokenizer, "save_pretrained"):
                    self.tokenizer.save_pretrained(str(path))
        self.strategy.barrier()


def _enable_gradient_checkpointing(policy, value_model) -> None:
    """Recompute each layer's activations in the backward (non-reentrant: works with frozen inputs, as
    under LoRA, and with ZeRO-3's parameter hooks)."""
    kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
    for role, model in (("policy", policy), ("value model", value_model)):
        if model is None or isinstance(model, ValueHead):  # a ValueHead runs on the policy's trunk
            continue
        target = getattr(model, "backbone", model)  # ValueModel: its transformer trunk
        if not hasattr(target, "gradient_checkpointing_enable"):
            raise ValueError(
                f"gradient_checkpointing=True but the {role} ({type(target).__name__}) has no "
                "gradient_checkpointing_enable(); set gradient_checkpointing=False"
            )
        target.gradient_checkpointing_enable(**kwargs)
        if hasattr(target, "config"):
            target.config.use_cache = False
