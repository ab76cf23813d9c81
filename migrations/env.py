"""Alembic environment for llm-server.

Two ways in:

* ``persistence.migrate`` (the ``llm-server db`` commands and ``serve`` with ``AUTO_MIGRATE``) runs Alembic inside
  ``AsyncConnection.run_sync`` and hands the sync connection over in ``config.attributes["connection"]``;
* plain ``alembic`` with ``sqlalchemy.url`` set.

Every online run holds a lock for the whole migration so that two processes upgrading at once serialize: a
transaction-scoped advisory lock on PostgreSQL (where DDL is transactional), ``BEGIN IMMEDIATE`` on SQLite (the
database's write lock, so the version check, DDL and seed rows commit or roll back together).
"""

from __future__ import annotations

import asyncio
from contextlib import nullcontext
from typing import Any

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

from persistence.config import VERSION_TABLE, create_engine
from persistence.models import Base

config = context.config

# Arbitrary but fixed 64-bit key ("llm-migr"); every process migrating this database contends on it.
MIGRATION_LOCK_KEY = 0x6C6C6D2D6D696772


def _options() -> dict[str, Any]:
    return {
        "target_metadata": Base.metadata,
        "version_table": VERSION_TABLE,
        "render_as_batch": True,  # SQLite cannot ALTER most things; batch mode copies the table instead.
        "compare_type": True,
    }


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database: set sqlalchemy.url or run through persistence.migrate")
    return url


def _lock(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
    elif connection.dialect.name == "sqlite":
        # The driver has not begun a transaction yet (nothing ran on this connection); take the write lock now.
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def do_run_migrations(connection: Connection) -> None:
    """Run the migrations on ``connection`` in one transaction, under the migration lock."""
    with connection.begin() if not connection.in_transaction() else nullcontext():
        _lock(connection)
        # Configured inside our transaction, Alembic treats it as external and runs everything in it.
        context.configure(connection=connection, **_options())
        context.run_migrations()


async def run_async_migrations() -> None:
    """Connect to ``sqlalchemy.url`` and run the migrations."""
    engine = create_engine(_url(), poolclass=NullPool, busy_timeout_ms=60_000)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
    finally:
        await engine.dispose()


def run_migrations_offline() -> None:
    """Emit the SQL script instead of running it (``--sql``)."""
    context.configure(url=_url(), literal_binds=True, dialect_opts={"paramstyle": "named"}, **_options())
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
elif (shared := config.attributes.get("connection")) is not None:
    do_run_migrations(shared)
else:
    asyncio.run(run_async_migrations())
