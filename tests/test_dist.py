"""labutils.dist: busbw factors, the correctness check, a world of one without torchrun.

Multi-rank runs of the same code are in test_launch.py (dist_check under torchrun/gloo).
"""

from __future__ import annotations

import json

import pytest
import torch

from labutils import dist
from labutils.scripts import dist_check


@pytest.fixture
def world_of_one(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SMML_DIST_BACKEND"):
        monkeypatch.delenv(k, raising=False)
    ctx = dist.init(timeout_s=30)
    yield ctx
    dist.destroy()
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_busbw_factors_follow_nccl_tests(n):
    assert dist.busbw_factor("all_reduce", n) == pytest.approx(2 * (n - 1) / n)
    for op in ("all_gather", "reduce_scatter", "all_to_all"):
        assert dist.busbw_factor(op, n) == pytest.approx((n - 1) / n)
    assert dist.busbw_factor("broadcast", n) == 1.0


def test_busbw_factor_unknown_op():
    with pytest.raises(ValueError, match="all_reduce"):
        dist.busbw_factor("allreduce", 4)


@pytest.mark.parametrize("op", dist.OPS)
def test_skipped_collective_is_all_wrong(op):
    """Before the collective runs, every output element differs from the expected one: a no-op
    (or a rank whose data never arrived) cannot pass the check."""
    ctx = dist.DistContext(rank=1, world=4, local_rank=1, device=torch.device("cpu"), backend="gloo")
    fn, expected, out = dist._make(op, 4 * 30, ctx, torch.float32)
    assert out.numel() == expected.numel() > 0
    assert bool((out != expected).all())


def test_init_world_of_one_without_torchrun(world_of_one):
    ctx = world_of_one
    assert (ctx.rank, ctx.world, ctx.local_rank, ctx.backend) == (0, 1, 0, "gloo")
    assert ctx.device == torch.device("cpu") and ctx.is_main
    assert dist.init() == ctx  # a second call (a re-run cell) joins the same group


def test_collectives_at_world_one(world_of_one):
    for op in dist.OPS:
        r = dist.bench_collective(op, 4096, warmup=1, reps=3)
        assert r["wrong"] == 0 and r["bytes"] == 4096 and r["count"] == 1024
        assert r["reps"] == 3 and r["median_s"] > 0 and r["algbw_GBps"] > 0
        assert r["busbw_GBps"] == pytest.approx(r["algbw_GBps"] * dist.busbw_factor(op, 1))
    rows = dist.sweep(["all_reduce"], [1024, 8192], warmup=0, reps=2)
    assert [r["bytes"] for r in rows] == [1024, 8192]


def test_nccl_without_a_gpu_for_the_rank_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="LOCAL_RANK 3 has no GPU.*--nproc-per-node 2"):
        dist._pick_backend("nccl", 3)
    monkeypatch.setenv("SMML_DIST_BACKEND", "gloo")
    assert dist._pick_backend(None, 3) == "gloo"
    with pytest.raises(ValueError, match="'nccl' or 'gloo'"):
        dist._pick_backend("mpi", 0)


def test_print0_only_on_rank_zero(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    dist.print0("from rank 1")
    monkeypatch.setenv("RANK", "0")
    dist.print0("from rank 0")
    assert capsys.readouterr().out == "from rank 0\n"


def test_dist_check_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        dist_check.parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--fail-rank" in out and "--hang-rank" in out and "(default:" in out


def test_dist_check_runs_as_plain_python(world_of_one, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert dist_check.main(["--sweep", "--sizes", "1024", "--reps", "2", "--warmup", "0", "--out", str(out)]) == 0
    assert "dist_check: OK" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["context"]["world"] == 1 and len(doc["sweep"]) == len(dist.OPS)
    assert all(r["wrong"] == 0 for r in doc["sweep"])


def test_dist_check_writes_nothing_without_out(world_of_one, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert dist_check.main([]) == 0
    assert list(tmp_path.iterdir()) == []
