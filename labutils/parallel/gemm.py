"""C = A @ B over the ranks of a group in every placement, by hand and with DTensor, and what each moves.

Placements (A is M x K, B is K x N, n ranks; "moves" = bytes each rank sends to rebuild a replicated C):

| placement    | each rank holds            | computes         | collective to a full C         |
|--------------|----------------------------|------------------|--------------------------------|
| replicated   | A, B                       | all of C         | none (n times the FLOPs)       |
| row          | A rows M/n, B              | C rows M/n       | all_gather: (n-1)/n * M*N*e    |
| col          | A, B columns N/n           | C columns N/n    | all_gather: (n-1)/n * M*N*e    |
| k            | A columns K/n, B rows K/n  | a partial C      | all_reduce: 2(n-1)/n * M*N*e   |
|              |                            |                  | (reduce_scatter: half that)    |
| 2d (2 x 2)   | A rows M/2, B columns N/2  | a block M/2 x N/2| all_gather: (n-1)/n * M*N*e    |

``by_hand`` runs one placement with torch.distributed collectives and times its compute and its
communication apart; ``with_dtensor`` does the same with ``distribute_tensor`` / ``Shard`` /
``Replicate`` / ``Partial`` / ``redistribute``; ``measure_link`` turns a sweep of all_reduce times
(fitted by ``labutils.collectives.fit_alpha_beta``) into the latency (alpha) and bandwidth (beta) of the
link, ``predict_comm_s`` into a time for each placement.

Used in lab2 §A GEMM across 4 ranks.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from .. import collectives, timing

PLACEMENTS = ("replicated", "row", "col", "k", "k_scatter", "2d")
COLLECTIVE = {"replicated": None, "row": "all_gather", "col": "all_gather", "k": "all_reduce",
              "k_scatter": "reduce_scatter", "2d": "all_gather"}


def wire_factor(op: str | None, n: int) -> float:
    """Bytes each rank sends per byte of the full result, for a ring: all_gather / reduce_scatter (n-1)/n,
    all_reduce 2(n-1)/n (a reduce_scatter then an all_gather)."""
    return {None: 0.0, "all_gather": (n - 1) / n, "reduce_scatter": (n - 1) / n,
            "all_reduce": 2 * (n - 1) / n, "send": 1.0}[op]


def comm_bytes(placement: str, m: int, n_: int, elem: int, n: int) -> float:
    """Bytes one rank sends to finish ``placement`` for an M x N result of ``elem``-byte values."""
    return wire_factor(COLLECTIVE[_check(placement)], n) * m * n_ * elem


def _check(placement: str) -> str:
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r}: one of {', '.join(PLACEMENTS)}")
    return placement


def _check_sizes(m: int, n_: int, k: int, n: int) -> None:
    for what, v in (("M", m), ("N", n_), ("K", k)):
        if v % n:
            raise ValueError(f"{what}={v} is not divisible by the {n} ranks: pick sizes that are multiples of {n}")


def _grid(n: int) -> int:
    r = int(round(n ** 0.5))
    if r * r != n:
        raise ValueError(f"the 2d placement needs a square number of ranks (4 = 2 x 2), got {n}")
    return r


def local_operands(placement: str, a: torch.Tensor, b: torch.Tensor, rank: int, n: int):
    """This rank's pieces of the full ``a`` and ``b`` for ``placement``."""
    if placement == "replicated":
        return a, b
    if placement == "row":
        return a.chunk(n, 0)[rank], b
    if placement == "col":
        return a, b.chunk(n, 1)[rank]
    if placement in ("k", "k_scatter"):
        return a.chunk(n, 1)[rank], b.chunk(n, 0)[rank]
    g = _grid(n)  # 2d: rank = i * g + j holds A's row block i and B's column block j
    return a.chunk(g, 0)[rank // g], b.chunk(g, 1)[rank % g]


def _assemble(placement: str, c: torch.Tensor, n: int, group):
    """The collective that finishes ``placement``; returns the full C (or this rank's rows of it)."""
    if placement == "replicated":
        return c
    if placement in ("row", "col", "2d"):
        parts = [torch.empty_like(c) for _ in range(n)]
        dist.all_gather(parts, c.contiguous(), group=group)
        if placement == "row":
            return torch.cat(parts, 0)
        if placement == "col":
            return torch.cat(parts, 1)
        g = _grid(n)
        return torch.cat([torch.cat(parts[i * g:(i + 1) * g], 1) for i in range(g)], 0)
    if placement == "k":
        out = c.clone()
        dist.all_reduce(out, group=group)
        return out
    out = torch.empty(c.shape[0] // n, c.shape[1], dtype=c.dtype, device=c.device)  # k_scatter
    dist.reduce_scatter(out, list(c.chunk(n, 0)), group=group)
    return out


def by_hand(placement: str, a: torch.Tensor, b: torch.Tensor, group=None, reps: int = 10) -> dict:
    """One placement with plain collectives: the result, and compute / communication timed apart."""
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    _check(placement)
    _check_sizes(a.shape[0], b.shape[1], a.shape[1], n)
    la, lb = local_operands(placement, a, b, rank, n)
    c_local = la @ lb
    out = _assemble(placement, c_local, n, group)
    kw = dict(device=a.device, warmup=1, reps=reps, min_reps=reps, max_time_s=float("inf"))
    dist.barrier(group=group)
    t_mm = timing.benchmark(lambda: la @ lb, label=f"{placement} compute", **kw)
    dist.barrier(group=group)
    t_comm = timing.benchmark(lambda: _assemble(placement, c_local, n, group), label=f"{placement} comm", **kw)
    return {"placement": placement, "collective": COLLECTIVE[placement], "out": out,
            "local_flops": 2 * la.shape[0] * la.shape[1] * lb.shape[1],
            "comm_bytes": comm_bytes(placement, a.shape[0], b.shape[1], a.element_size(), n),
            "compute_s": _slowest(t_mm.median_s, a.device, group), "comm_s": _slowest(t_comm.median_s, a.device, group)}


def _slowest(x: float, device, group) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t.item())


def dtensor_placements(placement: str):
    """(mesh shape, A's placements, B's placements, C's target placements) for ``placement``."""
    from torch.distributed.tensor import Replicate, Shard

    R = Replicate()
    table = {"replicated": ((R,), (R,), (R,)), "row": ((Shard(0),), (R,), (R,)),
             "col": ((R,), (Shard(1),), (R,)), "k": ((Shard(1),), (Shard(0),), (R,)),
             "k_scatter": ((Shard(1),), (Shard(0),), (Shard(0),)),
             "2d": ((Shard(0), R), (R, Shard(1)), (R, R))}
    return table[_check(placement)]


def with_dtensor(placement: str, a: torch.Tensor, b: torch.Tensor, mesh_1d, mesh_2d=None) -> dict:
    """The same placement with DTensor; C's placements before ``redistribute`` say what it had to do
    (``Partial`` = partial sums waiting for a reduction)."""
    from torch.distributed.tensor import distribute_tensor

    pa, pb, pc = dtensor_placements(placement)
    mesh = mesh_2d if placement == "2d" else mesh_1d
    if mesh is None:
        raise ValueError("the 2d placement needs a 2 x 2 mesh: pass mesh_2d=init_device_mesh(dev, (2, 2))")
    da, db = distribute_tensor(a, mesh, list(pa)), distribute_tensor(b, mesh, list(pb))
    dc = da @ db
    before = [str(p) for p in dc.placements]
    full = dc.redistribute(mesh, list(pc))
    return {"placement": placement, "c_placements": before, "target": [str(p) for p in pc],
            "local": full.to_local(), "out": full.full_tensor()}


# ---------------------------------------------------------------- the link: alpha-beta
def measure_link(sizes, group=None, device=None, reps: int = 10) -> dict:
    """all_reduce of each size in ``sizes`` (bytes, float32) timed on every rank (slowest rank's median),
    fitted to alpha-beta against the bytes each rank sends (2(n-1)/n x size)."""
    n = dist.get_world_size(group)
    dev = device or torch.device("cpu")
    rows = []
    for s in sizes:
        x = torch.ones(max(s // 4, 1), device=dev)
        dist.barrier(group=group)
        t = timing.benchmark(lambda x=x: dist.all_reduce(x, group=group), device=dev, warmup=2, reps=reps,
                             min_reps=reps, max_time_s=float("inf"))
        rows.append({"bytes": x.numel() * 4, "sent": wire_factor("all_reduce", n) * x.numel() * 4,
                     "median_s": _slowest(t.median_s, dev, group)})
    fit = collectives.fit_alpha_beta([r["bytes"] for r in rows], [r["median_s"] for r in rows],
                                     wire_factor("all_reduce", n), op="all_reduce", world=n)
    out = {"alpha_s": fit.alpha_s, "beta_Bps": fit.busbw_GBps * 1e9, "points": fit.points, "rel_rms": fit.rel_rms}
    if fit.beta_s_per_byte == 0:
        out["note"] = "time did not grow with size: beta not measurable here (sweep larger sizes)"
    return out | {"sweep": rows}


def predict_comm_s(placement: str, m: int, n_: int, elem: int, n: int, alpha_s: float, beta_Bps: float) -> float:
    """alpha-beta time of the collective ``placement`` needs. ``alpha_s`` is an all_reduce's latency
    (2(n-1) ring steps), so an all_gather or reduce_scatter (n-1 steps) pays half of it."""
    op = COLLECTIVE[_check(placement)]
    if op is None:
        return 0.0
    latency = alpha_s if op == "all_reduce" else alpha_s / 2
    return latency + comm_bytes(placement, m, n_, elem, n) / beta_Bps


def table_rows(rec: dict) -> list[dict]:
    """The rows of lab2_shard's GEMM record for a notebook table (ms, MiB)."""
    return [{"placement": r["placement"], "collective": r["collective"], "MiB/rank": r["comm_bytes"] / 2**20,
             "rel_err hand": r["rel_err_hand"], "rel_err DTensor": r["rel_err_dtensor"],
             "compute ms": r["compute_s"] * 1e3, "comm ms": r["comm_s"] * 1e3,
             "predicted comm ms": r["predicted_comm_s"] * 1e3} for r in rec["gemm"]]


def plot(rec: dict, title: str):
    """Compute, communication and predicted communication per placement, side by side."""
    from .. import plots

    rows = table_rows(rec)
    fig, ax = plots.figure(title, "placement", "ms (median, slowest rank)", logy=True)
    x = np.arange(len(rows))
    for i, (k, c) in enumerate((("compute ms", "tab:blue"), ("comm ms", "tab:orange"),
                                ("predicted comm ms", "tab:gray"))):
        ax.bar(x + (i - 1) * 0.27, [max(r[k], 1e-4) for r in rows], 0.27, label=k.replace(" ms", ""), color=c)
    ax.set_xticks(x, [r["placement"] for r in rows])
    ax.legend()
    return fig
