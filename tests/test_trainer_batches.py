"""trainer/batches.py: the training-batch layout (TrainBatch, its device move, micro-batch planning)."""

import pytest
import torch

from rlaif_fast.trainer.batches import TrainBatch, micro_batches, train_batch
from rlaif_fast.trainer.sampling import Rollouts


def _rollouts():
    return Rollouts(["a", "b", "c"], ["x", "y", "z"], [[1, 2], [3], [4, 5, 6]], [[7], [8, 9, 10], [11, 12]])


@pytest.mark.parametrize("packed", [False, True])
def test_train_batch_to_moves_every_tensor_and_leaves_the_original(packed):
    """``TrainBatch.to`` returns a batch whose every tensor (position_ids too, when packed) is on the device,
    the same rows, and leaves the batch it was called on where it was."""
    rollouts = _rollouts()
    batch = micro_batches(rollouts, [0, 1, 2], 2, 0, fast=True, batch_width=5, packed=packed)[0]
    assert (batch.position_ids is not None) == packed
    moved = batch.to("meta")  # a real device move that needs no accelerator
    tensors = [name for name, v in vars(batch).items() if isinstance(v, torch.Tensor)]
    assert {"input_ids", "attention_mask", "response_mask", "resp_index", "resp_mask"} <= set(tensors)
    for name in tensors:
        assert getattr(moved, name).device.type == "meta", name
        assert getattr(batch, name).device.type == "cpu", name
        assert getattr(moved, name).shape == getattr(batch, name).shape, name
    assert moved.rows == batch.rows and isinstance(moved, TrainBatch)
    same = batch.to(torch.device("cpu"))  # already there: the tensors themselves, no copy
    assert all(getattr(same, name) is getattr(batch, name) for name in tensors)


def test_train_batch_layout_right_pads_and_indexes_the_response():
    """Row b holds prompt + response from column 0; ``resp_index`` points at each response token."""
    batch = train_batch(_rollouts(), [1, 0], pad_id=0, fast=True, batch_width=5)
    assert batch.input_ids.tolist() == [[3, 8, 9, 10], [1, 2, 7, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    picked = batch.input_ids.gather(1, batch.resp_index) * batch.resp_mask.long()
    assert picked.tolist() == [[8, 9, 10], [7, 0, 0]]
    naive = train_batch(_rollouts(), [1, 0], pad_id=0, fast=False, batch_width=5)
    assert naive.input_ids.shape == (2, 5)  # the naive layout pads to the whole batch's width
    assert torch.equal(naive.input_ids[:, :4], batch.input_ids)


def test_scored_batch_cat_pads_each_part_to_the_widest_and_keeps_absent_fields_none():
    """The scored rows of several ranks, one after the other: (B, L) fields padded with zeros to the widest
    L, fields the algorithm has none of (no critic: old_values, returns) stay None; mixed parts refuse."""
    from rlaif_fast.trainer.batches import ScoredBatch

    def part(rows, width, fill, ref=True):
        t = torch.full((rows, width), float(fill))
        return ScoredBatch(
            mask=t.clone(),
            old_logp=t.clone(),
            advantages=t.clone(),
            kl=t.clone(),
            ref_logp=t if ref else None,
        )

    merged = ScoredBatch.cat([part(2, 3, 1.0), part(1, 5, 2.0)])
    assert sorted(merged.tensors()) == ["advantages", "kl", "mask", "old_logp", "ref_logp"]
    assert merged.old_values is None and merged.returns is None
    for name, t in merged.tensors().items():
        assert t.shape == (3, 5), name
        assert t[:2].tolist() == [[1.0, 1.0, 1.0, 0.0, 0.0]] * 2 and t[2].tolist() == [2.0] * 5, name
    with pytest.raises(ValueError, match="different fields"):
        ScoredBatch.cat([part(1, 2, 0.0), part(1, 2, 0.0, ref=False)])


@pytest.mark.parametrize("packed", [False, True])
def test_batch_layout_is_the_mode_chosen_once(packed):
    """``BatchLayout`` (what the trainer builds at init) lays rows out by its mode: fast sorts rows by length
    and pads each micro-batch to its own longest; naive keeps the order and pads to the batch's width;
    packed makes one padding-free row per micro-batch."""
    from rlaif_fast.trainer.batches import BatchLayout

    rollouts = _rollouts()  # lengths 3, 4, 5
    if packed:
        (one,) = BatchLayout(0, fast=True, packed=True).micro_batches(rollouts, [2, 0], 2, batch_width=5)
        assert one.input_ids.shape == (1, 8) and one.position_ids is not None
        return
    fast = BatchLayout(0, fast=True).micro_batches(rollouts, [2, 1, 0], 2, batch_width=5)
    naive = BatchLayout(0, fast=False).micro_batches(rollouts, [2, 1, 0], 2, batch_width=5)
    assert [b.rows for b in fast] == [[0, 1], [2]] and [b.input_ids.shape[1] for b in fast] == [4, 5]
    assert [b.rows for b in naive] == [[2, 1], [0]] and [b.input_ids.shape[1] for b in naive] == [5, 5]
    assert BatchLayout(0, fast=False).one(rollouts, [0], batch_width=5).input_ids.shape == (1, 5)
