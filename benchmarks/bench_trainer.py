"""One RL step of RLAIFTrainer: rlaif_fast ops + batching vs the same trainer on reference ops + naive padding.

Workload (issue 6): a config-built Llama of ~11M parameters (vocab 32,000, hidden 256, 4 layers, tied
embeddings), 64 rollouts of ~256 tokens (32-token prompts, responses uniform in [32, 448]), RLOO with
group size 4, KL to the frozen SFT copy, micro-batches of 8, one optimizer step, 1 rank (ZeRO-0) on CPU.
Measured, after one warm-up step on short rollouts: the scoring + update part of one step (``RLAIFTrainer.learn`` on fixed rollouts; sampling is
the same HF ``generate`` in both modes and is left out), as tokens per second (prompt + response tokens
of the batch) and the peak resident memory the step adds over the process before it (VmHWM after
resetting it through /proc/self/clear_refs). Each mode runs in its own process, so neither inherits the
other's allocator high-water mark.

    python benchmarks/bench_trainer.py                    # both modes side by side, markdown table
    python benchmarks/bench_trainer.py --mode fast --json # one mode, one JSON line (used by the table)
    python benchmarks/bench_trainer.py --max-tokens 3840  # adds fast with token-budget micro-batches
    python -m pytest benchmarks/bench_trainer.py --benchmark-enable --benchmark-only   # small size
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import pytest
import torch


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


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


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
    base = _rss_kib("VmRSS")
    t0 = time.perf_counter()
    metrics = trainer.learn(rollouts)
    seconds = time.perf_counter() - t0
    peak = _rss_kib("VmHWM") - base
    params = sum(p.numel() for p in policy.parameters())
    return {
        "mode": mode if max_tokens is None else f"{mode}, max_tokens_per_microbatch={max_tokens}",
        "params": params,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "peak_extra_mib": peak / 1024,
        "kl": metrics["kl"],
    }


def table(args) -> str:
    rows = {}
    runs = [("reference", []), ("fast", [])]
    if args.max_tokens is not None:
        runs.append(("budget", ["--max-tokens", str(args.max_tokens)]))
    for name, extra in runs:
        mode = "fast" if name == "budget" else name
        cmd = [sys.executable, __file__, "--mode", mode, "--json", "--n", str(args.n), "--hi", str(args.hi)]
        out = subprocess.run(cmd + extra, capture_output=True, text=True, check=True, env={**os.environ})
        rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
    ref, fast = rows["reference"], rows["fast"]
    lines = [
        f"policy {fast['params'] / 1e6:.1f}M params, {args.n} rollouts, {fast['tokens']} tokens, "
        f"torch threads {torch.get_num_threads()}",
        "",
        "| mode | step s | tokens/s | peak extra MiB |",
        "| --- | --- | --- | --- |",
    ]
    for r in rows.values():
        lines.append(
            f"| {r['mode']} | {r['seconds']:.2f} | {r['tokens_per_s']:.0f} | {r['peak_extra_mib']:.0f} |"
        )
    lines.append(
        f"| ratio fast/reference | | {fast['tokens_per_s'] / ref['tokens_per_s']:.2f}x | "
        f"{fast['peak_extra_mib'] / max(ref['peak_extra_mib'], 1e-9):.2f}x |"
    )
    return "\n".join(lines)


@pytest.mark.parametrize("mode", ["reference", "fast"])
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
    p.add_argument("--mode", choices=("fast", "reference"))
    p.add_argument("--json", action="store_true")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--hi", type=int, default=448)
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
