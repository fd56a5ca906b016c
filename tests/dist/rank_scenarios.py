"""Run under torchrun with 2 ranks (tests/test_trainer_dist.py): failures and ZeRO-3 scenarios.

torchrun --nproc_per_node=2 tests/dist/rank_scenarios.py SCENARIO OUT_DIR

failures: an error on one rank only (a prompt that encodes to no tokens in rank 1's slice, a reward that
raises or returns the wrong count on rank 1, learn() given an empty response on rank 1). Each rank writes
the message it stopped with to OUT_DIR/<case>_rank<r>.txt; a rank left waiting in a collective hits the
short process-group timeout set here and writes that error instead.
zero3_resume: ZeRO-3 PPO (value model) on 2 ranks, 4 steps straight vs 2 steps, a checkpoint, and a
resumed run; rank 0 saves both parameter sets and the histories.
json_zero3: ZeRO-3 from the DeepSpeed JSON only; rank 0 saves whether the KL reference is partitioned.
"""

import sys
import time
from datetime import timedelta
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy import PROMPTS, CharTokenizer, count_a, tiny_gpt2  # noqa: E402

from rlaif_fast.trainer import RLAIFConfig, RLAIFTrainer, ValueModel  # noqa: E402


class NoBosTokenizer(CharTokenizer):
    """A tokenizer without BOS (as GPT-2's): the empty prompt encodes to no tokens."""

    def encode(self, text: str) -> list[int]:
        return super().encode(text)[1:]


def _config(out: Path, **kw) -> RLAIFConfig:
    values = dict(
        algorithm="rloo",
        group_size=2,
        batch_size=4,
        micro_batch_size=1,
        max_new_tokens=4,
        kl_coef=0.0,
        progress=False,
        tensorboard=False,
        output_dir=str(out),
    )
    values.update(kw)
    return RLAIFConfig(**values)


def _wait_for(path: Path, seconds: float) -> None:
    end = time.time() + seconds
    while not path.exists() and time.time() < end:
        time.sleep(0.2)


def failures(out: Path) -> None:
    rank = torch.distributed.get_rank()

    def run_case(name, fn):
        try:
            fn()
            message = "no error"
        except Exception as err:  # noqa: BLE001 - the message is the result
            message = f"{type(err).__name__}: {err}"
        (out / f"{name}_rank{rank}.txt").write_text(message)
        # the peer may be stuck in a collective until its timeout: wait for its answer, then go on in step
        _wait_for(out / f"{name}_rank{1 - rank}.txt", 30)
        time.sleep(0.5)

    def empty_prompt():
        # prompts of the step: ["ab", ""] -> rank 0 samples "ab" twice, rank 1 the empty prompt
        trainer = RLAIFTrainer(tiny_gpt2(), NoBosTokenizer(), count_a, _config(out / "empty"))
        trainer.step(["ab", ""])

    def reward_raises():
        def reward(prompts, completions):
            if rank == 1:
                raise ConnectionError("labeler unreachable")
            return count_a(prompts, completions)

        RLAIFTrainer(tiny_gpt2(), CharTokenizer(), reward, _config(out / "raise")).step(["ab", "cd"])

    def reward_count():
        def reward(prompts, completions):
            scores = count_a(prompts, completions)
            return scores[:-1] if rank == 1 else scores

        RLAIFTrainer(tiny_gpt2(), CharTokenizer(), reward, _config(out / "count")).step(["ab", "cd"])

    def empty_response():
        from rlaif_fast.trainer.sampling import Rollouts

        trainer = RLAIFTrainer(tiny_gpt2(), CharTokenizer(), count_a, _config(out / "resp"))
        responses = [[4, 2], [] if rank == 1 else [5, 2]]
        trainer.learn(Rollouts(["ab", "ab"], ["a", "b"], [[1, 4, 5]] * 2, responses))

    for name, fn in (
        ("empty_prompt", empty_prompt),
        ("reward_raises", reward_raises),
        ("reward_count", reward_count),
        ("empty_response", empty_response),
    ):
        run_case(name, fn)


def zero3_resume(out: Path) -> None:
    rank = torch.distributed.get_rank()

    def trainer(folder, **kw):
        cfg = RLAIFConfig(
            algorithm="ppo", batch_size=4, micro_batch_size=1, max_new_tokens=4, zero_stage=3,
            learning_rate=1e-2, kl_coef=0.1, progress=False, tensorboard=False, output_dir=str(folder), **kw,
        )  # fmt: skip
        policy = tiny_gpt2()
        return RLAIFTrainer(policy, CharTokenizer(), count_a, cfg, value_model=ValueModel.from_policy(policy))

    def params(t):
        with t.strategy.gathered(t.engine.module):
            return {k: v.detach().clone() for k, v in t.engine.module.state_dict().items()}

    straight = trainer(out / "a", total_steps=4)
    full = straight.train(PROMPTS)["history"]
    want = params(straight)

    def stop_after_two(step, metrics):
        if step == 2:
            raise KeyboardInterrupt

    first = trainer(out / "b", total_steps=4).train(PROMPTS, callback=stop_after_two)
    resumed_trainer = trainer(out / "b", total_steps=4, resume=True)
    start = resumed_trainer.global_step
    resumed = resumed_trainer.train(PROMPTS)["history"]
    got = params(resumed_trainer)
    if rank == 0:
        torch.save(
            {
                "full": full,
                "first_stopped": first["stopped"],
                "resumed_from": start,
                "resumed": resumed,
                "want": want,
                "got": got,
                "init": tiny_gpt2().state_dict(),
            },
            out / "zero3_resume.pt",
        )


def json_zero3(out: Path) -> None:
    """ZeRO-3 chosen by the DeepSpeed JSON (zero_stage left at 0): the KL reference is sharded as well."""
    import json

    path = out / "ds.json"
    if torch.distributed.get_rank() == 0:
        path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    torch.distributed.barrier()
    cfg = _config(out / "json", kl_coef=0.1, deepspeed_config=str(path))
    trainer = RLAIFTrainer(tiny_gpt2(), CharTokenizer(), count_a, cfg)
    params = list(trainer.ref.parameters())
    result = {
        "stage": trainer.strategy.zero_stage,
        "partitioned": all(hasattr(p, "ds_numel") and p.numel() < p.ds_numel for p in params),
    }
    result["kl"] = trainer.step(["ab", "cd"])["kl"]  # and it scores: the sharded reference is gathered
    if torch.distributed.get_rank() == 0:
        torch.save(result, out / "json_zero3.pt")


if __name__ == "__main__":
    scenario, out_dir = sys.argv[1], Path(sys.argv[2])
    # a rank left waiting in a collective stops after this instead of the default 30 minutes
    torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=15))
    {"failures": failures, "zero3_resume": zero3_resume, "json_zero3": json_zero3}[scenario](out_dir)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
