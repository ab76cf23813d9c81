"""The app's database handle: sessions with a bounded wait, and a uniform "unavailable" error."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession

from persistence.config import make_engine_config

T = TypeVar("T")


class DatabaseUnavailable(Exception):
    """The database did not answer in time or refused the connection."""


class Database:
    """Owns the SQLAlchemy config for one app (or one CLI command).

    Args:
        url: SQLAlchemy async URL.
        timeout_s: Longest wait for one operation before :class:`DatabaseUnavailable`.
    """

    def __init__(self, url: str, *, timeout_s: float = 5.0) -> None:
        self.url = url
        self.config = make_engine_config(url)
        self.timeout_s = timeout_s
        # SQLite has one writer at a time. Queueing this process's writes here, instead of letting them spin in
        # SQLite's busy handler (which sleeps up to 100 ms per retry), keeps quota reservations fast under load.
        self._write_lock = asyncio.Lock() if url.startswith("sqlite") else None

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """A fresh session (the caller commits)."""
        async with self.config.get_session() as session:
            yield session

    async def run(
        self, fn: Callable[[AsyncSession], Awaitable[T]], *, timeout_s: float | None = None, write: bool = False
    ) -> T:
        """Run ``fn(session)`` in a fresh session within the timeout; commit on success.

        ``write=True`` marks a transaction that writes, so that on SQLite it waits its turn in this process.
        """

        async def go() -> T:
            async with self.session() as session:
                result = await fn(session)
                await session.commit()
                return result

        if write and self._write_lock is not None:
            inner = go

            async def go() -> T:
                async with self._write_lock:  # type: ignore[union-attr]
                    return await inner()

        try:
            return await asyncio.wait_for(go(), timeout_s or self.timeout_s)
        except (TimeoutError, OSError, ConnectionError, OperationalError, DBAPIError) as exc:
            raise DatabaseUnavailable(f"{type(exc).__name__}: {exc}".splitlines()[0]) from exc

    async def ping(self) -> bool:
        """Whether ``SELECT 1`` answers within the timeout."""

        async def select_one(session: AsyncSession) -> Any:
            return (await session.execute(text("SELECT 1"))).scalar()

        try:
            return bool(await self.run(select_one))
        except DatabaseUnavailable:
            return False

    async def close(self) -> None:
        """Dispose of the connection pool."""
        await self.config.get_engine().dispose()
