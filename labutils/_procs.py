"""Private: the processes of one launched job, every line of their output, and their teardown.

``Job`` starts some torchrun agents (each in a session and process group of its own), reads each
pipe to its end in a thread (lines queue without limit, so a slow ``on_line`` callback loses
nothing), and kills every process carrying the job's marker. A watchdog process, started first,
holds a pipe from this Python: if this Python dies without saying ``done`` (a kernel killed with
SIGKILL runs no ``finally``), the pipe's end-of-file makes the watchdog kill the whole job.

Used by labutils.launch (lab2 §Four ranks, lab3 §Orchestrators and §Two nodes on one host).
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

MARKER = "SMML_LAUNCH_ID"  # every process of a job inherits it: how stragglers are found

# The watchdog: stdin carries the agents' process-group ids, then "done"; EOF before "done" means
# the supervisor died, so SIGTERM every group and marked process, SIGKILL what is left after grace.
_WATCH = r"""
import os, signal, sys, time
needle, grace, groups = sys.argv[1].encode(), float(sys.argv[2]), []
for line in sys.stdin:
    if line.strip() == "done":
        sys.exit(0)
    groups.append(int(line))
def members():
    found = []
    for d in os.listdir("/proc"):
        try:
            if d.isdigit() and int(d) != os.getpid():
                with open("/proc/" + d + "/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        found.append(int(d))
        except OSError:
            pass
    return found
for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
    for kill, ids in ((os.killpg, groups), (os.kill, members())):
        for i in ids:
            try:
                kill(i, sig)
            except OSError:
                pass
    end = time.monotonic() + wait
    while time.monotonic() < end and members():
        time.sleep(0.2)
"""


def _watchdog(marker: str, grace: float) -> subprocess.Popen | None:
    if not sys.platform.startswith("linux"):
        return None  # it finds the job's processes through /proc
    env = {k: v for k, v in os.environ.items() if k != MARKER}
    return subprocess.Popen([sys.executable, "-c", _WATCH, f"{MARKER}={marker}", str(grace)], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, text=True,
                            start_new_session=True)


class Job:
    """Some torchrun agents started together; their merged output; guaranteed teardown."""

    def __init__(self, cmds, envs, prefixes, stream: bool, on_line: Callable[[str], None] | None,
                 grace: float = 5.0, ready: str | None = None):
        self.launch_id, self.stream, self.on_line, self.prefixes = envs[0][MARKER], stream, on_line, prefixes
        self.ready, self.ready_at = ready, None
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.lines: list[list[str]] = [[] for _ in cmds]
        self.merged: list[str] = []
        self.eof = [False] * len(cmds)
        self.procs: list[subprocess.Popen] = []
        self.watch = _watchdog(self.launch_id, grace)
        try:  # a session (and process group) of its own: the job can be signalled without touching us
            for cmd, env in zip(cmds, envs):
                self.procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                                   stdin=subprocess.DEVNULL, start_new_session=True, text=True,
                                                   errors="replace"))
                self._tell(str(self.procs[-1].pid))
        except BaseException:  # a later agent failed to start: the earlier ones must not outlive us
            self.kill(grace)
            self.close()
            raise
        self.readers = [threading.Thread(target=self._read, args=(i, p), daemon=True)
                        for i, p in enumerate(self.procs)]
        for t in self.readers:
            t.start()

    def _tell(self, msg: str) -> None:
        if self.watch is not None and self.watch.stdin and not self.watch.stdin.closed:
            try:
                self.watch.stdin.write(msg + "\n")
                self.watch.stdin.flush()
            except OSError:
                pass

    def _read(self, i: int, p: subprocess.Popen) -> None:
        try:
            for line in p.stdout:
                self.q.put((i, line.rstrip("\n")))
        finally:
            self.q.put((i, None))  # end of this pipe

    def pump(self, wait_s: float, budget: int = 1000) -> int:
        """Move up to ``budget`` queued lines (waiting up to ``wait_s`` for the first) to the output."""
        moved = 0
        while moved < budget:
            try:
                i, line = self.q.get(timeout=wait_s) if moved == 0 and wait_s > 0 else self.q.get_nowait()
            except queue.Empty:
                break
            moved += 1
            if line is None:
                self.eof[i] = True
                continue
            line = self.prefixes[i] + line
            self.lines[i].append(line)
            self.merged.append(line)
            if self.ready and self.ready_at is None and self.ready in line:
                self.ready_at = time.monotonic()
            if self.stream:
                print(line, flush=True)
            if self.on_line:
                self.on_line(line)
        return moved

    def drain(self, idle_s: float = 30.0) -> None:
        """Read every pipe to its end; give up only after ``idle_s`` seconds with no line and no end."""
        last = time.monotonic()
        while not all(self.eof) and time.monotonic() - last < idle_s:
            if self.pump(0.2):
                last = time.monotonic()
        if not all(self.eof):
            note = f"[launch] an output pipe was still open {idle_s:g} s after the job ended: output may be cut"
            self.merged.append(note)
            self.lines[self.eof.index(False)].append(note)

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
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            others = self.members()
            roots = [p for p in self.procs if p.poll() is None]
            if not roots and not others:
                return
            for pid in [p.pid for p in roots] + [c.pid for c in others]:
                signal_group(pid, sig)
            end = time.monotonic() + wait
            while time.monotonic() < end and (any(p.poll() is None for p in self.procs) or self.members()):
                if not self.pump(0.1):
                    time.sleep(0.05)

    def close(self) -> None:
        """Tell the watchdog the job is over (it exits without killing anything) and close the pipes."""
        self._tell("done")
        if self.watch is not None:
            self.watch.stdin.close()
            try:
                self.watch.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.watch.kill()
        for p in self.procs:
            if p.stdout and all(self.eof):
                p.stdout.close()

    def tail(self, n: int, upto: list[int] | None = None) -> str:
        """Per agent: its first traceback (the root cause, wherever it is) and its last lines."""
        per = n if len(self.lines) == 1 else max(n // len(self.lines), 15)
        cut = upto or [len(lines) for lines in self.lines]
        return "\n".join(_tail(_quiet(lines[:k], pre), per, pre)
                         for lines, k, pre in zip(self.lines, cut, self.prefixes))


def _quiet(lines: list[str], prefix: str = "") -> list[str]:
    """Drop the stack frames of torch.distributed, runpy and the agent wrapper (not the script's)."""
    out, skip = [], False
    for line in lines:
        text = line[len(prefix):]
        if text.lstrip().startswith('File "'):
            skip = any(s in text for s in ("torch/distributed/", "<frozen runpy>", "labutils/_agent.py"))
        else:  # a dropped frame's source line and ^^^ markers are indented by 4
            skip = skip and text.startswith("    ")
        if not skip:
            out.append(line)
    return out


_EXC = re.compile(r"[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning)\b")


def _traceback(lines: list[str], prefix: str, limit: int = 15) -> tuple[int, list[str]] | None:
    """(start, lines) of the first Python traceback: its header, frames and exception line, skipping
    lines of other ranks printed in between; at most ``limit`` lines (the innermost frames)."""
    starts = [i for i, ln in enumerate(lines) if ln[len(prefix):].startswith("Traceback (most recent call last)")]
    if not starts:
        return None
    s, frames = starts[0], []
    for ln in lines[s + 1:s + 400]:
        text = ln[len(prefix):]
        if text.startswith(" "):
            frames.append(ln)
        elif _EXC.match(text):
            return s, [lines[s], *frames[-(limit - 2):], ln]
    return s, [lines[s], *frames[-(limit - 2):]]


def _tail(lines: list[str], n: int, prefix: str) -> str:
    tb = _traceback(lines, prefix)
    if tb is None or tb[0] >= len(lines) - n:  # no traceback, or it is among the last lines anyway
        return "\n".join(lines[-n:])
    keep = max(n - len(tb[1]) - 1, 10)
    return "\n".join([*tb[1], f"{prefix}[...]", *lines[-keep:]])


def signal_group(pid: int, sig: int) -> None:
    try:
        pgid = os.getpgid(pid)
        if pgid == os.getpgrp():  # never signal our own group (the notebook kernel, pytest)
            os.kill(pid, sig)
        else:
            os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
