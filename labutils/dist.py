"""torch.distributed for the scripts in labutils/scripts: set-up and rank-0 printing.

- ``init()``: reads RANK / LOCAL_RANK / WORLD_SIZE (set by torchrun), picks nccl with one GPU
  per LOCAL_RANK when there are GPUs, else gloo on the CPU; always with a timeout, so a dead
  rank becomes an error instead of a hang. Without torchrun it makes a world of one (as
  gpt-fast's ``maybe_init_dist`` does), so every script also runs as plain ``python``.
- ``print0``: only rank 0 prints.
- ``context()``: this rank's DistContext once initialised.

The collectives benchmark (``#wrong``, algbw/busbw, alpha-beta fit) is ``labutils.collectives``.

Used in lab2 §Four ranks and lab3 (every section).
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def as_dict(self) -> dict:
        return asdict(self) | {"device": str(self.device)}


def _pick_backend(backend: str | None, local_rank: int) -> str:
    backend = backend or os.environ.get("SMML_DIST_BACKEND") or (
        "nccl" if torch.cuda.is_available() else "gloo")
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    if backend == "nccl":
        n = torch.cuda.device_count()
        if local_rank >= n:
            raise ValueError(f"LOCAL_RANK {local_rank} has no GPU (this node has {n}): start at most {n} "
                             f"ranks per node (--nproc-per-node {n}) or use backend 'gloo' "
                             f"(SMML_DIST_BACKEND=gloo) to run CPU ranks.")
    return backend


def context() -> DistContext:
    """This rank's DistContext (the process group must be initialised)."""
    return _context()


def _context() -> DistContext:
    backend = dist.get_backend()
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if backend == "nccl" else torch.device("cpu")
    return DistContext(dist.get_rank(), dist.get_world_size(), local, device, backend)


def init(backend: str | None = None, timeout_s: float = 120.0) -> DistContext:
    """Join the job torchrun started (or make a world of one); safe to call twice."""
    if dist.is_initialized():
        return _context()
    local = int(os.environ.get("LOCAL_RANK", 0))
    backend = _pick_backend(backend, local)
    timeout = timedelta(seconds=timeout_s)
    kw = {}
    if backend == "nccl":
        torch.cuda.set_device(local)
        kw["device_id"] = torch.device("cuda", local)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, timeout=timeout, **kw)  # env:// from torchrun
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout, **kw)
    return _context()


_HELD = [0]  # > 0 inside held(): destroy() leaves the group to the runner


@contextmanager
def held(backend: str | None = None, timeout_s: float = 120.0):
    """One process group for several scripts' ``main`` run one after the other in one job (one start-up of
    the ranks, not one per script): inside, their ``destroy()`` leaves the group alone; it goes at the end.
    Destroying and re-creating it does not work under torchrun with gloo (the second rendezvous of the
    ranks' connections is refused), so the group has to stay."""
    ctx = init(backend, timeout_s)
    _HELD[0] += 1
    try:
        yield ctx
    finally:
        _HELD[0] -= 1
        destroy()


def destroy() -> None:
    if dist.is_initialized() and not _HELD[0]:
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def say(*args, sep: str = " ") -> None:
    """Print one whole line from this rank in ONE write(2). ``print`` writes the text and the newline
    apart, so two ranks sharing torchrun's pipe can glue their lines together (seen: rank 1's ``READY``
    line inside rank 0's); one write of less than PIPE_BUF bytes to a pipe is never split."""
    line = sep.join(map(str, args)) + "\n"
    if sys.stdout is None:  # no stdout at all (pythonw, a closed stream): nothing to say
        return
    if sys.stdout is not sys.__stdout__:  # captured (pytest, a notebook): through its own write
        sys.stdout.write(line)
        sys.stdout.flush()
        return
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), line.encode())


def print0(*args, **kwargs) -> None:
    """One line on rank 0 only, at once (``dist.say``); with ``print``'s keywords, ``print`` flushed."""
    if rank() == 0:
        say(*args) if not kwargs else print(*args, **kwargs, flush=True)


def report(script: str, problems: list[str], every_rank: bool = False) -> int:
    """A script's ``verify`` findings, one ``<script>: WRONG: ...`` line each (rank 0's, or with ``every_rank``
    each rank's own, named), then the exit status for them: 0 when there are none, else 1."""
    for line in problems:
        if every_rank:
            say(f"{script}: WRONG on rank {rank()}: {line}")
        else:
            print0(f"{script}: WRONG: {line}")
    return 1 if problems else 0
