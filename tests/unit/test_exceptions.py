"""The exception handler never writes a database error's statement or parameters (request data) to the log."""

from __future__ import annotations

import logging

import pytest
from sqlalchemy import exc as sa_exc

from server.api.exceptions import to_openai_error

SECRET = "tenant-prompt-text-4711"


class FakeDriverError(Exception):
    sqlstate = "23505"


@pytest.mark.parametrize(
    "error",
    [
        sa_exc.IntegrityError(
            "INSERT INTO request_logs (prompt_text) VALUES (?)",
            {"prompt_text": SECRET},
            FakeDriverError(f"Key (x)=({SECRET})"),
        ),
        sa_exc.ProgrammingError("SELECT ?", (SECRET,), FakeDriverError(SECRET)),
        sa_exc.DataError("INSERT ... VALUES (?)", (SECRET,), type("E", (Exception,), {"sqlstate": "22021"})(SECRET)),
    ],
    ids=["integrity", "programming", "data"],
)
def test_database_errors_are_logged_without_their_values(error: Exception, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        try:
            raise error
        except Exception as raised:
            err = to_openai_error(raised)
    assert err.status in (400, 500)
    assert SECRET not in err.message
    assert caplog.records, "the error is logged"
    for record in caplog.records:
        text = record.getMessage() + (logging.Formatter().formatException(record.exc_info) if record.exc_info else "")
        assert SECRET not in text and "parameters" not in text


def test_other_unhandled_errors_keep_their_traceback(caplog: pytest.LogCaptureFixture) -> None:
    try:
        raise ValueError("a bug")
    except ValueError as raised:
        err = to_openai_error(raised)
    assert err.status == 500
    assert caplog.records[-1].exc_info is not None


def test_a_recursion_error_left_anywhere_is_a_400_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    err = to_openai_error(RecursionError("maximum recursion depth exceeded"))
    assert (err.status, err.code) == (400, "invalid_json")
    assert any("nested too deeply" in r.getMessage() for r in caplog.records)
