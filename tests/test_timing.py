import time

import pytest

from labutils import timing


def test_stats_percentiles_match_numpy_definition():
    s = timing.stats(range(1, 101))
    assert s.n == 100 and s.min == 1 and s.max == 100
    assert s.p50 == pytest.approx(50.5)
    assert s.p20 < s.p50 < s.p80 < s.p90 < s.p99 <= s.max


def test_stats_drops_nonfinite_and_rejects_empty():
    assert timing.stats([1.0, float("nan"), None, 3.0]).n == 2
    with pytest.raises(ValueError, match="no finite samples"):
        timing.stats([])


def test_benchmark_counts_calls_and_separates_first_call():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.05 if len(calls) == 1 else 0.001)

    t = timing.benchmark(fn, warmup=2, reps=10, min_reps=1, device="cpu")
    assert len(calls) == 1 + 2 + t.n
    assert t.n == 10
    assert t.first_call_s > 0.04 > t.median_s
    assert t.p20_s <= t.median_s <= t.p80_s <= t.p99_s


def test_benchmark_respects_time_budget_but_keeps_min_reps():
    t = timing.benchmark(lambda: time.sleep(0.02), warmup=1, reps=1000, max_time_s=0.1, min_reps=3, device="cpu")
    assert 3 <= t.n <= 6


def test_benchmark_rotates_inputs():
    seen = []
    timing.benchmark(lambda x: seen.append(x), inputs=[(1,), (2,), (3,)], warmup=0, reps=6, device="cpu")
    assert {1, 2, 3} <= set(seen)


def test_benchmark_rejects_bad_arguments():
    with pytest.raises(ValueError):
        timing.benchmark(lambda: None, reps=0)


def test_stopwatch_and_formatting():
    with timing.stopwatch("cpu") as t:
        time.sleep(0.02)
    assert 0.015 < t.seconds < 1
    assert timing.fmt_s(2.5) == "2.5 s" and timing.fmt_s(0.0042) == "4.2 ms" and timing.fmt_s(3e-6) == "3 us"
    r = timing.Timing("x", "cpu", 0.01, 0.009, 0.012, 0.02, 0.008, 5, 0.1)
    assert r.rate(1e6) == pytest.approx(1e8)
    assert r.spread == pytest.approx(0.3)
    assert "10 ms median" in str(r)
