"""lab3 part a: the communication model (labutils.netcost) and the scripts' argument checks. The scripts
themselves run on 2 simulated nodes x 2 ranks in lab3 §3-4 and check themselves (tests/test_script_checks.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from labutils import collectives, netcost, topology
from labutils.scripts import lab3_mistral

GLOO = {"SMML_DIST_BACKEND": "gloo", topology.SPLIT_ENV: "1"}
MiB = 2**20


def test_ddp_buckets_follow_ddps_rule():
    # parameters in reverse order: 1, 1, 3 MiB; the first bucket closes at 1 MiB, the next ones at the cap
    assert netcost.ddp_buckets([3 * MiB, MiB, MiB], cap_bytes=2 * MiB) == [MiB, 4 * MiB]
    assert netcost.ddp_buckets([MiB // 2] * 3, cap_bytes=25 * MiB) == [MiB, MiB // 2]
    assert sum(netcost.ddp_buckets([7] * 100, 64, first_bytes=16)) == 700


def test_predict_ddp_adds_alpha_per_bucket():
    fit = collectives.AlphaBeta("all_reduce", 4, alpha_s=1e-4, beta_s_per_byte=1e-9, factor=1.5, points=5, rel_rms=0)
    p = netcost.predict_ddp([MiB, 3 * MiB], fit, backward_s=1e-3)
    assert p["buckets"] == 2 and p["grad_bytes"] == 4 * MiB
    assert p["comm_s"] == pytest.approx(2e-4 + 1.5 * 4 * MiB * 1e-9)
    assert p["exposed_min_s"] == pytest.approx(max(1e-4 + 1.5 * 3 * MiB * 1e-9, p["comm_s"] - 1e-3))
    assert p["alpha_part_s"] == pytest.approx(2e-4)


def test_layout_traffic_hand_computed():
    cfg = SimpleNamespace(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=2, vocab_size=32)
    # TP=4 over 2 nodes of 2, decode of 4 sequences, fp32: per rank 2 layers x 2 all-reduces x 2*3/4 x (4*8*4 B)
    # + the logits all-gather 3/4 x (4*32*4 B); the ring crosses the node boundary twice
    tp4 = netcost.layout_traffic(cfg, {"tp": 4, "dp": 1}, per_node=2, dtype_bytes=4, batch=4, seq=3)
    per_rank = 4 * 1.5 * 128 + 0.75 * 512
    assert tp4["total_decode_bytes"] == pytest.approx(4 * per_rank)
    assert tp4["inter_decode_bytes"] == pytest.approx(2 * per_rank)
    # TP=2 inside each node x DP=2 across: decode crosses nothing; training sends each gradient shard across
    mixed = netcost.layout_traffic(cfg, {"tp": 2, "dp": 2}, per_node=2, dtype_bytes=4, batch=4, seq=3)
    assert mixed["inter_decode_bytes"] == 0 and mixed["total_decode_bytes"] > 0
    grads = netcost._params(cfg) * 4
    assert mixed["inter_train_bytes"] == pytest.approx(1.0 * grads / 2 * 2 * 2)  # 2(n-1)/n=1 x shard x 4 ranks
    assert tp4["tp_allreduces_train"] == 2 * 2 + 5 * 2 + 1


def test_layout_and_tp_size_errors():
    assert lab3_mistral.parse_layout("tp4xdp2", 8) == {"name": "tp4xdp2", "tp": 4, "dp": 2}
    with pytest.raises(ValueError, match="needs tp\\*dp = 4 ranks, the job has 8"):
        lab3_mistral.parse_layout("tp4", 8)
    with pytest.raises(ValueError, match="write tpT or tpTxdpD"):
        lab3_mistral.parse_layout("4x2", 8)
    with pytest.raises(ValueError, match=r"TP size 8 does not divide .* 8 attention heads and 4 KV heads.*\[1, 2, 4\]"):
        lab3_mistral.check_tp_size(SimpleNamespace(num_attention_heads=8, num_key_value_heads=4), 8)
