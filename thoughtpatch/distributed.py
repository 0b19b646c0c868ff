"""Several processes, one result: probe chunks split across the ranks of ``torchrun``.

Each rank runs a contiguous run of whole probe chunks (exactly the chunks one process would run, in
order); the rows of all chunks are all-gathered in chunk order, so every rank fits from the same rows as a
single process and the output is byte-identical. Summing float statistics across ranks would not be: the
order of additions changes the last bits.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist

from .errors import UsageError

__all__ = ["init", "close", "world", "is_main", "shard", "gather_each", "share"]


def init(cuda: bool = False) -> None:
    """Join the process group ``torchrun`` describes (NCCL for CUDA, gloo on CPU); a no-op when run alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    atexit.register(close)


def close() -> None:
    """Leave the process group while the interpreter is still whole: a gloo group left for interpreter
    teardown can abort the process (``terminate called without an active exception``) after its work is done."""
    if dist.is_initialized():
        dist.destroy_process_group()


def world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` outside a process group."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_main() -> bool:
    """Whether this process writes outputs (rank 0, or the only process)."""
    return world()[0] == 0


def shard(n: int) -> range:
    """This rank's share of ``n`` chunks: a contiguous run, ranks in chunk order."""
    rank, size = world()
    if n < size:
        raise UsageError(f"{n} chunks of probes for {size} processes: give more probes or fewer processes")
    return range(rank * n // size, (rank + 1) * n // size)


def gather_each(mine: Iterable, total: int) -> Iterator:
    """Every rank's items, each on every rank (``mine``: this rank's share of ``total`` chunks, see
    :func:`shard`), one item per rank at a time: at most one chunk per rank is held at once. Alone: ``mine``."""
    size = world()[1]
    if size == 1:
        yield from mine
        return
    it = iter(mine)
    for _ in range(max((r + 1) * total // size - r * total // size for r in range(size))):
        every: list = [None] * size
        dist.all_gather_object(every, next(it, None))
        yield from (item for item in every if item is not None)


def share(spill, key: str, mine: list[int], total: int) -> None:
    """Give every rank every other rank's ``key`` entries of a :class:`~thoughtpatch.files.Spill` (``mine``:
    this rank's chunk numbers of ``total``), one chunk per rank at a time; a no-op when run alone."""
    size = world()[1]
    if size == 1:
        return
    rounds = max((r + 1) * total // size - r * total // size for r in range(size))
    for k in range(rounds):
        every: list = [None] * size
        local = (mine[k], {a: t.cpu() for a, t in spill.get(key, mine[k]).items()}) if k < len(mine) else None
        dist.all_gather_object(every, local)
        for item in every:
            if item is not None and item[0] not in mine:
                spill.put(key, *item)
