"""labutils.serving against a real `transformers serve` on the small random model (one server per module)."""

import importlib.util
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from labutils import models, results, serving

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dir():
    return models.load("mistral-tiny-small", dtype="float32", device="cpu").path


@pytest.fixture(scope="module")
def server(model_dir):
    srv = serving.Server(model_dir, device="cpu", dtype="float32", startup_timeout=600)
    with srv:
        yield srv
    assert not srv.running and _gone(srv.pid)


def _listening(port: int) -> bool:
    """Something listens on ``port``: read from the kernel's socket tables where there are some (Linux), else by
    connecting. (Not ``serving.port_in_use``, which asks whether the port can be bound: any process's outgoing
    loopback connection that drew it as its local port makes that fail; nor a bare connect, which on loopback can
    meet itself when the kernel hands out the same port as the local one.)"""
    tables = [Path("/proc/net/tcp"), Path("/proc/net/tcp6")]
    if tables[0].exists():
        rows = [line.split() for t in tables if t.exists() for line in t.read_text().splitlines()[1:]]
        return any(int(r[1].rsplit(":", 1)[1], 16) == port and r[3] == "0A" for r in rows)  # 0A: LISTEN
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        return True
    except OSError:
        return False


def _released(port: int, wait_s: float = 20.0) -> bool:
    """True once nothing listens on ``port`` (polled: the signal that the listener has closed, not a sleep)."""
    deadline = time.monotonic() + wait_s
    while _listening(port):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _gone(pid: int, wait_s: float = 10.0) -> bool:
    """True once ``pid`` no longer exists (or is a zombie nobody reaps)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                return True
        except (FileNotFoundError, ProcessLookupError):
            return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def _sse_events(text: str) -> list[dict]:
    datas = [ln[5:].strip() for ln in text.splitlines() if ln.startswith("data:")]
    return [json.loads(d) for d in datas if d != "[DONE]"]


def test_health_and_loopback_only(server):
    assert server.running and server.port and server.url.startswith("http://127.0.0.1:")
    assert serving.http_get(server.url + "/health") == (200, '{"status":"ok"}')
    assert "--host 127.0.0.1" in shlex.join(server.command())


def test_openai_client_streams_completion_and_chat(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    body = serving.completion_body(server.model, "The sky is", 6)
    stream = client.completions.create(model=server.model, prompt="The sky is", max_tokens=6, stream=True,
                                       extra_body={"generation_config": body["generation_config"]})
    chunks = list(stream)
    texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert len(texts) >= 2  # streamed, not one blob
    assert chunks[-1].usage.completion_tokens == 6  # fixed length: min = max new tokens
    chat = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=4, stream=True)
    content = [c.choices[0].delta.content for c in chat if c.choices and c.choices[0].delta.content]
    assert 1 <= len(content) <= 4


def test_plain_http_streams(server):
    cmd = server.curl_command("The sky is", max_tokens=5)
    if shutil.which("curl"):
        out = subprocess.run(shlex.split(cmd), capture_output=True, text=True, timeout=60, check=True).stdout
    else:  # the same request through the standard library
        body = json.loads(shlex.split(cmd)[-1])
        req = urllib.request.Request(server.url + "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        out = urllib.request.urlopen(req, timeout=60).read().decode()
    events = _sse_events(out)
    assert len(events) >= 2 and all(e["choices"] for e in events)
    assert 1 <= events[-1]["usage"]["completion_tokens"] <= 5


def test_a_busy_explicit_port_is_a_clear_error(model_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        srv = serving.Server(model_dir, port=port, device="cpu")
        with pytest.raises(ValueError, match=rf"port {port} .*in use.*port=None"):
            srv.start()
        assert srv.proc is None and srv.pid is None  # nothing was started


def test_port_none_picks_a_free_port(server):
    assert serving.port_in_use(server.port)  # the running server holds its port
    p = serving.free_port()
    assert p != server.port and not serving.port_in_use(p)


def test_a_server_that_fails_to_start_reports_its_log_and_leaves_nothing(tmp_path):
    bogus = tmp_path / "not-a-model"
    bogus.mkdir()
    (bogus / "config.json").write_text("{ this is not json")
    srv = serving.Server(bogus, device="cpu", startup_timeout=600)
    with pytest.raises(RuntimeError, match=r"exited with code .*Last lines of") as err:
        srv.start()
    assert srv.log_tail(5) in str(err.value) and "not a valid JSON file" in str(err.value)  # the cause
    assert not srv.running and _gone(srv.pid) and _released(srv.port)
    srv.stop()
    srv.stop()  # idempotent
    assert str(srv.log_path) in str(err.value) and srv.log_path.exists()  # a failure keeps its log
    srv.log_path.unlink()


def test_a_startup_timeout_kills_the_server(model_dir):
    srv = serving.Server(model_dir, device="cpu", startup_timeout=0.5)
    with pytest.raises(RuntimeError, match=r"did not answer /health within"):
        srv.start()
    assert _gone(srv.pid) and _released(srv.port)
    srv.stop()
    srv.log_path.unlink()  # kept, as after every failure


def test_stream_request_failures_are_results_not_exceptions(server):
    r = serving.stream_request(server.url, "some-other-model", "Hi", 4)
    assert not r.ok and "HTTP 400" in r.error
    r = serving.stream_request(f"http://127.0.0.1:{serving.free_port()}", server.model, "Hi", 4)
    assert not r.ok and "Refused" in r.error


def test_sweep_statistics_are_consistent(server):
    prompts = serving.make_prompts(models.load_tokenizer(), 3, 24)
    result = serving.sweep(server.url, server.model, prompts, (1, 2), requests_per_level=3, max_tokens=6)
    assert result.warmup.ok and [lv.concurrency for lv in result.levels] == [1, 2]
    for lv in result.levels:
        assert len(lv.ok) == 3 and lv.errors == []
        for r in lv.results:
            assert r.tokens_from == "usage" and r.output_tokens == 6 and r.prompt_tokens == 24
            assert 0 < r.ttft <= r.e2e and len(r.itl) == r.chunks - 1
            assert r.tpot == pytest.approx((r.e2e - r.ttft) / 5)
        s = lv.summary()
        assert s["output_tokens"] == 18 and s["output_tok_per_s"] == pytest.approx(18 / lv.wall_s)
        assert s["ttft"].p50 <= s["e2e"].p50 and s["itl"].n == sum(len(r.itl) for r in lv.results)
    lv = result.levels[0]
    assert lv.goodput(float("inf"), float("inf")) == pytest.approx(lv.summary()["request_per_s"])
    assert lv.goodput(0.0, float("inf")) == 0  # no request has a zero TTFT
    assert [r["metric"] for r in lv.latency_rows()] == ["TTFT", "TPOT", "ITL", "E2E"]
    rows = result.rows()
    assert [r["ok"] for r in rows] == [3, 3] and rows[0]["ttft p50"] <= rows[0]["ttft p99"]
    fig = serving.throughput_latency_figure(result)
    assert len(fig.axes[0].lines) == 2
    saved = json.loads(json.dumps(results._jsonable(result)))
    assert [lv["concurrency"] for lv in saved["levels"]] == [1, 2] and saved["levels"][0]["ttft"]["p50"] > 0


def test_make_prompts_are_distinct_and_sized():
    tok = models.load_tokenizer()
    prompts = serving.make_prompts(tok, 4, 32)
    assert len(set(prompts)) == 4
    assert [len(tok(p).input_ids) for p in prompts] == [32] * 4


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_a_killed_parent_takes_its_server_with_it(fake_cli):
    """A notebook kernel killed with SIGKILL runs no atexit: the server must still go. (The stand-in CLI: what
    stops the server is the boot script's parent-death signal and lifeline, the same for the real one.)"""
    script = textwrap.dedent(f"""
        import os, signal
        from labutils import serving
        srv = serving.Server({str(fake_cli)!r}, device="cpu", startup_timeout=600).start()
        print(srv.pid, srv.port, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900,
                         cwd=REPO, env=os.environ.copy())  # fake_cli put the stand-in first on PYTHONPATH
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    pid, port = map(int, out.stdout.split())
    assert _gone(pid, wait_s=20) and _released(port)


def test_an_unimportable_mistral_common_does_not_break_the_server(model_dir, tmp_path, monkeypatch):
    """mistral-common installed without its dependencies must not stop the server loading the tokenizer."""
    (tmp_path / "tiktoken.py").write_text("raise ImportError('simulated: tiktoken is missing')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")]))
    with serving.Server(model_dir, device="cpu", startup_timeout=600) as srv:
        assert serving.stream_request(srv.url, srv.model, "Hi", 3).ok
        assert "hidden from transformers" in srv.log_tail(200)


# ---------------------------------------------------------------- hardening (issue 10), with a stand-in CLI
_FAKE_CLI = '''
import http.server, os, sys, time

def main():
    argv = sys.argv[1:]
    host, port = argv[argv.index("--host") + 1], int(argv[argv.index("--port") + 1])
    go = os.environ.get("FAKE_SERVE_GO")
    while go and not os.path.exists(go):  # the test decides when this server may bind its port
        time.sleep(0.05)
    if os.environ.get("FAKE_SERVE_FAIL"):
        print("fake serve: failing on purpose", flush=True)
        return 4

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b'{"status":"ok"}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    rfc = sys.modules.get("rfc3987_syntax", "not imported")
    print(f"fake serve on {host}:{port}; rfc3987_syntax {'hidden' if rfc is None else rfc}", flush=True)
    http.server.HTTPServer((host, port), Health).serve_forever()
'''


@pytest.fixture
def fake_cli(tmp_path, monkeypatch):
    """A `transformers` package whose CLI is a tiny /health server: Server's own start/stop path runs,
    without loading a model."""
    pkg = tmp_path / "fake" / "transformers"
    (pkg / "cli").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "cli" / "__init__.py").write_text("")
    (pkg / "cli" / "transformers.py").write_text(_FAKE_CLI)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "fake"), str(REPO)]))
    return tmp_path


class _Health(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_foreign_server_on_the_port_is_not_taken_for_ours(fake_cli, monkeypatch):
    """Another HTTP server binds the port after start() chose it: start() fails, naming it."""
    go = fake_cli / "go"
    monkeypatch.setenv("FAKE_SERVE_GO", str(go))
    srv, errors = serving.Server(fake_cli, device="cpu", startup_timeout=300), []

    def start():
        try:
            srv.start()
        except Exception as e:  # noqa: BLE001 - checked below
            errors.append(e)

    t = threading.Thread(target=start)
    t.start()
    deadline = time.monotonic() + 120
    while srv.proc is None and t.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    foreign = HTTPServer(("127.0.0.1", srv.port), _Health)  # the port is taken before ours binds it
    threading.Thread(target=foreign.serve_forever, daemon=True).start()
    try:
        go.touch()
        t.join(timeout=300)
    finally:
        foreign.shutdown()
        foreign.server_close()
    assert errors, "start() took the foreign server's answer for its own"
    msg = str(errors[0])
    assert "not the server started here" in msg and f"pid {os.getpid()}" in msg, msg
    assert not srv.running and _gone(srv.pid)


def test_a_server_started_in_a_thread_outlives_the_thread(fake_cli):
    srv = serving.Server(fake_cli, device="cpu", startup_timeout=300)
    t = threading.Thread(target=srv.start)
    t.start()
    t.join(timeout=300)
    try:
        assert srv.running
        # the old parent-death signal fired when the starting thread ended (rc -15 about 1 s later):
        # watch for 5 s that the server keeps running and answering
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            assert srv.running and serving.http_get(srv.url + "/health")[0] == 200, srv.proc.poll()
            time.sleep(0.2)
    finally:
        srv.stop()
    assert _gone(srv.pid)


def test_the_log_goes_after_a_clean_stop_and_stays_after_a_failure(fake_cli, monkeypatch):
    with serving.Server(fake_cli, device="cpu", startup_timeout=300) as srv:
        log = srv.log_path
        assert log.exists() and "fake serve on 127.0.0.1" in srv.log_tail()
    assert not log.exists()
    monkeypatch.setenv("FAKE_SERVE_FAIL", "1")
    srv = serving.Server(fake_cli, device="cpu", startup_timeout=300)
    with pytest.raises(RuntimeError, match="exited with code 4") as err:
        srv.start()
    try:
        assert str(srv.log_path) in str(err.value) and "failing on purpose" in srv.log_path.read_text()
    finally:
        srv.log_path.unlink()


@pytest.mark.skipif(importlib.util.find_spec("rfc3987_syntax") is None, reason="rfc3987-syntax is not installed")
def test_the_server_skips_the_slow_optional_iri_checker(fake_cli):
    """mistral-common -> jsonschema -> rfc3987_syntax built 38 Lark parsers (~3 s) at every server start."""
    with serving.Server(fake_cli, device="cpu", startup_timeout=300) as srv:
        assert "rfc3987_syntax hidden" in srv.log_tail(), srv.log_tail()


def test_extra_args_cannot_move_the_server_off_loopback():
    with pytest.raises(ValueError, match=r"may not set --host.*127.0.0.1"):
        serving.Server("x", device="cpu", extra_args=["--host", "0.0.0.0"])
    with pytest.raises(ValueError, match=r"may not set --port=1"):
        serving.Server("x", device="cpu", extra_args=["--port=1"])
