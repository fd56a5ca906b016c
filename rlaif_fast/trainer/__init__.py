"""The RL trainer: ``RLAIFConfig`` + ``RLAIFTrainer`` on DeepSpeed ZeRO (issue 6).

    from rlaif_fast.trainer import RLAIFConfig, RLAIFTrainer, ValueModel
    cfg = RLAIFConfig(algorithm="reinforce_baseline", batch_size=16, kl_coef=0.05)
    trainer = RLAIFTrainer(policy, tokenizer, reward, cfg, value_model=ValueModel.from_policy(policy))
    summary = trainer.train(prompts)

``reward`` is any callable ``(prompts: list[str], completions: list[str]) -> list[float]``.
Names resolve lazily: importing this package does not import deepspeed or transformers.
"""

from rlaif_fast._lazy import lazy_exports

_EXPORTS = {
    "RLAIFConfig": "config",
    "RLAIFTrainer": "trainer",
    "ValueModel": "scoring",
    "ValueHead": "update",
    "NonFiniteError": "trainer",
    "Rollouts": "sampling",
}


__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS, globals())
