"""The exception handler never writes a database error's statement or parameters (request data) to the log."""

from __future__ import annotations

import logging
from typing import Annotated

import msgspec
import pytest
from sqlalchemy import exc as sa_exc

from server.api.exceptions import param_from_path, to_openai_error

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


@pytest.mark.parametrize(
    ("path", "param"),
    [
        (".messages[0].content", "messages[0].content"),
        (".metadata[...]", "metadata"),  # a value of a map: its key is not in the path, the map names it
        (".logit_bias[...]", "logit_bias"),
        (".tools[2].function.parameters[...].x", "tools[2].function.parameters"),
        ("", None),
    ],
)
def test_param_from_path(path: str, param: str | None) -> None:
    assert param_from_path(path) == param


def test_a_map_value_over_its_bound_names_the_map() -> None:
    class Body(msgspec.Struct):
        metadata: dict[str, Annotated[str, msgspec.Meta(max_length=4)]]

    with pytest.raises(msgspec.ValidationError) as caught:
        msgspec.convert({"metadata": {"k": "v" * 5}}, Body)
    err = to_openai_error(caught.value)
    assert (err.status, err.param, err.code) == (400, "metadata", "invalid_value")
    assert err.message.startswith("Invalid value for 'metadata': ")
