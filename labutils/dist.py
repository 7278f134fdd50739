"""torch.distributed for the scripts in labutils/scripts: set-up, rank-0 printing, collectives.

- ``init()``: reads RANK / LOCAL_RANK / WORLD_SIZE (set by torchrun), picks nccl with one GPU
  per LOCAL_RANK when there are GPUs, else gloo on the CPU; always with a timeout, so a dead
  rank becomes an error instead of a hang. Without torchrun it makes a world of one (as
  gpt-fast's ``maybe_init_dist`` does), so every script also runs as plain ``python``.
- ``print0``: only rank 0 prints.
- ``bench_collective(op, nbytes)``: all_reduce, all_gather, reduce_scatter, broadcast or
  all_to_all, first checked element by element (nccl-tests' ``#wrong``), then timed; algbw and
  busbw as nccl-tests ``doc/PERFORMANCE.md`` defines them.

Used in lab2 §Four ranks and lab3 §Collectives.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from . import timing

OPS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all")


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


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def print0(*args, **kwargs) -> None:
    """``print`` on rank 0 only, flushed so that torchrun's output shows it at once."""
    if rank() == 0:
        print(*args, **kwargs, flush=True)


# ---------------------------------------------------------------- collectives
def busbw_factor(op: str, world: int) -> float:
    """busbw / algbw (nccl-tests doc/PERFORMANCE.md): the fraction of the data each link must carry."""
    n = world
    factors = {"all_reduce": 2 * (n - 1) / n, "all_gather": (n - 1) / n, "reduce_scatter": (n - 1) / n,
               "broadcast": 1.0, "all_to_all": (n - 1) / n}
    if op not in factors:
        raise ValueError(f"unknown collective {op!r}: one of {', '.join(OPS)}")
    return factors[op]


def _pattern(src: int, count: int, world: int, device, dtype, dst: int | None = None) -> torch.Tensor:
    """Small integers that say which rank sent them (and to whom): exact in float32, and in
    16-bit dtypes (every sum <= 256) up to 15 ranks."""
    base = src + 1 if dst is None else 1 + src + world * dst
    return (base + torch.arange(count, device=device) % 3).to(dtype)


def _make(op: str, count: int, ctx: DistContext, dtype):
    """(run, expected, out) for one collective of ``count`` elements in total (nccl-tests' size)."""
    r, n, dev = ctx.rank, ctx.world, ctx.device
    m = count // n  # per-rank share
    nan = float("nan")
    if op == "all_reduce":
        buf = _pattern(r, count, n, dev, dtype)
        expected = sum(_pattern(j, count, n, dev, torch.float64) for j in range(n)).to(dtype)
        return (lambda: dist.all_reduce(buf)), expected, buf
    if op == "broadcast":
        buf = _pattern(r, count, n, dev, dtype)  # ranks != 0 start with the wrong values
        return (lambda: dist.broadcast(buf, src=0)), _pattern(0, count, n, dev, dtype), buf
    if op == "all_gather":
        inp, out = _pattern(r, m, n, dev, dtype), torch.full((m * n,), nan, device=dev, dtype=dtype)
        expected = torch.cat([_pattern(j, m, n, dev, dtype) for j in range(n)])
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        return (lambda: gather(out, inp)), expected, out
    if op == "reduce_scatter":
        inp, out = _pattern(r, m * n, n, dev, dtype), torch.full((m,), nan, device=dev, dtype=dtype)
        total = sum(_pattern(j, m * n, n, dev, torch.float64) for j in range(n))
        scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        return (lambda: scatter(out, inp)), total[r * m:(r + 1) * m].to(dtype), out
    if op == "all_to_all":  # chunk d of rank r goes to rank d
        inp = torch.cat([_pattern(r, m, n, dev, dtype, dst=d) for d in range(n)])
        out = torch.full((m * n,), nan, device=dev, dtype=dtype)
        expected = torch.cat([_pattern(s, m, n, dev, dtype, dst=r) for s in range(n)])
        return (lambda: dist.all_to_all_single(out, inp)), expected, out
    raise ValueError(f"unknown collective {op!r}: one of {', '.join(OPS)}")


def _all_max(x: float, ctx: DistContext) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _checked(op: str, nbytes: int, dtype, ctx: DistContext):
    """Run ``op`` once on fresh rank-dependent data into poisoned (NaN) outputs; count wrong elements."""
    elem = torch.empty((), dtype=dtype).element_size()
    count = max(nbytes // elem // ctx.world, 1) * ctx.world  # divisible by the world size
    fn, expected, out = _make(op, count, ctx, dtype)
    fn()
    wrong = torch.tensor([int((out != expected).sum())], dtype=torch.int64, device=ctx.device)
    dist.all_reduce(wrong)
    return {"op": op, "count": count, "bytes": count * elem, "wrong": int(wrong.item())}, fn


def check_collective(op: str, nbytes: int, dtype=torch.float32, ctx: DistContext | None = None) -> dict:
    """One ``op`` of ``nbytes`` on fresh data: {op, count, bytes, wrong} (wrong summed over all ranks)."""
    return _checked(op, nbytes, dtype, ctx or _context())[0]


def bench_collective(op: str, nbytes: int, dtype=torch.float32, warmup: int = 3, reps: int = 20,
                     ctx: DistContext | None = None) -> dict:
    """Check, then time one collective of ``nbytes`` (total, as nccl-tests counts it) on every rank.

    Time is the slowest rank's median (every rank runs exactly ``reps`` timed calls after a
    barrier). In-place ops keep summing into the same buffer while timed, as nccl-tests' do:
    the values change, the bytes moved do not; correctness was checked before, on fresh data.
    """
    ctx = ctx or _context()
    checked, fn = _checked(op, nbytes, dtype, ctx)
    dist.barrier()
    t = timing.benchmark(fn, device=ctx.device, warmup=warmup, reps=reps, min_reps=reps,
                         max_time_s=float("inf"), label=op)  # fixed reps: ranks must agree on the count
    median = _all_max(t.median_s, ctx)
    algbw = checked["bytes"] / median / 1e9
    factor = busbw_factor(op, ctx.world)
    return checked | {"dtype": str(dtype).removeprefix("torch."), "world": ctx.world, "backend": ctx.backend,
                      "median_s": median, "p20_s": _all_max(t.p20_s, ctx), "p80_s": _all_max(t.p80_s, ctx),
                      "reps": t.n, "algbw_GBps": algbw, "busbw_GBps": algbw * factor, "busbw_factor": factor}


def sweep(ops=OPS, sizes=(2**10, 2**20), dtype=torch.float32, warmup: int = 3, reps: int = 20,
          ctx: DistContext | None = None) -> list[dict]:
    """``bench_collective`` for every op and size; a list of plain dicts (one per point)."""
    return [bench_collective(op, s, dtype, warmup, reps, ctx) for op in ops for s in sizes]
