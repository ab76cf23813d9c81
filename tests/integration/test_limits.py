"""Limits on input: each one a clear 4xx in the OpenAI error shape, before any model work.

Body size, context window, max tokens (context and role cap), message count and stop strings are checked in
process; request-head size and a stalled body are properties of the HTTP server, so a real ``serve`` does them.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from litestar import Litestar
from litestar.testing import TestClient

from server.app import create_app
from server.engine.fake import FakeEngine
from server.settings import Settings
from tests.conftest import add_role_key
from tests.process import ServeProcess, prepare_data_dir, raw_exchange, read_until_closed, serving

MSGS = [{"role": "user", "content": "hi"}]


def assert_error(r: httpx.Response, status: int, code: str | None, param: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.headers.get("x-request-id")
    error: dict[str, Any] = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["code"] == code and error["param"] == param
    return error


def tight_client(settings: Settings, authed: Callable[[Any], Any], window: int) -> TestClient[Litestar]:
    tight = msgspec.structs.replace(settings, request_max_body_size=4096, max_messages=3)
    client: TestClient[Litestar] = authed(TestClient(create_app(tight, engine=FakeEngine(max_model_len=window))))
    return client


@pytest.fixture
def limited(settings: Settings, authed: Callable[[Any], Any]) -> Iterator[TestClient[Litestar]]:
    """Bodies up to 4096 bytes, at most 3 messages, a 64-token context."""
    with tight_client(settings, authed, 64) as client:
        yield client


@pytest.fixture
def roomy(settings: Settings, authed: Callable[[Any], Any]) -> Iterator[TestClient[Litestar]]:
    """As ``limited`` with a 4096-token context."""
    with tight_client(settings, authed, 4096) as client:
        yield client


def test_body_over_request_max_body_size_is_413(limited: TestClient[Litestar]) -> None:
    big = [{"role": "user", "content": "x" * 5000}]
    for stream in (False, True):
        r = limited.post("/v1/chat/completions", json={"model": "fake", "messages": big, "stream": stream})
        error = assert_error(r, 413, "request_too_large")
        assert "too large" in error["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_over_the_context_is_400_before_any_byte(limited: TestClient[Litestar], stream: bool) -> None:
    long = [{"role": "user", "content": "x" * 100}]
    r = limited.post("/v1/chat/completions", json={"model": "fake", "messages": long, "stream": stream})
    error = assert_error(r, 400, "context_length_exceeded", "messages")
    assert "maximum context length is 64 tokens" in error["message"]
    r = limited.post("/v1/completions", json={"model": "fake", "prompt": "x" * 80, "stream": stream})
    assert_error(r, 400, "context_length_exceeded", "max_tokens")  # the legacy route's default max_tokens is 16


def test_max_tokens_over_the_context_is_400(limited: TestClient[Litestar]) -> None:
    r = limited.post("/v1/chat/completions", json={"model": "fake", "messages": MSGS, "max_tokens": 60})
    assert_error(r, 400, "context_length_exceeded", "max_tokens")
    body = {"model": "fake", "messages": MSGS, "max_completion_tokens": 60, "stream": True}
    assert_error(
        limited.post("/v1/chat/completions", json=body), 400, "context_length_exceeded", "max_completion_tokens"
    )
    r = limited.post("/v1/completions", json={"model": "fake", "prompt": "abc", "max_tokens": 62})
    assert_error(r, 400, "context_length_exceeded", "max_tokens")


def test_max_tokens_over_the_role_cap_is_400(settings: Settings) -> None:
    capped = asyncio.run(add_role_key(settings, "capped", max_tokens=5))
    with TestClient(create_app(settings, engine=FakeEngine())) as client:
        client.headers["Authorization"] = f"Bearer {capped}"
        r = client.post("/v1/chat/completions", json={"model": "fake", "messages": MSGS, "max_tokens": 6})
        error = assert_error(r, 400, "invalid_value", "max_tokens")
        assert "5" in error["message"]
        ok = client.post("/v1/chat/completions", json={"model": "fake", "messages": MSGS, "max_tokens": 5})
        assert ok.status_code == 200


def test_messages_over_max_messages_is_400(roomy: TestClient[Litestar]) -> None:
    four = [{"role": "user", "content": "a"}] * 4
    for stream in (False, True):
        r = roomy.post("/v1/chat/completions", json={"model": "fake", "messages": four, "stream": stream})
        error = assert_error(r, 400, "array_above_max_length", "messages")
        assert "maximum length 3" in error["message"] and "length 4" in error["message"]
    ok = roomy.post("/v1/chat/completions", json={"model": "fake", "messages": four[:3], "max_tokens": 2})
    assert ok.status_code == 200


@pytest.mark.parametrize(
    ("stop", "words"),
    [(["a", "b", "c", "d", "e"], "at most 4"), ([""], "empty"), (["a", ""], "empty"), ("", "empty")],
)
def test_bad_stop_strings_are_400(roomy: TestClient[Litestar], stop: Any, words: str) -> None:
    for route, body in (("/v1/chat/completions", {"messages": MSGS}), ("/v1/completions", {"prompt": "a"})):
        r = roomy.post(route, json={"model": "fake", "stop": stop, **body})
        assert words in assert_error(r, 400, "invalid_value", "stop")["message"]
    r = roomy.post("/v1/chat/completions", json={"model": "fake", "messages": MSGS, "stop": ["a", "b", "c", "d"]})
    assert r.status_code == 200


# ---- the HTTP server: a real `serve` process ---------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, template_db: tuple[Path, str]) -> Iterator[ServeProcess]:
    data = prepare_data_dir(tmp_path_factory.mktemp("limits"), template_db[0])
    with serving(
        data, model="builtin:echo", max_header_bytes="2048", request_read_timeout_s="1", log_level="WARNING"
    ) as srv:
        yield srv


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


@pytest.mark.slow
def test_headers_over_max_header_bytes_are_431_before_routing(server: ServeProcess) -> None:
    # httpx: one complete head over the limit (h11 itself only bounds an incomplete one).
    for path in ("/health", "/v1/models", "/no-such-route"):
        r = httpx.get(f"{server.base}{path}", headers={"x-big": "a" * 3000}, timeout=10)
        error = assert_error(r, 431, "request_header_fields_too_large")
        assert "2048 bytes" in error["message"]
        assert r.headers["connection"] == "close"
    # A raw socket: a head that never ends, larger than the limit.
    raw = raw_exchange(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 5000)
    status, headers, body = parse(raw)
    assert status == 431 and headers["x-request-id"].startswith("req_")
    assert json.loads(body)["error"]["code"] == "request_header_fields_too_large"
    # Just under the limit is served.
    assert httpx.get(f"{server.base}/health", headers={"x-big": "a" * 1800}, timeout=10).status_code == 200


@pytest.mark.slow
def test_malformed_request_line_is_400_in_the_error_shape(server: ServeProcess) -> None:
    status, headers, body = parse(raw_exchange(server.port, b"NOT HTTP AT ALL\r\n\r\n"))
    assert status == 400 and headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["code"] == "invalid_http_request"


@pytest.mark.slow
@pytest.mark.parametrize("sent", [b"", b"GET /health HTTP/1.1\r\nHost: x\r\n"], ids=["nothing", "half a head"])
def test_stalled_head_is_408_and_the_connection_closes(server: ServeProcess, sent: bytes) -> None:
    started = time.monotonic()
    status, headers, body = parse(raw_exchange(server.port, sent))
    assert 0.9 <= time.monotonic() - started < 5  # REQUEST_READ_TIMEOUT_S=1
    assert status == 408 and headers["connection"] == "close" and headers["x-request-id"]
    assert json.loads(body)["error"]["code"] == "request_timeout"


@pytest.mark.slow
def test_stalled_body_is_408_and_the_connection_closes(server: ServeProcess, api_key: str) -> None:
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {api_key}\r\nContent-Length: 200\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head.encode() + b'{"model": "echo", "messages": [')
        started = time.monotonic()
        raw = read_until_closed(sock, timeout_s=10)
        waited = time.monotonic() - started
    status, headers, body = parse(raw)
    assert status == 408, raw
    assert 0.9 <= waited < 5, waited  # REQUEST_READ_TIMEOUT_S=1, and the server closed the connection
    assert headers["connection"] == "close" and headers["x-request-id"]
    error = json.loads(body)["error"]
    assert error["code"] == "request_timeout" and error["type"] == "invalid_request_error"
    # A body that keeps coming, however slowly, is read; the server is still healthy.
    body_bytes = json.dumps({"model": "echo", "messages": MSGS, "max_tokens": 3}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head.replace("Content-Length: 200", f"Content-Length: {len(body_bytes)}").encode())
        for i in range(0, len(body_bytes), 20):
            time.sleep(0.3)
            sock.sendall(body_bytes[i : i + 20])
        sock.settimeout(10)
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 200"), reply
