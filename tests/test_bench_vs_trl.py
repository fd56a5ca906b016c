"""benchmarks/bench_vs_trl.py: the phase accounting (CPU time, RSS peaks), the ratios the note reads, and the
whole benchmark end to end on a tiny model (both sides, own processes), so it keeps running as the trainer
changes. No speed figures are asserted."""

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
from conftest import REPO

SCRIPT = REPO / "benchmarks" / "bench_vs_trl.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_vs_trl", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_phase_counts_cpu_and_rss_peak_of_the_wrapped_call():
    b = _module()

    class Sampler:
        def generate(self, n):
            block = bytearray(n)  # touched: counts in RSS
            t = time.process_time()
            while time.process_time() - t < 0.05:
                pass
            return len(block)

    s = Sampler()
    b.constructed(out := {})
    phase = b.Phase(s, "generate", "sample")
    assert s.generate(150_000_000) == 150_000_000  # the call goes through, its result returned
    b.peak_cut("learn")
    assert phase.calls == 1
    assert 0.04 <= phase.cpu <= 5.0 and phase.wall >= phase.cpu * 0.5
    # the 150 MB block is credited to the sampling phase, not to what ran outside it
    assert b.PEAKS["sample"] - out["base_rss_gb"] >= 0.14
    assert b.PEAKS["learn"] < b.PEAKS["sample"]


def test_ratios_are_the_amdahl_split():
    b = _module()
    r = {"tokens": 1000, "cpu_s": 10.0, "sample_cpu_s": 4.0, "learn_cpu_s": 6.0,
         "peak_rss_gb": 1.0, "step_increment_gb": 0.5}  # fmt: skip
    t = {"tokens": 1000, "cpu_s": 20.0, "sample_cpu_s": 5.0, "sync_cpu_s": 1.0, "learn_cpu_s": 14.0,
         "peak_rss_gb": 4.0, "step_increment_gb": 2.0}  # fmt: skip
    q = b.ratios(r, t)
    assert q["tokens_per_cpu"] == pytest.approx(2.0)
    assert q["learn"] == pytest.approx(14.0 / 6.0)
    assert q["same_sampling"] == pytest.approx(20.0 / (6.0 + 6.0))  # TRL's sample + sync, rlaif's learn
    assert q["ceiling"] == pytest.approx(20.0 / 6.0)
    assert q["peak_rss"] == pytest.approx(0.25) and q["step_rss"] == pytest.approx(0.25)


def test_end_to_end_tiny(tmp_path):
    pytest.importorskip("trl", reason="the TRL side needs trl (pip install trl)")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = [sys.executable, str(SCRIPT), "--runs", "1", "--steps", "1", "--prompts", "2", "--group", "2",
           "--micro", "2", "--completion", "4", "--hidden", "64", "--layers", "1", "--workdir", str(tmp_path)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = {}
    for line in out.stdout.splitlines():
        if line.startswith("run 0 "):
            side, payload = line[6:].split(": ", 1)
            runs[side] = json.loads(payload)
    assert set(runs) == {"rlaif", "trl"}
    for side, r in runs.items():
        assert r["sample_calls_ok"] and r["sample_calls"] == 1, side  # the sampler was wrapped and timed
        assert r["tokens"] == 2 * 2 * (2 + 4) or r["completion_len"] < 4, (side, r)  # prompt + completion
        assert r["cpu_s"] > 0 and r["sample_cpu_s"] > 0 and r["learn_cpu_s"] > 0, side
        assert r["base_rss_gb"] >= r["import_rss_gb"] > 0.05, side
        assert r["peak_rss_gb"] >= r["base_rss_gb"] + r["step_increment_gb"] - 2e-3, (
            side
        )  # printed to 3 digits
        assert r["torch_threads"] == 1, side
    assert "tokens per CPU-second, rlaif / TRL" in out.stdout
    floor = json.loads(next(x for x in out.stdout.splitlines() if x.startswith("floor: "))[7:])
    assert floor["gemm_gflops"] > 0.1 and 0 < floor["lora_s"] < floor["full_s"]
