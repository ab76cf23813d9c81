"""Faults: PostgreSQL down or frozen, SQLite locked, Redis down or frozen, and a failing engine.

Each test breaks a real dependency (a private PostgreSQL or Redis started for the test, a second SQLite connection,
a wrapped model), measures how long requests take to fail and to recover, and checks that nothing buffered is lost.
Time bounds are generous (shared, slow machines); the measured values are printed (``-s``) for the reliability notes.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import httpx
import msgspec
import pytest
from litestar.testing import TestClient

from persistence import migrate
from server.admission.ratelimit import RETRY_AFTER_FAILURE_S, STORAGE_TIMEOUT_S
from server.app import create_app
from server.auth.keys import generate_key
from server.engine.fake import FakeEngine
from server.engine.hf import HFEngine
from server.engine.scheduler import MAX_FAILED_STEPS
from server.records.database import Database
from server.records.writer import MAX_BACKOFF_S, RequestLogWriter, RequestRecord
from server.settings import Settings
from server.wiring.state import app_state
from tests.conftest import TEST_PEPPER, add_role_key
from tests.db_fixtures import skip_or_fail
from tests.live import free_port, live_server

MSGS = [{"role": "user", "content": "hi"}]
CHAT = {"model": "fake", "messages": MSGS}
MARGIN_S = 3.0  # scheduling slack on a shared 2-core machine


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def report(what: str, seconds: float) -> None:
    print(f"\n[faults] {what}: {seconds:.3f}s")


# ---- a private PostgreSQL -------------------------------------------------------------------------------------


def _pg_tool(name: str) -> str | None:
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):  # newest version first
        if os.access(f"{folder}/{name}", os.X_OK):
            return f"{folder}/{name}"
    return shutil.which(name)


class PrivatePostgres:
    """A throw-away PostgreSQL cluster on a free port (trust auth), stopped, frozen and started at will."""

    def __init__(self) -> None:
        initdb, pg_ctl = _pg_tool("initdb"), _pg_tool("pg_ctl")
        if initdb is None or pg_ctl is None:
            skip_or_fail("the PostgreSQL fault tests need initdb and pg_ctl (e.g. apt-get install postgresql)")
        assert initdb is not None and pg_ctl is not None
        self._pg_ctl = pg_ctl
        self._as: list[str] = []
        self.root = Path(tempfile.mkdtemp(prefix="llm-faults-pg-"))  # short: it holds the Unix socket
        if os.geteuid() == 0:  # initdb refuses root: run the cluster as the postgres user
            runuser = shutil.which("runuser")
            try:
                shutil.chown(self.root, "postgres")
            except LookupError:
                runuser = None
            if runuser is None:
                shutil.rmtree(self.root)
                skip_or_fail("running as root, the PostgreSQL fault tests need a 'postgres' user and runuser")
            self._as = [str(runuser), "-u", "postgres", "--"]
        self.data = self.root / "data"
        self.port = free_port()
        self.url = f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"
        self.frozen: list[int] = []
        self._run(initdb, "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    def _run(self, *args: str) -> None:
        subprocess.run([*self._as, *args], check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
        self._run(self._pg_ctl, "-D", str(self.data), "-o", options, "-l", str(self.root / "log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(self._pg_ctl, "-D", str(self.data), "-m", mode, "-w", "stop")

    def _pids(self) -> list[int]:
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        children = []
        for status in glob.glob("/proc/[0-9]*/status"):
            with contextlib.suppress(OSError):
                fields = dict(line.split(":\t", 1) for line in Path(status).read_text().splitlines() if ":\t" in line)
                if int(fields.get("PPid", "0")) == postmaster:
                    children.append(int(status.split("/")[2]))
        return [postmaster, *children]

    def freeze(self) -> None:
        """SIGSTOP every process of the cluster: connections stay open but nothing answers (a partition).

        The postmaster stops first, so it forks no backend after the children are listed (a backend forked
        between a listing and the stop would go on answering); then the children are listed until none is new.
        """
        pids = self._pids()
        os.kill(pids[0], signal.SIGSTOP)
        self.frozen = [pids[0]]
        while True:
            new = [pid for pid in self._pids()[1:] if pid not in self.frozen]
            if not new:
                break
            for pid in new:
                os.kill(pid, signal.SIGSTOP)
            self.frozen += new

    def thaw(self) -> None:
        for pid in self.frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.frozen = []

    def destroy(self) -> None:
        self.thaw()
        with contextlib.suppress(subprocess.SubprocessError):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


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


# ---- 1. PostgreSQL goes away and comes back ------------------------------------------------------------------


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
        metered_down = [o for o in down if o.key == "metered"]
        # While it was down: requests that need it got a clear 503 within the bound, the others were served.
        odd = [o for o in metered_down if (o.status, o.code) != (503, "service_unavailable")]
        assert metered_down and not odd, odd
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


# ---- 2. SQLite locked by another connection -------------------------------------------------------------------


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
    writer = RequestLogWriter(db, interval_s=0.01)
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
    writer = RequestLogWriter(db, max_rows=3)

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


# ---- 3. Redis down or frozen under the rate limiter -----------------------------------------------------------


class PrivateRedis:
    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            skip_or_fail("the Redis fault tests need redis-server")
        self._binary = str(binary)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [self._binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1) as c:
                c.sendall(b"PING\r\n")
                if c.recv(16).startswith(b"+PONG"):
                    return
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def freeze(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGCONT)


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


# ---- 4. an exception inside the engine thread -----------------------------------------------------------------


class Killed(BaseException):
    """Something no ``except Exception`` catches: it would end the worker thread."""


class FlakyModel:
    """Wraps the engine's model: after ``ok`` more forward passes, the next ``failures`` ones raise ``error``."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.ok = 0
        self.failures = 0
        self.error: BaseException = RuntimeError("injected forward failure")

    def arm(self, failures: int, *, after: int = 0, error: BaseException | None = None) -> None:
        self.ok = after
        self.error = error or RuntimeError("injected forward failure")
        self.failures = failures

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.failures > 0:
            if self.ok > 0:
                self.ok -= 1
            else:
                self.failures -= 1
                raise self.error
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


@pytest.fixture
def hf_app(tiny_model_dir: Path, settings: Settings, api_key: str) -> Iterator[tuple[TestClient[Any], FlakyModel, str]]:
    s = msgspec.structs.replace(settings, model=str(tiny_model_dir), cache_enabled=False)
    engine = HFEngine(str(tiny_model_dir), served_model_name="tiny", data_dir=s.data_dir, device="cpu", dtype="float32")
    with TestClient(create_app(s, engine=engine)) as http:
        deadline = time.monotonic() + 60
        while http.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "tiny model did not load"
            time.sleep(0.05)
        scheduler: Any = engine._scheduler  # the test reaches into the engine to break its model
        flaky = FlakyModel(scheduler._model)
        scheduler._model = flaky
        yield http, flaky, api_key


def tiny_chat(http: TestClient[Any], key: str, *, stream: bool = False, max_tokens: int = 8) -> httpx.Response:
    body = {"model": "tiny", "messages": MSGS, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    return http.post("/v1/chat/completions", json=body, headers=bearer(key))


def last_frame(r: httpx.Response) -> dict[str, Any]:
    frames = [f for f in r.text.split("\n\n") if f.strip()]
    decoded: dict[str, Any] = msgspec.json.decode(frames[-1].removeprefix("data: "))
    return decoded


@pytest.mark.slow
def test_engine_step_failure_fails_the_affected_requests_and_serving_goes_on(
    hf_app: tuple[TestClient[Any], FlakyModel, str],
) -> None:
    http, flaky, key = hf_app
    flaky.arm(1)  # the next forward (a prefill) raises
    started = time.monotonic()
    r = tiny_chat(http, key)
    report("engine: failed prefill -> 500", time.monotonic() - started)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert flaky.failures == 0  # the fault hit this request
    flaky.arm(1, after=3)  # a decode step, mid-stream
    r = tiny_chat(http, key, stream=True, max_tokens=40)
    assert r.status_code == 200 and flaky.failures == 0
    assert r.text.count("data: ") >= 3  # the role chunk, tokens, then the error
    assert last_frame(r)["error"]["type"] == "server_error" and "[DONE]" not in r.text
    # Two failed steps in a row, then the fault is gone: serving goes on and the engine stays ready.
    for _ in range(3):
        assert tiny_chat(http, key).status_code == 200
    assert http.get("/readyz").status_code == 200


@pytest.mark.slow
def test_persistent_engine_failure_marks_the_engine_failed(hf_app: tuple[TestClient[Any], FlakyModel, str]) -> None:
    http, flaky, key = hf_app
    flaky.arm(10**9)
    for _ in range(MAX_FAILED_STEPS):
        started = time.monotonic()
        assert tiny_chat(http, key).status_code == 500
        assert time.monotonic() - started < 30
    deadline = time.monotonic() + 5  # the worker gives up right after failing the last request
    while (r := http.get("/readyz")).status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert r.status_code == 503 and r.json()["status"] == "failed"
    assert f"{MAX_FAILED_STEPS} engine steps in a row failed" in r.json()["reason"]
    started = time.monotonic()
    r = tiny_chat(http, key)
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_failed"
    assert "injected forward failure" in r.json()["error"]["message"]
    assert time.monotonic() - started < MARGIN_S


@pytest.mark.slow
def test_engine_worker_death_fails_in_flight_requests_and_readiness(
    hf_app: tuple[TestClient[Any], FlakyModel, str],
) -> None:
    http, flaky, key = hf_app
    flaky.arm(1, after=5, error=Killed("worker killed"))
    started = time.monotonic()
    r = tiny_chat(http, key, stream=True, max_tokens=60)  # in flight when the worker dies
    report("engine: worker death -> in-flight stream ends with an error frame", time.monotonic() - started)
    assert r.status_code == 200 and flaky.failures == 0
    assert r.text.count("data: ") >= 3  # the role chunk, tokens, then the error
    assert last_frame(r)["error"]["type"] == "server_error"
    assert time.monotonic() - started < 30
    r = http.get("/readyz")
    assert r.status_code == 503 and r.json()["status"] == "failed"
    assert "the engine worker stopped: Killed: worker killed" in r.json()["reason"]
    r = tiny_chat(http, key)
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_failed"
