"""Data-parallel invariance: 2 CPU ranks over gloo with ZeRO-2 and ZeRO-3 (and ZeRO-3 with token-budget
micro-batches) equal 1 rank, same global batch; a NaN loss on one rank stops both.

One torchrun launch runs both stages (tests/dist/dp_invariance.py); the 1-rank run happens in this
process. Plain SGD, so a gradient of the wrong scale (e.g. a per-rank token mean) would show.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
from helpers import run_torchrun  # noqa: E402
from toy import invariance_run, tiny_gpt2  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

SCRIPT = Path(__file__).resolve().parent / "dist" / "dp_invariance.py"


def test_two_ranks_zero2_and_zero3_equal_one_rank(tmp_path):
    run_torchrun(SCRIPT, str(tmp_path), nproc=2, timeout=400)
    one_rank, one_history = invariance_run(zero_stage=0)
    init = tiny_gpt2().state_dict()
    step = max(
        (one_rank[k] - init[k[len("policy.") :]]).abs().max().item()
        for k in one_rank
        if k.startswith("policy.")
    )
    assert step > 1e-3  # two real updates happened
    for stage in (2, 3):
        got = torch.load(tmp_path / f"zero{stage}.pt", weights_only=False)
        diff = max((got["params"][k] - v).abs().max().item() for k, v in one_rank.items())
        assert diff <= 1e-5 * step, (
            f"ZeRO-{stage} on 2 ranks differs from 1 rank by {diff:.3e} (update {step:.3e})"
        )
        for want, have in zip(one_history, got["history"]):
            for key in ("reward", "kl", "response_len", "policy_loss", "value_loss"):
                # fp32 sums in another order: losses near 0 carry ~1e-7 absolute noise
                assert have[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (stage, key)
    # token-budget micro-batches planned per rank: different counts, padded with empty ones, same update
    budget = torch.load(tmp_path / "zero3_budget.pt", weights_only=False)
    assert budget["empty_microbatches"] > 0  # the ranks' plans differed: the padding path ran
    diff = max((budget["params"][k] - v).abs().max().item() for k, v in one_rank.items())
    assert diff <= 1e-5 * step, f"ZeRO-3 with a token budget differs from 1 rank by {diff:.3e}"
    for want, have in zip(one_history, budget["history"]):
        for key in ("policy_loss", "value_loss", "clip_frac", "approx_kl"):
            assert have[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), ("budget", key)
    sampled = torch.load(tmp_path / "zero3_sampled.pt", weights_only=False)["history"][0]
    assert all(v == v for v in sampled.values())  # finished (no rank hung at EOS) with finite metrics
    # a NaN loss on rank 1 only: both ranks stop with NonFiniteError instead of rank 0 hanging
    sharded = torch.load(tmp_path / "ref_sharded.pt", weights_only=False)
    assert sharded["partitioned"], sharded  # the reference is not copied whole onto every rank
    assert sharded["local_numel"] <= sharded["full_numel"] // 2 + 64, sharded
    messages = torch.load(tmp_path / "nan_one_rank.pt", weights_only=False)["messages"]
    assert all("step 0: non-finite loss" in m for m in messages), messages
    assert "rank 1" in messages[1] and "other rank" in messages[0], messages
