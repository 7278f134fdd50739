"""Sentences computed from a run's own numbers, so that what a lab prints follows the data.

- ``spread_note(t)``: says when a timing's p20-p80 spread is too wide to read closely (shared CPU cores), and
  prints the spread;
- ``ladder(rows, kind)``: lab1 §7's improvement ladder, rung by rung.

``ladder(rows, kind)`` takes the rows of lab1 §7 (each rung's predicted and measured µs per token, launch floor,
spread) and says, rung by rung, what changed by how much and which explanation fits *that* measurement — a
bf16 rung that is slower than fp32 gets the reason it can be slower, a static cache that is faster gets the
reason it can be faster. A change inside the timing spread is called noise, not a result.

Used in lab0 §Generate, §Benchmark and lab1 §1 Baseline, §7 Improvements.
"""

from __future__ import annotations

from . import timing

WIDE = 0.25  # (p80 - p20) / median above which a timing is too noisy to compare within a few %


def spread_note(t: timing.Timing, wide: float = WIDE) -> str:
    """"" when ``t``'s middle is narrow; else a sentence with its p20 / median / p80 and the ratio p80/p20."""
    if not t.spread > wide:
        return ""
    return (f"{t.label or 'timing'}: spread too wide to read closely - p20 {timing.fmt_s(t.p20_s)}, median "
            f"{timing.fmt_s(t.median_s)}, p80 {timing.fmt_s(t.p80_s)} (p80/p20 = {t.p80_s / t.p20_s:.2f}, n={t.n}); "
            f"other work on the shared cores, not the code, sets this much")


def _x(v: float) -> str:
    return f"x{v:.2f}"


def _noise(row: dict, prev: dict) -> float:
    """A relative change below this is noise: the p20-p80 spreads of the two timings (at least 5 %)."""
    return max(0.05, row.get("spread", 0.0) + prev.get("spread", 0.0))


def _verdict(m: float, p: float, tol: float) -> str:
    if abs(m - 1) <= tol:
        small = abs(m - 1) <= 0.05
        return "no change beyond the timing spread" if small else "inside the timing spread: unreadable here"
    if p > 1 + tol and m < 1 - tol:
        return "SLOWER, although predicted faster"
    if p < 1 - tol and m > 1 + tol:
        return "FASTER, although predicted slower"
    if abs(m - p) <= tol * max(1.0, p):
        return "as predicted"
    return "more than predicted" if m > p else "less than predicted"


def _floor(row: dict, prev: dict) -> str:
    a, b = prev["launch_floor_us_per_token"], row["launch_floor_us_per_token"]
    return f"launch floor {a:,.0f} -> {b:,.0f} us/token, measured {row['measured_us_per_token']:,.0f} us/token"


def _why(kind: str, change: str, m: float, tol: float, row: dict, prev: dict) -> str:
    """The explanation that fits the measured direction of one change."""
    floor_up = row["launch_floor_us_per_token"] > prev["launch_floor_us_per_token"] * (1 + tol)
    if change == "bf16":
        if m < 1 - tol:
            return ("the CPU has no bf16 units (AVX-512-BF16, AMX) in this kernel path: bf16 is converted to and from "
                    "fp32 around every op" if kind == "cpu" else
                    "the step is dominated by per-op cost, not by bytes (see its launch floor), so halving the bytes "
                    "cannot help" + (", and bf16 dispatches more ops (casts): the launch floor rose" if floor_up else
                     "; the bf16 kernels themselves are no faster at these tiny sizes"))
        if m > 1 + tol:
            return "part of the step waits on bytes; the rest is per-op cost that bf16 does not shrink"
        return "the step waits on per-op cost, not on bytes"
    if change == "sdpa":
        return ("fewer ops dispatched (one fused attention call instead of expand, matmul, mask, softmax, matmul)"
                if m > 1 + tol else "at batch 1 the attention is a small share of the step")
    if change == "batch":
        return "the per-step cost (launches, weight reads) is shared by every sequence in the batch"
    if m > 1 + tol:
        return ("the dynamic cache concatenates (allocates and copies) every layer's K and V at every step; the "
                "preallocated cache writes one slot in place, which saves more than reading the extra masked "
                "slots costs - the roofline counts the bytes read, not the allocations")
    if m < 1 - tol:
        return "every slot of the preallocated cache is read, masked, and K,V expanded for the mask: more bytes"
    return "the extra masked slots and the saved concatenations about cancel"


def ladder(rows: list[dict], kind: str = "cuda") -> list[str]:
    """One sentence per rung after the first: measured vs predicted speed-up, verdict, and why.

    ``rows``: lab1 §7's rows, in order (baseline fp32, + bf16, + sdpa, + batch, + static cache); each with
    ``predicted speed-up``, ``measured speed-up``, the µs per token and launch floor, optionally ``spread``."""
    names = ["bf16", "sdpa", "batch", "static"]
    out = []
    for prev, row, change in zip(rows, rows[1:], names):
        m, p, tol = row["measured speed-up"], row["predicted speed-up"], _noise(row, prev)
        verdict = _verdict(m, p, tol)
        why = (_why(kind, change, m, tol, row, prev) if "unreadable" not in verdict else
               "the two timings' p20-p80 spreads are wider than the change, so no explanation is tested; re-run "
               "with more repetitions or on a quieter machine (a launch-bound loop is as jittery as the host CPU "
               "that launches it, GPU or not; other work on shared cores adds to it)")
        out.append(f"{row['rung']}: measured {_x(m)}, predicted {_x(p)} - {verdict} "
                   f"(noise +-{tol:.0%}; {_floor(row, prev)}): {why}.")
    return out
