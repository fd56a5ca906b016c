"""The ranks of a run: ``rlaif-fast run`` under ``torchrun`` / ``deepspeed`` splits its work over them.

A plain ``python`` process is one rank and needs no process group (the RL stage's ``Strategy`` makes its
own one-rank group, as before). Under a launcher (``WORLD_SIZE`` > 1) the process group is created here,
before any stage, the way the trainer's ``Strategy`` creates it (DeepSpeed's ``init_distributed``, NCCL on
GPUs, gloo on CPUs), so that every later ``Strategy`` joins the same group.

Work is split in fixed chunks of prompts or pairs, chunk ``c`` going to rank ``c % world``. The chunks, and
the seed each one is sampled with, do not depend on the number of ranks, so 1 rank and N ranks produce the
same samples and labels (up to the float noise of another batch layout).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch


def resolve_device(spec: str) -> torch.device:
    """``auto``: this rank's GPU when there is one, else the CPU; ``cpu``; ``cuda`` (this rank's GPU)."""
    local = int(os.environ.get("LOCAL_RANK", 0))
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device: cuda was asked for but torch sees no GPU; use device: cpu or auto")
        return torch.device("cuda", local)
    return torch.device(spec)


class Ranks:
    """This process's rank, the world size and the few collectives the pipeline needs."""

    def __init__(self, device: str = "auto", chunk: int = 64):
        self.chunk = int(chunk)  # prompts (or pairs) per unit of work; fixed, whatever the number of ranks
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.device = resolve_device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1 and not torch.distributed.is_initialized():
            import deepspeed

            backend = "nccl" if self.device.type == "cuda" else "gloo"
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def gather(self, obj) -> list:
        """[rank 0's obj, rank 1's obj, ...] on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def my_chunks(self, n: int) -> list[tuple[int, int, int]]:
        """(chunk index, start, end) of the chunks of ``range(n)`` that this rank works on."""
        chunks = enumerate(range(0, n, self.chunk))
        return [(c, s, min(s + self.chunk, n)) for c, s in chunks if c % self.world == self.rank]

    def map_chunks(self, n: int, fn: Callable[[int, int, int], Sequence]) -> list:
        """``fn(chunk, start, end)`` (a list of ``end - start`` results) on this rank's chunks, gathered in
        order on every rank: the concatenation over all chunks of ``range(n)``."""
        mine = {c: list(fn(c, s, e)) for c, s, e in self.my_chunks(n)}
        merged: dict = {}
        for part in self.gather(mine):
            merged.update(part)
        return [x for c in sorted(merged) for x in merged[c]]

    def all_stop(self, failed: BaseException | None) -> None:
        """Every rank raises when any rank failed, so that none waits forever in the next collective."""
        if self.world == 1:
            if failed is not None:
                raise failed
            return
        flags = self.gather(None if failed is None else f"{type(failed).__name__}: {failed}")
        if failed is not None:
            raise failed
        bad = [(r, m) for r, m in enumerate(flags) if m is not None]
        if bad:
            raise RuntimeError(f"rank {bad[0][0]} failed: {bad[0][1]}")

    def close(self) -> None:
        """Tear the process group down in order (all ranks done, then destroyed)."""
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()

    def main_first(self, fn: Callable[[], object]):
        """Rank 0 runs ``fn`` and the others then get its result (an exception on rank 0 is raised on
        every rank, so none waits in a collective for a rank that has stopped)."""
        out, err = None, None
        if self.is_main:
            try:
                out = fn()
            except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
                err = exc
        if self.world == 1:
            if err is not None:
                raise err
            return out
        msg = self.broadcast(None if err is None else f"{type(err).__name__}: {err}")
        if err is not None:
            raise err
        if msg is not None:
            raise RuntimeError(f"rank 0 failed: {msg}")
        return self.broadcast(out)
