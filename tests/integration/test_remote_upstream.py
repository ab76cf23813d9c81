"""Remote models in process: the upstream connection.

The upstream key stays between the gateway and the upstream, upstream health in ``/readyz`` and ``/v1/models``.
The same paths against real upstream processes are in ``test_remote.py``; the fake upstream is in
``tests/fakes``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httpx
import pytest
from litestar.testing import TestClient

from server.app import create_app
from server.providers.upstream import Upstream
from server.settings import Settings
from server.wiring.models import ServedModels
from tests.checks import assert_error
from tests.conftest import sdk
from tests.fakes.replies import (
    answers,
    chat_chunk,
    openai_error,
    sse,
)
from tests.fakes.upstream import MSGS, TARGET, UPSTREAM_KEY, MockUpstream, remote_entry, serving

pytestmark = pytest.mark.usefixtures("quick_backoff")


# ---- the upstream key stays between the gateway and the upstream --------------------------------------


def test_upstream_key_is_sent_upstream_and_nowhere_else(
    settings: Settings, api_key: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    def echoing(request: httpx.Request, body: dict[str, Any]) -> httpx.Response:
        # Upstreams that echo the credential they were given in an error (some proxies do).
        what = body.get("user")
        if what == "401":
            return openai_error(401, f"Incorrect API key provided: {UPSTREAM_KEY}", "auth", None, None)(request, body)
        if what == "400":
            return openai_error(400, f"bad request for key {UPSTREAM_KEY}", "invalid_request_error", None, None)(
                request, body
            )
        if what == "500":
            return httpx.Response(500, text=f"internal error, key={UPSTREAM_KEY}")
        if what == "frame":  # an error frame mid-stream that quotes the key
            return sse(chat_chunk({"content": "x"}), {"error": {"message": f"lost key {UPSTREAM_KEY}"}}, done=False)
        return answers(request, body)

    mock = MockUpstream(echoing)
    responses: list[httpx.Response] = []
    with serving(settings, mock, api_key) as (http, up):
        with http.portal() as portal:
            portal.call(up.check)
        for user in (None, "401", "400", "500"):
            body: dict[str, Any] = {"model": "remote", "messages": MSGS}
            if user:
                body["user"] = user
            responses.append(http.post("/v1/chat/completions", json=body))
            responses.append(http.post("/v1/chat/completions", json=body | {"stream": True}))
        frame = {"model": "remote", "messages": MSGS, "user": "frame", "stream": True}
        responses.append(http.post("/v1/chat/completions", json=frame))
        responses.append(http.post("/v1/generate", json={"prompt": "ab", "max_new_tokens": 3}))
        responses += [http.get("/readyz"), http.get("/metrics"), http.get("/v1/models"), http.get("/admin/usage")]
    assert [r.status_code for r in responses[:8]] == [200, 200, 502, 502, 400, 400, 502, 502]
    assert responses[4].json()["error"]["message"].startswith("bad request for key")  # passed through, key removed
    assert "lost key [redacted]" in responses[8].text and '"code":"upstream_error"' in responses[8].text
    assert mock.auth_headers and set(mock.auth_headers) == {f"Bearer {UPSTREAM_KEY}"}  # POSTs and health checks
    assert mock.calls == 10
    for r in responses:
        assert UPSTREAM_KEY not in r.text, (r.request.url, r.text)
        assert all(UPSTREAM_KEY not in v for v in r.headers.values())
    assert UPSTREAM_KEY not in caplog.text
    assert all(UPSTREAM_KEY not in str(rec.args) and UPSTREAM_KEY not in rec.getMessage() for rec in caplog.records)
    for path in settings.data_dir.iterdir():
        if path.is_file():
            assert UPSTREAM_KEY.encode() not in path.read_bytes(), path


def test_an_upstream_without_a_key_gets_no_authorization_header(settings: Settings, api_key: str) -> None:
    mock = MockUpstream(answers)
    up = Upstream(remote_entry(api_key_env=None), None, transport=httpx.MockTransport(mock.handle))
    served = ServedModels()
    served.add("remote", up)
    with TestClient(create_app(settings, models=served)) as http:
        r = http.post(
            "/v1/chat/completions",
            json={"model": "remote", "messages": MSGS},
            headers={"Authorization": f"Bearer {api_key}"},
        )
    assert r.status_code == 200, r.text
    assert mock.posts[0].headers.get("authorization") is None  # the client's own key is never forwarded
    assert api_key not in str(mock.posts[0].headers)


# ---- /readyz ------------------------------------------------------------------------------------------


def test_readyz_reports_upstream_health_and_stays_200(settings: Settings, api_key: str) -> None:
    mock = MockUpstream(answers, models=None)  # down from the start
    with serving(settings, mock, api_key) as (http, up):
        deadline = time.monotonic() + 5
        while up.health.status == "unknown" and time.monotonic() < deadline:  # the first background check
            time.sleep(0.01)
        statuses = []
        for models in (None, [TARGET, "other"], ["other"], None):
            mock.models = models
            with http.portal() as portal:
                health = portal.call(up.check)
            r = http.get("/readyz")
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["status"] == "ready" and body["models"] == ["remote", "local"]
            entry = body["upstreams"]["remote"]
            assert entry["status"] == health.status and entry["checked_at"]
            statuses.append((entry["status"], entry["error"]))
        # A dead upstream does not stop the gateway from answering for the other models.
        local = http.post("/v1/chat/completions", json={"model": "local", "messages": MSGS})
    assert local.status_code == 200
    (s1, e1), (s2, e2), (s3, e3), (s4, _) = statuses
    assert (s1, s2, s3, s4) == ("down", "ok", "degraded", "down")
    assert e1 == "ConnectError" and e2 is None and TARGET in e3


def test_upstream_check_without_the_app() -> None:
    mock = MockUpstream(answers)
    up = Upstream(remote_entry(), UPSTREAM_KEY, transport=httpx.MockTransport(mock.handle))

    async def go() -> list[str]:
        try:
            seen = [(await up.check()).status]
            mock.models = ["nope"]
            seen.append((await up.check()).status)
            mock.models = None
            seen.append((await up.check()).status)
            return seen
        finally:
            await up.aclose()

    assert asyncio.run(go()) == ["ok", "degraded", "down"]
    assert up.health.status == "down" and up.health.latency_ms is None


# ---- /v1/models --------------------------------------------------------------------------------------


def test_models_lists_local_and_remote(settings: Settings, api_key: str) -> None:
    mock = MockUpstream(answers)
    with serving(settings, mock, api_key) as (http, _):
        client = sdk(http, api_key)
        listed = client.models.list()
        remote = client.models.retrieve("remote")
        missing = http.get("/v1/models/nope")
        chat_missing = http.post("/v1/chat/completions", json={"model": TARGET, "messages": MSGS})
    assert [m.id for m in listed.data] == ["remote", "local"]
    assert remote.id == "remote" and remote.object == "model" and remote.created > 0
    assert_error(missing, 404, "invalid_request_error", "model_not_found")
    assert_error(chat_missing, 404, "invalid_request_error", "model_not_found")  # the upstream's name is not ours
    assert mock.calls == 0
