"""Type stub of the C++ extension ``rlaif_fast._C`` (csrc/). Use ``rlaif_fast.batching``, its Python face.

Every function checks its inputs and raises ValueError / TypeError naming the index and value. Arrays
come back as NumPy arrays that own their C++ buffers (``torch.from_numpy`` wraps them without a copy).
"""

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

# a sequence of token sequences: lists / tuples of ints, or 1-D integer NumPy arrays
Sequences = Sequence[Sequence[int] | npt.NDArray[np.integer]]

def pad_rollouts(
    prompts: Sequences,
    responses: Sequences,
    pad_id: int,
    padding_side: str,
    max_len: int,
    truncation: str,
) -> tuple[
    npt.NDArray[np.int64],  # input_ids (B, L)
    npt.NDArray[np.int64],  # attention_mask (B, L)
    npt.NDArray[np.int64],  # position_ids (B, L)
    npt.NDArray[np.bool_],  # response_mask (B, L)
    npt.NDArray[np.int64],  # prompt_lengths (B,)
    npt.NDArray[np.int64],  # response_lengths (B,)
]:
    """Pad prompt + response rows to the longest; ``max_len=-1`` means no limit.
    ``padding_side``: "left" | "right"; ``truncation``: "error" | "left" | "right"."""

def pack_rollouts(
    prompts: Sequences, responses: Sequences
) -> tuple[
    npt.NDArray[np.int64],  # input_ids (total,)
    npt.NDArray[np.int64],  # position_ids (total,), restarting at 0 per sequence
    npt.NDArray[np.bool_],  # response_mask (total,)
    npt.NDArray[np.int32],  # cu_seqlens (B + 1,)
    int,  # max_seqlen
]:
    """Lay rollouts end to end without padding (flash-attention varlen layout)."""

def balanced_microbatches(
    lengths: npt.NDArray[np.int64], max_tokens: int, num_ranks: int
) -> tuple[list[list[list[int]]], list[int], list[int], str]:
    """(microbatches[rank][step] -> indices, rank_tokens, rank_padded_tokens, strategy) with strategy
    "global" or "per_rank"; see ``rlaif_fast.batching.balanced_microbatches``."""

def gae(
    rewards: npt.NDArray[np.floating],
    values: npt.NDArray[np.floating],
    mask: npt.NDArray[np.uint8],
    adv: npt.NDArray[np.floating],
    ret: npt.NDArray[np.floating],
    gamma: float,
    lam: float,
    num_threads: int,
    simd: bool = True,
) -> None:
    """Masked GAE written into ``adv`` and ``ret``: all (B, T) and C-contiguous, rewards/values/adv/ret one
    dtype (float32 or float64), mask uint8 (nonzero = valid). The reference loop's arithmetic in that dtype
    (equal to it bit for bit); AVX2 across 8 rows for float32 where the CPU has it (``simd=False``: the
    scalar loop); the GIL is released; up to ``num_threads`` threads over blocks of 8 rows."""
