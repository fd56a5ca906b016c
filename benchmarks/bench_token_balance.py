"""Token-budget micro-batches across data-parallel ranks: plan per rank vs plan globally (the trainer's
``token_balance``), on sampled RLHF lengths. What the CPU can tell without a cluster: the padded tokens
each rank computes per optimizer step, hence how long the others wait for the busiest.

Two cost models, because ZeRO stages synchronize differently:
- ZeRO-1/2 (gradients reduced once per mini-batch): a step takes as long as the busiest rank's total,
  so the cost is max over ranks of the rank's padded tokens;
- ZeRO-3 (every forward all-gathers weights, micro-batch by micro-batch in lockstep): the cost is the
  sum over micro-batch slots of the busiest rank's padded tokens in that slot.
Both are reported against the ideal (all padded-free tokens split evenly), so 1.00 is perfect.

    python benchmarks/bench_token_balance.py                       # the table in benchmarks/results/trainer.md
    python benchmarks/bench_token_balance.py --ranks 8 --rows 64 --max-tokens 16384 --trials 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_batching import make_workload  # noqa: E402

from rlaif_fast.batching import balanced_microbatches  # noqa: E402


def _slots(plan_steps: list[list[list[int]]], lengths: np.ndarray) -> list[list[int]]:
    """padded tokens [rank][slot] (count x longest per micro-batch; empty micro-batches cost 0)."""
    return [[len(mb) * int(lengths[mb].max()) if mb else 0 for mb in steps] for steps in plan_steps]


def costs(loads: list[list[int]], ideal: float) -> tuple[float, float, float]:
    """(ZeRO-1/2 cost, ZeRO-3 lockstep cost, padding fraction), the costs relative to ``ideal``."""
    slots = max(len(x) for x in loads)
    padded = [x + [0] * (slots - len(x)) for x in loads]
    zero2 = max(sum(x) for x in padded)
    zero3 = sum(max(x[s] for x in padded) for s in range(slots))
    total = sum(sum(x) for x in padded)
    return zero2 / ideal, zero3 / ideal, 1.0 - ideal * len(loads) / total


def one_trial(ranks: int, rows: int, max_tokens: int, seed: int) -> dict[str, tuple[float, float, float]]:
    prompts, responses = make_workload(ranks * rows, seed=seed)
    lengths = np.array([len(p) + len(r) for p, r in zip(prompts, responses)], dtype=np.int64)
    ideal = lengths.sum() / ranks
    per_rank = []
    for r in range(ranks):  # rank r sampled rows [r*rows, (r+1)*rows) and keeps them
        mine = lengths[r * rows : (r + 1) * rows]
        plan = balanced_microbatches(mine, max_tokens=max_tokens, num_ranks=1)
        per_rank.append(_slots(plan.microbatches[:1], mine)[0])
    plan = balanced_microbatches(lengths, max_tokens=max_tokens, num_ranks=ranks)
    return {
        "per_rank (rows stay where sampled)": costs(per_rank, ideal),
        "global (rows exchanged, token_balance='global')": costs(_slots(plan.microbatches, lengths), ideal),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--rows", type=int, default=64, help="rollouts per rank per mini-batch")
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--trials", type=int, default=20, help="independent sampled mini-batches")
    a = p.parse_args(argv)
    results: dict[str, list[tuple[float, float, float]]] = {}
    for seed in range(a.trials):
        for name, c in one_trial(a.ranks, a.rows, a.max_tokens, seed).items():
            results.setdefault(name, []).append(c)
    print(
        f"{a.ranks} ranks x {a.rows} rollouts per mini-batch, budget {a.max_tokens} padded tokens, "
        f"{a.trials} sampled mini-batches (prompts 16-512, responses 1-2048, long-tailed); "
        "costs relative to a perfect split of the unpadded tokens (1.00 = ideal), median [worst]"
    )
    print("| plan | ZeRO-1/2: busiest rank | ZeRO-3: lockstep micro-batches | padding |")
    print("| --- | ---: | ---: | ---: |")
    for name, rows in results.items():
        cols = []
        for i in range(3):
            vals = [r[i] for r in rows]
            fmt = "{:.1%}" if i == 2 else "{:.3f}"
            cols.append(f"{fmt.format(statistics.median(vals))} [{fmt.format(max(vals))}]")
        print(f"| {name} | {' | '.join(cols)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
