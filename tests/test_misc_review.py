"""Review of the package surface, the C++ extension's boundary and setup.py: each test failed before its fix."""

import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

from rlaif_fast import batching, bench

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


@pytest.mark.skipif(batching.backend() != "cpp", reason="the C++ extension is not built")
def test_balanced_microbatches_survives_a_thread_writing_the_lengths():
    """The planner ran without the GIL on the caller's own int64 buffer: a thread writing to that array
    meanwhile made std::sort's comparator inconsistent, and the process died (free(): invalid pointer)."""
    out = _run(
        """
        import threading
        import numpy as np
        from rlaif_fast.batching import balanced_microbatches
        rng = np.random.default_rng(0)
        a = rng.integers(1, 500, 20000)
        b = rng.integers(1, 4096, 20000)
        arr, stop = a.copy(), []
        def writer():
            while not stop:
                arr[:] = b
                arr[:] = a
        t = threading.Thread(target=writer)
        t.start()
        try:
            for _ in range(30):
                # the snapshot the planner copied may mix a and b (numpy copies without the GIL too):
                # check what holds for any snapshot
                plan = balanced_microbatches(arr, max_tokens=4096, num_ranks=8)
                assert len({len(rank) for rank in plan.microbatches}) == 1
                assert sorted(i for rank in plan.microbatches for mb in rank for i in mb) == list(range(20000))
        finally:
            stop.append(1)
            t.join()
        print("ok")
        """,
        timeout=240,
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", (out.returncode, out.stderr[-2000:])


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
