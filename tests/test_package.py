"""The package surface: light imports, the backend switch, the CLI dispatcher, shared input checks."""

import json
import subprocess
import sys

import pytest
import torch

from rlaif_fast import _backend, _checks, cli


def test_imports_stay_light():
    """`import rlaif_fast` and its packages pull in no transformers, deepspeed or triton, and touch no GPU."""
    code = (
        "import sys, json, rlaif_fast, rlaif_fast.ops, rlaif_fast.trainer, rlaif_fast.feedback, "
        "rlaif_fast.reward, rlaif_fast.models, rlaif_fast.batching, rlaif_fast.pipeline\n"
        "heavy = [m for m in ('transformers', 'deepspeed', 'triton') if m in sys.modules]\n"
        "import torch\n"
        "print(json.dumps({'heavy': heavy, 'cuda_init': torch.cuda.is_initialized()}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"heavy": [], "cuda_init": False}


def test_backend_switch(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    assert _backend.select_backend(cpu) == "torch"
    monkeypatch.setenv(_backend.ENV_VAR, "reference")
    assert _backend.select_backend(cpu) == "reference"
    assert _backend.select_backend(cpu, impl="torch") == "torch"
    monkeypatch.setenv(_backend.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="RLAIF_FAST_BACKEND='cuda'"):
        _backend.select_backend(cpu)
    monkeypatch.setenv(_backend.ENV_VAR, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _backend.select_backend(cpu)


def test_checks_name_the_value():
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        _checks.check_int("labels", torch.zeros(2))
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        _checks.check_positive("temperature", 0)
    with pytest.raises(ValueError, match=r"mask has shape \(2,\) but logp has shape \(3,\)"):
        _checks.check_same_shape(logp=torch.zeros(3), mask=torch.zeros(2))
    with pytest.raises(ValueError, match="estimator='k9'"):
        _checks.check_choice("estimator", "k9", ("k1", "k3"))


def test_cli_dispatch(capsys):
    assert cli.main([]) == 0
    assert "label" in capsys.readouterr().out
    assert cli.main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err
    for module, func, _ in cli.COMMANDS.values():
        assert callable(getattr(__import__(module, fromlist=[func]), func)), module
