"""PPO policy loss from logits, forward + backward, on CPU: rlaif_fast vs eager torch.

    python -m pytest benchmarks/bench_ppo_loss.py --benchmark-enable --benchmark-only
    python benchmarks/bench_ppo_loss.py [--batch 4 --seq 256 --vocab 32000]   # time + peak memory table

Eager = log_softmax over the full [B, T, V] logits, gather, entropy from the same copy, then the same
clipped loss (``rlaif_fast.reference.logprobs.ppo_loss_from_logprobs``), backward through autograd.
Peak extra memory: ``rlaif_fast.bench.peak_memory`` (allocator events from torch.profiler).
"""

from __future__ import annotations

import argparse
import os
import sys

import pytest
import torch

from rlaif_fast.bench import best_time, peak_memory

OPTS = dict(clip_eps=0.2, clip_eps_high=0.28, kl_coef=0.05, entropy_coef=0.01, loss_agg="token-mean")


def setup(batch: int = 4, seq: int = 256, vocab: int = 32000):
    torch.manual_seed(0)
    logits = torch.randn(batch, seq, vocab)
    labels = torch.randint(0, vocab, (batch, seq))
    old = -torch.rand(batch, seq) * 10
    per_token = dict(old_logp=old, advantages=torch.randn(batch, seq), mask=torch.rand(batch, seq) > 0.1)
    return logits, labels, per_token, old - 0.05


def ours(logits, labels, b, ref_logp):
    from rlaif_fast.ops import ppo_policy_loss

    x = logits.detach().requires_grad_()
    loss, _ = ppo_policy_loss(x, labels, b["old_logp"], b["advantages"], b["mask"], ref_logp=ref_logp, **OPTS)
    loss.backward()
    return x.grad


def eager(logits, labels, b, ref_logp):
    from rlaif_fast.reference.logprobs import ppo_loss_from_logprobs

    x = logits.detach().requires_grad_()
    logp_all = torch.log_softmax(x, dim=-1)
    logp = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    loss, _ = ppo_loss_from_logprobs(
        logp, b["old_logp"], b["advantages"], b["mask"], entropy=ent, ref_logp=ref_logp, **OPTS
    )
    loss.backward()
    return x.grad


IMPLS = {"rlaif_fast": ours, "eager": eager}


@pytest.mark.parametrize("impl", list(IMPLS))
def test_ppo_policy_loss_fwd_bwd_cpu(benchmark, impl, monkeypatch):
    monkeypatch.setenv("RLAIF_FAST_BACKEND", "torch")
    args = setup()
    benchmark.extra_info["peak_extra_mib"] = peak_memory(lambda: IMPLS[impl](*args)) / 2**20
    benchmark.pedantic(IMPLS[impl], args=args, rounds=3, warmup_rounds=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    os.environ["RLAIF_FAST_BACKEND"] = "torch"
    inputs = setup(args.batch, args.seq, args.vocab)
    torch.testing.assert_close(ours(*inputs), eager(*inputs), atol=1e-6, rtol=1e-4)
    times = {name: [] for name in IMPLS}
    for _ in range(args.repeat):  # interleaved rounds: shared-machine load hits both alike
        for name, fn in IMPLS.items():
            times[name].append(best_time(lambda fn=fn: fn(*inputs), repeat=1))
    print(
        f"ppo_policy_loss fwd+bwd, B={args.batch} T={args.seq} V={args.vocab} fp32, "
        f"{torch.get_num_threads()} threads, best of {args.repeat}"
    )
    print("| implementation | time (ms) | peak extra memory (MiB) |")
    print("| --- | ---: | ---: |")
    for name, fn in IMPLS.items():
        peak = peak_memory(lambda fn=fn: fn(*inputs))
        print(f"| {name} | {min(times[name]) * 1e3:.0f} | {peak / 2**20:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
