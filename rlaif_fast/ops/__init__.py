"""Public RL ops. CUDA tensors run Triton kernels; CPU tensors a chunked torch path; see ``_backend``.

Names resolve lazily so that ``import rlaif_fast.ops`` never imports triton, transformers or deepspeed.
"""

from rlaif_fast._lazy import lazy_exports

_EXPORTS = {
    # per-token log-probs and entropy from logits (one pass over [N, V])
    "token_logprobs": "logprobs",
    # KL estimators and KL-shaped per-token rewards
    "kl_penalty": "kl",
    "kl_shaped_rewards": "kl",
    # advantages
    "gae": "advantages",
    "group_advantages": "advantages",
    "masked_whiten": "advantages",
    "masked_mean": "advantages",
    # losses
    "ppo_policy_loss": "ppo",
    "ppo_loss_from_logprobs": "ppo",
    "value_loss": "ppo",
    # from hidden states, never materializing [N, V] logits
    "linear_token_logprobs": "linear",
    "linear_ppo_policy_loss": "linear",
    "model_logprobs": "model",
}


__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS, globals())
