"""A real two-node Slurm cluster on this one host: munge, slurmctld and two slurmd, all stopped afterwards.

Needs Debian's packages (``apt-get install -y --no-install-recommends slurmctld slurmd slurm-client
munge``) and root (slurmd starts jobs as their user). The configuration is the template beside this
file (``local/slurm.conf.in``); every piece of state (munge key and socket, spool, logs, job output)
lives in one scratch folder that ``stop`` removes. Free ports are picked for slurmctld and the two
slurmd, so it can run beside another cluster. Run from the repository root:

  python launch/slurm/local_cluster.py demo      # up, sbatch launch/slurm/train.sbatch, show the output, down
  python launch/slurm/local_cluster.py check     # is it possible here? (exit 0, or the reason and exit 1)

In Python (the tests, lab3):

  from launch.slurm.local_cluster import LocalSlurm
  with LocalSlurm() as cluster:                    # up: returns once sinfo shows both nodes idle
      job = cluster.submit("launch/slurm/train.sbatch", "--steps", "4", env={"NPROC_PER_NODE": "2"})
      done = cluster.wait(job)                     # JobResult: state, exit code, the job's output
                                                   # down: cancel jobs, stop every daemon by its pid

Process tracking is proctrack/cgroup where cgroup v1's freezer is mounted (every process of a job is
killed with it, even workers in their own session); elsewhere proctrack/linuxproc, whose caveat (a
SIGKILLed torchrun agent's workers escape the job) ``stop`` handles: every process that carries this
cluster's marker in its environment is signalled by pid.

Used in lab3 §Orchestrators.
"""

from __future__ import annotations

import atexit
import ctypes
import fcntl
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
TOOLS = ("slurmctld", "slurmd", "sbatch", "sinfo", "scontrol", "squeue", "scancel", "munged")
APT = "apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge"
MARKER = "SMML_LOCAL_SLURM"
HOST_LOCK = Path(tempfile.gettempdir()) / "smml-local-slurm.lock"  # held by the cluster that is up
DONE_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
               "BOOT_FAIL", "DEADLINE"}


def unavailable() -> str | None:
    """None when a local cluster can start here, else the reason in plain words (and how to fix it)."""
    missing = [t for t in TOOLS if not shutil.which(t, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")]
    if missing:
        return f"Slurm is not installed ({', '.join(missing)} missing): as root, `{APT}`"
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root (slurmd starts jobs as their user); run as root"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return f"there is no 'munge' user (the munge package creates it): `{APT}`"
    return None


def _which(tool: str) -> str:
    return shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") or tool


def _free_ports(n: int) -> list[int]:
    """``n`` consecutive free TCP ports (slurm.conf gives the nodes a range)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n < 65000 and all(_port_free(base + i) for i in range(n)):
            return list(range(base, base + n))
    raise RuntimeError("found no free range of ports for the Slurm daemons")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))  # the daemons listen on every interface
            return True
        except OSError:
            return False


@dataclass
class JobResult:
    job_id: str
    state: str  # COMPLETED, FAILED, ...
    exit_code: str  # "rc:signal" as Slurm prints it
    output: str  # the job's stdout+stderr file
    seconds: float  # submit to end, as this process saw it


class LocalSlurm:
    """Context manager: a two-node cluster (node1, node2, 127.0.0.1) up inside the ``with`` block."""

    def __init__(self, scratch: str | os.PathLike | None = None, proctrack: str = "auto", timeout: float = 120.0):
        self.scratch = Path(scratch) if scratch else None
        self.proctrack = proctrack
        self.timeout = timeout
        self.procs: dict[str, subprocess.Popen] = {}
        self.started_s: float | None = None
        self._lock = None  # open file holding HOST_LOCK while this cluster is up

    # ------------------------------------------------------------ bring-up
    def __enter__(self) -> LocalSlurm:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def conf(self) -> Path:
        return self.scratch / "slurm.conf"

    def env(self, extra: dict | None = None) -> dict:
        """The environment for Slurm's clients (and the jobs they submit) to reach this cluster."""
        return os.environ | {"SLURM_CONF": str(self.conf), MARKER: str(self.scratch)} | dict(extra or {})

    def start(self) -> None:
        why = unavailable()
        if why:
            raise RuntimeError(why)
        t0 = time.monotonic()
        self._take_host_lock()
        if self.scratch is None:
            self.scratch = Path(tempfile.mkdtemp(prefix="smml-slurm-"))
        atexit.register(self.stop)  # a notebook kernel that exits still stops the cluster
        try:
            self._write_config()
            self._start_munge()
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-f", str(self.conf)])
            for node in ("node1", "node2"):
                self._spawn(f"slurmd-{node}", [_which("slurmd"), "-D", "-f", str(self.conf), "-N", node])
            self._wait_idle()
        except BaseException:
            self.stop()
            raise
        self.started_s = time.monotonic() - t0

    def _take_host_lock(self, wait_s: float = 1800.0) -> None:
        """One local cluster per host at a time (a test and a notebook may run side by side under pytest-xdist):
        wait for the other one to stop. The kernel drops the lock when its holder dies, so none is ever stale."""
        f = open(HOST_LOCK, "a+")  # noqa: SIM115 - held open until stop()
        end, said = time.monotonic() + wait_s, False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > end:
                    f.close()
                    raise RuntimeError(f"another local Slurm cluster held {HOST_LOCK} for {wait_s:.0f} s: stop it "
                                       "(LocalSlurm.stop(), or end the process that started it) and retry") from None
                if not said:
                    print(f"waiting for another local Slurm cluster on this host to stop ({HOST_LOCK})", flush=True)
                    said = True
                time.sleep(0.5)
        self._lock = f

    def _write_config(self) -> None:
        s = self.scratch
        s.chmod(0o755)  # the munge user must reach its own folder inside
        for sub in ("state", "spool/node1", "spool/node2", "run", "log", "jobs", "munge"):
            (s / sub).mkdir(parents=True, exist_ok=True)
        ctld, n1, n2 = _free_ports(1)[0], *_free_ports(2)
        track = self.proctrack
        if track == "auto":
            track = "cgroup" if Path("/sys/fs/cgroup/freezer").is_dir() else "linuxproc"
        self.proctrack = track
        text = (HERE / "local" / "slurm.conf.in").read_text()
        for k, v in {"SCRATCH": s, "CTLD_PORT": ctld, "NODE_PORTS": f"{n1}-{n2}",
                     "PROCTRACK": f"proctrack/{track}", "FIRST_JOB_ID": random.randrange(1000, 9_000_000)}.items():
            text = text.replace(f"@{k}@", str(v))
        self.conf.write_text(text)
        shutil.copy(HERE / "local" / "gres.conf", s / "gres.conf")
        shutil.copy(HERE / "local" / "cgroup.conf", s / "cgroup.conf")

    def _start_munge(self) -> None:
        m = self.scratch / "munge"
        user = pwd.getpwnam("munge")
        key = m / "munge.key"
        key.write_bytes(os.urandom(1024))
        for p in (m, key):
            os.chown(p, user.pw_uid, user.pw_gid)
        m.chmod(0o755)  # munged wants the socket folder searchable by all; nothing in it is writable by others
        key.chmod(0o400)
        self._spawn("munged", [_which("munged"), "-F", f"--socket={m}/munge.socket", f"--key-file={key}",
                               f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log",
                               f"--seed-file={m}/munged.seed"], user=user.pw_uid, group=user.pw_gid)
        self._poll(lambda: (m / "munge.socket").exists(), "munged to create its socket")

    def _spawn(self, name: str, cmd: list[str], **kw) -> None:
        log = open(self.scratch / "log" / f"{name}.console", "wb")  # noqa: SIM115 - closed by the child's exit
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=self.env(), start_new_session=True, preexec_fn=_die_with_parent,
                                            **kw)
        log.close()

    def _poll(self, ok, what: str) -> None:
        end = time.monotonic() + self.timeout
        while not ok():
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > end:
                raise RuntimeError(f"local Slurm: gave up waiting for {what} "
                                   f"({'exited: ' + ', '.join(dead) if dead else f'{self.timeout:g} s'})\n"
                                   + self.logs())
            time.sleep(0.2)

    def _wait_idle(self) -> None:
        def idle() -> bool:
            r = subprocess.run([_which("sinfo"), "-h", "-N", "-o", "%N %t"], env=self.env(),
                               capture_output=True, text=True)
            states = dict(line.split() for line in r.stdout.splitlines() if line.strip())
            return r.returncode == 0 and len(states) == 2 and set(states.values()) == {"idle"}
        self._poll(idle, "sinfo to show node1 and node2 idle")

    def logs(self, lines: int = 15) -> str:
        """The last lines of every daemon's log: what to read when bring-up fails."""
        out = []
        for f in sorted((self.scratch / "log").glob("*")) + [self.scratch / "munge" / "munged.log"]:
            if f.is_file():
                tail = f.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {f.name}\n" + "\n".join(tail))
        return "\n".join(out)

    # ------------------------------------------------------------ jobs
    def sinfo(self) -> str:
        return self._run("sinfo", "-N", "-o", "%N %T %c %G %P")

    def _run(self, tool: str, *args: str) -> str:
        r = subprocess.run([_which(tool), *args], env=self.env(), capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"{tool} {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r.stdout

    def submit(self, script: str | os.PathLike, *args: str, env: dict | None = None,
               options: tuple[str, ...] = ()) -> str:
        """``sbatch`` the script (from the repository root, output under the scratch folder): the job id."""
        out = self.scratch / "jobs" / "%x-%j.out"
        cmd = [_which("sbatch"), "--parsable", f"--output={out}", f"--chdir={REPO}", *options, str(script),
               *map(str, args)]
        r = subprocess.run(cmd, env=self.env({"PYTHON": sys.executable} | dict(env or {})), cwd=REPO,
                           capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"sbatch refused the job ({r.returncode}): {r.stderr.strip()}\n  {' '.join(cmd)}")
        self._submitted = time.monotonic()
        return r.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        """``scontrol show job`` as a dict (JobState, ExitCode, StdOut, NodeList, ...)."""
        text = self._run("scontrol", "show", "job", "-o", job_id)
        return dict(kv.split("=", 1) for kv in text.split() if "=" in kv)

    def wait(self, job_id: str, timeout: float = 600.0) -> JobResult:
        """Poll until the job ends (or raise after ``timeout`` s, the job cancelled); its result."""
        t0, end = time.monotonic(), time.monotonic() + timeout
        while (info := self.job(job_id))["JobState"] not in DONE_STATES:
            if time.monotonic() > end:
                subprocess.run([_which("scancel"), job_id], env=self.env())
                raise TimeoutError(f"Slurm job {job_id} still {info['JobState']} after {timeout:g} s: cancelled")
            time.sleep(0.3)
        path = Path(info["StdOut"])
        self._poll(lambda: path.exists(), f"job {job_id}'s output file")
        return JobResult(job_id, info["JobState"], info.get("ExitCode", "?"),
                         path.read_text(errors="replace"), time.monotonic() - t0)

    # ------------------------------------------------------------ teardown
    def stop(self, grace: float = 10.0) -> None:
        """Cancel every job, shut the daemons down, signal what is left by pid, delete the scratch folder."""
        if self.scratch is None:
            self._release_host_lock()
            return
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            subprocess.run([_which("scancel"), "--full", "--user", str(os.geteuid())], env=self.env(),
                           capture_output=True, timeout=30)
            subprocess.run([_which("scontrol"), "shutdown"], env=self.env(), capture_output=True, timeout=30)
        end = time.monotonic() + grace
        while time.monotonic() < end and any(p.poll() is None for n, p in self.procs.items() if n != "munged"):
            time.sleep(0.2)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self._ours():
                _kill(pid, sig)
            for p in self.procs.values():
                if p.poll() is None:
                    _kill(p.pid, sig)
            end = time.monotonic() + 5
            while time.monotonic() < end and (self._ours() or any(p.poll() is None for p in self.procs.values())):
                time.sleep(0.2)
        for p in self.procs.values():
            p.wait(timeout=5)
        self.procs.clear()
        shutil.rmtree(self.scratch, ignore_errors=True)
        self.scratch = None
        self._release_host_lock()

    def _release_host_lock(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file drops the flock
            self._lock = None

    def _ours(self) -> list[int]:
        """Live pids (besides this one) whose environment carries this cluster's marker: stepds, job processes."""
        want = f"{MARKER}={self.scratch}".encode()
        found = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            try:
                if want in (d / "environ").read_bytes().split(b"\0") and "Z" not in (d / "stat").read_text().split()[2]:
                    found.append(int(d.name))
            except OSError:
                pass
        return found


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started us dies (even by SIGKILL)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def main(argv: list[str] | None = None) -> int:
    cmd = (argv if argv is not None else sys.argv[1:]) or ["demo"]
    why = unavailable()
    if cmd[0] == "check":
        print(why or "ok: a local two-node Slurm can start here")
        return 1 if why else 0
    if why:
        print(f"cannot start a local Slurm: {why}", file=sys.stderr)
        return 1
    with LocalSlurm() as c:
        print(f"up in {c.started_s:.1f} s ({c.proctrack}); SLURM_CONF={c.conf}\n{c.sinfo()}", flush=True)
        job = c.submit("launch/slurm/train.sbatch", "--steps", "4",
                       env={"NPROC_PER_NODE": "2", "SMML_DIST_BACKEND": "gloo"})
        r = c.wait(job)
        print(f"job {r.job_id}: {r.state} (exit {r.exit_code}) in {r.seconds:.1f} s\n{r.output}")
    return 0 if r.state == "COMPLETED" else 1


if __name__ == "__main__":
    sys.exit(main())
