"""What the whole-process benchmarks share: memory read from /proc, and configurations run interleaved,
each in its own process (A B A B ...), every run printing one JSON line last."""

from __future__ import annotations

import json
import os
import subprocess


def rss_kib(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def interleaved(commands: dict[str, list[str]], repeats: int) -> dict[str, list[dict]]:
    """Run every command once per round, in order, for ``repeats`` rounds; each run's last stdout line is
    its JSON result. A failed run raises with the command and the end of its stderr."""
    rows: dict[str, list[dict]] = {name: [] for name in commands}
    for _ in range(repeats):
        for name, cmd in commands.items():
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
            if out.returncode:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
            rows[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows
