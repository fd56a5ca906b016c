"""rlaif_fast/feedback/server_process.py: start a server process, wait for its health URL, stop its whole
process group; a server that dies or never answers is reported with the end of its log."""

from __future__ import annotations

import os
import sys
import time
import urllib.request

import pytest

from rlaif_fast.feedback.server_process import ServerError, ServerProcess, free_port


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie still answers kill(0); it is dead for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_serves_until_the_block_ends_then_the_whole_group_is_gone(tmp_path):
    port = free_port()
    pid_file = tmp_path / "child.pid"
    # a server that started a helper process of its own, as vLLM's api_server starts its engine
    script = f"sleep 300 & echo $! > {pid_file}; exec {sys.executable} -m http.server {port} --bind 127.0.0.1"
    url = f"http://127.0.0.1:{port}/"
    with ServerProcess(["bash", "-c", script], url, log_path=tmp_path / "server.log", poll_s=0.1) as server:
        with urllib.request.urlopen(url, timeout=5) as reply:
            assert reply.status == 200
        assert server.startup_s is not None and server.startup_s >= 0
        child = int(pid_file.read_text())
        assert _alive(server.proc.pid) and _alive(child)
    deadline = time.monotonic() + 10
    while (_alive(server.proc.pid) or _alive(child)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(server.proc.pid) and not _alive(child)
    server.stop()  # a second stop is harmless


def test_a_server_that_exits_is_reported_with_its_last_log_lines(tmp_path):
    cmd = [
        sys.executable,
        "-c",
        "import sys; print('line 1'); print('error: unknown flag --bogus'); sys.exit(3)",
    ]
    port = free_port()
    server = ServerProcess(cmd, f"http://127.0.0.1:{port}/health", log_path=tmp_path / "s.log", name="toy")
    with pytest.raises(
        ServerError, match=r"toy exited with code 3 before http://127\.0\.0\.1:\d+/health"
    ) as err:
        server.start()
    assert str(err.value).endswith("line 1\nerror: unknown flag --bogus")
    assert str(tmp_path / "s.log") in str(err.value)


def test_a_server_that_never_answers_times_out_and_is_killed(tmp_path):
    cmd = [sys.executable, "-c", "import time; print('loading weights', flush=True); time.sleep(300)"]
    port = free_port()
    server = ServerProcess(
        cmd, f"http://127.0.0.1:{port}/health", log_path=tmp_path / "s.log", timeout_s=1, poll_s=0.1
    )
    with pytest.raises(ServerError, match=r"did not answer http://127\.0\.0\.1:\d+/health within 1 s") as err:
        server.start()
    assert "loading weights" in str(err.value)
    assert server.proc.returncode is not None  # stopped, not left behind
