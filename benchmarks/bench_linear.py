"""Log-probs from hidden states on CPU at N = 4096, H = 512, V = 32000, fp32, forward + backward:
rlaif_fast's chunked path vs the materialized-logits path vs TRL's fused LM head.

- materialized: ``F.linear`` -> ``log_softmax`` -> gather, autograd (what a plain trainer runs);
- rlaif_fast: ``linear_token_logprobs`` (torch path on CPU: chunks of 2^23 / V tokens);
- TRL 1.16: ``trl.kernels.ChunkedLogProbFunction``, the autograd function behind
  ``trl.trainer.utils.add_fused_lm_head`` (on CPU its tiles are folded in torch).
All three return per-token log-probs, backpropagate into hidden and weight, and run in the same
process, interleaved, on the same inputs. Peak extra memory is measured in a fresh subprocess per case:
peak RSS (VmHWM, reset through /proc/self/clear_refs after the inputs exist) minus the RSS before the
step, with glibc's mmap threshold pinned so that freed buffers leave the RSS at once.

    pytest benchmarks/bench_linear.py -o python_files='bench_*.py' --benchmark-enable --benchmark-only
    python benchmarks/bench_linear.py      # prints the table written to benchmarks/results/linear.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

N, H, V = 4096, 512, 32000
CASES = ("materialized", "rlaif_fast", "trl_fused")


def make_inputs(n=N, h=H, v=V, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).requires_grad_()
    weight = torch.randn(v, h, generator=g).mul_(h**-0.5).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, labels


def materialized(hidden, weight, labels):
    logits = torch.nn.functional.linear(hidden, weight)  # (N, V)
    return torch.log_softmax(logits, -1).gather(-1, labels[:, None])[:, 0]


def rlaif_fast(hidden, weight, labels):
    from rlaif_fast.ops.linear import linear_token_logprobs

    return linear_token_logprobs(hidden, weight, labels)


def trl_fused(hidden, weight, labels):
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    out = ChunkedLogProbFunction.apply(
        hidden, weight, None, labels, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("log_probs",)
    )
    return out[0]


def step(case, hidden, weight, labels):
    """One forward + backward; gradients are cleared so every step allocates the same."""
    hidden.grad = weight.grad = None
    logp = globals()[case](hidden, weight, labels)
    logp.sum().backward()
    return logp


# ---- pytest-benchmark ---------------------------------------------------------------------------------


def _bench(benchmark, case):
    args = make_inputs()
    benchmark.pedantic(step, args=(case, *args), rounds=3, warmup_rounds=1)


def test_linear_materialized(benchmark):
    _bench(benchmark, "materialized")


def test_linear_rlaif_fast(benchmark):
    _bench(benchmark, "rlaif_fast")


def test_linear_trl_fused(benchmark):
    _bench(benchmark, "trl_fused")


# ---- memory: one subprocess per case ------------------------------------------------------------------


def _rss_and_peak():
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def _child(case):
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    hidden, weight, labels = make_inputs()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS: setup does not count
    rss_before, _ = _rss_and_peak()
    step(case, hidden, weight, labels)
    print(json.dumps({"case": case, "peak_extra": _rss_and_peak()[1] - rss_before}))


def peak_extra_bytes(case):
    # a fixed mmap threshold: every buffer over 128 KiB is its own mapping and leaves the RSS when freed
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, __file__, "--child", case], capture_output=True, text=True, env=env,
                         check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    if a.child:
        return _child(a.child)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    args = make_inputs()
    ref = None
    times = {c: [] for c in CASES}
    for c in CASES:  # warm-up, and agreement of the three
        logp = step(c, *args).detach()
        ref = logp if ref is None else ref
        assert (logp - ref).abs().max().item() < 1e-3, c
    for _ in range(a.repeats):  # interleaved: drifts in machine load hit every case alike
        for c in CASES:
            t = time.perf_counter()
            step(c, *args)
            times[c].append(time.perf_counter() - t)
    mem = {c: peak_extra_bytes(c) for c in CASES}
    base_t, base_m = statistics.median(times["materialized"]), mem["materialized"]
    print(f"N={N} H={H} V={V} fp32, forward + backward, {torch.get_num_threads()} threads, "
          f"median of {a.repeats}")  # fmt: skip
    print("| path | time (s) | time / materialized | peak extra memory (MiB) | memory / materialized |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for c in CASES:
        t = statistics.median(times[c])
        print(f"| {c} | {t:.3f} | {t / base_t:.2f}x | {mem[c] / 2**20:.0f} | {mem[c] / base_m:.3f} |")


if __name__ == "__main__":
    main()
