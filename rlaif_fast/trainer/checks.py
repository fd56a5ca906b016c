"""The trainer's input checks: each bad argument raises before any compute, stating the rule and the fix."""

from __future__ import annotations

from rlaif_fast.trainer.config import RLAIFConfig
from rlaif_fast.trainer.sampling import tokenizer_vocab_size


def check_inputs(cfg, policy, tokenizer, reward, value_model) -> None:
    """Everything about the trainer's arguments that can be wrong, raised before any model runs."""
    if not isinstance(cfg, RLAIFConfig):
        raise TypeError(f"config must be an RLAIFConfig, got {type(cfg).__name__}; use RLAIFConfig.from_dict")
    if not callable(reward):
        raise TypeError(
            f"reward must be a callable (prompts, completions) -> list[float], got {type(reward).__name__}"
        )
    if cfg.uses_critic and value_model is None and cfg.lora is None:  # with LoRA: a ValueHead by default
        raise ValueError(
            f"algorithm={cfg.algorithm!r} trains a value baseline but value_model is None; pass "
            "value_model=ValueModel.from_policy(policy) (a trunk of its own) or ValueHead.from_policy(policy) "
            "(a head on the policy's trunk), or use algorithm='rloo'/'grpo'"
        )
    if not cfg.uses_critic and value_model is not None:
        raise ValueError(
            f"algorithm={cfg.algorithm!r} is critic-free but a value_model was given; drop it "
            "or use 'reinforce_baseline'/'ppo'"
        )
    if cfg.zero_stage == 3:
        from rlaif_fast.trainer.strategy import check_shardable  # light: deepspeed loads in Strategy()

        check_shardable(policy, 3, "policy")
        if value_model is not None:
            check_shardable(value_model, 3, "value_model")
    n_model = policy.get_input_embeddings().num_embeddings
    n_tok = tokenizer_vocab_size(tokenizer)
    if n_tok > n_model:
        raise ValueError(
            f"the tokenizer has {n_tok} tokens but the policy embeds only {n_model}; token ids "
            f">= {n_model} would index out of range: use the policy's own tokenizer or "
            "policy.resize_token_embeddings(len(tokenizer))"
        )


def per_rank_sizes(cfg, world: int) -> dict:
    """Rollouts per rank per step and per optimizer step; the sizes must split evenly over ranks."""
    if cfg.mini_batch_size % world:
        raise ValueError(f"mini_batch_size={cfg.mini_batch_size} must divide by the {world} ranks")
    mini = cfg.mini_batch_size // world
    if cfg.max_tokens_per_microbatch is None and mini % cfg.micro_batch_size:
        raise ValueError(
            f"micro_batch_size={cfg.micro_batch_size} must divide the per-rank mini-batch "
            f"mini_batch_size / ranks = {mini}"
        )
    if cfg.algorithm in ("rloo", "grpo") and mini % cfg.group_size:
        raise ValueError(
            f"{cfg.algorithm} compares the samples of one prompt on one rank: the per-rank "
            f"mini-batch mini_batch_size / ranks = {mini} must be a multiple of group_size="
            f"{cfg.group_size}"
        )
    return {"batch": cfg.batch_size // world, "mini": mini}
