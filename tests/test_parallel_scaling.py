"""labutils.parallel.scaling: Amdahl / Gustafson / alpha-beta fits on synthetic data, MFU and budget maths."""

from __future__ import annotations

import numpy as np
import pytest

from labutils.parallel import scaling as sc


@pytest.mark.parametrize("s", [0.0, 0.05, 0.3])
def test_amdahl_fit_recovers_the_serial_fraction(s):
    ns = [1, 2, 4, 8, 16]
    noisy = sc.amdahl(ns, s) * (1 + np.array([0.0, 0.01, -0.01, 0.005, -0.005]))
    fit = sc.fit_amdahl(ns, noisy)
    assert fit.serial_fraction == pytest.approx(s, abs=0.01)
    assert fit.law == "amdahl" and fit.residual < 0.2


def test_amdahl_hand_computed():
    assert sc.amdahl(4, 0.1) == pytest.approx(1 / (0.1 + 0.9 / 4))  # 3.077
    assert sc.amdahl(1, 0.5) == 1.0
    assert sc.gustafson(4, 0.1) == pytest.approx(4 - 0.3)


@pytest.mark.parametrize("s", [0.0, 0.1, 0.5])
def test_gustafson_fit_recovers_the_serial_fraction(s):
    ns = [1, 2, 4]
    fit = sc.fit_gustafson(ns, sc.gustafson(ns, s))
    assert fit.serial_fraction == pytest.approx(s, abs=1e-9) and fit.residual < 1e-9


def test_fits_reject_bad_input():
    with pytest.raises(ValueError, match="one length"):
        sc.fit_amdahl([1, 2], [1.0])
    with pytest.raises(ValueError, match="more than one rank"):
        sc.fit_amdahl([1, 1], [1.0, 1.0])
    with pytest.raises(ValueError, match="finite and > 0"):
        sc.fit_gustafson([1, 2], [1.0, float("nan")])


def test_ring_allreduce_and_dp_step_model():
    assert sc.allreduce_s(1e9, 1, 1e-5, 1e9) == 0.0
    assert sc.allreduce_s(1e9, 4, 0.0, 1e9) == pytest.approx(1.5)  # 2 (n-1)/n of the bytes
    assert sc.allreduce_s(0, 4, 1e-5, 1e9) == pytest.approx(6e-5)  # 2 (n-1) latencies
    assert sc.dp_step_s(1.0, 1e9, 4, 0.0, 1e9) == pytest.approx(0.25 + 1.5)
    assert sc.dp_step_s(1.0, 1e9, 4, 0.0, 1e9, weak=True, overlap=True) == pytest.approx(1.0 + 1.5 - 2 / 3)
    assert sc.dp_step_s(3.0, 1e6, 2, 0.0, 1e9, weak=True, overlap=True) == pytest.approx(3.0)  # all hidden


def test_mfu_and_compute_optimal_budget_by_hand():
    n, L, h, s = 7.24e9, 32, 4096, 4096
    assert sc.flops_per_token(n, L, h, s) == pytest.approx(6 * n + 12 * L * h * s)
    assert sc.mfu(1000.0, n, L, h, s, 1e15, devices=4) == pytest.approx(1000 * (6 * n + 12 * L * h * s) / 4e15)
    b = sc.compute_optimal(7e9)
    assert b.tokens == pytest.approx(1.4e11) and b.flops == pytest.approx(6 * 7e9 * 1.4e11)
    assert sc.wall_clock_s(1e18, 1e15, 0.5, 2) == pytest.approx(1000.0)
    with pytest.raises(ValueError, match="0 < mfu <= 1"):
        sc.wall_clock_s(1e18, 1e15, 40, 1)
    with pytest.raises(ValueError, match="peak"):
        sc.mfu(1.0, n, L, h, s, 0.0)
