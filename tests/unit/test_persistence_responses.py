"""Stored /v1/responses objects on SQLite and (with LLM_SERVER_TEST_POSTGRES_URL) PostgreSQL: the store functions,
key scoping, chunked retention, the migration, the server's ResponseStore and the writer's retention pass."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from advanced_alchemy.config import SQLAlchemyAsyncConfig
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.pool import NullPool

from persistence import migrate, store
from persistence.config import create_engine
from server.auth.static import static_key_id
from server.records.database import Database
from server.records.responses import ResponseStore
from server.records.writer import BatchWriter
from tests.db import migrated_config

pytestmark = pytest.mark.anyio

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
KEY = "key_0123456789abcdef"
OTHER = "key_fedcba9876543210"
STATIC = static_key_id("a-static-key-of-some-length")


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[SQLAlchemyAsyncConfig]:
    async with migrated_config(db_url) as config:
        yield config


async def _insert(session: AsyncSession, id: str, *, key_id: str = KEY, at: datetime | None = None) -> None:
    await store.insert_response(
        session,
        id=id,
        key_id=key_id,
        model="tiny",
        status="in_progress",
        background=True,
        previous_response_id="resp_before",
        response=b'{"id":"%s","status":"in_progress"}' % id.encode(),
        input_items=b'[{"type":"message"}]',
        created_at=at,
    )


async def test_insert_and_get_are_scoped_by_key(db: SQLAlchemyAsyncConfig) -> None:
    async with db.get_session() as session:
        await _insert(session, "resp_1", at=T0)
        await store.insert_response(
            session,
            id="resp_2",
            key_id=STATIC,
            model="m" * 256,
            status="completed",
            background=False,
            previous_response_id=None,
            response=b"\x00\xff binary is kept as it is",
            input_items=b"[]",
        )
        await session.commit()

    async with db.get_session() as session:
        record = await store.get_response(session, "resp_1", KEY)
        assert record is not None
        assert (record.id, record.key_id, record.model, record.status) == ("resp_1", KEY, "tiny", "in_progress")
        assert record.background and record.previous_response_id == "resp_before" and not record.cancel_requested
        assert record.response == b'{"id":"resp_1","status":"in_progress"}'
        assert record.input_items == b'[{"type":"message"}]'
        assert record.created_at == T0 and record.updated_at == T0

        static = await store.get_response(session, "resp_2", STATIC)
        assert static is not None and static.key_id == STATIC and len(STATIC) <= 32
        assert static.response == b"\x00\xff binary is kept as it is"
        assert not static.background and static.previous_response_id is None
        assert static.created_at.tzinfo is not None and static.created_at == static.updated_at
        assert abs(static.created_at - datetime.now(UTC)) < timedelta(minutes=1)

        assert await store.get_response(session, "resp_1", OTHER) is None
        assert await store.get_response(session, "resp_2", KEY) is None
        assert await store.get_response(session, "resp_missing", KEY) is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.status = "completed"  # type: ignore[misc]


async def test_a_duplicate_id_is_a_value_error(db: SQLAlchemyAsyncConfig) -> None:
    async with db.get_session() as session:
        await _insert(session, "resp_1")
        await session.commit()
        with pytest.raises(ValueError, match="resp_1"):
            await _insert(session, "resp_1", key_id=OTHER)
        await session.rollback()
        record = await store.get_response(session, "resp_1", KEY)
        assert record is not None and await store.get_response(session, "resp_1", OTHER) is None


async def test_update_replaces_status_and_response_until_the_row_is_deleted(db: SQLAlchemyAsyncConfig) -> None:
    async with db.get_session() as session:
        await _insert(session, "resp_1", at=T0)
        await session.commit()
        assert await store.update_response(session, "resp_1", status="completed", response=b'{"done":true}')
        await session.commit()
        record = await store.get_response(session, "resp_1", KEY)
        assert record is not None
        assert (record.status, record.response) == ("completed", b'{"done":true}')
        assert record.created_at == T0 and record.updated_at > T0
        assert record.input_items == b'[{"type":"message"}]'

        assert not await store.delete_response(session, "resp_1", OTHER)
        assert await store.get_response(session, "resp_1", KEY) is not None
        assert await store.delete_response(session, "resp_1", KEY)
        await session.commit()
        assert not await store.delete_response(session, "resp_1", KEY)
        assert not await store.update_response(session, "resp_1", status="failed", response=b"{}")
        assert await store.get_response(session, "resp_1", KEY) is None


async def test_cancel_is_requested_only_by_the_owning_key(db: SQLAlchemyAsyncConfig) -> None:
    async with db.get_session() as session:
        await _insert(session, "resp_1")
        await session.commit()
        assert await store.is_cancel_requested(session, "resp_1") is False
        assert await store.is_cancel_requested(session, "resp_missing") is None

        assert await store.request_cancel(session, "resp_1", OTHER) is None
        assert await store.request_cancel(session, "resp_missing", KEY) is None
        await session.commit()
        assert not await store.is_cancel_requested(session, "resp_1")

        before = await store.get_response(session, "resp_1", KEY)  # loaded in this session: the update must win
        assert before is not None and not before.cancel_requested
        after = await store.request_cancel(session, "resp_1", KEY)
        await session.commit()
        assert after is not None and after.cancel_requested
        assert dataclasses.replace(after, cancel_requested=False, updated_at=before.updated_at) == before
        assert after.updated_at > before.updated_at
        assert await store.is_cancel_requested(session, "resp_1")
        again = await store.request_cancel(session, "resp_1", KEY)
        assert again is not None and again.cancel_requested

        assert await store.update_response(session, "resp_1", status="cancelled", response=b"{}")
        await session.commit()
        assert await store.is_cancel_requested(session, "resp_1")  # the flag stays after the final update
        assert await store.delete_response(session, "resp_1", KEY)
        await session.commit()
        assert await store.is_cancel_requested(session, "resp_1") is None


async def test_retention_deletes_only_old_responses_in_chunks(db: SQLAlchemyAsyncConfig) -> None:
    async with db.get_session() as session:
        for i in range(7):
            await _insert(session, f"resp_old_{i}", at=T0 - timedelta(days=40, seconds=i))
        for i in range(3):
            await _insert(session, f"resp_new_{i}", key_id=OTHER, at=T0 - timedelta(days=1))
        await session.commit()
        assert await store.delete_responses_before(session, T0 - timedelta(days=30), chunk_size=2) == 7
        assert await store.delete_responses_before(session, T0 - timedelta(days=30)) == 0
        with pytest.raises(ValueError, match="chunk_size"):
            await store.delete_responses_before(session, T0, chunk_size=0)
        remaining = await session.execute(text("SELECT id FROM responses ORDER BY id"))
        assert [r[0] for r in remaining] == ["resp_new_0", "resp_new_1", "resp_new_2"]


def _schema(connection: Connection) -> tuple[dict[str, bool], list[tuple[str, list[str | None]]]]:
    inspector = inspect(connection)
    columns = {c["name"]: bool(c["nullable"]) for c in inspector.get_columns("responses")}
    indexes = [(i["name"] or "", list(i["column_names"])) for i in inspector.get_indexes("responses")]
    return columns, indexes


async def _responses_schema(url: str) -> tuple[set[str], dict[str, bool], list[tuple[str, list[str | None]]]]:
    engine = create_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            tables = set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
            if "responses" not in tables:
                return tables, {}, []
            return tables, *(await conn.run_sync(_schema))
    finally:
        await engine.dispose()


async def test_the_migration_creates_and_drops_the_table(db_url: str) -> None:
    await migrate.upgrade(db_url, "0003")
    tables, _, _ = await _responses_schema(db_url)
    assert "responses" not in tables and "applied_writes" in tables

    await migrate.upgrade(db_url)
    assert await migrate.current(db_url) == migrate.head()
    tables, columns, indexes = await _responses_schema(db_url)
    assert "responses" in tables
    assert columns == {
        "id": False,
        "key_id": False,
        "model": False,
        "status": False,
        "background": False,
        "previous_response_id": True,
        "response": False,
        "input_items": False,
        "cancel_requested": False,
        "created_at": False,
        "updated_at": False,
    }
    assert indexes == [("ix_responses_created_at", ["created_at"])]

    await migrate.downgrade(db_url, "0003")
    tables, _, _ = await _responses_schema(db_url)
    assert "responses" not in tables and "applied_writes" in tables
    assert await migrate.current(db_url) == "0003"


async def test_response_store_round_trip_through_a_database(db_url: str) -> None:
    await migrate.upgrade(db_url)
    db = Database(db_url)
    responses = ResponseStore(db)
    try:
        await responses.create(
            id="resp_1",
            key_id=KEY,
            model="tiny",
            status="queued",
            background=True,
            previous_response_id=None,
            response=b'{"status":"queued"}',
            input_items=b'[{"role":"user"}]',
        )
        with pytest.raises(ValueError, match="resp_1"):
            await responses.create(
                id="resp_1",
                key_id=KEY,
                model="tiny",
                status="queued",
                background=False,
                previous_response_id=None,
                response=b"{}",
                input_items=b"[]",
            )
        record = await responses.get("resp_1", KEY)
        assert record is not None and (record.status, record.response) == ("queued", b'{"status":"queued"}')
        assert record.background and record.input_items == b'[{"role":"user"}]'
        assert await responses.get("resp_1", OTHER) is None

        assert await responses.update("resp_1", status="in_progress", response=b'{"status":"in_progress"}')
        assert await responses.cancel_requested("resp_1") is False
        assert await responses.request_cancel("resp_1", OTHER) is None
        assert await responses.cancel_requested("resp_1") is False
        cancelled = await responses.request_cancel("resp_1", KEY)
        assert cancelled is not None and cancelled.cancel_requested and cancelled.status == "in_progress"
        assert await responses.cancel_requested("resp_1")

        assert not await responses.delete("resp_1", OTHER)
        assert await responses.delete("resp_1", KEY)
        assert not await responses.delete("resp_1", KEY)
        assert not await responses.update("resp_1", status="cancelled", response=b"{}")
        assert await responses.get("resp_1", KEY) is None
        assert await responses.cancel_requested("resp_1") is None
    finally:
        await db.close()


@pytest.mark.parametrize("days", [0, 30])
async def test_the_writer_retention_pass_deletes_old_responses_when_asked(db_url: str, days: int) -> None:
    await migrate.upgrade(db_url)
    db = Database(db_url)
    now = datetime.now(UTC)

    async def put(session: AsyncSession) -> None:
        for i in range(3):
            await _insert(session, f"resp_old_{i}", at=now - timedelta(days=31))
        await _insert(session, "resp_new", at=now - timedelta(days=29))

    async def ids(session: AsyncSession) -> list[str]:
        return [r[0] for r in await session.execute(text("SELECT id FROM responses ORDER BY id"))]

    writer = BatchWriter(db, retention_days=0, responses_retention_days=days)
    try:
        await db.run(put)
        await writer.retention()  # the first pass runs every step
        if days:
            assert await db.run(ids) == ["resp_new"]
        else:
            assert await db.run(ids) == ["resp_new", "resp_old_0", "resp_old_1", "resp_old_2"]
    finally:
        await db.close()
