"""The distilled reward model of RLAIF (Lee et al. 2023, arXiv 2309.00267, section 2.2.1).

- :class:`RewardModel`: a transformers backbone + scalar head on the last non-pad token.
- :func:`soft_bt_loss`: cross-entropy between the AI soft label and softmax(r_a, r_b).
- :func:`train_reward_model`, ``rlaif-fast train-rm``: distill AI labels; pairwise accuracy vs AI and humans.
- :class:`RewardModelScorer`: ``(prompts, completions) -> list[float]`` for the RL trainer.
- Metrics: :func:`ai_human_alignment`, :func:`position_bias_rate`, :func:`pairwise_accuracy`.

Names resolve lazily: ``import rlaif_fast.reward`` does not import transformers.
"""

from rlaif_fast._lazy import lazy_exports

_EXPORTS = {
    "RewardModel": "model",
    "RewardModelScorer": "model",
    "encode_pairs_side": "model",
    "soft_bt_loss": "loss",
    "train_reward_model": "train",
    "evaluate_reward_model": "train",
    "RMTrainConfig": "train",
    "ai_human_alignment": "metrics",
    "position_bias_rate": "metrics",
    "pairwise_accuracy": "metrics",
}


__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS, globals())
