"""Faults: the rate limiter's Redis killed or frozen, failing open or closed, and coming back.

The harnesses are in ``tests/fakes/faults.py``. Time bounds are generous (shared, slow machines); the measured
values are printed (``-s``) for the reliability notes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator

import httpx
import msgspec
import pytest
from litestar.testing import TestClient

from server.admission.ratelimit import RETRY_AFTER_FAILURE_S, STORAGE_TIMEOUT_S
from server.app import create_app
from server.engine.fake import FakeEngine
from server.settings import Settings
from tests.conftest import add_role_key, bearer
from tests.fakes.faults import CHAT, MARGIN_S, PrivateRedis, report

# ---- Redis down or frozen under the rate limiter -----------------------------------------------------------


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    redis = PrivateRedis()
    redis.start()
    try:
        yield redis
    finally:
        redis.thaw()
        redis.kill()


@pytest.mark.parametrize("fault", ["kill", "freeze"])
@pytest.mark.parametrize("fail_open", [True, False], ids=["fail-open", "fail-closed"])
def test_redis_goes_away_and_comes_back(
    settings: Settings, private_redis: PrivateRedis, fail_open: bool, fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    s = msgspec.structs.replace(
        settings,
        ratelimit_storage_uri=f"async+redis://127.0.0.1:{private_redis.port}/0",
        ratelimit_fail_open=fail_open,
        key_cache_ttl_s=600,
    )
    key = asyncio.run(add_role_key(s, "limited", rpm=10_000, tpm=10_000_000, max_concurrency=50))
    caplog.set_level(logging.WARNING, logger="server")
    with TestClient(create_app(s, engine=FakeEngine(["ok"]))) as http:

        def send() -> tuple[httpx.Response, float]:
            started = time.monotonic()
            r = http.post("/v1/chat/completions", json=CHAT, headers=bearer(key))
            return r, time.monotonic() - started

        r, _ = send()
        assert r.status_code == 200 and r.headers["x-ratelimit-limit-requests"] == "10000"
        private_redis.kill() if fault == "kill" else private_redis.freeze()
        results = [send() for _ in range(6)]
        latencies = [t for _, t in results]
        report(
            f"redis {fault}, fail-open={fail_open}: request latencies {[round(t, 3) for t in latencies]}",
            max(latencies),
        )
        for r, _ in results:
            if fail_open:
                assert r.status_code == 200, r.text
                assert "x-ratelimit-limit-requests" not in r.headers  # nothing to report without the storage
            else:
                assert r.status_code == 503, r.text
                assert r.json()["error"]["type"] == "server_error"
                assert r.json()["error"]["code"] == "service_unavailable"
                assert "Rate limiting is unavailable" in r.json()["error"]["message"]
        # A storage that stops answering costs one request STORAGE_TIMEOUT_S, not each call of every request.
        assert max(latencies) < STORAGE_TIMEOUT_S + MARGIN_S
        if fault == "freeze":
            assert sum(latencies) < 3 * STORAGE_TIMEOUT_S + MARGIN_S

        back_at = time.monotonic()
        private_redis.start() if fault == "kill" else private_redis.thaw()
        while True:
            r, _ = send()
            if r.status_code == 200 and "x-ratelimit-limit-requests" in r.headers:
                break
            assert time.monotonic() - back_at < RETRY_AFTER_FAILURE_S + STORAGE_TIMEOUT_S + MARGIN_S
            time.sleep(0.05)
        report(f"redis {fault}, fail-open={fail_open}: back -> limits enforced again", time.monotonic() - back_at)
    messages = [rec.getMessage() for rec in caplog.records]
    assert any("rate-limit storage unavailable" in m for m in messages)
    assert any("rate-limit storage answers again" in m for m in messages)
    if fail_open:
        assert any("without RPM/TPM/concurrency limits" in m for m in messages)
