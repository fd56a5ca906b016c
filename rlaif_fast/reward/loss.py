"""The distilled reward model's loss (Lee et al. 2023, arXiv 2309.00267, eq. 1 with soft labels).

With the AI soft label p = P(a > b) and rewards r_a, r_b, the loss is the cross-entropy between
(p, 1 - p) and softmax(r_a, r_b):

    L = -[p * log sigmoid(r_a - r_b) + (1 - p) * log sigmoid(r_b - r_a)]

written with logsigmoid so it stays finite for reward gaps of any size. p in {0, 1} is the ordinary
Bradley-Terry loss on hard labels. Averaged over pairs (mean), so it does not depend on how pairs are
split across data-parallel ranks when every rank holds the same number of pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlaif_fast._checks import check_float, check_same_shape


def soft_bt_loss(
    r_a: torch.Tensor, r_b: torch.Tensor, p_a: torch.Tensor, *, reduction: str = "mean"
) -> torch.Tensor:
    """Soft-label Bradley-Terry loss. r_a, r_b, p_a: (N,); returns a scalar ("mean"/"sum") or (N,) ("none")."""
    check_float("r_a", r_a)
    check_float("r_b", r_b)
    check_float("p_a", p_a)
    check_same_shape(r_a=r_a, r_b=r_b, p_a=p_a)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction={reduction!r} is not supported; use 'mean', 'sum' or 'none'")
    if p_a.numel() and (p_a.min() < 0 or p_a.max() > 1):
        raise ValueError(f"p_a must lie in [0, 1], got values in [{p_a.min().item()}, {p_a.max().item()}]")
    d = r_a - r_b  # (N,)
    p = p_a.to(d.dtype)
    loss = -(p * F.logsigmoid(d) + (1 - p) * F.logsigmoid(-d))  # (N,)
    if reduction == "mean":
        return loss.mean()
    return loss.sum() if reduction == "sum" else loss
