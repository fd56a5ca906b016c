"""ZeRO-2/3 on 2 CPU ranks equal 1 rank with packed micro-batches and with LoRA (one torchrun launch,
tests/dist/packing_lora_dp.py; the 1-rank runs happen in this process). Plain SGD."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
from helpers import run_torchrun  # noqa: E402
from packing_lora_dp import CASES  # noqa: E402
from toy import invariance_run  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
SCRIPT = Path(__file__).resolve().parent / "dist" / "packing_lora_dp.py"


def test_two_ranks_zero2_and_zero3_equal_one_rank_packed_and_lora(tmp_path):
    run_torchrun(SCRIPT, str(tmp_path), nproc=2, timeout=600)
    for name, kw in CASES.items():
        one, _ = invariance_run(steps=1, zero_stage=0, **kw)
        fresh, _ = invariance_run(steps=0, zero_stage=0, **kw)
        step = max((one[k] - fresh[k]).abs().max().item() for k in one)
        assert step > 1e-3, name  # a real update happened
        for stage in (2, 3):
            got = torch.load(tmp_path / f"{name}_zero{stage}.pt", weights_only=False)["params"]
            assert set(got) == set(one), name
            diff = max((got[k] - v).abs().max().item() for k, v in one.items())
            assert diff <= 1e-5 * step, (
                f"{name}: ZeRO-{stage} on 2 ranks vs 1 rank differ by {diff:.3e} ({step:.3e})"
            )
