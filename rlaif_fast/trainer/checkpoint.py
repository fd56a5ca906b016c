"""Checkpoints that a killed run resumes from exactly: atomic on disk, complete in state.

Layout of ``output_dir/checkpoints/step_000012/``: ``state/`` (DeepSpeed: model + optimizer, one shard
per rank under ZeRO), ``trainer_rank{r}.pt`` (step counter, KL controller, RNG states of that rank), and
``config.json``. It is written as ``step_000012.tmp`` and renamed when every rank has finished, then
``latest`` (a one-line file) is replaced atomically: a crash mid-save leaves the previous checkpoint
as the latest one. Data order needs no state: step k always reads the same slice of the prompts.

Frozen parameters (LoRA's base model, or any the user froze) are not written: they never change, and a
resumed run is built from the same model again (as ``--resume`` is). A checkpoint of a LoRA run therefore
holds the adapters, the value head and their optimizer state, not a copy of the base model per step.
``trainer_rank{r}.pt`` keeps a fingerprint of the frozen weights (``frozen_fingerprint``), and a resume
from a model whose frozen weights differ is refused before anything loads.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch


def rng_state() -> dict:
    """Every global RNG a run may draw from (user rewards included): the legacy numpy one too."""
    numpy_state = np.random.get_state()  # noqa: NPY002 - the global state is what user code uses
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002 - see rng_state
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The folder that ``latest`` names, or None when the run has no complete checkpoint."""
    pointer = checkpoint_root(output_dir) / "latest"
    if not pointer.is_file():
        return None
    folder = checkpoint_root(output_dir) / pointer.read_text().strip()
    return folder if folder.is_dir() else None


def frozen_fingerprint(module) -> str | None:
    """A digest of ``module``'s frozen parameters on this rank (None when it has none): names, shapes,
    dtypes and 1024 evenly spaced values of each (under ZeRO-3, of this rank's partition). It tells a
    different base model apart at the cost of reading a few values per tensor; it is not a checksum of
    every weight."""
    frozen = [(n, p) for n, p in module.named_parameters() if not p.requires_grad]
    if not frozen:
        return None
    digest = hashlib.blake2b(digest_size=16)
    for name, p in frozen:
        local = p.ds_tensor if hasattr(p, "ds_tensor") else p  # ZeRO-3: this rank's partition
        flat = local.detach().reshape(-1)
        idx = torch.linspace(0, max(flat.numel() - 1, 0), min(flat.numel(), 1024)).long()
        values = flat[idx].float().cpu().numpy().tobytes()
        shape = getattr(p, "ds_shape", p.shape)
        digest.update(f"{name}|{tuple(shape)}|{p.dtype}|".encode() + values)
    return digest.hexdigest()


def save_checkpoint(
    strategy, output_dir: str | Path, step: int, trainer_state: dict, config_json: str
) -> Path:
    """Write step ``step`` atomically; every rank calls this (ZeRO shards are per rank). The frozen
    parameters are left out, their fingerprint kept (module docstring)."""
    root = checkpoint_root(output_dir)
    name = f"step_{step:06d}"
    final, tmp = root / name, root / (name + ".tmp")
    if strategy.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    strategy.barrier()
    frozen = frozen_fingerprint(strategy.engine.module)
    strategy.save(str(tmp), client_state={"step": step}, exclude_frozen=frozen is not None)
    state = {**trainer_state, "rng": rng_state(), "frozen_fingerprint": frozen}
    torch.save(state, tmp / f"trainer_rank{strategy.rank}.pt")
    strategy.barrier()
    if strategy.is_main:
        (tmp / "config.json").write_text(config_json)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _atomic_write_text(root / "latest", name)
    strategy.barrier()
    return final


# settings a resumed run may change: where the run lives (a moved folder resumes), how long it runs, and
# what it logs. Every other key changes the math the checkpoint's weights and optimizer state belong to.
RESUME_MAY_CHANGE = (
    "output_dir",
    "resume",
    "total_steps",
    "save_every",
    "log_every",
    "tensorboard",
    "progress",
)


def check_resume_config(folder: Path, config_json: str) -> None:
    """Refuse to resume the checkpoint ``folder`` under settings other than those it was saved with (its
    ``config.json``), naming the keys: the old optimizer state and KL controller under a new learning
    rate, KL coefficient or algorithm would be neither run."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return
    import json

    saved, now = json.loads(path.read_text()), json.loads(config_json)
    changed = sorted(
        k for k in set(saved) | set(now) if k not in RESUME_MAY_CHANGE and saved.get(k) != now.get(k)
    )
    if changed:
        diffs = ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise ValueError(
            f"resume: {folder} was saved with other settings ({diffs}); resuming would train the saved "
            "weights and optimizer state under settings they were not made with. Resume with the saved "
            "values, or start a new run in another output_dir"
        )


def load_checkpoint(strategy, folder: Path) -> dict:
    """Restore engine state and this rank's trainer state (RNG included); returns the trainer state.
    A checkpoint saved without its frozen parameters loads only onto a model with the same frozen
    weights (the fingerprint), which then keeps them."""
    path = folder / f"trainer_rank{strategy.rank}.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the checkpoint was written by a run with a different "
            "number of ranks; resume with the same world size"
        )
    state = torch.load(path, weights_only=False)
    saved = state.pop("frozen_fingerprint", None)
    if saved is not None and saved != frozen_fingerprint(strategy.engine.module):
        raise ValueError(
            f"resume: {folder} holds only the trained parameters (e.g. LoRA adapters); the frozen ones "
            "come from the model the trainer is built with, and its frozen weights (e.g. the LoRA base "
            "model) are not the ones this run was trained on. Build the trainer from the same base "
            "model and the same trainable set as the run that wrote the checkpoint"
        )
    strategy.load(str(folder), frozen_excluded=saved is not None)
    set_rng_state(state.pop("rng"))
    return state
