"""Run under torchrun with 2 ranks: ZeRO-2 and ZeRO-3 training of the toy task (greedy rollouts), the same
under ZeRO-3 with token-budget micro-batches, one ZeRO-3 step with real sampling (ranks reach EOS at
different times), and a loss that is NaN on rank 1 only; rank 0 saves the results.

torchrun --nproc_per_node=2 tests/dist/dp_invariance.py OUT_DIR
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy import invariance_run  # noqa: E402


def token_budget_run(balance: str) -> dict:
    """ZeRO-3 with micro-batches cut to 12 padded tokens. per_rank: each rank plans its own rows, the
    counts differ across ranks, so the shorter rank runs empty micro-batches (counted here) to stay in
    the collectives. global: the ranks plan every mini-batch together and trade rows (counted here: rows
    a rank trains on that another rank sampled), and the padded tokens each rank computes are summed."""
    from rlaif_fast.trainer import batches, update
    from rlaif_fast.trainer import trainer as trainer_module

    empties, moved, padded = [], [], []
    real_empty, real_plan = update.empty_like, batches.token_micro_batches

    def counting_empty(batch):
        empties.append(1)
        return real_empty(batch)

    def counting_plan(rollouts, rows, *args, **kwargs):
        out = real_plan(rollouts, rows, *args, **kwargs)
        rank, ranks = kwargs.get("rank", 0), kwargs.get("ranks", 1)
        n = len(rollouts) // ranks
        for b in out:
            moved.extend(r for r in b.rows if ranks > 1 and not rank * n <= r < (rank + 1) * n)
            padded.append(b.input_ids.numel())
        return out

    # the trainer's BatchLayout calls batches.token_micro_batches
    trainer_module.empty_like, batches.token_micro_batches = counting_empty, counting_plan
    try:
        params, history = invariance_run(
            zero_stage=3, max_prompt_len=4, max_tokens_per_microbatch=12, token_balance=balance
        )
    finally:
        trainer_module.empty_like, batches.token_micro_batches = real_empty, real_plan
    counts = torch.tensor([float(len(empties)), float(len(moved))])
    torch.distributed.all_reduce(counts)
    loads = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(loads, sum(padded))
    return {
        "params": params,
        "history": history,
        "empty_microbatches": int(counts[0].item()),
        "moved_rows": int(counts[1].item()),
        "rank_padded_tokens": loads,
    }


def nan_on_one_rank(out: Path) -> None:
    """Rank 1's loss is NaN: both ranks must raise NonFiniteError (none waits in a ZeRO reduction)."""
    from rlaif_fast.trainer import NonFiniteError, update

    real = update.micro_loss
    if torch.distributed.get_rank() == 1:

        def nan_loss(*args, **kwargs):
            loss, stats = real(*args, **kwargs)
            return loss * float("nan"), stats

        update.micro_loss = nan_loss
    message = "no error"
    try:
        invariance_run(steps=1, zero_stage=2, output_dir=str(out / "nan_run"))
    except NonFiniteError as err:
        message = str(err)
    finally:
        update.micro_loss = real
    messages = [None, None]
    torch.distributed.all_gather_object(messages, message)
    if torch.distributed.get_rank() == 0:
        torch.save({"messages": messages}, out / "nan_one_rank.pt")


def reference_is_sharded() -> dict:
    """Under ZeRO-3 the KL reference is partitioned like the policy: each rank holds no full weight."""
    from toy import CharTokenizer, count_a, tiny_gpt2

    from rlaif_fast.trainer import RLAIFConfig, RLAIFTrainer

    cfg = RLAIFConfig(
        algorithm="rloo", group_size=2, batch_size=8, micro_batch_size=2, zero_stage=3, kl_coef=0.1,
        progress=False, tensorboard=False, output_dir="/tmp/rlaif_ref_sharded",
    )  # fmt: skip
    trainer = RLAIFTrainer(tiny_gpt2(), CharTokenizer(), count_a, cfg)
    params = list(trainer.ref.module.parameters())
    return {
        "partitioned": all(hasattr(p, "ds_numel") and p.numel() < p.ds_numel for p in params),
        "full_numel": sum(p.ds_numel for p in params),
        "local_numel": sum(p.ds_tensor.numel() for p in params),
    }


def main(out: str) -> None:
    rank = torch.distributed.get_rank
    for stage in (2, 3):
        params, history = invariance_run(zero_stage=stage)
        if rank() == 0:
            torch.save({"params": params, "history": history}, Path(out) / f"zero{stage}.pt")
        torch.distributed.barrier()
    for balance in ("per_rank", "global"):
        budget = token_budget_run(balance)
        if rank() == 0:
            torch.save(budget, Path(out) / f"zero3_budget_{balance}.pt")
    # real sampling under ZeRO-3: ranks stop at EOS at different times; generate must stay in lockstep
    _, history = invariance_run(
        steps=1, fixed_lengths=False, zero_stage=3, temperature=1.0, max_new_tokens=12
    )
    if rank() == 0:
        torch.save({"history": history}, Path(out) / "zero3_sampled.pt")
    sharded = reference_is_sharded()
    if rank() == 0:
        torch.save(sharded, Path(out) / "ref_sharded.pt")
    nan_on_one_rank(Path(out))


if __name__ == "__main__":
    main(sys.argv[1])
    # an orderly teardown: leaving the process group to interpreter exit once aborted a rank
    # ("terminate called without an active exception") after every check had passed
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
