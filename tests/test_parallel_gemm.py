"""labutils.parallel.gemm: bytes per placement by hand, the alpha-beta fit, and every placement (by hand and
DTensor) plus the Megatron MLP (by hand and parallelize_module) against one device on 4 gloo ranks."""

from __future__ import annotations

import json

import pytest
import torch

from labutils import launch
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


def test_every_placement_and_the_mlp_match_one_device_on_4_gloo_ranks(tmp_path):
    out = tmp_path / "shard.json"
    args = ["--size", "64", "--link-sizes", "1024", "65536", "--reps", "2", "--mlp", "32", "64", "--out", out]
    launch.run("labutils.scripts.lab2_shard", args, nproc=4, env=launch.plan(4, "gloo").env, timeout=900,
               stream=False)
    rec = json.loads(out.read_text())
    rows = {r["placement"]: r for r in rec["gemm"]}
    assert set(rows) == set(gemm.PLACEMENTS)
    for r in rows.values():
        assert r["rel_err_hand"] < 1e-5 and r["rel_err_dtensor"] < 1e-5
        assert r["compute_s"] > 0 and (r["comm_s"] > 0 or r["collective"] is None)
    assert rows["k"]["dtensor_c"] == ["P(sum)"] and rows["2d"]["dtensor_c"] == ["S(0)", "S(1)"]
    assert rec["link"]["beta_Bps"] > 0
    for how in ("by hand", "parallelize_module"):
        assert rec["mlp"][how]["rel_err_out"] < 1e-5 and rec["mlp"][how]["rel_err_grads"] < 1e-5
