"""GAE on CPU at B = 256, T = 1024: rlaif_fast's chunked-matmul scan vs the Python loop over time.

The baseline is the loop TRL, OpenRLHF and verl run (mask rewards and values, walk t = T-1 .. 0 carrying
lastgaelam, stack the columns). Both run in the same process, interleaved, on the same inputs.

    pytest benchmarks/bench_gae.py -o python_files='bench_*.py' --benchmark-enable --benchmark-only
    python benchmarks/bench_gae.py            # prints the table written to benchmarks/results/rl.md
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rlaif_fast.ops import advantages as adv_ops
from rlaif_fast.reference import rl as ref

B, T, GAMMA, LAM = 256, 1024, 1.0, 0.95


def make_inputs(B: int = B, T: int = T, kind: str = "right", seed: int = 0):
    """rewards, values (B, T) fp32 and a mask: right-padded responses of random length, or with holes."""
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(B, T, generator=g)
    values = torch.randn(B, T, generator=g)
    lens = torch.randint(T // 4, T + 1, (B, 1), generator=g)
    mask = torch.arange(T)[None] < lens
    if kind == "holes":
        mask &= torch.rand(B, T, generator=g) > 0.1
    return rewards, values, mask


def loop_gae(rewards, values, mask, gamma=GAMMA, lam=LAM):
    """The per-timestep loop of today's trainers (contiguous masks only), written here as the baseline."""
    m = mask.to(rewards.dtype)
    rewards, values = rewards * m, values * m
    n = rewards.shape[1]
    lastgaelam = torch.zeros_like(rewards[:, 0])
    reversed_adv = []
    for t in reversed(range(n)):
        next_values = values[:, t + 1] if t < n - 1 else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        reversed_adv.append(lastgaelam)
    adv = torch.stack(reversed_adv[::-1], dim=1)
    return adv * m, (adv + values) * m


def ours(rewards, values, mask, gamma=GAMMA, lam=LAM, chunk=adv_ops._CHUNK):
    return adv_ops._gae_torch(rewards, values, mask != 0, gamma, lam, torch.float32, chunk)


# ---- pytest-benchmark ---------------------------------------------------------------------------------


def test_gae_python_loop(benchmark):
    args = make_inputs()
    benchmark(loop_gae, *args)


def test_gae_rlaif_fast(benchmark):
    args = make_inputs()
    benchmark(ours, *args)


def test_gae_rlaif_fast_holes(benchmark):
    args = make_inputs(kind="holes")
    benchmark(ours, *args)


# ---- table --------------------------------------------------------------------------------------------


def _times(fn, args, reps):
    fn(*args)  # warm-up
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(*args)
        out.append(time.perf_counter() - t0)
    return out


def _max_err(fn, args):
    r, v, m = args
    truth, _ = ref.gae(r.double(), v.double(), m, GAMMA, LAM)
    return (fn(*args)[0].double() - truth).abs().max().item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--loop-reps", type=int, default=5)
    a = p.parse_args(argv)
    right, holes = make_inputs(), make_inputs(kind="holes")
    rows = []
    # interleave baseline and ours so that load from other processes hits both alike
    loop_t, ours_t, holes_t = [], [], []
    chunk_t = {k: [] for k in (32, 64, 128)}
    for _ in range(a.loop_reps):
        loop_t += _times(loop_gae, right, 1)
        ours_t += _times(ours, right, a.reps // a.loop_reps)
        holes_t += _times(ours, holes, a.reps // a.loop_reps)
        for k in chunk_t:
            chunk_t[k] += _times(lambda r, v, m, k=k: ours(r, v, m, chunk=k), right, a.reps // a.loop_reps)
    base = statistics.median(loop_t)
    rows.append(("Python loop over time (TRL/OpenRLHF/verl style)", loop_t, _max_err(loop_gae, right)))
    rows.append((f"rlaif_fast torch path, right-padded (K={adv_ops._CHUNK})", ours_t, _max_err(ours, right)))
    rows.append(("rlaif_fast torch path, mask with holes (compacted)", holes_t, _max_err(ours, holes)))
    for k, ts in chunk_t.items():
        rows.append((f"  chunk K={k}, right-padded", ts, None))
    print(f"GAE, CPU, B={B}, T={T}, fp32, gamma={GAMMA}, lam={LAM}, torch threads={torch.get_num_threads()}")
    print("| path | median ms | min ms | speed-up vs loop | max abs err vs fp64 |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, ts, err in rows:
        med = statistics.median(ts)
        e = "" if err is None else f"{err:.1e}"
        print(f"| {name} | {med * 1e3:.2f} | {min(ts) * 1e3:.2f} | {base / med:.0f}x | {e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
