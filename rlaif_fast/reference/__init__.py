"""Plain-torch / plain-Python references of every kernel and C++ function.

Written for clarity, not speed: the oracle of the tests (run in float64), the baseline of the
benchmarks, and the ``RLAIF_FAST_BACKEND=reference`` path. One module per concern:
``logprobs`` (log-probs, entropy, the PPO and value losses), ``rl`` (KL, advantages, whitening),
``linear`` (log-probs from hidden states), ``batching`` (pad / pack / balance).
"""
