"""Run a torchrun job from a notebook or a test, and always clean up after it.

- ``run(target, args, nproc=4)``: ``python -m torch.distributed.run`` on this host (c10d
  rendezvous on 127.0.0.1 with a free port), output streamed line by line as it arrives and
  kept (every pipe read to its end); a non-zero exit raises ``LaunchError`` with the command, exit
  code, the first traceback and the last lines; a job that outlives ``timeout`` (counted from its
  ``ready`` line if one is given) is killed (SIGTERM, then SIGKILL) and raises ``LaunchTimeout``.
- ``simulate_nodes(2, 2, target)``: one torchrun agent per "node" on this host, all started
  together: how a single machine rehearses a 2-node job.
- ``plan(4)``: what will actually run here: nccl ranks on GPUs, or gloo CPU ranks standing in.

A job never outlives the Python that started it, however that Python dies (a watchdog process and
a parent-death signal, see ``_procs`` and ``_agent``); a job on this host listens on 127.0.0.1 only
(its TCPStores, gloo's and NCCL's sockets); ``JOB_ENV`` keeps NVLink multicast off everywhere.

Never ``mp.spawn`` or fork from a kernel, never a bare ``!torchrun`` (IPython ignores its exit
code). Command line: ``python -m labutils.launch --nproc 4 labutils.scripts.dist_check -- --sweep``.

Used in lab2 §Four ranks, lab3 §Orchestrators and lab3 §Two nodes on one host.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import socket
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import _agent, _procs, hardware
from ._procs import MARKER

REPO = Path(__file__).resolve().parent.parent
TAIL_LINES = 60  # of the error message: a traceback (wherever it is) and the last lines, per agent
# Set in every job unless the caller's env or this process already sets them: NVLink multicast off
# (the lent multi-GPU machines need it), and no TCPStore shared between agent and ranks (with it,
# in-job restarts under gloo fail on torch 2.13: pytorch issue #135712).
JOB_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
# A job on this host only (rendezvous on 127.0.0.1): gloo, tensorpipe and NCCL sockets on loopback too.
LOOPBACK_ENV = {"GLOO_SOCKET_IFNAME": "lo", "TP_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}
SECRET = re.compile(r"TOKEN|KEY|SECRET|PASSWORD", re.IGNORECASE)  # env values never echoed


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
    # CPU ranks must not see the GPUs they stand in for: a library that finds CUDA would put rank r on GPU r
    # (transformers' TP does: "invalid device ordinal" on a 1-GPU box), and the small profile follows by itself
    hide = {"CUDA_VISIBLE_DEVICES": ""} if gpus else {}
    return Plan(nproc, "gloo", "cpu", True, msg, {"SMML_DIST_BACKEND": "gloo"} | hide)


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


def _wrapped(cmd: list[str]) -> list[str]:
    """The command actually run: torchrun through ``labutils._agent`` (parent-death signal, stores on
    loopback), each rank through its ``--worker`` mode. Same arguments as ``cmd``."""
    n = cmd.index("--max-restarts") + 2  # then the target and its arguments
    return [cmd[0], "-m", "labutils._agent", *cmd[3:n], "-m", "labutils._agent", "--worker", *cmd[n:]]


def _env(extra: dict | None, local: bool) -> tuple[dict, dict]:
    """The job's environment, and the part of it worth showing in the command line."""
    shown = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")} | {k: str(v) for k, v in (extra or {}).items()}
    defaults = JOB_ENV | (LOOPBACK_ENV if local and sys.platform.startswith("linux") else {})
    shown |= {k: v for k, v in defaults.items() if k not in shown and k not in os.environ}
    env = os.environ | shown
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"  # lines arrive as they are printed
    env[MARKER] = uuid.uuid4().hex
    env[_agent.SUPERVISOR] = str(os.getpid())
    return env, shown


def _show(cmd: list[str], shown: dict) -> str:
    """Shell-quoted, with the variables the job sets; a value whose name looks secret shows as ***."""
    env = [f"{k}={'***' if SECRET.search(k) else shlex.quote(v)}" for k, v in shown.items()]
    return " ".join(env + [shlex.quote(c) for c in cmd])


def _check(timeout: float, ready_timeout: float | None, **counts: int) -> None:
    for name, n in counts.items():
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a whole number >= 1, got {n!r}: pass e.g. {name}=2")
    for name, t in (("timeout", timeout), ("ready_timeout", ready_timeout)):
        if t is not None and not t > 0:
            raise ValueError(f"{name} must be > 0 seconds, got {t!r}: pass e.g. {name}=600")


# ---------------------------------------------------------------- supervision
def _supervise(job: _procs.Job, cmd: str, timeout: float, grace: float, port: int | None,
               ready_timeout: float | None = None) -> LaunchResult:
    """Wait for the job; on failure or timeout kill all of it and raise with the tail."""
    t0 = time.monotonic()
    failed, timed_out, why = None, None, ""
    try:
        while True:
            job.pump(0.1)
            codes = [p.poll() for p in job.procs]
            failed = next(((i, c) for i, c in enumerate(codes) if c not in (None, 0)), None)
            if failed is not None or all(c is not None for c in codes):
                break
            now, start = time.monotonic(), (job.ready_at if job.ready else t0)
            if start is None and now - t0 > ready_timeout:
                why = f"printed no line containing {job.ready!r} within {ready_timeout:g} s"
            elif start is not None and now - start > timeout:
                why = f"timed out after {timeout:g} s" + (f" from its line {job.ready!r}" if job.ready else "")
            if why:
                timed_out = [len(lines) for lines in job.lines]  # the tail worth showing: before the kill
                break
    except BaseException:  # on_line raised, or Ctrl-C: stop the job quietly and let it propagate
        job.on_line, job.stream = None, False
        raise
    finally:
        job.kill(grace)
        job.drain()
        job.close()
    seconds = time.monotonic() - t0
    output = "\n".join(job.merged)
    if timed_out is not None:
        tail = job.tail(TAIL_LINES, upto=timed_out)
        raise LaunchTimeout(f"{why} and was stopped (SIGTERM; SIGKILL {grace:g} s later if needed): {cmd}\n"
                            f"--- last lines before that ---\n{tail}", cmd=cmd, returncode=None, output=output,
                            tail=tail)
    if failed is not None:
        who, tail = (f"node {failed[0]} " if len(job.procs) > 1 else ""), job.tail(TAIL_LINES)
        raise LaunchError(f"{who}exit code {failed[1]} after {seconds:.1f} s: {cmd}\n--- last lines ---\n{tail}",
                          cmd=cmd, returncode=failed[1], output=output, tail=tail)
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
        max_restarts: int = 0, grace: float = 5.0, ready: str | None = None,
        ready_timeout: float = 600.0) -> LaunchResult:
    """Run ``target`` (a script path or a module such as ``labutils.scripts.dist_check``) under torchrun.

    One node: c10d rendezvous on 127.0.0.1 (``port`` or a free one). ``nnodes > 1`` means this host is
    one node of a real multi-node job: pass ``rdzv_endpoint="head-node:29500"``. ``ready``: a text the
    job prints once it is up; ``timeout`` then counts from that line (``ready_timeout`` bounds the wait
    for it), so a slow start on a loaded machine cannot eat a short timeout. ``on_line`` sees every
    line; an exception it raises stops the job (all of it killed) and propagates.
    """
    _check(timeout, ready_timeout if ready else None, nproc=nproc, nnodes=nnodes)
    if nnodes > 1 and not rdzv_endpoint:
        raise ValueError(f"nnodes={nnodes} needs rdzv_endpoint='host:port' of the first node; "
                         f"to fake {nnodes} nodes on this host use simulate_nodes({nnodes}, {nproc}, ...)")
    port = None if rdzv_endpoint else _pick_port(port)
    endpoint = rdzv_endpoint or f"127.0.0.1:{port}"
    cmd = torchrun_cmd(target, args, nproc=nproc, nnodes=nnodes, rdzv=_rdzv("c10d", endpoint, 0, rdzv_id),
                       max_restarts=max_restarts)
    full_env, shown = _env(env, local=endpoint.split(":")[0] in ("127.0.0.1", "localhost"))
    job = _procs.Job([_wrapped(cmd)], [full_env], [""], stream, on_line, grace, ready)
    return _supervise(job, _show(cmd, shown), timeout, grace, port, ready_timeout)


def simulate_nodes(n_nodes: int, procs_per_node: int, target: str, args: Sequence = (), *,
                   timeout: float = 600.0, rendezvous: str = "static", env: dict | None = None,
                   stream: bool = True, on_line: Callable[[str], None] | None = None,
                   port: int | None = None, grace: float = 5.0, max_restarts: int = 0,
                   ready: str | None = None, ready_timeout: float = 600.0) -> LaunchResult:
    """``n_nodes`` torchrun agents on this host, ``procs_per_node`` ranks each, output prefixed by node.

    ``rendezvous="static"``: ``--node-rank i --master-addr 127.0.0.1 --master-port P`` (node 0 hosts
    the store); ``"c10d"``: every agent joins ``127.0.0.1:P`` with one id and gets its node rank there.
    ``max_restarts``, ``ready``, ``ready_timeout``, ``on_line``: as in ``run``.
    """
    _check(timeout, ready_timeout if ready else None, n_nodes=n_nodes, procs_per_node=procs_per_node)
    if rendezvous not in ("static", "c10d"):
        raise ValueError(f"rendezvous must be 'static' or 'c10d', got {rendezvous!r}")
    port, run_id = _pick_port(port), f"sim-{uuid.uuid4().hex[:8]}"
    cmds = [torchrun_cmd(target, args, nproc=procs_per_node, nnodes=n_nodes, max_restarts=max_restarts,
                         rdzv=_rdzv(rendezvous, f"127.0.0.1:{port}", i, run_id)) for i in range(n_nodes)]
    full_env, shown = _env(env, local=True)
    envs = [full_env | _node_gpus(full_env, i, n_nodes, procs_per_node) for i in range(n_nodes)]
    job = _procs.Job([_wrapped(c) for c in cmds], envs, [f"[node{i}] " for i in range(n_nodes)],
                     stream, on_line, grace, ready)
    return _supervise(job, " &\n".join(_show(c, shown) for c in cmds), timeout, grace, port, ready_timeout)


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
