"""The app's database handle: sessions with a bounded wait, and a uniform "unavailable" error.

A write that times out is abandoned, not undone: its task is cancelled, but a cancellation that lands during
``COMMIT`` (or a server that received ``COMMIT`` just before a network partition) still commits. So "unavailable"
after a write means "the outcome is unknown"; callers that retry make their writes idempotent (an id recorded in
``applied_writes`` in the same transaction, see ``persistence.usage``).

Log lines name errors with :func:`describe_error` only: SQLAlchemy's ``str(exc)`` carries the statement and its
parameters (prompt text, key digests), and driver messages may quote values.
"""

from __future__ import annotations

import asyncio
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from sqlalchemy import exc as sa_exc
from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from persistence.config import make_engine_config

T = TypeVar("T")

RAW_POOL_SIZE = 16
"""Connections of :meth:`Database.fetch_value`'s pool (PostgreSQL)."""


async def _nothing_to_reset(connection: Any) -> None:
    """The reset of a connection :meth:`Database.fetch_value` gives back to its pool: nothing beyond asyncpg's own.

    asyncpg's default sends a reset query (``RESET ALL``, ``UNLISTEN *``, ``CLOSE ALL``, advisory unlocks) each
    time a connection goes back to the pool: a second round trip for every quota reservation (measured here:
    ~0.2 ms of the ~0.37 ms a statement took, and half its CPU). The pool's connections only ever run
    ``fetch_value``'s single autocommit statements, which leave no session state, cursor, listener or lock behind;
    asyncpg still rolls back an open transaction and drops listeners itself before calling this.
    """


class DatabaseUnavailable(Exception):
    """The database did not answer in time or refused the connection."""


# Errors that say the database could not be reached or could not do the work now (down, restarting, locked,
# connection lost, pool exhausted): retrying later can succeed. Integrity, data and programming errors are
# excluded: they are the statement's fault and would fail again, so they surface as what they are.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    TimeoutError,
    OSError,
    sa_exc.TimeoutError,
    sa_exc.DisconnectionError,
    sa_exc.DBAPIError,
)
_NOT_UNAVAILABLE: tuple[type[BaseException], ...] = (
    sa_exc.IntegrityError,
    sa_exc.DataError,
    sa_exc.ProgrammingError,
    sa_exc.NotSupportedError,
)


def is_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` means "the database cannot answer now" rather than "this statement is wrong"."""
    if type(exc).__module__.startswith("asyncpg"):  # raised by asyncpg itself (Database.fetch_value)
        return _sqlstate_class(exc) not in _STATEMENT_CLASSES
    return (
        isinstance(exc, _UNAVAILABLE)
        and not isinstance(exc, _NOT_UNAVAILABLE)
        and _sqlstate_class(exc) not in _STATEMENT_CLASSES
    )


# SQLSTATE classes that blame the statement or its values, whatever exception class the driver wraps them in:
# 22 data exception, 23 integrity constraint violation, 42 syntax error or access rule violation.
_STATEMENT_CLASSES = frozenset({"22", "23", "42"})


def _sqlstate(exc: BaseException) -> str | None:
    seen: BaseException | None = exc
    while seen is not None:
        state = getattr(getattr(seen, "orig", None), "sqlstate", None) or getattr(seen, "sqlstate", None)
        if isinstance(state, str) and len(state) == 5:
            return state
        seen = seen.__cause__
    return None


def _sqlstate_class(exc: BaseException) -> str | None:
    state = _sqlstate(exc)
    return state[:2] if state else None


def describe_error(exc: BaseException) -> str:
    """A log-safe name for ``exc``: its class, the driver's class, the SQLSTATE (or SQLite's error name).

    Never the message of a database error: SQLAlchemy appends the statement and its parameters, and drivers quote
    values (``DETAIL: Key (id)=(...)``). Operating-system errors (connection refused, host unreachable) keep their
    message, which names no data.
    """
    if isinstance(exc, DatabaseUnavailable):
        return str(exc)
    parts = [type(exc).__name__]
    orig = getattr(exc, "orig", None)
    if isinstance(orig, BaseException):
        parts.append(f"from {type(orig).__name__}")
        if (name := getattr(orig, "sqlite_errorname", None)) is not None:
            parts.append(str(name))
    if (state := _sqlstate(exc)) is not None:
        parts.append(f"SQLSTATE {state}")
    if isinstance(exc, OSError | TimeoutError) and not isinstance(exc, sa_exc.SQLAlchemyError) and str(exc):
        parts.append(f"({str(exc).splitlines()[0][:200]})")
    return " ".join(parts)


def error_location(exc: BaseException) -> str:
    """Where ``exc`` was raised (`` at file:line in function``): a location without the message, which may quote
    values; ``""`` when it has no traceback."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    last = frames[-1]
    return f" at {last.filename.rsplit('/', 1)[-1]}:{last.lineno} in {last.name}"


def is_data_exception(exc: BaseException) -> bool:
    """A database *data exception* (SQLSTATE class 22) anywhere in ``exc``'s causes.

    The statements are fixed, so such an error means a value from the request does not fit its column: a NUL
    character in text or a string over the column's length on PostgreSQL, a number out of range. asyncpg reports
    them as a plain ``DBAPIError`` (not ``DataError``), so the class is read from the SQLSTATE, not the type.
    """
    return _sqlstate_class(exc) == "22"


class Database:
    """Owns the SQLAlchemy config for one app (or one CLI command).

    Every operation is bounded by ``timeout_s``: a database that refuses connections, restarts, holds a lock or
    stops answering (a network partition) costs a caller at most that long, then :class:`DatabaseUnavailable`.
    The drivers' own waits are set to the same bound (PostgreSQL connect timeout, SQLite busy timeout), and the
    pool pings a connection before handing it out (PostgreSQL), so a database that comes back is used again
    without a restart.

    Args:
        url: SQLAlchemy async URL.
        timeout_s: Longest wait for one operation before :class:`DatabaseUnavailable`.
    """

    def __init__(self, url: str, *, timeout_s: float = 5.0) -> None:
        self.url = url
        self.config = make_engine_config(url, connect_timeout_s=timeout_s, busy_timeout_ms=int(timeout_s * 1000))
        self.timeout_s = timeout_s
        # SQLite has one writer at a time. Queueing this process's writes here, instead of letting them spin in
        # SQLite's busy handler (which sleeps up to 100 ms per retry), keeps quota reservations fast under load.
        self._write_lock = asyncio.Lock() if url.startswith("sqlite") else None
        self._abandoned: set[asyncio.Task[Any]] = set()
        self._autocommit: AsyncEngine | None = None
        self._raw: Any = None  # asyncpg pool for fetch_value, made on first use
        self._raw_made = asyncio.Lock()
        if url.startswith("postgresql"):
            self._autocommit = self.config.get_engine().execution_options(isolation_level="AUTOCOMMIT")

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """A fresh session (the caller commits)."""
        async with self.config.get_session() as session:
            yield session

    async def run(
        self,
        fn: Callable[[AsyncSession], Awaitable[T]],
        *,
        timeout_s: float | None = None,
        write: bool = False,
        single_statement: bool = False,
    ) -> T:
        """Run ``fn(session)`` in a fresh session within the timeout; commit on success.

        ``write=True`` marks a transaction that writes, so that on SQLite it waits its turn in this process.
        ``single_statement=True`` promises that ``fn`` runs one statement that is atomic by itself: on PostgreSQL it
        then runs in autocommit mode, without the ``BEGIN`` and ``COMMIT`` round trips (and without a transaction
        left open on the server if the connection is cut before ``COMMIT``); elsewhere it is a transaction as usual.

        Raises:
            DatabaseUnavailable: the database did not answer within the timeout, refused the connection, lost it,
                or is locked; the caller may retry later. After a write, its outcome is unknown: it may have
                committed (see the module docstring).
        """

        async def go() -> T:
            if single_statement and self._autocommit is not None:
                async with AsyncSession(self._autocommit, expire_on_commit=False) as session:
                    return await fn(session)
            async with self.session() as session:
                result = await fn(session)
                await session.commit()
                return result

        async def go_in_turn() -> T:
            assert self._write_lock is not None
            async with self._write_lock:
                return await go()

        return await self._within(go_in_turn() if write and self._write_lock is not None else go(), timeout_s)

    async def fetch_value(self, sql: str, args: Sequence[Any], *, timeout_s: float | None = None) -> Any:
        """PostgreSQL: run ``sql``, one statement atomic by itself, in autocommit on an asyncpg connection of a pool
        of its own, and return the first column of its first row.

        For the statement every metered request runs (the quota reservation): SQLAlchemy's session, pool checkout
        and result layers cost several times what asyncpg does for the statement itself (measured here: about
        0.8 ms of CPU through a session, 0.1 ms with asyncpg). Connections are not pinged first; one found closed
        fails the statement (``DatabaseUnavailable``, :func:`connection_was_dead`): retry once.

        Raises:
            DatabaseUnavailable: as :meth:`run`.
        """

        async def go() -> Any:
            pool = await self._raw_pool()
            async with pool.acquire() as conn:
                return await conn.fetchval(sql, *args)

        return await self._within(go(), timeout_s)

    async def _raw_pool(self) -> Any:
        if self._raw is None:
            async with self._raw_made:
                if self._raw is None:
                    import asyncpg  # the PostgreSQL driver: installed with the server, imported only when used

                    # The connection arguments SQLAlchemy's asyncpg dialect derives from the URL (its query's
                    # ssl, server_settings, ...), as its own pool connects; its statement cache size is asyncpg's.
                    dialect = self.config.get_engine().dialect
                    _, params = dialect.create_connect_args(make_url(self.url))
                    params.pop("prepared_statement_name_func", None)
                    params.pop("async_creator_fn", None)
                    if "prepared_statement_cache_size" in params:
                        params["statement_cache_size"] = params.pop("prepared_statement_cache_size")
                    params.setdefault("timeout", self.timeout_s)
                    self._raw = await asyncpg.create_pool(
                        min_size=0, max_size=RAW_POOL_SIZE, reset=_nothing_to_reset, **params
                    )
        return self._raw

    async def _within(self, operation: Awaitable[T], timeout_s: float | None) -> T:
        """Await ``operation`` at most ``timeout_s`` (the database's timeout); its failures as :meth:`run` says."""
        limit = timeout_s or self.timeout_s
        task = asyncio.ensure_future(operation)
        try:
            done, _ = await asyncio.wait({task}, timeout=limit)
        except asyncio.CancelledError:
            self._abandon(task)
            raise
        if not done:
            # Not ``wait_for``: it waits for the cancelled operation to finish cleaning up, and closing a connection
            # to a server that stopped answering takes the driver's own timeout (measured: 2 s more with asyncpg).
            self._abandon(task)
            raise DatabaseUnavailable(f"no answer from the database within {limit:g}s")
        try:
            return task.result()
        except Exception as exc:
            if is_unavailable(exc):
                raise DatabaseUnavailable(describe_error(exc)) from exc
            raise

    def _abandon(self, task: asyncio.Task[Any]) -> None:
        """Cancel ``task`` and let it clean up in the background (its outcome is dropped)."""
        task.cancel()
        self._abandoned.add(task)
        task.add_done_callback(_forget(self._abandoned))

    async def ping(self) -> bool:
        """Whether ``SELECT 1`` answers within the timeout."""

        async def select_one(session: AsyncSession) -> Any:
            return (await session.execute(text("SELECT 1"))).scalar()

        try:
            return bool(await self.run(select_one))
        except DatabaseUnavailable:
            return False

    async def close(self) -> None:
        """Dispose of the connection pool (after giving abandoned operations a moment to clean up)."""
        if self._abandoned:
            await asyncio.wait(set(self._abandoned), timeout=self.timeout_s)
        await self.config.get_engine().dispose()
        if self._raw is not None:
            try:  # waits for every connection to come back: one stuck on a frozen server never does
                await asyncio.wait_for(self._raw.close(), self.timeout_s)
            except TimeoutError:
                self._raw.terminate()


def connection_was_dead(exc: BaseException) -> bool:
    """Whether ``exc`` (from :meth:`Database.run` or :meth:`Database.fetch_value`) came from a connection the
    driver found closed, now discarded."""
    seen: BaseException | None = exc
    while seen is not None:
        if getattr(seen, "connection_invalidated", False) or _closed_connection(seen):
            return True
        seen = seen.__cause__
    return False


def _closed_connection(exc: BaseException) -> bool:
    """asyncpg's own errors of a pooled connection the server closed meanwhile (a retry on a new one may work)."""
    kind = type(exc)
    if not kind.__module__.startswith("asyncpg"):
        return False
    state = getattr(exc, "sqlstate", None)
    # 08: connection exception (08003: the connection does not exist); 57P01/57P02: the server ended it (shutdown,
    # pg_terminate_backend) and told the client so first.
    if isinstance(state, str) and (state.startswith("08") or state in ("57P01", "57P02")):
        return True
    # asyncpg's client-side errors on a connection the server ended while it sat in the pool (seen: "connection is
    # closed", "connection was closed in the middle of operation", and an internal protocol error).
    return kind.__name__ in ("ConnectionDoesNotExistError", "InterfaceError", "InternalClientError")


def _forget(tasks: set[asyncio.Task[Any]]) -> Callable[[asyncio.Task[Any]], None]:
    def done(task: asyncio.Task[Any]) -> None:
        tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved, so asyncio does not log "exception was never retrieved"

    return done
