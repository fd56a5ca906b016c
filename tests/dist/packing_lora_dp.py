"""Run under torchrun with 2 ranks: packed micro-batches under ZeRO-2 and ZeRO-3, LoRA under ZeRO-2 and
ZeRO-3 (the reference through the same engine with the adapters off), PPO with a ValueHead on the
policy's trunk; rank 0 saves the parameters.

torchrun --nproc_per_node=2 tests/dist/packing_lora_dp.py OUT_DIR
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy import invariance_run  # noqa: E402

CASES = {
    "packing": dict(packing=True),
    "lora": dict(lora={"r": 4, "alpha": 8, "target_modules": ["c_attn", "c_fc"]}, packing=True),
    # the critic as a head on the policy's trunk: one trunk pass, ZeRO-3 gathers it for both heads
    "value_head": dict(value_head=True),
}


def main(out: Path) -> None:
    torch.distributed.init_process_group("gloo")
    for name, kw in CASES.items():
        for stage in (2, 3):
            params, history = invariance_run(steps=1, zero_stage=stage, **kw)
            if torch.distributed.get_rank() == 0:
                torch.save({"params": params, "history": history}, out / f"{name}_zero{stage}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
