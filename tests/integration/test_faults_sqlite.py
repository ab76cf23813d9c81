"""Faults: SQLite locked by another connection, and the request-log writer under a failing database.

A write request gets 503 within the timeout, reads are served and their rows held; a shutdown during a flush keeps
that flush's rows; the writer holds rows within its bound and drops only what the database rejects.

The harnesses are in ``tests/fakes/faults.py``. Time bounds are generous (shared, slow machines); the measured
values are printed (``-s``) for the reliability notes.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from litestar.testing import TestClient

from server.app import create_app
from server.engine.fake import FakeEngine
from server.records.database import Database
from server.records.record import RequestRecord
from server.records.writer import MAX_BACKOFF_S, BatchWriter
from server.settings import Settings
from server.wiring.state import app_state
from tests.conftest import bearer
from tests.fakes.faults import CHAT, MARGIN_S, report

# ---- SQLite locked by another connection -------------------------------------------------------------------


def test_sqlite_locked_by_another_connection(
    settings: Settings, api_key: str, caplog: pytest.LogCaptureFixture
) -> None:
    timeout_s = 1.5
    s = msgspec.structs.replace(settings, database_timeout_s=timeout_s, key_cache_ttl_s=600, cache_enabled=False)
    db_file = s.data_dir / "llm_server.db"
    app = create_app(s, engine=FakeEngine(["a", "b"]))
    admin = bearer(api_key)
    caplog.set_level(logging.WARNING, logger="server.records.writer")
    with TestClient(app) as http:
        writer = app_state(app).services.writer
        assert http.post("/v1/chat/completions", json=CHAT, headers=admin).status_code == 200
        assert http.get("/admin/usage", headers=admin).status_code == 200  # flushes the writer
        before = _sqlite_rows(db_file)

        locker = sqlite3.connect(db_file, isolation_level=None, timeout=0)
        try:
            locker.execute("BEGIN EXCLUSIVE")
            started = time.monotonic()
            r = http.post("/admin/keys", json={"name": "during-lock", "role": "default"}, headers=admin)
            to_503 = time.monotonic() - started
            report("sqlite locked: a write request -> 503", to_503)
            assert r.status_code == 503, r.text
            assert r.json()["error"] == {
                "message": "The database is unavailable; retry shortly.",
                "type": "server_error",
                "param": None,
                "code": "service_unavailable",
            }
            assert to_503 < timeout_s + MARGIN_S
            # Requests that need no write are served (WAL readers are not blocked); their rows wait in the writer.
            served = [http.post("/v1/chat/completions", json=CHAT, headers=admin) for _ in range(5)]
            assert [x.status_code for x in served] == [200] * 5
            time.sleep(2 * MAX_BACKOFF_S)  # the writer tries (and fails) meanwhile

            async def pending() -> int:  # read on the app's loop, not mid-way through a flush
                return int(writer.pending_rows)

            assert http.blocking_portal.call(pending) == 5 and _sqlite_rows(db_file) == before
        finally:
            released = time.monotonic()
            locker.execute("ROLLBACK")
            locker.close()

        r = http.post("/admin/keys", json={"name": "after-lock", "role": "default"}, headers=admin)
        assert r.status_code in (200, 201), r.text
        report("sqlite unlocked -> a write request succeeds", time.monotonic() - released)
        deadline = time.monotonic() + MAX_BACKOFF_S + timeout_s + MARGIN_S
        while _sqlite_rows(db_file) < before + 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        report("sqlite unlocked -> held rows written", time.monotonic() - released)
    rows = _sqlite_rows(db_file)
    assert rows == before + 5, (before, rows)
    assert writer.dropped == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any("database is unavailable" in m for m in messages)
    assert any("database is back" in m for m in messages)


def _sqlite_rows(db_file: Path) -> int:
    con = sqlite3.connect(db_file, timeout=30)
    try:
        return int(con.execute("SELECT count(*) FROM request_logs WHERE route LIKE '/v1/%'").fetchone()[0])
    finally:
        con.close()


@pytest.mark.anyio
async def test_request_log_writer_stopped_during_a_flush_keeps_that_flushs_rows(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shutdown that lands while the periodic flush is writing waits for it (cancelling it lost its rows)."""
    from persistence import store

    db_file = settings.data_dir / "llm_server.db"
    before = _sqlite_rows(db_file)
    writing, gate = asyncio.Event(), asyncio.Event()
    insert = store.insert_request_logs

    async def slow_insert(session: Any, rows: Any) -> None:
        writing.set()
        await gate.wait()  # the write is in progress when the shutdown comes
        await insert(session, rows)

    monkeypatch.setattr(store, "insert_request_logs", slow_insert)
    db = Database(settings.database, timeout_s=5.0)
    writer = BatchWriter(db, interval_s=0.01)
    try:
        for i in range(3):
            writer.add_row(RequestRecord(f"in-flight-{i}", "/v1/test", "POST", status=200))
        writer.start()
        await asyncio.wait_for(writing.wait(), 5)
        stopping = asyncio.create_task(writer.stop())
        await asyncio.sleep(0.1)
        assert not stopping.done()  # waiting for the flush in progress
        gate.set()
        await asyncio.wait_for(stopping, 5)
    finally:
        gate.set()
        await db.close()
    assert _sqlite_rows(db_file) == before + 3


@pytest.mark.anyio
async def test_request_log_writer_holds_rows_within_its_bound_and_drops_only_rejected_items(settings: Settings) -> None:
    db_file = settings.data_dir / "llm_server.db"
    con = sqlite3.connect(db_file)
    key_id = con.execute("SELECT id FROM api_keys LIMIT 1").fetchone()[0]
    con.close()
    before = _sqlite_rows(db_file)
    db = Database(settings.database, timeout_s=1.0)
    writer = BatchWriter(db, max_rows=3)

    def usage() -> tuple[int, int] | None:
        c = sqlite3.connect(db_file, timeout=30)
        try:
            row = c.execute("SELECT tokens, requests FROM usage_monthly WHERE month = '2099-01'").fetchone()
            return None if row is None else (int(row[0]), int(row[1]))
        finally:
            c.close()

    try:
        locker = sqlite3.connect(db_file, isolation_level=None, timeout=0)
        locker.execute("BEGIN EXCLUSIVE")
        for i in range(5):
            writer.add_row(RequestRecord(f"held-{i}", "/v1/test", "POST", status=200))
        writer.add_usage(key_id, "2099-01", 10, 1)
        writer.add_usage(key_id, "2099-01", 10, 1)
        started = time.monotonic()
        assert not await writer.flush()
        assert time.monotonic() - started < 1.0 + MARGIN_S
        # The bound: the 3 oldest rows are held, the 2 newest dropped and counted; usage (a sum) is never dropped.
        assert writer.pending_rows == 3 and writer.dropped == 2
        writer.add_row(RequestRecord("over-the-bound", "/v1/test", "POST", status=200))
        assert writer.pending_rows == 3 and writer.dropped == 3
        writer.add_usage(key_id, "2099-01", 5, 1)
        locker.execute("ROLLBACK")
        locker.close()
        assert await writer.flush()
        assert _sqlite_rows(db_file) == before + 3 and usage() == (25, 3) and writer.pending_rows == 0

        # What the database rejects (usage of a key that does not exist) is dropped alone, not retried forever;
        # the row and the other key's usage written with it are kept ...
        writer.add_usage("key_that_does_not_exist", "2099-01", 1, 1)
        writer.add_usage(key_id, "2099-01", 2, 1)
        writer.add_row(RequestRecord("written", "/v1/test", "POST", status=200))
        assert await writer.flush()
        assert writer.dropped == 3 and writer.pending_rows == 0 and usage() == (27, 4)
        # ... and it does not block the batches behind it.
        writer.add_row(RequestRecord("after", "/v1/test", "POST", status=200))
        writer.add_usage(key_id, "2099-01", 1, 1)
        assert await writer.flush()
        assert _sqlite_rows(db_file) == before + 5 and usage() == (28, 5)
    finally:
        await db.close()
