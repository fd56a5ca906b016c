"""Files of a run: stage records written atomically, JSONL in and out, and JSON-safe values."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def write_json(path: Path, data) -> None:
    """Write-then-rename, so a stage record exists only once its content is complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def read_prompts(path: Path) -> tuple[list[str], list[str]]:
    rows = read_jsonl(path)
    prompts = []
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f"{path}:{i}: each line needs a string field 'prompt'")
        prompts.append(row["prompt"])
    if len(prompts) < 2:
        raise ValueError(f"{path} holds {len(prompts)} prompts; give at least 2 (the last 10% are for eval)")
    cut = max(1, len(prompts) // 10)
    return prompts[:-cut], prompts[-cut:]


def read_jsonl(path: Path) -> list:
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{i} is not JSON ({err.msg}); fix or remove that line") from None
    return rows


def write_jsonl(path: Path, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def jsonable(x):
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return x.item()
    return str(x)
