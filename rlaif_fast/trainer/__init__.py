"""The RL trainer: ``RLAIFConfig`` + ``RLAIFTrainer`` on DeepSpeed ZeRO (issue 6).

    from rlaif_fast.trainer import RLAIFConfig, RLAIFTrainer, ValueModel
    cfg = RLAIFConfig(algorithm="reinforce_baseline", batch_size=16, kl_coef=0.05)
    trainer = RLAIFTrainer(policy, tokenizer, reward, cfg, value_model=ValueModel.from_policy(policy))
    summary = trainer.train(prompts)

``reward`` is any callable ``(prompts: list[str], completions: list[str]) -> list[float]``.
Names resolve lazily: importing this package does not import deepspeed or transformers.
"""

import importlib

_EXPORTS = {
    "RLAIFConfig": "config",
    "RLAIFTrainer": "trainer",
    "ValueModel": "scoring",
    "NonFiniteError": "trainer",
    "Rollouts": "generation",
}


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rlaif_fast.trainer' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"rlaif_fast.trainer.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = sorted(_EXPORTS)
