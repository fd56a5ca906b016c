"""Log-probs from hidden states on a lent GPU: correctness first, then forward and forward + backward
time, TFLOP/s and peak memory of every path side by side:

    gemm          linear_token_logprobs, fused Triton forward, backward="gemm" (cuBLAS + one Triton epilogue)
    gemm-fwd      the same with forward="gemm" (cuBLAS products per chunk + the Triton log-sum-exp pass)
    atomic        linear_token_logprobs, fused Triton forward, backward="atomic" (fp32 atomics per tile)
    torch         linear_token_logprobs with RLAIF_FAST_BACKEND=torch (the chunked CPU path, on CUDA)
    materialized  F.linear -> log_softmax -> gather, autograd (what a plain trainer runs)

    python benchmarks/gpu/bench_linear.py --out DIR            # N = 8192, H = 4096, V = 128256, bf16
    python benchmarks/gpu/bench_linear.py --chunks 1024,2048,4096 --variants gemm   # the GEMM chunk sweep
    python benchmarks/gpu/bench_linear.py --blocks 128,128,64  # other (BLOCK_N, BLOCK_V, BLOCK_H); see
                                          # benchmarks/results/compile.md for which fit shared memory
    python benchmarks/gpu/bench_linear.py --accounting         # analytic FLOPs / bytes, no GPU needed
    python benchmarks/gpu/bench_linear.py --smoke --out DIR    # tiny CPU run through the Triton interpreter

TFLOP/s counts 8·N·H·V for forward + backward on every path (2 forward, 2 recompute, 4 for the two
gradient products), so it is proportional to 1 / time and comparable across paths; the materialized
path does only 6·N·H·V of real work. Goal on an H100 (issue 3): >= 500 TFLOP/s forward + backward.
Peak memory: the most allocated during the step minus what was allocated before it (inputs, weights
and their .grad excluded). Writes linear.json under --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

if "--smoke" in sys.argv:  # the interpreter must be chosen before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

VARIANTS = ("gemm", "gemm-fwd", "atomic", "torch", "materialized")
TEMPERATURE = 0.9


def _bench_ms(fn, smoke: bool) -> float:
    if not smoke:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=5, rep=50, return_mode="median"))
    times = []
    for _ in range(2):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return min(times)


def _peak_extra_bytes(fn, device: str) -> int | None:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def _inputs(N, H, V, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(N, H, device=device, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, device=device, generator=g) * H**-0.5 * 2).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), device=device, generator=g)
    return hidden, weight, labels


def _path(variant: str, chunk: int | None = None):
    """fn(hidden, weight, labels) -> log-probs (N,) for one variant."""
    if variant == "materialized":

        def materialized(hidden, weight, labels):
            logits = torch.nn.functional.linear(hidden, weight)  # (N, V) in the input dtype
            return torch.log_softmax(logits.float() / TEMPERATURE, -1).gather(-1, labels[:, None])[:, 0]

        return materialized
    from rlaif_fast.ops.linear import linear_token_logprobs

    backend, forward, backward = {
        "torch": ("torch", None, None),
        "gemm-fwd": ("triton", "gemm", "gemm"),
    }.get(variant, ("triton", "fused", variant))

    def ours(hidden, weight, labels):
        os.environ["RLAIF_FAST_BACKEND"] = backend  # read per call by select_backend
        return linear_token_logprobs(
            hidden,
            weight,
            labels,
            temperature=TEMPERATURE,
            forward=forward,
            backward=backward,
            chunk_size=chunk,
        )

    return ours


def _step(fn, hidden, weight, labels):
    hidden.grad = weight.grad = None
    fn(hidden, weight, labels).sum().backward()


def check_correct(N, H, V, dtype, device, variants) -> dict:
    """Every path vs fp32 full logits, against eager in the same dtype: the tolerance rule, reduced size."""
    h, w, y = _inputs(N, H, V, dtype, device, seed=1)
    out, grads = {}, {}
    for name, cast in [(v, dtype) for v in variants if v != "materialized"] + [
        ("eager", dtype),
        ("fp32", None),
    ]:
        hh = h.detach().float().requires_grad_() if cast is None else h.detach().clone().requires_grad_()
        ww = w.detach().float().requires_grad_() if cast is None else w.detach().clone().requires_grad_()
        lp = _path("materialized" if name in ("eager", "fp32") else name)(hh, ww, y)
        lp.sum().backward()
        out[name], grads[name] = lp.detach().float(), (hh.grad.float(), ww.grad.float())
    res, ok = {}, True
    for name in out:
        if name == "fp32":
            continue
        res[f"{name}_err_logp"] = (out[name] - out["fp32"]).abs().max().item()
        res[f"{name}_err_dh"] = (grads[name][0] - grads["fp32"][0]).abs().max().item()
        res[f"{name}_err_dw"] = (grads[name][1] - grads["fp32"][1]).abs().max().item()
    for name in out:
        if name in ("eager", "fp32"):
            continue
        good = bool((out[name] <= 0).all())
        for key in ("logp", "dh", "dw"):  # no worse than eager in the same dtype (+ a small slack)
            good &= res[f"{name}_err_{key}"] <= res[f"eager_err_{key}"] * 1.5 + 1e-5
        res[f"{name}_ok"] = good
        ok &= good
    res["ok"] = ok
    return res


def time_variant(fn, hidden, weight, labels, flops, device, smoke) -> dict:
    _step(fn, hidden, weight, labels)  # compile / warm up
    ms = _bench_ms(lambda: _step(fn, hidden, weight, labels), smoke)
    with torch.no_grad():
        ms_fwd = _bench_ms(lambda: fn(hidden, weight, labels), smoke)
    return {
        "fwd_bwd_ms": ms,
        "fwd_ms": ms_fwd,
        "bwd_ms": ms - ms_fwd,
        "fwd_bwd_tflops": flops / ms / 1e9,
        "fwd_tflops": flops / 4 / ms_fwd / 1e9,
        "peak_extra_bytes": _peak_extra_bytes(lambda: _step(fn, hidden, weight, labels), device),
    }


def run(N, H, V, dtype, device, smoke, variants, chunks) -> dict:
    hidden, weight, labels = _inputs(N, H, V, dtype, device)
    flops = 8 * N * H * V
    res = {"N": N, "H": H, "V": V, "dtype": str(dtype).replace("torch.", ""), "paths": {}}
    for variant in variants:
        for chunk in chunks if variant.startswith("gemm") else [None]:
            name = variant if chunk is None else f"{variant}/chunk={chunk}"
            try:
                res["paths"][name] = time_variant(
                    _path(variant, chunk), hidden, weight, labels, flops, device, smoke
                )
            except torch.OutOfMemoryError as err:  # report and go on: the other paths still tell
                res["paths"][name] = {"error": f"out of memory: {err}".splitlines()[0]}
                torch.cuda.empty_cache()
            except Exception as err:  # noqa: BLE001 - e.g. triton's OutOfResources for a --blocks choice
                if type(err).__name__ != "OutOfResources":
                    raise
                res["paths"][name] = {"error": f"out of resources: {err}".splitlines()[0]}
    return res


def accounting(N, H, V, elem=2, gemm_chunk=None, torch_chunk=None, bn=64, bv=128) -> dict:
    """Analytic FLOPs and memory traffic (bytes) of each backward, forward excluded.

    Traffic counts every operand read once and every output written once per kernel: a floor for the
    library GEMMs (their tiles hit L2), and for the atomic kernel the traffic into L2, where the fp32
    atomics resolve (HBM sees it only as far as the (N, H) and (V, H) accumulators miss L2)."""
    NV, NH, VH = N * V, N * H, V * H
    gc = gemm_chunk or max(1, (1 << 28) // V)
    tc = torch_chunk or max(1, (1 << 23) // V)
    g_chunks, t_chunks = math.ceil(N / gc), math.ceil(N / tc)
    gemm = {
        "flops": 6 * N * H * V,
        # U: GEMM writes 4 B, epilogue reads 4 B and writes dU (elem), two GEMMs read dU
        "logit_bytes": NV * (4 + 4 + 3 * elem),
        # W read by the recompute and the d hidden GEMM, once per chunk; h and d hidden once
        "operand_bytes": 2 * g_chunks * VH * elem + 2 * NH * elem + NH * elem,
        # d W fp32: zeroed once, read + written by every chunk's beta = 1 GEMM
        "accumulator_bytes": VH * 4 + g_chunks * VH * 8,
        "chunk_tokens": gc,
        "dw_flop_per_byte": 2 * gc * H * V / (VH * 8 + gc * (V + H) * elem),
    }
    n_tiles, v_tiles = math.ceil(N / bn), math.ceil(V / bv)
    atomic = {
        "flops": 6 * N * H * V,
        "logit_bytes": 0,  # logits never leave registers
        # every (token tile, vocabulary tile) program reads its h rows and W rows twice (recompute, products)
        "operand_bytes": 2 * (v_tiles * NH + n_tiles * VH) * elem,
        # fp32 read-modify-write: d hidden gets V / bv partial sums per element, d weight N / bn
        "accumulator_bytes": (v_tiles * NH + n_tiles * VH) * 8 + (NH + VH) * 4,
        "atomic_adds": v_tiles * NH + n_tiles * VH,
    }
    acc = 4
    torch_path = {
        "flops": 6 * N * H * V,  # in fp32 (W upcast): no bf16 tensor cores
        # z write, -lse, exp, ·(−g) in place (read + write each), two GEMMs read dz
        "logit_bytes": NV * acc * (1 + 2 + 2 + 2 + 2),
        "operand_bytes": VH * (elem + acc) + 2 * t_chunks * VH * acc + 2 * NH * acc,
        "accumulator_bytes": VH * acc + t_chunks * VH * 8,
        "chunk_tokens": tc,
    }
    materialized = {
        "flops": 4 * N * H * V,  # no recompute: the forward kept the logits
        # backward of gather, log_softmax (reads out + grad, writes), /T, .float(), then two GEMMs read dZ
        "logit_bytes": NV * (4 + 4 + 4 + 4 + 4 + 4 + elem + 2 * elem),
        "operand_bytes": 2 * (VH + NH) * elem + (NH + VH) * elem,
        "accumulator_bytes": 0,
    }
    out = {"gemm": gemm, "atomic": atomic, "torch": torch_path, "materialized": materialized}
    for row in out.values():
        row["bytes"] = row["logit_bytes"] + row["operand_bytes"] + row["accumulator_bytes"]
    return out


def print_accounting(N, H, V, chunk=None) -> dict:
    acc = accounting(N, H, V, gemm_chunk=chunk)
    print(f"backward only, N={N} H={H} V={V} bf16; floor ms at 989 TFLOP/s and 3.35 TB/s (H100 SXM)")
    print("| backward | TFLOP | logit GB | operand GB | accumulator GB | total GB | compute ms | memory ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in acc.items():
        print(f"| {name} | {r['flops'] / 1e12:.1f} | {r['logit_bytes'] / 1e9:.1f} | {r['operand_bytes'] / 1e9:.1f} | "
              f"{r['accumulator_bytes'] / 1e9:.1f} | {r['bytes'] / 1e9:.1f} | {r['flops'] / 989e9:.1f} | "
              f"{r['bytes'] / 3.35e9:.1f} |")  # fmt: skip
    return acc


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_out")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU through the Triton interpreter")
    p.add_argument("--blocks", default=None, help="BLOCK_N,BLOCK_V,BLOCK_H for the Triton kernels")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    p.add_argument(
        "--chunks", default="", help="tokens per chunk of the gemm backward to sweep (default: auto)"
    )
    p.add_argument("--accounting", action="store_true", help="print the analytic FLOP / byte table and exit")
    a = p.parse_args()
    variants = [v for v in a.variants.split(",") if v]
    if bad := [v for v in variants if v not in VARIANTS]:
        p.error(f"--variants {bad} unknown; choose from {VARIANTS}")
    chunks = [int(c) for c in a.chunks.split(",") if c] or [None]
    if a.accounting:
        print_accounting(8192, 4096, 128256, chunks[0])
        return 0
    if a.blocks:
        os.environ["RLAIF_FAST_LINEAR_BLOCKS"] = a.blocks
    device = "cpu" if a.smoke else "cuda"
    if not a.smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --smoke on CPU")
    dtype = torch.float32 if a.smoke else torch.bfloat16  # the interpreter multiplies bf16 slowly
    small, full = ((48, 64, 300), (64, 64, 517)) if a.smoke else ((1024, 4096, 128256), (8192, 4096, 128256))
    result = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (interpreter)"}
    result["correctness"] = check_correct(*small, dtype, device, variants)
    print("correctness", json.dumps(result["correctness"]))
    if not result["correctness"]["ok"]:
        print("FAILED: a path is less accurate than eager in the same dtype")
    result["accounting"] = accounting(*full)
    result["timing"] = run(*full, dtype, device, a.smoke, variants, chunks)
    from rlaif_fast.ops.linear_gemm import GEMM_FALLBACKS

    result["gemm_fallbacks"] = sorted(GEMM_FALLBACKS)  # cuBLAS out_dtype routes this torch lacked
    if GEMM_FALLBACKS:
        print("slower fallbacks taken by the gemm paths:", result["gemm_fallbacks"])
    t = result["timing"]
    print(f"{result['device']}  N={t['N']} H={t['H']} V={t['V']} {t['dtype']}")
    print("| path | fwd ms | fwd TFLOP/s | bwd ms | fwd+bwd ms | fwd+bwd TFLOP/s | peak extra MiB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in t["paths"].items():
        if "error" in r:
            print(f"| {name} | {r['error']} |")
            continue
        mib = "-" if r["peak_extra_bytes"] is None else f"{r['peak_extra_bytes'] / 2**20:.0f}"
        print(f"| {name} | {r['fwd_ms']:.2f} | {r['fwd_tflops']:.0f} | {r['bwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | "
              f"{r['fwd_bwd_tflops']:.0f} | {mib} |")  # fmt: skip
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "linear.json").write_text(json.dumps(result, indent=1))
    return 0 if result["correctness"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
