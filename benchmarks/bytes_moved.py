"""Bytes moved: count every byte a Triton kernel loads and stores, next to eager torch's traffic.

    TRITON_INTERPRET=1 python benchmarks/bytes_moved.py [--n 64 --vocab 32000]

Kernels: the Triton interpreter executes every ``tl.load`` / ``tl.store`` through two builder methods;
``count_bytes`` wraps them and adds up the bytes of every active (unmasked) lane, so a row read twice
counts twice. Eager torch: ``count_eager_bytes`` runs the function under a TorchDispatchMode and adds,
for every aten op, the bytes of its tensor inputs (read) and outputs (written), views excluded — the
traffic an unfused eager op must at least cause. Both are reported as a ratio to the minimum:
forward = read the logits once; backward = read the logits once and write d logits once.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

if __name__ == "__main__":  # the interpreter must be chosen before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402


@contextlib.contextmanager
def _counting_interpreter(totals: dict[str, int]):
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    real_load, real_store = builder.create_masked_load, builder.create_masked_store

    def itemsize(ptrs) -> int:
        return ptrs.get_element_ty().primitive_bitwidth // 8

    def load(self, ptrs, mask, other, *args):
        totals["loaded"] += int(mask.data.sum()) * itemsize(ptrs)
        return real_load(self, ptrs, mask, other, *args)

    def store(self, ptrs, value, mask, *args):
        totals["stored"] += int(mask.data.sum()) * itemsize(ptrs)
        return real_store(self, ptrs, value, mask, *args)

    builder.create_masked_load, builder.create_masked_store = load, store
    try:
        yield
    finally:
        builder.create_masked_load, builder.create_masked_store = real_load, real_store


def count_bytes(fn, *args, **kwargs) -> tuple[int, int]:
    """(bytes loaded, bytes stored) by every Triton kernel ``fn(*args, **kwargs)`` launches.

    Needs TRITON_INTERPRET=1 set before triton is imported, and CPU tensors. Tensor work done by torch
    inside ``fn`` (allocations, small reductions) is not counted: only the kernels' memory operations.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("count_bytes instruments the Triton interpreter: set TRITON_INTERPRET=1 first")
    totals = {"loaded": 0, "stored": 0}
    with _counting_interpreter(totals):
        fn(*args, **kwargs)
    return totals["loaded"], totals["stored"]


class _EagerTraffic(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.read = self.written = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._schema.name
        if func.is_view or name in ("aten::detach", "aten::empty", "aten::empty_like"):
            return out
        written = _nbytes(out)
        if name == "aten::gather":  # reads the index and one element per index, not its whole input
            self.read += _nbytes(args[2]) + written
        else:
            self.read += _nbytes((args, kwargs))
        self.written += written
        return out


def _nbytes(tree) -> int:
    return sum(t.numel() * t.element_size() for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor))


def count_eager_bytes(fn, *args, **kwargs) -> tuple[int, int]:
    """(bytes read, bytes written) by the aten ops ``fn`` runs, from their tensor arguments and results."""
    mode = _EagerTraffic()
    with mode:
        fn(*args, **kwargs)
    return mode.read, mode.written


def _cases(N: int, V: int, dtype: torch.dtype):
    """(name, kernel fn, eager fn, minimum bytes) for every kernel of ops.md."""
    from rlaif_fast.kernels.logprobs import logprobs_backward, logprobs_forward
    from rlaif_fast.kernels.ppo_loss import ppo_forward

    from rlaif_fast.ops.ppo import token_weights

    logits = torch.randn(N, V, dtype=dtype)
    labels = torch.randint(0, V, (N,))
    g = torch.randn(N)
    logp, ent, lse = logprobs_forward(logits, labels, 1.0, -100)
    nbytes = logits.numel() * logits.element_size()
    per_token = dict(
        old_logp=logp + 0.1,
        advantages=g,
        weights=token_weights(torch.ones(N, dtype=torch.bool), "token-mean"),
    )
    ppo_opts = dict(
        temperature=1.0,
        ignore_index=-100,
        clip_eps=0.2,
        clip_eps_high=0.2,
        kl_coef=0.1,
        kl_estimator="k3",
        entropy_coef=0.01,
    )

    def eager_fwd(x):
        lsm = torch.log_softmax(x.float(), -1)
        return lsm.gather(-1, labels.unsqueeze(-1)), -(lsm.exp() * lsm).sum(-1)

    def eager_fwd_bwd(x):
        x = x.detach().requires_grad_()
        lp, h = eager_fwd(x)
        (lp.squeeze(-1) * g + h * g).sum().backward()

    def eager_bwd(x):  # backward alone: total minus forward
        r1, w1 = count_eager_bytes(eager_fwd_bwd, x)
        r0, w0 = count_eager_bytes(eager_fwd, x)
        return r1 - r0, w1 - w0

    # the fused PPO backward is token_logprobs bwd with per-row coefficients: the same kernel
    return [
        (
            "token_logprobs fwd (+entropy)",
            lambda: logprobs_forward(logits, labels, 1.0, -100),
            lambda: count_eager_bytes(eager_fwd, logits),
            nbytes,
        ),
        (
            "token_logprobs bwd",
            lambda: logprobs_backward(logits, labels, g, g, lse, ent, 1.0, -100),
            lambda: eager_bwd(logits),
            2 * nbytes,
        ),
        (
            "ppo_policy_loss fused fwd",
            lambda: ppo_forward(logits, labels, ref_logp=logp, **per_token, **ppo_opts),
            lambda: count_eager_bytes(eager_fwd, logits),
            nbytes,
        ),
    ]


def table(N: int, V: int, dtypes) -> list[str]:
    lines = [
        f"N = {N}, V = {V}; ratio = bytes moved / minimum (fwd: logits read once; bwd: read + write once)",
        "",
        "| kernel | dtype | loaded | stored | Triton ratio | eager torch ratio |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for dtype in dtypes:
        for name, kernel, eager, minimum in _cases(N, V, dtype):
            loaded, stored = count_bytes(kernel)
            e_read, e_written = eager()
            lines.append(
                f"| {name} | {str(dtype).replace('torch.', '')} | {loaded:,} | {stored:,} | "
                f"{(loaded + stored) / minimum:.4f} | {(e_read + e_written) / minimum:.2f} |"
            )
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print("\n".join(table(args.n, args.vocab, (torch.float32, torch.bfloat16))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
