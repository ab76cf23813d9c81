"""Accounting that loses nothing: a bad row never takes others with it, a write whose answer was lost is applied
once, a reservation whose answer was lost is given back, and the completion cache is purged and served at once.

PostgreSQL runs for real when ``LLM_SERVER_TEST_POSTGRES_URL`` is set, Redis when ``LLM_SERVER_TEST_REDIS_URL`` is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest
from litestar import Litestar
from litestar.testing import TestClient
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession

from persistence import migrate, store
from server.admission.ledger import LocalLedger
from server.app import create_app
from server.engine.fake import FakeEngine
from server.records.database import Database, DatabaseUnavailable, describe_error
from server.records.record import RequestRecord
from server.records.units import CACHE_PURGE_INTERVAL_S
from server.records.writer import BatchWriter
from server.settings import Settings
from server.wiring.state import app_state
from tests.conftest import TEST_PEPPER, add_role_key, bearer, create_test_key
from tests.fakes.replies import answers
from tests.fakes.upstream import MockUpstream, serving

T = TypeVar("T")
MONTH = datetime.now(UTC).strftime("%Y-%m")


def chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "fake", "messages": [{"role": "user", "content": text}], **extra}


class LostAnswers(Database):
    """A database whose next ``lose`` writes never answer: the caller times out and sees "unavailable".

    ``when`` the write stops answering: ``after-commit`` (a cancellation that landed during ``COMMIT``, a server
    that received ``COMMIT`` just before a partition), ``before-commit`` (its statements ran; rolled back when
    abandoned) or ``before-start`` (it never reached the database). ``reservations_only``: only quota reservations
    (the single-statement writes) lose their answer.
    """

    lose = 0
    when = "after-commit"
    reservations_only = False

    async def run(
        self,
        fn: Callable[[AsyncSession], Awaitable[T]],
        *,
        timeout_s: float | None = None,
        write: bool = False,
        single_statement: bool = False,
    ) -> T:
        if self.lose > 0 and write and (single_statement or not self.reservations_only):
            type(self).lose -= 1
            work = fn

            async def then_hang(session: AsyncSession) -> T:
                if self.when != "before-start":
                    await work(session)
                if self.when == "after-commit":
                    await session.commit()  # a no-op in autocommit mode: the statement committed already
                await asyncio.sleep(3600)
                raise AssertionError("unreachable")

            fn = then_hang
        return await super().run(fn, timeout_s=timeout_s, write=write, single_statement=single_statement)

    async def fetch_value(self, sql: str, args: Sequence[Any], *, timeout_s: float | None = None) -> Any:
        """The quota reservation on PostgreSQL (a single statement, autocommit): it loses its answer the same way."""
        if self.lose <= 0:
            return await super().fetch_value(sql, args, timeout_s=timeout_s)
        type(self).lose -= 1

        async def then_hang() -> Any:
            if self.when != "before-start":
                await Database.fetch_value(self, sql, args)  # committed: the statement runs in autocommit mode
            await asyncio.sleep(3600)
            raise AssertionError("unreachable")

        return await self._within(then_hang(), timeout_s)


def losing(when: str, *, reservations_only: bool = False) -> type[LostAnswers]:
    """A :class:`LostAnswers` class whose next write loses its answer."""
    attrs = {"lose": 1, "when": when, "reservations_only": reservations_only}
    return type("Losing", (LostAnswers,), attrs)


async def usage_of(db: Database, key_id: str) -> tuple[int, int]:
    rows = await db.run(lambda s: store.get_usage(s, key_id, MONTH))
    return (rows[0].tokens, rows[0].requests) if rows else (0, 0)


async def pg_fetch(url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"), timeout=10)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


async def key_ids(settings: Settings) -> dict[str, str]:
    db = Database(settings.database)
    try:
        keys = await db.run(lambda s: store.list_keys(s))
    finally:
        await db.close()
    return {k.name.removesuffix("-key"): k.id for k in keys}


def pg_settings(tmp_path: Path, url: str, **overrides: Any) -> Settings:
    return Settings(
        data_dir=tmp_path,
        database_url=url,
        key_pepper=TEST_PEPPER,
        auto_migrate=False,
        auth_failures_per_minute=None,
        **overrides,
    )


# ---- a row the database rejects never takes other tenants' usage or rows with it ---------------------------------


@pytest.mark.parametrize("cleaned", [True, False], ids=["cleaned", "rejected-alone"])
def test_nul_in_a_prompt_loses_no_other_tenants_usage_and_leaks_nothing(
    tmp_path: Path, postgres_url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, cleaned: bool
) -> None:
    """PostgreSQL + STORE_PROMPTS: one message holds NUL among other tenants' requests, all in one flush.

    ``cleaned``: the row is written with NUL stripped. ``rejected-alone``: cleaning is bypassed, so PostgreSQL
    rejects the chunk; its rows are retried one at a time and only the bad one is dropped.
    """
    if not cleaned:
        import persistence.logs

        monkeypatch.setattr(persistence.logs, "clean_request_log_row", dict)
    settings = pg_settings(tmp_path, postgres_url, store_prompts=True, cache_enabled=False)
    asyncio.run(migrate.upgrade(postgres_url))
    tenants = {
        "free": asyncio.run(add_role_key(settings, "free")),
        "metered": asyncio.run(add_role_key(settings, "metered", monthly_tokens=10**9)),
        "hostile": asyncio.run(add_role_key(settings, "hostile")),
    }
    ids = asyncio.run(key_ids(settings))
    caplog.set_level(logging.DEBUG)
    app = create_app(settings, engine=FakeEngine())  # echoes the prompt back: output text holds it too
    spent: dict[str, list[int]] = {name: [0, 0] for name in tenants}
    with TestClient(app) as http:
        writer = app_state(app).services.writer
        http.blocking_portal.call(writer.stop)  # flush by hand: everything below lands in one batch
        for round_ in range(3):
            for name, key in tenants.items():
                text = f"secret-of-{name}-{round_}"
                if name == "hostile" and round_ == 1:
                    text = "bad\u0000row secret-of-hostile"
                r = http.post("/v1/chat/completions", json=chat(text), headers=bearer(key))
                assert r.status_code == 200, r.text
                spent[name][0] += r.json()["usage"]["total_tokens"]
                spent[name][1] += 1
        assert http.blocking_portal.call(writer.flush)
        dropped = writer.dropped
    for name in tenants:
        assert asyncio.run(usage_of_url(postgres_url, ids[name])) == tuple(spent[name]), name
    rows = asyncio.run(pg_fetch(postgres_url, "SELECT key_id, prompt_text, output_text FROM request_logs"))
    per_key = {name: sum(1 for r in rows if r["key_id"] == ids[name]) for name in tenants}
    if cleaned:
        assert dropped == 0 and per_key == {"free": 3, "metered": 3, "hostile": 3}
        [bad] = [r for r in rows if r["prompt_text"] and "bad" in r["prompt_text"]]
        assert "\x00" not in bad["prompt_text"] and "row secret-of-hostile" in bad["prompt_text"]
        assert "\x00" not in (bad["output_text"] or "")
    else:
        assert dropped == 1 and per_key == {"free": 3, "metered": 3, "hostile": 2}
        assert any("rejected 1 request-log rows" in rec.getMessage() for rec in caplog.records)
    for rec in caplog.records:
        text = rec.getMessage() + (logging.Formatter().formatException(rec.exc_info) if rec.exc_info else "")
        assert "secret-of" not in text and "parameters" not in text and "[SQL" not in text, text


async def usage_of_url(url: str, key_id: str) -> tuple[int, int]:
    rows = await pg_fetch(
        url, "SELECT tokens, requests FROM usage_monthly WHERE key_id = $1 AND month = $2", key_id, MONTH
    )
    return (int(rows[0]["tokens"]), int(rows[0]["requests"])) if rows else (0, 0)


# ---- a write whose answer was lost is applied exactly once ----------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("when", ["after-commit", "before-commit"])
async def test_a_batch_whose_answer_was_lost_is_applied_once(
    db_url: str, tmp_path: Path, when: str, caplog: pytest.LogCaptureFixture
) -> None:
    await migrate.upgrade(db_url)
    settings = Settings(data_dir=tmp_path, database_url=db_url, key_pepper=TEST_PEPPER)
    await create_test_key(settings, name="payer")
    [key_id] = (await key_ids(settings)).values()
    db = losing(when)(db_url, timeout_s=0.5)
    writer = BatchWriter(db)
    caplog.set_level(logging.INFO, logger="server.records.writer")
    try:
        writer.add_usage(key_id, MONTH, 100, 1)
        assert not await writer.flush()  # the usage unit's answer is lost: held as it is
        writer.add_usage(key_id, MONTH, 5, 1)  # newer usage is not merged into the held unit
        for i in range(3):
            writer.add_row(RequestRecord(f"row-{i}", "/v1/test", "POST", status=200, key_id=key_id))
        assert await writer.flush()
        assert await usage_of(db, key_id) == (105, 2)
        assert await writer.flush() and await usage_of(db, key_id) == (105, 2)
        assert await db.run(_rows) == 3 and writer.pending_rows == 0 and writer.dropped == 0
    finally:
        await db.close()
    skipped = [r for r in caplog.records if "had already committed" in r.getMessage()]
    assert len(skipped) == (1 if when == "after-commit" else 0)


async def _rows(session: AsyncSession) -> int:
    from sqlalchemy import text

    return int((await session.execute(text("SELECT count(*) FROM request_logs"))).scalar_one())


@pytest.mark.parametrize("when", ["after-commit", "before-start"])
def test_a_reservation_whose_answer_was_lost_is_given_back(
    tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """PostgreSQL: the quota reservation times out after committing (or before running); the client gets 503 and
    the reservation does not stand: no phantom tokens or request for a request that was refused."""
    import server.wiring.services

    monkeypatch.setattr(server.wiring.services, "Database", losing(when, reservations_only=True))
    settings = pg_settings(tmp_path, postgres_url, database_timeout_s=0.5, cache_enabled=False)
    asyncio.run(migrate.upgrade(postgres_url))
    key = asyncio.run(add_role_key(settings, "metered", monthly_tokens=100_000))
    admin = asyncio.run(create_test_key(settings))
    key_id = asyncio.run(key_ids(settings))["metered"]
    with TestClient(create_app(settings, engine=FakeEngine(["a", "b"]))) as http:
        r = http.post("/v1/chat/completions", json=chat("hi", max_tokens=50), headers=bearer(key))
        assert r.status_code == 503 and r.json()["error"]["code"] == "service_unavailable", r.text
        assert http.get("/admin/usage", headers=bearer(admin)).status_code == 200  # flushes the writer
        assert asyncio.run(usage_of_url(postgres_url, key_id)) == (0, 0)
        ok = http.post("/v1/chat/completions", json=chat("hi", max_tokens=50), headers=bearer(key))
        assert ok.status_code == 200
        assert http.get("/admin/usage", headers=bearer(admin)).status_code == 200
        assert asyncio.run(usage_of_url(postgres_url, key_id)) == (ok.json()["usage"]["total_tokens"], 1)


class HeldReplies:
    """A TCP proxy in front of PostgreSQL that, once armed, holds the server's replies after the client sends
    ``trigger``: the server has the statement (and commits it) but the client hears nothing, as in a partition."""

    def __init__(self, target: str) -> None:
        url = make_url(target)
        self._target = (url.host or "127.0.0.1", url.port or 5432)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)  # so the accepting thread sees close() soon
        self.url = url.set(port=self._listener.getsockname()[1]).render_as_string(hide_password=False)
        self.trigger: bytes | None = None
        self.holding = threading.Event()
        self.released = threading.Event()
        self._closed = False
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def arm(self, trigger: bytes) -> None:
        self.trigger = trigger

    def release(self) -> None:
        self.trigger = None
        self.holding.clear()
        self.released.set()

    def close(self) -> None:
        self._closed = True
        self.release()
        self._threads[0].join(5)
        self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(5)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            server = socket.create_connection(self._target)
            self._sockets += [client, server]
            for args in ((client, server, True), (server, client, False)):
                self._threads.append(threading.Thread(target=self._pipe, args=args, daemon=True))
                self._threads[-1].start()

    def _pipe(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if upstream and self.trigger is not None and self.trigger in data:
                    self.holding.set()
                    self.released.clear()
                if not upstream and self.holding.is_set():
                    self.released.wait()
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


@pytest.fixture
def held_replies(postgres_url: str) -> Iterator[HeldReplies]:
    proxy = HeldReplies(postgres_url)
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.mark.anyio
async def test_a_batch_whose_commit_reply_is_lost_in_the_network_is_applied_once(
    postgres_url: str, held_replies: HeldReplies, tmp_path: Path
) -> None:
    """No simulation in the code: PostgreSQL receives COMMIT and commits, the reply never comes, the writer's
    database call times out; the retry finds the unit's id and applies nothing twice."""
    await migrate.upgrade(postgres_url)
    settings = Settings(data_dir=tmp_path, database_url=postgres_url, key_pepper=TEST_PEPPER)
    await create_test_key(settings, name="payer")
    [key_id] = (await key_ids(settings)).values()
    db = Database(held_replies.url + "?ssl=disable", timeout_s=0.5)
    writer = BatchWriter(db)
    try:
        assert await db.ping()  # the pool's connection is open before the proxy is armed
        held_replies.arm(b"COMMIT")
        writer.add_usage(key_id, MONTH, 100, 1)
        writer.add_row(RequestRecord("r-1", "/v1/test", "POST", status=200, key_id=key_id))
        assert not await writer.flush()
        assert held_replies.holding.is_set()
        assert await usage_of_url(postgres_url, key_id) == (100, 1)  # committed, though the writer never heard
        held_replies.release()
        assert await writer.flush()
        assert await usage_of_url(postgres_url, key_id) == (100, 1)
        assert len(await pg_fetch(postgres_url, "SELECT id FROM request_logs")) == 1
    finally:
        held_replies.release()
        await db.close()


def test_a_reservation_whose_reply_is_lost_in_the_network_is_given_back(
    tmp_path: Path, postgres_url: str, held_replies: HeldReplies
) -> None:
    """No simulation in the code: the reservation's statement reaches PostgreSQL and commits, its reply is held, the
    request gets 503; the undo the gateway queued gives the reservation back."""
    asyncio.run(migrate.upgrade(postgres_url))
    settings = pg_settings(
        tmp_path, held_replies.url + "?ssl=disable", database_timeout_s=0.5, cache_enabled=False, key_cache_ttl_s=600
    )
    key = asyncio.run(add_role_key(settings, "metered", monthly_tokens=100_000))
    key_id = asyncio.run(key_ids(settings))["metered"]
    app = create_app(settings, engine=FakeEngine(["a", "b"]))
    with TestClient(app) as http:
        writer = app_state(app).services.writer
        first = http.post("/v1/chat/completions", json=chat("hi", max_tokens=50), headers=bearer(key))
        assert first.status_code == 200  # the key is cached now: the next request's only statement is its reservation
        http.blocking_portal.call(writer.stop)  # flushes; from here the writer writes only when asked
        assert asyncio.run(usage_of_url(postgres_url, key_id)) == (first.json()["usage"]["total_tokens"], 1)
        held_replies.arm(key_id.encode())  # a parameter of the reservation's statement
        r = http.post("/v1/chat/completions", json=chat("hi", max_tokens=50), headers=bearer(key))
        assert r.status_code == 503 and r.json()["error"]["code"] == "service_unavailable", r.text
        assert held_replies.holding.is_set()
        phantom = asyncio.run(usage_of_url(postgres_url, key_id))
        assert phantom[1] == 2  # the refused request's reservation committed
        held_replies.release()
        assert http.blocking_portal.call(writer.flush)
    assert asyncio.run(usage_of_url(postgres_url, key_id)) == (first.json()["usage"]["total_tokens"], 1)


@pytest.mark.anyio
async def test_the_ledger_counts_a_settlement_that_lands_while_its_row_loads(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite's in-memory quota counters: usage settled while the key's row is being read is counted once."""
    [key_id] = (await key_ids(settings)).values()
    db = Database(settings.database)
    writer = BatchWriter(db)
    ledger = LocalLedger(writer)
    reading, gate = asyncio.Event(), asyncio.Event()
    get_usage = store.get_usage

    async def slow_read(session: AsyncSession, key: str | None, month: str) -> Any:
        reading.set()
        await gate.wait()
        return await get_usage(session, key, month)

    try:
        writer.add_usage(key_id, MONTH, 100, 1)
        monkeypatch.setattr(store, "get_usage", slow_read)
        first = asyncio.create_task(ledger.reserve(key_id, MONTH, 10, 1000, None))
        await reading.wait()
        ledger.settle(key_id, MONTH, 7, 1)  # e.g. a request of this key without a reservation ending now
        gate.set()
        assert await first
        assert await ledger.reserve(key_id, MONTH, 883, 1000, None)  # 100 + 10 + 7 + 883 = 1000
        assert not await ledger.reserve(key_id, MONTH, 1, 1000, None)
        monkeypatch.setattr(store, "get_usage", get_usage)
        assert await writer.flush()
        assert await usage_of(db, key_id) == (1000, 4)
    finally:
        await db.close()


# ---- completion cache ---------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_expired_cache_entries_are_purged_by_the_retention_pass(db_url: str) -> None:
    await migrate.upgrade(db_url)
    db = Database(db_url)
    now = datetime.now(UTC)

    async def put(session: AsyncSession) -> None:
        for i in range(5):
            await store.cache_put(
                session, f"old-{i}".ljust(64, "0"), "key_x", "fake", b"old", now - timedelta(seconds=1)
            )
        await store.cache_put(session, "live".ljust(64, "0"), "key_x", "fake", b"live", now + timedelta(hours=1))

    async def keys(session: AsyncSession) -> list[str]:
        from sqlalchemy import text

        return [r[0].rstrip("0") for r in await session.execute(text("SELECT cache_key FROM completion_cache"))]

    writer = BatchWriter(db, interval_s=0.01)
    try:
        await db.run(put)
        writer.start()  # its first successful flush runs the retention pass, then every CACHE_PURGE_INTERVAL_S
        for _ in range(500):
            if await db.run(keys) == ["live"]:
                break
            await asyncio.sleep(0.01)
        assert await db.run(keys) == ["live"]
        assert CACHE_PURGE_INTERVAL_S <= 60
    finally:
        await writer.stop()
        await db.close()


def test_a_repeated_deterministic_request_hits_at_once(make_app: Callable[..., Litestar], api_key: str) -> None:
    engine = FakeEngine(["Hel", "lo"])
    body = chat("hi", temperature=0)
    with TestClient(make_app(engine)) as http:
        first = http.post("/v1/chat/completions", json=body, headers=bearer(api_key))
        second = http.post("/v1/chat/completions", json=body, headers=bearer(api_key))  # no flush in between
        streamed = http.post("/v1/chat/completions", json=body | {"stream": True}, headers=bearer(api_key))
    assert "x-cache" not in first.headers
    assert second.headers["x-cache"] == "HIT" and streamed.headers["x-cache"] == "HIT"
    assert second.json()["choices"] == first.json()["choices"]
    assert len(engine.requests) == 1


def test_a_repeated_deterministic_remote_request_hits_at_once(settings: Settings, api_key: str) -> None:
    mock = MockUpstream(answers)
    body = {"model": "remote", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    with serving(settings, mock, api_key) as (http, _):
        first = http.post("/v1/chat/completions", json=body)
        second = http.post("/v1/chat/completions", json=body)
    assert "x-cache" not in first.headers and second.headers["x-cache"] == "HIT"
    assert second.json()["choices"] == first.json()["choices"] and mock.calls == 1


def test_queued_cache_entries_are_bounded_and_expire(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tenant cannot grow the queue past its byte bound, and a queued entry is never served past its TTL."""
    import server.records.units

    monkeypatch.setattr(server.records.units, "MAX_CACHE_BYTES", 10)
    queue = server.records.units.CacheQueue()
    queue.add("a", "key_x", "fake", b"12345", ttl_s=60)
    queue.add("b", "key_x", "fake", b"123456", ttl_s=60)  # over the bound: skipped
    queue.add("a", "key_x", "fake", b"1234567890", ttl_s=60)  # replacing frees the old entry's bytes first
    assert (queue.get("a"), queue.get("b")) == (b"1234567890", None)
    queue.add("old", "key_x", "fake", b"", ttl_s=-1)
    assert queue.get("old") is None and [k for k, _ in queue.due()] == ["a"]


# ---- log hygiene ------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_database_errors_are_described_without_their_values(db_url: str) -> None:
    await migrate.upgrade(db_url)
    db = Database(db_url, timeout_s=2.0)
    secret = "secret-prompt-text"

    async def duplicate(session: AsyncSession) -> None:
        await store.cache_put(session, "k" * 64, "key_x", secret, secret.encode(), datetime.now(UTC))
        await session.commit()
        from sqlalchemy import insert

        from persistence.models import CompletionCache

        await session.execute(
            insert(CompletionCache).values(
                cache_key="k" * 64, key_id="key_x", model=secret, response=b"", expires_at=datetime.now(UTC)
            )
        )

    try:
        with pytest.raises(Exception) as err:
            await db.run(duplicate, write=True)
    finally:
        await db.close()
    assert secret in str(err.value)  # what SQLAlchemy would have logged
    described = describe_error(err.value)
    assert secret not in described and "IntegrityError" in described
    if "postgresql" in db_url:
        assert "SQLSTATE 23505" in described
    assert not isinstance(err.value, DatabaseUnavailable)
