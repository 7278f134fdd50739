"""Scaling laws for data parallelism: Amdahl, Gustafson, an alpha-beta communication model, MFU,
and the compute-optimal budget of a model.

- ``amdahl(n, s)`` / ``fit_amdahl(ns, speedups)``: strong scaling (fixed global batch). With a serial
  fraction s, the speed-up on n ranks is 1 / (s + (1 - s) / n). Fitted by least squares on
  1/S - 1/n = s (1 - 1/n), which is linear in s.
- ``gustafson(n, s)`` / ``fit_gustafson(ns, scaled)``: weak scaling (fixed batch per rank). The scaled
  speed-up is n - s (n - 1); least squares on n - S = s (n - 1).
- ``allreduce_s(nbytes, n, alpha, beta)`` is a ring all-reduce under the alpha-beta model (fitted with
  ``labutils.collectives.fit_alpha_beta``):
  2 (n-1) alpha + 2 (n-1)/n bytes / beta. ``dp_step_s`` puts compute and that communication together
  to extrapolate a DP step to more ranks.
- ``flops_per_token(N, L, h, s)`` = 6 N + 12 L h s (forward + backward of the weights, and of
  attention over s tokens), ``mfu(...)`` against a peak, ``compute_optimal(N)``: D = 20 N tokens and
  C = 6 N D FLOPs, ``wall_clock_s(C, peak, mfu, devices)``.

Used in lab2 §Scaling laws.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


def _arrays(ns: Sequence[float], ys: Sequence[float], what: str) -> tuple[np.ndarray, np.ndarray]:
    n, y = np.asarray(ns, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    if n.shape != y.shape or n.ndim != 1:
        raise ValueError(f"{what}: rank counts and values must be two lists of one length, got {n.shape} and "
                         f"{y.shape}")
    if (n < 1).any() or not np.isfinite(y).all() or (y <= 0).any():
        raise ValueError(f"{what}: rank counts must be >= 1 and values finite and > 0; got {list(ns)}, {list(ys)}")
    if (n > 1).sum() < 1:
        raise ValueError(f"{what}: need at least one measurement at more than one rank to fit anything")
    return n, y


def amdahl(n, s: float):
    """Strong-scaling speed-up on ``n`` ranks with serial fraction ``s`` (Amdahl 1967)."""
    n = np.asarray(n, dtype=np.float64)
    return 1.0 / (s + (1.0 - s) / n)


def gustafson(n, s: float):
    """Weak-scaling (scaled) speed-up on ``n`` ranks with serial fraction ``s`` (Gustafson 1988)."""
    n = np.asarray(n, dtype=np.float64)
    return n - s * (n - 1.0)


@dataclass(frozen=True)
class Fit:
    law: str
    serial_fraction: float
    residual: float  # root-mean-square error of the fitted speed-ups against the measured ones

    def as_dict(self) -> dict:
        return asdict(self)


def fit_amdahl(ns: Sequence[float], speedups: Sequence[float]) -> Fit:
    """Least-squares serial fraction of measured strong-scaling speed-ups S(n) = t(1) / t(n)."""
    n, y = _arrays(ns, speedups, "fit_amdahl")
    x, z = 1.0 - 1.0 / n, 1.0 / y - 1.0 / n
    s = float(np.clip((x * z).sum() / (x * x).sum(), 0.0, 1.0))
    return Fit("amdahl", s, float(np.sqrt(np.mean((amdahl(n, s) - y) ** 2))))


def fit_gustafson(ns: Sequence[float], scaled: Sequence[float]) -> Fit:
    """Least-squares serial fraction of weak-scaling speed-ups S(n) = n t(1) / t(n) (work grows with n)."""
    n, y = _arrays(ns, scaled, "fit_gustafson")
    x, z = n - 1.0, n - y
    s = float(np.clip((x * z).sum() / (x * x).sum(), 0.0, 1.0))
    return Fit("gustafson", s, float(np.sqrt(np.mean((gustafson(n, s) - y) ** 2))))


def allreduce_s(nbytes: float, n: int, alpha: float, beta: float) -> float:
    """Ring all-reduce of ``nbytes`` on ``n`` ranks: 2 (n-1) latencies and 2 (n-1)/n of the bytes per link."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) * alpha + 2 * (n - 1) / n * nbytes / beta


def dp_step_s(compute_1: float, grad_bytes: float, n: int, alpha: float, beta: float, *,
              weak: bool = False, overlap: bool = False) -> float:
    """Predicted DP step time on ``n`` ranks: compute (``compute_1`` on one rank, split n ways unless
    ``weak``) plus the gradient all-reduce; with ``overlap`` it hides behind the backward (2/3 of compute)."""
    compute = compute_1 if weak else compute_1 / n
    comm = allreduce_s(grad_bytes, n, alpha, beta)
    return compute + (max(0.0, comm - compute * 2 / 3) if overlap else comm)


def flops_per_token(n_params: float, layers: int, hidden: int, seq: int) -> float:
    """Training FLOPs per token: 6 N (forward 2N + backward 4N) + 12 L h s (attention scores and values)."""
    return 6.0 * n_params + 12.0 * layers * hidden * seq


def mfu(tokens_per_s: float, n_params: float, layers: int, hidden: int, seq: int, peak_flops: float,
        devices: int = 1) -> float:
    """Model FLOPs utilisation: useful FLOP/s (``flops_per_token`` x tokens/s) over ``devices`` x peak."""
    if not peak_flops or peak_flops <= 0:
        raise ValueError("mfu needs a peak in FLOP/s > 0 (hardware.matmul_peak or hardware.datasheet)")
    return tokens_per_s * flops_per_token(n_params, layers, hidden, seq) / (devices * peak_flops)


@dataclass(frozen=True)
class Budget:
    params: float
    tokens: float  # D = tokens_per_param x N
    flops: float  # C = 6 N D

    def as_dict(self) -> dict:
        return asdict(self)


def compute_optimal(n_params: float, tokens_per_param: float = 20.0) -> Budget:
    """The compute-optimal ('Chinchilla') budget: D ~ 20 N tokens, C ~ 6 N D FLOPs."""
    d = tokens_per_param * n_params
    return Budget(n_params, d, 6.0 * n_params * d)


def wall_clock_s(flops: float, peak_flops: float, mfu_: float, devices: int = 1) -> float:
    """Seconds to spend ``flops`` on ``devices`` running at ``mfu_`` of ``peak_flops`` each."""
    if not (0 < mfu_ <= 1) or peak_flops <= 0 or devices < 1:
        raise ValueError(f"wall_clock_s needs 0 < mfu <= 1, a peak > 0 and devices >= 1; got {mfu_}, "
                         f"{peak_flops}, {devices}")
    return flops / (peak_flops * mfu_ * devices)
