"""How the database layer reads asyncpg's own errors (the quota reservation runs on asyncpg directly)."""

from __future__ import annotations

import asyncpg
import pytest

from server.records.database import DatabaseUnavailable, connection_was_dead, describe_error, is_unavailable


def raised_from(exc: BaseException) -> DatabaseUnavailable:
    try:
        raise DatabaseUnavailable(describe_error(exc)) from exc
    except DatabaseUnavailable as wrapped:
        return wrapped


@pytest.mark.parametrize(
    "exc",
    [
        asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator command"),
        asyncpg.exceptions.InterfaceError("cannot call Connection.fetchval(): connection is closed"),
        asyncpg.exceptions.InternalClientError("unexpected state"),
    ],
)
def test_a_connection_the_server_ended_is_unavailable_and_worth_one_retry(exc: Exception) -> None:
    assert is_unavailable(exc) and connection_was_dead(raised_from(exc))


@pytest.mark.parametrize(
    "exc",
    [
        asyncpg.exceptions.ForeignKeyViolationError("insert or update violates foreign key constraint"),
        asyncpg.exceptions.UniqueViolationError("duplicate key value violates unique constraint"),
        asyncpg.exceptions.NumericValueOutOfRangeError("value out of range"),
        asyncpg.exceptions.UndefinedTableError("relation does not exist"),
    ],
)
def test_a_statement_the_database_refuses_is_its_own_error_and_names_no_value(exc: Exception) -> None:
    assert not is_unavailable(exc) and not connection_was_dead(exc)
    described = describe_error(exc)
    assert described.startswith(type(exc).__name__) and "SQLSTATE" in described and "constraint" not in described


def test_a_server_that_cannot_answer_now_is_unavailable_but_no_dead_connection() -> None:
    exc = asyncpg.exceptions.TooManyConnectionsError("sorry, too many clients already")  # 53300
    assert is_unavailable(exc) and not connection_was_dead(raised_from(exc))
