"""labutils.launch: torchrun jobs from Python, on gloo CPU ranks, and their failure paths.

Every launched job carries a marker in its environment; after each job no process with that
marker may remain, and the rendezvous port must be free again.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from labutils import hardware, launch

SCRIPT = "labutils.scripts.dist_check"
REPO = Path(__file__).resolve().parent.parent


def _marked(marker: str) -> list[int]:
    """Pids of live processes whose environment holds SMMLTEST_MARK=marker (read from /proc)."""
    needle = f"SMMLTEST_MARK={marker}".encode()
    pids = []
    for env in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle in env.read_bytes().split(b"\0"):
                pids.append(int(env.parent.name))
        except OSError:
            pass
    return pids


@pytest.fixture
def job():
    """(env, port) for one launch; afterwards asserts that nothing of it is left."""
    if not Path("/proc/self/environ").exists():
        pytest.skip("needs /proc to look for left-over processes")
    marker, port = uuid.uuid4().hex, launch.free_port()
    yield {"SMMLTEST_MARK": marker, "SMML_DIST_BACKEND": "gloo"}, port
    assert _marked(marker) == [], "processes of the job are still alive"
    assert launch.port_is_free(port), f"port {port} still in use after the job"


def test_run_two_ranks_streams_and_prints_rank0_once(job, capsys):
    env, port = job
    seen = []
    res = launch.run(SCRIPT, nproc=2, env=env, port=port, timeout=120, on_line=seen.append)
    assert res.returncode == 0 and res.port == port
    assert res.output.splitlines() == seen  # the callback saw every line, in order
    assert "dist_check: OK" in capsys.readouterr().out  # streamed to stdout as well
    assert res.output.count("all_reduce check: 0 wrong") == 1  # rank 0 only
    assert res.output.count("dist_check: world=2 backend=gloo") == 1
    assert "--nproc-per-node 2" in res.cmd and "OMP_NUM_THREADS=1" in res.cmd


def test_four_ranks_sweep_every_collective_correct(job, tmp_path):
    env, port = job
    out = tmp_path / "check.json"
    args = ["--sweep", "--sizes", "4096", "65536", "--warmup", "1", "--reps", "3", "--out", out]
    res = launch.run(SCRIPT, args, nproc=4, env=env, port=port, timeout=180, stream=False)
    assert res.output.count("dist_check: world=4 backend=gloo") == 1
    doc = json.loads(out.read_text())
    assert doc["context"]["world"] == 4 and doc["check"]["wrong"] == 0
    assert {r["op"] for r in doc["sweep"]} == {"all_reduce", "all_gather", "reduce_scatter", "broadcast",
                                               "all_to_all"}
    for r in doc["sweep"]:
        assert r["wrong"] == 0, r
        assert r["world"] == 4 and r["median_s"] > 0
        assert r["busbw_GBps"] == pytest.approx(r["algbw_GBps"] * r["busbw_factor"])
    assert doc["fingerprint"]["torch"]
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temp file


def test_failing_rank_raises_with_tail_and_exit_code(job):
    env, port = job
    with pytest.raises(launch.LaunchError) as err:
        launch.run(SCRIPT, ["--fail-rank", "1"], nproc=2, env=env, port=port, timeout=120, stream=False)
    e = err.value
    assert not isinstance(e, launch.LaunchTimeout)
    assert e.returncode not in (0, None)
    assert f"exit code {e.returncode}" in str(e) and "torch.distributed.run" in str(e)
    assert re.search(r"exitcode\s*:\s*3", e.tail), e.tail  # torchrun's summary names rank 1's code
    assert len(e.tail.splitlines()) <= launch.TAIL_LINES
    assert "--fail-rank, exiting with code 3" in e.output


def test_hanging_rank_times_out_and_is_killed(job):
    env, port = job
    timeout, grace = 8.0, 3.0
    t0 = time.monotonic()
    with pytest.raises(launch.LaunchTimeout) as err:
        launch.run(SCRIPT, ["--hang-rank", "1", "--timeout", "300"], nproc=2, env=env, port=port,
                   timeout=timeout, grace=grace, stream=False)
    elapsed = time.monotonic() - t0
    assert isinstance(err.value, launch.LaunchError)
    assert elapsed < timeout + grace + 15  # killed, not waited out (the script's own timeout is 300 s)
    assert "timed out after 8 s" in str(err.value)
    assert "--hang-rank, sleeping forever" in err.value.tail


@pytest.mark.parametrize("rendezvous", ["static", "c10d"])
def test_simulate_two_nodes_of_two(job, rendezvous):
    env, port = job
    res = launch.simulate_nodes(2, 2, SCRIPT, rendezvous=rendezvous, env=env, port=port, timeout=120,
                                stream=False)
    assert "[node0] dist_check: world=4 backend=gloo nodes=2" in res.output
    assert res.output.count("all_reduce check: 0 wrong") == 1
    for rank, node in [(0, 0), (1, 0), (2, 1), (3, 1)]:
        assert f"rank {rank}: node {node} local_rank {rank % 2}" in res.output
    assert res.cmd.count("torch.distributed.run") == 2


def test_simulated_node_failure_kills_all(job):
    env, port = job
    with pytest.raises(launch.LaunchError) as err:
        launch.simulate_nodes(2, 2, SCRIPT, ["--fail-rank", "3"], env=env, port=port, timeout=120, stream=False)
    assert "[node1]" in err.value.tail and re.search(r"exitcode\s*:\s*3", err.value.tail)


def test_cli_passes_arguments_and_returns_failure(job, monkeypatch):
    env, port = job
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert launch.main(["--nproc", "2", "--timeout", "120", SCRIPT, "--", "--fail-rank", "0"]) != 0


# ---------------------------------------------------------------- no processes needed
def test_busy_port_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        busy = s.getsockname()[1]
        assert not launch.port_is_free(busy)
        with pytest.raises(ValueError, match=f"port {busy} .* in use.*port=None"):
            launch.run(SCRIPT, nproc=2, port=busy)
        with pytest.raises(ValueError, match="in use"):
            launch.simulate_nodes(2, 2, SCRIPT, port=busy)
    assert launch.port_is_free(launch.free_port())


def test_multi_node_run_needs_an_endpoint():
    with pytest.raises(ValueError, match="simulate_nodes"):
        launch.run(SCRIPT, nnodes=2)


def test_command_for_module_and_script(tmp_path):
    mod = launch.torchrun_cmd(SCRIPT, ["--sweep"], nproc=4)
    assert mod[mod.index("--nproc-per-node") + 1] == "4" and mod[-3:] == ["-m", SCRIPT, "--sweep"]
    path = launch.torchrun_cmd("x/train.py", [], nproc=1)
    assert Path(path[-1]).is_absolute() and path[-1].endswith("x/train.py") and "-m" not in path[-2:]


def _fake(kind: str, count: int):
    return lambda: hardware.DeviceInfo(kind, "NVIDIA H100 80GB HBM3" if kind == "cuda" else "cpu", count,
                                       0, None, None, None, "cpu", 2)


def test_plan_on_cpu_stands_in_with_gloo(monkeypatch):
    monkeypatch.setattr(hardware, "describe", _fake("cpu", 1))
    p = launch.plan(4)
    assert (p.nproc, p.backend, p.device, p.simulated) == (4, "gloo", "cpu", True)
    assert "4 gloo CPU rank(s) standing in" in p.message and "4 nccl" in p.message
    assert "\n" not in p.message and p.env["SMML_DIST_BACKEND"] == "gloo"
    with pytest.raises(ValueError, match="needs one GPU per rank.*0 GPU"):
        launch.plan(4, backend="nccl")


def test_plan_on_gpus(monkeypatch):
    monkeypatch.setattr(hardware, "describe", _fake("cuda", 4))
    p = launch.plan(4)
    assert (p.backend, p.device, p.simulated, p.env) == ("nccl", "cuda", False, {})
    assert launch.plan(8).backend == "gloo"  # more ranks than GPUs: simulated, not an error
    with pytest.raises(ValueError, match="nproc <= 4"):
        launch.plan(8, backend="nccl")
    with pytest.raises(ValueError):
        launch.plan(0)


@pytest.mark.parametrize("path", ["launch/slurm/dist_check.sbatch", "launch/k8s/dist_check.yaml"])
def test_cluster_examples_start_an_existing_script(path):
    text = (REPO / path).read_text()
    modules = re.findall(r"-m[\s\-]+(labutils\.scripts\.\w+)", text)
    assert modules, f"{path} starts no labutils script"
    for m in modules:
        assert (REPO / (m.replace(".", "/") + ".py")).exists(), m
    assert "torch.distributed.run" in text and "c10d" in text
    if path.endswith(".sbatch"):
        assert subprocess.run(["bash", "-n", str(REPO / path)]).returncode == 0
    else:
        yaml = pytest.importorskip("yaml")
        kinds = [d["kind"] for d in yaml.safe_load_all(text) if d]
        assert sorted(kinds) == ["Job", "Service"]
