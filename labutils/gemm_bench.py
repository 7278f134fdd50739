"""GEMM sweeps for lab1, a shape search for the best GEMM this device can do, wave quantization and
launch overhead: the library behind lab1's sections 3-5 (``scripts/gemm_search`` is its command line).

Every product is checked against float64 by ``hardware.gemm`` before it is timed, and on a GPU
timed only after ``hardware.SETTLE_S`` seconds of running back-to-back, so that every shape, in a
sweep or in the search, is timed at the clock the GPU sustains under load. When the operands fit
in the last-level cache, ``sweep`` rotates through enough copies that each call reads from memory,
as a real model's layers do.

- ``sweep``: check and time a list of shapes; ``table`` / ``outliers``: each on its roof, and why not;
- ``search`` -> ``Search``: every (M, N, K) from a set of sizes, the fastest re-measured;
- ``waves``, ``kernel_names``, ``tile_of``: wave quantization (the tiles cuBLAS picked, read in a separate
  profiler process), ``profile_names`` being what that process runs;
- ``launch_overhead`` -> ``Launch``: per-op cost of tiny kernels, eager vs one CUDA graph.

Used in lab1 §3 Measured ceilings (shape search), §4 Sweeps on the roofline, §5 Why small is slow
(launch overhead, waves).
"""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import hardware, roofline, timing

CPU_CACHE_BYTES = 32 * 2**20  # a CPU has no single "L2" we can read portably; assume a typical LLC


def cache_bytes(device=None) -> int:
    info = hardware.describe()
    dev = torch.device(device) if device is not None else hardware.default_device()
    return (info.l2_bytes or 50 * 2**20) if dev.type == "cuda" else CPU_CACHE_BYTES


def rotation(m: int, n: int, k: int, dtype: str, cache: int, most: int = 16) -> int:
    """How many operand sets to cycle through so that together they are at least twice the cache."""
    c = roofline.gemm_cost(m, n, k, roofline.DTYPE_BYTES[dtype])
    return max(1, min(most, math.ceil(2 * cache / c.bytes)))


def sweep(shapes, dtype: str = "bfloat16", *, device=None, reps: int = 30, max_time_s: float = 1.0,
          settle_s: float | None = None, progress: bool = True, desc: str = "") -> list[hardware.GemmResult]:
    """Check and time every (m, n, k) in ``shapes``, rotating operands that fit in cache.

    On a GPU the products are replayed from a CUDA graph: each point is the GPU's time for the kernel,
    which is what the roofline models (section 5a of lab1 measures the launch cost it leaves out).
    """
    from tqdm.auto import tqdm

    cache = cache_bytes(device)
    out = []
    for m, n, k in tqdm(list(shapes), desc=desc or f"{dtype} GEMMs", disable=not progress, leave=False):
        out.append(hardware.gemm(m, n, k, dtype, device, reps=reps, max_time_s=max_time_s,
                                 rotate=rotation(m, n, k, dtype, cache), graph=True, settle_s=settle_s))
    return out


@dataclass
class Search:
    dtype: str
    values: tuple[int, ...]
    results: list  # first pass: every shape, short timing, fastest first
    confirmed: list  # second pass: the fastest few and the middle cube, timed like any lab GEMM
    n_total: int
    seconds: float
    budget_s: float = float("inf")  # the first pass stopped starting new shapes after this many seconds

    @property
    def complete(self) -> bool:
        return len(self.results) == self.n_total

    def coverage(self) -> str:
        """How many shapes the first pass timed and, if not all, why it stopped."""
        if self.complete:
            return f"searched all {self.n_total} shapes in {self.seconds:.0f} s"
        return (f"searched {len(self.results)} of {self.n_total} shapes: the first pass stops starting new ones "
                f"after its budget of {self.budget_s:g} s (profile.gemm_search_budget_s); {self.seconds:.0f} s "
                f"in all")

    @property
    def best(self) -> hardware.GemmResult:
        return self.confirmed[0]

    def as_dict(self) -> dict:
        def row(r):
            return {"m": r.m, "n": r.n, "k": r.k, "tflops": r.flops_per_s / 1e12, "rel_err": r.rel_err}

        return {"dtype": self.dtype, "values": list(self.values), "n_total": self.n_total,
                "n_done": len(self.results), "seconds": self.seconds, "budget_s": self.budget_s,
                "settle_s": self.best.timing.settle_s, "best": self.best.as_dict(),
                "confirmed": [row(r) for r in self.confirmed], "results": [row(r) for r in self.results]}


def search(values, dtype: str = "bfloat16", *, device=None, budget_s: float = 90.0, reps: int = 50,
           confirm: int = 5, settle_s: float | None = None, progress: bool = True) -> Search:
    """Every (M, N, K) with each dimension in ``values``, checked then timed briefly (stops at
    ``budget_s``); then the ``confirm`` fastest and the middle cube are timed again with ``reps``.

    Both passes settle first (``settle_s``, see ``hardware.gemm``), so shapes are ranked at the
    sustained clock. The second pass guards against the winner's curse: the fastest of many short,
    noisy timings is biased upwards, so the reported best is a re-measured one, timed exactly like
    the lab's GEMMs.
    """
    from tqdm.auto import tqdm

    vals = tuple(sorted(values))
    mid = (vals[len(vals) // 2],) * 3
    grid = sorted(itertools.product(vals, repeat=3), key=lambda s: (s != mid, s))
    t0 = time.perf_counter()
    done = []
    for m, n, k in tqdm(grid, desc=f"shape search ({dtype})", disable=not progress, leave=False):
        if done and time.perf_counter() - t0 > budget_s:  # the middle cube is always timed
            break
        done.append(hardware.gemm(m, n, k, dtype, device, reps=10, max_time_s=0.3, settle_s=settle_s))
    done.sort(key=lambda r: -r.flops_per_s)
    again = list(dict.fromkeys([(r.m, r.n, r.k) for r in done[:confirm]] + [mid]))
    confirmed = sorted((hardware.gemm(*s, dtype, device, reps=reps, settle_s=settle_s) for s in again),
                       key=lambda r: -r.flops_per_s)
    return Search(dtype, vals, done, confirmed, len(grid), time.perf_counter() - t0, budget_s)


def fmt_flops(flops_per_s: float) -> str:
    """A throughput in the unit that keeps 3 significant digits: ``"743 TFLOP/s"``, ``"1.2 GFLOP/s"``;
    a positive rate is never printed as ``"0.0"`` (a CPU's bf16 is GFLOP/s, not TFLOP/s)."""
    if not math.isfinite(flops_per_s) or flops_per_s <= 0:
        return f"{flops_per_s:g} FLOP/s"
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, "")):
        if flops_per_s >= scale or scale == 1.0:
            v = flops_per_s / scale
            return f"{v:.0f} {unit}FLOP/s" if v >= 99.95 else f"{v:.3g} {unit}FLOP/s"
    raise AssertionError("unreachable")


def table(results, ceil: roofline.Ceilings, series: str = "") -> list[dict]:
    """One row per GEMM: shape, AI, TFLOP/s, % of its dtype's roof, time per call, which roof binds."""
    rows = []
    for r in results:
        p = roofline.gemm_point(r, series)
        rows.append({"series": series, "M x N x K": p.label, "dtype": r.dtype, "AI": p.ai,
                     "TFLOP/s": r.flops_per_s / 1e12, "% of roof": ceil.pct(p.flops_per_s, p.ai, r.dtype),
                     "time": r.timing.median_s, "bound": "compute" if p.ai >= ceil.ridge(r.dtype) else "memory"})
    return rows


def outliers(rows: list[dict], ceil: roofline.Ceilings, below: float = 50.0, fixed_s: float = 10e-6,
             kind: str = "cuda"):
    """Rows under ``below`` % of roof (or over 110 %), each with the rule that most likely explains it.

    ``kind``: ``"cuda"`` or ``"cpu"`` (``hardware.describe().kind``): a CPU has no SMs, tiles or waves, and
    its roofs are one large product and one DRAM read, so its outliers get the CPU's reasons."""
    if kind != "cuda":
        return [{**r, "why": _cpu_why(r)} for r in rows if not below <= r["% of roof"] <= 110]
    out = []
    for r in rows:
        pct, ridge = r["% of roof"], ceil.ridge(r["dtype"])
        roof_s = r["time"] * pct / 100  # the time the roof allows
        if below <= pct <= 110:
            continue
        if pct > 110:
            why = "above the roof: operands served from a cache, or a bandwidth ceiling below the GEMM's own"
        elif roof_s < fixed_s:
            why = f"fixed per-kernel cost: the roof allows {roof_s * 1e6:.2g} us, it took {r['time'] * 1e6:.3g} us"
        elif ridge / 3 <= r["AI"] <= 3 * ridge:
            why = "near the ridge: memory and math overlap imperfectly"
        else:
            why = "too few tiles to fill every SM, or the library's kernel choice (section 5b)"
        out.append({**r, "why": why})
    return out


def _cpu_why(r: dict) -> str:
    """Why a CPU point is off its roof. On a CPU the % is of a roof measured with one large product."""
    if r["% of roof"] > 110:
        return ("CPU: above its roof - the roof is one large product and DRAM; this shape's operands sit in "
                "the CPU's caches, or its library path (blocking, threads) beats that product")
    if r["time"] < 50e-6:
        return f"CPU: fixed per-call cost (framework dispatch, thread wake-up) in a {r['time'] * 1e6:.3g} us call"
    return "CPU: the library's blocking and threading for this shape, or another process on the shared cores"


# ---------------------------------------------------------------- wave quantization
def waves(m: int, n: int, tile: tuple[int, int], units: int) -> tuple[int, int, float]:
    """(tiles, waves, efficiency) when an m x n output is cut into ``tile`` blocks run ``units`` at a time.

    Efficiency = tiles / (waves * units): the share of the last wave's slots that do work, averaged.
    """
    tiles = math.ceil(m / tile[0]) * math.ceil(n / tile[1])
    w = math.ceil(tiles / units)
    return tiles, w, tiles / (w * units)


def kernel_names(shapes, dtype: str = "bfloat16", device=None, timeout: float = 300) -> list[str | None]:
    """The GPU kernel torch.matmul launches for each (m, n, k) (cuBLAS names carry the tile size).

    Read with torch.profiler in a *separate process*: in this one, the profiler would leave CUPTI
    attached and slow every later launch (pytorch/pytorch#144455). A CPU has no kernels: all None.
    """
    dev = torch.device(device) if device is not None else hardware.default_device()
    shapes = [tuple(s) for s in shapes]
    if dev.type != "cuda":
        return [None] * len(shapes)
    cmd = [sys.executable, "-m", "labutils.scripts.gemm_search", "--dtype", dtype, "--names",
           *[",".join(map(str, s)) for s in shapes]]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True,
                             cwd=str(Path(__file__).resolve().parents[1]))
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, OSError, ValueError, IndexError) as e:
        return [f"unknown (profiler process failed: {type(e).__name__})"] * len(shapes)


def profile_names(shapes, dtype: str) -> list[str | None]:
    """The longest CUDA kernel name torch.matmul launches for each (m, n, k), read with torch.profiler
    (run in its own process by ``kernel_names``: ``python -m labutils.scripts.gemm_search --names``)."""
    t = {"float32": torch.float32, "float16": torch.float16}.get(dtype, torch.bfloat16)
    names = []
    for m, n, k in shapes:
        a, b = torch.randn(m, k, device="cuda", dtype=t), torch.randn(k, n, device="cuda", dtype=t)
        a @ b
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            a @ b
            torch.cuda.synchronize()
        ks = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        names.append(max(ks, key=len) if ks else None)
    return names


def tile_of(kernel_name: str | None) -> tuple[int, int] | None:
    """The output tile (rows of torch's M, columns of torch's N) in a cuBLAS kernel name such as
    ``nvjet_sm90_tst_256x128_...`` or ``..._tilesize256x128x64_...``; None if the name has none.

    The order was read off a measurement, not assumed: on an H100 with M = 2048, K = 4096 and
    ``nvjet_..._256x128_...``, throughput drops exactly where N/128 passes a multiple of 132/(2048/256).
    """
    import re

    hit = re.search(r"(\d{1,3})x(\d{1,3})", kernel_name or "")
    return (int(hit.group(1)), int(hit.group(2))) if hit else None


# ---------------------------------------------------------------- launch overhead
@dataclass(frozen=True)
class Launch:
    """Per-op time of a chain of tiny element-wise ops: eager dispatch vs one CUDA-graph replay."""

    n_ops: int
    numel: int
    eager_s_per_op: float
    graph_s_per_op: float | None  # None on a CPU: CUDA graphs need a GPU
    eager: timing.Timing
    graph: timing.Timing | None

    def as_dict(self) -> dict:
        return asdict(self) | {"eager": self.eager.as_dict(), "graph": self.graph and self.graph.as_dict()}


def launch_overhead(n_ops: int = 200, numel: int = 1024, device=None, reps: int = 20) -> Launch:
    """Time ``n_ops`` in-place adds on a ``numel``-element tensor, eagerly and (GPU) as one CUDA graph.

    Each add moves ~8 bytes per element, nanoseconds of work: what is left is launch/dispatch cost.
    Both paths are checked (x must equal the number of adds) before they are timed.
    """
    dev = torch.device(device) if device is not None else hardware.default_device()
    x = torch.zeros(numel, device=dev)

    def chain():
        for _ in range(n_ops):
            x.add_(1.0)
        return x

    def check(run, what):
        x.fill_(float("nan"))  # poisoned: a chain that skips the reset shows
        x.zero_()
        run()
        if not torch.equal(x, torch.full_like(x, float(n_ops))):
            raise RuntimeError(f"{what} chain of {n_ops} adds gave wrong values")

    check(chain, "eager")
    eager = timing.benchmark(chain, device=dev, reps=reps, label=f"{n_ops} adds, eager")
    graph = None
    if dev.type == "cuda":
        g = timing.graphed(chain, device=dev)
        check(g.run, g.note)
        graph = timing.benchmark(g.run, device=dev, reps=reps, label=f"{n_ops} adds, {g.note}")
    return Launch(n_ops, numel, eager.median_s / n_ops, graph and graph.median_s / n_ops, eager, graph)
