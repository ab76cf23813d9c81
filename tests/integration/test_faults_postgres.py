"""Faults: PostgreSQL goes away (stopped, or frozen like a partition) and comes back.

Requests that need the database get a clear 503 within the timeout, the others are served; once it is back,
requests succeed without a restart and every row held by the writer reaches the database.

The harnesses are in ``tests/fakes/faults.py``. Time bounds are generous (shared, slow machines); the measured
values are printed (``-s``) for the reliability notes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import httpx
import pytest

from persistence import migrate
from server.app import create_app
from server.auth.keys import generate_key
from server.engine.fake import FakeEngine
from server.settings import Settings
from tests.conftest import TEST_PEPPER, add_role_key, bearer
from tests.fakes.faults import CHAT, MARGIN_S, PrivatePostgres, report
from tests.live import live_server


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres()
    try:
        pg.start()
        yield pg
    finally:
        pg.destroy()


async def pg_counts(url: str) -> dict[str, Any]:
    """Request-log rows by status and usage rows by key, read directly."""
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"), timeout=10)
    try:
        statuses = {
            r["status"]: r["n"]
            for r in await conn.fetch("SELECT status, count(*) AS n FROM request_logs GROUP BY status")
        }
        usage = {
            r["key_id"]: (r["tokens"], r["requests"])
            for r in await conn.fetch("SELECT key_id, tokens, requests FROM usage_monthly")
        }
    finally:
        await conn.close()
    return {"statuses": statuses, "usage": usage}


@dataclass
class Outcome:
    key: str
    started: float
    seconds: float
    status: int
    code: str | None
    tokens: int


async def traffic(http: httpx.AsyncClient, keys: dict[str, str], outcomes: list[Outcome], stop: anyio.Event) -> None:
    """Send chat requests with each key in turn until ``stop``; record every outcome."""
    while not stop.is_set():
        for name, key in keys.items():
            started = time.monotonic()
            r = await http.post("/v1/chat/completions", json=CHAT, headers=bearer(key))
            body = r.json()
            code = body["error"]["code"] if r.status_code >= 400 else None
            tokens = body["usage"]["total_tokens"] if r.status_code == 200 else 0
            outcomes.append(Outcome(name, started, time.monotonic() - started, r.status_code, code, tokens))
        await anyio.sleep(0.02)


async def pg_app_setup(pg: PrivatePostgres, tmp_path: Path, timeout_s: float) -> tuple[Settings, dict[str, str]]:
    settings = Settings(
        data_dir=tmp_path,
        database_url=pg.url,
        key_pepper=TEST_PEPPER,
        database_timeout_s=timeout_s,
        auto_migrate=False,
        key_cache_ttl_s=600,  # the "free" key stays cached: its requests need no database at all
        cache_enabled=False,
        auth_failures_per_minute=None,
    )
    await migrate.upgrade(pg.url)
    keys = {
        "free": await add_role_key(settings, "free"),  # no quota: served from memory, logged and billed later
        "metered": await add_role_key(settings, "metered", monthly_tokens=10**9),  # reserves in the database
    }
    return settings, keys


async def key_ids(url: str) -> dict[str, str]:
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"), timeout=10)
    try:
        return {r["name"].removesuffix("-key"): r["id"] for r in await conn.fetch("SELECT id, name FROM api_keys")}
    finally:
        await conn.close()


async def wait_for_flush(pg: PrivatePostgres, outcomes: list[Outcome], ids: dict[str, str], limit_s: float) -> float:
    """Wait until every response has its log row and every success its usage; return how long that took."""
    want_statuses: dict[int, int] = {}
    for o in outcomes:
        want_statuses[o.status] = want_statuses.get(o.status, 0) + 1
    want_usage = {
        ids[name]: (sum(o.tokens for o in outcomes if o.key == name and o.status == 200),
                    sum(1 for o in outcomes if o.key == name and o.status == 200))
        for name in ("free", "metered")
    }  # fmt: skip
    started = time.monotonic()
    got: dict[str, Any] = {}
    while time.monotonic() - started < limit_s:
        got = await pg_counts(pg.url)
        if got["statuses"] == want_statuses and all(got["usage"].get(k) == v for k, v in want_usage.items()):
            return time.monotonic() - started
        await anyio.sleep(0.1)
    raise AssertionError(f"rows not flushed within {limit_s}s: want {want_statuses} / {want_usage}, got {got}")


async def until(predicate: Any, limit_s: float, step_s: float = 0.05) -> float:
    started = time.monotonic()
    while not await predicate():
        assert time.monotonic() - started < limit_s, f"not recovered within {limit_s}s"
        await anyio.sleep(step_s)
    return time.monotonic() - started


# ---- PostgreSQL goes away and comes back ------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("fault", ["stop", "freeze"])
async def test_postgres_goes_away_and_comes_back(private_pg: PrivatePostgres, tmp_path: Path, fault: str) -> None:
    """``stop``: pg_ctl stop -m fast (connections refused); ``freeze``: SIGSTOP (nothing answers, a partition)."""
    timeout_s = 1.5
    settings, keys = await pg_app_setup(private_pg, tmp_path, timeout_s)
    ids = await key_ids(private_pg.url)
    app = create_app(settings, engine=FakeEngine(["a", "b"]))
    outcomes: list[Outcome] = []
    with live_server(app) as base:
        async with httpx.AsyncClient(base_url=base, timeout=30) as http, anyio.create_task_group() as tg:
            assert (await http.get("/readyz")).status_code == 200
            stop_traffic = anyio.Event()
            tg.start_soon(traffic, http, keys, outcomes, stop_traffic)
            await anyio.sleep(0.5)
            await anyio.to_thread.run_sync(private_pg.stop if fault == "stop" else private_pg.freeze)
            down_at = time.monotonic()
            # A key nobody has used yet needs a lookup: 503 too, within the timeout.
            started = time.monotonic()
            r = await http.post("/v1/chat/completions", json=CHAT, headers=bearer(generate_key()))
            fresh_s = time.monotonic() - started
            outcomes.append(Outcome("fresh", started, fresh_s, r.status_code, r.json()["error"]["code"], 0))
            assert r.status_code == 503, r.text
            assert r.json()["error"]["type"] == "server_error" and r.json()["error"]["code"] == "service_unavailable"
            assert "database" in r.json()["error"]["message"]
            assert fresh_s < timeout_s + MARGIN_S
            started = time.monotonic()
            r = await http.get("/readyz")
            assert r.status_code == 503 and "database" in r.json()["reason"]
            assert time.monotonic() - started < timeout_s + MARGIN_S
            await anyio.sleep(2 * timeout_s)  # a while down, traffic going on

            coming_up = time.monotonic()  # it may answer before pg_ctl start returns
            await anyio.to_thread.run_sync(private_pg.start if fault == "stop" else private_pg.thaw)
            up_at = time.monotonic()

            async def metered_served() -> bool:
                return any(o.key == "metered" and o.started >= up_at and o.status == 200 for o in outcomes)

            report(f"{fault}: database back -> first request needing it served", await until(metered_served, 10))
            assert (await http.get("/readyz")).status_code == 200
            await anyio.sleep(1.0)
            stop_traffic.set()

        down = [o for o in outcomes if o.started >= down_at and o.started + o.seconds <= coming_up]
        free_down = [o for o in down if o.key == "free"]
        metered_down = sorted((o for o in down if o.key == "metered"), key=lambda o: o.started)
        # While it was down: requests that need it got a clear 503 within the bound, the others were served. The
        # first metered ones may still be served from the quota this replica had reserved ahead (its lease).
        leased = next((i for i, o in enumerate(metered_down) if o.status != 200), len(metered_down))
        assert leased <= settings.quota_lease_requests
        odd = [o for o in metered_down[leased:] if (o.status, o.code) != (503, "service_unavailable")]
        assert metered_down[leased:] and not odd, odd
        assert free_down and all(o.status == 200 for o in free_down)
        report(f"{fault}: time to 503 (slowest of {len(metered_down)})", max(o.seconds for o in metered_down))
        worst = max(o.seconds for o in outcomes)
        report(f"{fault}: slowest request of all {len(outcomes)}", worst)
        assert worst < timeout_s + 1.5  # tight on purpose: closing a dead connection (asyncpg: 2 s) must not add
        # Back without a restart: every request that started once it was up again (pool re-checked) succeeded.
        after = [o for o in outcomes if o.started >= up_at + 0.2]
        assert len(after) >= 4 and all(o.status == 200 for o in after), [(o.key, o.status) for o in after]
        # Everything held by the writer meanwhile reaches the database: every log row and all usage.
        await wait_for_flush(private_pg, outcomes, ids, 15)
        report(f"{fault}: every row and all usage written, after the database was back", time.monotonic() - up_at)
        print(f"[faults] {fault}: {len(free_down)} requests served from memory while down, their rows held")
