"""Where a decode step's time goes: torch.profiler over a few steps, busy time as the union of the kernels'
intervals, and the profiler's own console lines kept out of the output.

- ``profile_decode(stepper, prompt)``: wall vs busy time per token, launches per token, the top kernels.
  Busy = the union of the intervals during which at least one kernel (GPU) or top-level ATen op (CPU) ran,
  inside the profiled steps; busy fraction = busy / the wall time of those same profiled steps, so it is at
  most 100 % by construction (kernels that overlap, e.g. under programmatic dependent launch, count once).
  The summed kernel durations (which can exceed the wall time when kernels overlap) are reported apart.
- ``quiet_fds(drop)``: captures what C++ code writes to file descriptors 1 and 2 (the profiler's
  ``USDT ... profiler_start/stop`` lines) and passes every other line on.

scripts/decode_bench.py profiles its rungs with it. Used in lab4 §Profile and §What is left.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile

import torch

from . import timing

#: console lines of the profiler's C++ side that say nothing to a reader
PROFILER_NOISE = ("USDT", "profiler_start", "profiler_stop", "STAGE:")


@contextlib.contextmanager
def quiet_fds(drop=PROFILER_NOISE):
    """Capture file descriptors 1 and 2 (C/C++ writes, not only Python's); on exit write the captured lines that
    contain none of ``drop`` to ``sys.stderr``."""
    saved, tmp = [], tempfile.TemporaryFile(mode="w+b")
    for s in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            s.flush()
    try:
        for fd in (1, 2):
            saved.append((fd, os.dup(fd)))
            os.dup2(tmp.fileno(), fd)
        yield
    finally:
        for fd, old in saved:
            os.dup2(old, fd)
            os.close(old)
        tmp.seek(0)
        kept = [ln for ln in tmp.read().decode(errors="replace").splitlines() if not any(d in ln for d in drop)]
        tmp.close()
        if kept:
            print("\n".join(kept), file=sys.stderr)


def union_s(intervals) -> float:
    """Total length of the union of (start, end) intervals (any unit in, the same unit out)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def _events(prof, cuda: bool):
    """(name, start_us, end_us) of the device kernels (GPU) or of the ops Python called (CPU, no parent op)."""
    from torch.autograd import DeviceType

    evs = [e for e in prof.events() if (e.device_type == DeviceType.CUDA if cuda else e.cpu_parent is None)]
    return [(e.name, e.time_range.start, e.time_range.end) for e in evs]


def profile_decode(stepper, prompt, steps: int = 5, top: int = 8) -> dict:
    """torch.profiler over ``steps`` decode steps of ``stepper`` (prefill + step). GPU: the kernels and copies
    on the device; CPU: the ATen ops Python called (each would launch >= 1 kernel on a GPU). See the module
    docstring for busy; ``wall_s_per_token`` is timed without the profiler (which slows every launch)."""
    from torch.profiler import ProfilerActivity, profile

    dev, P = prompt.device, prompt.shape[1]
    cuda = dev.type == "cuda"
    walls, acts = [], [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for profiled in (False, False, True):  # warm-up, plain, profiled
        tok = stepper.prefill(prompt).argmax(-1, keepdim=True)
        with quiet_fds() if profiled else contextlib.nullcontext(), \
                profile(activities=acts, acc_events=True) if profiled else contextlib.nullcontext() as prof, \
                timing.stopwatch(dev) as wall:
            for i in range(steps):
                tok = stepper.step(tok, torch.arange(P + i, P + i + 1, device=dev)).argmax(-1, keepdim=True)
        walls.append(wall.seconds)
    evs = _events(prof, cuda)
    busy = union_s((a, b) for _, a, b in evs) / 1e6
    summed = sum(b - a for _, a, b in evs) / 1e6
    agg: dict[str, list[float]] = {}
    for name, a, b in evs:
        x = agg.setdefault(name, [0, 0.0])
        x[0], x[1] = x[0] + 1, x[1] + b - a
    rows = [{"kernel" if cuda else "op": n[:70], "calls/token": c / steps, "us/token": us / steps,
             "% of kernel time": 100 * us / 1e6 / summed}
            for n, (c, us) in sorted(agg.items(), key=lambda kv: -kv[1][1])]
    return {"device": dev.type, "steps": steps, "wall_s_per_token": walls[1] / steps,
            "wall_profiled_s_per_token": walls[2] / steps, "busy_s_per_token": busy / steps,
            "kernel_sum_s_per_token": summed / steps, "busy_fraction": min(1.0, busy / walls[2]),
            "launches_per_token": len(evs) / steps, "top": rows[:top]}
