"""Rollout batching: pad, pack and balance variable-length rollouts (the Python face of ``rlaif_fast._C``).

Every RL step moves thousands of (prompt, response) pairs of very different lengths from generation to
scoring to the update. Three layouts cover what the trainer needs:

- ``pad_rollouts``: a (B, L) batch, left-padded for generation or right-padded for training.
- ``pack_rollouts``: no padding at all, in the flash-attention varlen format; ``unpack`` undoes it.
- ``balanced_microbatches``: which sequences go to which rank and micro-batch so that every rank
  does the same work in the same number of steps.

The work runs in the C++ extension ``rlaif_fast._C`` (results come back as NumPy arrays owning C++
buffers, wrapped by ``torch.from_numpy`` without a copy). When the extension is missing, the same API
runs the plain-Python reference (``rlaif_fast.reference.batching``), with one warning at import;
``RLAIF_FAST_NO_EXT=1`` forces that fallback. ``backend()`` says which one is active.

Inputs: ``prompts`` / ``responses`` are lists (or tuples) of sequences, each a list of ints, a 1-D
integer NumPy array or a 1-D integer torch tensor; a 2-D array or tensor is read as one row per sequence.
"""

from __future__ import annotations

import operator
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from rlaif_fast._checks import check_choice
from rlaif_fast.reference import batching as _ref

NO_EXT_VAR = "RLAIF_FAST_NO_EXT"


def _load_extension():
    if os.environ.get(NO_EXT_VAR) == "1":
        return None
    try:
        from rlaif_fast import _C
    except ImportError as exc:
        warnings.warn(
            f"rlaif_fast._C is not built ({exc}); rlaif_fast.batching runs its pure-Python fallback, "
            "about 20-100x slower. Build it with `python setup.py build_ext --inplace` (needs a C++17 "
            f"compiler and pybind11), or set {NO_EXT_VAR}=1 to silence this warning.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return _C


_C = _load_extension()


def backend() -> str:
    """``"cpp"`` when the extension runs the batching, ``"python"`` for the pure-Python fallback."""
    return "cpp" if _C is not None else "python"


# --------------------------------------------------------------------------------------------- results


@dataclass
class _TensorBatch:
    def to(self, device, non_blocking: bool = False):
        """A copy with every tensor moved to ``device`` (ints and lists are kept)."""

        def move(v):
            return v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v

        return type(self)(**{f.name: move(getattr(self, f.name)) for f in fields(self)})


@dataclass
class PaddedBatch(_TensorBatch):
    """Rollouts padded to one width L (the longest rollout after truncation).

    input_ids:        (B, L) int64, pads hold ``pad_id``
    attention_mask:   (B, L) int64, 1 on real tokens (the Hugging Face convention)
    position_ids:     (B, L) int64, 0, 1, ... over each row's real tokens; 0 on pads
    response_mask:    (B, L) bool, True on response tokens (where the RL loss applies)
    prompt_lengths:   (B,) int64, prompt tokens kept after truncation
    response_lengths: (B,) int64, response tokens kept after truncation
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    response_mask: torch.Tensor
    prompt_lengths: torch.Tensor
    response_lengths: torch.Tensor


@dataclass
class PackedBatch(_TensorBatch):
    """Rollouts end to end without padding, the flash-attention varlen layout.

    input_ids:     (1, total) int64
    position_ids:  (1, total) int64, restarting at 0 for each sequence
    response_mask: (1, total) bool
    cu_seqlens:    (B + 1,) int32, sequence i is [cu_seqlens[i], cu_seqlens[i + 1])
    max_seqlen:    int, the longest sequence (flash_attn_varlen_func wants it)
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    response_mask: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int


@dataclass
class MicroBatchPlan:
    """Which sequences each rank runs in each micro-batch, and what the plan costs.

    microbatches:       microbatches[rank][step] is a list of sequence indices, longest first; every
                        rank has the same number of steps, longest micro-batch first. A step is empty
                        only when a rank has fewer sequences than steps.
    rank_tokens:        real tokens per rank
    rank_padded_tokens: per rank, the sum over its micro-batches of count x longest (a padded layout's work)
    strategy:           "global" (micro-batches cut from all sequences sorted by length, then dealt to
                        ranks) or "per_rank" (sequences dealt to ranks, then cut); see balanced_microbatches
    imbalance:          max / mean of ``rank_tokens`` (1.0 is perfect; 1.0 when every length is 0)
    """

    microbatches: list[list[list[int]]]
    rank_tokens: list[int]
    rank_padded_tokens: list[int]
    strategy: str
    imbalance: float

    @property
    def num_steps(self) -> int:
        """Micro-batches per rank (the same on every rank)."""
        return len(self.microbatches[0])

    @property
    def padded_tokens(self) -> int:
        return sum(self.rank_padded_tokens)

    @property
    def padding(self) -> int:
        """Pad tokens when every micro-batch is padded to its longest sequence."""
        return self.padded_tokens - sum(self.rank_tokens)

    @property
    def padding_fraction(self) -> float:
        """padding / padded_tokens: the share of a padded layout's work spent on pads."""
        return self.padding / self.padded_tokens if self.padded_tokens else 0.0

    @property
    def padded_imbalance(self) -> float:
        """max / mean of ``rank_padded_tokens``: the figure the plan minimizes (its busiest rank)."""
        mean = self.padded_tokens / len(self.rank_padded_tokens)
        return max(self.rank_padded_tokens) / mean if mean > 0 else 1.0

    @property
    def num_empty(self) -> int:
        """Empty micro-batches added so that every rank has the same number of steps."""
        return sum(1 for rank in self.microbatches for mb in rank if not mb)


# -------------------------------------------------------------------------------------- input handling


def _rows(name: str, seqs) -> list:
    """The container as a list of per-sequence items (a 2-D array or tensor is one row per sequence)."""
    if isinstance(seqs, torch.Tensor | np.ndarray):
        if seqs.ndim != 2:
            raise ValueError(
                f"{name} is an array of shape {tuple(seqs.shape)}; pass a 2-D (B, T) array or a list of 1-D sequences"
            )
        seqs = list(seqs)
    if not isinstance(seqs, Sequence) or isinstance(seqs, str | bytes):
        raise TypeError(
            f"{name} is a {type(seqs).__name__}; pass a list of sequences (lists of ints, 1-D integer arrays "
            "or tensors)"
        )
    return list(seqs)


def _tensor_item(name: str, i: int, t: torch.Tensor) -> np.ndarray:
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name}[{i}] has dtype {t.dtype}; token ids must be integers (cast with .long())")
    if t.dim() != 1:
        raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)}; each sequence must be 1-D")
    return t.detach().cpu().numpy()


def _for_extension(name: str, seqs) -> list:
    """Items the extension reads directly: lists/tuples of ints and integer NumPy arrays."""
    rows = _rows(name, seqs)
    return [_tensor_item(name, i, s) if isinstance(s, torch.Tensor) else s for i, s in enumerate(rows)]


def _as_int_list(name: str, i: int, seq) -> list[int]:
    if isinstance(seq, torch.Tensor):
        seq = _tensor_item(name, i, seq)
    if isinstance(seq, np.ndarray):
        if seq.dtype.kind not in "iu":
            raise TypeError(
                f"{name}[{i}] has dtype {seq.dtype}; token ids must be an integer dtype (cast with "
                ".astype(np.int64) or .long())"
            )
        if seq.ndim != 1:
            raise ValueError(f"{name}[{i}] has {seq.ndim} dimensions; each sequence must be 1-D")
        return seq.tolist()
    if not isinstance(seq, list | tuple):
        raise TypeError(
            f"{name}[{i}] is a {type(seq).__name__}; each sequence must be a list of ints, a 1-D integer "
            "array or tensor"
        )
    out = []
    for j, tok in enumerate(seq):
        try:
            out.append(operator.index(tok))
        except TypeError:
            raise TypeError(
                f"{name}[{i}][{j}] is a {type(tok).__name__}; token ids must be integers"
            ) from None
    return out


def _for_reference(name: str, seqs) -> list[list[int]]:
    return [_as_int_list(name, i, s) for i, s in enumerate(_rows(name, seqs))]


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low:
        raise ValueError(f"{name}={value} must be >= {low}")
    return int(value)


def _check_pair(prompts: list, responses: list) -> None:
    if len(prompts) != len(responses):
        raise ValueError(
            f"got {len(prompts)} prompts but {len(responses)} responses; pass one response per prompt"
        )
    if not prompts:
        raise ValueError("the batch is empty (0 rollouts); pass at least one prompt and response")


# ------------------------------------------------------------------------------------------ public API


def pad_rollouts(
    prompts,
    responses,
    pad_id: int,
    *,
    padding_side: str = "left",
    max_len: int | None = None,
    truncation: str = "error",
) -> PaddedBatch:
    """Pad each ``prompt_i + response_i`` to one width: a (B, L) batch for a causal LM.

    Row i holds n_i = len(prompt_i) + len(response_i) real tokens; L = max_i n_i after truncation
    (``max_len`` caps L, it does not force it). ``padding_side="left"`` puts the pads first (generation:
    every row's last token is column L - 1); ``"right"`` puts them last (training).
    Position ids count real tokens: position_ids[i, start_i + t] = t for t < n_i, 0 on pads.

    Truncation, only when n_i > ``max_len``: ``"error"`` raises ValueError naming the rollout;
    ``"left"`` drops the oldest prompt tokens (it never cuts a response and keeps at least one prompt
    token, else ValueError); ``"right"`` keeps the first ``max_len`` tokens. Nothing is cut silently:
    ``prompt_lengths`` / ``response_lengths`` report what was kept.

    Raises ValueError naming the index and value for negative token ids, an empty prompt, a count
    mismatch or an empty batch; TypeError for non-integer ids.
    """
    pad_id = _check_int("pad_id", pad_id, 0)
    check_choice("padding_side", padding_side, ("left", "right"))
    check_choice("truncation", truncation, ("error", "left", "right"))
    if max_len is not None:
        max_len = _check_int("max_len", max_len, 1)
    if _C is not None:
        p, r = _for_extension("prompts", prompts), _for_extension("responses", responses)
        _check_pair(p, r)
        arrays = _C.pad_rollouts(p, r, pad_id, padding_side, -1 if max_len is None else max_len, truncation)
        return PaddedBatch(*(torch.from_numpy(a) for a in arrays))
    p, r = _for_reference("prompts", prompts), _for_reference("responses", responses)
    _check_pair(p, r)
    out = _ref.pad_rollouts(p, r, pad_id, padding_side, max_len, truncation)
    return PaddedBatch(
        input_ids=torch.tensor(out["input_ids"], dtype=torch.int64),
        attention_mask=torch.tensor(out["attention_mask"], dtype=torch.int64),
        position_ids=torch.tensor(out["position_ids"], dtype=torch.int64),
        response_mask=torch.tensor(out["response_mask"], dtype=torch.bool),
        prompt_lengths=torch.tensor(out["prompt_lengths"], dtype=torch.int64),
        response_lengths=torch.tensor(out["response_lengths"], dtype=torch.int64),
    )


def pack_rollouts(prompts, responses) -> PackedBatch:
    """Lay ``prompt_i + response_i`` end to end without padding (flash-attention varlen layout).

    total = sum_i n_i. ``cu_seqlens`` (B + 1,) int32 holds 0, n_0, n_0 + n_1, ...; sequence i is
    ``input_ids[0, cu_seqlens[i]:cu_seqlens[i + 1]]`` and its position ids restart at 0, which is what
    ``flash_attn_varlen_func`` and Hugging Face's packed-sequence attention expect. No pad token: compute
    is spent only on real tokens. Same input rules and errors as ``pad_rollouts``.
    """
    if _C is not None:
        p, r = _for_extension("prompts", prompts), _for_extension("responses", responses)
        _check_pair(p, r)
        ids, pos, resp, cu, max_seqlen = _C.pack_rollouts(p, r)
        return PackedBatch(
            input_ids=torch.from_numpy(ids).unsqueeze(0),
            position_ids=torch.from_numpy(pos).unsqueeze(0),
            response_mask=torch.from_numpy(resp).unsqueeze(0),
            cu_seqlens=torch.from_numpy(cu),
            max_seqlen=int(max_seqlen),
        )
    p, r = _for_reference("prompts", prompts), _for_reference("responses", responses)
    _check_pair(p, r)
    out = _ref.pack_rollouts(p, r)
    return PackedBatch(
        input_ids=torch.tensor([out["input_ids"]], dtype=torch.int64),
        position_ids=torch.tensor([out["position_ids"]], dtype=torch.int64),
        response_mask=torch.tensor([out["response_mask"]], dtype=torch.bool),
        cu_seqlens=torch.tensor(out["cu_seqlens"], dtype=torch.int32),
        max_seqlen=out["max_seqlen"],
    )


def unpack(values: torch.Tensor, cu_seqlens) -> list[torch.Tensor]:
    """Split packed ``values`` back into per-sequence views (no copy).

    values: (total, ...) or (1, total, ...), e.g. per-token log-probs computed on a ``PackedBatch``.
    cu_seqlens: (B + 1,) as returned by ``pack_rollouts``. Returns B tensors of shapes (n_i, ...).
    """
    if isinstance(values, np.ndarray):
        values = torch.from_numpy(values)
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"values must be a torch.Tensor or NumPy array, got {type(values).__name__}")
    cu = torch.as_tensor(cu_seqlens).detach().cpu()
    if cu.dim() != 1 or cu.numel() < 2 or cu.is_floating_point():
        raise ValueError(f"cu_seqlens must be a 1-D integer array of B + 1 >= 2 offsets, got {cu.tolist()!r}")
    lengths = (cu[1:] - cu[:-1]).tolist()
    if int(cu[0]) != 0 or min(lengths) < 0:
        raise ValueError(f"cu_seqlens must start at 0 and never decrease, got {cu.tolist()!r}")
    total = int(cu[-1])
    if values.dim() >= 2 and values.shape[0] == 1 and values.shape[1] == total:
        values = values[0]  # (1, total, ...) -> (total, ...)
    if values.dim() == 0 or values.shape[0] != total:
        raise ValueError(
            f"values has shape {tuple(values.shape)} but cu_seqlens ends at {total}; pass (total, ...) or "
            "(1, total, ...) values from the same packed batch"
        )
    return list(torch.split(values, lengths))


def balanced_microbatches(lengths, *, max_tokens: int, num_ranks: int) -> MicroBatchPlan:
    """Assign sequences to ``num_ranks`` ranks x M micro-batches, balancing the token load.

    Budget: every micro-batch fits ``count x longest <= max_tokens`` (its padded size, so the budget
    holds for padded and packed layouts alike). Every rank gets the same number of steps M, so a
    collective per step cannot hang; a step is empty only when a rank has fewer sequences than M.

    Two candidate plans are built; the one whose busiest rank computes the fewest padded tokens wins
    (then the fewer steps):

    - ``"global"``: all sequences, longest first, cut greedily at the budget (neighbours of similar
      length share a micro-batch: little padding), split up to a multiple of ``num_ranks``, dealt to
      ranks by Karmarkar-Karp largest differencing with equal counts, then refined by swapping
      micro-batches and moving single sequences from the heaviest rank to the lightest.
    - ``"per_rank"``: sequences dealt to ranks by Karmarkar-Karp, each rank's share cut longest first,
      counts equalized by splitting the fullest micro-batch. Near-perfect balance, more padding: it
      wins on small batches, where whole micro-batches are too coarse to balance.

    On 4096 long-tailed rollouts (16384 tokens, 8 ranks) the plan pads ~2% with max/mean rank load
    ~1.005 (benchmarks/results/batching.md). With only a few micro-batches per rank the balance is
    bounded by that granularity: check ``plan.imbalance``.

    Deterministic: the same lengths give the same plan on every rank and both backends.
    lengths: (N,) non-negative ints (list, NumPy array or tensor); each must be <= max_tokens.
    Karmarkar & Karp 1982, "The differencing method of set partitioning".
    """
    max_tokens = _check_int("max_tokens", max_tokens, 1)
    num_ranks = _check_int("num_ranks", num_ranks, 1)
    if isinstance(lengths, torch.Tensor):
        lengths = lengths.detach().cpu().numpy()
    arr = np.asarray(lengths)
    if arr.ndim != 1:
        raise ValueError(f"lengths must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("lengths is empty; pass at least one sequence length")
    if arr.dtype.kind not in "iu":
        raise TypeError(f"lengths has dtype {arr.dtype}; pass integer token counts")
    if _C is not None:
        out = _C.balanced_microbatches(np.ascontiguousarray(arr, dtype=np.int64), max_tokens, num_ranks)
    else:
        ref = _ref.balanced_microbatches(arr.tolist(), max_tokens, num_ranks)
        out = (ref["microbatches"], ref["rank_tokens"], ref["rank_padded_tokens"], ref["strategy"])
    plan, rank_tokens, rank_padded, strategy = out
    mean = sum(rank_tokens) / num_ranks
    return MicroBatchPlan(
        microbatches=plan,
        rank_tokens=rank_tokens,
        rank_padded_tokens=rank_padded,
        strategy=strategy,
        imbalance=max(rank_tokens) / mean if mean > 0 else 1.0,
    )


__all__ = [
    "MicroBatchPlan",
    "PackedBatch",
    "PaddedBatch",
    "backend",
    "balanced_microbatches",
    "pack_rollouts",
    "pad_rollouts",
    "unpack",
]
