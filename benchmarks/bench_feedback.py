"""PairwiseLabeler on HFBackend vs a naive labeler: pairs per second and peak memory, CPU, same run.

The naive labeler is what a straightforward implementation does: per pair, two separate forwards (one
per order) of the whole prompt through ``model(...)``, full [T, V] logits, a full log-softmax, then the
"1"/"2" entries of the last position. rlaif_fast runs both orders of many pairs in one left-padded
batch, keeps only the last hidden state and multiplies it by the two candidate rows of the output layer.

Workload (issue 5): a config-built GPT-2 labeler of ~7.6M parameters (4 layers, width 128, the real
50,257-token GPT-2 vocabulary), 256 real HH-RLHF harmless-base pairs whose contexts are cut to their
last 300 tokens (shorter ones lengthened with the previous pairs' dialogues), the "harmlessness" template.

Peak memory: each labeler runs in its own spawned process; the peak RSS (VmHWM, reset through
/proc/self/clear_refs after the model and data are loaded) minus the RSS at that point.

    python benchmarks/bench_feedback.py [--pairs 256] [--threads 2]      # the table for results/feedback.md
    pytest benchmarks/bench_feedback.py --benchmark-enable --benchmark-only  # pytest-benchmark, 8 pairs
"""

from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CTX_TOKENS = 300


def build(n_pairs: int, seed: int = 0):
    """(model, tokenizer, contexts, responses_a, responses_b), deterministic."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    from rlaif_fast.feedback.pairs import pair_from_record

    tok = GPT2TokenizerFast.from_pretrained(str(DATA / "gpt2_bpe_tokenizer_whisper"))
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=128, n_head=4, n_positions=1024)).eval()
    ctxs, a, b = [], [], []
    history = ""
    with gzip.open(DATA / "hh_rlhf_harmless_base_test" / "test.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            try:
                p = pair_from_record(json.loads(line))
            except ValueError:  # the real data has a few empty responses; the job skips them too
                continue
            history = (history + p.context)[-20000:]
            ids = tok(history)["input_ids"]
            if len(ids) < CTX_TOKENS:
                continue
            ctxs.append(tok.decode(ids[-CTX_TOKENS:]))
            # responses cut to 60 tokens so the prompt is dominated by the ~300-token context
            a.append(tok.decode(tok(p.response_a)["input_ids"][:60]))
            b.append(tok.decode(tok(p.response_b)["input_ids"][:60]))
            if len(ctxs) == n_pairs:
                break
    return model, tok, ctxs, a, b


class NaiveLabeler:
    """Two full forwards per pair with full logits: the baseline."""

    def __init__(self, model, tok, template):
        self.model, self.tok, self.template = model, tok, template
        self.one, self.two = tok("1")["input_ids"][0], tok("2")["input_ids"][0]

    @torch.no_grad()
    def label(self, contexts, responses_a, responses_b) -> list[float]:
        out = []
        for c, a, b in zip(contexts, responses_a, responses_b):
            p1 = []
            for first, second in ((a, b), (b, a)):
                ids = torch.tensor([self.tok(self.template.render_pairwise(c, first, second))["input_ids"]])
                logp = torch.log_softmax(self.model(input_ids=ids).logits.float(), dim=-1)  # (1, T, V)
                pair = logp[0, -1, [self.one, self.two]]
                p1.append(torch.softmax(pair, -1)[0].item())
            out.append(0.5 * (p1[0] + 1 - p1[1]))
        return out


def make_labeler(kind: str, model, tok, batch_size: int = 16):
    from rlaif_fast.feedback import HFBackend, PairwiseLabeler, load_template

    template = load_template("harmlessness")
    if kind == "naive":
        return NaiveLabeler(model, tok, template).label
    lab = PairwiseLabeler(HFBackend(model, tok, batch_size=batch_size), template)
    return lambda c, a, b: [x.p_a for x in lab.label(c, a, b)]


def _rss_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _child(kind: str, n_pairs: int, threads: int, batch_size: int, queue) -> None:
    torch.set_num_threads(threads)
    model, tok, c, a, b = build(n_pairs)
    label = make_labeler(kind, model, tok, batch_size)
    label(c[:2], a[:2], b[:2])  # warm-up (allocator, kernels)
    base = _rss_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak RSS to the current RSS
        f.write("5")
    t0 = time.perf_counter()
    p_a = label(c, a, b)
    dt = time.perf_counter() - t0
    n_tokens = sum(len(tok(x)["input_ids"]) for x in c) / len(c)
    queue.put(
        {
            "kind": kind,
            "seconds": dt,
            "pairs_per_s": n_pairs / dt,
            "peak_mib": (_rss_kb("VmHWM") - base) / 1024,
            "p_a": p_a,
            "ctx_tokens": n_tokens,
        }
    )


def run(kind: str, n_pairs: int, threads: int, batch_size: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(kind, n_pairs, threads, batch_size, queue))
    proc.start()
    while True:  # poll, so that a crashed child ends the run instead of hanging it
        try:
            result = queue.get(timeout=1.0)
            break
        except Exception:  # noqa: BLE001 - queue.Empty
            if not proc.is_alive():
                raise RuntimeError(f"the {kind} benchmark process died (exit code {proc.exitcode})") from None
    proc.join()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16, help="prompts per forward of HFBackend")
    args = ap.parse_args()
    naive = run("naive", args.pairs, args.threads, args.batch_size)
    ours = run("rlaif_fast", args.pairs, args.threads, args.batch_size)
    diff = max(abs(x - y) for x, y in zip(naive["p_a"], ours["p_a"]))
    print(
        f"{args.pairs} pairs, mean context {ours['ctx_tokens']:.0f} tokens, {args.threads} threads, "
        f"max |p_a naive - p_a ours| = {diff:.1e}\n"
    )
    print("| labeler | pairs/s | peak memory over baseline (MiB) |")
    print("| --- | ---: | ---: |")
    for r in (naive, ours):
        print(f"| {r['kind']} | {r['pairs_per_s']:.2f} | {r['peak_mib']:.1f} |")
    print(
        f"\nspeedup {ours['pairs_per_s'] / naive['pairs_per_s']:.2f}x, "
        f"peak memory ratio {ours['peak_mib'] / max(naive['peak_mib'], 1e-9):.3f}"
    )


# ---- pytest-benchmark (smaller, for `make bench`) ----
def _bench_setup():
    model, tok, c, a, b = build(8)
    return model, tok, c, a, b


def test_bench_labeler_rlaif_fast(benchmark):
    if not DATA.is_dir():
        import pytest

        pytest.skip(f"{DATA} is absent")
    model, tok, c, a, b = _bench_setup()
    label = make_labeler("rlaif_fast", model, tok)
    benchmark.pedantic(label, args=(c, a, b), rounds=2, iterations=1)


def test_bench_labeler_naive(benchmark):
    if not DATA.is_dir():
        import pytest

        pytest.skip(f"{DATA} is absent")
    model, tok, c, a, b = _bench_setup()
    label = make_labeler("naive", model, tok)
    benchmark.pedantic(label, args=(c, a, b), rounds=2, iterations=1)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
