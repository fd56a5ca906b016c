"""benchmarks/gpu/summarize.py: the verdicts a lent-GPU run reports for the goals of issues 2 and 3."""

import importlib.util
import json

from conftest import REPO


def _module():
    spec = importlib.util.spec_from_file_location(
        "gpu_summarize", REPO / "benchmarks" / "gpu" / "summarize.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ops(device, lp_ms, ppo_ms):
    row = lambda v, ms, pms: {  # noqa: E731
        "N": 8192,
        "V": v,
        "dtype": "bfloat16",
        "max_abs_err_logp": 1e-3,
        "max_abs_err_entropy": 2e-3,
        "token_logprobs": {"ms": ms, "GB/s": 2900.0, "of_copy": 0.9},
        "ppo_fwd_bwd": {"ms": pms, "GB/s": 2800.0, "of_copy": 0.85},
        "copy": {"ms": 1.0, "GB/s": 3100.0},
    }
    return {"device": device, "results": [row(152064, lp_ms, ppo_ms), row(32000, 0.2, 0.5)]}


def _linear(device, tflops, ok=True):
    path = lambda t: {
        "fwd_bwd_ms": 10.0,
        "fwd_ms": 3.0,
        "bwd_ms": 7.0,
        "fwd_bwd_tflops": t,
        "peak_extra_bytes": 2**30,
    }  # noqa: E731
    return {
        "device": device,
        "correctness": {"ok": ok},
        "timing": {
            "N": 8192,
            "H": 4096,
            "V": 128256,
            "dtype": "bfloat16",
            "paths": {
                "gemm": path(tflops),
                "materialized": path(10 * tflops),
                "atomic": {"error": "out of resources: x"},
            },
        },
    }


def _write(folder, ops=None, linear=None):
    (folder / "device.txt").write_text("triton 3.6.0\ntorch 2.11.0 cuda True NVIDIA H100 80GB HBM3\n")
    if ops is not None:
        (folder / "ops.json").write_text(json.dumps(ops))
    if linear is not None:
        (folder / "linear.json").write_text(json.dumps(linear))


def _verdicts(text):
    rows = [
        line.split(" | ")
        for line in text.splitlines()
        if line.startswith("| 2 | no-grad") or line.startswith("| 2 | fused") or line.startswith("| 3 | fwd")
    ]
    return [r[-1].rstrip(" |") for r in rows]


def test_goals_met_and_not_met_on_a_gpu(tmp_path):
    summarize = _module().summarize
    _write(tmp_path, _ops("NVIDIA H100 80GB HBM3", 0.80, 2.4), _linear("NVIDIA H100 80GB HBM3", 520.0))
    text = summarize(tmp_path)
    assert _verdicts(text) == ["met", "met", "met"], text
    assert "NVIDIA H100" in text and "best path `gemm`" in text  # the materialized baseline is no candidate
    assert "out of resources" in text
    _write(
        tmp_path, _ops("NVIDIA H100 80GB HBM3", 0.90, 2.6), _linear("NVIDIA H100 80GB HBM3", 520.0, ok=False)
    )
    assert _verdicts(summarize(tmp_path)) == ["**not met**"] * 3


def test_cpu_runs_and_missing_files_are_never_met(tmp_path):
    summarize = _module().summarize
    _write(tmp_path, _ops("cpu (interpreter smoke run)", 0.1, 0.1), _linear("cpu (interpreter)", 9999.0))
    assert _verdicts(summarize(tmp_path)) == ["not a GPU run"] * 3
    empty = tmp_path / "empty"
    empty.mkdir()
    text = summarize(empty)
    assert "ops.json missing" in text and "linear.json missing" in text and "met |" not in text
