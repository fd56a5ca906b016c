"""Plain-torch / plain-Python references of every kernel and C++ function.

Written for clarity, not speed: the oracle of the tests (run in float64), the baseline of the
benchmarks, and the ``RLAIF_FAST_BACKEND=reference`` path. One module per concern:
``logprobs`` (log-probs, entropy, PPO loss from logits), ``rl`` (KL, advantages, whitening, value loss),
``linear`` (log-probs from hidden states), ``batching`` (pad / pack / balance).
"""
