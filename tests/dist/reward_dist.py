"""Run under torchrun with 2 ranks: the reward model trained through the Strategy with ZeRO-2, then ZeRO-3, on
the same pairs; rank 0 saves each result. ``reward_run`` is also what the test runs on 1 rank.

torchrun --nproc_per_node=2 tests/dist/reward_dist.py OUT_DIR
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy import hf_char_tokenizer, tiny_gpt2  # noqa: E402

# 7 pairs in steps of 3: the last step holds 1 pair, so on 2 ranks one rank has none (a zero-weighted pair)
PAIRS = [
    {"context": c, "response_a": a, "response_b": b, "p_a": p}
    for c, a, b, p in [
        ("ab", "aaa", "bcd", 0.9),
        ("cd", "dc", "aad", 0.2),
        ("ef", "fea", "e", 0.7),
        ("gh", "hhh", "ag", 0.35),
        ("ij", "j", "aij", 0.1),
        ("ba", "aab", "bb", 0.8),
        ("dc", "cd", "dca", 0.6),
    ]
]


def reward_run(zero_stage: int) -> dict:
    """{"params": trained weights (CPU float32), "losses": per step, "eval": metrics} of one ZeRO stage."""
    from rlaif_fast.reward import RewardModel, train_reward_model
    from rlaif_fast.trainer import RLAIFConfig
    from rlaif_fast.trainer.strategy import Strategy

    strategy = Strategy(RLAIFConfig(output_dir="unused", zero_stage=zero_stage, bf16="false"))
    rm = RewardModel(tiny_gpt2(seed=0))
    torch.manual_seed(1)
    torch.nn.init.normal_(rm.head.weight, std=0.5)
    out = train_reward_model(
        rm,
        hf_char_tokenizer(),
        PAIRS,
        epochs=2,
        lr=0.5,
        batch_size=3,
        seed=3,
        strategy=strategy,
        optimizer="sgd",
    )
    params = {k: v.detach().cpu().float().clone() for k, v in out["model"].state_dict().items()}
    return {"params": params, "losses": out["losses"], "train": out["train"]}


if __name__ == "__main__":
    out = Path(sys.argv[1])
    results = {stage: reward_run(stage) for stage in (2, 3)}
    if torch.distributed.get_rank() == 0:
        for stage, result in results.items():
            torch.save(result, out / f"rm_zero{stage}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
