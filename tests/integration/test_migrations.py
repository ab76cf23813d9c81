"""Migrations on an empty database, drift against the models, seeding, downgrade, concurrency; SQLite and Postgres."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

import migrations
from persistence import migrate, store
from persistence.config import MIGRATIONS_DIR, VERSION_TABLE, create_engine, make_engine_config
from persistence.models import Base

TABLES = {"roles", "api_keys", "usage_monthly", "request_logs", "completion_cache", "applied_writes", "responses"}


def _drift(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE, "compare_type": True})
    diff: list[Any] = compare_metadata(context, Base.metadata)
    return diff


def _tables(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names())


async def _inspect(url: str) -> tuple[set[str], list[Any]]:
    engine = create_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(_tables), await conn.run_sync(_drift)
    finally:
        await engine.dispose()


async def _roles(url: str) -> dict[str, store.RoleRecord]:
    config = make_engine_config(url)
    try:
        async with config.get_session() as session:
            return {r.name: r for r in await store.list_roles(session)}
    finally:
        await config.get_engine().dispose()


@pytest.mark.anyio
async def test_upgrade_drift_seed_downgrade_roundtrip(db_url: str) -> None:
    assert await migrate.current(db_url) is None
    assert await migrate.pending(db_url)

    await migrate.upgrade(db_url, default_role={"rpm": 7, "tpm": 700, "max_concurrency": None})
    tables, drift = await _inspect(db_url)
    assert tables == TABLES | {VERSION_TABLE}
    assert drift == [], f"models and migrations differ: {drift}"
    assert await migrate.current(db_url) == migrate.head()
    assert not await migrate.pending(db_url)

    roles = await _roles(db_url)
    assert set(roles) == {"admin", "default"}
    admin, default = roles["admin"], roles["default"]
    assert admin.is_admin and not default.is_admin
    assert (admin.rpm, admin.tpm, admin.max_concurrency, admin.monthly_tokens, admin.monthly_requests) == (None,) * 5
    assert admin.allowed_models is None and admin.max_tokens is None
    assert (default.rpm, default.tpm, default.max_concurrency) == (7, 700, None)
    assert (default.monthly_tokens, default.monthly_requests, default.allowed_models) == (None, None, None)
    assert default.created_at.tzinfo is not None

    await migrate.upgrade(db_url)  # a no-op: nothing re-seeded, nothing fails
    assert await migrate.current(db_url) == migrate.head()
    assert (await _roles(db_url))["default"].rpm == 7

    await migrate.downgrade(db_url, "base")
    tables, _ = await _inspect(db_url)
    assert tables - {VERSION_TABLE} == set()
    assert await migrate.current(db_url) is None

    await migrate.upgrade(db_url)  # again, now with the built-in defaults for the default role
    default = (await _roles(db_url))["default"]
    assert (default.rpm, default.tpm, default.max_concurrency) == (60, 100_000, 8)
    _, drift = await _inspect(db_url)
    assert drift == []


@pytest.mark.anyio
async def test_concurrent_upgrades_in_one_process(db_url: str) -> None:
    await asyncio.gather(*(migrate.upgrade(db_url) for _ in range(3)))
    assert await migrate.current(db_url) == migrate.head()
    assert sorted(await _roles(db_url)) == ["admin", "default"]


@pytest.mark.anyio
async def test_concurrent_upgrades_from_several_processes(db_url: str) -> None:
    """Replicas starting together with AUTO_MIGRATE: the database lock serializes them, none fails."""
    code = "import asyncio, sys; from persistence import migrate; asyncio.run(migrate.upgrade(sys.argv[1]))"
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, db_url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        for _ in range(3)
    ]
    results = await asyncio.gather(*(p.communicate() for p in procs))
    for proc, (_, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err.decode()
    assert await migrate.current(db_url) == migrate.head()
    assert sorted(await _roles(db_url)) == ["admin", "default"]
    _, drift = await _inspect(db_url)
    assert drift == []


@pytest.mark.anyio
async def test_history_lists_shipped_revisions() -> None:
    history = await migrate.history()
    assert history[-1][0] == "0001"
    assert history[0][0] == migrate.head()
    assert "Initial schema" in history[-1][1]


def test_migrations_found_from_the_package_not_the_cwd(
    sqlite_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Path(migrations.__file__).resolve().parent == MIGRATIONS_DIR
    for name in ("env.py", "script.py.mako", "versions/0001_initial.py"):
        assert (MIGRATIONS_DIR / name).is_file()
    monkeypatch.chdir(tmp_path)
    asyncio.run(migrate.upgrade(sqlite_url))
    assert asyncio.run(migrate.current(sqlite_url)) == migrate.head()
