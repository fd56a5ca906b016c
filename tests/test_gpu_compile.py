"""The real-GPU compile check (benchmarks/gpu/compile_check.py) on two cheap kernels, for sm_90.

The other tests run the kernels through the interpreter, which never runs triton's compiler or ptxas;
this one compiles GAE and the token log-prob forward to H100 cubins as their launchers launch them at
the GPU goal sizes, with the ptxas that triton's wheel ships. No GPU is needed. A missing ptxas fails
the test (it does not skip): without it nothing checks that the kernels build for a real GPU.
"""

import json
import os
import subprocess
import sys

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu" / "compile_check.py"


def test_compile_check_gae_and_logprobs_fwd_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the real compiler
    cmd = [sys.executable, str(SCRIPT), "--only", "gae,logprobs_fwd", "--targets", "90", "--dtypes", "bf16"]
    proc = subprocess.run(
        [*cmd, "--out", str(tmp_path)], capture_output=True, text=True, env=env, cwd=REPO, timeout=120
    )
    output = proc.stdout + proc.stderr
    if proc.returncode == 2:
        raise AssertionError(
            f"ptxas is unavailable, so no kernel can be compiled for a GPU:\n{output[-3000:]}"
        )
    assert proc.returncode == 0, f"compile check failed (exit {proc.returncode}):\n{output[-6000:]}"

    rows = json.loads((tmp_path / "compile.json").read_text())["rows"]
    by_kernel = {r["kernel"]: r for r in rows}
    assert set(by_kernel) == {"gae", "logprobs_fwd"}, output
    for r in rows:
        assert r["target"] == "sm_90"
        assert r["status"] != "FAIL", r
        assert r["n_regs"] > 0, r
        assert 0 <= r["shared_bytes"] <= r["shared_limit_bytes"], r
    # the launches were recorded on the CUDA branch at the goal sizes, not the interpreter's choices
    lp = by_kernel["logprobs_fwd"]
    assert lp["constexprs"]["BLOCK"] == "4096" and lp["num_warps"] == 8, lp
    assert lp["signature"]["logits_ptr"] == "*bf16", lp
    assert by_kernel["gae"]["constexprs"]["BLOCK_T"] == "1024", by_kernel["gae"]
