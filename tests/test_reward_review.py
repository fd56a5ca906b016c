"""Review regressions for rlaif_fast.reward: context truncation, soft-label accuracy, loading a GPU-saved head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlaif_fast.reward import RewardModel, pairwise_accuracy
from rlaif_fast.reward.model import encode_pairs_side
from tests.test_feedback_labelers import gpt2_tokenizer
from tests.test_reward_model import tiny_rm


def test_encode_pairs_side_keeps_a_context_that_fits(shared_data):
    tok = gpt2_tokenizer(shared_data)
    ctx = " ".join(f"w{i}" for i in range(150))  # 300 tokens
    resp = " ".join(f"r{i}" for i in range(40))  # 80 tokens: 380 <= 512, nothing needs cutting
    n_ctx, n_resp = len(tok(ctx)["input_ids"]), len(tok(resp)["input_ids"])
    assert n_ctx + n_resp <= 512
    ids, mask = encode_pairs_side(tok, [ctx], [resp], 512)
    assert int(mask.sum()) == n_ctx + n_resp
    assert ids[0, :n_ctx].tolist() == tok(ctx)["input_ids"]
    # and when it does not fit, the context loses its left and the row is exactly max_length long
    ids, mask = encode_pairs_side(tok, [ctx], [resp], 100)
    assert int(mask.sum()) == 100 and ids[0, 100 - n_resp :].tolist() == tok(resp)["input_ids"]
    assert ids[0, : 100 - n_resp].tolist() == tok(ctx)["input_ids"][n_ctx - (100 - n_resp) :]


def test_pairwise_accuracy_binarizes_soft_labels_of_any_numeric_type():
    r_a, r_b = [1.0, 1.0], [0.0, 0.0]  # the model prefers a in both pairs; the labels prefer b
    for labels in ([0.2, 0.3], torch.tensor([0.2, 0.3]), np.array([0.2, 0.3], dtype=np.float32)):
        assert pairwise_accuracy(r_a, r_b, labels) == 0.0, type(labels)
    assert pairwise_accuracy(r_a, r_b, torch.tensor([0.8, 0.9])) == 1.0
    assert pairwise_accuracy(r_a, r_b, [True, False]) == 0.5


def test_pairwise_accuracy_counts_an_undecided_label_half():
    # p_a = 0.5 (a labeler that only follows position gives exactly this) prefers neither response
    assert pairwise_accuracy([1.0], [0.0], [0.5]) == 0.5
    assert pairwise_accuracy([0.0], [1.0], [0.5]) == 0.5


def test_head_saved_on_gpu_loads_on_a_cpu_machine(tmp_path, monkeypatch):
    import torch.serialization as ser

    rm = tiny_rm().eval()
    with monkeypatch.context() as m:  # what torch.save writes for a head that lives on cuda:0
        m.setattr(ser, "location_tag", lambda storage: "cuda:0")
        rm.save_pretrained(tmp_path / "rm")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    back = RewardModel.from_pretrained(tmp_path / "rm")
    torch.testing.assert_close(back.head.weight, rm.head.weight)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids), rm(ids), atol=1e-6, rtol=0)


def test_soft_bt_loss_matches_the_cross_entropy_definition():
    from rlaif_fast.reward import soft_bt_loss

    r_a = torch.tensor([0.3, -2.0, 50.0], dtype=torch.float64)
    r_b = torch.tensor([0.1, 1.0, -50.0], dtype=torch.float64)
    p = torch.tensor([0.7, 0.5, 0.0], dtype=torch.float64)
    q = torch.softmax(torch.stack([r_a, r_b], -1), -1)
    ref = -(p * q[:, 0].log() + (1 - p) * q[:, 1].clamp_min(1e-300).log())
    got = soft_bt_loss(r_a, r_b, p, reduction="none")
    torch.testing.assert_close(got[:2], ref[:2])
    assert got[2].item() == pytest.approx(100.0)  # finite for a gap of 100 where softmax underflows
