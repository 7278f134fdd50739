"""Run a torchrun job from a notebook or a test, and always clean up after it.

- ``run(target, args, nproc=4)``: ``python -m torch.distributed.run`` on this host (c10d
  rendezvous on 127.0.0.1 with a free port), output streamed line by line as it arrives and
  kept; a non-zero exit raises ``LaunchError`` with the command, exit code and the last lines;
  a job that outlives ``timeout`` is killed (SIGTERM, then SIGKILL) and raises ``LaunchTimeout``.
- ``simulate_nodes(2, 2, target)``: one torchrun agent per "node" on this host, all started
  together: how a single machine rehearses a 2-node job.
- ``plan(4)``: what will actually run here: nccl ranks on GPUs, or gloo CPU ranks standing in.

Never ``mp.spawn`` or fork from a kernel, never a bare ``!torchrun`` (IPython ignores its exit
code). Command line: ``python -m labutils.launch --nproc 4 labutils.scripts.dist_check -- --sweep``.

Used in lab2 §Four ranks, lab3 §Orchestrators and lab3 §Two nodes on one host.
"""

from __future__ import annotations

import argparse
import os
import queue
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import hardware

REPO = Path(__file__).resolve().parent.parent
TAIL_LINES = 40
MARKER = "SMML_LAUNCH_ID"  # every process of a job inherits it: how stragglers are found


class LaunchError(RuntimeError):
    """A launched job exited non-zero. ``returncode``, ``tail`` and ``output`` say how."""

    def __init__(self, message: str, *, cmd: str, returncode: int | None, output: str, tail: str):
        super().__init__(message)
        self.cmd, self.returncode, self.output, self.tail = cmd, returncode, output, tail


class LaunchTimeout(LaunchError):
    """A launched job ran past its timeout and was killed."""


@dataclass
class LaunchResult:
    returncode: int
    output: str  # every line, merged stdout/stderr of all ranks (prefixed by node in simulate_nodes)
    seconds: float
    cmd: str  # shell-quoted, with the environment variables it sets: paste it into a terminal
    port: int | None = None


@dataclass(frozen=True)
class Plan:
    """What ``plan(n)`` decided: how many ranks, which backend, and a line saying so."""

    nproc: int
    backend: str  # "nccl" or "gloo"
    device: str  # "cuda" or "cpu"
    simulated: bool  # True when CPU ranks stand in for GPUs
    message: str
    env: dict = field(default_factory=dict)  # pass to run(env=...) so the script agrees


def plan(nproc: int, backend: str | None = None) -> Plan:
    """One rank per GPU when there are enough GPUs, else gloo CPU ranks standing in for them."""
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    info = hardware.describe()
    gpus = info.count if info.kind == "cuda" else 0
    if backend not in (None, "nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl', 'gloo' or None (pick for me), got {backend!r}")
    if backend == "nccl" and gpus < nproc:
        raise ValueError(f"backend='nccl' needs one GPU per rank: {nproc} ranks asked, this machine has "
                         f"{gpus} GPU(s). Ask for nproc <= {gpus}, or pass backend=None/'gloo' to run "
                         f"{nproc} gloo CPU ranks standing in for GPUs.")
    if backend != "gloo" and gpus >= nproc:
        return Plan(nproc, "nccl", "cuda", False, f"{nproc} rank(s) on {nproc} of {gpus} GPU(s) ({info.name}), nccl.")
    why = f"this machine has {gpus} GPU(s)" if gpus else "this machine has no GPU"
    why = "gloo was asked for" if backend == "gloo" else why
    msg = (f"{why}; with {nproc} GPUs this would run {nproc} nccl rank(s), one per GPU. Running {nproc} gloo "
           f"CPU rank(s) standing in for them: same script and collectives, CPU timings.")
    return Plan(nproc, "gloo", "cpu", True, msg, {"SMML_DIST_BACKEND": "gloo"})


# ---------------------------------------------------------------- ports, commands, environment
def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as TCPStore does: TIME_WAIT is fine
        try:
            s.bind((host, port))
            s.listen(1)
            return True
        except OSError:
            return False


def _pick_port(port: int | None) -> int:
    if port is not None and not port_is_free(port):
        raise ValueError(f"port {port} on 127.0.0.1 is in use (another job or server?): pass port=None to "
                         f"pick a free one, or stop whatever listens there.")
    return free_port() if port is None else port


def torchrun_cmd(target: str, args: Sequence = (), *, nproc: int, nnodes: int = 1, rdzv: Sequence[str] = (),
                 max_restarts: int = 0, python: str = sys.executable) -> list[str]:
    """A path (``.py`` or with a slash) runs as a script, a dotted name as ``-m module``."""
    is_path = target.endswith(".py") or "/" in target or os.sep in target
    what = [str(Path(target).expanduser().resolve())] if is_path else ["-m", target]
    return [python, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc-per-node", str(nproc),
            *rdzv, "--max-restarts", str(max_restarts), *what, *map(str, args)]


def _env(extra: dict | None) -> tuple[dict, dict]:
    """The job's environment, and the part of it worth showing in the command line."""
    shown = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")} | dict(extra or {})
    env = os.environ | {k: str(v) for k, v in shown.items()}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"  # lines arrive as they are printed
    env[MARKER] = uuid.uuid4().hex
    return env, shown


def _show(cmd: list[str], shown: dict) -> str:
    return " ".join([f"{k}={shlex.quote(str(v))}" for k, v in shown.items()] + [shlex.quote(c) for c in cmd])


# ---------------------------------------------------------------- the job: processes, output, cleanup
class _Job:
    """Some torchrun agents started together; their merged output; guaranteed teardown."""

    def __init__(self, cmds, envs, prefixes, stream: bool, on_line: Callable[[str], None] | None):
        self.launch_id, self.stream, self.on_line, self.prefixes = envs[0][MARKER], stream, on_line, prefixes
        self.q: queue.Queue = queue.Queue()
        self.lines: list[list[str]] = [[] for _ in cmds]
        self.merged: list[str] = []
        # a session (and process group) of its own: the job can be signalled without touching us
        self.procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                       stdin=subprocess.DEVNULL, start_new_session=True, text=True,
                                       errors="replace") for cmd, env in zip(cmds, envs)]
        self.readers = [threading.Thread(target=self._read, args=(i, p), daemon=True)
                        for i, p in enumerate(self.procs)]
        for t in self.readers:
            t.start()

    def _read(self, i: int, p: subprocess.Popen) -> None:
        for line in p.stdout:
            self.q.put((i, line.rstrip("\n")))

    def pump(self, wait_s: float) -> None:
        """Move the lines that arrived (waiting up to ``wait_s`` for the first) to the output."""
        for k in range(1000):  # bounded, so that a flood of output cannot starve the timeout check
            try:
                i, line = self.q.get(timeout=wait_s) if k == 0 else self.q.get_nowait()
            except queue.Empty:
                return
            line = self.prefixes[i] + line
            self.lines[i].append(line)
            self.merged.append(line)
            if self.stream:
                print(line, flush=True)
            if self.on_line:
                self.on_line(line)

    def drain(self, limit_s: float) -> None:
        """Collect the last lines of the agents that have exited (their pipes close soon after)."""
        end = time.monotonic() + limit_s
        while time.monotonic() < end and any(t.is_alive() and p.poll() is not None
                                             for t, p in zip(self.readers, self.procs)):
            self.pump(0.05)
        self.pump(0)

    def members(self) -> list:
        """Every live process carrying this job's marker: agents, workers, their children, orphans."""
        try:
            import psutil
        except ImportError:  # without psutil only the agents' own process groups can be reached
            return []
        found = []
        for c in psutil.process_iter():  # orphans too: a worker whose agent died is still marked
            try:
                if c.environ().get(MARKER) == self.launch_id and c.status() != psutil.STATUS_ZOMBIE:
                    found.append(c)
            except psutil.Error:
                pass
        return found

    def kill(self, grace: float) -> None:
        """SIGTERM every process group of the job, SIGKILL what is left after ``grace`` seconds."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            others = self.members()
            roots = [p for p in self.procs if p.poll() is None]
            if not roots and not others:
                return
            for pid in [p.pid for p in roots] + [c.pid for c in others]:
                _signal_group(pid, sig)
            end = time.monotonic() + wait
            while time.monotonic() < end and (any(p.poll() is None for p in self.procs) or self.members()):
                self.pump(0.1)

    def tail(self, n: int = TAIL_LINES, upto: list[int] | None = None) -> str:
        """The last lines of each agent (up to line ``upto[i]``), minus torchrun's own stack frames."""
        per = n if len(self.lines) == 1 else max(n // len(self.lines), 10)
        cut = upto or [len(lines) for lines in self.lines]
        return "\n".join("\n".join(_quiet(lines[:k], pre)[-per:])
                         for lines, k, pre in zip(self.lines, cut, self.prefixes))


def _quiet(lines: list[str], prefix: str = "") -> list[str]:
    """Drop the stack frames inside torch.distributed and runpy (the launcher's, not the script's)."""
    out, skip = [], False
    for line in lines:
        text = line[len(prefix):]
        if text.lstrip().startswith('File "'):
            skip = "torch/distributed/" in text or "<frozen runpy>" in text
        else:  # a dropped frame's source line and ^^^ markers are indented by 4
            skip = skip and text.startswith("    ")
        if not skip:
            out.append(line)
    return out


def _signal_group(pid: int, sig: int) -> None:
    try:
        pgid = os.getpgid(pid)
        if pgid == os.getpgrp():  # never signal our own group (the notebook kernel, pytest)
            os.kill(pid, sig)
        else:
            os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _supervise(job: _Job, cmd: str, timeout: float, grace: float, port: int | None) -> LaunchResult:
    """Wait for the job; on failure or timeout kill all of it and raise with the tail."""
    t0 = time.monotonic()
    failed, timed_out = None, None
    try:
        while True:
            job.pump(0.1)
            codes = [p.poll() for p in job.procs]
            failed = next(((i, c) for i, c in enumerate(codes) if c not in (None, 0)), None)
            if failed is not None or all(c is not None for c in codes):
                break
            if time.monotonic() - t0 > timeout:
                timed_out = [len(lines) for lines in job.lines]  # the tail worth showing: before the kill
                break
        if timed_out is None:
            job.drain(2.0)
    finally:
        job.kill(grace)
        job.drain(2.0)
        for t, p in zip(job.readers, job.procs):
            if not t.is_alive():
                p.stdout.close()
    seconds = time.monotonic() - t0
    output = "\n".join(job.merged)
    if timed_out is not None:
        tail = job.tail(upto=timed_out)
        raise LaunchTimeout(f"timed out after {timeout:g} s and was stopped (SIGTERM; SIGKILL {grace:g} s "
                            f"later if needed): {cmd}\n--- last lines before that ---\n{tail}",
                            cmd=cmd, returncode=None, output=output, tail=tail)
    if failed is not None:
        who = f"node {failed[0]} " if len(job.procs) > 1 else ""
        raise LaunchError(f"{who}exit code {failed[1]} after {seconds:.1f} s: {cmd}\n--- last lines ---\n"
                          f"{job.tail()}", cmd=cmd, returncode=failed[1], output=output, tail=job.tail())
    return LaunchResult(0, output, seconds, cmd, port)


# ---------------------------------------------------------------- public entry points
def _rdzv(kind: str, endpoint: str, node: int, run_id: str) -> list[str]:
    if kind == "static":  # node 0's agent hosts the store at the master address
        host, port = endpoint.rsplit(":", 1)
        return ["--node-rank", str(node), "--master-addr", host, "--master-port", port]
    local = ["--local-addr", "127.0.0.1"] if endpoint.startswith("127.0.0.1:") else []
    return ["--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", run_id, *local]


def run(target: str, args: Sequence = (), *, nproc: int = 2, nnodes: int = 1, timeout: float = 600.0,
        env: dict | None = None, stream: bool = True, on_line: Callable[[str], None] | None = None,
        port: int | None = None, rdzv_endpoint: str | None = None, rdzv_id: str = "smml",
        max_restarts: int = 0, grace: float = 5.0) -> LaunchResult:
    """Run ``target`` (a script path or a module such as ``labutils.scripts.dist_check``) under torchrun.

    One node: c10d rendezvous on 127.0.0.1 (``port`` or a free one). ``nnodes > 1`` means this host is
    one node of a real multi-node job: pass ``rdzv_endpoint="head-node:29500"``.
    """
    if nnodes > 1 and not rdzv_endpoint:
        raise ValueError(f"nnodes={nnodes} needs rdzv_endpoint='host:port' of the first node; "
                         f"to fake {nnodes} nodes on this host use simulate_nodes({nnodes}, {nproc}, ...)")
    port = None if rdzv_endpoint else _pick_port(port)
    rdzv = _rdzv("c10d", rdzv_endpoint or f"127.0.0.1:{port}", 0, rdzv_id)
    cmd = torchrun_cmd(target, args, nproc=nproc, nnodes=nnodes, rdzv=rdzv, max_restarts=max_restarts)
    full_env, shown = _env(env)
    job = _Job([cmd], [full_env], [""], stream, on_line)
    return _supervise(job, _show(cmd, shown), timeout, grace, port)


def simulate_nodes(n_nodes: int, procs_per_node: int, target: str, args: Sequence = (), *,
                   timeout: float = 600.0, rendezvous: str = "static", env: dict | None = None,
                   stream: bool = True, on_line: Callable[[str], None] | None = None,
                   port: int | None = None, grace: float = 5.0) -> LaunchResult:
    """``n_nodes`` torchrun agents on this host, ``procs_per_node`` ranks each, output prefixed by node.

    ``rendezvous="static"``: ``--node-rank i --master-addr 127.0.0.1 --master-port P`` (node 0 hosts
    the store); ``"c10d"``: every agent joins ``127.0.0.1:P`` with one id and gets its node rank there.
    """
    if n_nodes < 1 or procs_per_node < 1 or rendezvous not in ("static", "c10d"):
        raise ValueError(f"simulate_nodes needs n_nodes >= 1, procs_per_node >= 1 and rendezvous 'static' or "
                         f"'c10d'; got {n_nodes}, {procs_per_node}, {rendezvous!r}")
    port, run_id = _pick_port(port), f"sim-{uuid.uuid4().hex[:8]}"
    cmds = [torchrun_cmd(target, args, nproc=procs_per_node, nnodes=n_nodes,
                         rdzv=_rdzv(rendezvous, f"127.0.0.1:{port}", i, run_id)) for i in range(n_nodes)]
    full_env, shown = _env(env)
    envs = [full_env | _node_gpus(full_env, i, n_nodes, procs_per_node) for i in range(n_nodes)]
    job = _Job(cmds, envs, [f"[node{i}] " for i in range(n_nodes)], stream, on_line)
    return _supervise(job, " &\n".join(_show(c, shown) for c in cmds), timeout, grace, port)


def _node_gpus(env: dict, node: int, n_nodes: int, per_node: int) -> dict:
    """With enough GPUs (and gloo not forced), each fake node sees only its own GPUs, as a real one does."""
    info = hardware.describe()
    if info.kind != "cuda" or info.count < n_nodes * per_node or env.get("SMML_DIST_BACKEND") == "gloo":
        return {}
    visible = env.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(info.count)))).split(",")
    return {"CUDA_VISIBLE_DEVICES": ",".join(visible[node * per_node:(node + 1) * per_node])}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m labutils.launch", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2, help="ranks per node")
    ap.add_argument("--nodes", type=int, default=1, help="nodes to simulate on this host (simulate_nodes)")
    ap.add_argument("--timeout", type=float, default=600.0, help="kill the job after this many seconds")
    ap.add_argument("target", help="script path or module, e.g. labutils.scripts.dist_check")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the target (after --)")
    a = ap.parse_args(argv)
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    p = plan(a.nproc * a.nodes)
    print(p.message, flush=True)
    try:
        if a.nodes > 1:
            simulate_nodes(a.nodes, a.nproc, a.target, args, timeout=a.timeout, env=p.env)
        else:
            run(a.target, args, nproc=a.nproc, timeout=a.timeout, env=p.env)
    except LaunchError as e:
        print(f"launch failed: {str(e).splitlines()[0]}", file=sys.stderr)
        return e.returncode if (e.returncode or 0) > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
