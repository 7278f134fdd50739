"""Collectives as nccl-tests measures them: checked (``#wrong``), swept, algbw/busbw, alpha-beta fit.

- ``bench_collective(op, nbytes, group=...)``: all_reduce, all_gather, reduce_scatter, broadcast or
  all_to_all on a process group, first checked element by element on fresh rank-dependent data
  into NaN-poisoned outputs (nccl-tests' ``#wrong``), then timed; algbw = bytes / time and busbw =
  algbw x the factor of nccl-tests ``doc/PERFORMANCE.md`` (``busbw_factor``).
- ``fit_alpha_beta(bytes, seconds, factor)``: least squares on t = alpha + factor * n * beta
  (alpha: the latency of a call, 1/beta: the bus bandwidth a large message reaches), weighted by
  1/t so that 1 KiB and 1 GiB points count alike; ``fit_sweep`` does it per (group, op).
- ``plot_sweep``: busbw against size, log-log, one line per group, the fits drawn over the points.

Used in lab2 §Four ranks and lab3 §Collectives, §Networking overhead of training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist

from . import timing
from .dist import DistContext, context

OPS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all")


def busbw_factor(op: str, world: int) -> float:
    """busbw / algbw (nccl-tests doc/PERFORMANCE.md): the fraction of the data each link must carry."""
    n = world
    factors = {"all_reduce": 2 * (n - 1) / n, "all_gather": (n - 1) / n, "reduce_scatter": (n - 1) / n,
               "broadcast": 1.0, "all_to_all": (n - 1) / n}
    if op not in factors:
        raise ValueError(f"unknown collective {op!r}: one of {', '.join(OPS)}")
    return factors[op]


def bandwidths(op: str, nbytes: float, seconds: float, world: int) -> tuple[float, float]:
    """(algbw, busbw) in GB/s of one ``op`` of ``nbytes`` (nccl-tests' size) that took ``seconds``."""
    algbw = nbytes / seconds / 1e9
    return algbw, algbw * busbw_factor(op, world)


@dataclass(frozen=True)
class GroupView:
    """Where this rank stands in one process group (None = the whole world)."""

    rank: int
    world: int
    device: torch.device
    backend: str
    group: object = None


def view(ctx: DistContext | None = None, group=None) -> GroupView:
    ctx = ctx or context()
    if group is None:
        return GroupView(ctx.rank, ctx.world, ctx.device, ctx.backend)
    return GroupView(dist.get_rank(group), dist.get_world_size(group), ctx.device, ctx.backend, group)


def _pattern(src: int, count: int, world: int, device, dtype, dst: int | None = None) -> torch.Tensor:
    """Small integers that say which rank sent them (and to whom): exact in float32, and in
    16-bit dtypes (every sum <= 256) up to 15 ranks."""
    base = src + 1 if dst is None else 1 + src + world * dst
    return (base + torch.arange(count, device=device) % 3).to(dtype)


def _make(op: str, count: int, g: GroupView, dtype):
    """(run, expected, out) for one collective of ``count`` elements in total (nccl-tests' size)."""
    r, n, dev, pg = g.rank, g.world, g.device, g.group
    m = count // n  # per-rank share
    nan = float("nan")
    if op == "all_reduce":
        buf = _pattern(r, count, n, dev, dtype)
        expected = sum(_pattern(j, count, n, dev, torch.float64) for j in range(n)).to(dtype)
        return (lambda: dist.all_reduce(buf, group=pg)), expected, buf
    if op == "broadcast":
        buf = _pattern(r, count, n, dev, dtype)  # ranks != 0 start with the wrong values
        src = 0 if pg is None else dist.get_global_rank(pg, 0)
        return (lambda: dist.broadcast(buf, src=src, group=pg)), _pattern(0, count, n, dev, dtype), buf
    if op == "all_gather":
        inp, out = _pattern(r, m, n, dev, dtype), torch.full((m * n,), nan, device=dev, dtype=dtype)
        expected = torch.cat([_pattern(j, m, n, dev, dtype) for j in range(n)])
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # new name in torch 2.13
        return (lambda: gather(out, inp, group=pg)), expected, out
    if op == "reduce_scatter":
        inp, out = _pattern(r, m * n, n, dev, dtype), torch.full((m,), nan, device=dev, dtype=dtype)
        total = sum(_pattern(j, m * n, n, dev, torch.float64) for j in range(n))
        scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        return (lambda: scatter(out, inp, group=pg)), total[r * m:(r + 1) * m].to(dtype), out
    if op == "all_to_all":  # chunk d of rank r goes to rank d
        inp = torch.cat([_pattern(r, m, n, dev, dtype, dst=d) for d in range(n)])
        out = torch.full((m * n,), nan, device=dev, dtype=dtype)
        expected = torch.cat([_pattern(s, m, n, dev, dtype, dst=r) for s in range(n)])
        return (lambda: dist.all_to_all_single(out, inp, group=pg)), expected, out
    raise ValueError(f"unknown collective {op!r}: one of {', '.join(OPS)}")


def _all_max(x: float, g: GroupView) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=g.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=g.group)
    return float(t.item())


def _checked(op: str, nbytes: int, dtype, g: GroupView):
    """Run ``op`` once on fresh rank-dependent data into poisoned (NaN) outputs; count wrong elements."""
    elem = torch.empty((), dtype=dtype).element_size()
    count = max(nbytes // elem // g.world, 1) * g.world  # divisible by the group size
    fn, expected, out = _make(op, count, g, dtype)
    fn()
    wrong = torch.tensor([int((out != expected).sum())], dtype=torch.int64, device=g.device)
    dist.all_reduce(wrong, group=g.group)
    return {"op": op, "count": count, "bytes": count * elem, "wrong": int(wrong.item())}, fn


def check_collective(op: str, nbytes: int, dtype=torch.float32, ctx: DistContext | None = None,
                     group=None) -> dict:
    """One ``op`` of ``nbytes`` on fresh data: {op, count, bytes, wrong} (wrong summed over the group)."""
    return _checked(op, nbytes, dtype, view(ctx, group))[0]


def bench_collective(op: str, nbytes: int, dtype=torch.float32, warmup: int = 3, reps: int = 20,
                     ctx: DistContext | None = None, group=None) -> dict:
    """Check, then time one collective of ``nbytes`` (total, as nccl-tests counts it) on ``group``.

    Time is the slowest rank's median (every rank runs exactly ``reps`` timed calls after a
    barrier). In-place ops keep summing into the same buffer while timed, as nccl-tests' do:
    the values change, the bytes moved do not; correctness was checked before, on fresh data.
    Every rank of ``group`` (default: the world) must call it; other ranks must not.
    """
    g = view(ctx, group)
    checked, fn = _checked(op, nbytes, dtype, g)
    dist.barrier(group=g.group)
    t = timing.benchmark(fn, device=g.device, warmup=warmup, reps=reps, min_reps=reps,
                         max_time_s=float("inf"), label=op)  # fixed reps: ranks must agree on the count
    median = _all_max(t.median_s, g)
    algbw, busbw = bandwidths(op, checked["bytes"], median, g.world)
    return checked | {"dtype": str(dtype).removeprefix("torch."), "world": g.world, "backend": g.backend,
                      "median_s": median, "p20_s": _all_max(t.p20_s, g), "p80_s": _all_max(t.p80_s, g),
                      "reps": t.n, "algbw_GBps": algbw, "busbw_GBps": busbw, "busbw_factor": busbw_factor(op, g.world)}


def sweep(ops=OPS, sizes=(2**10, 2**20), dtype=torch.float32, warmup: int = 3, reps: int = 20,
          ctx: DistContext | None = None, group=None, on_point=None) -> list[dict]:
    """``bench_collective`` for every op and size; a list of plain dicts (one per point).

    ``on_point(row)`` is called after each point (a progress line, a bar)."""
    rows = []
    for op in ops:
        for s in sizes:
            rows.append(bench_collective(op, s, dtype, warmup, reps, ctx, group))
            if on_point:
                on_point(rows[-1])
    return rows


# ---------------------------------------------------------------- the alpha-beta model
@dataclass(frozen=True)
class AlphaBeta:
    """t(n) = alpha + factor * n * beta: alpha is a call's latency, 1/beta the bus bandwidth."""

    op: str
    world: int
    alpha_s: float
    beta_s_per_byte: float
    factor: float
    points: int
    rel_rms: float  # root-mean-square relative residual of the fit

    @property
    def busbw_GBps(self) -> float:
        """The bus bandwidth the fit reaches for large messages (1/beta)."""
        return 1 / self.beta_s_per_byte / 1e9 if self.beta_s_per_byte > 0 else float("inf")

    def predict(self, nbytes) -> np.ndarray | float:
        """Seconds for a collective of ``nbytes`` (nccl-tests' size) on this group."""
        return self.alpha_s + self.factor * np.asarray(nbytes, dtype=np.float64) * self.beta_s_per_byte

    def half_bandwidth_bytes(self) -> float:
        """n_1/2: the size at which latency and bandwidth terms are equal (half of the asymptotic busbw)."""
        return self.alpha_s / (self.factor * self.beta_s_per_byte) if self.beta_s_per_byte > 0 else float("inf")

    def as_dict(self) -> dict:
        return asdict(self) | {"busbw_GBps": self.busbw_GBps, "half_bw_bytes": self.half_bandwidth_bytes()}


def fit_alpha_beta(nbytes: Sequence[float], seconds: Sequence[float], factor: float = 1.0, *,
                   op: str = "", world: int = 0) -> AlphaBeta:
    """Least squares of t = alpha + factor*n*beta, residuals relative to t (each decade counts alike).

    alpha and beta are kept >= 0: a negative one (noise) is set to 0 and the other refitted.
    """
    n, t = np.asarray(nbytes, dtype=np.float64), np.asarray(seconds, dtype=np.float64)
    if n.shape != t.shape or n.size < 2 or not np.all(t > 0) or factor <= 0:
        raise ValueError(f"fit_alpha_beta needs >= 2 (bytes, seconds > 0) pairs of equal length and factor > 0; "
                         f"got {n.size} sizes, {t.size} times, factor {factor}: sweep at least two sizes.")
    x = factor * n
    a = np.stack([np.ones_like(x), x], axis=1) / t[:, None]
    (alpha, beta), *_ = np.linalg.lstsq(a, np.ones_like(t), rcond=None)
    if beta <= 0:
        alpha, beta = 1 / np.mean(1 / t), 0.0  # all latency: minimises sum((t - alpha)/t)^2
    elif alpha < 0:
        alpha, beta = 0.0, float(np.sum(x / t) / np.sum((x / t) ** 2))
    rel = (alpha + x * beta - t) / t
    return AlphaBeta(op, world, float(alpha), float(beta), factor, int(n.size), float(np.sqrt(np.mean(rel**2))))


def fit_sweep(rows: Sequence[dict]) -> dict[tuple[str, str], AlphaBeta]:
    """One fit per (group, op) of a sweep's rows (rows without a 'group' key are group 'world')."""
    keys = sorted({(r.get("group", "world"), r["op"]) for r in rows})
    fits = {}
    for grp, op in keys:
        pts = [r for r in rows if r.get("group", "world") == grp and r["op"] == op]
        fits[(grp, op)] = fit_alpha_beta([r["bytes"] for r in pts], [r["median_s"] for r in pts],
                                         pts[0]["busbw_factor"] or 1.0, op=op, world=pts[0]["world"])
    return fits


def ratio_table(rows: Sequence[dict], fits: dict, op: str, slow: str = "inter", fast: str = "intra") -> list[dict]:
    """Per size: measured time ratio slow/fast beside the ratio the two fits predict."""
    by = {(r.get("group"), r["bytes"]): r for r in rows if r["op"] == op}
    out = []
    for (grp, n), r in sorted(by.items(), key=lambda kv: kv[0][1]):
        if grp != slow or (fast, n) not in by:
            continue
        pred = float(fits[(slow, op)].predict(n) / fits[(fast, op)].predict(n))
        out.append({"op": op, "bytes": n, f"{slow}_s": r["median_s"], f"{fast}_s": by[(fast, n)]["median_s"],
                    "measured_ratio": r["median_s"] / by[(fast, n)]["median_s"], "fit_ratio": pred})
    return out


def plot_sweep(rows: Sequence[dict], fits: dict, op: str, *, device: str, groups: Sequence[str] | None = None):
    """busbw against bytes (log-log) for one op: measured points and the alpha-beta fit, one colour per group."""
    from . import plots

    fig, ax = plots.figure(f"{op} busbw, measured and alpha-beta fit ({device})", "message size (bytes)",
                           "busbw (GB/s)", logx=True, logy=True)
    groups = groups or sorted({r.get("group", "world") for r in rows if r["op"] == op})
    for k, grp in enumerate(groups):
        pts = sorted((r for r in rows if r["op"] == op and r.get("group", "world") == grp), key=lambda r: r["bytes"])
        if not pts:
            continue
        n = np.array([r["bytes"] for r in pts], dtype=np.float64)
        colour = f"C{k}"
        ax.plot(n, [r["busbw_GBps"] for r in pts], "o", color=colour, label=f"{grp} ({pts[0]['world']} ranks)")
        f = fits[(grp, op)]
        grid = np.geomspace(n.min(), n.max(), 64)
        ax.plot(grid, f.factor * grid / f.predict(grid) / 1e9, "-", color=colour, alpha=0.7,
                label=f"fit: alpha {timing.fmt_s(f.alpha_s)}, 1/beta {f.busbw_GBps:.3g} GB/s")
    ax.legend(fontsize=8)
    return fig
