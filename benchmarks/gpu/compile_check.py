"""Compile every Triton kernel of ``kernels/`` for real GPUs (sm_90 = H100, sm_80 = A100) on a machine
without one, and report registers, spills and shared memory per kernel.

The tests run the kernels through the interpreter (TRITON_INTERPRET=1), which never runs the real
compiler: a kernel that fails to lower, overflows shared memory or spills registers on a GPU passes
them all. This script closes that gap with the ptxas that ships inside triton's wheel.

How the launches are captured: each public launcher of ``rlaif_fast.kernels`` is called at the sizes
of the GPU goals (N = 8192 tokens, V = 32000 / 128256 / 152064, H = 4096; GAE and KL at B = 256,
T = 1024) on shape-only tensors (the ``meta`` device, in a subclass that answers ``is_cuda = True``), so
every launcher takes its CUDA branch (block sizes, ``num_warps``, no interpreter upcasts) and allocates
nothing. ``JITFunction.run`` is replaced while they run: it records the kernel, the arguments, the
constexprs and the launch options instead of launching. Each recorded launch is then specialized with
triton's own binder for a CUDA target, exactly as a launch on that GPU would be (argument types, 16-byte
divisibility of pointers and integers, default ``num_stages``), and compiled with ``triton.compile``.
Pointer alignment is taken from the storage offset (the CUDA caching allocator hands out 512-byte
aligned blocks), so a chunk slice that starts off a 16-byte boundary compiles as it would run.

    python benchmarks/gpu/compile_check.py                       # every kernel, sm_90 and sm_80
    python benchmarks/gpu/compile_check.py --out gpu_out         # also write gpu_out/compile.json
    python benchmarks/gpu/compile_check.py --only gae,logprobs_fwd --targets 90 --dtypes bf16

FAIL (exit 1): a compile error, shared memory above the per-block limit (sm_90: 232448 bytes,
sm_80: 166912 bytes), or a ``@triton.jit`` kernel of ``kernels/`` that no case launches (a new kernel
needs a case here). WARN: any register spill. Registers and spills come from ``ptxas -v`` (what
``CompiledKernel.n_regs`` / ``n_spills`` would read back from the driver; n_spills = local bytes / 4).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import io
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# The real compiler, never the interpreter; a private, empty cache so every kernel is compiled (and
# timed, and its ptxas log read) on every run. Both must be set before triton is first imported.
os.environ["TRITON_INTERPRET"] = "0"
_CACHE_DIR = tempfile.mkdtemp(prefix="rlaif_compile_check_")
os.environ["TRITON_CACHE_DIR"] = _CACHE_DIR
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, without its warning

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

# Per-block shared memory limits (opt-in maximum of cudaFuncSetAttribute) and per-SM resources.
SMEM_BLOCK_LIMIT = {90: 232448, 80: 166912}
SMEM_SM = {90: 233472, 80: 167936}
SMEM_RESERVED_PER_CTA = 1024
REGS_SM, MAX_WARPS_SM, MAX_CTAS_SM = 65536, 64, 32
GPU_NAME = {90: "sm_90 (H100)", 80: "sm_80 (A100)"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# goal sizes (issues 2 and 3, benchmarks/gpu/bench_ops.py, bench_linear.py, bench_gae.py)
N_TOKENS, HIDDEN = 8192, 4096
VOCABS = (32000, 128256, 152064)
RL_B, RL_T = 256, 1024


# ---------------------------------------------------------------------------------------------------
# shape-only "CUDA" tensors and launch recording


class _CudaShaped(torch.Tensor):
    """A meta tensor that says it lives on CUDA: launchers take their GPU branch, nothing is allocated."""

    @property
    def is_cuda(self) -> bool:  # noqa: D102
        return True


def _t(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.Tensor._make_subclass(_CudaShaped, torch.empty(shape, dtype=dtype, device="meta"))


@dataclasses.dataclass
class Launch:
    fn: JITFunction
    args: tuple
    kwargs: dict
    grid: tuple


@contextlib.contextmanager
def _recording(out: list[Launch]):
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        out.append(Launch(self, args, dict(kwargs), tuple(grid) if not callable(grid) else grid))
        return None

    JITFunction.run = record
    try:
        yield
    finally:
        JITFunction.run = original


class _ArgPtr:
    """What triton's binder reads of a tensor argument: its dtype and the address (for 16-byte alignment)."""

    def __init__(self, t: torch.Tensor):
        self.dtype = t.dtype
        self._ptr = (1 << 20) + t.storage_offset() * t.element_size()  # allocator blocks: 512-byte aligned

    def data_ptr(self) -> int:
        return self._ptr


def _as_arg(x):
    return _ArgPtr(x) if isinstance(x, torch.Tensor) else x


# ---------------------------------------------------------------------------------------------------
# cases: every launcher at the goal sizes, in the dtypes users run


@dataclasses.dataclass
class Case:
    name: str  # the kernel's report name; --only matches it and the @triton.jit function's name
    dtype: str
    sizes: dict
    run: Callable[[], None]


def _cases() -> list[Case]:
    from rlaif_fast.kernels import advantages, kl, linear_logprobs, logprobs, ppo_loss

    cases: list[Case] = []
    f32, i64 = torch.float32, torch.int64
    rl_sizes = {"B": RL_B, "T": RL_T}

    # --- GAE (ops.gae_advantages): rewards / values in the user's dtype, bool mask, fp32 out
    for dn, dt in DTYPES.items():

        def gae(dt=dt):
            r, v, m = _t(RL_B, RL_T, dtype=dt), _t(RL_B, RL_T, dtype=dt), _t(RL_B, RL_T, dtype=torch.bool)
            advantages.gae(r, v, m, 1.0, 0.95, f32)

        cases.append(Case("gae", dn, rl_sizes, gae))

    # --- KL penalty forward / backward and KL-shaped rewards: every estimator, with and without clamp in
    # fp32; the default estimators (k1 for kl_penalty / shaped rewards, k3 for PPO) in bf16 and fp16.
    kl_variants = [("fp32", est, clamp) for est in kl.ESTIMATOR_CODE for clamp in (None, 10.0)]
    kl_variants += [(dn, est, None) for dn in ("bf16", "fp16") for est in ("k1", "k3")]
    for dn, est, clamp in kl_variants:
        dt = DTYPES[dn]
        tag = {"est": est, "clamp": clamp is not None}

        def kl_fwd(dt=dt, est=est, clamp=clamp):
            kl.kl_forward(_t(RL_B, RL_T, dtype=dt), _t(RL_B, RL_T, dtype=dt), est, clamp, f32)

        def kl_bwd(dt=dt, est=est, clamp=clamp):
            for need_dref in (True, False):
                g = _t(RL_B, RL_T, dtype=f32)  # grad.to(_compute_dtype(...)) in ops.kl
                kl.kl_backward(g, _t(RL_B, RL_T, dtype=dt), _t(RL_B, RL_T, dtype=dt), est, clamp, need_dref)

        def shaped(dt=dt, est=est, clamp=clamp):
            lp, rf = _t(RL_B, RL_T, dtype=dt), _t(RL_B, RL_T, dtype=dt)
            m = _t(RL_B, RL_T, dtype=torch.bool)
            kl.shaped_rewards(_t(RL_B, dtype=dt), lp, rf, m, 0.05, est, clamp, f32)

        cases.append(Case("kl_fwd", dn, rl_sizes | tag, kl_fwd))
        cases.append(Case("kl_bwd", dn, rl_sizes | tag, kl_bwd))
        cases.append(Case("kl_shaped_rewards", dn, rl_sizes | tag, shaped))

    # --- token log-probs from logits (ops.token_logprobs): (B, T, V) logits, N = B·T = 8192 rows
    B, T = 8, N_TOKENS // 8
    for dn, dt in DTYPES.items():
        for V in VOCABS:
            sizes = {"N": N_TOKENS, "V": V}

            def lp_fwd(dt=dt, V=V):
                logprobs.logprobs_forward(_t(B, T, V, dtype=dt), _t(B, T, dtype=i64), 1.0, -100)

            def lp_bwd(dt=dt, V=V):
                x, y = _t(B, T, V, dtype=dt), _t(B, T, dtype=i64)
                g, lse, ent = _t(B, T, dtype=f32), _t(N_TOKENS, dtype=f32), _t(N_TOKENS, dtype=f32)
                for g_ent in (g, None):  # entropy in the loss or not (PPO with entropy_coef = 0)
                    logprobs.logprobs_backward(x, y, g, g_ent, lse, ent, 1.0, -100)

            cases.append(Case("logprobs_fwd", dn, sizes, lp_fwd))
            cases.append(Case("logprobs_bwd", dn, sizes, lp_bwd))

            # --- fused PPO loss forward (its backward is logprobs_bwd): no reference, and every KL kind
            kinds = [None, *kl.ESTIMATOR_CODE] if dn == "bf16" else [None, "k3"]
            for kind in kinds:

                def ppo(dt=dt, V=V, kind=kind):
                    x, y = _t(B, T, V, dtype=dt), _t(B, T, dtype=i64)
                    per_tok = [_t(B, T, dtype=f32) for _ in range(3)]
                    ref = _t(B, T, dtype=f32) if kind else None
                    ppo_loss.ppo_forward(
                        x, y, *per_tok, ref, temperature=1.0, ignore_index=-100, clip_eps=0.2,
                        clip_eps_high=0.28, kl_coef=0.05, kl_estimator=kind or "k3", entropy_coef=0.01,
                    )  # fmt: skip

                cases.append(Case("ppo_fwd", dn, sizes | {"kl": kind or "-"}, ppo))

    # --- log-probs from hidden states (ops.linear_token_logprobs): hidden (N, H), weight (V, H)
    L = linear_logprobs
    from rlaif_fast.ops import linear_gemm as G

    lin_variants = [("bf16", ent, cap, False) for ent in (True, False) for cap in (None, 30.0)]
    lin_variants += [("bf16", True, None, True), ("fp16", True, None, False), ("fp32", True, None, False)]
    for dn, ent, cap, bias in lin_variants:
        dt = DTYPES[dn]
        tag = {"entropy": ent, "softcap": cap is not None, "bias": bias}
        for V in VOCABS:
            sizes = {"N": N_TOKENS, "H": HIDDEN, "V": V} | tag

            def inputs(dt=dt, V=V, bias=bias):
                h, w = _t(N_TOKENS, HIDDEN, dtype=dt), _t(V, HIDDEN, dtype=dt)
                return h, w, (_t(V, dtype=dt) if bias else None), _t(N_TOKENS, dtype=i64)

            kw = dict(temperature=1.0, ignore_index=-100, softcap=cap, scale=1.0)

            def grads(ent=ent):
                lse, g = _t(N_TOKENS, dtype=f32), _t(N_TOKENS, dtype=f32)
                return (
                    lse,
                    (_t(N_TOKENS, dtype=f32) if ent else None),
                    g,
                    (_t(N_TOKENS, dtype=f32) if ent else None),
                )

            def fused_fwd(inputs=inputs, kw=kw, ent=ent):
                L.linear_logprobs_fwd(*inputs(), entropy=ent, **kw)

            def gemm_fwd(inputs=inputs, kw=kw, ent=ent):
                G.linear_logprobs_fwd_gemm(*inputs(), entropy=ent, **kw)

            def atomic_bwd(inputs=inputs, kw=kw, grads=grads):
                L.linear_logprobs_bwd(*inputs(), *grads(), **kw)

            def gemm_bwd(inputs=inputs, kw=kw, grads=grads):
                G.linear_logprobs_bwd_gemm(*inputs(), *grads(), **kw)

            cases.append(Case("linear_fwd", dn, sizes, fused_fwd))
            cases.append(Case("linear_fwd_gemm", dn, sizes, gemm_fwd))
            cases.append(Case("linear_bwd_atomic", dn, sizes, atomic_bwd))
            cases.append(Case("linear_bwd_gemm", dn, sizes, gemm_bwd))
    return cases


# ---------------------------------------------------------------------------------------------------
# specialization and compilation


@dataclasses.dataclass
class Spec:
    """One unique compilation: a kernel, a target, its signature / constexprs / attributes / options."""

    case: str
    kernel: str
    fn: JITFunction
    target: int
    dtypes: list[str]  # the input dtypes whose launches compile to this (the GEMM epilogues see fp32 only)
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    sizes: list[dict] = dataclasses.field(default_factory=list)
    grids: list[tuple] = dataclasses.field(default_factory=list)


def _runtime_kwargs(fn: JITFunction, kwargs: dict) -> dict:
    """The options JITFunction.run adds before binding (debug, instrumentation), where this triton has them."""
    out = dict(kwargs)
    knobs = triton.knobs
    out.setdefault("debug", getattr(fn, "debug", None) or knobs.runtime.debug)
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, name):
            out.setdefault(name, getattr(knobs.compilation, name))
    return out


def _specialize(launch: Launch, cc: int):
    """(signature, constexprs, attrs, options) of this launch on a CUDA device of capability cc, from
    triton's own binder: what JITFunction.run computes before it compiles."""
    target = GPUTarget("cuda", cc, 32)
    backend = make_backend(target)
    fn = launch.fn
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    args = [_as_arg(a) for a in launch.args]
    kwargs = _runtime_kwargs(fn, {k: _as_arg(v) for k, v in launch.kwargs.items()})
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return target, signature, constexprs, attrs, options


def _short(v) -> str:
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, triton.language.dtype):
        return {"fp32": "fp32", "fp64": "fp64"}.get(str(v), str(v))
    return str(v)


def _constexpr_names(spec: Spec) -> dict[str, str]:
    names = [p.name for p in spec.fn.params]
    return {names[path[0]]: _short(val) for path, val in spec.constexprs.items() if len(path) == 1}


_PTXAS_PATTERNS = {
    "regs": r"Used (\d+) registers",
    "stack": r"(\d+) bytes stack frame",
    "spill_stores": r"(\d+) bytes spill stores",
    "spill_loads": r"(\d+) bytes spill loads",
    "static_smem": r"(\d+) bytes smem",
}


def _parse_ptxas(log: str, name: str) -> dict[str, int] | None:
    """Resource usage of entry function ``name`` from a ``ptxas -v`` log."""
    start = log.find(f"Compiling entry function '{name}'")
    if start < 0:
        return None
    chunk = log[start:]
    nxt = chunk.find("Compiling entry function", 10)
    chunk = chunk if nxt < 0 else chunk[:nxt]
    out = {}
    for key, pat in _PTXAS_PATTERNS.items():
        m = re.search(pat, chunk)
        out[key] = int(m.group(1)) if m else 0
    return out if re.search(_PTXAS_PATTERNS["regs"], chunk) else None


def _cuobjdump_usage(cubin: bytes) -> dict[str, int] | None:
    """Fallback when this triton prints no ptxas log: REG / LOCAL / SHARED from ``cuobjdump -res-usage``."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin", dir=_CACHE_DIR, delete=False) as f:
        f.write(cubin)
    text = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
    grab = lambda key: int(m.group(1)) if (m := re.search(rf"{key}:(\d+)", text)) else 0
    if "REG:" not in text:
        return None
    local = grab("LOCAL")
    return {
        "regs": grab("REG"),
        "stack": local,
        "spill_stores": local,
        "spill_loads": local,
        "static_smem": grab("SHARED"),
    }  # fmt: skip  (conservative: may count reserved shared memory)


def _mma_kind(asm: dict) -> str:
    """How the tl.dot of a kernel lowered: wgmma (sm_90 tensor cores), mma.sync (sm_80 tensor cores) or
    fma (no tensor cores: fp32 operands with input_precision="ieee"); "-" for kernels without a dot."""
    if "tt.dot" not in str(asm.get("ttir", "")):
        return "-"
    ptx = str(asm.get("ptx", ""))
    return "wgmma" if "wgmma.mma_async" in ptx else ("mma.sync" if "mma.sync" in ptx else "fma")


def _ctas_per_sm(regs: int, num_warps: int, shared: int, cc: int) -> int:
    """Resident CTAs per SM allowed by registers (allocated per warp in units of 256), shared memory and
    the warp / CTA caps: a rough occupancy figure for latency hiding."""
    regs_per_warp = ((max(regs, 1) * 32 + 255) // 256) * 256
    by_regs = (REGS_SM // regs_per_warp) // num_warps
    by_smem = SMEM_SM[cc] // (shared + SMEM_RESERVED_PER_CTA)
    return max(0, min(by_regs, by_smem, MAX_WARPS_SM // num_warps, MAX_CTAS_SM))


def _compile(spec: Spec) -> dict:
    row = {
        "kernel": spec.case,
        "function": spec.kernel,
        "target": f"sm_{spec.target}",
        "dtype": "/".join(spec.dtypes),
        "signature": spec.signature,
        "constexprs": _constexpr_names(spec),
        "num_warps": spec.options["num_warps"],
        "num_stages": spec.options["num_stages"],
        "sizes": spec.sizes,
        "grid": [list(g) for g in spec.grids if not callable(g)][:1],
        "divisibility_16": [p.name for i, p in enumerate(spec.fn.params) if spec.attrs.get((i,))],
    }
    src = ASTSource(spec.fn, spec.signature, spec.constexprs, spec.attrs)
    log = io.StringIO()
    knobs = triton.knobs
    start = time.perf_counter()
    try:
        old = knobs.nvidia.dump_ptxas_log
        knobs.nvidia.dump_ptxas_log = True
        try:
            with contextlib.redirect_stdout(log):
                compiled = triton.compile(
                    src, target=GPUTarget("cuda", spec.target, 32), options=spec.options
                )
        finally:
            knobs.nvidia.dump_ptxas_log = old
    except Exception as e:  # noqa: BLE001 - every compile error is a reported FAIL, not a crash
        msg = f"{type(e).__name__}: {e}".strip().splitlines()
        return row | {"status": "FAIL", "problems": ["compile error: " + (msg[0] if msg else type(e).__name__)],
                      "error": "\n".join(msg[:40]), "compile_s": time.perf_counter() - start}  # fmt: skip
    row["compile_s"] = time.perf_counter() - start
    usage = _parse_ptxas(log.getvalue(), compiled.metadata.name) or _cuobjdump_usage(compiled.asm["cubin"])
    problems, warnings = [], []
    if usage is None:
        problems.append("no register report (neither a ptxas -v log nor cuobjdump)")
        usage = dict.fromkeys(_PTXAS_PATTERNS, 0)
    shared = int(compiled.metadata.shared) + usage["static_smem"]
    limit = SMEM_BLOCK_LIMIT[spec.target]
    if shared > limit:
        problems.append(f"shared memory {shared} B > {limit} B per block on sm_{spec.target}")
    if usage["spill_stores"] or usage["spill_loads"] or usage["stack"]:
        warnings.append(
            f"spills: {usage['spill_stores']} B stores, {usage['spill_loads']} B loads, {usage['stack']} B stack"
        )
    row |= {
        "mma": _mma_kind(compiled.asm),
        "n_regs": usage["regs"],
        "n_spills": usage["stack"] // 4,  # as CompiledKernel.n_spills: local bytes / 4
        "spill_store_bytes": usage["spill_stores"],
        "spill_load_bytes": usage["spill_loads"],
        "shared_bytes": shared,
        "shared_limit_bytes": limit,
        "ctas_per_sm": _ctas_per_sm(usage["regs"], spec.options["num_warps"], shared, spec.target),
        "status": "FAIL" if problems else ("WARN" if warnings else "ok"),
        "problems": problems + warnings,
    }
    return row


def _collect(cases: list[Case], targets: list[int]) -> tuple[list[Spec], list[Launch]]:
    specs: dict[tuple, Spec] = {}
    all_launches: list[Launch] = []
    for case in cases:
        launches: list[Launch] = []
        with _recording(launches):
            case.run()
        if not launches:
            raise RuntimeError(f"case {case.name} ({case.dtype}, {case.sizes}) launched no kernel")
        all_launches += launches
        for launch in launches:
            for cc in targets:
                _, signature, constexprs, attrs, options = _specialize(launch, cc)
                opts = {k: v for k, v in options.__dict__.items()}
                key = (
                    case.name, launch.fn.__name__, cc, repr(sorted(signature.items())),
                    repr(sorted(constexprs.items())), repr(sorted(attrs.items())), repr(sorted(opts.items())),
                )  # fmt: skip
                spec = specs.get(key)
                if spec is None:
                    spec = specs[key] = Spec(
                        case.name, launch.fn.__name__, launch.fn, cc, [], signature, constexprs, attrs, opts
                    )
                if case.dtype not in spec.dtypes:
                    spec.dtypes.append(case.dtype)
                if case.sizes not in spec.sizes:
                    spec.sizes.append(case.sizes)
                spec.grids.append(launch.grid)
    return list(specs.values()), all_launches


def _uncovered(launches: list[Launch]) -> list[str]:
    """@triton.jit functions of rlaif_fast.kernels that no case launches and no launched kernel calls."""
    import rlaif_fast.kernels as pkg

    jitted: dict[str, JITFunction] = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for obj in vars(mod).values():
            if isinstance(obj, JITFunction) and obj.fn.__module__ == mod.__name__:
                jitted[f"{info.name}.{obj.__name__}"] = obj
    reached = {id(launch.fn) for launch in launches}
    frontier = [launch.fn for launch in launches]
    while frontier:  # helpers called (by name) from reached functions
        src = frontier.pop().src
        for obj in jitted.values():
            # called, or passed as a combine function (tl.associative_scan / tl.reduce)
            if id(obj) not in reached and re.search(rf"\b{re.escape(obj.__name__)}\b", src):
                reached.add(id(obj))
                frontier.append(obj)
    return sorted(name for name, obj in jitted.items() if id(obj) not in reached)


# ---------------------------------------------------------------------------------------------------
# report


def _fmt_sizes(sizes: list[dict]) -> str:
    merged: dict[str, list] = {}
    for s in sizes:
        for k, v in s.items():
            if k in ("est", "clamp", "kl", "entropy", "softcap", "bias"):
                continue  # shown by the constexprs
            merged.setdefault(k, [])
            if v not in merged[k]:
                merged[k].append(v)
    return " ".join(f"{k}={'/'.join(str(v) for v in vs)}" for k, vs in merged.items())


def _span(values: list) -> str:
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _table(rows: list[dict]) -> str:
    """One line per (kernel, target, dtype, constexprs, launch options); specializations that differ only
    in the 16-byte divisibility of their arguments (e.g. the chunks of the GEMM paths, whose slices start
    at other offsets) share a line: regs as min-max, spills / shared as the max, "x n" counts them."""
    # constexprs shown: block sizes and whatever differs between the rows of the same kernel
    values: dict[str, dict[str, set]] = {}
    for r in rows:
        for k, v in r["constexprs"].items():
            values.setdefault(r["kernel"], {}).setdefault(k, set()).add(v)
    shown = {
        kern: {k for k, vs in d.items() if len(vs) > 1 or k.startswith("BLOCK")} for kern, d in values.items()
    }
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["kernel"], r["target"], r["dtype"], repr(r["constexprs"]), r["num_warps"], r["num_stages"])
        groups.setdefault(key, []).append(r)
    lines = [
        "| kernel | target | dtype | sizes | constexprs | warps | stages | mma | regs | spills | shared B | CTAs/SM "
        "| compile s | status |",
        "| --- | --- | --- | --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for (kernel, target, dtype, _, warps, stages), rs in groups.items():
        cx = " ".join(f"{k}={v}" for k, v in rs[0]["constexprs"].items() if k in shown[kernel])
        ok = [r for r in rs if "n_regs" in r]
        if ok:
            regs = _span([r["n_regs"] for r in ok])
            worst = max(ok, key=lambda r: r["n_spills"])
            spills = str(worst["n_spills"])
            if worst["spill_store_bytes"]:
                spills += f" ({worst['spill_store_bytes']} B st, {worst['spill_load_bytes']} B ld)"
            shared, ctas = max(r["shared_bytes"] for r in ok), _span([r["ctas_per_sm"] for r in ok])
        else:
            regs = spills = shared = ctas = "-"
        mma = "/".join(sorted({r.get("mma", "-") for r in rs}))
        status = next((s for s in ("FAIL", "WARN") if any(r["status"] == s for r in rs)), "ok")
        problems = sorted({p for r in rs for p in r["problems"]})
        if problems:
            status += ": " + "; ".join(problems[:2]) + (" ..." if len(problems) > 2 else "")
        sizes = [s for r in rs for s in r["sizes"]]
        count = f" x{len(rs)}" if len(rs) > 1 else ""
        lines.append(
            f"| {kernel}{count} | {target} | {dtype} | {_fmt_sizes(sizes)} | {cx} | {warps} | {stages} | {mma} | {regs} "
            f"| {spills} | {shared} | {ctas} | {sum(r['compile_s'] for r in rs):.2f} | {status} |"
        )
    return "\n".join(lines)


def _ptxas_versions(targets: list[int]) -> dict[str, str]:
    from triton.backends.nvidia import compiler as nv

    out = {}
    for cc in targets:
        try:
            tool = nv.get_ptxas(cc)
            out[f"sm_{cc}"] = f"{tool.path} ({tool.version.strip().splitlines()[-1]})"
        except Exception as e:  # noqa: BLE001
            out[f"sm_{cc}"] = f"unavailable: {e}"
    return out


def _check_ptxas(targets: list[int]) -> str | None:
    """An error message when the ptxas that triton uses for a target is missing."""
    try:
        from triton.backends.nvidia import compiler as nv
    except Exception as e:  # noqa: BLE001
        return f"triton's NVIDIA backend does not import ({e}): cannot compile for CUDA targets"
    for cc in targets:
        try:
            path = nv.get_ptxas(cc).path
        except Exception as e:  # noqa: BLE001
            return f"no ptxas for sm_{cc}: {e} (triton from PyPI ships one in triton/backends/nvidia/bin)"
        if not path or not os.path.exists(path):
            return f"ptxas for sm_{cc} not found at {path!r} (set TRITON_PTXAS_PATH or reinstall triton from PyPI)"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--targets", default="90,80", help="compute capabilities, comma-separated (default 90,80)")
    p.add_argument("--only", default="", help="comma-separated substrings of kernel / function names to keep")
    p.add_argument("--dtypes", default="", help="comma-separated subset of bf16,fp16,fp32 (default: all)")
    p.add_argument("--out", default=None, help="folder to write compile.json into")
    a = p.parse_args(argv)
    targets = [int(t) for t in a.targets.split(",") if t.strip()]
    if bad := [t for t in targets if t not in SMEM_BLOCK_LIMIT]:
        p.error(f"unsupported targets {bad}; known: {sorted(SMEM_BLOCK_LIMIT)}")
    only = [s for s in a.only.split(",") if s]
    dtypes = [d for d in a.dtypes.split(",") if d]
    if bad := [d for d in dtypes if d not in DTYPES]:
        p.error(f"unknown dtypes {bad}; known: {list(DTYPES)}")

    if err := _check_ptxas(targets):
        print(f"FAIL: {err}", file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    cases = _cases()
    all_cases = cases
    if dtypes:
        cases = [c for c in cases if c.dtype in dtypes]
    specs, launches = _collect(cases, targets)
    if only:
        specs = [s for s in specs if any(o in s.case or o in s.kernel for o in only)]
    if not specs:
        print(f"FAIL: no kernel matches --only {a.only!r} --dtypes {a.dtypes!r}", file=sys.stderr)
        return 1
    order = [c.name for c in all_cases]
    specs.sort(key=lambda s: (order.index(s.case), -s.target, list(DTYPES).index(s.dtypes[0])))
    print(
        f"compiling {len(specs)} specializations for {', '.join(GPU_NAME[t] for t in targets)} ...",
        flush=True,
    )
    rows = []
    for spec in specs:
        row = _compile(spec)
        rows.append(row)
        print(
            f"  {row['status']:4s} {row['kernel']:18s} {row['target']} {row['dtype']} regs={row.get('n_regs', '-')} "
            f"spills={row.get('n_spills', '-')} shared={row.get('shared_bytes', '-')} {row['compile_s']:.2f}s",
            flush=True,
        )
    uncovered = [] if (only or dtypes) else _uncovered(launches)

    print()
    print(_table(rows))
    fails = [r for r in rows if r["status"] == "FAIL"]
    warns = [r for r in rows if r["status"] == "WARN"]
    print()
    print(
        f"{len(rows)} compiled, {len(fails)} FAIL, {len(warns)} WARN (spills); "
        f"triton {triton.__version__}, {time.perf_counter() - t0:.1f} s"
    )
    for r in fails:
        print(f"FAIL {r['kernel']} {r['target']} {r['dtype']}: {'; '.join(r['problems'])}")
        if r.get("error"):
            print(r["error"])
    for name in uncovered:
        print(f"FAIL: @triton.jit kernel {name} is launched by no case of compile_check.py (add one)")
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        meta = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "triton": triton.__version__,
            "torch": torch.__version__,
            "ptxas": _ptxas_versions(targets),
            "shared_limit_bytes": {f"sm_{t}": SMEM_BLOCK_LIMIT[t] for t in targets},
            "uncovered": uncovered,
        }
        with open(os.path.join(a.out, "compile.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)
        print(f"wrote {os.path.join(a.out, 'compile.json')}")
    return 1 if (fails or uncovered) else 0


if __name__ == "__main__":
    try:
        code = main()
    finally:
        shutil.rmtree(_CACHE_DIR, ignore_errors=True)
    sys.exit(code)
