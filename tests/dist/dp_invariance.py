"""Run under torchrun with 2 ranks: ZeRO-2 and ZeRO-3 training of the toy task (greedy rollouts), then one
ZeRO-3 step with real sampling (ranks reach EOS at different times); rank 0 saves the results.

torchrun --nproc_per_node=2 tests/dist/dp_invariance.py OUT_DIR
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy import invariance_run  # noqa: E402


def main(out: str) -> None:
    for stage in (2, 3):
        params, history = invariance_run(zero_stage=stage)
        if torch.distributed.get_rank() == 0:
            torch.save({"params": params, "history": history}, Path(out) / f"zero{stage}.pt")
        torch.distributed.barrier()
    # real sampling under ZeRO-3: ranks stop at EOS at different times; generate must stay in lockstep
    _, history = invariance_run(
        steps=1, fixed_lengths=False, zero_stage=3, temperature=1.0, max_new_tokens=12
    )
    if torch.distributed.get_rank() == 0:
        torch.save({"history": history}, Path(out) / "zero3_sampled.pt")


if __name__ == "__main__":
    main(sys.argv[1])
