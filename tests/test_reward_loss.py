"""The soft-label Bradley-Terry loss against a float64 reference (forward and both gradients), and the
paper's metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rlaif_fast.reward import (
    ai_human_alignment,
    pairwise_accuracy,
    position_bias_rate,
    soft_bt_loss,
)
from tests.helpers import assert_tolerance


def reference_loss(r_a, r_b, p):
    """Cross-entropy between (p, 1 - p) and softmax([r_a, r_b]), written literally, per pair."""
    logits = torch.stack([r_a, r_b], dim=-1)  # (N, 2)
    target = torch.stack([p, 1 - p], dim=-1)  # (N, 2)
    return -(target * torch.log_softmax(logits, dim=-1)).sum(-1)  # (N,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n", [1, 37, 2053])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_and_grads_match_float64(dtype, n, reduction):
    r_a = (torch.randn(n) * 4).to(dtype).requires_grad_()
    r_b = (torch.randn(n) * 4).to(dtype).requires_grad_()
    p = torch.rand(n).to(dtype)
    p[: n // 4] = (p[: n // 4] > 0.5).to(dtype)  # hard labels too

    def reduce(x):
        return x.mean() if reduction == "mean" else (x.sum() if reduction == "sum" else x)

    truth_inputs = [t.detach().double().requires_grad_() for t in (r_a, r_b)]
    truth = reduce(reference_loss(*truth_inputs, p.double()))
    eager_inputs = [t.detach().clone().requires_grad_() for t in (r_a, r_b)]
    eager = reduce(reference_loss(*eager_inputs, p))
    ours = soft_bt_loss(r_a, r_b, p, reduction=reduction)
    assert ours.dtype == dtype
    assert_tolerance(ours, eager, truth, dtype=dtype, name="loss")
    g = torch.randn_like(truth)
    grads_truth = torch.autograd.grad(truth, truth_inputs, g)
    grads_eager = torch.autograd.grad(eager, eager_inputs, g.to(dtype))
    grads_ours = torch.autograd.grad(ours, (r_a, r_b), g.to(dtype))
    for name, o, e, t in zip(("d r_a", "d r_b"), grads_ours, grads_eager, grads_truth):
        assert_tolerance(o, e, t, dtype=dtype, name=name)


def test_loss_is_finite_for_huge_reward_gaps_and_minimal_at_the_label():
    r_a = torch.tensor([1e4, -1e4, 0.0], dtype=torch.float32, requires_grad=True)
    loss = soft_bt_loss(r_a, torch.zeros(3), torch.tensor([1.0, 0.0, 0.5]), reduction="none")
    assert torch.isfinite(loss).all() and loss[0] == 0 and loss[1] == 0
    assert loss[2].item() == pytest.approx(math.log(2))
    loss.sum().backward()
    assert torch.isfinite(r_a.grad).all()
    # the minimum over the gap d is at sigmoid(d) = p: the soft label is what the RM learns
    d = torch.linspace(-5, 5, 10001, dtype=torch.float64)
    p = torch.full_like(d, 0.8)
    best = d[soft_bt_loss(d, torch.zeros_like(d), p, reduction="none").argmin()]
    assert torch.sigmoid(best).item() == pytest.approx(0.8, abs=1e-3)


def test_loss_bad_inputs():
    with pytest.raises(ValueError, match=r"p_a must lie in \[0, 1\]"):
        soft_bt_loss(torch.zeros(2), torch.zeros(2), torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="r_b has shape"):
        soft_bt_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2))
    with pytest.raises(TypeError, match="r_a has dtype int64"):
        soft_bt_loss(torch.zeros(2, dtype=torch.long), torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="reduction='avg'"):
        soft_bt_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), reduction="avg")


def test_metrics():
    assert ai_human_alignment([0.9, 0.2, 0.5, 0.7], [True, True, True, False]) == pytest.approx(1.5 / 4)
    assert position_bias_rate([0.9, 0.9, 0.1], [0.8, 0.2, 0.3]) == pytest.approx(1 / 3)
    assert pairwise_accuracy([2.0, 0.0, 1.0], [1.0, 1.0, 1.0], [True, True, False]) == pytest.approx(1.5 / 3)
    assert pairwise_accuracy([2.0, 0.0], [1.0, 1.0], [0.9, 0.2]) == 1.0
    with pytest.raises(ValueError, match="p_a has 1 items but human_a has 2"):
        ai_human_alignment([0.5], [True, False])
    with pytest.raises(ValueError, match="is empty"):
        position_bias_rate([], [])


# -------------------- metrics on soft labels and the loss definition


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
