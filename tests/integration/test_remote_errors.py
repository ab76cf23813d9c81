"""Remote models in process: upstream errors mapped to our envelope, retries, timeouts and broken streams.

The same paths against real upstream processes are in ``test_remote.py``; the fake upstream is in
``tests/fakes``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from server.settings import Settings
from tests.checks import assert_error, frames, log_rows
from tests.conftest import sdk
from tests.fakes.replies import (
    answers,
    breaking_body,
    chat_chunk,
    openai_error,
    refuse_connection,
    sequence,
    sse,
    status_only,
    too_slow,
)
from tests.fakes.upstream import MSGS, MockUpstream, Reply, serving

pytestmark = pytest.mark.usefixtures("quick_backoff")


# ---- errors -------------------------------------------------------------------------------------------


def test_upstream_400_passes_through_with_its_message_param_and_code(settings: Settings, api_key: str) -> None:
    mock = MockUpstream(
        openai_error(400, "temperature is weird here", "invalid_request_error", "temperature", "invalid_value")
    )
    with serving(settings, mock, api_key) as (http, _):
        with pytest.raises(openai.BadRequestError) as err:
            sdk(http, api_key).chat.completions.create(model="remote", messages=MSGS)  # type: ignore[arg-type]
        stream = http.post("/v1/chat/completions", json={"model": "remote", "messages": MSGS, "stream": True})
    e = err.value
    assert e.status_code == 400 and isinstance(e.body, dict) and e.body["message"] == "temperature is weird here"
    assert (e.param, e.code, e.type) == ("temperature", "invalid_value", "invalid_request_error")
    assert stream.headers["content-type"].startswith("application/json")  # refused before any stream byte
    assert assert_error(stream, 400, "invalid_request_error", "invalid_value")["param"] == "temperature"
    assert mock.calls == 2  # a client error is never retried


def test_upstream_429_passes_through_with_retry_after(settings: Settings, api_key: str) -> None:
    reply = openai_error(429, "Slow down", "requests", None, "rate_limit_exceeded", **{"retry-after": "7"})
    mock = MockUpstream(reply)
    with serving(settings, mock, api_key) as (http, _):
        r = http.post("/v1/chat/completions", json={"model": "remote", "messages": MSGS})
    error = assert_error(r, 429, "requests", "rate_limit_exceeded")
    assert error["message"] == "Slow down" and r.headers["retry-after"] == "7"
    assert mock.calls == 1


@pytest.mark.parametrize("status", [401, 403, 404])
def test_upstream_refusing_the_gateway_is_502_not_the_clients_fault(
    settings: Settings, api_key: str, status: int
) -> None:
    reply = openai_error(status, "Invalid API key or model", "invalid_request_error", None, "invalid_api_key")
    mock = MockUpstream(reply)
    with serving(settings, mock, api_key) as (http, _):
        r = http.post("/v1/chat/completions", json={"model": "remote", "messages": MSGS})
        s = http.post("/v1/chat/completions", json={"model": "remote", "messages": MSGS, "stream": True})
    for resp in (r, s):
        error = assert_error(resp, 502, "server_error", "upstream_error")
        assert "Invalid API key" not in error["message"] and error["param"] is None
        assert "operator" in error["message"]
    assert mock.calls == 2  # not retried


def test_upstream_500_is_502_and_not_retried(settings: Settings, api_key: str) -> None:
    mock = MockUpstream(status_only(500))
    with serving(settings, mock, api_key) as (http, _):
        r = http.post("/v1/chat/completions", json={"model": "remote", "messages": MSGS})
    assert_error(r, 502, "server_error", "upstream_error")
    assert mock.calls == 1


def test_upstream_503_twice_then_success_is_retried(settings: Settings, api_key: str) -> None:
    mock = MockUpstream(sequence(status_only(503), status_only(503), answers))
    with serving(settings, mock, api_key) as (http, _):
        r = http.post("/v1/chat/completions", json={"model": "remote", "messages": MSGS})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "Hello!"
    assert mock.calls == 3
    assert mock.posts[0].body == mock.posts[2].body  # the same request sent again


@pytest.mark.parametrize(
    ("reply", "status", "code"),
    [
        (status_only(502), 502, "upstream_error"),
        (status_only(504), 504, "upstream_timeout"),
        (status_only(503), 503, "overloaded"),
        (refuse_connection, 502, "upstream_error"),
    ],
    ids=["502", "504", "503", "connect-error"],
)
def test_retryable_failures_give_up_after_retries_plus_one(
    settings: Settings, api_key: str, reply: Reply, status: int, code: str
) -> None:
    mock = MockUpstream(reply)
    with serving(settings, mock, api_key) as (http, _):
        r = http.post("/v1/chat/completions", json={"model": "remote", "messages": MSGS})
        s = http.post("/v1/completions", json={"model": "remote", "prompt": "ab", "stream": True})
    assert_error(r, status, "server_error", code)
    assert_error(s, status, "server_error", code)  # a stream that fails before its first byte is a proper status
    assert mock.calls == 2 * 3  # retries = 2
    if status == 503:
        assert r.headers["retry-after"].isdigit()


def test_retries_follow_the_entry(settings: Settings, api_key: str) -> None:
    mock = MockUpstream(refuse_connection)
    with serving(settings, mock, api_key, retries=0) as (http, _):
        r = http.post("/v1/chat/completions", json={"model": "remote", "messages": MSGS})
    assert_error(r, 502, "server_error", "upstream_error")
    assert mock.calls == 1


def test_slow_upstream_is_504_upstream_timeout(settings: Settings, api_key: str) -> None:
    mock = MockUpstream(too_slow, honor_timeouts=True)
    with serving(settings, mock, api_key, timeout_s=0.2) as (http, up):
        started = time.monotonic()
        r = http.post("/v1/chat/completions", json={"model": "remote", "messages": MSGS})
        elapsed = time.monotonic() - started
        s = http.post("/v1/chat/completions", json={"model": "remote", "messages": MSGS, "stream": True})
        assert up.running == 0  # the slots were given back
    assert_error(r, 504, "server_error", "upstream_timeout")
    assert_error(s, 504, "server_error", "upstream_timeout")
    assert elapsed < 1.5
    assert mock.calls == 2  # a request the upstream may be working on is not sent again


@pytest.mark.parametrize(
    ("stream_reply", "code"),
    [
        (
            lambda: httpx.Response(
                200, content=breaking_body(chat_chunk({"content": "Hel"}), exc=httpx.ReadError("connection reset"))
            ),
            "upstream_error",
        ),
        (
            lambda: httpx.Response(
                200, content=breaking_body(chat_chunk({"content": "Hel"}), exc=httpx.ReadTimeout("read timed out"))
            ),
            "upstream_timeout",
        ),
        (lambda: sse(chat_chunk({"content": "Hel"}), chat_chunk({"content": "lo"})), "upstream_error"),  # no finish
        (lambda: sse(chat_chunk({"content": "Hel"}), done=False), "upstream_error"),  # closed, no [DONE], no finish
        (lambda: sse(chat_chunk({"content": "Hel"}), {"error": {"message": "CUDA out of memory"}}), "upstream_error"),
        (lambda: sse(chat_chunk({"content": "Hel"}), "{not json"), "upstream_error"),
        (lambda: sse(chat_chunk({"content": "Hel"}), chat_chunk({"tool_calls": [{"index": "x"}]})), "upstream_error"),
    ],
    ids=["read-error", "read-timeout", "no-finish", "cut-short", "error-frame", "malformed-chunk", "bad-tool-call"],
)
def test_stream_broken_midway_ends_with_an_error_frame(
    settings: Settings, api_key: str, stream_reply: Callable[[], httpx.Response], code: str
) -> None:
    def reply(request: httpx.Request, body: dict[str, Any]) -> httpx.Response:
        return stream_reply() if body.get("stream") else answers(request, body)

    mock = MockUpstream(reply)
    with serving(settings, mock, api_key, max_concurrency=1, timeout_s=1.0) as (http, up):
        r = http.post("/v1/chat/completions", json={"model": "remote", "messages": MSGS, "stream": True})
        assert up.running == 0
        after = http.post("/v1/chat/completions", json={"model": "remote", "messages": MSGS})  # the slot is free
    assert r.status_code == 200
    chunks, done = frames(r.text)
    assert not done and "[DONE]" not in r.text
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[1]["choices"][0]["delta"] == {"content": "Hel"}
    *_, last = chunks
    assert set(last) == {"error"}
    assert last["error"]["code"] == code and last["error"]["type"] == "server_error"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert after.status_code == 200, after.text
    assert mock.calls == 2  # a stream that broke after its first byte is not retried
    broken, ok = log_rows(settings)
    assert (broken["status"], broken["error_type"], ok["error_type"]) == (200, code, None)


@pytest.mark.parametrize(
    "content",
    [b"<html>bad gateway</html>", b'{"choices": []}', b'{"choices": [{"message": {"tool_calls": [1]}}]}'],
    ids=["not-json", "no-choices", "bad-tool-call"],
)
def test_malformed_upstream_json_is_502(settings: Settings, api_key: str, content: bytes) -> None:
    mock = MockUpstream(
        lambda request, _: httpx.Response(200, content=content, headers={"content-type": "application/json"})
    )
    with serving(settings, mock, api_key) as (http, _):
        r = http.post("/v1/chat/completions", json={"model": "remote", "messages": MSGS})
    error = assert_error(r, 502, "server_error", "upstream_error")
    assert "malformed" in error["message"]
    assert mock.calls == 1
