"""The whole RL step (sampling + scoring + update) of RLAIFTrainer against TRL's GRPOTrainer.

Same tiny Llama (built from a config, seeded), same prompts, same sizes (P prompts x G samples x N
completion tokens), same rule reward (fraction of 'a'), KL to the frozen initial policy with beta=0.05
(k3 in the loss on both sides), HF ``generate`` sampling on both sides, one optimizer step per batch.
Each run is its own process (``--side``), sides interleaved (A B A B); a run does one warm-up step and
STEPS timed steps. Timed: process CPU time (user + sys, all threads) and wall time around the timed
steps, peak RSS of the process (ru_maxrss, whole run), and the time inside ``generate`` (the sampling
share). Tokens = sampled completion tokens + prompt tokens of the timed steps.

    .venv/bin/python benchmarks/bench_vs_trl.py --runs 2 --steps 2 [--completion 128] [--lora]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ALPHABET = "abcdefghij "
VOCAB = 4096


def tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: 3 + i for i, c in enumerate(ALPHABET)}}
    # filler tokens up to VOCAB: the model samples them (decoded as text), so EOS is rare and
    # completions run to about their full length, as the sizes ask
    vocab.update({f"<t{i}>": i for i in range(len(vocab), VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def model(hidden: int, layers: int, max_len: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = f"/tmp/bench_vs_trl_model_{hidden}_{layers}_{max_len}"
    if os.path.isdir(path):  # both sides load the same saved weights (TRL reloads its reference from it)
        return LlamaForCausalLM.from_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=max_len,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(path)
    return LlamaForCausalLM.from_pretrained(path)


def reward(prompts, completions, **_):
    return [c.count("a") / max(len(c), 1) for c in completions]


PROMPTS = ["ab", "cd", "ef", "gh", "ij", "ba", "dc", "fe", "hg", "ji", "ac", "bd", "ce", "df", "eg", "fh"]


class GenTimer:
    """Wraps ``model.generate``: seconds and tokens sampled."""

    def __init__(self, m):
        self.seconds, self.tokens, self._real = 0.0, 0, m.generate
        m.generate = self

    def __call__(self, *args, **kwargs):
        t = time.perf_counter()
        out = self._real(*args, **kwargs)
        self.seconds += time.perf_counter() - t
        return out


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_rlaif(a) -> dict:
    from rlaif_fast.trainer import RLAIFConfig, RLAIFTrainer

    tok, m = tokenizer(), model(a.hidden, a.layers, 8 + a.completion)
    timer = GenTimer(m)
    cfg = RLAIFConfig(
        algorithm="grpo", batch_size=a.prompts * a.group, group_size=a.group,
        micro_batch_size=min(a.micro, a.prompts * a.group),
        max_new_tokens=a.completion, max_prompt_len=8, kl_coef=0.05, kl_in="loss", kl_estimator="k3",
        learning_rate=1e-5, temperature=0.9, packing=a.packing, lora=({"r": 8} if a.lora else None),
        progress=False, tensorboard=False, output_dir="/tmp/bench_vs_trl_rlaif", bf16="false",
    )  # fmt: skip
    tr = RLAIFTrainer(m, tok, reward, cfg)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(a.prompts)]
    timer.seconds = 0.0
    tr.step(prompts)  # warm-up
    timer.seconds, tokens, c0, w0 = 0.0, 0, cpu(), time.perf_counter()
    for _ in range(a.steps):
        metrics = tr.step(prompts)
        tokens += int(metrics["tokens"])
    return {"cpu_s": cpu() - c0, "wall_s": time.perf_counter() - w0, "gen_s": timer.seconds, "tokens": tokens}


def run_trl(a) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tok, m = tokenizer(), model(a.hidden, a.layers, 8 + a.completion)
    timer = GenTimer(m)
    n = a.prompts * (a.steps + 1)
    data = Dataset.from_dict({"prompt": [PROMPTS[i % len(PROMPTS)] for i in range(n)]})
    args = GRPOConfig(
        output_dir="/tmp/bench_vs_trl_trl", per_device_train_batch_size=a.prompts * a.group,
        num_generations=a.group, max_completion_length=a.completion, beta=0.05, temperature=0.9,
        learning_rate=1e-5, max_steps=a.steps + 1, use_cpu=True, bf16=False, report_to=[],
        save_strategy="no", logging_steps=1, num_iterations=1, steps_per_generation=1,
        gradient_accumulation_steps=1, disable_dropout=True,
    )  # fmt: skip
    state = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, st, control, **kw):
            if st.global_step == 1:  # after the warm-up step
                state.update(c0=cpu(), w0=time.perf_counter(), g0=timer.seconds)

    tr = GRPOTrainer(model=m, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok,
                     callbacks=[Clock()])  # fmt: skip
    torch.manual_seed(0)
    tr.train()
    logged = [float(h["num_tokens"]) for h in tr.state.log_history if "num_tokens" in h]
    tokens = int(logged[-1] - logged[0])  # prompt + completion tokens of the timed steps
    return {"cpu_s": cpu() - state["c0"], "wall_s": time.perf_counter() - state["w0"],
            "gen_s": timer.seconds - state["g0"], "tokens": tokens}  # fmt: skip


def worker(a) -> None:
    out = run_rlaif(a) if a.side == "rlaif" else run_trl(a)
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--side", choices=["rlaif", "trl"])
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--micro", type=int, default=16)
    p.add_argument("--completion", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--packing", type=lambda s: s.lower() == "true", default=True)
    p.add_argument("--lora", action="store_true")
    a = p.parse_args()
    if a.side:
        return worker(a)
    results: dict[str, list] = {"rlaif": [], "trl": []}
    base = [sys.executable, __file__] + [x for x in sys.argv[1:]]
    for _ in range(a.runs):
        for side in ("rlaif", "trl"):  # interleaved: A B A B
            proc = subprocess.run(base + ["--side", side], capture_output=True, text=True, env=os.environ)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                sys.exit(f"{side} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            results[side].append(json.loads(line[-1][7:]))
    print(json.dumps(vars(a)))
    for side, rs in results.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        tps = med["tokens"] / med["cpu_s"]
        print(f"{side:5s} cpu_s={med['cpu_s']:.1f} wall_s={med['wall_s']:.1f} gen_s={med['gen_s']:.1f} "
              f"(sampling {med['gen_s'] / med['wall_s']:.0%} of wall) peak_rss={med['peak_rss_gb']:.2f} GB "
              f"tokens/cpu_s={tps:.0f}  runs={[round(r['cpu_s'], 1) for r in rs]}")  # fmt: skip


if __name__ == "__main__":
    main()
