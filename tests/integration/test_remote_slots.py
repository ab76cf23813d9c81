"""Remote models in process: the upstream's concurrency slots, and clients that leave while the gateway waits.

The same paths against real upstream processes are in ``test_remote.py``; the fake upstream is in
``tests/fakes``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest

from server.settings import Settings
from server.wiring.state import app_state
from tests.checks import assert_error, log_rows
from tests.fakes.replies import (
    slow_answer,
    slow_headers,
    very_slow_answer,
)
from tests.fakes.upstream import MSGS, MockUpstream, build
from tests.live import live_server

pytestmark = pytest.mark.usefixtures("quick_backoff")


# ---- the upstream's concurrency slots -----------------------------------------------------------------


def concurrent_posts(base: str, key: str, n: int) -> list[httpx.Response]:
    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=10) as http:
            body = {"model": "remote", "messages": MSGS}
            return list(await asyncio.gather(*(http.post("/v1/chat/completions", json=body) for _ in range(n))))

    return asyncio.run(go())


def test_a_second_request_waits_for_the_upstream_slot(settings: Settings, api_key: str) -> None:
    mock = MockUpstream(slow_answer)
    app, _ = build(settings, mock, max_concurrency=1, timeout_s=5.0)
    with live_server(app) as base:
        started = time.monotonic()
        rs = concurrent_posts(base, api_key, 2)
        elapsed = time.monotonic() - started
    assert [r.status_code for r in rs] == [200, 200], [r.text for r in rs]
    assert mock.calls == 2 and mock.max_in_flight == 1
    assert elapsed >= 0.8  # one after the other


def test_a_waiter_gives_up_with_503_after_timeout(settings: Settings, api_key: str) -> None:
    mock = MockUpstream(slow_answer)  # slower than timeout_s; this mock does not time out requests
    app, _ = build(settings, mock, max_concurrency=1, timeout_s=0.15)
    with live_server(app) as base:
        rs = concurrent_posts(base, api_key, 2)
    assert sorted(r.status_code for r in rs) == [200, 503], [r.text for r in rs]
    refused = next(r for r in rs if r.status_code == 503)
    error = assert_error(refused, 503, "server_error", "overloaded")
    assert "concurrency" in error["message"] and refused.headers["retry-after"].isdigit()
    assert mock.calls == 1 and mock.max_in_flight == 1


# ---- a client gone while the gateway waits for the upstream's headers ------------------------------------


def test_a_stream_whose_client_left_before_the_upstream_answered_releases_everything(
    settings: Settings, api_key: str
) -> None:
    mock = MockUpstream(slow_headers)
    app, up = build(settings, mock, max_concurrency=1)
    body = json.dumps({"model": "remote", "messages": MSGS, "stream": True}).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {api_key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with live_server(app) as base:
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(head + body)
            time.sleep(0.2)  # admitted and waiting upstream; then the client goes away
        deadline = time.monotonic() + 5
        while (up.running or app_state(app).lifecycle.in_flight) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert up.running == 0 and app_state(app).lifecycle.in_flight == 0  # the slot and the request were settled
        # the single slot is free again: the next request is served
        r = httpx.post(f"{base}/v1/chat/completions", headers={"Authorization": f"Bearer {api_key}"},
                       json={"model": "remote", "messages": MSGS}, timeout=10)  # fmt: skip
    assert r.status_code == 200 and mock.calls == 2
    abandoned = log_rows(settings)[0]  # the upstream request was cancelled: nothing generated, nothing billed
    assert (abandoned["status"], abandoned["error_type"], abandoned["completion_tokens"]) == (
        499,
        "client_closed_request",
        0,
    )


def test_a_non_stream_client_that_leaves_cancels_the_upstream_request(settings: Settings, api_key: str) -> None:
    mock = MockUpstream(very_slow_answer)
    app, up = build(settings, mock, timeout_s=10.0)
    with live_server(app) as base:
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/v1/chat/completions", headers={"Authorization": f"Bearer {api_key}"},
                       json={"model": "remote", "messages": MSGS}, timeout=0.3)  # fmt: skip
        while (mock.in_flight or up.running) and time.monotonic() - started < 3:
            time.sleep(0.02)
        assert mock.in_flight == 0 and up.running == 0  # cancelled long before the upstream's 5 s answer
        assert time.monotonic() - started < 3
        while not log_rows(settings) and time.monotonic() - started < 5:  # the writer flushes every 0.5 s
            time.sleep(0.05)
    (row,) = log_rows(settings)
    assert (row["status"], row["error_type"], row["completion_tokens"]) == (499, "client_closed_request", 0)
