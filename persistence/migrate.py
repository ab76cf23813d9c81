"""Alembic, programmatically: what ``llm-server db ...`` and ``serve`` (with ``AUTO_MIGRATE``) call.

Each call opens its own short-lived engine (no pool), runs Alembic's command inside
``AsyncConnection.run_sync`` and disposes the engine, so it is safe to call before the app's engine exists.
Concurrent upgrades from several processes serialize on a database lock taken in ``migrations/env.py``; the
loser finds the database at head and does nothing. Within one process Alembic's ``context``/``op`` proxies are
module globals, so calls on the same event loop are serialized here too.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Mapping
from typing import TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

from persistence.config import MIGRATIONS_DIR, VERSION_TABLE, create_engine

__all__ = ("alembic_config", "current", "downgrade", "head", "history", "pending", "upgrade")

T = TypeVar("T")

# Migrations wait this long for another process's migration (SQLite write lock) instead of failing.
_MIGRATION_BUSY_TIMEOUT_MS = 60_000


def alembic_config(
    connection: Connection | None = None, *, default_role: Mapping[str, int | None] | None = None
) -> Config:
    """An Alembic ``Config`` for the packaged ``migrations`` scripts (no ``alembic.ini`` needed).

    Args:
        connection: A sync connection ``env.py`` should migrate instead of connecting itself.
        default_role: ``{"rpm", "tpm", "max_concurrency"}`` of the ``default`` role seeded by the first migration.
    """
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    if default_role is not None:
        config.attributes["default_role"] = dict(default_role)
    return config


_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()


def _alembic_lock() -> asyncio.Lock:
    loop = asyncio.get_running_loop()
    lock = _locks.get(loop)
    if lock is None:
        lock = _locks[loop] = asyncio.Lock()
    return lock


async def _with_connection(url: str, fn: Callable[[Connection], T]) -> T:
    engine = create_engine(url, poolclass=NullPool, busy_timeout_ms=_MIGRATION_BUSY_TIMEOUT_MS)
    try:
        async with _alembic_lock(), engine.connect() as connection:
            return await connection.run_sync(fn)
    finally:
        await engine.dispose()


async def upgrade(url: str, revision: str = "head", *, default_role: Mapping[str, int | None] | None = None) -> None:
    """Upgrade the database at ``url`` to ``revision``; a no-op when it is already there.

    Args:
        url: SQLAlchemy async database URL.
        revision: Target revision (``head`` by default).
        default_role: Limits of the seeded ``default`` role (``rpm``, ``tpm``, ``max_concurrency``; ``None``
            values mean unlimited); 60 / 100000 / 8 when not given. Only the initial migration reads it.
    """

    def run(connection: Connection) -> None:
        command.upgrade(alembic_config(connection, default_role=default_role), revision)

    await _with_connection(url, run)


async def downgrade(url: str, revision: str) -> None:
    """Downgrade the database at ``url`` to ``revision`` (``base`` drops every table)."""

    def run(connection: Connection) -> None:
        command.downgrade(alembic_config(connection), revision)

    await _with_connection(url, run)


def _current_heads(connection: Connection) -> tuple[str, ...]:
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return tuple(context.get_current_heads())


async def current(url: str) -> str | None:
    """The revision the database is at, or ``None`` for an unmigrated database."""
    heads = await _with_connection(url, _current_heads)
    return ",".join(heads) if heads else None


def head() -> str:
    """The newest revision shipped with this version of the package."""
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    return ",".join(heads)


async def history(url: str | None = None) -> list[tuple[str, str]]:
    """``(revision, message)`` of every shipped migration, newest first (as ``alembic history`` lists them).

    The list comes from the packaged scripts; ``url`` is accepted for symmetry and not used.
    """
    del url
    script = ScriptDirectory.from_config(alembic_config())
    return [(rev.revision, (rev.doc or "").strip()) for rev in script.walk_revisions()]


async def pending(url: str) -> bool:
    """Whether the database at ``url`` is behind the shipped head (an empty database is)."""
    script = ScriptDirectory.from_config(alembic_config())
    heads = await _with_connection(url, _current_heads)
    return set(heads) != set(script.get_heads())
