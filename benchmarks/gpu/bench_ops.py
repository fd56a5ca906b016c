"""Logits-side ops on a lent GPU: correctness at full size, then bandwidth with triton.testing.do_bench.

    python benchmarks/gpu/bench_ops.py                  # N = 8192, V in 32000 128256 152064, bf16
    python benchmarks/gpu/bench_ops.py --out DIR        # also write DIR/ops.json (run.sh passes $OUT)
    TRITON_INTERPRET=1 python benchmarks/gpu/bench_ops.py --smoke   # tiny CPU run of every code path

Reported per vocabulary: a measured device copy of the logits (the practical bandwidth ceiling), then
- token_logprobs, no grad, with entropy: minimum traffic = read the logits once;
- fused PPO loss, forward + backward: minimum = read once (fwd) + read once and write d logits (bwd);
each as median ms and GB/s of minimum traffic, and as a fraction of the copy's GB/s.
Goals on an H100 (issue 2): log-prob + entropy at V = 152064 <= 0.85 ms; PPO fwd + bwd <= 2.5 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if "--smoke" in sys.argv:  # the interpreter must be chosen before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402


def _bench(fn, smoke: bool) -> float:
    """Median milliseconds of fn()."""
    if not smoke:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[1]


def _check_correct(logits, labels, temperature: float) -> dict[str, float]:
    """Triton vs an fp32 torch reference, chunked over rows (a full fp32 copy may not fit)."""
    from rlaif_fast.kernels.logprobs import logprobs_forward

    logp, ent, _ = logprobs_forward(logits, labels, temperature, -100)
    err_lp = err_h = 0.0
    rows = max(1, 2**28 // (4 * logits.shape[-1]))
    for s in range(0, logits.shape[0], rows):
        lsm = torch.log_softmax(logits[s : s + rows].float() / temperature, dim=-1)
        want_lp = lsm.gather(-1, labels[s : s + rows].unsqueeze(-1)).squeeze(-1)
        want_h = -(lsm.exp() * lsm).sum(-1)
        err_lp = max(err_lp, (logp[s : s + rows] - want_lp).abs().max().item())
        err_h = max(err_h, (ent[s : s + rows] - want_h).abs().max().item())
    if not (err_lp < 1e-3 and err_h < 1e-2 and bool((logp <= 0).all())):
        raise AssertionError(
            f"token_logprobs disagrees with fp32 torch: |d logp| {err_lp:.2e}, |d H| {err_h:.2e}"
        )
    return {"max_abs_err_logp": err_lp, "max_abs_err_entropy": err_h}


def run_vocab(N: int, V: int, dtype: torch.dtype, device: str, smoke: bool) -> dict:
    from rlaif_fast.ops import ppo_policy_loss, token_logprobs

    torch.manual_seed(0)
    logits = (torch.randn(N, V, device=device) * 2).to(dtype)
    labels = torch.randint(0, V, (N,), device=device)
    nbytes = logits.numel() * logits.element_size()
    result = {"N": N, "V": V, "dtype": str(dtype).replace("torch.", "")}
    result.update(_check_correct(logits, labels, 0.9))

    dst = torch.empty_like(logits)
    t_copy = _bench(lambda: dst.copy_(logits), smoke)
    with torch.no_grad():
        t_lp = _bench(lambda: token_logprobs(logits, labels, temperature=0.9, return_entropy=True), smoke)

    old = torch.randn(1, N, device=device) - 5.0
    adv = torch.randn(1, N, device=device)
    mask = torch.ones(1, N, dtype=torch.bool, device=device)
    x = logits.view(1, N, V).requires_grad_()

    def ppo_step():
        x.grad = None
        loss, _ = ppo_policy_loss(
            x, labels.view(1, N), old, adv, mask, ref_logp=old, kl_coef=0.05, entropy_coef=0.01
        )
        loss.backward()

    t_ppo = _bench(ppo_step, smoke)
    copy_gbs = 2 * nbytes / t_copy / 1e6
    for name, ms, traffic in (("token_logprobs", t_lp, nbytes), ("ppo_fwd_bwd", t_ppo, 3 * nbytes)):
        gbs = traffic / ms / 1e6
        result[name] = {"ms": ms, "GB/s": gbs, "of_copy": gbs / copy_gbs}
    result["copy"] = {"ms": t_copy, "GB/s": copy_gbs}
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes on CPU tensors under the interpreter"
    )
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256, 152064])
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--out", help="directory to write ops.json into")
    args = parser.parse_args(argv)
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("--smoke runs the kernels on CPU: set TRITON_INTERPRET=1 before triton is imported")
        args.n, args.vocab, device = 8, [257, 1000], "cpu"
    elif not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or use --smoke for a CPU check of the script")
    else:
        device = "cuda"
    dtype = getattr(torch, args.dtype)
    saved = os.environ.get("RLAIF_FAST_BACKEND")
    os.environ["RLAIF_FAST_BACKEND"] = "triton"  # the kernels are what is measured, on CPU too (smoke)
    try:
        results = [run_vocab(args.n, V, dtype, device, args.smoke) for V in args.vocab]
    finally:
        if saved is None:
            del os.environ["RLAIF_FAST_BACKEND"]
        else:
            os.environ["RLAIF_FAST_BACKEND"] = saved
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter smoke run)"
    print(f"{name}, N = {args.n}, {args.dtype}; GB/s of minimum traffic, fraction of a device copy")
    print("| V | copy GB/s | token_logprobs ms | GB/s | of copy | PPO fwd+bwd ms | GB/s | of copy |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        lp, ppo = r["token_logprobs"], r["ppo_fwd_bwd"]
        print(
            f"| {r['V']} | {r['copy']['GB/s']:.0f} | {lp['ms']:.3f} | {lp['GB/s']:.0f} | {lp['of_copy']:.2f} "
            f"| {ppo['ms']:.3f} | {ppo['GB/s']:.0f} | {ppo['of_copy']:.2f} |"
        )
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "ops.json"), "w") as f:
            json.dump({"device": name, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
