"""Checks of a user's files and paths, shared by the commands (``train``, ``train-rm``, ``run``, ``demo``,
``eval``): each runs before anything heavy loads and raises ValueError naming the value and the fix, which
the command prints as ``prog: error: ...`` with exit status 2 (:func:`rlaif_fast.cli.user_error`)."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

# a hub id: "name" or "org/name" (transformers' own rule, simplified); anything else is a local path
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def load_yaml(path: str | Path, what: str = "config file") -> Any:
    """The YAML document at ``path``; a missing file or a syntax error names the file and the line."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {str(path)!r} does not exist")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"{where}: not valid YAML ({problem}); fix the file") from None


def check_writable_dir(name: str, path: str | Path) -> None:
    """``path`` is, or can become, a folder this process may write in. Nothing is created: a probe file is
    written (and removed) in the folder or, when it does not exist yet, in its nearest existing parent."""
    p = Path(path).absolute()
    probe = p
    while not probe.exists():
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(f"{probe} is a file")
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise ValueError(
            f"{name} {str(path)!r} cannot be written ({exc.strerror or exc}); choose a folder you can write to"
        ) from None


def _offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def check_model_path(name: str, value: str, *, check_hub_cache: bool = True) -> None:
    """``value`` names a model that can load: a local folder with a config.json, a llama2.c ``.bin``, or a
    hub id (when hub downloads are on, or the model is in the local hub cache; ``check_hub_cache=False``
    leaves a hub id to the loader)."""
    p = Path(value).expanduser()
    if value.endswith(".bin"):
        if not p.is_file():
            raise ValueError(f"{name} {value!r} does not exist (a llama2.c .bin checkpoint)")
        return
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ValueError(
                f"{name} {value!r} is a folder without config.json; give a folder written by save_pretrained"
            )
        return
    if p.exists() or not _REPO_ID.fullmatch(value):
        raise ValueError(
            f"{name} {value!r} does not exist; give a save_pretrained folder or a llama2.c .bin checkpoint"
        )
    if check_hub_cache and _offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(value, "config.json"), str):
            raise ValueError(
                f"{name} {value!r} is not a local folder, and hub downloads are off (HF_HUB_OFFLINE) with "
                "no cached copy; give a save_pretrained folder or a llama2.c .bin checkpoint"
            )
