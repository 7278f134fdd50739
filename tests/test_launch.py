"""labutils.launch: torchrun jobs from Python, on gloo CPU ranks, and their failure paths.

Every launched job carries a marker in its environment; after each job no process with that
marker may remain, and the rendezvous port must be free again.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
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
    """The 8 s timeout counts from the hanging rank's own line, so a slow start on a loaded box cannot
    use it up; the job is killed, not waited out (the script's own timeout is 300 s)."""
    env, port = job
    timeout, grace, seen = 8.0, 3.0, {}
    hang = "--hang-rank, sleeping forever"

    def on_line(line):
        if hang in line:
            seen.setdefault("t", time.monotonic())

    with pytest.raises(launch.LaunchTimeout) as err:
        launch.run(SCRIPT, ["--hang-rank", "1", "--timeout", "300"], nproc=2, env=env, port=port,
                   timeout=timeout, grace=grace, stream=False, ready=hang, on_line=on_line)
    assert "t" in seen and isinstance(err.value, launch.LaunchError)
    assert time.monotonic() - seen["t"] >= timeout  # not before its time
    assert time.monotonic() - seen["t"] < timeout + grace + 120  # a generous ceiling, far below 300 s
    assert f"timed out after 8 s from its line {hang!r}" in str(err.value)
    assert hang in err.value.tail


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
    assert "\n" not in p.message and p.env == {"SMML_DIST_BACKEND": "gloo"}  # no GPU to hide
    with pytest.raises(ValueError, match="needs one GPU per rank.*0 GPU"):
        launch.plan(4, backend="nccl")


def test_plan_on_gpus(monkeypatch):
    monkeypatch.setattr(hardware, "describe", _fake("cuda", 4))
    p = launch.plan(4)
    assert (p.backend, p.device, p.simulated, p.env) == ("nccl", "cuda", False, {})
    assert launch.plan(8).backend == "gloo"  # more ranks than GPUs: simulated, not an error
    # the stand-in CPU ranks do not see the GPUs (a library finding CUDA would put rank r on GPU r)
    assert launch.plan(8).env == {"SMML_DIST_BACKEND": "gloo", "CUDA_VISIBLE_DEVICES": ""}
    assert launch.plan(2, backend="gloo").env["CUDA_VISIBLE_DEVICES"] == ""
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


# ---------------------------------------------------------------- hardening (issue 10)
def _script(tmp_path: Path, body: str) -> Path:
    """A rank script that needs no torch (it starts fast even on a loaded machine)."""
    path = tmp_path / f"rank_{uuid.uuid4().hex[:6]}.py"
    path.write_text("import os, sys, time\nrank = int(os.environ['RANK'])\n" + textwrap.dedent(body))
    return path


def test_no_line_is_lost_behind_a_busy_callback_and_the_error_keeps_its_traceback(job, tmp_path):
    """20,000 lines per rank, a callback that takes ~50 us per line, then rank 1 raises: every line
    reaches the output and the callback, and the tail holds the traceback and torchrun's summary."""
    env, port = job
    flag = tmp_path / "rank0-done"
    script = _script(tmp_path, f"""
        for i in range(20000):  # one write per line: lines of two ranks never merge in the shared pipe
            sys.stdout.write(f"rank {{rank}} progress {{i}}\\n")
        sys.stdout.flush()
        if rank == 0:
            open({str(flag)!r}, "w").close()
            time.sleep(300)
        while not os.path.exists({str(flag)!r}):  # rank 0 has printed all its lines
            time.sleep(0.05)
        raise RuntimeError("boom from rank 1")
    """)
    seen = []

    def busy(line):
        seen.append(line)
        t = time.perf_counter() + 5e-5
        while time.perf_counter() < t:
            pass

    with pytest.raises(launch.LaunchError) as err:
        launch.run(str(script), nproc=2, env=env, port=port, timeout=600, stream=False, on_line=busy)
    e = err.value
    lines = e.output.splitlines()
    for rank in (0, 1):
        assert sum(ln.startswith(f"rank {rank} progress ") for ln in lines) == 20000
    assert seen == lines  # the callback saw every line, in order
    assert "Traceback (most recent call last)" in e.tail and "RuntimeError: boom from rank 1" in e.tail
    assert re.search(r"exitcode\s*:\s*1", e.tail) and "Root Cause" in e.tail, e.tail
    assert "RuntimeError: boom from rank 1" in str(e) and len(e.tail.splitlines()) <= launch.TAIL_LINES


def _read_until(proc: subprocess.Popen, wanted: set[str], ceiling_s: float) -> list[str]:
    """Lines of ``proc``'s stdout until every text in ``wanted`` has appeared (a thread reads them)."""
    got: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [got.put(ln) for ln in proc.stdout], daemon=True).start()
    lines, deadline = [], time.monotonic() + ceiling_s
    while wanted - {w for w in wanted for ln in lines if w in ln} and time.monotonic() < deadline:
        try:
            lines.append(got.get(timeout=1.0))
        except queue.Empty:
            assert proc.poll() is None, "\n".join(lines[-30:])
    return lines


def _wait_gone(marker: str, port: int, ceiling_s: float = 120.0) -> tuple[list[int], bool]:
    deadline = time.monotonic() + ceiling_s
    while (_marked(marker) or not launch.port_is_free(port)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return _marked(marker), launch.port_is_free(port)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
def test_a_killed_supervisor_takes_its_job_with_it(tmp_path):
    """kill -9 of the Python running launch.run (a notebook kernel restarted): the agent and its ranks go."""
    marker, port = uuid.uuid4().hex, launch.free_port()
    script = _script(tmp_path, """
        print(f"ready {rank}", flush=True)
        time.sleep(600)
    """)
    code = (f"from labutils import launch\nlaunch.run({str(script)!r}, nproc=2, port={port}, timeout=900, "
            f"env={{'SMMLTEST_MARK': {marker!r}}})\n")
    sup = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, cwd=REPO, start_new_session=True)
    try:
        lines = _read_until(sup, {"ready 0", "ready 1"}, ceiling_s=300)
        assert any("ready 1" in ln for ln in lines) and any("ready 0" in ln for ln in lines), lines[-30:]
        assert _marked(marker), "the job should be running now"
    finally:
        os.kill(sup.pid, signal.SIGKILL)
        sup.wait()
    left, free = _wait_gone(marker, port)
    assert left == [] and free, f"after the supervisor's death: processes {left}, port {port} free: {free}"


class _Stop(Exception):
    pass


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="loopback interface name 'lo'")
def test_every_listener_of_a_job_is_on_loopback(job):
    """The rendezvous store, rank 0's store and gloo's sockets listen on 127.0.0.1, never on all interfaces."""
    psutil = pytest.importorskip("psutil")
    env, port = job
    found = {}

    def on_line(line):
        if "--hang-rank, sleeping forever" not in line:
            return
        for pid in _marked(env["SMMLTEST_MARK"]):
            try:
                for c in psutil.Process(pid).net_connections(kind="inet"):
                    if c.status == psutil.CONN_LISTEN:
                        found[(c.laddr.ip, c.laddr.port)] = pid
            except psutil.Error:
                pass
        raise _Stop  # an exception from on_line stops the job (the fixture checks nothing is left)

    with pytest.raises(_Stop):
        launch.run(SCRIPT, ["--hang-rank", "1", "--timeout", "300"], nproc=2, env=env, port=port, timeout=600,
                   stream=False, on_line=on_line)
    assert ("127.0.0.1", port) in found, found  # the rendezvous store
    assert len(found) >= 2, found  # and rank 0's store / gloo's listeners
    assert {ip for ip, _ in found} == {"127.0.0.1"}, found


def test_a_failed_start_of_a_later_agent_leaves_no_earlier_one(job, monkeypatch):
    env, port = job
    real = subprocess.Popen

    def popen(cmd, *a, **kw):
        if "--node-rank" in cmd and cmd[cmd.index("--node-rank") + 1] == "1":
            raise OSError("simulated: node 1's agent cannot start")
        return real(cmd, *a, **kw)

    monkeypatch.setattr(subprocess, "Popen", popen)
    with pytest.raises(OSError, match="node 1's agent cannot start"):
        launch.simulate_nodes(2, 2, SCRIPT, env=env, port=port, timeout=600, stream=False)
    # the fixture asserts that node 0's agent is gone and the port is free


def test_the_job_environment_defaults_and_no_secret_is_echoed(job, tmp_path, monkeypatch):
    env, port = job
    for k in launch.JOB_ENV:
        monkeypatch.delenv(k, raising=False)
    script = _script(tmp_path, """
        names = ["NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS",
                 "TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "GLOO_SOCKET_IFNAME"]
        print("env:", " ".join(f"{k}={os.environ.get(k)}" for k in names), flush=True)
        sys.exit(2)
    """)
    secrets = {"HF_TOKEN": "hf_s3cr3t", "MY_API_KEY": "k3y", "DB_PASSWORD": "pw", "NVSHMEM_DISABLE_NVLS": "0"}
    with pytest.raises(launch.LaunchError) as err:
        launch.run(str(script), nproc=1, env=env | secrets, port=port, timeout=600, stream=False)
    e = err.value
    line = next(ln for ln in e.output.splitlines() if ln.startswith("env:"))
    assert line.split()[1:] == ["NCCL_NVLS_ENABLE=0", "TORCH_SYMM_MEM_DISABLE_MULTICAST=1",
                                "NVSHMEM_DISABLE_NVLS=0", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1",
                                "GLOO_SOCKET_IFNAME=lo"]  # defaults set; the caller's value wins
    for text in (str(e), e.cmd):
        assert not any(v in text for v in ("hf_s3cr3t", "k3y", "=pw")), text
        assert "HF_TOKEN=***" in text and "MY_API_KEY=***" in text and "NCCL_NVLS_ENABLE=0" in text


def test_defaults_already_in_the_environment_are_not_shown(monkeypatch):
    for k, v in launch.JOB_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")  # set by the user: kept, not overridden
    env, shown = launch._env({}, local=False)
    assert not set(launch.JOB_ENV) & set(shown) and env["NCCL_NVLS_ENABLE"] == "1"
    assert "GLOO_SOCKET_IFNAME" not in shown  # a real multi-node job keeps its interfaces
    monkeypatch.delenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE")
    env, shown = launch._env({}, local=True)
    assert shown["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1" and env["GLOO_SOCKET_IFNAME"] == "lo"


def test_ready_line_never_printed_times_out(job, tmp_path):
    env, port = job
    script = _script(tmp_path, """
        print(f"up {rank}", flush=True)
        time.sleep(600)
    """)
    with pytest.raises(launch.LaunchTimeout, match="printed no line containing 'never said'") as err:
        launch.run(str(script), nproc=1, env=env, port=port, timeout=1, ready="never said", ready_timeout=5,
                   stream=False)
    assert err.value.returncode is None


def test_bad_counts_and_timeouts_say_what_to_pass():
    with pytest.raises(ValueError, match=r"nproc must be a whole number >= 1, got 0.*nproc=2"):
        launch.run(SCRIPT, nproc=0)
    with pytest.raises(ValueError, match=r"timeout must be > 0 seconds, got 0.*timeout=600"):
        launch.run(SCRIPT, timeout=0)
    with pytest.raises(ValueError, match=r"timeout must be > 0"):
        launch.simulate_nodes(2, 2, SCRIPT, timeout=-1)
    with pytest.raises(ValueError, match=r"procs_per_node must be"):
        launch.simulate_nodes(2, 0, SCRIPT)
    with pytest.raises(ValueError, match=r"ready_timeout must be > 0"):
        launch.run(SCRIPT, ready="x", ready_timeout=0)


def test_simulate_nodes_passes_max_restarts(monkeypatch):
    made = []

    class Fake:
        def __init__(self, cmds, *a, **kw):
            made.extend(cmds)
            raise _Stop

    monkeypatch.setattr(launch._procs, "Job", Fake)
    with pytest.raises(_Stop):
        launch.simulate_nodes(2, 1, SCRIPT, max_restarts=3)
    assert len(made) == 2 and all(c[c.index("--max-restarts") + 1] == "3" for c in made)


@pytest.mark.parametrize("tail, code, err", [("", 0, ""), ("sys.exit(3)", 3, ""),
                                             ("sys.exit('bad input: pass --x')", 1, "bad input: pass --x")])
def test_a_rank_leaves_without_finalisation_and_keeps_its_output_and_code(tmp_path, tail, code, err):
    """The worker wrapper ends a finished rank with os._exit (torch's and transformers' teardown is 0.5-2.5 s of
    CPU per process): buffered output still arrives, the exit code and message are the target's, and the
    interpreter's finalisation (atexit) does not run."""
    flag = tmp_path / "atexit-ran"
    script = _script(tmp_path, f"""
        import atexit
        atexit.register(lambda: open({str(flag)!r}, "w").close())
        sys.stdout.write("no newline, never flushed")
        {tail}
    """)
    p = subprocess.run([sys.executable, "-m", "labutils._agent", "--worker", str(script)], capture_output=True,
                       text=True, timeout=120, cwd=REPO, env=dict(os.environ, RANK="0"))
    assert (p.returncode, p.stdout, p.stderr.strip()) == (code, "no newline, never flushed", err)
    assert not flag.exists()
