"""One benchmark harness for every lab.

``benchmark(fn)`` warms up, then times many repetitions with the device's own
clock (CUDA events on a GPU, ``perf_counter`` after a synchronise on the CPU),
and returns the median with p20/p80/p99 spread. The first call is timed apart
(``first_call_s``): it holds lazy initialisation and compilation, which must
never leak into a steady-state number. ``settle_s`` keeps the device busy with
``fn`` for that long before the timed reps, so that work heavy enough to hit the
GPU's power limit is timed at the clock it holds under sustained load, not at
the boost clock of a short burst. ``stats`` summarises any list of latencies
(the serving client uses it for TTFT/TPOT/ITL percentiles). ``graphed(fn)``
captures a sequence of GPU ops in one CUDA graph, so that timing its replay
measures the GPU's time rather than Python's launch rate.

Used in every lab, first in lab0 §Benchmark.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Stats:
    """Summary of a sample of durations (seconds) or any other values."""

    n: int
    mean: float
    min: float
    p20: float
    p50: float
    p80: float
    p90: float
    p99: float
    max: float

    def as_dict(self) -> dict:
        return asdict(self)


def stats(samples: Sequence[float]) -> Stats:
    """Median, spread and tail of ``samples``; raises on an empty sample."""
    a = np.asarray([s for s in samples if s is not None and math.isfinite(s)], dtype=np.float64)
    if a.size == 0:
        raise ValueError("no finite samples to summarise: did the benchmark run at all?")
    q = np.percentile(a, [20, 50, 80, 90, 99])
    return Stats(int(a.size), float(a.mean()), float(a.min()), *map(float, q), float(a.max()))


@dataclass(frozen=True)
class Timing:
    """Result of ``benchmark``: seconds per call, with spread."""

    label: str
    device: str
    median_s: float
    p20_s: float
    p80_s: float
    p99_s: float
    min_s: float
    n: int
    first_call_s: float
    settle_s: float = 0.0  # seconds of back-to-back calls run just before the timed reps

    @property
    def spread(self) -> float:
        """(p80 - p20) / median: a relative width of the middle of the sample."""
        return (self.p80_s - self.p20_s) / self.median_s if self.median_s > 0 else float("nan")

    def rate(self, work: float) -> float:
        """``work`` per second at the median, e.g. FLOPs/s or bytes/s."""
        return work / self.median_s

    def as_dict(self) -> dict:
        return asdict(self) | {"spread": self.spread}

    def __str__(self) -> str:
        return (f"{self.label + ': ' if self.label else ''}{fmt_s(self.median_s)} median "
                f"(p20 {fmt_s(self.p20_s)}, p80 {fmt_s(self.p80_s)}, n={self.n}; "
                f"first call {fmt_s(self.first_call_s)})")


def fmt_s(s: float) -> str:
    """Seconds in the unit a reader wants: 1.23 s, 4.56 ms, 7.89 us."""
    if s >= 1:
        return f"{s:.3g} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} us"


def synchronize(device: torch.device | str | None) -> None:
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _guess_device(device) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class _L2Flusher:
    """Zeroes a buffer larger than the GPU's L2 before each rep (Triton's do_bench habit)."""

    def __init__(self, device: torch.device):
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
        self.buf = torch.empty(int(l2 * 2) // 4, dtype=torch.int32, device=device)

    def __call__(self) -> None:
        self.buf.zero_()


def benchmark(fn: Callable[..., object], *, inputs: Sequence[tuple] | None = None, device=None,
              warmup: int = 3, reps: int = 30, max_time_s: float = 5.0, min_reps: int = 5,
              flush_l2: bool = False, settle_s: float = 0.0, label: str = "") -> Timing:
    """Time ``fn`` (or ``fn(*inputs[i])``, rotating through ``inputs``).

    Warm-up calls run first (the first one timed on its own as ``first_call_s``);
    then, if ``settle_s`` > 0, untimed calls back-to-back for ``settle_s`` seconds (see ``settle``);
    then up to ``reps`` timed calls, fewer if they would exceed ``max_time_s``
    (never fewer than ``min_reps``). Rotate ``inputs`` when one set fits in cache.
    """
    if reps < 1 or warmup < 0:
        raise ValueError("reps must be >= 1 and warmup >= 0")
    dev = _guess_device(device)
    args = list(inputs) if inputs else [()]
    call = (lambda i: fn(*args[i % len(args)]))
    synchronize(dev)
    t0 = time.perf_counter()
    call(0)
    synchronize(dev)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(warmup):
        call(i + 1)
    synchronize(dev)
    per_call = (time.perf_counter() - t0) / warmup if warmup else first
    n = int(max(min_reps, min(reps, max_time_s / max(per_call, 1e-9))))
    if settle_s > 0:
        settle(call, settle_s, dev, per_call)
    times = _timed_reps(call, n, dev, flush_l2)
    s = stats(times)
    return Timing(label, str(dev), s.p50, s.p20, s.p80, s.p99, s.min, s.n, first, settle_s)


def settle(call: Callable[[int], object], seconds: float, device=None, per_call: float = 1e-3) -> int:
    """Run ``call(i)`` back-to-back for at least ``seconds`` (synchronising every ~10 ms); returns the count.

    A GPU under full load lowers its clock within tens of milliseconds to stay inside its power limit,
    so a short timing after idle sees the boost clock and a long one the sustained clock. Settling
    first makes every timing see the sustained clock, whatever its length or what ran before it.
    """
    dev = _guess_device(device)
    chunk = max(1, int(0.01 / max(per_call, 1e-9)))
    t0, i = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        for _ in range(chunk):
            call(i)
            i += 1
        synchronize(dev)
    return i


def _timed_reps(call, n: int, dev: torch.device, flush_l2: bool) -> list[float]:
    if dev.type == "cuda":
        flush = _L2Flusher(dev) if flush_l2 else None
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for i, (start, end) in enumerate(events):
            if flush:
                flush()
            start.record()
            call(i)
            end.record()
        torch.cuda.synchronize(dev)
        return [s.elapsed_time(e) / 1e3 for s, e in events]
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        call(i)
        times.append(time.perf_counter() - t0)
    return times


@dataclass
class Elapsed:
    seconds: float = float("nan")


@contextmanager
def stopwatch(device=None):
    """Wall time of a one-off block (load, compile), device-synchronised at both ends.

    >>> with stopwatch() as t: ...
    >>> t.seconds
    """
    dev = _guess_device(device)
    out = Elapsed()
    synchronize(dev)
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        synchronize(dev)
        out.seconds = time.perf_counter() - t0


# ---------------------------------------------------------------- CUDA graphs
@dataclass
class Graphed:
    """``run()`` replays the captured calls; ``check()`` poisons their outputs (NaN), replays once and
    returns them, so they can be compared with a reference before anything is timed."""

    run: Callable[[], object]
    check: Callable[[], object]
    is_graph: bool
    note: str


def _poison(x) -> None:
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        x.fill_(float("nan"))
    elif isinstance(x, (list, tuple)):
        for v in x:
            _poison(v)


def graphed(fn: Callable[[], object], device=None) -> Graphed:
    """Capture ``fn`` (a fixed sequence of GPU ops) in one CUDA graph; replaying it costs one CPU launch
    for all its kernels, so timing the replay measures GPU time rather than Python's launch rate.

    On a CPU, or if capture fails, ``run`` is ``fn`` itself and ``note`` says so (nothing is hidden).
    Used in lab1 §Sweeps, §Launch overhead, §Layer by layer.
    """
    dev = _guess_device(device)
    if dev.type != "cuda":
        return Graphed(fn, fn, False, "eager (CUDA graphs need a GPU)")
    try:
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            fn()  # warm-up off the default stream, as capture requires
        torch.cuda.current_stream(dev).wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            outs = fn()
    except RuntimeError as e:  # a capture-unsafe op: time it eagerly and say so
        torch.cuda.synchronize(dev)
        return Graphed(fn, fn, False, f"eager (CUDA-graph capture failed: {str(e)[:80]})")

    def check():
        _poison(outs)
        g.replay()
        torch.cuda.synchronize(dev)
        return outs

    return Graphed(g.replay, check, True, "CUDA graph replay")


class TokenClock:
    """A timestamp per token on the device's clock: CUDA events (recorded without a sync), else perf_counter."""

    def __init__(self, device):
        self.cuda, self.marks = torch.device(device).type == "cuda", []

    def _now(self):
        if not self.cuda:
            return time.perf_counter()  # CPU ops are synchronous
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def start(self):
        self.marks = [self._now()]

    def mark(self):
        self.marks.append(self._now())

    def seconds(self) -> list[float]:
        """Time of every mark since ``start``."""
        if self.cuda:
            self.marks[-1].synchronize()
            return [self.marks[0].elapsed_time(e) / 1e3 for e in self.marks[1:]]
        return [t - self.marks[0] for t in self.marks[1:]]


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64: the check every timed result passes first (NaN fails any check)."""
    o, r = out.detach().double().flatten(), ref.detach().double().to(out.device).flatten()
    return ((o - r).norm() / r.norm()).item()
