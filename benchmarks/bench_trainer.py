"""The learn half of one RL step: RLAIFTrainer with rlaif_fast ops + batching ("fast", ``ops="fast"``) vs
the same trainer on the naive path ("naive", ``ops="naive"``: full logits, the plain-torch KL / advantage
loops, every micro-batch padded to the batch's longest rollout).

Timed: ``RLAIFTrainer.learn(rollouts)`` on fixed, pre-made rollouts = old and KL-reference log-probs
(forwards), KL-shaped rewards and RLOO advantages, the micro-batch layout, then forward + backward +
one AdamW step per mini-batch. NOT timed: sampling (``generate``) and scoring the responses; sampling is
the same HF ``generate`` in both modes and often dominates a real step, so these figures are not the
speed of a whole RL step.

Workload (issue 6): a config-built Llama of ~11M parameters (vocab 32,000, hidden 256, 4 layers, tied
embeddings), 64 rollouts of ~256 tokens (32-token prompts, responses uniform in [32, 448]), RLOO with
group size 4, KL to the frozen SFT copy, micro-batches of 8, 1 rank (ZeRO-0) on CPU, after one warm-up
step on short rollouts. Reported per run: wall seconds, process CPU seconds (all threads;
``time.process_time``, steadier than wall time on a shared machine), tokens per wall second (prompt +
response tokens of the batch), and the peak resident memory the step adds (VmHWM after resetting it
through /proc/self/clear_refs). Each run is its own process, and the modes alternate (naive, fast,
naive, fast, ...) so that a change in the machine's load hits both.

    python benchmarks/bench_trainer.py --repeats 2        # both modes interleaved, markdown table
    python benchmarks/bench_trainer.py --mode fast --json # one mode, one JSON line (used by the table)
    python benchmarks/bench_trainer.py --max-tokens 3840  # adds fast with token-budget micro-batches
    python -m pytest benchmarks/bench_trainer.py --benchmark-enable --benchmark-only   # small size
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import pytest
import torch
from _procs import interleaved, rss_kib


def build(vocab=32000, hidden=256, layers=4, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=688,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg)


class _Tok:
    """The trainer only needs ids and lengths here: rollouts are given, nothing is decoded."""

    pad_token_id, eos_token_id = 0, 2

    def __init__(self, vocab):
        self.vocab = vocab

    def __len__(self):
        return self.vocab


def make_rollouts(n=64, prompt_len=32, lo=32, hi=448, vocab=32000, seed=0):
    from rlaif_fast.trainer import Rollouts

    g = torch.Generator().manual_seed(seed)
    prompt_ids = [torch.randint(3, vocab, (prompt_len,), generator=g).tolist() for _ in range(n // 4)]
    prompt_ids = [p for p in prompt_ids for _ in range(4)]  # groups of 4 samples per prompt
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    response_ids = [torch.randint(3, vocab, (k,), generator=g).tolist() for k in lengths]
    scores = torch.randn(n, generator=g)
    return Rollouts([""] * n, [""] * n, prompt_ids, response_ids, scores=scores)


def run_mode(
    mode: str,
    n=64,
    vocab=32000,
    hidden=256,
    layers=4,
    hi=448,
    micro=8,
    max_tokens=None,
    out_dir="/tmp/bench_trainer",
):
    from rlaif_fast.trainer import RLAIFConfig, RLAIFTrainer

    policy = build(vocab, hidden, layers)
    cfg = RLAIFConfig(
        algorithm="rloo",
        group_size=4,
        batch_size=n,
        micro_batch_size=micro,
        max_tokens_per_microbatch=max_tokens,
        ops=mode,
        learning_rate=1e-5,
        progress=False,
        tensorboard=False,
        output_dir=out_dir,
    )
    trainer = RLAIFTrainer(policy, _Tok(vocab), lambda p, c: [0.0] * len(c), cfg)
    # warm-up on short rollouts: optimizer states and DeepSpeed buffers exist before the measured step
    trainer.learn(make_rollouts(n, vocab=vocab, lo=4, hi=8, seed=1))
    rollouts = make_rollouts(n, vocab=vocab, hi=hi)
    tokens = sum(rollouts.lengths())
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS to the current RSS
    base = rss_kib("VmRSS")
    load0 = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    metrics = trainer.learn(rollouts)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    peak = rss_kib("VmHWM") - base
    params = sum(p.numel() for p in policy.parameters())
    return {
        "mode": mode if max_tokens is None else f"{mode}, max_tokens_per_microbatch={max_tokens}",
        "params": params,
        "tokens": tokens,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "load_avg_1min": (load0, os.getloadavg()[0]),
        "tokens_per_s": tokens / seconds,
        "peak_extra_mib": peak / 1024,
        "kl": metrics["kl"],
    }


NAMES = {"naive": "naive (ops='naive')", "fast": "fast (ops='fast')"}


def table(args) -> str:
    runs = [("naive", []), ("fast", [])]
    if args.max_tokens is not None:
        runs.append(("budget", ["--max-tokens", str(args.max_tokens)]))
    base = [sys.executable, __file__, "--json", "--n", str(args.n), "--hi", str(args.hi)]
    # interleaved: naive, fast, naive, fast, ...
    rows = interleaved(
        {name: [*base, "--mode", "fast" if name == "budget" else name, *extra] for name, extra in runs},
        args.repeats,
    )
    first = rows["fast"][0]
    lines = [
        f"policy {first['params'] / 1e6:.1f}M params, {args.n} rollouts, {first['tokens']} tokens, "
        f"torch threads {torch.get_num_threads()}; timed: RLAIFTrainer.learn on fixed rollouts "
        "(sampling excluded); runs interleaved, each its own process",
        "",
        "| mode | run | learn wall s | learn CPU s | tokens/wall s | peak extra MiB | load avg (start, end) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, rs in rows.items():
        for k, r in enumerate(rs):
            label = NAMES.get(name, r["mode"])
            la = ", ".join(f"{x:.1f}" for x in r["load_avg_1min"])
            lines.append(
                f"| {label} | {k + 1} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | "
                f"{r['tokens_per_s']:.0f} | {r['peak_extra_mib']:.0f} | {la} |"
            )

    def med(name, key):
        return statistics.median(r[key] for r in rows[name])

    lines.append(
        f"| median ratio fast/naive | | {med('fast', 'seconds') / med('naive', 'seconds'):.2f}x | "
        f"{med('fast', 'cpu_seconds') / med('naive', 'cpu_seconds'):.2f}x | "
        f"{med('fast', 'tokens_per_s') / med('naive', 'tokens_per_s'):.2f}x | "
        f"{med('fast', 'peak_extra_mib') / max(med('naive', 'peak_extra_mib'), 1e-9):.2f}x | |"
    )
    return "\n".join(lines)


@pytest.mark.parametrize("mode", ["naive", "fast"])
def test_bench_trainer_step(benchmark, mode, tmp_path):
    """Small size for `make bench` (the full workload is the script's): one learn() per round."""
    from rlaif_fast.trainer import RLAIFConfig, RLAIFTrainer

    cfg = RLAIFConfig(
        algorithm="rloo",
        group_size=4,
        batch_size=16,
        micro_batch_size=4,
        ops=mode,
        progress=False,
        tensorboard=False,
        output_dir=str(tmp_path),
    )
    trainer = RLAIFTrainer(build(4096, 64, 2), _Tok(4096), lambda p, c: [0.0] * len(c), cfg)
    benchmark.pedantic(lambda: trainer.learn(make_rollouts(16, vocab=4096, hi=128)), rounds=2, iterations=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("fast", "naive"))
    p.add_argument("--json", action="store_true")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--hi", type=int, default=448)
    p.add_argument("--repeats", type=int, default=2, help="runs per mode, interleaved (table only)")
    p.add_argument(
        "--max-tokens",
        type=int,
        help="also run fast with max_tokens_per_microbatch=N (token-budget micro-batches, 1 rank)",
    )
    args = p.parse_args(argv)
    if args.mode:
        print(json.dumps(run_mode(args.mode, n=args.n, hi=args.hi, max_tokens=args.max_tokens)))
    else:
        print(table(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
