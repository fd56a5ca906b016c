"""GAE on CPU at B = 256, T = 1024: rlaif_fast's C++ scan (and its torch fallback) vs the Python loop.

The baseline is the loop TRL, OpenRLHF and verl run (mask rewards and values, walk t = T-1 .. 0 carrying
lastgaelam, stack the columns). Both run in the same process, interleaved, on the same inputs.

    pytest benchmarks/bench_gae.py -o python_files='bench_*.py' --benchmark-enable --benchmark-only
    python benchmarks/bench_gae.py            # prints the table written to benchmarks/results/rl.md
    python benchmarks/bench_gae.py --gpu --out DIR   # lent GPU: Triton kernels, checked, then timed
    TRITON_INTERPRET=1 python benchmarks/bench_gae.py --gpu --smoke   # the same on CPU, tiny sizes
    TRITON_INTERPRET=1 python benchmarks/bench_gae.py --bytes   # bytes each kernel moves vs the minimum
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


def public(rewards, values, mask, gamma=GAMMA, lam=LAM):
    """rlaif_fast.ops.gae as users call it: on CPU, the C++ scan of rlaif_fast._C (checks included)."""
    return adv_ops.gae(rewards, values, mask, gamma, lam)


def ours(rewards, values, mask, gamma=GAMMA, lam=LAM, chunk=adv_ops._CHUNK):
    """The torch fallback (chunked Toeplitz matmuls) the CPU runs when the extension is not built."""
    return adv_ops._gae_torch(rewards, values, mask != 0, gamma, lam, torch.float32, chunk)


# ---- pytest-benchmark ---------------------------------------------------------------------------------


def test_gae_python_loop(benchmark):
    args = make_inputs()
    benchmark(loop_gae, *args)


def test_gae_rlaif_fast(benchmark):
    args = make_inputs()
    benchmark(public, *args)


def test_gae_rlaif_fast_holes(benchmark):
    args = make_inputs(kind="holes")
    benchmark(public, *args)


def test_gae_torch_fallback(benchmark):
    args = make_inputs()
    benchmark(ours, *args)


def test_gae_torch_fallback_holes(benchmark):
    args = make_inputs(kind="holes")
    benchmark(ours, *args)


# ---- table --------------------------------------------------------------------------------------------


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _times(fn, args, reps, clock=time.perf_counter):
    fn(*args)  # warm-up
    out = []
    for _ in range(reps):
        t0 = clock()
        fn(*args)
        out.append(clock() - t0)
    return out


def _load_module(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("advantages_against", path)
    if spec is None:
        raise ValueError(f"--against {path!r} is not a Python file; give the path of a .py copy")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _max_err(fn, args):
    r, v, m = args
    truth, _ = ref.gae(r.double(), v.double(), m, GAMMA, LAM)
    return (fn(*args)[0].double() - truth).abs().max().item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--rounds", type=int, default=10, help="interleaved rounds: 1 loop run, then --reps of each"
    )
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="cpu: process CPU time, robust when other jobs share the cores (use with --threads 1)",
    )
    p.add_argument(
        "--against",
        default=None,
        metavar="FILE",
        help="also time the _gae_torch of another copy of rlaif_fast/ops/advantages.py (before/after: "
        "git show HEAD:rlaif_fast/ops/advantages.py > /tmp/adv_head.py)",
    )
    p.add_argument("--chunks", action="store_true", help="also time the fallback at other chunk sizes")
    p.add_argument("--gpu", action="store_true", help="check and time the Triton kernels on CUDA instead")
    p.add_argument("--smoke", action="store_true", help="with --gpu: tiny sizes (the interpreter on CPU)")
    p.add_argument("--out", default=None, help="with --gpu: folder for rl.json")
    p.add_argument("--bytes", action="store_true", help="count kernel bytes (needs TRITON_INTERPRET=1)")
    a = p.parse_args(argv)
    if a.gpu:
        return gpu_main(a.out, a.smoke)
    if a.bytes:
        return bytes_main()
    if a.threads:
        torch.set_num_threads(a.threads)
    right, holes = make_inputs(), make_inputs(kind="holes")
    if adv_ops._extension() is None:
        raise SystemExit(
            "rlaif_fast._C is not built (or RLAIF_FAST_NO_EXT=1): nothing to compare the loop to"
        )
    contenders = {
        "Python loop over time (TRL/OpenRLHF/verl style)": (loop_gae, right, 1),
        "rlaif_fast.ops.gae (C++ scan), right-padded": (public, right, a.reps),
        "rlaif_fast.ops.gae (C++ scan), mask with holes": (public, holes, a.reps),
        f"torch fallback (no extension), right-padded (K={adv_ops._CHUNK})": (ours, right, a.reps),
        "torch fallback (no extension), mask with holes (compacted)": (ours, holes, a.reps),
    }
    if a.chunks:
        for k in (16, 64, 128):
            contenders[f"  fallback, chunk K={k}"] = (
                lambda r, v, m, k=k: ours(r, v, m, chunk=k),
                right,
                a.reps,
            )
    if a.against:
        other = _load_module(a.against)
        for kind, args in (("right-padded", right), ("holes", holes)):
            contenders[f"{a.against}, {kind}"] = (
                lambda r, v, m: other._gae_torch(r, v, m != 0, GAMMA, LAM, torch.float32),
                args,
                a.reps,
            )
    times = {name: [] for name in contenders}
    # interleaved, so that load from other processes on the machine hits every contender alike
    for _ in range(a.rounds):
        for name, (fn, args, reps) in contenders.items():
            times[name] += _times(fn, args, reps, CLOCKS[a.clock])
    base_med, base_min = (f(times[next(iter(times))]) for f in (statistics.median, min))
    print(
        f"GAE, CPU, B={B}, T={T}, fp32, gamma={GAMMA}, lam={LAM}, torch threads={torch.get_num_threads()}, "
        f"{a.clock} clock, load average {open('/proc/loadavg').read().split()[0]}"
    )
    print("| path | median ms | min ms | speed-up (median) | speed-up (min) | max abs err vs fp64 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, (fn, args, _) in contenders.items():
        med, lo = statistics.median(times[name]), min(times[name])
        err = _max_err(fn, args)
        print(
            f"| {name} | {med * 1e3:.2f} | {lo * 1e3:.2f} | {base_med / med:.0f}x | {base_min / lo:.0f}x | {err:.1e} |"
        )
    return 0


# ---- lent GPU: the Triton kernels -----------------------------------------------------------------------


def _check_kernel(got, args_cpu, fn_ref):
    """Tolerance rule on the full-size outputs: |kernel - fp64| <= |eager fp32 - fp64| + 2e-6."""
    truth = fn_ref(*(x.double() if x.is_floating_point() else x for x in args_cpu))
    eager = fn_ref(*args_cpu)
    for o, e, t in zip(got, eager, truth):
        err, err_eager = (o.cpu().double() - t).abs().max().item(), (e.double() - t).abs().max().item()
        if not err <= err_eager + 2e-6:
            raise AssertionError(f"kernel error {err:.2e} > eager error {err_eager:.2e} + 2e-6")
    return err


def _gpu_timings(r, v, m, scores, lp, rp) -> dict:
    from rlaif_fast.kernels import advantages as gae_kernels
    from rlaif_fast.kernels import kl as kl_kernels
    from triton.testing import do_bench

    from rlaif_fast.ops import kl as kl_ops

    b, t = r.shape
    min_bytes = b * t * (4 + 4 + 1 + 4 + 4)  # read r, V, mask once; write A, R once
    ms = do_bench(lambda: gae_kernels.gae(r, v, m, GAMMA, LAM, torch.float32))
    shaped = (scores, lp, rp, m, 0.05, "k3", None, torch.float32)
    return {
        "gae_triton_ms": ms,
        "gae_triton_GBps_at_min_bytes": min_bytes / ms / 1e6,
        "gae_loop_ms": do_bench(lambda: loop_gae(r, v, m), warmup=5, rep=50),
        "gae_torch_path_ms": do_bench(lambda: ours(r, v, m)),
        "shaped_triton_ms": do_bench(lambda: kl_kernels.shaped_rewards(*shaped)),
        "shaped_torch_path_ms": do_bench(lambda: kl_ops._shaped_rewards_torch(*shaped)),
    }


def gpu_main(out: str | None, smoke: bool) -> int:
    import json
    import os

    from rlaif_fast.kernels import advantages as gae_kernels
    from rlaif_fast.kernels import kl as kl_kernels

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    b, t = (4, 64) if smoke else (B, T)
    rows = []
    for kind in ("right", "holes"):
        cpu = make_inputs(b, t, kind)
        r, v, m = (x.to(dev) for x in cpu)
        got = gae_kernels.gae(r, v, m, GAMMA, LAM, torch.float32)
        err = _check_kernel(got, cpu, lambda r, v, m: ref.gae(r, v, m, GAMMA, LAM))
        scores = torch.randn(b, device=dev)
        lp, rp = -torch.rand(b, t, device=dev), -torch.rand(b, t, device=dev)
        sh = kl_kernels.shaped_rewards(scores, lp, rp, m, 0.05, "k3", None, torch.float32)
        _check_kernel(
            sh,
            (scores.cpu(), lp.cpu(), rp.cpu(), m.cpu()),
            lambda s, a, c, mm: ref.kl_shaped_rewards(s, a, c, mm, 0.05, "k3"),
        )
        row = {"kind": kind, "B": b, "T": t, "gae_max_err": err}
        if dev == "cuda":
            row |= _gpu_timings(r, v, m, scores, lp, rp)
        rows.append(row)
        print(json.dumps(row))
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "rl.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", "rows": rows}, f)
    return 0


# ---- bytes moved by the kernels (engineer A's instrumented interpreter) -------------------------------


def bytes_main(b: int = 8, t: int = 300) -> int:
    """Bytes each kernel loads and stores vs the minimum (inputs read once, outputs written once), with
    the eager torch ops that compute the same thing beside it (benchmarks/bytes_moved.py counts both)."""
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bytes_moved import count_bytes, count_eager_bytes
    from rlaif_fast.kernels import advantages as gae_kernels
    from rlaif_fast.kernels import kl as kl_kernels

    def nbytes(*xs):
        return sum(x.numel() * x.element_size() for x in xs)

    r, v, m = make_inputs(b, t, "right")
    scores = torch.randn(b)
    lp, rp, g = -torch.rand(b, t), -torch.rand(b, t), torch.randn(b, t)
    lp_g, rp_g = lp.clone().requires_grad_(), rp.clone().requires_grad_()
    kl_eager = ref.kl_penalty(lp_g, rp_g, "k3")
    f32 = torch.float32
    minimum = {  # every input read once, every output written once
        "gae": nbytes(r, v, m) + 2 * nbytes(r),
        "kl_shaped_rewards": nbytes(scores, lp, rp, m) + 2 * nbytes(lp),
        "kl_penalty fwd": nbytes(lp, rp) + nbytes(lp),
        "kl_penalty bwd": nbytes(g, lp, rp) + 2 * nbytes(lp),
    }
    cases = [  # name, Triton kernel launch, eager torch doing the same, the eager's name
        ("gae", lambda: gae_kernels.gae(r, v, m, GAMMA, LAM, f32), lambda: loop_gae(r, v, m), "loop"),
        ("gae", None, lambda: ours(r, v, m), "rlaif_fast torch path"),
        (
            "kl_shaped_rewards",
            lambda: kl_kernels.shaped_rewards(scores, lp, rp, m, 0.05, "k3", None, f32),
            lambda: ref.kl_shaped_rewards(scores, lp, rp, m, 0.05, "k3"),
            "reference",
        ),
        (
            "kl_penalty fwd",
            lambda: kl_kernels.kl_forward(lp, rp, "k3", None, f32),
            lambda: ref.kl_penalty(lp, rp, "k3"),
            "reference",
        ),
        (
            "kl_penalty bwd",
            lambda: kl_kernels.kl_backward(g, lp, rp, "k3", None, True),
            lambda: torch.autograd.grad(kl_eager, (lp_g, rp_g), g, retain_graph=True),
            "autograd",
        ),
    ]
    print(f"bytes moved, B={b}, T={t}, fp32 values, bool mask, k3 (TRITON_INTERPRET=1)")
    print("| op | minimum bytes | Triton kernel bytes | ratio | eager (which) | eager bytes | eager ratio |")
    print("| --- | ---: | ---: | ---: | --- | ---: | ---: |")
    for name, kernel, eager, eager_name in cases:
        low = minimum[name]
        k = "" if kernel is None else sum(count_bytes(kernel))
        k_ratio = "" if kernel is None else f"{k / low:.3f}"
        e = sum(count_eager_bytes(eager))
        print(f"| {name} | {low} | {k} | {k_ratio} | {eager_name} | {e} | {e / low:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
