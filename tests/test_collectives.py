"""labutils.collectives and labutils.topology: busbw factors, #wrong, the alpha-beta fit, the NCCL log
parser, the node groups. The 2 nodes x 2 ranks sweep runs in lab3 §2 (collectives_bench checks itself)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from labutils import collectives, topology


# ---------------------------------------------------------------- busbw
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_busbw_factors_follow_nccl_tests(n):
    assert collectives.busbw_factor("all_reduce", n) == pytest.approx(2 * (n - 1) / n)
    for op in ("all_gather", "reduce_scatter", "all_to_all"):
        assert collectives.busbw_factor(op, n) == pytest.approx((n - 1) / n)
    assert collectives.busbw_factor("broadcast", n) == 1.0


@pytest.mark.parametrize("op, world, nbytes, seconds, algbw, busbw", [
    # 1 GiB all_reduce on 8 ranks in 10 ms: 107.374 GB/s algbw; x 2*7/8 = 187.905 GB/s busbw
    ("all_reduce", 8, 2**30, 0.010, 107.3741824, 187.9048192),
    # 256 MiB all_gather on 4 ranks in 2 ms: 134.218 GB/s; x 3/4 = 100.663
    ("all_gather", 4, 2**28, 0.002, 134.217728, 100.663296),
    ("reduce_scatter", 2, 2**20, 1e-4, 10.48576, 5.24288),
    ("broadcast", 8, 10**9, 0.5, 2.0, 2.0),
    ("all_to_all", 8, 8 * 10**6, 1e-3, 8.0, 7.0),
])
def test_bandwidths_hand_computed(op, world, nbytes, seconds, algbw, busbw):
    assert collectives.bandwidths(op, nbytes, seconds, world) == pytest.approx((algbw, busbw))


def test_busbw_factor_unknown_op():
    with pytest.raises(ValueError, match="all_reduce"):
        collectives.busbw_factor("allreduce", 4)


@pytest.mark.parametrize("op", collectives.OPS)
def test_skipped_collective_is_all_wrong(op):
    """Before the collective runs, every output element differs from the expected one: a no-op
    (or a rank whose data never arrived) cannot pass the check."""
    g = collectives.GroupView(rank=1, world=4, device=torch.device("cpu"), backend="gloo")
    fn, expected, out = collectives._make(op, 4 * 30, g, torch.float32)
    assert out.numel() == expected.numel() > 0
    assert bool((out != expected).all())


def test_collectives_at_world_one(world_of_one):
    for op in collectives.OPS:
        r = collectives.bench_collective(op, 4096, warmup=1, reps=3)
        assert r["wrong"] == 0 and r["bytes"] == 4096 and r["count"] == 1024
        assert r["reps"] == 3 and r["median_s"] > 0 and r["algbw_GBps"] > 0
        assert r["busbw_GBps"] == pytest.approx(r["algbw_GBps"] * collectives.busbw_factor(op, 1))
    seen = []
    rows = collectives.sweep(["all_reduce"], [1024, 8192], warmup=0, reps=2, on_point=seen.append)
    assert [r["bytes"] for r in rows] == [1024, 8192] and seen == rows


# ---------------------------------------------------------------- alpha-beta
def _synthetic(alpha, busbw_gbps, factor, noise, seed=0):
    n = np.array([4.0**k for k in range(5, 16)])  # 1 KiB .. 1 GiB
    t = alpha + factor * n / (busbw_gbps * 1e9)
    return n, t * np.random.default_rng(seed).lognormal(0, noise, n.size)


def test_alpha_beta_exact_on_noise_free_data():
    n, t = _synthetic(25e-6, 80.0, 1.75, noise=0.0)
    f = collectives.fit_alpha_beta(n, t, 1.75, op="all_reduce", world=8)
    assert f.alpha_s == pytest.approx(25e-6, rel=1e-6) and f.busbw_GBps == pytest.approx(80.0, rel=1e-6)
    assert f.rel_rms < 1e-9 and f.points == n.size
    assert f.predict(2**30) == pytest.approx(25e-6 + 1.75 * 2**30 / 80e9)
    # n_1/2: alpha = factor * n * beta  ->  n = 25e-6 * 80e9 / 1.75
    assert f.half_bandwidth_bytes() == pytest.approx(25e-6 * 80e9 / 1.75)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_alpha_beta_recovers_parameters_through_noise(seed):
    n, t = _synthetic(40e-6, 300.0, 1.0, noise=0.05, seed=seed)
    f = collectives.fit_alpha_beta(n, t, 1.0)
    assert f.alpha_s == pytest.approx(40e-6, rel=0.15)
    assert f.busbw_GBps == pytest.approx(300.0, rel=0.10)
    assert 0.01 < f.rel_rms < 0.15  # the noise shows in the residual


def test_alpha_beta_relative_weighting_keeps_the_latency():
    """An unweighted fit lets the 1 GiB point swamp alpha; the relative one must get it from the small sizes."""
    n, t = _synthetic(10e-6, 50.0, 1.0, noise=0.0)
    t[-1] *= 1.02  # 2 % off at the largest size shifts an unweighted alpha by far more than 10 us
    f = collectives.fit_alpha_beta(n, t, 1.0)
    assert f.alpha_s == pytest.approx(10e-6, rel=0.05)


def test_alpha_beta_pure_latency_and_bad_input():
    f = collectives.fit_alpha_beta([1e3, 1e4, 1e5], [5e-6, 5e-6, 5e-6])
    assert f.beta_s_per_byte == pytest.approx(0, abs=1e-18) and f.alpha_s == pytest.approx(5e-6)
    with pytest.raises(ValueError, match="at least two sizes"):
        collectives.fit_alpha_beta([1024], [1e-5])
    with pytest.raises(ValueError, match="at least two sizes"):
        collectives.fit_alpha_beta([1024, 2048], [1e-5, 0.0])


def test_fit_sweep_ratio_and_plot():
    rows = []
    for grp, alpha, bw in (("intra", 10e-6, 100.0), ("inter", 50e-6, 10.0)):
        n, t = _synthetic(alpha, bw, 1.5, noise=0.0)
        rows += [{"group": grp, "op": "all_reduce", "bytes": int(b), "median_s": s, "busbw_factor": 1.5,
                  "world": 4, "busbw_GBps": 1.5 * b / s / 1e9} for b, s in zip(n, t)]
    fits = collectives.fit_sweep(rows)
    assert set(fits) == {("intra", "all_reduce"), ("inter", "all_reduce")}
    assert fits[("inter", "all_reduce")].busbw_GBps == pytest.approx(10.0)
    table = collectives.ratio_table(rows, fits, "all_reduce")
    assert len(table) == 11
    assert table[0]["measured_ratio"] == pytest.approx(table[0]["fit_ratio"])
    assert table[0]["measured_ratio"] < 6 < table[-1]["measured_ratio"] == pytest.approx(10.0, rel=0.01)
    fig = collectives.plot_sweep(rows, fits, "all_reduce", device="test-device")
    assert "test-device" in fig.axes[0].get_title() and len(fig.axes[0].lines) == 4


# ---------------------------------------------------------------- NCCL's log, hosts, groups
# Written for this test from NCCL's documented INFO format (two fake nodes of 4 GPUs; rank 0's and
# rank 3's lines): P2P inside a node, the ring's node-crossing edges over the socket network.
CANNED_LOG = """\
box:4101:4101 [0] NCCL INFO NCCL version 2.27.5+cuda12.9
box:4101:4101 [0] NCCL INFO NCCL_HOSTID set by environment to box-node0
box:4101:4130 [0] NCCL INFO NET/IB : No device found.
box:4101:4130 [0] NCCL INFO NET/Socket : Using [0]eth0:10.0.0.5<0>
box:4101:4130 [0] NCCL INFO Using network Socket
box:4101:4130 [0] NCCL INFO comm 0x5581d2a0 rank 0 nRanks 8 nNodes 2 localRanks 4 localRank 0 MNNVL 0
box:4101:4130 [0] NCCL INFO Trees [0] 1/4/-1->0->-1 [1] 1/-1/-1->0->4
box:4101:4130 [0] NCCL INFO Channel 00/0 : 7[3] -> 0[0] [receive] via NET/Socket/0
box:4101:4130 [0] NCCL INFO Channel 01/0 : 7[3] -> 0[0] [receive] via NET/Socket/0
box:4101:4130 [0] NCCL INFO Channel 00/0 : 0[0] -> 1[1] via P2P/CUMEM/read
box:4101:4130 [0] NCCL INFO Channel 01/0 : 0[0] -> 1[1] via P2P/CUMEM/read
box:4101:4130 [0] NCCL INFO Connected all rings
box:4104:4133 [3] NCCL INFO Channel 00/0 : 3[3] -> 4[0] [send] via NET/Socket/0
box:4104:4133 [3] NCCL INFO Channel 01/0 : 3[3] -> 4[0] [send] via NET/Socket/0
box:4104:4133 [3] NCCL INFO Channel 00/0 : 3[3] -> 2[2] via P2P/IPC
box:4104:4133 [3] NCCL INFO comm 0x55f0e010 rank 3 nRanks 8 nNodes 2 localRanks 4 localRank 3 MNNVL 0
"""


def test_parse_nccl_log_canned():
    s = topology.parse_nccl_log(CANNED_LOG)
    assert s["connections"] == {"P2P/CUMEM": 2, "P2P/IPC": 1, "NET/Socket": 2}  # [receive] lines not counted
    assert (s["inter_node"], s["intra_node"]) == (2, 3)
    assert s["networks"] == ["Socket"] and s["hostids"] == ["box-node0"] and s["versions"] == ["2.27.5+cuda12.9"]
    assert {(c["nranks"], c["nnodes"], c["local_ranks"]) for c in s["comms"]} == {(8, 2, 4)}
    shm = topology.parse_nccl_log("box:1:1 [0] NCCL INFO Channel 00 : 0[0] -> 1[1] via SHM/direct/direct")
    m = topology.merge([s, shm])
    assert m["connections"]["SHM"] == 1 and m["intra_node"] == 4 and m["comm_shapes"] == [{"nranks": 8, "nnodes": 2}]
    line = topology.describe(m)
    assert "2 x NET/Socket (inter-node)" in line and "8 ranks on 2 node(s)" in line
    assert "gloo" in topology.describe(topology.merge([topology.parse_nccl_log("")]))


def test_parse_old_ring_format_and_families():
    s = topology.parse_nccl_log("n:1:2 [0] NCCL INFO Ring 00 : 0 -> 1 [send] via NET/IB/0/GDRDMA\n"
                                "n:1:2 [0] NCCL INFO Channel 00 : 2[af000] -> 3[b1000] via P2P/IPC\n")
    assert s["connections"] == {"NET/IB": 1, "P2P/IPC": 1}
    assert topology.transport_family("SHM/direct/direct") == "SHM"


def test_split_hosts_from_env():
    env = {"GROUP_RANK": "1"}
    assert topology.split_hosts_from_env(env) is None and "NCCL_HOSTID" not in env  # off unless asked
    env[topology.SPLIT_ENV] = "1"
    hid = topology.split_hosts_from_env(env)
    assert hid.endswith("-node1") and env["NCCL_HOSTID"] == hid
    env2 = {topology.SPLIT_ENV: "1", "GROUP_RANK": "0", "NCCL_HOSTID": "mine"}
    assert topology.split_hosts_from_env(env2) == "mine"  # the caller's choice is kept
    d = topology.nccl_debug_env("/x")
    assert d["NCCL_DEBUG"] == "INFO" and d["NCCL_DEBUG_SUBSYS"] == "INIT,GRAPH,NET" and "%p" in d["NCCL_DEBUG_FILE"]


@pytest.mark.parametrize("nodes, per, intra, inter", [(2, 2, [0, 1], [0, 2]), (2, 4, [0, 1, 2, 3], [0, 1, 4, 5])])
def test_node_groups(nodes, per, intra, inter):
    ranks = [{"rank": r, "node": r // per} for r in range(nodes * per)]
    g = topology.node_groups(ranks)
    assert g == {"intra": intra, "inter": inter, "world": list(range(nodes * per))}
    assert topology.node_groups([{"rank": r, "node": 0} for r in range(4)]) == {"world": [0, 1, 2, 3]}
