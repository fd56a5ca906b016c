"""``rlaif-fast bench``: a small CPU table (time, peak extra memory) of token_logprobs against eager torch.

Peak extra memory is measured from the CPU allocator itself: torch.profiler with ``profile_memory=True``
records every c10 allocation and free during the call (kernel-internal temporaries included, e.g. the
[N, V] buffer inside ``torch.logsumexp``); the peak of the running sum is the most memory the call held
beyond what existed before it (its outputs included, its inputs not).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch


def peak_memory(fn: Callable[[], object]) -> int:
    """Peak bytes allocated (net of frees) by the CPU allocator while ``fn()`` runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocation = torch._C._profiler._EventType.Allocation
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))  # frees are negative
        stack.extend(node.children)
    current = peak = 0
    for _, size in sorted(events):
        current += size
        peak = max(peak, current)
    return peak


def best_time(fn: Callable[[], object], repeat: int = 3) -> float:
    """Minimum wall time of ``repeat`` calls after one warm-up (the least noisy statistic on a shared box)."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def eager_logprobs_entropy(logits: torch.Tensor, labels: torch.Tensor):
    """What most RLHF code does: a full log_softmax, a gather, and the entropy from the same [N, V] copy."""
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    logp = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return logp, -(logp_all.exp() * logp_all).sum(-1)


def candidates() -> dict[str, Callable]:
    from rlaif_fast._backend import select_backend
    from rlaif_fast.ops.logprobs import token_logprobs

    def ours(x, y):
        return token_logprobs(x, y, return_entropy=True)

    # the op's own backend choice (RLAIF_FAST_BACKEND may force triton or reference): the row says which ran
    path = select_backend(torch.empty(0))
    return {f"rlaif_fast ({path} path)": ours, "eager torch": eager_logprobs_entropy}


def run_case(fn, logits, labels, with_grad: bool, repeat: int):
    def call():
        if not with_grad:
            with torch.no_grad():
                return fn(logits, labels)
        x = logits.detach().requires_grad_()
        logp, ent = fn(x, labels)
        (logp.sum() + ent.sum()).backward()
        return x.grad

    return best_time(call, repeat), peak_memory(call)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlaif-fast bench", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1024, help="rows (tokens), N")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size, V")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument(
        "--grad", action="store_true", help="time forward + backward instead of no-grad forward"
    )
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    if args.n < 1 or args.vocab < 1 or args.repeat < 1:
        parser.error(f"--n, --vocab and --repeat must be >= 1, got {args.n}, {args.vocab}, {args.repeat}")

    torch.manual_seed(0)
    logits = torch.randn(args.n, args.vocab, dtype=getattr(torch, args.dtype))
    labels = torch.randint(0, args.vocab, (args.n,))
    mode = "forward + backward" if args.grad else "no-grad forward"
    mib = 2**20
    print(
        f"token_logprobs + entropy, N={args.n} V={args.vocab} {args.dtype}, {mode}, "
        f"{torch.get_num_threads()} threads; logits = {logits.numel() * logits.element_size() / mib:.0f} MiB"
    )
    print(f"{'implementation':<28} {'time (ms)':>10} {'peak extra (MiB)':>17}")
    for name, fn in candidates().items():
        seconds, peak = run_case(fn, logits, labels, args.grad, args.repeat)
        print(f"{name:<28} {seconds * 1e3:>10.1f} {peak / mib:>17.1f}")
    return 0
