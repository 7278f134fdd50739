"""Fault tolerance: a killed rank, a torchrun restart, a resume to the unbroken run's loss; clear errors.

Every job is train.py on 2 gloo ranks through labutils.launch (fault.run_train), with
TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (fault.RESTART_ENV) so that a restart reconnects on torch 2.13.
"""

from __future__ import annotations

import signal
import socket

import pytest

from labutils import fault, launch

ENV = {"SMML_DIST_BACKEND": "gloo", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
TIMEOUT = 900  # a ceiling for a loaded 2-core machine, not an expectation
SMALL = ["--steps", "4", "--ckpt-every", "2", "--layers", "1", "--seq", "32"]


def test_restart_resumes_to_the_unbroken_loss(tmp_path):
    """FSDP2 + DCP: rank 1 dies before step 4, torchrun restarts both, the job resumes from step 2."""
    args = [*SMALL, "--parallel", "fsdp"]
    unbroken = fault.run_train(args, nproc=2, env=ENV, timeout=TIMEOUT)
    crashed = fault.run_train([*args, "--ckpt-dir", tmp_path / "ck", "--crash-at-step", "4", "--crash-rank", "1"],
                              nproc=2, env=ENV, max_restarts=1, timeout=TIMEOUT)
    tl = crashed.timeline
    assert [a.number for a in tl.attempts] == [0, 1] and tl.crash["rank"] == 1
    assert tl.attempts[1].resumed_from == 2 and crashed.record["resumed_from"] == 2
    assert crashed.record["final_loss"] == unbroken.record["final_loss"]  # bit-identical, not close
    cmp = fault.compare(unbroken.timeline.losses(), tl.losses())
    assert cmp["bit_identical"] and cmp["steps"] == 4, cmp
    rec = fault.recovery(tl)
    assert 0 < rec["crash_to_first_step_s"] < TIMEOUT and rec["redone_steps"] == 1
    assert all(rec[k] >= 0 for k in ("stop_and_restart_s", "imports_s", "init_build_load_s", "first_step_s"))


def test_a_hung_rank_is_named(tmp_path):
    with pytest.raises(fault.DrillError, match=r"rank\(s\) 1 stopped answering"):
        fault.run_train([*SMALL, "--hang-at-step", "2", "--hang-rank", "1", "--heartbeat-s", "20"],
                        nproc=2, env=ENV, timeout=TIMEOUT)


def test_a_rank_that_dies_before_the_rendezvous(tmp_path):
    with pytest.raises(fault.DrillError, match="exited with code 4") as e:
        fault.run_train([*SMALL, "--exit-before-init", "1"], nproc=2, env=ENV, timeout=TIMEOUT)
    assert "rank 1: --exit-before-init" in e.value.output


def test_a_missing_node_is_a_clear_error():
    """One agent of --nnodes 2, alone: the rendezvous times out (join_timeout=5) and the error says why."""
    port = launch.free_port()
    with pytest.raises(fault.DrillError, match=r"expects 2 nodes \(--nnodes 2\)"):
        fault.run_train(SMALL, nproc=1, nnodes=2, rdzv_endpoint=f"127.0.0.1:{port}", timeout=TIMEOUT,
                        env=ENV | {"PET_RDZV_CONF": "join_timeout=5"})  # torchrun reads PET_<flag> variables


def test_a_busy_port_is_refused_before_anything_starts():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        with pytest.raises(ValueError, match="in use"):
            fault.run_train(SMALL, nproc=2, env=ENV, port=s.getsockname()[1])


def test_restarts_need_one_agent():
    with pytest.raises(ValueError, match="nodes=1"):
        fault.run_train(SMALL, nodes=2, max_restarts=1)


# ---------------------------------------------------------------- parsing, no processes
OUTPUT = """\
READY rank=0 world=2 node=0 local_rank=0 pid=11 attempt=0 backend=gloo import_s=5.00 t=100.000
READY rank=1 world=2 node=0 local_rank=1 pid=12 attempt=0 backend=gloo import_s=5.00 t=100.500
step 1/3 loss=7.5 attempt=0 dt=0.100 t=101.000
step 2/3 loss=7.25 attempt=0 dt=0.100 t=102.000
CRASH rank=1 step=3 attempt=0 t=102.500
READY rank=0 world=2 node=0 local_rank=0 pid=21 attempt=1 backend=gloo import_s=4.00 t=110.000
READY rank=1 world=2 node=0 local_rank=1 pid=22 attempt=1 backend=gloo import_s=4.50 t=110.500
RESUMED from step 2 (plain checkpoint step-00000002, world 2) load_s=0.100 t=112.000
step 3/3 loss=7.125 attempt=1 dt=0.100 t=113.000
DONE final_loss=7.125 steps=3 parallel=ddp attempt=1 t=113.100
"""


def test_timeline_and_recovery_phases():
    tl = fault.timeline(OUTPUT)
    assert tl.final_loss == 7.125 and tl.losses() == {1: 7.5, 2: 7.25, 3: 7.125}
    r = fault.recovery(tl)
    assert r["crash_to_first_step_s"] == pytest.approx(10.5)
    assert r["stop_and_restart_s"] == pytest.approx(3.5)  # crash 102.5 -> first process up at 106.0
    assert r["imports_s"] == pytest.approx(4.5) and r["init_build_load_s"] == pytest.approx(1.5)
    assert r["first_step_s"] == pytest.approx(1.0) and r["redone_steps"] == 0
    with pytest.raises(ValueError, match="max_restarts"):
        fault.recovery(fault.timeline(OUTPUT.split("CRASH")[0]))


def test_compare_reports_the_largest_difference():
    c = fault.compare({1: 2.0, 2: 1.0}, {1: 2.0, 2: 1.0 + 1e-6}, rtol=1e-5)
    assert not c["bit_identical"] and c["within_tolerance"] and c["max_rel_diff"] == pytest.approx(1e-6)
    with pytest.raises(ValueError, match="same --steps"):
        fault.compare({1: 1.0}, {2: 1.0})


def test_require_same_run_names_the_run_that_differs():
    base = fault.timeline(OUTPUT)
    two_nodes = fault.timeline(OUTPUT.replace("node=0 local_rank=1", "node=1 local_rank=0"))
    fault.require_same_run({"a": base, "b": two_nodes}, "a", nodes={"b": 2})  # the same losses: no error
    with pytest.raises(RuntimeError, match=r"b: ranks on 1 node\(s\), expected 2"):
        fault.require_same_run({"a": base, "b": base}, "a", nodes={"b": 2})
    off = fault.timeline(OUTPUT.replace("loss=7.25 ", "loss=7.2500001 "))
    with pytest.raises(RuntimeError, match=r"off: losses differ from a's by up to 1\.4e-08"):
        fault.require_same_run({"a": base, "off": off}, "a")
    with pytest.raises(RuntimeError, match="unfinished: no DONE line"):
        fault.require_same_run({"a": base, "unfinished": fault.timeline(OUTPUT.split("DONE")[0])}, "a")
    with pytest.raises(RuntimeError, match=r"short: logged steps \[1, 2\], a logged \[1, 2, 3\]"):
        short = fault.timeline(OUTPUT.replace("step 3/3 loss=7.125 attempt=1 dt=0.100 t=113.000\n", ""))
        fault.require_same_run({"a": base, "short": short}, "a")


def test_kill_at_signals_the_rank_once_on_the_first_attempt(monkeypatch):
    sent = []
    monkeypatch.setattr(fault.os, "kill", lambda pid, sig: sent.append((pid, sig)))
    k = fault.KillAt(step=2, rank=1)
    for line in OUTPUT.splitlines()[:4] + OUTPUT.splitlines()[:4]:
        k(line)
    assert sent == [(12, signal.SIGKILL)] and k.killed["step"] == 3


def test_explain_knows_the_common_failures():
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in fault.explain("[E] connectFullMesh failed ... Connection refused")
    assert "rank(s) 3" in fault.explain("RuntimeError: [Rank 0]: Ranks 3 failed to pass monitoredBarrier in 20000 ms")
    assert fault.explain("something else entirely") is None
