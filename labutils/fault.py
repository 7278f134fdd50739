"""Fault drills for lab3: kill a rank mid-training, let torchrun restart the job, measure the recovery.

- ``run_train(args, nproc=2, max_restarts=1, ...)``: ``labutils/scripts/train.py`` under torchrun
  (``launch.run``, or ``launch.simulate_nodes`` for several "nodes"), its JSON result and the
  timeline parsed from its output; a failure raises ``DrillError``, a ``LaunchError`` whose
  message starts with what went wrong in plain words and what to change (``explain``).
- ``KillAt(step, rank)``: an ``on_line`` callback that SIGKILLs one worker from outside (as the
  OOM killer or a failing host would) when rank 0 reports that step, on the first attempt only.
- ``timeline(output)``: the READY / step / CRASH / RESUMED / DONE lines, by attempt; ``recovery``
  splits the time from the crash to the first resumed step into its phases.
- ``compare(a, b)``: the resumed run's losses against the unbroken run's, step by step.

Used in lab3 §Fault tolerance.
"""

from __future__ import annotations

import json
import os
import re
import signal
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import launch, plots

SCRIPT = "labutils.scripts.train"
# torch 2.13 + gloo: a restarted worker group never reconnects when the rendezvous store is shared
# with the workers (pytorch issue #135712); launch.py sets it by default once hardening lands.
RESTART_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}

_KV = re.compile(r"(\w+)=(\S+)")
_STEP = re.compile(r"step (\d+)/(\d+) ")


class DrillError(launch.LaunchError):
    """A drill's job failed; the message starts with ``explain``'s diagnosis."""


@dataclass
class Attempt:
    """One start of the worker group (torchrun's TORCHELASTIC_RESTART_COUNT)."""

    number: int
    ready: dict[int, dict] = field(default_factory=dict)  # rank -> READY fields
    steps: dict[int, tuple[float, float]] = field(default_factory=dict)  # step -> (loss, wall time)
    resumed_from: int | None = None
    resumed_t: float | None = None


@dataclass
class Timeline:
    attempts: list[Attempt]
    crash: dict | None  # {"rank", "step", "t"} from the CRASH line or the external kill
    final_loss: float | None

    def losses(self) -> dict[int, float]:
        """Each step's loss as the run that finished reported it (later attempts overwrite)."""
        return {s: v[0] for a in self.attempts for s, v in sorted(a.steps.items())}


def _fields(line: str) -> dict:
    out = {}
    for k, v in _KV.findall(line):
        try:
            out[k] = float(v) if any(c in v for c in ".e") else int(v)
        except ValueError:
            out[k] = v
    return out


def timeline(output: str) -> Timeline:
    """Parse train.py's output (any node prefix such as ``[node0] `` is ignored)."""
    attempts: dict[int, Attempt] = {}
    crash, final, current = None, None, 0
    for raw in output.splitlines():
        line = re.sub(r"^\[node\d+\] ", "", raw)
        f = _fields(line)
        if line.startswith("READY "):
            current = int(f["attempt"])
            attempts.setdefault(current, Attempt(current)).ready[int(f["rank"])] = f
        elif line.startswith("CRASH ") and crash is None:
            crash = {"rank": int(f["rank"]), "step": int(f["step"]), "t": float(f["t"])}
        elif line.startswith("RESUMED from step "):
            a = attempts.setdefault(current, Attempt(current))
            a.resumed_from, a.resumed_t = int(line.split()[3]), float(f["t"])
        elif (m := _STEP.match(line)) and "loss" in f:
            a = attempts.setdefault(int(f["attempt"]), Attempt(int(f["attempt"])))
            a.steps[int(m.group(1))] = (float(f["loss"]), float(f["t"]))
        elif line.startswith("DONE "):
            final = float(f["final_loss"]) if f.get("final_loss") not in (None, "None") else None
    return Timeline([attempts[k] for k in sorted(attempts)], crash, final)


def recovery(tl: Timeline, crash: dict | None = None) -> dict:
    """Seconds from the crash to the first step of the restarted attempt, and where they went.

    ``crash``: {"step", "t"} of an external kill (``KillAt.killed``); default: the output's CRASH line.
    """
    crash = crash or tl.crash or {}
    t_crash = crash.get("t")
    after = [a for a in tl.attempts if a.number > 0]
    if t_crash is None or not after or not after[0].steps:
        raise ValueError("no crash and restart in this output: run with max_restarts >= 1 and a crash "
                         "(--crash-at-step, or KillAt) before the last step")
    a = after[0]
    ready = max(r["t"] for r in a.ready.values())
    started = min(r["t"] - r["import_s"] for r in a.ready.values())
    first = a.steps[min(a.steps)][1]
    loaded = a.resumed_t if a.resumed_t is not None else ready
    lost = crash.get("step", 1) - 1 - (a.resumed_from or 0)  # done before the crash, redone after
    return {"crash_to_first_step_s": first - t_crash, "stop_and_restart_s": started - t_crash,
            "imports_s": ready - started, "init_build_load_s": loaded - ready, "first_step_s": first - loaded,
            "resumed_from_step": a.resumed_from, "redone_steps": lost}


def compare(unbroken: dict[int, float], resumed: dict[int, float], rtol: float = 0.0) -> dict:
    """Step-by-step losses of two runs: the largest relative difference, and whether it is within ``rtol``."""
    common = sorted(set(unbroken) & set(resumed))
    if not common:
        raise ValueError("the two runs share no step: run them with the same --steps")
    diffs = [abs(unbroken[s] - resumed[s]) / max(abs(unbroken[s]), 1e-30) for s in common]
    last = common[-1]
    return {"steps": len(common), "max_rel_diff": max(diffs), "bit_identical": all(d == 0 for d in diffs),
            "final_unbroken": unbroken[last], "final_resumed": resumed[last], "within_tolerance": max(diffs) <= rtol,
            "rtol": rtol}


def nodes_of(tl: Timeline) -> int:
    """How many nodes the first attempt's ranks reported in their READY lines."""
    return len({r["node"] for r in tl.attempts[0].ready.values()}) if tl.attempts else 0


def require_same_run(runs: dict[str, Timeline], base: str, nodes: dict[str, int] | None = None) -> None:
    """Raise unless every run (name -> Timeline of train.py's output) finished with a DONE line, logged every
    step of ``runs[base]`` with bit-identical losses, and ran on ``nodes[name]`` nodes where that is given.
    The same script with the same seed, data and world size must train the same under every orchestrator."""
    ref, bad = runs[base].losses(), []
    for name, tl in runs.items():
        if tl.final_loss is None:
            bad.append(f"{name}: no DONE line with a loss (the run did not finish: read its output)")
            continue
        if nodes and name in nodes and nodes_of(tl) != nodes[name]:
            bad.append(f"{name}: ranks on {nodes_of(tl)} node(s), expected {nodes[name]}")
        if set(tl.losses()) != set(ref):
            bad.append(f"{name}: logged steps {sorted(tl.losses())}, {base} logged {sorted(ref)}: same --steps?")
        elif not (c := compare(ref, tl.losses()))["bit_identical"]:
            bad.append(f"{name}: losses differ from {base}'s by up to {c['max_rel_diff']:.1e} (relative)")
    if bad:
        raise RuntimeError("; ".join(bad) + f". Every run must repeat {base}'s losses bit for bit (same seed, "
                           "data and world size; gloo and deterministic algorithms).")


class KillAt:
    """``on_line`` callback: SIGKILL rank ``rank``'s worker once rank 0 has finished step ``step``."""

    def __init__(self, step: int, rank: int = 1, sig: int = signal.SIGKILL):
        self.step, self.rank, self.sig = step, rank, sig
        self.pids: dict[int, int] = {}
        self.killed: dict | None = None

    def __call__(self, line: str) -> None:
        line = re.sub(r"^\[node\d+\] ", "", line)
        if line.startswith("READY "):
            f = _fields(line)
            if int(f["attempt"]) == 0:
                self.pids[int(f["rank"])] = int(f["pid"])
        elif self.killed is None and (m := _STEP.match(line)) and int(m.group(1)) == self.step \
                and " attempt=0 " in line and self.rank in self.pids:
            os.kill(self.pids[self.rank], self.sig)
            self.killed = {"rank": self.rank, "step": self.step + 1, "t": time.time(), "pid": self.pids[self.rank]}


@dataclass
class TrainRun:
    record: dict  # train.py's JSON (rank 0, the attempt that finished)
    timeline: Timeline
    output: str
    seconds: float
    cmd: str


def explain(text: str, cmd: str = "") -> str | None:
    """What a failed training job's output means, in plain words, with the fix; None if unknown."""
    if m := re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", text):
        return (f"rank(s) {m.group(1).strip()} stopped answering (hung or dead) while the others waited at the "
                f"step heartbeat: look at that rank's last lines; raise --heartbeat-s if its steps are just slow")
    if "CRASH rank=" in text and "exitcode: -9" in text:
        return "a worker was killed (SIGKILL) and no restart was allowed: pass max_restarts >= 1 to resume"
    if "RendezvousTimeoutError" in text:
        m = re.search(r"--nnodes (\S+)", cmd)
        n = f"{m.group(1)} nodes (--nnodes {m.group(1)})" if m else "--nnodes nodes"
        return (f"not every node joined the rendezvous in time: the job expects {n}, each an agent at the same "
                f"--rdzv-endpoint and --rdzv-id; start the missing node(s), or lower --nnodes to what exists")
    if "connectFullMesh" in text:
        return ("the restarted workers could not reconnect (gloo connectFullMesh, pytorch issue #135712): set "
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in the job's environment")
    if m := re.search(r"exiting with code (\d+)", text):
        return f"a rank exited with code {m.group(1)} before the job could start; the others were stopped"
    return None


def run_train(args: Sequence = (), *, nproc: int = 2, nodes: int = 1, env: dict | None = None,
              max_restarts: int = 0, on_line=None, timeout: float = 600.0, stream: bool = False,
              **launch_kw) -> TrainRun:
    """train.py under torchrun with ``nodes`` x ``nproc`` ranks; the result, or ``DrillError`` saying why not."""
    if nodes > 1 and max_restarts:
        raise ValueError("simulate_nodes has no restarts: use nodes=1 (one agent) for a restart drill")
    with tempfile.TemporaryDirectory(prefix="smml-train-") as tmp:
        out = Path(tmp) / "train.json"
        full_args = [*map(str, args), "--out", str(out)]
        job_env = RESTART_ENV | dict(env or {})
        try:
            if nodes > 1:
                r = launch.simulate_nodes(nodes, nproc, SCRIPT, full_args, env=job_env, timeout=timeout,
                                          stream=stream, on_line=on_line, rendezvous="c10d", **launch_kw)
            else:
                r = launch.run(SCRIPT, full_args, nproc=nproc, env=job_env, timeout=timeout, stream=stream,
                               on_line=on_line, max_restarts=max_restarts, **launch_kw)
        except launch.LaunchError as e:
            why = explain(e.output + "\n" + str(e), e.cmd)
            raise DrillError(f"{why}\n{e}" if why else str(e), cmd=e.cmd, returncode=e.returncode,
                             output=e.output, tail=e.tail) from None
        record = json.loads(out.read_text())
    return TrainRun(record, timeline(r.output), r.output, r.seconds, r.cmd)


def plot(unbroken: Timeline, resumed: Timeline, device: str, crash_step: int | None = None):
    """Loss per step of the unbroken run and of each attempt of the crashed one, the crash marked."""
    fig, ax = plots.figure(f"Loss: unbroken vs killed and resumed ({device})", "step", "training loss")
    ax.plot(list(unbroken.losses()), list(unbroken.losses().values()), "k-", lw=3, alpha=0.3, label="unbroken")
    for a in resumed.attempts:
        xs = sorted(a.steps)
        ax.plot(xs, [a.steps[s][0] for s in xs], "o--", label=f"attempt {a.number}"
                + (f" (resumed from step {a.resumed_from})" if a.resumed_from else ""))
    if crash_step is not None:
        ax.axvline(crash_step - 0.5, color="red", ls=":", label=f"rank killed before step {crash_step}")
    ax.legend()
    return fig
