"""The store functions on SQLite and (with LLM_SERVER_TEST_POSTGRES_URL) PostgreSQL; quotas under concurrency."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, cast

import asyncpg
import pytest
from advanced_alchemy.config import SQLAlchemyAsyncConfig
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from persistence import store, usage
from persistence.config import make_engine_config
from tests.db import migrated_config

pytestmark = pytest.mark.anyio

T0 = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
MONTH = "2026-11"


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[SQLAlchemyAsyncConfig]:
    async with migrated_config(db_url) as config:
        yield config


async def _add_key(config: SQLAlchemyAsyncConfig, key_id: str = "key_0123456789abcdef", role: str = "default") -> None:
    async with config.get_session() as session:
        await store.insert_key(
            session,
            id=key_id,
            name="test",
            prefix="sk-test",
            last4="abcd",
            digest=key_id.ljust(64, "0"),
            role_name=role,
            expires_at=None,
        )
        await session.commit()


async def _reserve_concurrently(config: SQLAlchemyAsyncConfig, n: int, tokens: int, **limits: int | None) -> list[bool]:
    async def one() -> bool:
        async with config.get_session() as session:
            return await store.reserve_usage(
                session,
                "key_0123456789abcdef",
                MONTH,
                tokens,
                max_tokens_per_month=limits.get("max_tokens_per_month"),
                max_requests_per_month=limits.get("max_requests_per_month"),
            )

    return await asyncio.gather(*(one() for _ in range(n)))


async def _usage(config: SQLAlchemyAsyncConfig) -> tuple[int, int]:
    async with config.get_session() as session:
        rows = await store.get_usage(session, "key_0123456789abcdef", MONTH)
    return (rows[0].tokens, rows[0].requests) if rows else (0, 0)


# --- quotas -------------------------------------------------------------------------------------------------------


async def test_request_quota_is_exact_under_concurrency(db: SQLAlchemyAsyncConfig) -> None:
    await _add_key(db)
    results = await _reserve_concurrently(db, 50, 7, max_tokens_per_month=None, max_requests_per_month=10)
    assert results.count(True) == 10
    assert await _usage(db) == (70, 10)


async def test_token_quota_is_exact_under_concurrency(db: SQLAlchemyAsyncConfig) -> None:
    await _add_key(db)
    results = await _reserve_concurrently(db, 50, 100, max_tokens_per_month=1000, max_requests_per_month=None)
    assert results.count(True) == 10
    assert await _usage(db) == (1000, 10)


async def test_unlimited_quota_admits_everything(db: SQLAlchemyAsyncConfig) -> None:
    await _add_key(db)
    results = await _reserve_concurrently(db, 30, 5, max_tokens_per_month=None, max_requests_per_month=None)
    assert all(results)
    assert await _usage(db) == (150, 30)


async def test_adjust_usage_reconciles_and_never_goes_negative(db: SQLAlchemyAsyncConfig) -> None:
    await _add_key(db)
    async with db.get_session() as session:
        assert await store.reserve_usage(
            session, "key_0123456789abcdef", MONTH, 100, max_tokens_per_month=150, max_requests_per_month=None
        )
        await store.adjust_usage(session, "key_0123456789abcdef", MONTH, -60)  # only 40 were used
        assert await store.reserve_usage(
            session, "key_0123456789abcdef", MONTH, 100, max_tokens_per_month=150, max_requests_per_month=None
        )
        assert not await store.reserve_usage(
            session, "key_0123456789abcdef", MONTH, 11, max_tokens_per_month=150, max_requests_per_month=None
        )
        assert (await store.get_usage(session, "key_0123456789abcdef", MONTH))[0].tokens == 140
        await store.adjust_usage(session, "key_0123456789abcdef", MONTH, -1000, delta_requests=-5)
        [row] = await store.get_usage(session, "key_0123456789abcdef", MONTH)
    assert (row.tokens, row.requests) == (0, 0)
    async with db.get_session() as session:
        await store.adjust_usage(session, "key_0123456789abcdef", "2026-12", 25)  # creates the month's row
        assert [(u.month, u.tokens) for u in await store.get_usage(session, None, "2026-12")] == [("2026-12", 25)]
        assert await store.get_usage(session, None, "1999-01") == []


async def test_add_usage_upserts_atomically(db: SQLAlchemyAsyncConfig) -> None:
    await _add_key(db)

    async def add() -> None:
        async with db.get_session() as session:
            await store.add_usage(session, "key_0123456789abcdef", MONTH, 3, 1)
            await session.commit()

    await asyncio.gather(*(add() for _ in range(20)))
    assert await _usage(db) == (60, 20)
    async with db.get_session() as session:
        await store.add_usage(session, "key_0123456789abcdef", MONTH, -100)
        await session.rollback()  # the caller owns the transaction
        assert await _usage(db) == (60, 20)
        await store.add_usage(session, "key_0123456789abcdef", MONTH, -100)
        await session.commit()
    assert await _usage(db) == (0, 20)


# --- roles and keys -----------------------------------------------------------------------------------------------


async def test_roles_create_update_and_errors(db: SQLAlchemyAsyncConfig) -> None:
    async with db.get_session() as session:
        role = await store.create_role(session, "team", rpm=10, monthly_tokens=5_000_000_000, allowed_models=["a", "b"])
        await session.commit()
        assert role.allowed_models == ("a", "b") and role.allows_model("a") and not role.allows_model("c")
        assert role.monthly_tokens == 5_000_000_000 and role.tpm is None and not role.is_admin
        with pytest.raises(ValueError, match="already exists"):
            await store.create_role(session, "team")
        with pytest.raises(ValueError, match="rpm"):
            await store.create_role(session, "bad", rpm=-1)
        with pytest.raises(ValueError, match="allowed_models"):
            await store.create_role(session, "bad", allowed_models="a")

        updated = await store.update_role(session, "team", tpm=99, rpm=None)
        await session.commit()
        assert (updated.rpm, updated.tpm, updated.allowed_models) == (None, 99, ("a", "b"))
        assert updated.monthly_tokens == 5_000_000_000  # not given: unchanged
        updated = await store.update_role(session, "team", allowed_models=None, is_admin=True)
        assert updated.allowed_models is None and updated.is_admin and updated.allows_model("anything")
        with pytest.raises(LookupError):
            await store.update_role(session, "nobody", rpm=1)
        await session.commit()

    async with db.get_session() as session:
        names = [r.name for r in await store.list_roles(session)]
        assert names == ["admin", "default", "team"]
        team = await store.get_role(session, "team")
        assert team is not None and team.tpm == 99 and team.updated_at >= team.created_at
        assert await store.get_role(session, "nobody") is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        team.rpm = 5  # type: ignore[misc]


async def test_keys_crud_rotation_and_revocation(db: SQLAlchemyAsyncConfig) -> None:
    async with db.get_session() as session:
        key = await store.insert_key(
            session,
            id="key_aaaaaaaaaaaaaaaa",
            name="ci",
            prefix="sk-aaaa",
            last4="wxyz",
            digest="d" * 64,
            role_name="default",
            expires_at=T0 + timedelta(days=30),
        )
        await store.insert_key(
            session,
            id="key_bbbbbbbbbbbbbbbb",
            name="ci-2",
            prefix="sk-bbbb",
            last4="1234",
            digest="e" * 64,
            role_name="admin",
            expires_at=None,
        )
        await session.commit()
        assert key.state(T0) == "active" and key.masked == "sk-aaaa...wxyz"
        assert key.state(T0 + timedelta(days=31)) == "expired"
        with pytest.raises(LookupError):
            await store.insert_key(
                session,
                id="key_c",
                name="x",
                prefix="p",
                last4="0000",
                digest="f" * 64,
                role_name="no",
                expires_at=None,
            )

    async with db.get_session() as session:
        found = await store.get_key_by_digest(session, "d" * 64)
        assert found is not None
        rec, role = found
        assert rec.id == "key_aaaaaaaaaaaaaaaa" and role.name == "default" and role.rpm == 60
        assert await store.get_key_by_digest(session, "0" * 64) is None
        listed = await store.list_keys(session)
        assert [k.id for k in listed] == ["key_aaaaaaaaaaaaaaaa", "key_bbbbbbbbbbbbbbbb"]
        assert all("digest" not in {f.name for f in dataclasses.fields(k)} for k in listed)
        assert "d" * 64 not in repr(listed)
        assert [k.id for k in await store.list_keys(session, role_name="admin")] == ["key_bbbbbbbbbbbbbbbb"]

        rotated = await store.mark_rotated(
            session, "key_aaaaaaaaaaaaaaaa", "key_bbbbbbbbbbbbbbbb", T0 + timedelta(hours=1)
        )
        assert rotated.replaced_by_id == "key_bbbbbbbbbbbbbbbb"
        assert rotated.state(T0) == "active" and rotated.state(T0 + timedelta(hours=2)) == "rotated"
        revoked = await store.revoke_key(session, "key_bbbbbbbbbbbbbbbb", T0)
        again = await store.revoke_key(session, "key_bbbbbbbbbbbbbbbb", T0 + timedelta(days=1))
        assert revoked.revoked_at == again.revoked_at == T0 and again.state(T0) == "revoked"
        with pytest.raises(LookupError):
            await store.revoke_key(session, "key_missing", T0)
        with pytest.raises(LookupError):
            await store.mark_rotated(session, "key_aaaaaaaaaaaaaaaa", "key_missing", T0)
        await session.commit()

    async with db.get_session() as session:
        stored = await store.get_key(session, "key_bbbbbbbbbbbbbbbb")
        assert stored is not None and stored.revoked_at == T0 and stored.revoked_at.tzinfo is not None
        assert await store.get_key(session, "key_missing") is None


async def test_digest_and_id_are_unique(db: SQLAlchemyAsyncConfig) -> None:
    await _add_key(db, "key_0123456789abcdef")
    async with db.get_session() as session:
        with pytest.raises(ValueError, match="already exists"):
            await store.insert_key(
                session,
                id="key_other",
                name="dup",
                prefix="p",
                last4="0000",
                digest="key_0123456789abcdef".ljust(64, "0"),
                role_name="default",
                expires_at=None,
            )
        await session.rollback()


# --- request logs and cache ---------------------------------------------------------------------------------------


def _log(i: int, at: datetime) -> dict[str, object]:
    return {"request_id": f"req-{i}", "route": "/v1/chat/completions", "method": "POST", "status": 200,
            "latency_ms": 12.5, "created_at": at, "key_id": "key_x", "prompt_tokens": i}  # fmt: skip


async def test_request_logs_bulk_insert_and_chunked_retention(db: SQLAlchemyAsyncConfig) -> None:
    async with db.get_session() as session:
        await store.insert_request_logs(session, [_log(i, T0 - timedelta(days=40)) for i in range(23)])
        await store.insert_request_logs(session, [_log(100 + i, T0 - timedelta(days=1)) for i in range(5)])
        await store.insert_request_logs(session, [{"request_id": "r", "route": "/x", "method": "GET", "status": 404,
                                                    "latency_ms": 1.0, "error_type": "not_found"}])  # fmt: skip
        await store.insert_request_logs(session, [])
        with pytest.raises(ValueError, match="unknown fields"):
            await store.insert_request_logs(session, [{**_log(0, T0), "bogus": 1}])
        await session.commit()
        deleted = await store.delete_request_logs_before(session, T0 - timedelta(days=30), chunk_size=4)
        assert deleted == 23
        assert await store.delete_request_logs_before(session, T0 - timedelta(days=30)) == 0
        remaining = (await session.execute(text("SELECT count(*) FROM request_logs"))).scalar_one()
        assert remaining == 6
        row = (await session.execute(text("SELECT cached, prompt_tokens FROM request_logs WHERE request_id='r'"))).one()
        assert (bool(row.cached), row.prompt_tokens) == (False, 0)


async def test_completion_cache_get_put_expiry_and_upsert(db: SQLAlchemyAsyncConfig) -> None:
    async with db.get_session() as session:
        assert await store.cache_get(session, "c" * 64, T0) is None
        await store.cache_put(session, "c" * 64, "key_x", "tiny", b'{"v":1}', T0 + timedelta(minutes=5))
        await store.cache_put(session, "o" * 64, "key_x", "tiny", b"old", T0 - timedelta(seconds=1))
        await session.commit()
        assert await store.cache_get(session, "c" * 64, T0) == b'{"v":1}'
        assert await store.cache_get(session, "c" * 64, T0 + timedelta(minutes=5)) is None  # expired
        assert await store.cache_get(session, "o" * 64, T0) is None
        await store.cache_put(session, "c" * 64, "key_x", "tiny", b'{"v":2}', T0 + timedelta(hours=1))
        await session.commit()
        assert await store.cache_get(session, "c" * 64, T0 + timedelta(minutes=30)) == b'{"v":2}'
        assert await store.cache_purge_expired(session, T0) == 1
        await session.commit()
        assert await store.cache_purge_expired(session, T0) == 0
        assert await store.cache_get(session, "c" * 64, T0) == b'{"v":2}'


async def test_request_log_rows_are_cleaned_to_fit_their_columns(db: SQLAlchemyAsyncConfig) -> None:
    """What PostgreSQL (and partly SQLite) would reject: NUL, lone surrogates, long strings, huge numbers, NaN."""
    row = {
        **_log(0, T0),
        "request_id": "r" * 500,
        "model": "m\x00" * 300,
        "route": "/v1/" + "x" * 300,
        "method": "PATCHING",
        "finish_reason": "stop" * 20,
        "error_type": "e" * 100,
        "prompt_text": "before\x00after \ud800 end",
        "output_text": "\x00" * 3,
        "status": 2**40,
        "prompt_tokens": -(2**40),
        "completion_tokens": 2**31,
        "latency_ms": float("nan"),
        "ttft_ms": float("inf"),
    }
    async with db.get_session() as session:
        await store.insert_request_logs(session, [row])
        await session.commit()
        got = (await session.execute(text("SELECT * FROM request_logs"))).mappings().one()
    assert (len(got["request_id"]), got["model"], len(got["route"]), got["method"]) == (128, "m" * 256, 128, "PATCHING")
    assert (len(got["finish_reason"]), len(got["error_type"])) == (32, 64)
    assert got["prompt_text"] == "beforeafter ? end" and got["output_text"] == ""
    assert (got["status"], got["prompt_tokens"], got["completion_tokens"]) == (2**31 - 1, -(2**31), 2**31 - 1)
    assert (got["latency_ms"], got["ttft_ms"]) == (0.0, None)
    assert store.clean_request_log_row({"bogus": "\x00"}) == {"bogus": "\x00"}  # only known columns are touched


async def test_request_log_rows_are_stored_as_sqlalchemy_stores_them(db: SQLAlchemyAsyncConfig) -> None:
    """The bulk insert (on SQLite the driver's executemany on a statement compiled once) stores every column as
    SQLAlchemy's own insert of the cleaned row does: times (in any zone) as UTC, booleans, floats, NULLs, text."""
    from sqlalchemy import Table, insert, select

    from persistence.models import RequestLog

    plus_two = timezone(timedelta(hours=2))
    rows = [
        {"request_id": "a", "route": "/v1/chat/completions", "method": "POST", "status": 200, "latency_ms": 3.25,
         "ttft_ms": 1.5, "key_id": "key_x", "model": "tiny", "prompt_tokens": 7, "completion_tokens": 9,
         "finish_reason": "stop", "cached": True, "usage_estimated": True, "error_type": None,
         "prompt_text": "héllo \x00 \ud800", "output_text": "ok",
         "created_at": datetime(2026, 3, 1, 14, 0, tzinfo=plus_two)},
        {"request_id": "b", "route": "/health", "method": "GET", "status": 404, "latency_ms": float("inf")},
    ]  # fmt: skip
    async with db.get_session() as session:
        await store.insert_request_logs(session, rows)
        table = cast("Table", RequestLog.__table__)
        created = (await session.execute(select(RequestLog.created_at).where(RequestLog.request_id == "b"))).one()
        defaults: dict[str, Any] = {c.name: None for c in table.columns if c.name != "id"} | {"created_at": created[0]}
        defaults |= {"cached": False, "usage_estimated": False, "prompt_tokens": 0, "completion_tokens": 0}
        reference = [
            store.clean_request_log_row({**defaults, **r, "request_id": f"ref-{r['request_id']}"}) for r in rows
        ]
        await session.execute(insert(table), reference)
        await session.commit()
        raw = (await session.execute(text("SELECT * FROM request_logs ORDER BY request_id"))).mappings().all()
        loaded = (await session.execute(select(RequestLog).order_by(RequestLog.request_id))).scalars().all()
    by_id = {r["request_id"]: {k: v for k, v in r.items() if k not in ("id", "request_id")} for r in raw}
    assert by_id["a"] == by_id["ref-a"] and by_id["b"] == by_id["ref-b"]
    first = next(r for r in loaded if r.request_id == "a")
    assert first.created_at == datetime(2026, 3, 1, 12, 0, tzinfo=UTC) and first.created_at.tzinfo is not None
    assert (first.cached, first.usage_estimated, first.latency_ms, first.prompt_text) == (True, True, 3.25, "héllo  ?")
    second = next(r for r in loaded if r.request_id == "b")
    assert (second.cached, second.ttft_ms, second.latency_ms, second.prompt_tokens) == (False, None, 0.0, 0)
    assert abs(second.created_at - datetime.now(UTC)) < timedelta(minutes=5)


async def test_mark_applied_records_a_write_once(db: SQLAlchemyAsyncConfig) -> None:
    async with db.get_session() as session:
        assert await store.mark_applied(session, "w:1")
        await session.commit()
        assert not await store.mark_applied(session, "w:1")
        assert await store.mark_applied(session, "w:2")
        await session.rollback()
        assert await store.mark_applied(session, "w:2")  # the rolled-back attempt left nothing
        await session.commit()


async def test_an_undo_gives_back_exactly_an_applied_reservation(db: SQLAlchemyAsyncConfig) -> None:
    await _add_key(db)
    key, limits = "key_0123456789abcdef", {"max_tokens_per_month": 1000, "max_requests_per_month": None}
    async with db.get_session() as session:
        assert await store.reserve_usage(session, key, MONTH, 100, **limits, write_id="r:applied")
        assert not await store.reserve_usage(session, key, MONTH, 950, **limits, write_id="r:refused")
        assert await _usage(db) == (100, 1)
        assert await store.undo_reservation(session, "r:applied", key, MONTH, 100)
        assert not await store.undo_reservation(session, "r:refused", key, MONTH, 950)
        await session.commit()
        assert await _usage(db) == (0, 0)
        # An undo that came first (the reservation was still on its way) blocks it for good.
        assert not await store.undo_reservation(session, "r:late", key, MONTH, 10)
        await session.commit()
        with pytest.raises(IntegrityError):
            await store.reserve_usage(session, key, MONTH, 10, **limits, write_id="r:late")
    assert await _usage(db) == (0, 0)


async def test_a_reservation_counts_several_requests_or_tokens_only(db: SQLAlchemyAsyncConfig) -> None:
    """What a quota lease reserves: several requests at once, or more tokens without a request; both checked
    against the limits, and an undo gives back exactly what was reserved."""
    await _add_key(db)
    key, limits = "key_0123456789abcdef", {"max_tokens_per_month": 1000, "max_requests_per_month": 10}
    assert usage.never_fits(10, None, 5, 6) and not usage.never_fits(10, None, 5, 5)
    async with db.get_session() as session:
        assert await store.reserve_usage(session, key, MONTH, 400, **limits, requests=8, write_id="r:lease")
        assert not await store.reserve_usage(session, key, MONTH, 100, **limits, requests=3)  # 11 requests
        assert await store.reserve_usage(session, key, MONTH, 600, **limits, requests=0)  # tokens only
        assert not await store.reserve_usage(session, key, MONTH, 1, **limits, requests=0)  # 1,001 tokens
        assert await _usage(db) == (1000, 8)
        assert await store.undo_reservation(session, "r:lease", key, MONTH, 400, 8)
        await session.commit()
    assert await _usage(db) == (600, 0)


async def test_an_undo_waits_for_a_reservation_in_flight(postgres_url: str) -> None:
    """PostgreSQL: the reservation's marker is inserted but not committed yet when the undo runs; the undo waits
    and then gives it back (the reservation committed) or blocks it (it rolled back)."""
    async with migrated_config(postgres_url) as config:
        await _add_key(config)
        conn = await asyncpg.connect(postgres_url.replace("postgresql+asyncpg", "postgresql"), timeout=10)
        try:
            for outcome in ("commit", "rollback"):
                write_id = f"r:{outcome}"
                in_flight = conn.transaction()
                await in_flight.start()
                await conn.execute(
                    "INSERT INTO usage_monthly (key_id, month, tokens, requests) VALUES ($1, $2, 40, 1) "
                    "ON CONFLICT (key_id, month) DO UPDATE SET tokens = usage_monthly.tokens + 40, "
                    "requests = usage_monthly.requests + 1",
                    "key_0123456789abcdef",
                    MONTH,
                )
                await conn.execute("INSERT INTO applied_writes (id, created_at) VALUES ($1, now())", write_id)

                async def undo(write_id: str = write_id) -> bool:
                    async with config.get_session() as session:
                        given_back = await store.undo_reservation(session, write_id, "key_0123456789abcdef", MONTH, 40)
                        await session.commit()
                        return given_back

                undoing = asyncio.create_task(undo())
                await asyncio.sleep(0.3)
                assert not undoing.done()  # waiting for the reservation's transaction
                await (in_flight.commit() if outcome == "commit" else in_flight.rollback())
                assert await asyncio.wait_for(undoing, 5) is (outcome == "commit")
                assert await _usage(config) == (0, 0)
        finally:
            await conn.close()


async def test_expired_cache_entries_and_old_write_ids_are_deleted_in_chunks(db: SQLAlchemyAsyncConfig) -> None:
    async with db.get_session() as session:
        for i in range(5):
            await store.cache_put(session, f"{i}".ljust(64, "x"), "key_x", "tiny", b"old", T0 - timedelta(seconds=i))
            assert await store.mark_applied(session, f"w:{i}")
        await store.cache_put(session, "live".ljust(64, "x"), "key_x", "tiny", b"new", T0 + timedelta(seconds=1))
        await session.commit()
        assert await store.cache_purge_expired(session, T0, chunk_size=2) == 5
        assert await store.cache_get(session, "live".ljust(64, "x"), T0) == b"new"
        cutoff = datetime.now(UTC) + timedelta(seconds=1)
        assert await store.delete_applied_writes_before(session, cutoff, chunk_size=2) == 5
        assert await store.delete_applied_writes_before(session, cutoff) == 0


# --- engine configuration -----------------------------------------------------------------------------------------


async def test_sqlite_engine_pragmas_and_folder(sqlite_url: str) -> None:
    config = make_engine_config(sqlite_url)
    try:
        async with config.get_engine().connect() as conn:
            pragmas = [
                (await conn.execute(text(f"PRAGMA {name}"))).scalar_one()
                for name in ("journal_mode", "foreign_keys", "busy_timeout")
            ]
    finally:
        await config.get_engine().dispose()
    assert pragmas == ["wal", 1, 5000]


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP port that accepts connections and never answers (a hung database)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    try:
        yield server.getsockname()[1]
    finally:
        server.close()


@pytest.mark.parametrize("target", ["refused", "silent"])
async def test_unreachable_postgres_fails_fast(target: str, silent_server: int) -> None:
    port = 1 if target == "refused" else silent_server
    config = make_engine_config(f"postgresql+asyncpg://postgres@127.0.0.1:{port}/x", connect_timeout_s=1.0)
    start = time.monotonic()
    try:
        with pytest.raises((OSError, TimeoutError)):
            async with config.get_session() as session:
                await session.execute(text("SELECT 1"))
    finally:
        await config.get_engine().dispose()
    assert time.monotonic() - start < 3.0


async def test_postgres_command_timeout_bounds_a_hung_statement(postgres_url: str) -> None:
    config = make_engine_config(postgres_url, command_timeout_s=0.5)
    start = time.monotonic()
    try:
        with pytest.raises(TimeoutError):
            async with config.get_session() as session:
                await session.execute(text("SELECT pg_sleep(5)"))
    finally:
        await config.get_engine().dispose()
    assert time.monotonic() - start < 3.0
