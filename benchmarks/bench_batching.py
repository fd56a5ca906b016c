"""Rollout batching: the C++ extension vs the pure-Python fallback vs torch's pad_sequence.

Workload (issue 4): 4096 rollouts, prompt lengths 16-512 and response lengths 1-2048, both log-normal
(long-tailed) and clipped; token ids arrive as Python lists, as they do from ``generate(...).tolist()``
or a tokenizer. Micro-batch plans: max_tokens = 16384, 8 ranks, against fixed-size micro-batches (as many
sequences as the longest allows) dealt round-robin to the ranks, twice: in input order, and length-sorted
(the simple fix anyone tries first: sort, then cut into equal-count micro-batches).

    python -m pytest benchmarks/bench_batching.py --benchmark-enable --benchmark-only   # pytest-benchmark
    python benchmarks/bench_batching.py [--n 4096] [--repeats 5]                        # the table
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pad_sequence

from rlaif_fast import batching

PAD_ID = 0
MAX_TOKENS = 16384
NUM_RANKS = 8


def make_workload(n: int = 4096, seed: int = 0, vocab: int = 32000):
    """(prompts, responses) as lists of lists of ints, with long-tailed lengths."""
    rng = np.random.default_rng(seed)
    p_len = np.clip(rng.lognormal(np.log(64), 0.9, n), 16, 512).astype(np.int64)
    r_len = np.clip(rng.lognormal(np.log(150), 1.1, n), 1, 2048).astype(np.int64)
    ids = rng.integers(0, vocab, int(p_len.sum() + r_len.sum())).tolist()
    prompts, responses, o = [], [], 0
    for p, r in zip(p_len.tolist(), r_len.tolist()):
        prompts.append(ids[o : o + p])
        responses.append(ids[o + p : o + p + r])
        o += p + r
    return prompts, responses


def pad_with_pad_sequence(prompts, responses, pad_id: int = PAD_ID, side: str = "left"):
    """What RL code writes today: one tensor per rollout, then torch's pad_sequence for each field."""
    seqs = [torch.tensor(p + r, dtype=torch.int64) for p, r in zip(prompts, responses)]
    ones = [torch.ones(len(s), dtype=torch.int64) for s in seqs]
    pos = [torch.arange(len(s)) for s in seqs]
    resp = [torch.cat([torch.zeros(len(p), dtype=torch.bool), torch.ones(len(r), dtype=torch.bool)])
            for p, r in zip(prompts, responses)]  # fmt: skip
    return (
        pad_sequence(seqs, batch_first=True, padding_value=pad_id, padding_side=side),
        pad_sequence(ones, batch_first=True, padding_value=0, padding_side=side),
        pad_sequence(pos, batch_first=True, padding_value=0, padding_side=side),
        pad_sequence(resp, batch_first=True, padding_value=False, padding_side=side),
    )


def fixed_size_plan(
    lengths: list[int], max_tokens: int = MAX_TOKENS, num_ranks: int = NUM_RANKS, *, sort: bool = False
):
    """Baseline: micro-batches of b = max_tokens // longest sequences, in input order (or longest first
    when ``sort``), round-robin to ranks. Returns (padding fraction, max/mean rank load, steps of the
    busiest rank)."""
    b = max(1, max_tokens // max(lengths))
    if sort:
        lengths = sorted(lengths, reverse=True)
    batches = [lengths[i : i + b] for i in range(0, len(lengths), b)]
    padded = sum(len(mb) * max(mb) for mb in batches)
    loads = [sum(sum(mb) for mb in batches[r::num_ranks]) for r in range(num_ranks)]
    return (
        (padded - sum(lengths)) / padded,
        max(loads) / (sum(loads) / num_ranks),
        -(-len(batches) // num_ranks),
    )


def use(backend: str):
    """Point rlaif_fast.batching at one backend; returns the previous extension handle."""
    previous = batching._C
    if backend == "cpp":
        from rlaif_fast import _C

        batching._C = _C
    else:
        batching._C = None
    return previous


# ----------------------------------------------------------------------------------- pytest-benchmark


@pytest.fixture(scope="module")
def workload():
    return make_workload()


@pytest.fixture(params=["cpp", "python"])
def backend(request):
    previous = use(request.param)
    yield request.param
    batching._C = previous


def test_pad_rollouts(benchmark, workload, backend):
    prompts, responses = workload
    rounds = 5 if backend == "cpp" else 1
    benchmark.pedantic(batching.pad_rollouts, args=(prompts, responses, PAD_ID), rounds=rounds)


def test_pad_sequence_baseline(benchmark, workload):
    benchmark.pedantic(pad_with_pad_sequence, args=workload, rounds=3)


def test_pack_rollouts(benchmark, workload, backend):
    rounds = 5 if backend == "cpp" else 1
    benchmark.pedantic(batching.pack_rollouts, args=workload, rounds=rounds)


def test_balanced_microbatches(benchmark, workload, backend):
    lengths = [len(p) + len(r) for p, r in zip(*workload)]
    plan = benchmark(batching.balanced_microbatches, lengths, max_tokens=MAX_TOKENS, num_ranks=NUM_RANKS)
    assert plan.imbalance <= 1.02 and plan.padding_fraction <= 0.05


# ------------------------------------------------------------------------------------------ the table


def timed(fn, *args, repeats: int, **kwargs) -> tuple[float, float]:
    """Median (wall, CPU) time in ms over ``repeats`` calls, after one warm-up call. CPU time is
    reported too because the 2-core machine these figures come from is shared: wall time includes
    waiting for a core."""
    fn(*args, **kwargs)
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn(*args, **kwargs)
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    return statistics.median(wall), statistics.median(cpu)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    prompts, responses = make_workload(args.n)
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    print(
        f"{args.n} rollouts, {sum(lengths)} tokens, longest {max(lengths)}; median of {args.repeats} runs\n"
    )

    rows = []
    for name, fn, kwargs in [
        ("pad_rollouts (left)", batching.pad_rollouts, {"pad_id": PAD_ID}),
        ("pack_rollouts", batching.pack_rollouts, {}),
    ]:
        use("cpp")
        cpp = timed(fn, prompts, responses, repeats=args.repeats, **kwargs)
        use("python")
        py = timed(fn, prompts, responses, repeats=max(1, args.repeats // 2), **kwargs)
        use("cpp")
        rows.append((name, cpp, py))
    base = timed(pad_with_pad_sequence, prompts, responses, repeats=args.repeats)
    print("wall ms (CPU ms)\n")
    print("| op | C++ | pure Python | pad_sequence | vs Python | vs pad_sequence |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, cpp, py in rows:
        is_pad = name.startswith("pad")
        ref = f"{base[0]:.1f} ({base[1]:.1f})" if is_pad else "-"
        ratio = f"{base[0] / cpp[0]:.1f}x ({base[1] / cpp[1]:.1f}x)" if is_pad else "-"
        print(f"| {name} | {cpp[0]:.1f} ({cpp[1]:.1f}) | {py[0]:.1f} ({py[1]:.1f}) | {ref} | "
              f"{py[0] / cpp[0]:.1f}x ({py[1] / cpp[1]:.1f}x) | {ratio} |")  # fmt: skip

    print(f"\nbalanced_microbatches, max_tokens={MAX_TOKENS}, {NUM_RANKS} ranks\n")
    print("| plan | wall ms (CPU ms) | padding | max/mean rank load | steps | strategy |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for backend in ("cpp", "python"):
        use(backend)
        wall, cpu = timed(batching.balanced_microbatches, lengths, max_tokens=MAX_TOKENS, num_ranks=NUM_RANKS,
                          repeats=args.repeats)  # fmt: skip
        plan = batching.balanced_microbatches(lengths, max_tokens=MAX_TOKENS, num_ranks=NUM_RANKS)
        print(f"| balanced ({backend}) | {wall:.2f} ({cpu:.2f}) | {plan.padding_fraction:.1%} | "
              f"{plan.imbalance:.4f} | {plan.num_steps} | {plan.strategy} |")  # fmt: skip
    use("cpp")
    for label, sort in (("input order", False), ("length-sorted", True)):
        waste, imbalance, steps = fixed_size_plan(lengths, sort=sort)
        print(f"| fixed-size, {label} | - | {waste:.1%} | {imbalance:.4f} | {steps} | - |")

    # smaller batches: fewer micro-batches per rank make the balance coarser
    print(
        "\n| rollouts | padding | max/mean rank load | steps | strategy | fixed-size padding | fixed-size load "
        "| sorted fixed-size padding | sorted fixed-size load |"
    )
    print("| ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for n in (64, 256, 1024, 4096):
        small = [len(p) + len(r) for p, r in zip(*make_workload(n, seed=1))]
        plan = batching.balanced_microbatches(small, max_tokens=MAX_TOKENS, num_ranks=NUM_RANKS)
        waste, imbalance, _ = fixed_size_plan(small)
        s_waste, s_imbalance, _ = fixed_size_plan(small, sort=True)
        print(f"| {n} | {plan.padding_fraction:.1%} | {plan.imbalance:.3f} | {plan.num_steps} | {plan.strategy} | "
              f"{waste:.1%} | {imbalance:.3f} | {s_waste:.1%} | {s_imbalance:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
