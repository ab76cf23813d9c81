"""Database helpers for tests: fresh SQLite files, throw-away PostgreSQL databases, migrated configs.

PostgreSQL runs for real only when ``LLM_SERVER_TEST_POSTGRES_URL`` names a server (any database on it, e.g.
``postgresql+asyncpg://postgres@127.0.0.1:5432/test``); each test then gets its own database, created through
the server's ``postgres`` database and dropped afterwards.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
from advanced_alchemy.config import SQLAlchemyAsyncConfig
from sqlalchemy.engine import URL, make_url

from persistence.config import make_engine_config
from persistence.migrate import upgrade

POSTGRES_ENV = "LLM_SERVER_TEST_POSTGRES_URL"
"""Environment variable naming the PostgreSQL server the tests may create databases on."""
DB_PREFIX = "llm_server_test_"


def postgres_server_url() -> str | None:
    """The PostgreSQL URL from the environment, or ``None`` when PostgreSQL tests should skip."""
    return os.environ.get(POSTGRES_ENV) or None


def sqlite_url_for(path: Path) -> str:
    """An aiosqlite URL for the database file ``path`` (its folder is created on first connect)."""
    return f"sqlite+aiosqlite:///{path}"


def _asyncpg_kwargs(url: URL, database: str) -> dict[str, Any]:
    return {
        "user": url.username,
        "password": url.password,
        "host": url.host or "127.0.0.1",
        "port": url.port or 5432,
        "database": database,
        "timeout": 10,
    }


async def create_postgres_database(server_url: str) -> str:
    """Create an empty database ``llm_server_test_<hex>`` on ``server_url``'s server and return its URL."""
    url = make_url(server_url)
    name = DB_PREFIX + secrets.token_hex(6)
    conn = await asyncpg.connect(**_asyncpg_kwargs(url, "postgres"))
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return url.set(drivername="postgresql+asyncpg", database=name).render_as_string(hide_password=False)


async def drop_postgres_database(db_url: str) -> None:
    """Drop a database made by :func:`create_postgres_database`, disconnecting anyone still on it."""
    url = make_url(db_url)
    name = url.database or ""
    if not name.startswith(DB_PREFIX):
        raise ValueError(f"refusing to drop {name!r}: not a test database")
    conn = await asyncpg.connect(**_asyncpg_kwargs(url, "postgres"))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def run_sync(coro: Any) -> Any:
    """Run a coroutine from synchronous fixture code (outside any running event loop)."""
    return asyncio.run(coro)


@asynccontextmanager
async def migrated_config(url: str, **default_role: int | None) -> AsyncIterator[SQLAlchemyAsyncConfig]:
    """Upgrade ``url`` to head and yield its engine config; the engine is disposed on exit."""
    await upgrade(url, default_role=default_role or None)
    config = make_engine_config(url)
    try:
        yield config
    finally:
        await config.get_engine().dispose()
