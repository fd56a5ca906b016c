"""Turn one run of benchmarks/gpu/run.sh into the lines RESULTS.md needs: the card, each GPU goal of
issues 2 and 3 with the measured figure and a verdict, and the correctness errors behind them.

    python benchmarks/gpu/summarize.py gpu_out            # prints markdown; run.sh writes it to summary.md

Reads what the scripts wrote under the folder: device.txt, ops.json (bench_ops.py), linear.json
(bench_linear.py), rl.json (bench_gae.py --gpu). A missing file is reported as missing, not guessed.
A verdict is "met" only when the run was on CUDA and its correctness check passed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

GOAL_LOGPROB_MS = 0.85  # issue 2: no-grad log-prob + entropy, N = 8192, V = 152064, bf16, H100
GOAL_PPO_MS = 2.5  # issue 2: fused PPO loss forward + backward, same size
GOAL_LINEAR_TFLOPS = 500.0  # issue 3: linear log-probs fwd + bwd, N = 8192, H = 4096, V = 128256, bf16


def _load(folder: Path, name: str):
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else None


def _verdict(ok: bool, on_gpu: bool) -> str:
    if not on_gpu:
        return "not a GPU run"
    return "met" if ok else "**not met**"


def summarize(folder: Path) -> str:
    lines = []
    device = (folder / "device.txt").read_text().strip() if (folder / "device.txt").is_file() else "unknown"
    lines.append(f"Run of `bash benchmarks/gpu/run.sh`; device: {' / '.join(device.splitlines())}")
    lines.append("")
    lines.append("| issue | goal | measured | verdict |")
    lines.append("| --- | --- | --- | --- |")

    ops = _load(folder, "ops.json")
    if ops is None:
        lines.append(
            "| 2 | log-prob + entropy, PPO fwd+bwd | ops.json missing (bench_ops.py did not finish) | open |"
        )
    else:
        on_gpu = "cpu" not in str(ops.get("device", "")).lower()
        rows = sorted(ops["results"], key=lambda r: r["V"])
        big = rows[-1]
        size = f"N = {big['N']}, V = {big['V']}, {big['dtype']}"
        lp, ppo = big["token_logprobs"], big["ppo_fwd_bwd"]
        lines.append(
            f"| 2 | no-grad log-prob + entropy <= {GOAL_LOGPROB_MS} ms ({size}) | {lp['ms']:.3f} ms, "
            f"{lp['GB/s']:.0f} GB/s = {lp['of_copy']:.2f} of a device copy | "
            f"{_verdict(lp['ms'] <= GOAL_LOGPROB_MS and big['V'] >= 152064, on_gpu)} |"
        )
        lines.append(
            f"| 2 | fused PPO loss fwd + bwd <= {GOAL_PPO_MS} ms ({size}) | {ppo['ms']:.3f} ms, "
            f"{ppo['GB/s']:.0f} GB/s = {ppo['of_copy']:.2f} of a copy | "
            f"{_verdict(ppo['ms'] <= GOAL_PPO_MS and big['V'] >= 152064, on_gpu)} |"
        )
        for r in rows:
            lines.append(
                f"| 2 | (all V) V = {r['V']} | log-prob {r['token_logprobs']['ms']:.3f} ms "
                f"({r['token_logprobs']['of_copy']:.2f} of copy), PPO {r['ppo_fwd_bwd']['ms']:.3f} ms; max abs error "
                f"log-prob {r['max_abs_err_logp']:.1e}, entropy {r['max_abs_err_entropy']:.1e} | - |"
            )

    linear = _load(folder, "linear.json")
    if linear is None:
        lines.append(
            "| 3 | linear log-probs >= 500 TFLOP/s | linear.json missing (bench_linear.py did not finish) | open |"
        )
    else:
        on_gpu = "cpu" not in str(linear.get("device", "")).lower()
        timing, correct = linear.get("timing", {}), linear.get("correctness", {})
        paths = {k: v for k, v in timing.get("paths", {}).items() if "fwd_bwd_tflops" in v}
        ours = {k: v for k, v in paths.items() if k != "materialized"}  # the baseline is not a candidate
        size = f"N = {timing.get('N')}, H = {timing.get('H')}, V = {timing.get('V')}, {timing.get('dtype')}"
        if ours:
            best = max(ours, key=lambda k: ours[k]["fwd_bwd_tflops"])
            b = ours[best]
            mem = b.get("peak_extra_bytes")
            mem_s = "" if mem is None else f", peak extra {mem / 2**20:.0f} MiB"
            lines.append(
                f"| 3 | fwd + bwd >= {GOAL_LINEAR_TFLOPS:.0f} TFLOP/s ({size}) | best path `{best}`: "
                f"{b['fwd_bwd_tflops']:.0f} TFLOP/s ({b['fwd_bwd_ms']:.2f} ms){mem_s}; correctness "
                f"{'ok' if correct.get('ok') else 'FAILED'} | "
                f"{_verdict(b['fwd_bwd_tflops'] >= GOAL_LINEAR_TFLOPS and bool(correct.get('ok')), on_gpu)} |"
            )
            for name, p in paths.items():
                mem = p.get("peak_extra_bytes")
                lines.append(
                    f"| 3 | (path) `{name}` | {p['fwd_bwd_tflops']:.0f} TFLOP/s, {p['fwd_bwd_ms']:.2f} ms"
                    f"{'' if mem is None else f', {mem / 2**20:.0f} MiB'} | - |"
                )
        errors = {k: v["error"] for k, v in timing.get("paths", {}).items() if "error" in v}
        for name, err in errors.items():
            lines.append(f"| 3 | (path) `{name}` | {err} | - |")

    rl = _load(folder, "rl.json")
    if rl is not None:
        for r in rl.get("rows", []):
            if "gae_triton_ms" in r:
                lines.append(
                    f"| 2 | GAE kernel, {r['kind']}, B = {r['B']}, T = {r['T']} | {r['gae_triton_ms'] * 1e3:.1f} us "
                    f"({r['gae_triton_GBps_at_min_bytes']:.0f} GB/s), loop {r['gae_loop_ms']:.2f} ms = "
                    f"{r['gae_loop_ms'] / r['gae_triton_ms']:.0f}x; max abs error {r['gae_max_err']:.1e} | - |"
                )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path, help="the $OUT folder run.sh wrote")
    p.add_argument("--write", action="store_true", help="also write FOLDER/summary.md")
    a = p.parse_args(argv)
    text = summarize(a.folder)
    print(text, end="")
    if a.write:
        (a.folder / "summary.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
