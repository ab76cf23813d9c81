"""The database engine and session config: one engine per URL with SQLite and PostgreSQL tuned for a server.

SQLite gets WAL (readers never block the writer), a busy timeout (writers queue instead of failing with
"database is locked") and foreign keys, and a new database file is created 0600 before SQLite opens it
(``persistence.private``); PostgreSQL gets a connect timeout and pre-ping so an unreachable or restarted database
fails a request in seconds instead of hanging it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from advanced_alchemy.config import AsyncSessionConfig, SQLAlchemyAsyncConfig
from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from persistence.private import private_dir, private_sqlite_file

__all__ = (
    "MIGRATIONS_DIR",
    "VERSION_TABLE",
    "create_engine",
    "make_engine_config",
)


def _migrations_dir() -> Path:
    # Located, not imported: the scripts (``migrations/env.py``) import this package, never the other way round.
    spec = importlib.util.find_spec("migrations")
    if spec is None or spec.origin is None:
        raise RuntimeError("the 'migrations' package is not installed")
    return Path(spec.origin).resolve().parent


MIGRATIONS_DIR = _migrations_dir()
"""The Alembic script location, found from the installed ``migrations`` package (never the CWD)."""
VERSION_TABLE = "alembic_versions"
"""Alembic's version table."""

DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_BUSY_TIMEOUT_MS = 5000


def _sqlite_file(url: URL) -> Path | None:
    database = url.database
    if database and database != ":memory:" and not database.startswith("file:"):
        return Path(database).expanduser()
    return None


def _prepare_sqlite_folder(path: Path) -> None:
    if not path.parent.exists():
        private_dir(path.parent, "the database folder")


def _create_sqlite_file_privately(engine: AsyncEngine, path: Path) -> None:
    """Before each new connection: a missing database file is created 0600 first, so SQLite never creates it with
    the umask's mode (building an engine alone creates no file)."""

    @event.listens_for(engine.sync_engine, "do_connect")
    def _before_connect(*_: Any) -> None:
        private_sqlite_file(path)


def create_engine(
    database_url: str,
    *,
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
    command_timeout_s: float | None = None,
    **kwargs: Any,
) -> AsyncEngine:
    """Create an async engine with the per-dialect settings described in the module docstring.

    Args:
        database_url: SQLAlchemy async URL (``sqlite+aiosqlite://…`` or ``postgresql+asyncpg://…``).
        connect_timeout_s: Longest wait for a new PostgreSQL connection.
        busy_timeout_ms: How long a SQLite writer waits for the write lock before failing.
        command_timeout_s: PostgreSQL (asyncpg) default timeout of each statement; ``None``: no limit.
        **kwargs: Passed on to :func:`sqlalchemy.ext.asyncio.create_async_engine`.
    """
    url = make_url(database_url)
    backend = url.get_backend_name()
    connect_args: dict[str, Any] = dict(kwargs.pop("connect_args", None) or {})
    sqlite_file: Path | None = None
    if backend == "sqlite":
        sqlite_file = _sqlite_file(url)
        if sqlite_file is not None:
            _prepare_sqlite_folder(sqlite_file)
        # The driver's own busy handler (seconds) covers the connect itself; the PRAGMA below the rest.
        connect_args.setdefault("timeout", busy_timeout_ms / 1000)
    elif backend == "postgresql":
        kwargs.setdefault("pool_pre_ping", True)
        if url.get_driver_name() == "asyncpg":
            connect_args.setdefault("timeout", connect_timeout_s)
            if command_timeout_s is not None:
                connect_args.setdefault("command_timeout", command_timeout_s)
    engine = create_async_engine(url, connect_args=connect_args, **kwargs)
    if backend == "sqlite":
        _install_sqlite_pragmas(engine, busy_timeout_ms)
    if sqlite_file is not None:
        _create_sqlite_file_privately(engine, sqlite_file)
    return engine


def _install_sqlite_pragmas(engine: AsyncEngine, busy_timeout_ms: int) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            # busy_timeout first: switching to WAL needs a lock another connection may briefly hold.
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()


def make_engine_config(
    database_url: str,
    *,
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
    command_timeout_s: float | None = None,
    **engine_kwargs: Any,
) -> SQLAlchemyAsyncConfig:
    """An engine (:func:`create_engine`) and its session factory: ``get_session()``, ``get_engine()``.

    ``async with config.get_session() as session: ...`` (commit it yourself); ``await config.get_engine().dispose()``
    when done. Sessions do not expire objects on commit, so loaded attributes stay readable without another round
    trip. Migrations run through :mod:`persistence.migrate`, not through this config.

    Args:
        database_url: SQLAlchemy async URL.
        connect_timeout_s: Longest wait for a new PostgreSQL connection.
        busy_timeout_ms: How long a SQLite writer waits for the write lock.
        command_timeout_s: PostgreSQL default timeout of each statement; ``None``: no limit.
        **engine_kwargs: Extra :func:`create_async_engine` arguments (``pool_size``, ``echo``, ...).
    """
    engine = create_engine(
        database_url,
        connect_timeout_s=connect_timeout_s,
        busy_timeout_ms=busy_timeout_ms,
        command_timeout_s=command_timeout_s,
        **engine_kwargs,
    )
    return SQLAlchemyAsyncConfig(engine_instance=engine, session_config=AsyncSessionConfig(expire_on_commit=False))
