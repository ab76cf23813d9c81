"""Remote models in process: the gateway's rules on a remote model.

Estimated usage when the upstream reports none, the model allowlist, RPM limits and headers, monthly quotas,
usage reconciled to the upstream's counts, the completion cache and the role's max_tokens cap.

The same paths against real upstream processes are in ``test_remote.py``; the fake upstream is in
``tests/fakes``.
"""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from server.settings import Settings
from tests.checks import assert_error, frames, log_rows, usage_of
from tests.conftest import role_key, sdk
from tests.fakes.replies import (
    CHAT_STREAM,
    answers,
    chat_json,
    sse,
)
from tests.fakes.upstream import MSGS, USAGE, MockUpstream, serving

pytestmark = pytest.mark.usefixtures("quick_backoff")


# ---- estimated usage ----------------------------------------------------------------------------------


def test_usage_is_estimated_when_the_upstream_reports_none(settings: Settings, api_key: str) -> None:
    def no_usage(request: httpx.Request, body: dict[str, Any]) -> httpx.Response:
        if body.get("stream"):
            return sse(*CHAT_STREAM[:-1])  # no usage chunk
        if body["messages"][0]["content"] == "reported":
            return httpx.Response(200, json=chat_json())
        return httpx.Response(200, json=chat_json(usage=False))

    mock = MockUpstream(no_usage)
    with serving(settings, mock, api_key) as (http, _):
        plain = http.post("/v1/chat/completions", json={"model": "remote", "messages": MSGS})
        streamed = http.post(
            "/v1/chat/completions",
            json={"model": "remote", "messages": MSGS, "stream": True, "stream_options": {"include_usage": True}},
        )
        reported = http.post(
            "/v1/chat/completions", json={"model": "remote", "messages": [{"role": "user", "content": "reported"}]}
        )
    assert plain.status_code == 200, plain.text
    assert plain.headers["x-usage-estimated"] == "true"
    usage = plain.json()["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    chunks, done = frames(streamed.text)
    assert done and chunks[-1]["choices"] == []
    s_usage = chunks[-1]["usage"]
    assert s_usage["completion_tokens"] >= 3  # three content pieces were counted
    assert s_usage["total_tokens"] == s_usage["prompt_tokens"] + s_usage["completion_tokens"]
    assert reported.json()["usage"] == USAGE and "x-usage-estimated" not in reported.headers
    rows = [r for r in log_rows(settings) if r["route"] == "/v1/chat/completions"]
    assert [(r["usage_estimated"], r["status"]) for r in rows] == [(1, 200), (1, 200), (0, 200)]
    assert (rows[0]["prompt_tokens"], rows[0]["completion_tokens"]) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    assert rows[1]["completion_tokens"] == s_usage["completion_tokens"] and rows[1]["ttft_ms"] is not None
    assert (rows[2]["prompt_tokens"], rows[2]["completion_tokens"]) == (11, 2)
    assert {r["model"] for r in rows} == {"remote"}


# ---- the gateway on a remote model --------------------------------------------------------------------


def test_model_allowlist_applies_to_remote_models(settings: Settings, api_key: str) -> None:
    local_only = role_key(settings, "local-only", allowed_models=["local"])
    mock = MockUpstream(answers)
    with serving(settings, mock, local_only) as (http, _):
        client = sdk(http, local_only)
        with pytest.raises(openai.PermissionDeniedError) as err:
            client.chat.completions.create(model="remote", messages=MSGS)  # type: ignore[arg-type]
        streamed = http.post("/v1/chat/completions", json={"model": "remote", "messages": MSGS, "stream": True})
        native = http.post("/v1/generate", json={"prompt": "ab"})  # the default model is the remote one
        local = client.chat.completions.create(model="local", messages=MSGS)  # type: ignore[arg-type]
    assert err.value.code == "model_not_allowed" and err.value.type == "permission_error"
    assert_error(streamed, 403, "permission_error", "model_not_allowed")
    assert_error(native, 403, "permission_error", "model_not_allowed")
    assert local.choices[0].message.content == "Local"
    assert mock.calls == 0


def test_rpm_limit_and_headers_on_a_remote_model(settings: Settings) -> None:
    key = role_key(settings, "rpm2", rpm=2, tpm=100_000)
    mock = MockUpstream(answers)
    with serving(settings, mock, key) as (http, _):
        first = http.post("/v1/chat/completions", json={"model": "remote", "messages": MSGS})
        second = http.post("/v1/chat/completions", json={"model": "remote", "messages": MSGS, "stream": True})
        third = http.post("/v1/chat/completions", json={"model": "remote", "messages": MSGS})
    assert first.status_code == second.status_code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "2" and first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-limit-tokens"] == "100000" and first.headers["x-ratelimit-reset-requests"]
    assert second.headers["x-ratelimit-remaining-requests"] == "0"  # sent with a stream's headers too
    error = assert_error(third, 429, "requests", "rate_limit_exceeded")
    assert "request" in error["message"].lower()
    assert third.headers["retry-after"].isdigit() and int(third.headers["retry-after-ms"]) > 0
    assert third.headers["x-ratelimit-remaining-requests"] == "0"
    assert mock.calls == 2  # the refused request never reached the upstream


def test_monthly_quota_on_a_remote_model(settings: Settings) -> None:
    key = role_key(settings, "one-request", monthly_requests=1)
    mock = MockUpstream(answers)
    with serving(settings, mock, key) as (http, _):
        ok = http.post("/v1/completions", json={"model": "remote", "prompt": "ab"})
        refused = http.post("/v1/completions", json={"model": "remote", "prompt": "ab", "stream": True})
    assert ok.status_code == 200, ok.text
    assert_error(refused, 429, "insufficient_quota", "insufficient_quota")
    assert refused.headers["x-should-retry"] == "false"
    assert mock.calls == 1


@pytest.mark.parametrize("quota", [None, 1_000_000], ids=["no-quota", "with-quota"])
def test_usage_is_reconciled_to_the_upstream_counts(settings: Settings, api_key: str, quota: int | None) -> None:
    key = role_key(settings, "metered", monthly_tokens=quota)
    mock = MockUpstream(answers)
    long_prompt = [{"role": "user", "content": "word " * 200}]  # estimated at far more than the upstream's 11
    with serving(settings, mock, key) as (http, _):
        r1 = http.post("/v1/chat/completions", json={"model": "remote", "messages": long_prompt})
        r2 = http.post(
            "/v1/chat/completions", json={"model": "remote", "messages": long_prompt, "stream": True, "max_tokens": 50}
        )
        r3 = http.post("/v1/generate", json={"model": "remote", "prompt": "word " * 200, "max_new_tokens": 20})
        assert r1.status_code == r2.status_code == r3.status_code == 200
        assert usage_of(http, api_key, "metered-key") == {"tokens": 3 * 13, "requests": 3}


def test_completion_cache_hit_on_a_remote_model(settings: Settings, api_key: str) -> None:
    mock = MockUpstream(answers)
    body = {"model": "remote", "messages": MSGS, "temperature": 0}
    with serving(settings, mock, api_key) as (http, _):
        first = http.post("/v1/chat/completions", json=body)
        http.get("/admin/usage")  # the writer stores cache entries in batches; this flushes them
        second = http.post("/v1/chat/completions", json=body)
        streamed = http.post("/v1/chat/completions", json=body | {"stream": True})
        other = http.post("/v1/chat/completions", json=body | {"temperature": 0.7})
        changed = http.post("/v1/chat/completions", json=body | {"max_tokens": 9})
    assert "x-cache" not in first.headers
    assert second.headers["x-cache"] == "HIT"
    assert second.json()["choices"] == first.json()["choices"]
    assert first.json()["usage"] == USAGE
    # A replay computed nothing: the same counts, every prompt token cached.
    assert second.json()["usage"] == USAGE | {"prompt_tokens_details": {"cached_tokens": USAGE["prompt_tokens"]}}
    assert second.json()["id"] != first.json()["id"] and second.json()["model"] == "remote"
    assert "x-usage-estimated" not in second.headers
    assert streamed.headers["x-cache"] == "HIT"
    chunks, done = frames(streamed.text)
    assert done and "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "Hello!"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]] == ["stop"]
    assert "x-cache" not in other.headers and "x-cache" not in changed.headers
    assert mock.calls == 3  # first, the non-deterministic one and the one with another max_tokens


def test_role_max_tokens_cap_is_forwarded(settings: Settings) -> None:
    key = role_key(settings, "capped", max_tokens=7)
    mock = MockUpstream(answers)
    with serving(settings, mock, key) as (http, _):
        omitted = http.post("/v1/chat/completions", json={"model": "remote", "messages": MSGS})
        smaller = http.post("/v1/chat/completions", json={"model": "remote", "messages": MSGS, "max_tokens": 5})
        newer = http.post(
            "/v1/chat/completions", json={"model": "remote", "messages": MSGS, "max_completion_tokens": 6}
        )
        above = http.post("/v1/chat/completions", json={"model": "remote", "messages": MSGS, "max_tokens": 8})
    assert omitted.status_code == smaller.status_code == newer.status_code == 200
    assert assert_error(above, 400, "invalid_request_error", above.json()["error"]["code"])["param"] == "max_tokens"
    assert mock.calls == 3
    # one value under both names, whichever the client used (an upstream honours one or the other)
    assert [(p.body["max_tokens"], p.body["max_completion_tokens"]) for p in mock.posts] == [(7, 7), (5, 5), (6, 6)]
