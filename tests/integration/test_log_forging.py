"""Log forging: text from a request can never start a log line of its own, in the console or the JSON format."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from litestar import Litestar

from server.engine.fake import FakeEngine
from server.logs import CONTINUATION, ConsoleFormatter, JSONFormatter, configure_logging, escape_controls
from server.settings import Settings
from tests.live import live_server

FORGED = "2026-01-01 00:00:00,000 INFO    server.access: GET /admin/keys 200 1.0ms req_forged"
# What a client writes in the path: a line break, a carriage return, an ANSI escape, a Unicode line separator.
PATH = "/v1/models/x%0A" + FORGED.replace(" ", "%20") + "%0D%1B[31mred%E2%80%A8tail"


@contextmanager
def captured(formatter: logging.Formatter) -> Iterator[io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield out
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def _assert_clean(text: str) -> None:
    assert "\x1b" not in text and "\r" not in text and "\u2028" not in text
    assert not any(line.startswith(FORGED[:10]) and "req_forged" in line for line in text.splitlines())


@pytest.mark.parametrize("fmt", ["console", "json"])
def test_a_forged_path_is_one_escaped_line_in_every_access_log(fmt: str, settings: Settings, api_key: str) -> None:
    from server.app import create_app

    app: Litestar = create_app(settings, engine=FakeEngine(["ok"]))
    formatter: logging.Formatter = ConsoleFormatter() if fmt == "console" else JSONFormatter()
    with captured(formatter) as out, live_server(app) as base:
        # httpx would re-encode the path: send it as raw bytes so the server receives exactly %0A, %0D, %1B.
        with httpx.Client(base_url=base, timeout=20) as http:
            request = http.build_request("GET", base + "/", headers={"Authorization": f"Bearer {api_key}"})
            request.url = request.url.copy_with(raw_path=PATH.encode())
            response = http.send(request)
        assert response.status_code == 404
    text = out.getvalue()
    _assert_clean(text)
    by_logger: dict[str, list[str]] = {}
    for line in text.splitlines():
        by_logger.setdefault(_logger_of(line, fmt), []).append(line)
    ours, theirs = by_logger.get("server.access", []), by_logger.get("uvicorn.access", [])
    assert len(ours) == 1 and len(theirs) == 1, text  # one request, one line in each access log
    message = json.loads(ours[0])["message"] if fmt == "json" else ours[0]
    assert "x\\n" + FORGED in message and "\\r\\x1b[31mred\\u2028tail 404" in message, message
    assert "x%0A2026" in theirs[0]  # uvicorn's own access line percent-encodes the path


def _logger_of(line: str, fmt: str) -> str:
    if fmt == "json":
        return str(json.loads(line)["logger"])
    match = re.match(r"^\d{4}-\d\d-\d\d \S+ \w+ +(\S+): ", line)
    assert match, f"not a record line: {line!r}"
    return match.group(1)


@pytest.mark.parametrize("fmt", ["console", "json"])
def test_a_forged_header_never_reaches_the_log(fmt: str, settings: Settings, api_key: str) -> None:
    """HTTP parsers refuse control characters in headers; behind one that does not, the request id is replaced."""
    from litestar.testing import TestClient

    from server.app import create_app

    formatter: logging.Formatter = ConsoleFormatter() if fmt == "console" else JSONFormatter()
    forged_id = "id\x1b[2J\n" + FORGED
    with captured(formatter) as out, TestClient(create_app(settings, engine=FakeEngine(["ok"]))) as http:
        r = http.get("/v1/models/x%0D%0Ay", headers={"Authorization": f"Bearer {api_key}", "X-Request-Id": forged_id})
        assert r.status_code == 404 and r.headers["x-request-id"].startswith("req_")
    text = out.getvalue()
    _assert_clean(text)
    access = [line for line in text.splitlines() if _logger_of(line, fmt) == "server.access"]
    assert len(access) == 1 and "req_forged" not in text and r.headers["x-request-id"] in access[0], text
    message = json.loads(access[0])["message"] if fmt == "json" else access[0]
    assert "/v1/models/x\\r\\ny 404" in message, message


@pytest.mark.parametrize("formatter", [ConsoleFormatter(), JSONFormatter()], ids=["console", "json"])
def test_every_part_of_a_record_is_escaped(formatter: logging.Formatter) -> None:
    logger = logging.getLogger("server.test.forging")
    header = "agent\r\n" + FORGED + "\x1b]0;title\x07"
    with captured(formatter) as out:
        logger.warning("bad header %r and %s", "a\nb", header, extra={"model": "m\n" + FORGED, "n": 3})
        try:
            raise ValueError("input was:\n" + FORGED)
        except ValueError:
            logger.exception("failed on %s", "x\x85y")
    text = out.getvalue()
    _assert_clean(text)
    assert "\x85" not in text and "\x07" not in text
    lines = text.splitlines()
    if isinstance(formatter, JSONFormatter):
        assert len(lines) == 2  # one record, one line, traceback included
        first, second = (json.loads(line) for line in lines)
        assert first["message"] == "bad header 'a\\nb' and agent\\r\\n" + FORGED + "\\x1b]0;title\\x07"
        assert first["model"] == "m\\n" + FORGED and first["n"] == 3
        assert second["message"] == "failed on x\\x85y" and "ValueError: input was:" in second["exc_info"]
    else:
        records = [line for line in lines if not line.startswith(CONTINUATION)]
        assert len(records) == 2, text  # every traceback line carries the continuation prefix
        assert records[0].endswith("bad header 'a\\nb' and agent\\r\\n" + FORGED + "\\x1b]0;title\\x07")
        assert records[1].endswith("failed on x\\x85y")
        assert f"{CONTINUATION}ValueError: input was:" in text and f"{CONTINUATION}{FORGED}" in text


def test_the_shared_record_is_not_changed_for_other_handlers() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "a\n%s", ("b\x1b",), None)
    assert ConsoleFormatter().format(record).endswith("x: a\\nb\\x1b")
    assert record.getMessage() == "a\nb\x1b" and record.msg == "a\n%s"


def test_escape_controls_keeps_printable_text() -> None:
    text = "naïve café ✓ \\n tab\there 中文"
    assert escape_controls(text) == "naïve café ✓ \\n tab\\there 中文"
    assert escape_controls("".join(map(chr, range(32)))) == "".join(
        {9: "\\t", 10: "\\n", 13: "\\r"}.get(i, f"\\x{i:02x}") for i in range(32)
    )


def test_configure_logging_uses_the_escaping_formatters(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        for fmt in ("console", "json"):
            configure_logging(fmt, "INFO")
            handler = root.handlers[0]
            assert isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr
            logging.getLogger("uvicorn.error").info("bad request line %s", "GET /\nforged")
            err = capsys.readouterr().err
            assert err.count("\n") == 1, err
            message = json.loads(err)["message"] if fmt == "json" else err
            assert "GET /\\nforged" in message, err
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
