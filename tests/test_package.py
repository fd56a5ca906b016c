"""The package surface: light imports, the backend switch, the CLI dispatcher, shared input checks."""

import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
import torch

from rlaif_fast import _backend, _checks, bench, cli


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


# -------------------- lazy exports, the bench command, setup.py and the sdist


ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, env: dict | None = None, cwd=ROOT, timeout: int = 120):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def test_pipeline_is_a_lazy_submodule_and_dir_lists_the_subpackages():
    out = _run(
        """
        import sys, rlaif_fast
        assert 'rlaif_fast.pipeline' not in sys.modules
        names = dir(rlaif_fast)
        print(rlaif_fast.pipeline.__name__, all(n in names for n in ('ops', 'pipeline', 'trainer')))
        """
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["rlaif_fast.pipeline", "True"]


@pytest.mark.parametrize(
    "expr, suggestion",
    [
        ("rlaif_fast.ops.token_logprob", "token_logprobs"),
        ("rlaif_fast.trainer.RLAIFTrainr", "RLAIFTrainer"),
        ("rlaif_fast.opss", "ops"),
    ],
)
def test_typo_in_a_lazy_export_suggests_the_close_match(expr, suggestion):
    """The interpreter suggests from dir(module): the top-level package had no __dir__, so its subpackages
    were not there to suggest until imported (the subpackages' lazy_exports were fine)."""
    package = expr.rsplit(".", 1)[0]
    out = _run(f"import {package}\n{expr}")
    assert out.returncode == 1
    assert f"has no attribute '{expr.rsplit('.', 1)[1]}'" in out.stderr
    assert f"Did you mean: '{suggestion}'?" in out.stderr, out.stderr


def test_bench_names_the_backend_that_ran(monkeypatch, capsys):
    monkeypatch.setenv("RLAIF_FAST_BACKEND", "reference")
    assert bench.main(["--n", "4", "--vocab", "8", "--repeat", "1"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert any(r.startswith("rlaif_fast (reference path)") for r in rows), rows
    assert not any("torch path" in r for r in rows), rows


def _blocked_pybind11_setup(*setup_args: str) -> str:
    return f"""
        import runpy, sys
        sys.modules['pybind11'] = sys.modules['pybind11.setup_helpers'] = None
        sys.argv = ['setup.py', *{list(setup_args)!r}]
        runpy.run_path('setup.py', run_name='__main__')
        """


def test_setup_require_ext_fails_when_pybind11_is_missing():
    """RLAIF_FAST_REQUIRE_EXT=1 (what `make install` and CI set) was silently ignored when pybind11 did not
    import: setup.py dropped the extension and the install succeeded on the slow Python fallback."""
    env = {"RLAIF_FAST_NO_BUILD_EXT": "0"}
    required = _run(_blocked_pybind11_setup("--name"), env={**env, "RLAIF_FAST_REQUIRE_EXT": "1"})
    assert required.returncode != 0
    assert "RLAIF_FAST_REQUIRE_EXT=1" in required.stderr and "pybind11" in required.stderr
    optional = _run(_blocked_pybind11_setup("--name"), env={**env, "RLAIF_FAST_REQUIRE_EXT": "0"})
    assert optional.returncode == 0 and optional.stdout.strip() == "rlaif_fast", optional.stderr


def test_sdist_ships_the_extension_headers(tmp_path):
    """The sdist held csrc/*.cpp but not csrc/*.h, so a build from it (pip install of the sdist, or
    `python -m build`, which builds the wheel from the sdist) failed to compile and fell back to Python."""
    (tmp_path / "csrc").mkdir()
    for f in (ROOT / "csrc").iterdir():
        (tmp_path / "csrc" / f.name).write_bytes(f.read_bytes())
    for name in ("setup.py", "pyproject.toml"):
        (tmp_path / name).write_bytes((ROOT / name).read_bytes())
    for pkg in ("rlaif_fast", "kernels"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    out = subprocess.run(
        [sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if not k.startswith("RLAIF_FAST_")},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    (sdist,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {Path(n).name for n in tar.getnames() if "/csrc/" in n}
    headers = {f.name for f in (ROOT / "csrc").glob("*.h")}
    assert headers and headers <= names, sorted(headers - names)


@pytest.mark.parametrize("command", ["demo", "label", "train-rm", "train", "eval", "run", "bench"])
def test_every_subcommand_help_stays_light(command):
    # `rlaif-fast COMMAND --help` answers without loading transformers, deepspeed or triton
    code = (
        "import sys\n"
        "from rlaif_fast.cli import main\n"
        "try:\n"
        f"    main([{command!r}, '--help'])\n"
        "except SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        "heavy = [m for m in ('transformers', 'deepspeed', 'triton') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


# -------------------- one place loads the C++ extension


def test_only_batching_loads_the_cpp_extension():
    """rlaif_fast.batching._load_extension is the one loader (the RLAIF_FAST_NO_EXT switch and the warning
    live there); every other module reaches the extension through rlaif_fast.batching._C."""
    import ast

    loaders = []
    for path in sorted((ROOT / "rlaif_fast").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                names = [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            if "rlaif_fast._C" in names:  # `import rlaif_fast._C` or `from rlaif_fast import _C`
                loaders.append(path.relative_to(ROOT).as_posix())
    assert loaders == ["rlaif_fast/batching.py"]
