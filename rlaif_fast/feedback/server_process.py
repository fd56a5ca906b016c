"""Run an HTTP server as a child process for as long as a ``with`` block lasts (a labeler server: vLLM's
OpenAI api_server, llama.cpp's, or ``python -m rlaif_fast.feedback.serve``).

    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", path, "--port", str(port)]
    with ServerProcess(cmd, f"http://127.0.0.1:{port}/health", log_path="server.log") as server:
        ...  # the server answered /health with 200, server.startup_s seconds after it was started

The server starts in a session of its own, with its output in ``log_path``. Waiting for the health URL is
bounded by ``timeout_s``; a server that exits or does not answer in time raises :class:`ServerError`
quoting the last lines of its log. On leaving the block the whole process group (the server and any engine
process it spawned) gets SIGTERM, then SIGKILL if it has not exited after ``stop_timeout_s``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path


class ServerError(RuntimeError):
    """The server exited, or did not answer its health URL in time; the message quotes its log."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the OS picks it; another process could take it before the server)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    """Start ``cmd``, wait until ``health_url`` answers 200, stop the process group on exit.

    Args:
        cmd: the server's command line.
        health_url: a URL that answers HTTP 200 once the server serves (vLLM: ``/health``; llama.cpp:
            ``/v1/models``).
        log_path: file that receives the server's stdout and stderr (overwritten).
        env: the server's environment (default: this process's).
        timeout_s: how long to wait for the health URL before giving up.
        poll_s: pause between health requests.
        stop_timeout_s: how long SIGTERM may take before SIGKILL.
        name: how messages call the server (default: the command's first words).
        tail_lines: log lines quoted in a :class:`ServerError`.
    """

    def __init__(
        self,
        cmd: Sequence[str],
        health_url: str,
        *,
        log_path: str | os.PathLike,
        env: Mapping[str, str] | None = None,
        timeout_s: float = 300.0,
        poll_s: float = 1.0,
        stop_timeout_s: float = 30.0,
        name: str | None = None,
        tail_lines: int = 40,
    ):
        self.cmd = [str(c) for c in cmd]
        self.health_url = health_url
        self.log_path = Path(log_path)
        self.env = dict(env) if env is not None else None
        self.timeout_s, self.poll_s, self.stop_timeout_s = timeout_s, poll_s, stop_timeout_s
        self.name = name or " ".join(self.cmd[:3])
        self.tail_lines = tail_lines
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None
        self._stopped = False

    def tail(self) -> str:
        """The last ``tail_lines`` lines of the server's log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-self.tail_lines :])

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.health_url, timeout=5) as reply:
                return reply.status == 200
        except OSError:  # refused while starting, HTTP errors, timeouts
            return False

    def start(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        with open(self.log_path, "wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            while not self._healthy():
                if self.proc.poll() is not None:
                    raise ServerError(
                        f"{self.name} exited with code {self.proc.returncode} before {self.health_url} "
                        f"answered; the last lines of {self.log_path}:\n{self.tail()}"
                    )
                if time.monotonic() - t0 > self.timeout_s:
                    raise ServerError(
                        f"{self.name} did not answer {self.health_url} within {self.timeout_s:g} s; "
                        f"the last lines of {self.log_path}:\n{self.tail()}"
                    )
                time.sleep(self.poll_s)
        except BaseException:  # a ServerError, or Ctrl-C while waiting: leave nothing running
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0
        return self

    def stop(self) -> None:
        """SIGTERM to the server's process group; SIGKILL to whatever of it is left after the server exited
        or ``stop_timeout_s`` passed. Safe to call twice."""
        proc = self.proc
        if proc is None or self._stopped:
            return
        self._stopped = True
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)  # the group: the server and the processes it started
            except ProcessLookupError:
                break  # nothing of it is left
            try:
                proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                pass

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
