"""Real PostgreSQL and Redis (CI sets LLM_SERVER_TEST_POSTGRES_URL / LLM_SERVER_TEST_REDIS_URL)."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

from litestar.testing import TestClient

from persistence import migrate
from server.app import create_app
from server.engine.fake import FakeEngine
from server.metrics import Metrics
from server.settings import Settings
from server.wiring.services import build_services
from server.wiring.state import app_state
from tests.conftest import TEST_PEPPER, add_role_key, bearer, create_test_key
from tests.integration.test_gateway import _concurrent_quota

MSGS = [{"role": "user", "content": "hi"}]


def test_two_instances_share_one_rpm_limit_through_redis(settings: Settings, redis_url: str) -> None:
    uri = redis_url.replace("redis://", "async+redis://", 1) if redis_url.startswith("redis://") else redis_url
    s = Settings(data_dir=settings.data_dir, key_pepper=settings.key_pepper, ratelimit_storage_uri=uri)
    key = asyncio.run(add_role_key(s, "shared", rpm=3))
    prefix = f"llmtest-{secrets.token_hex(6)}"  # this run's own Redis keys
    apps = [
        create_app(s, engine=FakeEngine(["ok"]), services=build_services(s, Metrics(), ratelimit_key_prefix=prefix))
        for _ in range(2)
    ]
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": "fake", "messages": MSGS}
    with TestClient(apps[0]) as a, TestClient(apps[1]) as b:
        statuses = [c.post("/v1/chat/completions", json=body, headers=headers).status_code for c in (a, b, a, b, a)]
        assert statuses == [200, 200, 200, 429, 429]
        r = b.post("/v1/chat/completions", json=body, headers=headers)
        assert r.json()["error"]["type"] == "requests"
        assert r.headers["x-ratelimit-remaining-requests"] == "0"
    asyncio.run(_cleanup_redis(redis_url, prefix))


async def _cleanup_redis(url: str, prefix: str) -> None:
    import coredis

    client: Any = coredis.Redis.from_url(url.removeprefix("async+"))
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(keys)
    finally:
        client.connection_pool.disconnect()


def test_fifty_concurrent_requests_against_a_quota_of_ten_postgres(postgres_url: str, tmp_path: Any) -> None:
    s = Settings(data_dir=tmp_path, database_url=postgres_url, key_pepper=TEST_PEPPER)
    asyncio.run(migrate.upgrade(postgres_url))
    key = asyncio.run(add_role_key(s, "ten", monthly_requests=10))
    app = create_app(s, engine=FakeEngine(["a", "b"], delay_s=0.001, max_queue_size=100))
    statuses = _concurrent_quota(app, key)
    assert statuses.count(200) == 10
    assert statuses.count(429) == 40


def test_gateway_on_postgres_end_to_end(postgres_url: str, tmp_path: Any) -> None:
    s = Settings(data_dir=tmp_path, database_url=postgres_url, key_pepper=TEST_PEPPER)
    asyncio.run(migrate.upgrade(postgres_url))
    key = asyncio.run(add_role_key(s, "pg", rpm=100, monthly_tokens=10_000))
    with TestClient(create_app(s, engine=FakeEngine(["x", "y"]))) as http:
        h = {"Authorization": f"Bearer {key}"}
        assert http.get("/readyz").status_code == 200
        r = http.post("/v1/chat/completions", json={"model": "fake", "messages": MSGS, "temperature": 0}, headers=h)
        assert r.status_code == 200
        assert http.get("/v1/models", headers=h).status_code == 200


def test_two_replicas_on_one_postgres_never_overshoot_a_quota(postgres_url: str, tmp_path: Any) -> None:
    """The worst case with replicas: each reserves in the database, so together they admit exactly the quota."""
    s = Settings(data_dir=tmp_path, database_url=postgres_url, key_pepper=TEST_PEPPER)
    asyncio.run(migrate.upgrade(postgres_url))
    key = asyncio.run(add_role_key(s, "ten", monthly_requests=10))
    apps = [create_app(s, engine=FakeEngine(["a"], delay_s=0.001, max_queue_size=100)) for _ in range(2)]

    async def go() -> list[int]:
        from litestar.testing import AsyncTestClient

        headers = {"Authorization": f"Bearer {key}"}
        body = {"model": "fake", "messages": MSGS, "max_tokens": 5}
        async with AsyncTestClient(apps[0]) as a, AsyncTestClient(apps[1]) as b:
            rs = await asyncio.gather(
                *(c.post("/v1/chat/completions", json=body, headers=headers) for c in [a, b] * 25)
            )
        return [r.status_code for r in rs]

    statuses = asyncio.run(go())
    assert statuses.count(200) == 10
    assert statuses.count(429) == 40


def test_a_reservation_on_a_dead_connection_is_retried_once(postgres_url: str, tmp_path: Any) -> None:
    """Reservations skip the pool's ping (a round trip per request): a pooled connection that has died fails the
    first attempt, which is retried on a new one, so the request succeeds and is counted exactly once."""
    s = Settings(data_dir=tmp_path, database_url=postgres_url, key_pepper=TEST_PEPPER)
    asyncio.run(migrate.upgrade(postgres_url))
    key = asyncio.run(add_role_key(s, "metered", monthly_requests=100, monthly_tokens=100_000))
    app = create_app(s, engine=FakeEngine(["a", "b"]))
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": "fake", "messages": MSGS, "max_tokens": 5}
    with TestClient(app) as http:
        assert http.post("/v1/chat/completions", json=body, headers=headers).status_code == 200
        db = app_state(app).services.db
        pool: Any = db._raw  # the reservations' asyncpg pool
        pids = [h._con.get_server_pid() for h in pool._holders if h._con is not None]
        assert pids  # the reservation's connection, back in its pool
        # Ended by the server, behind the pool's back (as after a restart or an idle timeout there).
        assert asyncio.run(_terminate(postgres_url, pids)) == len(pids)
        r = http.post("/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 200, r.text
        assert http.post("/v1/chat/completions", json=body, headers=headers).status_code == 200
        assert http.blocking_portal.call(app_state(app).services.writer.flush)
    usage = asyncio.run(_usage(s))
    assert (usage.requests, usage.tokens) == (3, 3 * r.json()["usage"]["total_tokens"])


def test_a_busy_key_reserves_ahead_and_its_usage_reads_exact(postgres_url: str, tmp_path: Any) -> None:
    """Quota leases on PostgreSQL: 40 requests in a row need a handful of reservation statements, not 40; an admin
    usage read gives this replica's lease back first, so it shows exactly what was used, as does the database once
    the server has stopped."""
    s = Settings(data_dir=tmp_path, database_url=postgres_url, key_pepper=TEST_PEPPER)
    asyncio.run(migrate.upgrade(postgres_url))
    key = asyncio.run(add_role_key(s, "busy", monthly_requests=1000, monthly_tokens=1_000_000))
    admin = asyncio.run(create_test_key(s))
    app = create_app(s, engine=FakeEngine(["a", "b"]))
    statements: list[Any] = []
    body = {"model": "fake", "messages": MSGS, "max_tokens": 50}
    with TestClient(app) as http:
        db = app_state(app).services.db
        real = db.fetch_value

        async def counted(sql: str, args: Any) -> Any:
            statements.append(args)
            return await real(sql, args)

        db.fetch_value = counted  # type: ignore[method-assign]
        used = 0
        for _ in range(40):
            r = http.post("/v1/chat/completions", json=body, headers=bearer(key))
            assert r.status_code == 200, r.text
            used += r.json()["usage"]["total_tokens"]
        assert 3 <= len(statements) <= 8  # 1, 2, 4, 8, 16 requests ahead
        rows = http.get("/admin/usage", headers=bearer(admin)).json()["data"]
        assert [(row["tokens"], row["requests"]) for row in rows] == [(used, 40)]
        r = http.post("/v1/chat/completions", json=body, headers=bearer(key))
        assert r.status_code == 200
        used += r.json()["usage"]["total_tokens"]
    usage = asyncio.run(_usage(s))  # stopped: whatever the lease held was given back
    assert (usage.tokens, usage.requests) == (used, 41)


def test_reservation_connections_go_back_to_their_pool_without_a_reset_query(postgres_url: str) -> None:
    """asyncpg's default reset (a second round trip per reservation) is not sent; an open transaction left on a
    connection is still rolled back before the connection is reused."""
    import asyncpg

    from server.records.database import Database

    async def go() -> tuple[list[Any], int, bool]:
        db = Database(postgres_url, timeout_s=5)
        resets: list[Any] = []
        real = asyncpg.Connection.get_reset_query

        def counted(self: Any) -> Any:
            resets.append(self)
            return real(self)

        asyncpg.Connection.get_reset_query = counted  # type: ignore[method-assign]
        try:
            values = [await db.fetch_value("SELECT $1::int", [n]) for n in range(3)]
            assert values == [0, 1, 2]
            await db.fetch_value("BEGIN", [])  # as if a statement had left a transaction open
            pooled = [h._con for h in db._raw._holders if h._con is not None]
            open_transactions = [c for c in pooled if c.is_in_transaction()]
        finally:
            asyncpg.Connection.get_reset_query = real  # type: ignore[method-assign]
            await db.close()
        return resets, len(pooled), bool(open_transactions)

    resets, pooled, left_open = asyncio.run(go())
    assert resets == []
    assert pooled >= 1
    assert not left_open  # the BEGIN was rolled back before its connection went back to the pool


def test_closing_does_not_wait_for_a_reservation_connection_that_never_comes_back(postgres_url: str) -> None:
    """A reservation stuck on a server that stopped answering keeps its connection: closing the database gives up
    on it after the timeout (the pool is terminated) instead of hanging the shutdown."""
    from server.records.database import Database

    async def go() -> float:
        db = Database(postgres_url, timeout_s=0.5)
        assert await db.fetch_value("SELECT 1", []) == 1
        await db._raw.acquire()  # never released, as by a statement the server never answers
        began = time.monotonic()
        await db.close()
        assert db._raw.is_closing()
        return time.monotonic() - began

    assert 0.4 < asyncio.run(go()) < 3  # the timeout, then the pool terminated


async def _terminate(url: str, pids: list[int]) -> int:
    import asyncpg

    conn = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"), timeout=10)
    try:
        rows = await conn.fetch("SELECT pg_terminate_backend(pid) AS ended FROM unnest($1::int[]) AS pid", pids)
    finally:
        await conn.close()
    return sum(1 for row in rows if row["ended"])


async def _usage(s: Settings) -> Any:
    from persistence import store
    from server.admission.gateway import current_month
    from server.records.database import Database

    db = Database(s.database)
    try:
        rows = await db.run(lambda session: store.get_usage(session, None, current_month()))
    finally:
        await db.close()
    assert len(rows) == 1
    return rows[0]
