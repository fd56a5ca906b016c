"""Log-probs from hidden states on a lent GPU: correctness first, then TFLOP/s and peak memory of
linear_token_logprobs forward + backward, beside the materialized-logits path.

    python benchmarks/gpu/bench_linear.py --out DIR          # N = 8192, H = 4096, V = 128256, bf16
    python benchmarks/gpu/bench_linear.py --blocks 64,256,64 # try other (BLOCK_N, BLOCK_V, BLOCK_H)
    python benchmarks/gpu/bench_linear.py --smoke --out DIR  # tiny CPU run through the Triton interpreter

FLOPs counted: 2·N·H·V forward, 8·N·H·V forward + backward (the backward recomputes the logits, then
two products). Goal on an H100 (issue 3): >= 500 TFLOP/s forward + backward. Peak memory: the most
allocated during the step minus what was allocated before it (inputs and weights excluded).
Writes linear.json under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if "--smoke" in sys.argv:  # the interpreter must be chosen before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ["RLAIF_FAST_BACKEND"] = "triton"

import torch  # noqa: E402


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


def _ours(hidden, weight, labels):
    from rlaif_fast.ops.linear import linear_token_logprobs

    return linear_token_logprobs(hidden, weight, labels, temperature=0.9)


def _materialized(hidden, weight, labels):
    logits = torch.nn.functional.linear(hidden, weight)  # (N, V) in the input dtype
    return torch.log_softmax(logits.float() / 0.9, -1).gather(-1, labels[:, None])[:, 0]


def _step(fn, hidden, weight, labels):
    hidden.grad = weight.grad = None
    fn(hidden, weight, labels).sum().backward()


def check_correct(N, H, V, dtype, device) -> dict:
    """Ours vs fp32 full logits, and bf16 eager vs the same: the tolerance rule at a reduced size."""
    h, w, y = _inputs(N, H, V, dtype, device, seed=1)
    out = {}
    grads = {}
    for name, fn, cast in (
        ("ours", _ours, dtype),
        ("eager", _materialized, dtype),
        ("fp32", _materialized, None),
    ):
        hh = h.detach().float().requires_grad_() if cast is None else h.detach().clone().requires_grad_()
        ww = w.detach().float().requires_grad_() if cast is None else w.detach().clone().requires_grad_()
        lp = fn(hh, ww, y)
        lp.sum().backward()
        out[name], grads[name] = lp.detach().float(), (hh.grad.float(), ww.grad.float())
    res = {}
    for name in ("ours", "eager"):
        res[f"{name}_err_logp"] = (out[name] - out["fp32"]).abs().max().item()
        res[f"{name}_err_dh"] = (grads[name][0] - grads["fp32"][0]).abs().max().item()
        res[f"{name}_err_dw"] = (grads[name][1] - grads["fp32"][1]).abs().max().item()
    ok = bool((out["ours"] <= 0).all())
    for key in ("logp", "dh", "dw"):  # ours no worse than eager in the same dtype (+ a small slack)
        ok &= res[f"ours_err_{key}"] <= res[f"eager_err_{key}"] * 1.5 + 1e-5
    res["ok"] = ok
    return res


def run(N, H, V, dtype, device, smoke) -> dict:
    hidden, weight, labels = _inputs(N, H, V, dtype, device)
    flops = 8 * N * H * V
    res = {"N": N, "H": H, "V": V, "dtype": str(dtype).replace("torch.", "")}
    for name, fn in (("ours", _ours), ("materialized", _materialized)):
        _step(fn, hidden, weight, labels)  # compile / warm up
        ms = _bench_ms(lambda fn=fn: _step(fn, hidden, weight, labels), smoke)
        with torch.no_grad():
            ms_fwd = _bench_ms(lambda fn=fn: fn(hidden, weight, labels), smoke)
        res[name] = {
            "fwd_bwd_ms": ms,
            "fwd_ms": ms_fwd,
            "fwd_bwd_tflops": flops / ms / 1e9,
            "fwd_tflops": flops / 4 / ms_fwd / 1e9,
            "peak_extra_bytes": _peak_extra_bytes(lambda fn=fn: _step(fn, hidden, weight, labels), device),
        }
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_out")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU through the Triton interpreter")
    p.add_argument("--blocks", default=None, help="BLOCK_N,BLOCK_V,BLOCK_H for the Triton kernels")
    a = p.parse_args()
    if a.blocks:
        os.environ["RLAIF_FAST_LINEAR_BLOCKS"] = a.blocks
    device = "cpu" if a.smoke else "cuda"
    if not a.smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --smoke on CPU")
    dtype = torch.float32 if a.smoke else torch.bfloat16  # the interpreter multiplies bf16 slowly
    small, full = ((48, 64, 300), (64, 64, 517)) if a.smoke else ((1024, 4096, 128256), (8192, 4096, 128256))
    result = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (interpreter)"}
    result["correctness"] = check_correct(*small, dtype, device)
    print("correctness", json.dumps(result["correctness"]))
    if not result["correctness"]["ok"]:
        print("FAILED: ours is less accurate than eager in the same dtype")
    result["timing"] = run(*full, dtype, device, a.smoke)
    t = result["timing"]
    print(f"{result['device']}  N={t['N']} H={t['H']} V={t['V']} {t['dtype']}")
    print("| path | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | peak extra MiB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in ("ours", "materialized"):
        r = t[name]
        mib = "-" if r["peak_extra_bytes"] is None else f"{r['peak_extra_bytes'] / 2**20:.0f}"
        print(f"| {name} | {r['fwd_ms']:.2f} | {r['fwd_tflops']:.0f} | {r['fwd_bwd_ms']:.2f} | "
              f"{r['fwd_bwd_tflops']:.0f} | {mib} |")  # fmt: skip
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "linear.json").write_text(json.dumps(result, indent=1))
    return 0 if result["correctness"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
