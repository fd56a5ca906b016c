"""The learning half of an RL step (scoring + update, sampling excluded) on its alternative paths:

  grpo-fused   ppo / rloo / grpo loss through ``ops.linear_ppo_policy_loss`` (``fused_loss=True``)
  grpo-split   the same math as log-probs first, then ``ops.ppo_loss_from_logprobs`` (``fused_loss=False``)
  ppo-head     PPO with ``ValueHead``: the value head on the policy's trunk (one backbone pass for both)
  ppo-model    PPO with ``ValueModel``: a critic with a trunk of its own (the paper's setup)

Each configuration runs in its own process, interleaved (A B C D A B C D ...). A process builds a Llama
from a config (seeded), fixed rollouts (random token ids, fixed rewards: the same in every process), one
warm-up ``learn`` and STEPS timed ones. Timed: ``RLAIFTrainer.learn`` (reward checks, scoring passes,
advantages, micro-batches, forward/backward, optimizer step); process CPU time (user + sys, all threads)
and wall time; peak RSS (VmHWM) and the RSS after building the trainer.

    .venv/bin/python benchmarks/bench_learn_paths.py --repeats 3 --steps 2
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _procs import interleaved, rss_kib  # noqa: E402
from bench_trainer import _Tok  # noqa: E402  (ids and lengths only: nothing is decoded)

CONFIGS = {
    "grpo-fused": dict(algorithm="grpo", fused_loss=True),
    "grpo-split": dict(algorithm="grpo", fused_loss=False),
    "ppo-head": dict(algorithm="ppo", value="head"),
    "ppo-model": dict(algorithm="ppo", value="model"),
}


def worker(a) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlaif_fast.trainer import RLAIFConfig, RLAIFTrainer, Rollouts, ValueHead, ValueModel

    spec = dict(CONFIGS[a.config])
    value = spec.pop("value", None)
    torch.manual_seed(0)
    policy = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=a.vocab,
            hidden_size=a.hidden,
            intermediate_size=4 * a.hidden,
            num_hidden_layers=a.layers,
            num_attention_heads=8,
            num_key_value_heads=8,
            max_position_embeddings=a.prompt + a.completion + 8,
            tie_word_embeddings=False,
        )  # fmt: skip
    )
    n = a.prompts * a.group
    cfg = RLAIFConfig(
        batch_size=n, group_size=a.group, micro_batch_size=min(a.micro, n), max_new_tokens=a.completion,
        kl_coef=0.05, kl_in="loss", kl_estimator="k3", learning_rate=1e-6, progress=False,
        tensorboard=False, output_dir=f"/tmp/bench_learn_paths_{a.config}", bf16="false", **spec,
    )  # fmt: skip
    vm = {None: None, "head": ValueHead.from_policy, "model": ValueModel.from_policy}[value]
    trainer = RLAIFTrainer(
        policy, _Tok(a.vocab), lambda p, c: [0.0] * len(c), cfg, value_model=vm and vm(policy)
    )
    g = torch.Generator().manual_seed(1)
    prompt_ids = [torch.randint(3, a.vocab, (a.prompt,), generator=g).tolist() for _ in range(n)]
    lengths = torch.randint(a.completion // 2, a.completion + 1, (n,), generator=g).tolist()
    response_ids = [torch.randint(3, a.vocab, (k,), generator=g).tolist() for k in lengths]
    scores = torch.rand(n, generator=g)

    def rollouts():
        return Rollouts(["p"] * n, ["c"] * n, prompt_ids, response_ids, scores=scores.clone())

    base_rss = rss_kib("VmRSS")
    trainer.learn(rollouts())  # warm-up
    r0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(a.steps):
        trainer.learn(rollouts())
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    tokens = a.steps * sum(len(p) + len(r) for p, r in zip(prompt_ids, response_ids))
    print(json.dumps({
        "cpu_s": (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / a.steps,
        "wall_s": (time.perf_counter() - w0) / a.steps, "tokens": tokens / a.steps,
        "peak_gb": rss_kib("VmHWM") / 1e6, "base_gb": base_rss / 1e6,
    }))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=list(CONFIGS))
    p.add_argument("--only", nargs="*", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--micro", type=int, default=16)
    p.add_argument("--prompt", type=int, default=8)
    p.add_argument("--completion", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    a = p.parse_args()
    if a.config:
        return worker(a)
    passed = [x for x in sys.argv[1:]]
    if "--only" in passed:  # the workers take every option but --only
        i = passed.index("--only")
        j = i + 1
        while j < len(passed) and not passed[j].startswith("--"):
            j += 1
        passed = passed[:i] + passed[j:]
    cmds = {c: [sys.executable, __file__, *passed, "--config", c] for c in a.only}
    rows = interleaved(cmds, a.repeats)
    print(json.dumps({k: v for k, v in vars(a).items() if k not in ("config",)}))
    print(
        f"{'config':11s} {'CPU s/learn':>12s} {'wall s':>8s} {'tokens/CPU-s':>13s} {'peak GB':>8s} {'above base':>10s}"
    )
    for name, rs in rows.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        print(
            f"{name:11s} {med['cpu_s']:12.2f} {med['wall_s']:8.2f} {med['tokens'] / med['cpu_s']:13.0f} "
            f"{med['peak_gb']:8.2f} {med['peak_gb'] - med['base_gb']:10.2f}   cpu runs "
            f"{[round(r['cpu_s'], 2) for r in rs]}"
        )


if __name__ == "__main__":
    main()
