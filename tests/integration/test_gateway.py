"""The gateway through the official openai SDK: auth, permissions, limits, quotas, headers, cache, accounting."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from litestar import Litestar
from litestar.testing import TestClient

from server.app import create_app
from server.engine.fake import FakeEngine
from server.settings import Settings
from tests.checks import log_rows
from tests.conftest import role_key, sdk
from tests.live import live_server

MSGS = [{"role": "user", "content": "hi"}]


@pytest.fixture
def app(make_app: Callable[..., Litestar]) -> Litestar:
    return make_app(script=["Hel", "lo", ",", " wor", "ld", "!"])


# ---- 401 ----------------------------------------------------------------------------------------------


def test_missing_and_malformed_keys_are_401(app: Litestar, api_key: str) -> None:
    with TestClient(app) as http:
        r = http.post("/v1/chat/completions", json={"model": "fake", "messages": MSGS})
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
        # Without a key, even malformed JSON is 401 (auth runs before the body is read).
        assert http.post("/v1/chat/completions", content=b"{oops").status_code == 401
        bogus = "sk-llm-" + "A" * 30  # right shape, wrong checksum: refused without a database round trip
        for key in ("nope", bogus, api_key[:-1] + ("x" if api_key[-1] != "x" else "y")):
            with pytest.raises(openai.AuthenticationError) as err:
                sdk(http, key).chat.completions.create(model="fake", messages=MSGS)  # type: ignore[arg-type]
            assert err.value.code == "invalid_api_key"
            assert key not in err.value.message or len(key) < 8
        assert http.get("/v1/models", headers={"X-API-Key": api_key}).status_code == 200


def test_unknown_wellformed_revoked_and_expired_keys(app: Litestar, settings: Settings, api_key: str) -> None:
    from server.auth.keys import generate_key

    other = generate_key()
    with TestClient(app) as http:
        with pytest.raises(openai.AuthenticationError) as err:
            sdk(http, other).models.list()
        msg = err.value.message
        assert other not in msg and other[:11] in msg and other[-4:] in msg
        admin = {"Authorization": f"Bearer {api_key}"}
        made = http.post("/admin/keys", json={"name": "tmp", "role": "default"}, headers=admin).json()
        assert sdk(http, made["key"]).models.list().data[0].id == "fake"
        r = http.post(f"/admin/keys/{made['id']}/revoke", headers=admin)
        assert r.status_code == 200 and r.json()["revoked_at"]
        with pytest.raises(openai.AuthenticationError, match="revoked"):
            sdk(http, made["key"]).models.list()


# ---- 403 / 400 from the role --------------------------------------------------------------------------


def test_model_allowlist_and_max_tokens_cap(app: Litestar, settings: Settings) -> None:
    narrow = role_key(settings, "narrow", allowed_models=["other-model"])
    capped = role_key(settings, "capped", max_tokens=3)
    with TestClient(app) as http:
        with pytest.raises(openai.PermissionDeniedError) as err:
            sdk(http, narrow).chat.completions.create(model="fake", messages=MSGS)  # type: ignore[arg-type]
        assert err.value.code == "model_not_allowed" and err.value.type == "permission_error"
        with pytest.raises(openai.BadRequestError) as bad:
            sdk(http, capped).chat.completions.create(model="fake", messages=MSGS, max_tokens=4)  # type: ignore[arg-type]
        assert bad.value.param == "max_tokens"
        out = sdk(http, capped).chat.completions.create(model="fake", messages=MSGS)  # type: ignore[arg-type]
        assert out.usage is not None and out.usage.completion_tokens == 3  # the cap applies when max_tokens is omitted
        assert out.choices[0].finish_reason == "length"


# ---- 429 ----------------------------------------------------------------------------------------------


def test_rpm_limit_headers_and_retry_after(app: Litestar, settings: Settings) -> None:
    key = role_key(settings, "rpm2", rpm=2, tpm=10_000)
    with TestClient(app) as http:
        client = sdk(http, key)
        first = client.chat.completions.with_raw_response.create(model="fake", messages=MSGS)  # type: ignore[arg-type]
        h = first.headers
        assert h["x-ratelimit-limit-requests"] == "2" and h["x-ratelimit-remaining-requests"] == "1"
        assert h["x-ratelimit-limit-tokens"] == "10000"
        assert h["x-ratelimit-reset-requests"].endswith("s")
        client.chat.completions.create(model="fake", messages=MSGS)  # type: ignore[arg-type]
        with pytest.raises(openai.RateLimitError) as err:
            client.chat.completions.create(model="fake", messages=MSGS)  # type: ignore[arg-type]
        e = err.value
        assert e.code == "rate_limit_exceeded" and e.type == "requests"
        assert 1 <= int(e.response.headers["retry-after"]) <= 60
        assert 0 < int(e.response.headers["retry-after-ms"]) <= 60_000
        assert e.response.headers["x-ratelimit-remaining-requests"] == "0"
        # Streams carry the headers too (sent with the response headers).
        key2 = role_key(settings, "rpm5", rpm=5)
        with http.stream(
            "POST",
            "/v1/chat/completions",
            json={"model": "fake", "messages": MSGS, "stream": True},
            headers={"Authorization": f"Bearer {key2}"},
        ) as r:
            assert r.headers["x-ratelimit-remaining-requests"] == "4"


def test_tpm_limit(app: Litestar, settings: Settings) -> None:
    key = role_key(settings, "tpm", tpm=150)
    with TestClient(app) as http:
        client = sdk(http, key)
        client.chat.completions.create(model="fake", messages=MSGS, max_tokens=50)  # type: ignore[arg-type]
        with pytest.raises(openai.RateLimitError) as err:
            client.chat.completions.create(model="fake", messages=MSGS, max_tokens=50)  # type: ignore[arg-type]
        assert err.value.type == "tokens" and err.value.code == "rate_limit_exceeded"
        with pytest.raises(openai.RateLimitError, match="above your limit"):
            client.chat.completions.create(model="fake", messages=MSGS, max_tokens=500)  # type: ignore[arg-type]


def test_concurrency_limit(make_app: Callable[..., Litestar], settings: Settings) -> None:
    key = role_key(settings, "one-at-a-time", max_concurrency=1)
    engine = FakeEngine(["x"] * 200, delay_s=0.01)
    with live_server(make_app(engine)) as base:
        auth = {"Authorization": f"Bearer {key}"}
        body = {"model": "fake", "messages": MSGS, "stream": True}
        with httpx.Client(base_url=base, headers=auth, timeout=10) as http:
            with http.stream("POST", "/v1/chat/completions", json=body) as first:
                lines = first.iter_lines()  # keep a reference: a collected iterator closes the response
                next(lines)
                second = http.post("/v1/chat/completions", json={**body, "stream": False})
                assert second.status_code == 429, second.text
                assert second.json()["error"]["type"] == "requests"
                assert second.headers["retry-after"]
            # The slot is released when the first stream ends (here: the client left).
            deadline = time.monotonic() + 5
            while True:
                r = http.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2})
                if r.status_code == 200 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert r.status_code == 200


def test_quota_is_429_insufficient_quota_and_the_sdk_does_not_retry(app: Litestar, settings: Settings) -> None:
    key = role_key(settings, "two-requests", monthly_requests=2)
    with TestClient(app) as http:
        client = sdk(http, key, retries=2)
        client.chat.completions.create(model="fake", messages=MSGS)  # type: ignore[arg-type]
        client.chat.completions.create(model="fake", messages=MSGS)  # type: ignore[arg-type]
        before = http.get("/metrics").text.count("\n")
        started = time.monotonic()
        with pytest.raises(openai.RateLimitError) as err:
            client.chat.completions.create(model="fake", messages=MSGS)  # type: ignore[arg-type]
        assert err.value.code == "insufficient_quota" and err.value.type == "insufficient_quota"
        assert err.value.response.headers["x-should-retry"] == "false"
        assert time.monotonic() - started < 0.5  # no backoff-and-retry happened
        metrics = http.get("/metrics").text
        assert 'llm_server_quota_exceeded_total{role="two-requests"} 1.0' in metrics
        assert before > 0


def _concurrent_quota(app: Litestar, key: str) -> list[int]:
    async def go() -> list[int]:
        from litestar.testing import AsyncTestClient

        async with AsyncTestClient(app) as http:
            headers = {"Authorization": f"Bearer {key}"}
            body = {"model": "fake", "messages": MSGS, "max_tokens": 5}
            rs = await asyncio.gather(
                *(http.post("/v1/chat/completions", json=body, headers=headers) for _ in range(50))
            )
            return [r.status_code for r in rs]

    return asyncio.run(go())


def test_fifty_concurrent_requests_against_a_quota_of_ten_sqlite(
    make_app: Callable[..., Litestar], settings: Settings
) -> None:
    key = role_key(settings, "ten", monthly_requests=10)
    statuses = _concurrent_quota(make_app(FakeEngine(["a", "b"], delay_s=0.001, max_queue_size=100)), key)
    assert statuses.count(200) == 10
    assert statuses.count(429) == 40


# ---- accounting -----------------------------------------------------------------------------------------


def usage_via_admin(http: Any, admin_key: str, key_id: str) -> dict[str, int]:
    r = http.get("/admin/usage", params={"key": key_id}, headers={"Authorization": f"Bearer {admin_key}"})
    assert r.status_code == 200, r.text
    rows = r.json()["data"]
    return {"tokens": rows[0]["tokens"], "requests": rows[0]["requests"]} if rows else {"tokens": 0, "requests": 0}


def key_id_of(http: Any, admin_key: str, name: str) -> str:
    keys = http.get("/admin/keys", headers={"Authorization": f"Bearer {admin_key}"}).json()["data"]
    return next(k["id"] for k in keys if k["name"] == name)


@pytest.mark.parametrize("quota", [None, 1_000_000], ids=["no-quota", "with-quota"])
def test_usage_reconciled_after_success_error_and_disconnect(
    make_app: Callable[..., Litestar], settings: Settings, api_key: str, quota: int | None
) -> None:
    key = role_key(settings, "metered", monthly_tokens=quota)
    engine = FakeEngine(lambda req: ["t"] * (3 if req.params.max_tokens == 7 else 400), delay_s=0.005)
    with live_server(make_app(engine)) as base, httpx.Client(base_url=base, timeout=10) as http:
        kid = key_id_of(http, api_key, "metered-key")
        auth = {"Authorization": f"Bearer {key}"}
        body = {"model": "fake", "prompt": "abcd", "max_tokens": 7}
        # success: 4 prompt + 3 tokens + EOS
        assert http.post("/v1/completions", json=body, headers=auth).json()["usage"]["total_tokens"] == 8
        assert usage_via_admin(http, api_key, kid) == {"tokens": 8, "requests": 1}
        # disconnect mid-stream: only what was generated is charged
        with http.stream(
            "POST", "/v1/completions", json={**body, "max_tokens": 500, "stream": True}, headers=auth
        ) as r:
            lines = r.iter_lines()
            for _ in range(10):
                next(lines)
        deadline = time.monotonic() + 5
        while len(engine.aborted) < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        got = usage_via_admin(http, api_key, kid)
        assert got["requests"] == 2
        streamed = got["tokens"] - 8 - 4
        assert 1 <= streamed < 400, got  # charged what was generated before the client left, not the 500 reserved
    errs = FakeEngine(["a", "b", "c", "d"], fail_after=2)
    with TestClient(make_app(errs)) as http:
        r = http.post("/v1/completions", json={"model": "fake", "prompt": "ab", "max_tokens": 10}, headers=auth)
        assert r.status_code == 500
        after = usage_via_admin(http, api_key, kid)
        assert after["tokens"] == got["tokens"] + 2 + 2  # prompt + the two tokens generated before the failure
        assert after["requests"] == 3


# ---- cache ----------------------------------------------------------------------------------------------


def test_cache_hits_are_scoped_per_key_and_still_counted(app: Litestar, settings: Settings, api_key: str) -> None:
    other = role_key(settings, "tenant-b", rpm=100)
    with TestClient(app) as http:
        a = {"Authorization": f"Bearer {api_key}"}
        b = {"Authorization": f"Bearer {other}"}
        body = {"model": "fake", "messages": MSGS, "temperature": 0}
        r1 = http.post("/v1/chat/completions", json=body, headers=a)
        assert "x-cache" not in r1.headers
        http.get("/admin/usage", headers=a)  # the writer stores cache entries in batches; this flushes them
        r2 = http.post("/v1/chat/completions", json=body, headers=a)
        assert r2.headers["x-cache"] == "HIT"
        assert r2.json()["choices"] == r1.json()["choices"]
        assert r2.json()["id"] != r1.json()["id"]
        r3 = http.post("/v1/chat/completions", json=body, headers=b)
        assert "x-cache" not in r3.headers  # another tenant never gets a's cached output
        assert r3.headers["x-ratelimit-remaining-requests"] == "99"
        # Not deterministic -> never cached.
        http.get("/admin/usage", headers=a)
        r4 = http.post("/v1/chat/completions", json={**body, "temperature": 0.7}, headers=a)
        assert "x-cache" not in r4.headers
        g = {"prompt": "ab", "seed": 5, "max_new_tokens": 4}
        assert http.post("/v1/generate", json=g, headers=a).json()["cached"] is False
        http.get("/admin/usage", headers=a)
        hit = http.post("/v1/generate", json=g, headers=a)
        assert hit.json()["cached"] is True and hit.headers["x-cache"] == "HIT"
        s = http.post("/v1/chat/completions", json={**body, "stream": True}, headers=a)
        assert s.headers["x-cache"] == "HIT"
        text = "".join(
            json.loads(f[6:])["choices"][0]["delta"].get("content", "")
            for f in s.text.split("\n\n")
            if f.startswith("data: {")
        )
        assert text == "Hello, world!"
        assert "llm_server_cache_hits_total" in http.get("/metrics").text


# ---- admin ----------------------------------------------------------------------------------------------


def test_admin_routes_need_the_admin_role(app: Litestar, settings: Settings, api_key: str) -> None:
    plain = role_key(settings, "plain")
    with TestClient(app) as http:
        r = http.get("/admin/keys", headers={"Authorization": f"Bearer {plain}"})
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
        assert http.get("/admin/keys").status_code == 401
        admin = {"Authorization": f"Bearer {api_key}"}
        role = http.post("/admin/roles", json={"name": "team", "rpm": 10, "models": ["fake"]}, headers=admin)
        assert role.status_code == 201 and role.json()["rpm"] == 10 and role.json()["tpm"] is None
        upd = http.patch("/admin/roles/team", json={"rpm": None, "tpm": 500}, headers=admin)
        assert upd.json()["rpm"] is None and upd.json()["tpm"] == 500 and upd.json()["models"] == ["fake"]
        assert http.patch("/admin/roles/nope", json={"rpm": 1}, headers=admin).status_code == 404
        assert http.post("/admin/roles", json={"name": "team"}, headers=admin).status_code == 400
        made = http.post("/admin/keys", json={"name": "svc", "role": "team"}, headers=admin).json()
        assert made["key"].startswith("sk-llm-") and made["role"] == "team"
        assert (
            http.post("/admin/keys", json={"name": "x", "role": "ghost"}, headers=admin).json()["error"]["param"]
            == "role"
        )
        listing = http.get("/admin/keys", headers=admin).text
        assert made["key"] not in listing and "digest" not in listing
        rotated = http.post(f"/admin/keys/{made['id']}/rotate", json={"grace_hours": 1}, headers=admin).json()
        assert rotated["key"] != made["key"]
        for k in (made["key"], rotated["key"]):  # both work during the grace period
            assert http.get("/v1/models", headers={"Authorization": f"Bearer {k}"}).status_code == 200
        assert http.post("/admin/keys/key_missing/revoke", headers=admin).status_code == 404
        assert http.get("/admin/usage", params={"month": "2026-13x"}, headers=admin).status_code == 400


def test_rotation_grace_ends(app: Litestar, api_key: str) -> None:
    with TestClient(app) as http:
        admin = {"Authorization": f"Bearer {api_key}"}
        made = http.post("/admin/keys", json={"name": "r", "role": "default"}, headers=admin).json()
        http.post(f"/admin/keys/{made['id']}/rotate", json={"grace_hours": 0}, headers=admin)
        r = http.get("/v1/models", headers={"Authorization": f"Bearer {made['key']}"})
        assert r.status_code == 401 and "rotated" in r.json()["error"]["message"]


def test_raw_keys_never_reach_the_database_logs_or_admin(
    app: Litestar, settings: Settings, api_key: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    with TestClient(app) as http:
        admin = {"Authorization": f"Bearer {api_key}"}
        made = http.post("/admin/keys", json={"name": "secret-check", "role": "default"}, headers=admin).json()
        secret = made["key"]
        h = {"Authorization": f"Bearer {secret}"}
        http.post("/v1/chat/completions", json={"model": "fake", "messages": MSGS}, headers=h)
        http.post("/v1/chat/completions", json={"model": "fake", "messages": MSGS, "stream": True}, headers=h)
        http.post("/v1/chat/completions", json={"model": "nope", "messages": MSGS}, headers=h)
        http.get("/v1/models", headers={"Authorization": f"Bearer {secret[:-2]}zz"})
        outputs = [
            http.get("/admin/keys", headers=admin).text,
            http.get("/admin/usage", headers=admin).text,
            http.get("/metrics").text,
        ]
    for path in Path(settings.data_dir).iterdir():
        if path.is_file():
            data = path.read_bytes()
            assert secret.encode() not in data, path
            assert api_key.encode() not in data, path
    assert all(secret not in o for o in outputs)
    assert secret not in caplog.text and api_key not in caplog.text


# ---- faults ---------------------------------------------------------------------------------------------


def test_database_unreachable_is_503_not_a_hang(tmp_path: Path, api_key: str) -> None:
    settings = Settings(
        data_dir=tmp_path,
        database_url="postgresql+asyncpg://postgres@127.0.0.1:1/none",
        key_pepper="x" * 32,
        auto_migrate=False,
        database_timeout_s=2.0,
    )
    app = create_app(settings, engine=FakeEngine())
    with TestClient(app) as http:
        started = time.monotonic()
        r = http.get("/readyz")
        assert r.status_code == 503 and "database" in r.json()["reason"]
        r = http.post(
            "/v1/chat/completions",
            json={"model": "fake", "messages": MSGS},
            headers={"Authorization": f"Bearer {api_key}"},
        )
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
        assert time.monotonic() - started < 10


@pytest.mark.parametrize("fail_open", [True, False])
def test_redis_unreachable_fail_open_or_closed(settings: Settings, fail_open: bool) -> None:
    s = Settings(
        data_dir=settings.data_dir,
        key_pepper=settings.key_pepper,
        ratelimit_storage_uri="async+redis://127.0.0.1:1/0",
        ratelimit_fail_open=fail_open,
    )
    key = role_key(s, "limited", rpm=100)
    with TestClient(create_app(s, engine=FakeEngine(["ok"]))) as http:
        r = http.post(
            "/v1/chat/completions", json={"model": "fake", "messages": MSGS}, headers={"Authorization": f"Bearer {key}"}
        )
    assert r.status_code == (200 if fail_open else 503)


# ---- request log ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("store_prompts", [False, True])
def test_request_log_rows_for_success_stream_errors(settings: Settings, api_key: str, store_prompts: bool) -> None:
    import msgspec

    s = msgspec.structs.replace(settings, store_prompts=store_prompts)
    app = create_app(s, engine=FakeEngine(["Hel", "lo"]))
    with TestClient(app) as http:
        h = {"Authorization": f"Bearer {api_key}", "x-request-id": "trace-1"}
        http.post("/v1/chat/completions", json={"model": "fake", "messages": MSGS, "max_tokens": 5}, headers=h)
        http.post("/v1/completions", json={"model": "fake", "prompt": "ab", "stream": True}, headers=h)
        http.post("/v1/chat/completions", json={"model": "nope", "messages": MSGS}, headers=h)
        http.post("/v1/chat/completions", json={"model": "fake", "messages": MSGS})  # no key
        http.get("/admin/usage", headers=h)  # flushes the writer
    rows = log_rows(s)
    assert [(r["route"], r["status"]) for r in rows] == [
        ("/v1/chat/completions", 200),
        ("/v1/completions", 200),
        ("/v1/chat/completions", 404),
        ("/v1/chat/completions", 401),
    ]
    ok, stream, missing, unauth = rows
    assert ok["request_id"] == "trace-1" and ok["key_id"].startswith("key_") and ok["model"] == "fake"
    assert (ok["completion_tokens"], ok["finish_reason"], ok["cached"], ok["error_type"]) == (3, "stop", 0, None)
    assert ok["prompt_tokens"] > 0 and ok["latency_ms"] > 0
    assert stream["completion_tokens"] == 3 and stream["ttft_ms"] is not None and stream["finish_reason"] == "stop"
    assert missing["error_type"] == "model_not_found"
    assert unauth["key_id"] is None and unauth["error_type"] == "invalid_api_key"
    if store_prompts:
        assert "hi" in ok["prompt_text"] and ok["output_text"] == "Hello"
    else:
        assert all(r["prompt_text"] is None and r["output_text"] is None for r in rows)
