"""token_logprobs + entropy on CPU: rlaif_fast's chunked torch path vs TRL and eager torch.

    python -m pytest benchmarks/bench_token_logprobs.py --benchmark-enable --benchmark-only   # timings
    python benchmarks/bench_token_logprobs.py [--n 4096 --vocab 32000]     # time + peak memory table

Peak extra memory: allocator-level accounting (``rlaif_fast.bench.peak_memory``: torch.profiler memory
events, every CPU allocation and free during the call, kernel-internal temporaries included).
"""

from __future__ import annotations

import argparse
import sys

import pytest
import torch

from rlaif_fast.bench import best_time, eager_logprobs_entropy, peak_memory

N, V = 4096, 32000


def setup(n: int = N, vocab: int = V, batch: int = 8):
    """Logits (batch, n / batch, V) fp32 and labels: the [B, T, V] shape a trainer hands over."""
    torch.manual_seed(0)
    logits = torch.randn(batch, n // batch, vocab)
    return logits, torch.randint(0, vocab, (batch, n // batch))


def ours(logits, labels):
    from rlaif_fast.ops.logprobs import token_logprobs

    with torch.no_grad():
        return token_logprobs(logits, labels, return_entropy=True)


def trl(logits, labels):
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    with torch.no_grad():
        return selective_log_softmax(logits, labels), entropy_from_logits(logits)


def eager(logits, labels):
    with torch.no_grad():
        return eager_logprobs_entropy(logits, labels)


IMPLS = {"rlaif_fast": ours, "trl": trl, "eager": eager}


@pytest.mark.parametrize("impl", list(IMPLS))
def test_token_logprobs_entropy_cpu(benchmark, impl, monkeypatch):
    if impl == "trl":
        pytest.importorskip("trl")
    monkeypatch.setenv("RLAIF_FAST_BACKEND", "torch")
    logits, labels = setup()
    fn = IMPLS[impl]
    benchmark.extra_info["peak_extra_mib"] = peak_memory(lambda: fn(logits, labels)) / 2**20
    benchmark.pedantic(fn, args=(logits, labels), rounds=3, warmup_rounds=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=N)
    parser.add_argument("--vocab", type=int, default=V)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    import os

    os.environ["RLAIF_FAST_BACKEND"] = "torch"
    logits, labels = setup(args.n, args.vocab)
    ref_lp, ref_h = eager(logits, labels)
    rows = []
    # interleave the implementations round by round so load on a shared machine hits all of them alike
    times = {name: [] for name in IMPLS}
    for name, fn in IMPLS.items():
        lp, h = fn(logits, labels)
        assert torch.allclose(lp, ref_lp, atol=1e-4) and torch.allclose(h, ref_h, atol=1e-3), name
    for _ in range(args.repeat):
        for name, fn in IMPLS.items():
            times[name].append(best_time(lambda fn=fn: fn(logits, labels), repeat=1))
    for name, fn in IMPLS.items():
        rows.append((name, min(times[name]), peak_memory(lambda fn=fn: fn(logits, labels))))
    print(
        f"token_logprobs + entropy, N={args.n} (8 x {args.n // 8}), V={args.vocab}, fp32, no grad, "
        f"{torch.get_num_threads()} threads, best of {args.repeat}"
    )
    print("| implementation | time (ms) | peak extra memory (MiB) | time / TRL | memory / eager |")
    print("| --- | ---: | ---: | ---: | ---: |")
    t_trl, m_eager = rows[1][1], rows[2][2]
    for name, seconds, peak in rows:
        print(
            f"| {name} | {seconds * 1e3:.0f} | {peak / 2**20:.1f} | {seconds / t_trl:.2f} | {peak / m_eager:.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
