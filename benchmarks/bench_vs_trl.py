"""The whole RL step (sampling + scoring + reference + update) of RLAIFTrainer against TRL's GRPOTrainer.

Same Llama (built from a config, seeded, saved once; both sides load the same weights), same prompts, same
sizes (P prompts x G samples x N completion tokens, micro-batches of M rows on both sides), same rule reward
(fraction of 'a'), KL to the frozen initial policy with beta=0.05 (k3 in the loss on both sides), one
optimizer step per batch (on-policy), temperature 0.9. Sampling: transformers ``generate`` on both sides
(``--sampler hf``) or an in-process vLLM engine on both sides (``--sampler vllm``: rlaif_fast's
``rollout_engine="vllm"`` against TRL's ``use_vllm=True, vllm_mode="colocate"``).

Each run is its own process (``--side``), sides interleaved (A B A B ...); a run builds its model and trainer,
does one warm-up step, then STEPS timed steps. Per run it reports:

- process CPU time (user + sys of every thread, ``getrusage(RUSAGE_SELF)``) and wall time of the timed
  steps, split into phases by wrapping the sampler: ``sample`` = inside ``generate`` (hf) or the engine's
  sample call (vllm); ``sync`` = pushing weights into the vLLM engine; ``learn`` = everything else of the
  step (reward, reference and policy forwards, backward, optimizer, the trainer's own bookkeeping);
- memory: ``import`` = VmRSS after the side's imports (torch, transformers, rlaif_fast.trainer or trl);
  ``base`` = VmRSS right after model + trainer construction (interpreter, torch, transformers, the
  side's library, the model(s), the trainer; vLLM's engine too in vllm mode); ``peak`` = ru_maxrss of the
  whole process over its whole life; ``step+`` = the peak RSS during the steps (warm-up included) minus
  ``base``, and the same split by phase (the high-water mark is reset at every phase boundary through
  /proc/self/clear_refs; RSS, so memory the allocator kept after a phase counts in the next one);
- tokens = prompt + completion tokens of the timed steps, as each side counts them; the load average
  (``os.getloadavg``) when the run started.

    .venv/bin/python benchmarks/bench_vs_trl.py --runs 3                     # 16 x 4 x 128, hf sampling
    .venv/bin/python benchmarks/bench_vs_trl.py --runs 2 --completion 512 --steps 1
    .venv/bin/python benchmarks/bench_vs_trl.py --runs 2 --sampler vllm --trl-vllm-shim  # TRL's sync fails on CPU without
    .venv/bin/python benchmarks/bench_vs_trl.py --runs 1 --sides rlaif --packing true
    .venv/bin/python benchmarks/bench_vs_trl.py --runs 1 --lora                   # LoRA r=8 on both sides

Figures and what they mean: benchmarks/results/vs_trl.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time

ALPHABET = "abcdefghij "
VOCAB = 4096
PROMPT_LEN = 8  # room for the prompt (2 characters, no special tokens added)


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


def model_path(a) -> str:
    return os.path.join(a.workdir, f"bench_vs_trl_model_{a.hidden}_{a.layers}_{PROMPT_LEN + a.completion}")


def model(a):
    """The run's policy, loaded from a folder written once (both sides, TRL's reference and TRL's vLLM
    engine read the same weights; the tokenizer is saved beside them for vLLM)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = model_path(a)
    if not os.path.isdir(path):
        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=VOCAB, hidden_size=a.hidden, intermediate_size=4 * a.hidden,
            num_hidden_layers=a.layers, num_attention_heads=a.hidden // 32, num_key_value_heads=a.hidden // 32,
            max_position_embeddings=PROMPT_LEN + a.completion,
            bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
        )  # fmt: skip  # head size 32: vLLM's CPU attention needs >= 32
        tmp = f"{path}.tmp{os.getpid()}"
        LlamaForCausalLM(cfg).save_pretrained(tmp)
        tokenizer().save_pretrained(tmp)
        try:
            os.replace(tmp, path)  # atomic: a killed first run leaves no half-written model behind
        except OSError:  # another run wrote it first: keep theirs
            if not os.path.isdir(path):
                raise
            shutil.rmtree(tmp)
    return LlamaForCausalLM.from_pretrained(path)


def reward(prompts, completions, **_):
    return [c.count("a") / max(len(c), 1) for c in completions]


PROMPTS = ["ab", "cd", "ef", "gh", "ij", "ba", "dc", "fe", "hg", "ji", "ac", "bd", "ce", "df", "eg", "fh"]


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def rss_gb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024 / 1e9
    raise RuntimeError(f"{field} not in /proc/self/status")


PEAKS: dict[str, float] = {}  # phase -> highest RSS (GB) seen while it ran, after construction


def peak_cut(phase: str) -> None:
    """Credit the RSS high-water mark since the last cut to ``phase``, then reset it (/proc/self/clear_refs
    5 resets VmHWM and ru_maxrss to the current RSS): exact per-phase peaks, no polling."""
    PEAKS[phase] = max(PEAKS.get(phase, 0.0), rss_gb("VmHWM"))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class Phase:
    """Wraps ``obj.name`` (an instance attribute from then on): process CPU seconds, wall seconds, calls,
    and the RSS peak while it runs (PEAKS[label]; what runs outside every Phase is credited to "learn")."""

    def __init__(self, obj, name: str, label: str):
        self.cpu = self.wall = 0.0
        self.calls, self.label = 0, label
        self._real = getattr(obj, name)
        setattr(obj, name, self)

    def __call__(self, *args, **kwargs):
        peak_cut("learn")
        c, w = cpu(), time.perf_counter()
        try:
            return self._real(*args, **kwargs)
        finally:
            self.cpu += cpu() - c
            self.wall += time.perf_counter() - w
            self.calls += 1
            peak_cut(self.label)

    def mark(self) -> tuple[float, float, int]:
        return self.cpu, self.wall, self.calls


class Clock:
    """The timed window: process CPU, wall and each phase's totals at its start and end."""

    def __init__(self, phases: dict[str, Phase]):
        self.phases, self.start, self.end = phases, None, None

    def snap(self) -> dict:
        return {"cpu": cpu(), "wall": time.perf_counter(), **{k: p.mark() for k, p in self.phases.items()}}

    def result(self) -> dict:
        s, e = self.start, self.end
        out = {"cpu_s": e["cpu"] - s["cpu"], "wall_s": e["wall"] - s["wall"]}
        for k in self.phases:
            out[f"{k}_cpu_s"] = e[k][0] - s[k][0]
            out[f"{k}_wall_s"] = e[k][1] - s[k][1]
            out[f"{k}_calls"] = e[k][2] - s[k][2]
        out["learn_cpu_s"] = out["cpu_s"] - sum(out[f"{k}_cpu_s"] for k in self.phases)
        out["learn_wall_s"] = out["wall_s"] - sum(out[f"{k}_wall_s"] for k in self.phases)
        return out


def constructed(out: dict) -> None:
    """Record the memory after model + trainer construction, then reset the high-water mark so the peak
    read after the steps is the steps' own."""
    out["peak_build_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    out["base_rss_gb"] = rss_gb("VmRSS")
    peak_cut("build")
    PEAKS.clear()


def run_rlaif(a, out: dict) -> dict:
    from transformers import LlamaForCausalLM  # noqa: F401 - the modeling code, loaded as TRL's side loads it

    from rlaif_fast.trainer import RLAIFConfig, RLAIFTrainer

    out["import_rss_gb"] = rss_gb("VmRSS")
    tok, m = tokenizer(), model(a)
    out["params_m"] = sum(p.numel() for p in m.parameters()) / 1e6
    packing = {"auto": None, "true": True, "false": False}[a.packing]
    extra = {"rollout_engine": "vllm"} if a.sampler == "vllm" else {}
    cfg = RLAIFConfig(
        algorithm="grpo", batch_size=a.prompts * a.group, group_size=a.group,
        micro_batch_size=min(a.micro, a.prompts * a.group),
        max_new_tokens=a.completion, max_prompt_len=PROMPT_LEN, kl_coef=0.05, kl_in="loss", kl_estimator="k3",
        learning_rate=1e-5, temperature=0.9, packing=packing, lora=({"r": 8} if a.lora else None),
        progress=False, tensorboard=False, output_dir=os.path.join(a.workdir, "bench_vs_trl_rlaif"), bf16="false",
        **extra, **({} if a.gradient_checkpointing == "default" else {"gradient_checkpointing": a.gradient_checkpointing == "true"}),
    )  # fmt: skip
    if a.sampler == "hf":
        phases = {"sample": Phase(m, "generate", "sample")}
    tr = RLAIFTrainer(m, tok, reward, cfg)
    if a.sampler == "vllm":
        phases = {
            "sample": Phase(tr.rollout_engine, "sample", "sample"),
            "sync": Phase(tr.rollout_engine, "sync", "sync"),
        }
        out["vllm"] = engine_settings(tr.rollout_engine.llm)
    constructed(out)
    clock = Clock(phases)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(a.prompts)]
    tr.step(prompts)  # warm-up
    clock.start, tokens, lengths = clock.snap(), 0, []
    for _ in range(a.steps):
        metrics = tr.step(prompts)
        tokens += int(metrics["tokens"])
        lengths.append(metrics["response_len"])
    clock.end = clock.snap()
    out.update(clock.result(), tokens=tokens, completion_len=statistics.mean(lengths))
    out["packing"] = getattr(tr, "packing", packing)
    out["fused_loss"] = getattr(cfg, "fused_loss", None)
    return out


def run_trl(a, out: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import LlamaForCausalLM, TrainerCallback  # noqa: F401 - the modeling code, as above
    from trl import GRPOConfig, GRPOTrainer

    out["import_rss_gb"] = rss_gb("VmRSS")
    tok, m = tokenizer(), model(a)
    out["params_m"] = sum(p.numel() for p in m.parameters()) / 1e6
    rows = a.prompts * a.group
    micro = min(a.micro, rows)
    if rows % micro:
        sys.exit(f"--micro {a.micro} must divide prompts x group = {rows} for TRL's gradient accumulation")
    n = a.prompts * (a.steps + 1)
    data = Dataset.from_dict({"prompt": [PROMPTS[i % len(PROMPTS)] for i in range(n)]})
    vllm = {}
    if a.sampler == "vllm":
        # the same in-process engine settings as rlaif_fast's (env: KV cache, threads, no engine process);
        # TRL's default importance-sampling correction adds a forward pass rlaif_fast's default (tis_cap=None)
        # does not make: off, so both sides run the same algorithm
        vllm = dict(use_vllm=True, vllm_mode="colocate", vllm_importance_sampling_correction=False)
    args = GRPOConfig(
        output_dir=os.path.join(a.workdir, "bench_vs_trl_trl"), per_device_train_batch_size=micro,
        gradient_accumulation_steps=rows // micro, steps_per_generation=rows // micro,
        num_generations=a.group, max_completion_length=a.completion, beta=0.05, temperature=0.9,
        learning_rate=1e-5, max_steps=a.steps + 1, use_cpu=True, bf16=False, report_to=[],
        save_strategy="no", logging_steps=1, num_iterations=1, disable_dropout=True, **vllm,
        **({} if a.gradient_checkpointing == "default" else {"gradient_checkpointing": a.gradient_checkpointing == "true"}),
    )  # fmt: skip
    clock: Clock | None = None

    class Window(TrainerCallback):
        def on_step_end(self, args, st, control, **kw):
            if st.global_step == 1:  # after the warm-up step
                clock.start = clock.snap()
            elif st.global_step == a.steps + 1:
                clock.end = clock.snap()

    if a.sampler == "hf":
        phases = {"sample": Phase(m, "generate", "sample")}
    peft = None
    if a.lora:  # as rlaif_fast's lora={"r": 8}: alpha 2r, no dropout, peft's default targets for Llama
        from peft import LoraConfig

        peft = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM")
    tr = GRPOTrainer(model=m, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok,
                     callbacks=[Window()], peft_config=peft)  # fmt: skip
    if a.sampler == "vllm":
        if a.trl_vllm_shim:
            shim_trl_sync(tr.vllm_generation)
        g = tr.vllm_generation
        phases = {"sample": Phase(g, "generate", "sample"), "sync": Phase(g, "sync_weights", "sync")}
        out["vllm"] = engine_settings(g.llm)
    constructed(out)
    clock = Clock(phases)
    torch.manual_seed(0)
    tr.train()
    logged = [h for h in tr.state.log_history if "num_tokens" in h]
    out.update(clock.result(), tokens=int(logged[-1]["num_tokens"] - logged[0]["num_tokens"]))
    out["completion_len"] = statistics.mean(h["completions/mean_length"] for h in logged[1:])
    return out


def engine_settings(llm) -> dict:
    """What the two sides' engines were built with, so the note can say they match."""
    e = llm.llm_engine
    m, c, s = e.model_config, e.vllm_config.compilation_config, e.vllm_config.scheduler_config
    return {"dtype": str(m.dtype), "max_model_len": m.max_model_len, "enforce_eager": m.enforce_eager,
            "compile_mode": str(getattr(c, "mode", getattr(c, "level", None))),
            "max_num_seqs": s.max_num_seqs, "max_num_batched_tokens": s.max_num_batched_tokens}  # fmt: skip


def shim_trl_sync(gen) -> None:
    """``--trl-vllm-shim``: TRL's colocate sync calls the model's ``load_weights`` one parameter at a time,
    which vLLM's CPU build cannot do (it prepacks the linear layers at load and the packed parameters have
    no ``weight_loader``; ../shared/VLLM_CPU.md). This replaces only the push: the same parameters, named
    as TRL names them, streamed through the worker's ``reload_weights`` (what rlaif_fast uses on CPU), then
    TRL's prefix-cache reset."""

    def sync_weights():
        worker = gen.llm.llm_engine.model_executor.driver_worker.worker
        worker.reload_weights(weights_iterator=((k, v) for k, v in gen._iter_named_params()))
        gen.llm.reset_prefix_cache()

    gen.sync_weights = sync_weights


def flop_floor(a) -> dict:
    """The learning phase's lower bound: its matmul FLOPs at this machine's GEMM rate (same threads). Per
    step, full fine-tuning needs the reference forward (1), the policy forward (1) and its backward (2: input
    and weight gradients) = 4 forwards; with LoRA the frozen weights need no gradient: 3. A forward over a
    row of ``seq`` tokens: 2 FLOPs per matmul weight per token (q, k, v, o, the MLP, the LM head) plus
    causal attention (QK^T and AV over seq/2 keys on average: 2 * hidden * seq per layer per token)."""
    import torch

    h, seq, rows = a.hidden, a.seq, a.prompts * a.group
    weights = a.layers * (4 * h * h + 3 * h * 4 * h) + h * VOCAB
    fwd = rows * seq * (2 * weights + a.layers * 2 * h * seq)
    x, w = torch.randn(min(a.micro, rows) * int(seq), h), torch.randn(h, 4 * h)
    x @ w
    c, n = cpu(), 0
    while cpu() - c < 2.0:  # the MLP's GEMM at a micro-batch's shape, 2 CPU-seconds of it
        x @ w
        n += 1
    rate = n * 2 * x.shape[0] * h * 4 * h / (cpu() - c)
    return {
        "fwd_gflop": fwd / 1e9,
        "gemm_gflops": rate / 1e9,
        "full_s": 4 * fwd / rate,
        "lora_s": 3 * fwd / rate,
    }


def worker(a) -> None:
    if a.side == "floor":
        print("RESULT " + json.dumps(flop_floor(a)), flush=True)
        return
    out = {"loadavg_start": os.getloadavg()[0], "children_cpu_start": children_cpu()}
    out = run_rlaif(a, out) if a.side == "rlaif" else run_trl(a, out)
    peak_cut("learn")
    peak_steps = max(PEAKS.values())
    out["peak_rss_gb"] = max(out.pop("peak_build_gb"), peak_steps)
    out["step_increment_gb"] = peak_steps - out["base_rss_gb"]
    for phase, gb in PEAKS.items():  # RSS a phase reached above base (the allocator keeps what it freed)
        out[f"{phase}_peak_inc_gb"] = gb - out["base_rss_gb"]
    out["children_cpu_s"] = children_cpu() - out.pop("children_cpu_start")  # whole run (compilers etc.)
    out["sample_calls_ok"] = out["sample_calls"] >= a.steps  # the wrapper saw the sampler
    import torch

    out["torch_threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(out), flush=True)


def label(side: str, a) -> str:
    if side == "trl":
        bits = (["LoRA r=8"] if a.lora else []) + (["vLLM colocate"] if a.sampler == "vllm" else [])
        return "TRL GRPOTrainer" + (f" ({', '.join(bits)})" if bits else "")
    bits = (
        [f"packing={a.packing}"]
        + (["lora r=8"] if a.lora else [])
        + (["vllm"] if a.sampler == "vllm" else [])
    )
    return f"rlaif_fast ({', '.join(bits)})"


def summary(results: dict[str, list[dict]], a, floor: dict) -> None:
    med = {s: {k: statistics.median(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], (int, float))}
           for s, rs in results.items() if rs}  # fmt: skip
    for m in med.values():  # per step from here on
        for k in [k for k in m if k.endswith(("_s", "tokens")) and not k.startswith("children")]:
            m[k] /= a.steps
    print(
        f"\nmedians of {a.runs} run(s), {a.steps} timed step(s) each, per step; CPU = process user+sys seconds"
    )
    head = (
        "| side | CPU s | sample CPU | sync CPU | learn CPU | wall s | tokens/CPU-s | base RSS | step+ "
        "(in sample / learn) | peak RSS |"
    )
    print(head)
    print("| --- " * (head.count("|") - 1) + "|")
    for s, m in med.items():
        print(f"| {label(s, a)} | {m['cpu_s']:.1f} | {m['sample_cpu_s']:.1f} | {m.get('sync_cpu_s', 0):.1f} | "
              f"{m['learn_cpu_s']:.1f} | {m['wall_s']:.1f} | {m['tokens'] / m['cpu_s']:.0f} | "
              f"{m['base_rss_gb']:.2f} GB | {m['step_increment_gb']:.2f} GB ({m.get('sample_peak_inc_gb', 0):.2f} / "
              f"{m.get('learn_peak_inc_gb', 0):.2f}) | {m['peak_rss_gb']:.2f} GB |")  # fmt: skip
    if "rlaif" in med and "trl" in med:
        q = ratios(med["rlaif"], med["trl"])
        print(f"\ntokens per CPU-second, rlaif / TRL: {q['tokens_per_cpu']:.2f}x (goal >= 2)")
        print(f"learn-phase CPU, TRL / rlaif: {q['learn']:.2f}x")
        print(f"with TRL's sampling: TRL total / (TRL sample+sync + rlaif learn) = {q['same_sampling']:.2f}x; "
              f"Amdahl ceiling (learning free) = TRL total / TRL sample+sync = {q['ceiling']:.2f}x")  # fmt: skip
        print(
            f"peak RSS, rlaif / TRL: {q['peak_rss']:.2f} (goal <= 0.33); step increment: {q['step_rss']:.2f}"
        )
    bound = floor["lora_s" if a.lora else "full_s"]
    print(f"learn floor: {floor['fwd_gflop']:.0f} GFLOP per forward x {3 if a.lora else 4} at "
          f"{floor['gemm_gflops']:.0f} GFLOP/s = {bound:.1f} CPU-s per step")  # fmt: skip
    if "trl" in med:
        t = med["trl"]
        best = t["cpu_s"] / (t["sample_cpu_s"] + t.get("sync_cpu_s", 0.0) + bound)  # all per step
        print(f"best whole-step ratio with TRL's sampling and learning at the floor: {best:.2f}x")


def ratios(r: dict, t: dict) -> dict:
    """rlaif_fast (``r``) against TRL (``t``), from one run's or the medians' figures: tokens per CPU-second
    (rlaif / TRL, > 1 = rlaif better), learn-phase CPU (TRL / rlaif), the whole-step ratio if rlaif sampled
    at TRL's cost (TRL total / (TRL sample + sync + rlaif learn)), its ceiling when learning cost nothing
    (TRL total / TRL sample + sync: Amdahl's bound with sampling unchanged), peak and step RSS (rlaif / TRL,
    < 1 = rlaif smaller)."""
    sampling = t["sample_cpu_s"] + t.get("sync_cpu_s", 0.0)
    return {
        "tokens_per_cpu": (r["tokens"] / r["cpu_s"]) / (t["tokens"] / t["cpu_s"]),
        "learn": t["learn_cpu_s"] / r["learn_cpu_s"],
        "same_sampling": t["cpu_s"] / (sampling + r["learn_cpu_s"]),
        "ceiling": t["cpu_s"] / sampling,
        "peak_rss": r["peak_rss_gb"] / t["peak_rss_gb"],
        "step_rss": r["step_increment_gb"] / t["step_increment_gb"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--side", choices=["rlaif", "trl", "floor"], help="(internal) one run in this process")
    p.add_argument("--seq", type=float, default=0.0, help="(internal, --side floor) tokens per row")
    p.add_argument("--sides", default="rlaif,trl", help="which sides, in the interleaving order")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="timed steps per run (after one warm-up step)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--micro", type=int, default=16, help="rows per micro-batch, both sides")
    p.add_argument("--completion", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256, help="with --layers 8: 10.5M parameters")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--sampler", choices=["hf", "vllm"], default="hf")
    p.add_argument("--workdir", default="/tmp", help="where the model and the trainers' outputs go")
    p.add_argument("--packing", choices=["auto", "true", "false"], default="auto",
                   help="rlaif_fast's packing (auto: the trainer's default)")  # fmt: skip
    p.add_argument(
        "--lora", action="store_true", help="LoRA r=8 (alpha 16, peft's default targets), both sides"
    )
    p.add_argument(
        "--threads", type=int, default=1,
        help="OMP/MKL threads of each run (default 1: on a shared machine, idle OpenMP threads spin and "
        "inflate process CPU time several-fold; measured 6-10x at 2 threads under load 6)",
    )  # fmt: skip
    p.add_argument(
        "--gradient-checkpointing", choices=["default", "true", "false"], default="default",
        help="both sides (default: each side's own default: TRL's GRPOConfig turns it on, rlaif_fast's off)",
    )  # fmt: skip
    p.add_argument("--trl-vllm-shim", action="store_true",
                   help="TRL colocate: push weights with reload_weights (see shim_trl_sync)")  # fmt: skip
    a = p.parse_args()
    if a.hidden % 32:
        sys.exit(f"--hidden {a.hidden} must be a multiple of 32 (heads of size 32)")
    if a.sampler == "vllm":  # set before any import of vllm, the same for both sides
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # set before torch loads, inherited by the runs
        os.environ[var] = str(a.threads)
    if a.side:
        return worker(a)
    sides = a.sides.split(",")
    if set(sides) - {"rlaif", "trl"}:
        sys.exit(f"--sides {a.sides!r}: use rlaif, trl or both, comma-separated")
    rev = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "rlaif_fast"], capture_output=True, text=True
    ).stdout
    print(json.dumps({**vars(a), "commit": rev, "rlaif_fast_dirty": bool(dirty.strip())}), flush=True)
    results: dict[str, list] = {s: [] for s in sides}
    base = [sys.executable, __file__] + sys.argv[1:]
    for i in range(a.runs):
        for side in sides:  # interleaved: A B A B
            load = os.getloadavg()[0]
            proc = subprocess.run(base + ["--side", side], capture_output=True, text=True, env=os.environ)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                sys.exit(f"{side} run {i} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
            r = json.loads(line[-1][7:])
            r["loadavg_parent"] = load
            results[side].append(r)
            print(f"run {i} {side}: " + json.dumps({k: round(v, 3) if isinstance(v, float) else v
                                                    for k, v in r.items()}), flush=True)  # fmt: skip
    rows = [r for rs in results.values() for r in rs]
    a.seq = statistics.median(r["tokens"] for r in rows) / a.steps / (a.prompts * a.group)
    proc = subprocess.run(base + ["--side", "floor", "--seq", str(a.seq)], capture_output=True, text=True)
    floor = json.loads([x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1][7:])
    print("floor: " + json.dumps(floor), flush=True)
    summary(results, a, floor)


if __name__ == "__main__":
    main()
