"""labutils.dist: a world of one without torchrun, backend choice, rank-0 printing; dist_check as plain python.

The collectives themselves (busbw factors, #wrong, the alpha-beta fit) are tested in test_collectives.py.

Multi-rank runs of the same code are in test_launch.py (dist_check under torchrun/gloo).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from labutils import collectives, dist
from labutils.scripts import dist_check


def test_init_world_of_one_without_torchrun(world_of_one):
    ctx = world_of_one
    assert (ctx.rank, ctx.world, ctx.local_rank, ctx.backend) == (0, 1, 0, "gloo")
    assert ctx.device == torch.device("cpu") and ctx.is_main
    assert dist.init() == ctx  # a second call (a re-run cell) joins the same group


def test_held_keeps_one_group_for_several_scripts_mains(monkeypatch):
    """lab2_training runs lab2_pipeline.main, then lab2_data.main: each one's destroy() must leave the group
    (re-creating it under torchrun with gloo is refused), and the group goes when held() ends, even on error."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SMML_DIST_BACKEND"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(RuntimeError, match="second script failed"):
        with dist.held(timeout_s=30) as ctx:
            group = torch.distributed.group.WORLD
            for _ in range(2):  # what each script's main does
                assert dist.init() == ctx
                dist.destroy()
                assert torch.distributed.is_initialized() and torch.distributed.group.WORLD is group
            raise RuntimeError("second script failed")
    assert not torch.distributed.is_initialized()


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
    assert doc["context"]["world"] == 1 and len(doc["sweep"]) == len(collectives.OPS)
    assert all(r["wrong"] == 0 for r in doc["sweep"])


def test_dist_check_writes_nothing_without_out(world_of_one, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert dist_check.main([]) == 0
    assert list(tmp_path.iterdir()) == []


def test_lines_of_ranks_sharing_a_pipe_never_interleave(tmp_path):
    """Two processes writing lines to one pipe, as torchrun's workers do: every line arrives whole.
    (With ``print`` a rank's READY line was seen glued inside another rank's line, so the fault drill
    never learnt rank 1's pid.)"""
    import subprocess
    import sys

    code = ("import sys; from labutils import dist\n"
            "for i in range(3000): dist.say(f'R{sys.argv[1]} line {i:05d} ' + 'x' * 150 + ' end')")
    env = {"PYTHONPATH": str(Path(__file__).resolve().parent.parent), "PYTHONUNBUFFERED": "1", "PATH": "/usr/bin:/bin"}
    r, w = os.pipe()
    procs = [subprocess.Popen([sys.executable, "-c", code, str(k)], stdout=w, env=env) for k in (0, 1)]
    os.close(w)
    with os.fdopen(r) as f:
        lines = f.read().splitlines()
    assert all(p.wait(timeout=600) == 0 for p in procs)
    assert len(lines) == 6000
    bad = [x for x in lines if not (x.startswith(("R0 line ", "R1 line ")) and x.endswith(" end") and len(x) == 168)]
    assert not bad, f"{len(bad)} lines came out mixed, e.g. {bad[0][:100]!r}"


def test_report_prints_each_problem_and_gives_the_exit_status(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    assert dist.report("lab2_x", []) == 0 and capsys.readouterr().out == ""
    assert dist.report("lab2_x", ["a is wrong", "b too"]) == 1
    assert capsys.readouterr().out.splitlines() == ["lab2_x: WRONG: a is wrong", "lab2_x: WRONG: b too"]
    monkeypatch.setenv("RANK", "2")
    assert dist.report("lab2_x", ["c"]) == 1 and capsys.readouterr().out == ""  # rank 0 speaks for the job
    assert dist.report("lab2_x", ["c"], every_rank=True) == 1
    assert capsys.readouterr().out == "lab2_x: WRONG on rank 2: c\n"
