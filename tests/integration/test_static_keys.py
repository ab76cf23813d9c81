"""Static API keys (``--api-key`` / ``LLM_SERVER_API_KEYS``): admin rights with no database row, never stored or
logged, and accounting that neither crashes nor holds a usage row the database must reject.

Runs on SQLite, and on PostgreSQL too when ``LLM_SERVER_TEST_POSTGRES_URL`` is set (its foreign keys are the ones a
usage row of a static key would break).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from litestar import Litestar
from litestar.testing import TestClient
from sqlalchemy import text

from persistence import migrate, store
from server.app import create_app
from server.auth.keys import generate_key
from server.auth.static import ADMIN_ROLE, static_key_id
from server.engine.fake import FakeEngine
from server.records.database import Database
from server.settings import Settings, SettingsError
from server.wiring.state import app_state
from tests.checks import assert_error, frames
from tests.conftest import TEST_PEPPER, bearer, create_test_key, sdk

STATIC = "static-test-key-0123456789-abcdef"
OTHER = generate_key()  # a static key may look like a database key; it still needs no row
MONTH = datetime.now(UTC).strftime("%Y-%m")


def chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "fake", "messages": [{"role": "user", "content": content}], "max_tokens": 8, **extra}


async def _fetch(url: str, query: str) -> list[dict[str, Any]]:
    db = Database(url)
    try:
        result = await db.run(lambda s: s.execute(text(query)))
        return [dict(row._mapping) for row in result]
    finally:
        await db.close()


def fetch(settings: Settings, query: str) -> list[dict[str, Any]]:
    return asyncio.run(_fetch(settings.database, query))


@pytest.fixture
def setup(db_url: str, tmp_path: Path) -> tuple[Settings, str]:
    """Settings with two static keys over a migrated database holding one ordinary admin-role key (returned)."""
    asyncio.run(migrate.upgrade(db_url))
    settings = Settings(
        data_dir=tmp_path,
        database_url=db_url,
        key_pepper=TEST_PEPPER,
        auto_migrate=False,
        api_keys=f" {STATIC} ,{OTHER},",
    )
    return settings, asyncio.run(create_test_key(settings))


@pytest.fixture
def http(setup: tuple[Settings, str]) -> Iterator[TestClient[Litestar]]:
    with TestClient(create_app(setup[0], engine=FakeEngine(["Hel", "lo"]))) as client:
        yield client


def flush(http: TestClient[Litestar]) -> None:
    assert http.blocking_portal.call(app_state(http.app).services.writer.flush)


def test_a_static_key_chats_streams_and_administers_without_a_row(
    http: TestClient[Litestar], setup: tuple[Settings, str]
) -> None:
    reply = sdk(http, STATIC).chat.completions.create(**chat("hi"))
    assert reply.choices[0].message.content == "Hello"
    r = http.post("/v1/chat/completions", json=chat("hi", stream=True), headers=bearer(OTHER))
    assert r.status_code == 200
    assert frames(r.text)[1]
    completion = http.post("/v1/completions", json={"model": "fake", "prompt": "x"}, headers=bearer(STATIC))
    assert completion.status_code == 200
    assert [m["id"] for m in http.get("/v1/models", headers={"X-API-Key": STATIC}).json()["data"]] == ["fake"]
    # /admin: the static key lists and creates keys, though it is none of them
    listed = http.get("/admin/keys", headers=bearer(STATIC))
    assert listed.status_code == 200 and [k["name"] for k in listed.json()["data"]] == ["test"]
    made = http.post("/admin/keys", json={"name": "made", "role": "default"}, headers=bearer(OTHER))
    assert made.status_code == 201, made.text
    assert http.get("/v1/models", headers=bearer(made.json()["key"])).status_code == 200
    assert fetch(setup[0], "SELECT count(*) AS n FROM api_keys") == [{"n": 2}]  # nothing stored for static keys


@pytest.mark.parametrize("wrong", [STATIC[:-1], STATIC + "x", STATIC.upper(), generate_key(), "short"])
def test_a_wrong_key_is_401(http: TestClient[Litestar], wrong: str) -> None:
    for path in ("/v1/models", "/admin/keys"):
        r = http.get(path, headers=bearer(wrong))
        assert_error(r, 401, "invalid_request_error", "invalid_api_key")
        assert STATIC not in r.text


def test_the_key_never_reaches_logs_the_request_log_or_metrics(
    http: TestClient[Litestar], setup: tuple[Settings, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    assert http.post("/v1/chat/completions", json=chat("hi"), headers=bearer(STATIC)).status_code == 200
    assert http.post("/v1/chat/completions", json=chat("hi", stream=True), headers=bearer(STATIC)).status_code == 200
    assert http.get("/admin/usage", headers=bearer(STATIC)).status_code == 200
    assert http.get("/v1/models", headers=bearer(STATIC[:-1])).status_code == 401
    flush(http)
    rows = fetch(setup[0], "SELECT * FROM request_logs ORDER BY id")
    assert [r["key_id"] for r in rows] == [static_key_id(STATIC)] * 2 + [None]
    assert static_key_id(STATIC).startswith("static-") and len(static_key_id(STATIC)) == 19
    assert STATIC not in repr(rows)
    assert STATIC not in http.get("/metrics").text
    for rec in caplog.records:
        logged = rec.getMessage() + repr(rec.__dict__)
        assert STATIC not in logged and STATIC[:-1] not in logged, logged


def test_usage_and_the_cache_work_beside_a_static_key(
    http: TestClient[Litestar], setup: tuple[Settings, str], caplog: pytest.LogCaptureFixture
) -> None:
    """The writer runs; one flush holds a static key's requests and a database key's: nothing is rejected, the
    database key's usage is all there, a static key's is not recorded (it has no row to reference)."""
    caplog.set_level(logging.WARNING)
    _, db_key = setup
    spent = [0, 0]
    for key in (STATIC, db_key, OTHER, db_key):
        r = http.post("/v1/chat/completions", json=chat("hi", temperature=0.7), headers=bearer(key))
        assert r.status_code == 200, r.text
        if key == db_key:
            spent = [spent[0] + r.json()["usage"]["total_tokens"], spent[1] + 1]
    for _ in range(2):  # deterministic: the second is a hit from the static key's own cache scope
        r = http.post("/v1/chat/completions", json=chat("cache me", temperature=0), headers=bearer(STATIC))
        assert r.status_code == 200
    assert r.headers.get("x-cache") == "HIT"
    usage = http.get("/admin/usage", headers=bearer(STATIC))  # flushes the writer
    assert usage.status_code == 200
    assert [(u["tokens"], u["requests"]) for u in usage.json()["data"]] == [tuple(spent)]
    flush(http)
    assert app_state(http.app).services.writer.dropped == 0
    assert not [rec for rec in caplog.records if rec.levelno >= logging.WARNING], caplog.text
    assert not [u for u in asyncio.run(_usage(setup[0])) if u.key_id.startswith("static-")]


async def _usage(settings: Settings) -> list[Any]:
    db = Database(settings.database)
    try:
        return await db.run(lambda s: store.get_usage(s, None, MONTH))
    finally:
        await db.close()


def test_a_static_key_is_never_throttled_by_its_address(setup: tuple[Settings, str]) -> None:
    settings = msgspec.structs.replace(setup[0], auth_failures_per_minute=1)
    with TestClient(create_app(settings, engine=FakeEngine(["a"]))) as http:
        codes = [http.get("/v1/models", headers=bearer(generate_key())).status_code for _ in range(3)]
        assert codes[0] == 401 and codes[-1] == 429
        assert http.get("/v1/models", headers=bearer(STATIC)).status_code == 200


@pytest.mark.parametrize("keys", ["too-short", f"{STATIC},abc", "   short-key-1  "])
def test_a_short_key_stops_start_up_without_showing_it(tmp_path: Path, keys: str) -> None:
    with pytest.raises(SettingsError, match="at least 16") as exc:
        create_app(Settings(data_dir=tmp_path, key_pepper=TEST_PEPPER, api_keys=keys), engine=FakeEngine())
    for key in keys.split(","):
        assert key.strip() not in str(exc.value)


def test_a_static_key_has_the_rights_of_the_seeded_admin_role(setup: tuple[Settings, str]) -> None:
    async def seeded() -> Any:
        db = Database(setup[0].database)
        try:
            return await db.run(lambda s: store.get_role(s, "admin"))
        finally:
            await db.close()

    role = asyncio.run(seeded())
    assert role is not None
    assert dataclasses.replace(role, created_at=ADMIN_ROLE.created_at, updated_at=ADMIN_ROLE.updated_at) == ADMIN_ROLE
