"""Training-batch layout: rollouts -> right-padded (or packed) micro-batches for the scoring and update passes.

Training batches are right-padded (prompt at position 0, as during generation once HF derives positions
from the mask). In the fast mode each micro-batch is padded only to its own longest rollout
(``rlaif_fast.batching``, rows sorted by length); in the naive mode (``ops='naive'``) to the longest
rollout of the whole batch, in the original order. Packed micro-batches (one row, no padding) are
``packing.py``'s.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from rlaif_fast.trainer.sampling import Rollouts


@dataclass
class TrainBatch:
    """One right-padded micro-batch. ``resp_index[b, j]`` is the column of response token j of row b."""

    input_ids: torch.Tensor  # (b, T)
    attention_mask: torch.Tensor  # (b, T)
    response_mask: torch.Tensor  # (b, T) 1 on response tokens
    resp_index: torch.Tensor  # (b, L) column of each response token, clamped to T - 1 on padding
    resp_mask: torch.Tensor  # (b, L) 1 where response token j exists
    rows: list[int]  # rows of the rank's batch that this micro-batch holds
    # packed (trainer/packing.py): one row (1, T), positions restarting per rollout, resp_index flat columns
    position_ids: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> TrainBatch:
        """A copy with every tensor on ``device`` (``rows`` shared); tensors already there are not copied."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **moved)


@dataclass
class ScoredBatch:
    """One rank's rollouts after the scoring pass: what the update reads, as one object.

    Every tensor is in the *response layout* (B, L): row i is rollout i of the rank, column j its response
    token j, L the longest response of the batch, 0 on padding; fp32 on the CPU. A micro-batch reads its
    ``rows`` and its own width from it (``update.micro_loss``). Fields an algorithm has no use for are None.
    """

    mask: torch.Tensor  # (B, L) fp32: 1 where response token j exists
    # (B, L) fp32: log pi_old(y_j) of the policy at rollout time; with on_policy zeros, filled in by the
    # update's own forward (update.micro_loss), then read by the step's metrics
    old_logp: torch.Tensor
    advantages: torch.Tensor  # (B, L) fp32: per token (rloo / grpo: one per row, broadcast); whitened if set
    kl: torch.Tensor  # (B, L) fp32: per-token KL estimate to the KL reference policy (0 without one)
    ref_logp: torch.Tensor | None = None  # (B, L) fp32: log pi_ref(y_j) of the KL reference; None: no KL
    old_values: torch.Tensor | None = None  # (B, L) fp32: critic's value before token j; None: no critic
    returns: torch.Tensor | None = None  # (B, L) fp32: the critic's regression targets; None: no critic
    on_policy: bool = False  # the update's forward is the old policy (trainer._on_policy_shortcut)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The (B, L) fields that are set, by name."""
        return {f.name: v for f in fields(self) if isinstance(v := getattr(self, f.name), torch.Tensor)}

    @classmethod
    def cat(cls, parts: list[ScoredBatch]) -> ScoredBatch:
        """Rows of ``parts`` one after the other (e.g. every rank's), each padded to the widest L."""
        names = set(parts[0].tensors())
        if any(set(p.tensors()) != names for p in parts):
            raise ValueError(
                f"cannot concatenate scored batches with different fields: {[sorted(p.tensors()) for p in parts]}"
            )
        width = max(p.mask.shape[1] for p in parts)
        merged = {
            name: torch.cat(
                [torch.nn.functional.pad(getattr(p, name), (0, width - p.mask.shape[1])) for p in parts]
            )
            for name in parts[0].tensors()
        }
        return replace(parts[0], **merged)


def _pad_right_python(prompt_ids, response_ids, pad_id, width):
    b = len(prompt_ids)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    attn = torch.zeros((b, width), dtype=torch.long)
    resp = torch.zeros((b, width), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r, dtype=torch.long)
        attn[i, :n] = 1
        resp[i, len(p) : n] = 1
    return ids, attn, resp


def _pad_right(prompt_ids, response_ids, pad_id, width, fast: bool):
    if fast:  # no fallback: an import error here is a broken install, not a reason to run the slow loop
        from rlaif_fast.batching import pad_rollouts

        out = pad_rollouts(
            prompt_ids, response_ids, pad_id, padding_side="right", max_len=width, truncation="error"
        )
        return out.input_ids, out.attention_mask, out.response_mask.long()
    return _pad_right_python(prompt_ids, response_ids, pad_id, width)


def train_batch(
    rollouts: Rollouts, chunk: list[int], pad_id: int, *, fast: bool, batch_width: int
) -> TrainBatch:
    """Rows ``chunk`` of ``rollouts`` as one right-padded micro-batch: to its own longest rollout when
    ``fast``, to ``batch_width`` otherwise."""
    lengths = rollouts.lengths()
    p = [rollouts.prompt_ids[i] for i in chunk]
    r = [rollouts.response_ids[i] for i in chunk]
    width = max(lengths[i] for i in chunk) if fast else batch_width
    ids, attn, resp = _pad_right(p, r, pad_id, width, fast)
    longest = max(max(len(x) for x in r), 1)
    j = torch.arange(longest)
    starts = torch.tensor([len(x) for x in p])
    resp_len = torch.tensor([len(x) for x in r])
    resp_index = (starts[:, None] + j[None, :]).clamp(max=width - 1)  # (b, L)
    resp_mask = (j[None, :] < resp_len[:, None]).float()  # (b, L)
    return TrainBatch(ids, attn, resp, resp_index, resp_mask, list(chunk))


def micro_batches(
    rollouts: Rollouts,
    rows: list[int],
    micro_batch_size: int,
    pad_id: int,
    *,
    fast: bool,
    batch_width: int,
    packed: bool = False,
) -> list[TrainBatch]:
    """Split ``rows`` into micro-batches of ``micro_batch_size``.

    fast: rows sorted by length so each micro-batch pads to its own longest rollout (padding to the
    batch's longest inflates the work about 2x on sampled lengths). naive: original order, every
    micro-batch padded to ``batch_width``. Losses are sums over tokens, so the order does not change
    the update. packed: each micro-batch is one row without padding (trainer/packing.py).
    """
    lengths = rollouts.lengths()
    order = sorted(rows, key=lambda i: lengths[i]) if fast else list(rows)
    if packed:
        from rlaif_fast.trainer.packing import packed_batch

        return [
            packed_batch(rollouts, order[start : start + micro_batch_size])
            for start in range(0, len(order), micro_batch_size)
        ]
    return [
        train_batch(
            rollouts, order[start : start + micro_batch_size], pad_id, fast=fast, batch_width=batch_width
        )
        for start in range(0, len(order), micro_batch_size)
    ]


def token_micro_batches(
    rollouts: Rollouts,
    rows: list[int],
    max_tokens: int,
    pad_id: int,
    *,
    fast: bool,
    batch_width: int,
    rank: int = 0,
    ranks: int = 1,
    packed: bool = False,
) -> list[TrainBatch]:
    """Split ``rows`` into micro-batches of at most ``max_tokens`` padded tokens (rows x padded width).

    The plan is ``rlaif_fast.batching.balanced_microbatches`` over ``rows`` for ``ranks`` ranks, and
    this returns rank ``rank``'s share: with one rank, all of ``rows``; with several, ``rows`` are the
    global mini-batch (every rank plans the same, deterministically, and takes its own micro-batches).
    Rollouts of similar length share a micro-batch, so short rollouts run many to a forward and long
    ones few. naive: every row counts as ``batch_width`` tokens, the width it is padded to, so the
    budget bounds the work actually done in both modes. The count varies with the lengths sampled.
    """
    from rlaif_fast.batching import balanced_microbatches

    lengths = rollouts.lengths()
    sizes = [lengths[i] if fast else batch_width for i in rows]
    longest = max(sizes)
    if longest > max_tokens:
        raise ValueError(
            f"a rollout of {longest} tokens does not fit max_tokens_per_microbatch={max_tokens}; raise it "
            f"to at least max_prompt_len + max_new_tokens"
        )
    plan = balanced_microbatches(sizes, max_tokens=max_tokens, num_ranks=ranks)
    if packed:  # one row of at most max_tokens real tokens (the plan bounds rows x longest >= the sum)
        from rlaif_fast.trainer.packing import packed_batch

        return [packed_batch(rollouts, [rows[k] for k in mb]) for mb in plan.microbatches[rank] if mb]
    return [
        train_batch(rollouts, [rows[k] for k in mb], pad_id, fast=fast, batch_width=batch_width)
        for mb in plan.microbatches[rank]
        if mb
    ]


@dataclass(frozen=True)
class BatchLayout:
    """How a trainer lays rollouts out, chosen once when it is built: ``fast`` (rows sorted by length, each
    micro-batch padded to its own longest rollout, by the C++ ``pad_rollouts``), naive (``fast=False``:
    original order, every micro-batch padded to ``batch_width``, the batch's longest), or ``packed`` (one
    row per micro-batch, no padding: trainer/packing.py)."""

    pad_id: int
    fast: bool
    packed: bool = False

    def micro_batches(
        self, rollouts: Rollouts, rows: list[int], size: int, batch_width: int
    ) -> list[TrainBatch]:
        """``rows`` in micro-batches of ``size`` rows (``micro_batches``)."""
        return micro_batches(
            rollouts, rows, size, self.pad_id, fast=self.fast, batch_width=batch_width, packed=self.packed
        )

    def token_micro_batches(
        self,
        rollouts: Rollouts,
        rows: list[int],
        max_tokens: int,
        batch_width: int,
        rank: int = 0,
        ranks: int = 1,
    ) -> list[TrainBatch]:
        """``rows`` in micro-batches of at most ``max_tokens`` padded tokens, rank ``rank``'s share of the
        plan over ``ranks`` ranks (``token_micro_batches``)."""
        return token_micro_batches(
            rollouts, rows, max_tokens, self.pad_id, fast=self.fast, batch_width=batch_width,
            rank=rank, ranks=ranks, packed=self.packed,
        )  # fmt: skip

    def one(self, rollouts: Rollouts, rows: list[int], batch_width: int) -> TrainBatch:
        """``rows`` as a single micro-batch."""
        if self.packed:
            from rlaif_fast.trainer.packing import packed_batch

            return packed_batch(rollouts, rows)
        return train_batch(rollouts, rows, self.pad_id, fast=self.fast, batch_width=batch_width)
