"""The reward model trained through the Strategy on 2 CPU ranks (gloo) with ZeRO-2 and ZeRO-3 equals 1 rank.

One torchrun launch trains both (tests/dist/reward_dist.py); the 1-rank run (ZeRO-0) happens in this
process. Plain SGD, so a gradient of the wrong scale (a per-rank mean) would show; the last step of each epoch
holds one pair, so one of the 2 ranks runs a zero-weighted pair to stay in the collectives.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
from helpers import run_torchrun  # noqa: E402
from reward_dist import reward_run  # noqa: E402
from toy import tiny_gpt2  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

SCRIPT = Path(__file__).resolve().parent / "dist" / "reward_dist.py"


def test_reward_model_zero2_zero3_two_ranks_equal_one_rank(tmp_path):
    run_torchrun(SCRIPT, str(tmp_path), nproc=2, timeout=400)
    one = reward_run(zero_stage=0)
    init = tiny_gpt2(seed=0).transformer.state_dict()
    moved = max((one["params"][f"backbone.{k}"] - v).abs().max().item() for k, v in init.items())
    assert moved > 1e-3  # the backbone really trained
    assert len(one["losses"]) == 6  # 2 epochs of 3 steps (3, 3 and 1 pairs)
    for stage in (2, 3):
        got = torch.load(tmp_path / f"rm_zero{stage}.pt", weights_only=False)
        assert set(got["params"]) == set(one["params"])
        diff = max((got["params"][k] - v).abs().max().item() for k, v in one["params"].items())
        assert diff <= 1e-5 * moved, (
            f"ZeRO-{stage} on 2 ranks differs from 1 rank by {diff:.3e} (moved {moved:.3e})"
        )
        assert got["losses"] == pytest.approx(one["losses"], rel=1e-5, abs=1e-7)
        assert got["train"]["acc_ai"] == one["train"]["acc_ai"]
