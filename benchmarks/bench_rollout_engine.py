"""The whole RL step, sampling + learning: RLAIFTrainer.step with rollout_engine="hf" (transformers'
generate on the trained model) vs rollout_engine="vllm" (an in-process vLLM engine, weights synced in).

Timed: ``RLAIFTrainer.step(prompts)`` = weight sync (vllm only) + sampling ``group_size`` completions of
each prompt with ``max_new_tokens`` new tokens + the rule reward + old-log-prob scoring + one AdamW
update. NOT timed: importing vLLM (15-40 s here), starting the engine, one warm-up step (the optimizer
states, DeepSpeed buffers and the engine's first sync exist before the measured steps).

Workload: a config-built Llama of ~77M parameters (the GPT-2 BPE vocabulary of 50,257 tokens, hidden
512, 8 layers of 8 heads (head size 64), untied embeddings), GRPO with group size 4, 16 rollouts per
step (4 prompts of ~24 tokens), 128 new tokens (random weights rarely sample EOS, so nearly every
completion is 128 tokens in both engines: the same work), temperature 0.9, no KL reference, fp32,
1 rank on CPU; vLLM with enforce_eager=True (its torch.compile warm-up costs ~100 s per process here).
Reported per run: wall and process CPU seconds per step (mean over the measured steps; CPU time counts
all threads of the process, steadier than wall time on a shared machine), tokens (prompt + response)
per wall second, peak resident memory of the process (VmHWM, both engines included), the per-phase
split from the trainer's metrics, and the 1-minute load average. Each run is its own process and the
engines alternate (hf, vllm, hf, vllm) so that a change in the machine's load hits both.

    nice python benchmarks/bench_rollout_engine.py --repeats 2            # the table
    python benchmarks/bench_rollout_engine.py --engine vllm --json        # one run, one JSON line
    python -m pytest benchmarks/bench_rollout_engine.py --benchmark-enable --benchmark-only   # small size
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch
from _procs import interleaved, rss_kib

TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt2_bpe_tokenizer_whisper"
PROMPTS = [
    "Once upon a time there was a little girl who lived in a village near the forest. One day she",
    "The weather report for tomorrow says that the rain will stop in the morning, and then",
    "To make a good cup of tea, first boil the water, then warm the pot, and after that",
    "The committee met on Tuesday to discuss the new budget. The chair opened by saying that",
    "In the year 2050, most people travel to work by train, because the roads are",
    "Here is a short story about a dog who learned to read. It begins when",
    "The recipe calls for two eggs, a cup of flour and some sugar. Mix them and",
    "Scientists found a new species of frog in the rainforest. It is bright blue and",
]


def build(vocab: int, hidden: int = 512, layers: int = 8, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.6875),
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=50256,
        eos_token_id=50256,
    )
    return LlamaForCausalLM(cfg)


class _ByteTokenizer:
    """Where ../shared/data is absent (a bare GPU box): bytes as ids 0-255 in a vocabulary of GPT-2's size,
    so the model and the work are the same; the completions are not readable text (nothing reads them)."""

    eos_token_id = pad_token_id = 50256

    def __len__(self) -> int:
        return 50257

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i < 256).decode(errors="replace")


def tokenizer():
    if not TOKENIZER.is_dir():
        return _ByteTokenizer()
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast.from_pretrained(str(TOKENIZER))


def run_engine(
    engine: str, steps: int = 2, new_tokens: int = 128, hidden: int = 512, layers: int = 8
) -> dict:
    from rlaif_fast.trainer import RLAIFConfig, RLAIFTrainer

    tok = tokenizer()
    policy = build(len(tok), hidden, layers)
    cfg = RLAIFConfig(
        algorithm="grpo",
        group_size=4,
        batch_size=16,
        micro_batch_size=8,
        max_new_tokens=new_tokens,
        max_prompt_len=64,
        temperature=0.9,
        kl_coef=0.0,
        learning_rate=1e-5,
        rollout_engine=engine,
        vllm_enforce_eager=True,
        progress=False,
        tensorboard=False,
        output_dir=f"/tmp/bench_rollout_engine_{engine}",
    )
    t_start = time.perf_counter()
    trainer = RLAIFTrainer(policy, tok, lambda p, c: [float(len(x)) / 400 for x in c], cfg)
    startup = time.perf_counter() - t_start
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(4 * (steps + 1))]
    trainer.step(prompts[:4])  # warm-up (and the engine's first sync)
    load0 = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    history = [trainer.step(prompts[4 * (k + 1) : 4 * (k + 2)]) for k in range(steps)]
    seconds, cpu = (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps
    tokens = statistics.mean(h["tokens"] for h in history)
    phases = {
        k: statistics.mean(h[k] for h in history)
        for k in ("time_weight_sync", "time_generate", "time_reward", "time_score", "time_update")
    }
    return {
        "engine": engine,
        "params": sum(p.numel() for p in policy.parameters()),
        "steps": steps,
        "step_seconds": seconds,
        "step_cpu_seconds": cpu,
        "tokens": tokens,
        "response_len": statistics.mean(h["response_len"] for h in history),
        "tokens_per_s": tokens / seconds,
        "peak_rss_mib": rss_kib("VmHWM") / 1024,
        "startup_seconds": startup,
        "load_avg_1min": (load0, os.getloadavg()[0]),
        "torch_threads": torch.get_num_threads(),
        **phases,
    }


def table(args) -> str:
    base = [
        sys.executable,
        __file__,
        "--json",
        "--steps",
        str(args.steps),
        "--new-tokens",
        str(args.new_tokens),
    ]
    # interleaved: hf, vllm, hf, vllm, ...
    rows = interleaved({engine: [*base, "--engine", engine] for engine in ("hf", "vllm")}, args.repeats)
    first = rows["hf"][0]
    lines = [
        f"policy {first['params'] / 1e6:.1f}M params, GRPO, 16 rollouts x {args.new_tokens} new tokens per step "
        f"(mean response {first['response_len']:.0f} tokens), {args.steps} measured steps per run after one "
        f"warm-up, torch threads {first['torch_threads']}; timed: RLAIFTrainer.step (sync + sampling + reward "
        "+ scoring + update); runs interleaved, each its own process",
        "",
        "| engine | run | step wall s | step CPU s | tokens/wall s | peak RSS MiB | sync s | generate s | "
        "score s | update s | load avg (start, end) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, rs in rows.items():
        for k, r in enumerate(rs):
            la = ", ".join(f"{x:.1f}" for x in r["load_avg_1min"])
            lines.append(
                f"| {name} | {k + 1} | {r['step_seconds']:.1f} | {r['step_cpu_seconds']:.1f} | "
                f"{r['tokens_per_s']:.0f} | {r['peak_rss_mib']:.0f} | {r['time_weight_sync']:.2f} | "
                f"{r['time_generate']:.1f} | {r['time_score']:.1f} | {r['time_update']:.1f} | {la} |"
            )

    def med(name, key):
        return statistics.median(r[key] for r in rows[name])

    lines.append(
        f"| median speed-up vllm vs hf | | {med('hf', 'step_seconds') / med('vllm', 'step_seconds'):.2f}x | "
        f"{med('hf', 'step_cpu_seconds') / med('vllm', 'step_cpu_seconds'):.2f}x | "
        f"{med('vllm', 'tokens_per_s') / med('hf', 'tokens_per_s'):.2f}x | "
        f"{med('vllm', 'peak_rss_mib') / med('hf', 'peak_rss_mib'):.2f}x (ratio) | | "
        f"{med('hf', 'time_generate') / med('vllm', 'time_generate'):.2f}x | | | |"
    )
    return "\n".join(lines)


@pytest.mark.parametrize("engine", ["hf"])
def test_bench_rollout_step(benchmark, engine, tmp_path):
    """Small size for `make bench` (hf only: vLLM's import alone costs 15-40 s; the script runs both)."""
    from rlaif_fast.trainer import RLAIFConfig, RLAIFTrainer

    tok = tokenizer()
    cfg = RLAIFConfig(
        algorithm="grpo",
        group_size=4,
        batch_size=8,
        max_new_tokens=16,
        kl_coef=0.0,
        rollout_engine=engine,
        progress=False,
        tensorboard=False,
        output_dir=str(tmp_path),
    )
    trainer = RLAIFTrainer(build(len(tok), 64, 2), tok, lambda p, c: [0.0] * len(c), cfg)
    benchmark.pedantic(lambda: trainer.step(PROMPTS[:2]), rounds=2, iterations=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", choices=("hf", "vllm"))
    p.add_argument("--json", action="store_true")
    p.add_argument("--steps", type=int, default=2, help="measured steps per run (after one warm-up)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2, help="runs per engine, interleaved (table only)")
    args = p.parse_args(argv)
    if args.engine:
        print(json.dumps(run_engine(args.engine, steps=args.steps, new_tokens=args.new_tokens)))
    else:
        print(table(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
