"""Serve a model over an OpenAI-compatible HTTP API and measure it under load.

- ``Server``: ``transformers serve <dir>`` on 127.0.0.1 (a free port unless one is given), ready
  once ``GET /health`` answers and the port's listener is the process it started (not some other
  server that took the port), always stopped: context exit, ``stop()`` (idempotent), atexit, and a
  pipe from the starting Python whose end-of-file stops the server (a killed Jupyter kernel takes
  its server with it, whichever thread started it). Its log is deleted after a clean stop.
- ``stream_request``: one streamed ``/v1/completions`` request, timed chunk by chunk.
- ``sweep``: closed-loop load at several concurrency levels, with TTFT/TPOT/ITL/e2e percentiles.

Definitions as vLLM's ``benchmark_serving``: TTFT = time to the first content chunk; TPOT =
(e2e - TTFT) / (output tokens - 1); ITL = every gap between consecutive content chunks; output
tokens/s = all output tokens of a level / its wall time. Output tokens come from the final chunk's
``usage`` (``tokens_from="usage"``), else are the number of content chunks (``"chunks"``). The client
is the standard library (threads + http.client): it runs inside a Jupyter kernel's event loop.

Used in lab0 §Deploy and §Benchmark, lab4 §Serving under load.
"""

from __future__ import annotations

import atexit
import http.client
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import timing
from .launch import free_port, port_is_free  # one port helper for jobs and servers

HOST = "127.0.0.1"
# The `transformers` CLI run by this interpreter (no script on PATH needed). Its stdin is a pipe whose
# other end only the starting Python holds: end-of-file there (that Python died, however) makes the
# server stop its own process group, whichever thread started it. Started from the main thread it also
# asks for SIGTERM at its parent's death (that signal follows the thread that forked, hence only then).
# A mistral-common that is installed but cannot be imported (missing dependencies) would make every
# Mistral tokenizer fail to load in the server; hidden, transformers reads tokenizer.json instead. Once the CLI
# has returned (stopped), the process ends with os._exit: the interpreter's teardown of torch and transformers
# is seconds of CPU that nobody waits for usefully (labutils._agent does the same for ranks; not imported
# here: the server must start without labutils on its path). A sys.exit message still reaches the log.
# mistral-common imports jsonschema, whose optional `iri` format checker comes from rfc3987-syntax (installed
# with JupyterLab); importing that builds 38 Lark parsers, ~3 s of CPU at every server start. Nothing here
# validates IRIs, so the server hides it and jsonschema goes on without that one checker.
_BOOT = ("import ctypes, os, signal, sys, threading, time\n"
         "sys.modules.setdefault('rfc3987_syntax', None)\n"
         "if sys.argv.pop(1) == 'main-thread':\n"
         "    try:\n        ctypes.CDLL(None).prctl(1, signal.SIGTERM)\n    except Exception:\n        pass\n"
         "def lifeline():\n    while os.read(0, 512):\n        pass\n    os.killpg(0, signal.SIGTERM)\n"
         "    time.sleep(10)\n    os.killpg(0, signal.SIGKILL)\n"
         "threading.Thread(target=lifeline, daemon=True).start()\n"
         "try:\n    import mistral_common.tokens.tokenizers.tekken\n"
         "except Exception as e:\n    print(f'mistral-common unusable ({e}): hidden from transformers', flush=True)\n"
         "    sys.modules['mistral_common'] = None\n"
         "from transformers.cli.transformers import main\n"
         "try:\n    code = main()\nexcept SystemExit as e:\n    code = e.code\n"
         "if code is not None and not isinstance(code, int):\n    print(code, file=sys.stderr)\n"
         "sys.stdout.flush()\nsys.stderr.flush()\n"
         "os._exit(code if isinstance(code, int) else (0 if code is None else 1))\n")
OURS = ("--host", "--port")  # set by Server itself: 127.0.0.1 only, and the port it checks


def port_in_use(port: int) -> bool:
    """True if something listens on 127.0.0.1:``port`` (TIME_WAIT leftovers are no conflict)."""
    return not port_is_free(port, HOST)


class Server:
    """``transformers serve`` on 127.0.0.1: ``with Server(loaded.path) as srv: stream_request(srv.url, ...)``.

    ``model`` is the name requests must use (the server is pinned to it); ``extra_args`` go to the
    CLI as they are (e.g. ``["--continuous-batching"]``); ``pid`` stays set after ``stop()``.
    """

    def __init__(self, model_dir, *, port: int | None = None, device: str | None = None, dtype: str = "auto",
                 extra_args=(), startup_timeout: float = 300.0):
        import torch

        self.model, self.requested_port, self.dtype = str(model_dir), port, dtype
        self.device = device or ("cuda:0" if torch.cuda.is_available() else "cpu")
        self.extra_args = [str(a) for a in extra_args]
        taken = [a for a in self.extra_args if a.split("=")[0] in OURS]
        if taken:
            raise ValueError(f"extra_args may not set {', '.join(taken)}: the server always listens on {HOST} "
                             f"only, at port= (None picks a free one); drop them from extra_args")
        self.startup_timeout = startup_timeout
        self.port = self.pid = self.proc = self.log_path = self._lifeline = None
        self.startup_s = float("nan")

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self) -> list[str]:
        return ["transformers", "serve", self.model, "--host", HOST, "--port", str(self.port),
                "--device", self.device, "--dtype", self.dtype, *self.extra_args]

    def start(self, progress: bool = False) -> Server:
        """Start the server and wait until ``/health`` answers; raise with the log tail if not.

        ``progress``: a tqdm bar while it waits, with the seconds so far and the server log's latest line
        (imports, model load, "Application startup complete"): a minute-long start on a CPU is never silent."""
        if self.running:
            return self
        if self.requested_port is not None and port_in_use(self.requested_port):
            raise ValueError(f"port {self.requested_port} on {HOST} is already in use: pass port=None to "
                             f"pick a free one, or stop what listens there (see `lsof -i :{self.requested_port}`)")
        self.port = self.requested_port or free_port()
        fd, name = tempfile.mkstemp(prefix=f"smml-serve-{self.port}-", suffix=".log")
        self.log_path = Path(name)
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        where = "main-thread" if threading.current_thread() is threading.main_thread() else "thread"
        with os.fdopen(fd, "wb") as log:  # own session = own process group, killed as a whole
            self.proc = subprocess.Popen([sys.executable, "-c", _BOOT, where, *self.command()[1:]],
                                         stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        self.pid, self._lifeline = self.proc.pid, self.proc.stdin  # never written: only its EOF matters
        atexit.register(self.stop)
        t0 = time.perf_counter()
        try:
            self._wait_healthy(progress)
        except BaseException:
            self.stop(keep_log=True)
            raise
        self.startup_s = time.perf_counter() - t0
        return self

    def _wait_healthy(self, progress: bool = False) -> None:
        from tqdm.auto import tqdm

        deadline = time.monotonic() + self.startup_timeout
        bar = tqdm(desc="transformers serve: starting", bar_format="{desc} {elapsed} | {postfix}",
                   disable=not progress)
        try:
            self._poll_health(deadline, bar)
            bar.set_description_str("transformers serve: healthy")
            bar.set_postfix_str(f"answering /health on port {self.port}")
        finally:
            bar.close()

    def _log_phase(self) -> str:
        """The log's last non-empty line, for the progress bar (a warning is named, not repeated)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        lines = [x.strip() for x in self.log_tail(5).splitlines() if x.strip()]
        last = lines[-1] if lines else "python starting (imports)"
        return "the log has a warning (see the log)" if "warn" in last.lower() else last[-70:]

    def _poll_health(self, deadline: float, bar) -> None:
        while time.monotonic() < deadline:
            if not bar.disable:
                bar.set_postfix_str(self._log_phase(), refresh=True)
            if self.proc.poll() is not None:
                raise RuntimeError(f"`{shlex.join(self.command())}` exited with code {self.proc.returncode} "
                                   f"before it was healthy. Last lines of {self.log_path}:\n{self.log_tail()}")
            if http_get(f"{self.url}/health", timeout=2.0)[0] == 200:
                if self._holds_port():
                    return
                raise RuntimeError(f"port {self.port} answered /health, but the process listening there is "
                                   f"{_listener(self.port)}, not the server started here (pid {self.pid}): "
                                   f"another program took the port. Stop it, or pass port=None for a free one.")
            time.sleep(0.25)
        raise RuntimeError(f"`{shlex.join(self.command())}` did not answer /health within "
                           f"{self.startup_timeout:.0f} s. Last lines of {self.log_path}:\n{self.log_tail()}")

    def _holds_port(self) -> bool:
        """True if the listening socket on our port belongs to the server we started (or its children)."""
        try:
            import psutil
        except ImportError:  # cannot tell: trust the answer
            return True
        try:
            root = psutil.Process(self.proc.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            return False
        for p in tree:
            with suppress(psutil.Error):
                if any(c.status == psutil.CONN_LISTEN and c.laddr.port == self.port
                       for c in p.net_connections(kind="tcp")):
                    return True
        return False

    def stop(self, grace_s: float = 10.0, keep_log: bool = False) -> None:
        """SIGTERM the server's process group, SIGKILL it after ``grace_s``; safe to call twice. The log
        is deleted after a clean run, kept (and its path given in a warning) if the server had died."""
        atexit.unregister(self.stop)
        proc, self.proc = self.proc, None
        if proc is None:
            return
        died = proc.poll()
        _killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            _killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        _killpg(proc.pid, signal.SIGKILL)  # anything the server left in its group
        with suppress(OSError):
            self._lifeline.close()
        if died is not None and not keep_log:
            warnings.warn(f"the server (pid {proc.pid}) had exited with code {died} before stop(); "
                          f"its log is kept at {self.log_path}", stacklevel=2)
        elif not keep_log and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def curl_command(self, prompt: str = "The capital of France is", max_tokens: int = 16) -> str:
        """The plain-HTTP request a reader can paste into a shell (``-N``: print events as they arrive)."""
        body = json.dumps({"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "stream": True})
        return shlex.join(["curl", "-sN", f"{self.url}/v1/completions", "-H", "Content-Type: application/json",
                           "-d", body])

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"Server({self.model!r}, device={self.device!r}, " + \
            (f"running at {self.url})" if self.running else "stopped)")


def _listener(port: int) -> str:
    """Who listens on ``port``: 'pid N (command)', as far as this user may see."""
    try:
        import psutil

        pids = {c.pid for c in psutil.net_connections(kind="tcp")
                if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
        return ", ".join(f"pid {p} ({' '.join(psutil.Process(p).cmdline())[:120]})" if p else "a process of "
                         "another user" for p in sorted(pids, key=lambda p: p or 0)) or "unknown"
    except Exception:  # noqa: BLE001 - psutil missing or not allowed: say so
        return "unknown (psutil could not tell)"


def _killpg(pgid: int, sig: int) -> None:
    with suppress(ProcessLookupError):  # the group is gone already
        os.killpg(pgid, sig)


def _split(url: str) -> tuple[str, int, str]:
    hostport, _, path = url.split("://", 1)[-1].partition("/")
    host, _, port = hostport.partition(":")
    return host, int(port or 80), "/" + path


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """(status, body) of a GET; status 0 when nothing answers."""
    host, port, path = _split(url)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    except (OSError, http.client.HTTPException):
        return 0, ""
    finally:
        conn.close()


# ---------------------------------------------------------------- the load client
@dataclass
class RequestResult:
    """One streamed request; times in seconds from sending it (``start``: its perf_counter)."""

    ok: bool
    ttft: float = float("nan")
    e2e: float = float("nan")
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None
    chunks: int = 0
    tokens_from: str = "chunks"  # "usage" (reported by the server) or "chunks" (counted here)
    text: str = ""
    error: str = ""
    start: float = 0.0

    @property
    def tpot(self) -> float:
        n = self.output_tokens
        return (self.e2e - self.ttft) / (n - 1) if self.ok and n > 1 else float("nan")

    def as_dict(self) -> dict:
        return asdict(self) | {"tpot": self.tpot}


def completion_body(model: str, prompt: str, max_tokens: int, fixed_length: bool = True) -> dict:
    """A greedy streamed /v1/completions body. ``fixed_length``: min = max new tokens, so an EOS cannot
    end the request early (``transformers serve`` accepts a ``generation_config`` JSON string)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "temperature": 0.0}
    if fixed_length:
        body["generation_config"] = json.dumps({"max_new_tokens": max_tokens, "min_new_tokens": max_tokens,
                                                "do_sample": False})
    return body


def stream_request(url: str, model: str, prompt: str, max_tokens: int, *, fixed_length: bool = True,
                   timeout: float = 600.0) -> RequestResult:
    """Send one streamed completion to ``url`` (the server root) and time every chunk; never raises."""
    host, port, _ = _split(url)
    res = RequestResult(ok=False, start=time.perf_counter())
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", "/v1/completions", json.dumps(completion_body(model, prompt, max_tokens, fixed_length)),
                     {"Content-Type": "application/json", "Accept": "text/event-stream"})
        resp = conn.getresponse()
        if resp.status != 200:
            res.error = f"HTTP {resp.status}: {resp.read()[:500].decode(errors='replace')}"
        else:
            _read_events(resp, res)
    except (OSError, http.client.HTTPException, ValueError) as e:  # refused, reset, bad JSON
        res.error = f"{type(e).__name__}: {e}"
    finally:
        conn.close()
    return res


def _read_events(resp, res: RequestResult) -> None:
    last, parts = None, []
    for line in (raw.strip() for raw in resp):  # server-sent events: "data: {json}" lines
        if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
            continue
        now, msg = time.perf_counter() - res.start, json.loads(line[5:])
        if "error" in msg:
            res.error = str(msg["error"])
            return
        text = "".join(c.get("text") or "" for c in msg.get("choices", []))
        if text:
            if last is None:
                res.ttft = now
            else:
                res.itl.append(now - last)
            last, res.chunks = now, res.chunks + 1
            parts.append(text)
        if msg.get("usage"):
            res.output_tokens, res.tokens_from = int(msg["usage"]["completion_tokens"]), "usage"
            res.prompt_tokens = msg["usage"].get("prompt_tokens")
    res.e2e, res.text, res.ok = time.perf_counter() - res.start, "".join(parts), last is not None
    res.output_tokens = res.output_tokens if res.tokens_from == "usage" else res.chunks
    res.error = "" if res.ok else "the stream ended without any content"


# ---------------------------------------------------------------- the sweep
def _stats(values) -> timing.Stats | None:
    vals = [v for v in values if v == v]  # drop NaN
    return timing.stats(vals) if vals else None


@dataclass
class Level:
    """One concurrency level: its requests, at most ``concurrency`` of them in flight."""

    concurrency: int
    wall_s: float
    results: list[RequestResult]

    @property
    def ok(self) -> list[RequestResult]:
        return [r for r in self.results if r.ok]

    @property
    def errors(self) -> list[str]:
        return [r.error for r in self.results if not r.ok]

    def summary(self) -> dict:
        ok, n_out = self.ok, sum(r.output_tokens for r in self.ok)
        return {"concurrency": self.concurrency, "requests": len(self.results), "errors": len(self.errors),
                "wall_s": self.wall_s, "request_per_s": len(ok) / self.wall_s, "output_tokens": n_out,
                "output_tok_per_s": n_out / self.wall_s, "tokens_from": sorted({r.tokens_from for r in ok}),
                "ttft": _stats(r.ttft for r in ok), "tpot": _stats(r.tpot for r in ok),
                "itl": _stats(x for r in ok for x in r.itl), "e2e": _stats(r.e2e for r in ok)}

    def latency_rows(self, unit: float = 1e3) -> list[dict]:
        """p50/p90/p99 of each latency (ms by default), one row per metric, for ``plots.table``."""
        s = self.summary()
        return [{"metric": k.upper(), "n": s[k].n, **{q: getattr(s[k], q) * unit for q in ("p50", "p90", "p99")}}
                for k in ("ttft", "tpot", "itl", "e2e") if s[k]]

    def goodput(self, ttft_slo_s: float, tpot_slo_s: float) -> float:
        """Requests/s that met both latency objectives (DistServe's goodput)."""
        return sum(r.ttft <= ttft_slo_s and not r.tpot > tpot_slo_s for r in self.ok) / self.wall_s


def run_level(url: str, model: str, prompts: list[str], concurrency: int, requests: int, max_tokens: int,
              fixed_length: bool = True) -> Level:
    """``requests`` requests through ``concurrency`` workers (each sends its next when one returns)."""
    if concurrency < 1 or requests < 1 or not prompts:
        raise ValueError("need concurrency >= 1, requests >= 1 and at least one prompt")

    def one(i: int) -> RequestResult:
        return stream_request(url, model, prompts[i % len(prompts)], max_tokens, fixed_length=fixed_length)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    return Level(concurrency, time.perf_counter() - t0, results)


@dataclass
class Sweep:
    url: str
    model: str
    max_tokens: int
    fixed_length: bool
    warmup: RequestResult | None
    levels: list[Level]

    def rows(self, unit: float = 1e3) -> list[dict]:
        """One flat row per level (latencies in ms by default) for ``plots.table``."""
        return [{"concurrency": s["concurrency"], "ok": s["requests"] - s["errors"], "errors": s["errors"],
                 "req/s": s["request_per_s"], "out tok/s": s["output_tok_per_s"],
                 **{f"{k} {q}": getattr(s[k], q) * unit if s[k] else float("nan")
                    for k in ("ttft", "tpot", "itl", "e2e") for q in ("p50", "p90", "p99")}}
                for s in (lv.summary() for lv in self.levels)]

    def as_dict(self) -> dict:
        return {"url": self.url, "model": self.model, "max_tokens": self.max_tokens, "fixed_length": self.fixed_length,
                "warmup": self.warmup, "levels": [lv.summary() | {"requests_detail": [r.as_dict() for r in lv.results]}
                                                  for lv in self.levels]}


def sweep(url: str, model: str, prompts: list[str], concurrency_levels, requests_per_level: int, max_tokens: int,
          *, fixed_length: bool = True, warmup: int = 1, progress: bool = False) -> Sweep:
    """Closed-loop load at each concurrency level, after ``warmup`` untimed requests."""
    first = None
    for i in range(warmup):
        r = stream_request(url, model, prompts[i % len(prompts)], max_tokens, fixed_length=fixed_length)
        first = first or r
        if not r.ok:
            raise RuntimeError(f"warm-up request failed: {r.error}")
    levels = list(concurrency_levels)
    if progress:
        from tqdm.auto import tqdm

        levels = tqdm(levels, desc="concurrency levels")
    out = [run_level(url, model, prompts, c, requests_per_level, max_tokens, fixed_length) for c in levels]
    return Sweep(url, model, max_tokens, fixed_length, first, out)


def throughput_latency_figure(result: Sweep, title: str = "Throughput vs latency"):
    """Output tokens/s of all requests against end-to-end latency, one point per concurrency level."""
    from . import plots

    rows = result.rows(unit=1.0)
    tps = [r["out tok/s"] for r in rows]
    fig = plots.lines({f"{q} e2e": ([r[f"e2e {q}"] for r in rows], tps) for q in ("p50", "p90")}, title=title,
                      xlabel="end-to-end latency per request (s)", ylabel="output tokens/s (all requests)",
                      annotate={"p50 e2e": [f"c={r['concurrency']}" for r in rows]})
    fig.axes[0].set_ylim(bottom=0)
    fig.axes[0].set_xlim(left=0)
    return fig


def make_prompts(tokenizer, n: int, tokens: int) -> list[str]:
    """``n`` distinct English prompts of ``tokens`` tokens each (BOS included)."""
    words = _PASSAGE.split()
    texts = [" ".join(words[i % len(words):] + words * (1 + tokens // len(words))) for i in range(n)]
    return [tokenizer.decode(tokenizer(t, add_special_tokens=False)["input_ids"][: max(1, tokens - 1)])
            for t in texts]


_PASSAGE = ("A language model turns text into tokens, looks each one up in a table of vectors and passes them "
            "through a stack of identical layers. To write one new token it reads all of its weights once, so "
            "decoding speed is set by memory bandwidth more than by arithmetic. Serving many users at once lets "
            "one pass over the weights produce a token for each of them.")
