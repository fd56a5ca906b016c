"""PairwiseLabeler on HFBackend vs a naive labeler: pairs per second and peak memory, CPU, same run.

The naive labeler is what a straightforward implementation does: per pair, two separate forwards (one
per order) of the whole prompt through ``model(...)``, full [T, V] logits, a full log-softmax, then the
"1"/"2" entries of the last position. rlaif_fast runs both orders of many pairs in one left-padded
batch, keeps only the last hidden state and multiplies it by the two candidate rows of the output layer.

What the gain is made of: a third labeler, "naive, last position only", is the naive one (batch 1, two
forwards per pair) with the output layer applied to the last hidden state only. naive -> last-only is the
share of the [T, V] output layer and its log-softmax; last-only -> rlaif_fast is batching (both orders of
many pairs per forward) plus two candidate rows instead of V. How much the first part weighs depends on
the labeler's shape, so two shapes are measured (the table prints the output layer's share of the
per-token matmul FLOPs, V*d / (V*d + 12*L*d^2), attention scores left out):

- ``head-heavy`` (issue 5's workload): a config-built GPT-2 of ~7.6M parameters (4 layers, width 128, the
  real 50,257-token GPT-2 vocabulary and tokenizer): the output layer is ~89% of the matmul FLOPs,
  far more than in any real labeler.
- ``body-heavy``: a config-built GPT-2 body of 8 layers, width 256, on the 512-token llama2.c tokenizer
  (../shared/data/stories260K/tok512.bin): the output layer is ~2% of the matmul FLOPs, as in a large LLM.

Data: real HH-RLHF harmless-base pairs whose contexts are cut to their last 300 tokens (shorter ones
lengthened with the previous pairs' dialogues), responses to 60 tokens, the "harmlessness" template.

Peak memory: each labeler runs in its own spawned process; the peak RSS (VmHWM, reset through
/proc/self/clear_refs after the model and data are loaded) minus the RSS at that point.

    python benchmarks/bench_feedback.py [--pairs 256] [--threads 2] [--shapes head-heavy body-heavy]
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
SHAPES = {  # labeler shapes: layers, width, heads, tokenizer (its size is the vocabulary)
    "head-heavy": dict(n_layer=4, n_embd=128, n_head=4, tokenizer="gpt2"),
    "body-heavy": dict(n_layer=8, n_embd=256, n_head=4, tokenizer="llama2c"),
}
LABELERS = ("naive", "naive, last position only", "rlaif_fast")


def head_share(shape: str, vocab: int) -> float:
    """The output layer's share of the per-token matmul FLOPs (attention scores left out)."""
    d, layers = SHAPES[shape]["n_embd"], SHAPES[shape]["n_layer"]
    return vocab * d / (vocab * d + 12 * layers * d * d)


def _tokenizer(name: str):
    if name == "gpt2":
        from transformers import GPT2TokenizerFast

        return GPT2TokenizerFast.from_pretrained(str(DATA / "gpt2_bpe_tokenizer_whisper"))
    from rlaif_fast.models import Llama2cTokenizer

    return Llama2cTokenizer(str(DATA / "stories260K" / "tok512.bin"))


def build(n_pairs: int, seed: int = 0, shape: str = "head-heavy"):
    """(model, tokenizer, contexts, responses_a, responses_b), deterministic."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from rlaif_fast.feedback.pairs import pair_from_record

    spec = SHAPES[shape]
    tok = _tokenizer(spec["tokenizer"])
    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=spec["n_layer"], n_embd=spec["n_embd"], n_head=spec["n_head"], n_positions=1024,
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    model = GPT2LMHeadModel(cfg).eval()
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
    """Two forwards per pair, batch 1: the baseline. With ``last_only`` the output layer and the
    log-softmax run on the last position only (the naive loop minus the [T, V] logits)."""

    def __init__(self, model, tok, template, last_only: bool = False):
        from rlaif_fast.feedback import HFBackend

        self.model, self.tok, self.template, self.last_only = model, tok, template, last_only
        # the ids "1" and "2" get after the template's "=" (the same ones the backend scores)
        (self.one,), (self.two,) = HFBackend(model, tok).candidate_ids(["1", "2"])

    def _last_logp(self, ids):
        if self.last_only:
            h = self.model.base_model(input_ids=ids).last_hidden_state[:, -1]  # (1, d)
            return torch.log_softmax(self.model.get_output_embeddings()(h).float(), dim=-1)[0]  # (V,)
        logp = torch.log_softmax(self.model(input_ids=ids).logits.float(), dim=-1)  # (1, T, V)
        return logp[0, -1]

    @torch.no_grad()
    def label(self, contexts, responses_a, responses_b) -> list[float]:
        out = []
        for c, a, b in zip(contexts, responses_a, responses_b):
            p1 = []
            for first, second in ((a, b), (b, a)):
                ids = torch.tensor([self.tok(self.template.render_pairwise(c, first, second))["input_ids"]])
                pair = self._last_logp(ids)[[self.one, self.two]]
                p1.append(torch.softmax(pair, -1)[0].item())
            out.append(0.5 * (p1[0] + 1 - p1[1]))
        return out


def make_labeler(kind: str, model, tok, batch_size: int = 16):
    from rlaif_fast.feedback import HFBackend, PairwiseLabeler, load_template

    template = load_template("harmlessness")
    if kind.startswith("naive"):
        return NaiveLabeler(model, tok, template, last_only=kind != "naive").label
    lab = PairwiseLabeler(HFBackend(model, tok, batch_size=batch_size), template)
    return lambda c, a, b: [x.p_a for x in lab.label(c, a, b)]


def _rss_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _child(kind: str, n_pairs: int, threads: int, batch_size: int, shape: str, queue) -> None:
    torch.set_num_threads(threads)
    model, tok, c, a, b = build(n_pairs, shape=shape)
    label = make_labeler(kind, model, tok, batch_size)
    label(c[:2], a[:2], b[:2])  # warm-up (allocator, kernels)
    base = _rss_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak RSS to the current RSS
        f.write("5")
    t0, c0 = time.perf_counter(), time.process_time()
    p_a = label(c, a, b)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    n_tokens = sum(len(tok(x)["input_ids"]) for x in c) / len(c)
    queue.put(
        {
            "kind": kind,
            "vocab": len(tok),
            "seconds": dt,
            "cpu_seconds": cpu,
            "pairs_per_s": n_pairs / dt,
            "peak_mib": (_rss_kb("VmHWM") - base) / 1024,
            "p_a": p_a,
            "ctx_tokens": n_tokens,
        }
    )


def run(kind: str, n_pairs: int, threads: int, batch_size: int, shape: str = "head-heavy") -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(kind, n_pairs, threads, batch_size, shape, queue))
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
    ap.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    args = ap.parse_args()
    for shape in args.shapes:
        rows = {k: run(k, args.pairs, args.threads, args.batch_size, shape) for k in LABELERS}
        naive, last, ours = (rows[k] for k in LABELERS)
        diff = max(abs(x - y) for x, y in zip(naive["p_a"], ours["p_a"]))
        spec = SHAPES[shape]
        print(
            f"\n### {shape}: {spec['n_layer']} layers, width {spec['n_embd']}, vocabulary {ours['vocab']} "
            f"(output layer {head_share(shape, ours['vocab']):.0%} of the matmul FLOPs)\n\n"
            f"{args.pairs} pairs, mean context {ours['ctx_tokens']:.0f} tokens, {args.threads} threads, "
            f"max |p_a naive - p_a ours| = {diff:.1e}\n"
        )
        print("| labeler | pairs/s | labeling CPU s | peak memory over baseline (MiB) |")
        print("| --- | ---: | ---: | ---: |")
        for r in rows.values():
            print(f"| {r['kind']} | {r['pairs_per_s']:.2f} | {r['cpu_seconds']:.1f} | {r['peak_mib']:.1f} |")
        print(
            f"\nspeedup {ours['pairs_per_s'] / naive['pairs_per_s']:.2f}x = "
            f"{last['pairs_per_s'] / naive['pairs_per_s']:.2f}x (output layer on the last position only) x "
            f"{ours['pairs_per_s'] / last['pairs_per_s']:.2f}x (batching, two candidate rows); "
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
