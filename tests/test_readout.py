"""lab1 §7's prose is computed from the run: labutils.readout.ladder on the committed H100 rungs and made-up ones."""

import json
from pathlib import Path

from labutils import readout, timing

H100 = Path(__file__).parents[1] / "results/h100-80gb-hbm3/lab1.json"


def test_h100_rungs_say_bf16_was_slower_and_the_static_cache_faster():
    rows = json.loads(H100.read_text())["sections"]["improvements"]["rungs"]
    bf16, sdpa, batch, static = readout.ladder(rows, "cuda")
    assert "measured x0.71, predicted x2.00 - SLOWER, although predicted faster" in bf16
    assert "per-op cost" in bf16 and "launch floor rose" in bf16  # 5,682 -> 6,332 us/token in that run
    assert "FASTER, although predicted slower" in static and "measured x1.26" in static
    assert "concatenates" in static
    assert "measured x187" in batch and "shared by every sequence" in batch


def rung(label, us, floor, pred_up, meas_up, spread=0.01):
    return {"rung": label, "measured_us_per_token": us, "launch_floor_us_per_token": floor,
            "predicted speed-up": pred_up, "measured speed-up": meas_up, "spread": spread}


def test_the_explanation_follows_the_measured_direction():
    base = rung("0", 100, 50, 1.0, 1.0)
    fast = [base, rung("1 + bf16", 52, 40, 2.0, 1.95), rung("2", 50, 30, 1.03, 1.04),
            rung("3", 5, 3, 10, 10), rung("4 + static", 6, 3, 0.8, 0.82)]
    bf16, sdpa, _, static = readout.ladder(fast, "cuda")
    assert "as predicted" in bf16 and "waits on bytes" in bf16
    assert "no change beyond the timing spread" in sdpa
    assert "less than predicted" not in static and "more bytes" in static
    slow_cpu = [base, rung("1 + bf16", 300, 50, 2.0, 1 / 3)] + fast[2:]
    assert "no bf16 units" in readout.ladder(slow_cpu, "cpu")[0]


def test_a_wide_spread_is_called_noise():
    rows = [rung("0", 100, 50, 1.0, 1.0, 0.3), rung("1 + bf16", 80, 50, 2.0, 1.25, 0.3)] + \
        [rung(str(i), 80, 50, 1.0, 1.0) for i in range(2, 5)]
    line = readout.ladder(rows)[0]
    assert "inside the timing spread: unreadable here" in line and "+-60%" in line and "re-run" in line
    assert "per-op cost" not in line  # no explanation offered for a change the noise can hide


def test_spread_note_only_for_a_wide_spread_and_prints_it():
    narrow = timing.Timing("gen", "cpu", 1.0, 0.95, 1.05, 1.2, 0.9, 10, 2.0)
    wide = timing.Timing("gen", "cpu", 1.0, 0.6, 1.8, 2.5, 0.5, 10, 2.0)
    assert readout.spread_note(narrow) == ""
    note = readout.spread_note(wide)
    assert "too wide" in note and "p20 600 ms" in note and "p80 1.8 s" in note and "p80/p20 = 3.00" in note
