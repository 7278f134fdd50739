"""labutils.parallel.gemm: bytes per placement by hand, the alpha-beta fit, the local pieces. The placements
on 4 ranks run in lab2 §2 (labutils.scripts.lab2_shard, which checks itself: tests/test_script_checks.py)."""

from __future__ import annotations

import pytest
import torch

from labutils.parallel import gemm


def test_bytes_each_placement_moves():
    M = N = 64  # float32, 4 ranks
    assert gemm.comm_bytes("replicated", M, N, 4, 4) == 0
    assert gemm.comm_bytes("row", M, N, 4, 4) == gemm.comm_bytes("2d", M, N, 4, 4) == 3 / 4 * M * N * 4
    assert gemm.comm_bytes("k", M, N, 4, 4) == 2 * 3 / 4 * M * N * 4
    assert gemm.comm_bytes("k_scatter", M, N, 4, 4) == 3 / 4 * M * N * 4
    with pytest.raises(ValueError, match="unknown placement"):
        gemm.comm_bytes("diagonal", M, N, 4, 4)


def test_local_pieces_rebuild_the_product():
    a, b = torch.randn(8, 12), torch.randn(12, 4)
    for pl in ("row", "col", "k", "2d"):
        pieces = [gemm.local_operands(pl, a, b, r, 4) for r in range(4)]
        if pl == "k":
            assert torch.allclose(sum(x @ y for x, y in pieces), a @ b, atol=1e-5)
        else:
            assert sum((x @ y).numel() for x, y in pieces) == 8 * 4


def test_predicted_comm_of_a_placement():
    assert gemm.predict_comm_s("k", 64, 64, 4, 4, 1e-5, 1e9) == pytest.approx(1e-5 + 24576 / 1e9)


def test_sizes_not_divisible_by_ranks_say_so():
    with pytest.raises(ValueError, match="M=6 is not divisible by the 4 ranks"):
        gemm._check_sizes(6, 8, 8, 4)
    with pytest.raises(ValueError, match="square number of ranks"):
        gemm._grid(3)
