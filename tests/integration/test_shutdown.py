"""Graceful shutdown and start-up failure of `llm-server serve`.

In process (fake engine): what a drain does to requests that reach the app, and how requests are cut when the
grace period runs out. With a real process: SIGTERM lets an in-flight stream finish (exit 0, usage written),
cuts one that outlasts ``SHUTDOWN_GRACE_S`` with an error frame, refuses new connections meanwhile; a model that
does not load ends the process with one line on stderr.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar import Litestar
from litestar.testing import TestClient

from server.engine.fake import FakeEngine
from server.exchange.shutdown import Lifecycle
from server.wiring.state import app_state
from tests.live import live_server
from tests.process import ServeProcess, prepare_data_dir, read_until_closed, serving, start, stop

MSGS = [{"role": "user", "content": "hi"}]


# ---- in process ------------------------------------------------------------------------------------------


def test_requests_reaching_a_draining_app_get_503(
    make_app: Callable[..., Litestar], authed: Callable[[Any], Any]
) -> None:
    app = make_app()
    with authed(TestClient(app)) as client:
        app_state(app).lifecycle.draining = True
        r = client.post("/v1/chat/completions", json={"model": "fake", "messages": MSGS})
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.headers["x-request-id"]
        assert r.json()["error"]["code"] == "overloaded" and "shutting down" in r.json()["error"]["message"]
        assert client.get("/v1/models").status_code == 503
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        assert client.get("/health").status_code == 200  # liveness: the process still runs
        assert client.get("/metrics").status_code == 200


def wait_in_flight(lifecycle: Lifecycle) -> None:
    deadline = time.monotonic() + 5
    while lifecycle.in_flight < 1:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.005)


class LoopSpy:
    """A fake-engine script that notes the app's event loop (the live server runs it in another thread)."""

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        self.loop: asyncio.AbstractEventLoop | None = None

    def __call__(self, request: Any) -> list[str]:
        self.loop = asyncio.get_running_loop()
        return ["x"] * self.tokens

    def on_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        assert self.loop is not None
        self.loop.call_soon_threadsafe(fn, *args)


def test_grace_over_cuts_a_stream_with_an_error_frame(make_app: Callable[..., Litestar], api_key: str) -> None:
    spy = LoopSpy(500)
    engine = FakeEngine(spy, delay_s=0.01)
    app = make_app(engine)
    lifecycle: Lifecycle = app_state(app).lifecycle
    body = {"model": "fake", "messages": MSGS, "stream": True, "stream_options": {"include_usage": True}}
    with live_server(app) as base, httpx.Client(base_url=base, timeout=10) as http:
        auth = {"Authorization": f"Bearer {api_key}"}
        with http.stream("POST", "/v1/chat/completions", json=body, headers=auth) as r:
            lines = (line for line in r.iter_lines() if line)
            frames = [next(lines), next(lines), next(lines)]
            spy.on_loop(lifecycle.begin, 0)  # grace 0: cut at once
            frames += list(lines)
        deadline = time.monotonic() + 5
        while lifecycle.in_flight:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    assert r.status_code == 200 and frames[0].startswith("data: {")
    last = json.loads(frames[-1].removeprefix("data: "))
    assert last["error"]["code"] == "overloaded" and last["error"]["type"] == "server_error"
    assert "data: [DONE]" not in frames
    assert 3 <= len(frames) - 1 < 500  # some content chunks, not all of them
    assert engine.aborted == [engine.requests[0].request_id]


def test_grace_over_cuts_a_non_stream_request_with_503(make_app: Callable[..., Litestar], api_key: str) -> None:
    spy = LoopSpy(500)
    engine = FakeEngine(spy, delay_s=0.01)
    app = make_app(engine)
    lifecycle: Lifecycle = app_state(app).lifecycle
    body = {"model": "fake", "messages": MSGS}
    with live_server(app) as base, httpx.Client(base_url=base, timeout=10) as http:
        http.headers["Authorization"] = f"Bearer {api_key}"
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(http.post, "/v1/chat/completions", json=body)
            wait_in_flight(lifecycle)
            spy.on_loop(lifecycle.expire)
            r = pending.result(timeout=10)
        after = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 503 and r.headers["retry-after"]
    assert r.json()["error"]["code"] == "overloaded" and "cut short" in r.json()["error"]["message"]
    assert engine.aborted == [engine.requests[0].request_id]
    assert after.status_code == 503  # nothing new is admitted once the grace period is over
    assert len(engine.requests) == 1


# ---- a real process ----------------------------------------------------------------------------------------


@pytest.fixture
def data_dir(tmp_path: Path, template_db: tuple[Path, str]) -> Path:
    return prepare_data_dir(tmp_path / "data", template_db[0])


def stream_request(base: str, key: str, max_tokens: int) -> tuple[httpx.Client, Any]:
    body = {
        "model": "tiny-chat",
        "prompt": "a",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    http = httpx.Client(timeout=60)
    cm = http.stream("POST", f"{base}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})
    return http, cm


def data_frames(lines: Iterator[str]) -> Iterator[tuple[float, str]]:
    for line in lines:
        if line.startswith("data: "):
            yield time.monotonic(), line.removeprefix("data: ")


def connection_refused(base: str) -> bool:
    """Whether a new connection is refused; one the kernel accepted just before the listener closed is closed
    by the drain without a response, or reset with the listener if the server had not taken it yet (not served
    either way), so the caller asks again."""
    try:
        httpx.get(f"{base}/health", timeout=2)
    except httpx.ConnectError:
        return True
    except (httpx.RemoteProtocolError, httpx.ReadError):
        return False
    return False


def request_log(srv: ServeProcess, request_id: str) -> tuple[Any, ...]:
    rows = srv.db_rows(
        "SELECT status, completion_tokens, finish_reason, error_type FROM request_logs WHERE request_id = ?",
        request_id,
    )
    assert len(rows) == 1, rows
    return rows[0]


def month_tokens(srv: ServeProcess) -> int:
    return int(sum(r[0] for r in srv.db_rows("SELECT tokens FROM usage_monthly")))


@pytest.mark.slow
def test_sigterm_lets_an_inflight_stream_finish_and_exits_0(data_dir: Path, api_key: str) -> None:
    with (
        serving(data_dir, model="builtin:tiny-chat", dtype="float32") as srv,
        socket.create_connection(("127.0.0.1", srv.port), timeout=10) as idle,  # a keep-alive client, idle
    ):
        idle.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b""
        while b'{"status":"ok"}' not in reply:
            reply += idle.recv(65536)
        assert reply.startswith(b"HTTP/1.1 200")
        http, cm = stream_request(srv.base, api_key, 300)
        with http, cm as r:
            frames = data_frames(r.iter_lines())
            first = next(frames)
            srv.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            # New connections are refused while the stream drains; the idle keep-alive connection is closed.
            deadline = signalled + 5
            while not connection_refused(srv.base):
                assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
                time.sleep(0.05)
            assert read_until_closed(idle, 5) == b""
            assert time.monotonic() - signalled < 3  # closed by the drain, not by the 5 s keep-alive timeout
            rest = [first, *frames]
            request_id = r.headers["x-request-id"]
        drained_at = rest[-1][0]
        rc = srv.proc.wait(timeout=30)
        exited = time.monotonic()
    assert rest[-1][1] == "[DONE]"
    usage = json.loads(rest[-2][1])["usage"]
    assert usage["completion_tokens"] == 300
    finishes = [json.loads(f)["choices"][0]["finish_reason"] for _, f in rest[:-2]]
    assert finishes.count("length") == 1
    assert drained_at - signalled > 0.2, "the stream had already finished: the test proves nothing"
    assert rc == 0, srv.log()
    log = srv.log()
    assert "Waiting for connections to close" in log and "Application shutdown complete" in log
    assert "Traceback" not in log
    status, completion, finish, error = request_log(srv, request_id)
    assert (status, completion, finish, error) == (200, 300, "length", None)
    assert month_tokens(srv) >= usage["total_tokens"]
    print(f"\nstream drained {drained_at - signalled:.2f}s after SIGTERM; exit 0 after {exited - signalled:.2f}s")


@pytest.mark.slow
def test_sigterm_cuts_a_stream_longer_than_the_grace(data_dir: Path, api_key: str) -> None:
    with serving(data_dir, model="builtin:tiny-chat", dtype="float32", shutdown_grace_s="1") as srv:
        http, cm = stream_request(srv.base, api_key, 1900)  # ~10 s on a 2-core CPU
        with http, cm as r:
            frames = data_frames(r.iter_lines())
            first = next(frames)
            srv.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            rest = [first, *frames]
            request_id = r.headers["x-request-id"]
        rc = srv.proc.wait(timeout=30)
        exited = time.monotonic()
    cut_at = rest[-1][0] - signalled
    error = json.loads(rest[-1][1])["error"]
    assert error["code"] == "overloaded" and error["type"] == "server_error" and "shutting down" in error["message"]
    assert all(f != "[DONE]" for _, f in rest)
    assert 0.9 < cut_at < 3, cut_at  # SHUTDOWN_GRACE_S=1
    assert rc == 0, srv.log()
    assert exited - signalled < 1 + 8, exited - signalled  # grace + the cancel margin, and interpreter exit
    assert "Traceback" not in srv.log()
    status, completion, finish, error_type = request_log(srv, request_id)
    streamed = len(rest) - 2  # the first chunk .. the last content chunk
    assert status == 200 and error_type == "overloaded" and finish is None
    assert 0 < completion < 1900 and completion >= streamed - 1
    assert month_tokens(srv) >= completion
    print(f"\ncut {cut_at:.2f}s after SIGTERM (grace 1 s), {completion} tokens; exit 0 after {exited - signalled:.2f}s")


@pytest.mark.slow
def test_a_stream_whose_client_stopped_reading_is_closed_after_the_grace(data_dir: Path, api_key: str) -> None:
    with serving(data_dir, model="builtin:echo", shutdown_grace_s="1", max_model_len="200000") as srv:
        request = {"model": "echo", "messages": MSGS, "max_tokens": 150_000, "ignore_eos": True, "stream": True}
        body = json.dumps(request)
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the server's writes block soon
            sock.connect(("127.0.0.1", srv.port))
            sock.sendall(
                f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {api_key}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode()
            )
            assert sock.recv(64).startswith(b"HTTP/1.1 200")
            time.sleep(0.5)  # ... and never reads again
            srv.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            rc = srv.proc.wait(timeout=30)
            exited = time.monotonic() - signalled
    assert rc == 0, srv.log()
    assert exited < 1 + 2 + 4, exited  # grace + ABORT_AFTER_S + interpreter exit
    log = srv.log()
    assert "closing 1 connection(s) whose client is not reading" in log and "Traceback" not in log
    rows = srv.db_rows("SELECT status, completion_tokens, error_type FROM request_logs")
    assert len(rows) == 1 and rows[0][0] == 200 and rows[0][1] > 0 and rows[0][2] == "overloaded", rows
    print(f"\nclient not reading: connection closed, exit 0 after {exited:.2f}s (grace 1 s)")


@pytest.mark.slow
def test_sigint_also_drains_and_exits_0(data_dir: Path) -> None:
    with serving(data_dir, model="builtin:echo") as srv:
        srv.proc.send_signal(signal.SIGINT)
        rc = srv.proc.wait(timeout=30)
    assert rc == 0, srv.log()
    assert "Application shutdown complete" in srv.log() and "KeyboardInterrupt" not in srv.log()


@pytest.mark.slow
@pytest.mark.parametrize("broken", ["missing", "bad-config"])
def test_a_model_that_does_not_load_ends_the_process(data_dir: Path, tmp_path: Path, broken: str) -> None:
    if broken == "missing":
        model, reason = "/nonexistent-model-folder", "no such folder '/nonexistent-model-folder'"
    else:
        folder = tmp_path / "broken-model"
        folder.mkdir()
        (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
        model, reason = str(folder), "config.json' is not a valid JSON file"
    srv = start(data_dir, "--model", model)
    started = time.monotonic()
    try:
        rc = srv.proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        stop(srv)
        raise AssertionError(f"still running 90 s after start:\n{srv.log()}") from None
    log = srv.log()
    assert rc == 1, log
    last = log.strip().splitlines()[-1]
    assert last.startswith(f"llm-server: error: model {model!r} failed to load: "), log
    assert reason in last
    assert "Traceback" not in log
    print(f"\n{broken}: exit {rc} after {time.monotonic() - started:.1f}s: {last}")
