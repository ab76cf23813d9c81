"""LOG_FORMAT=json gives one JSON object per line."""

from __future__ import annotations

import json
import logging

import pytest

from server.logs import JSONFormatter, configure_logging


def test_json_formatter_one_object_per_record() -> None:
    record = logging.LogRecord("server", logging.WARNING, __file__, 1, "hello %s", ("world",), None)
    record.request_id = "req_1"
    line = JSONFormatter().format(record)
    obj = json.loads(line)
    assert obj["message"] == "hello world"
    assert obj["level"] == "WARNING"
    assert obj["request_id"] == "req_1"
    assert obj["timestamp"].endswith("Z")
    assert "\n" not in line


def test_configure_routes_uvicorn_through_the_root_handler(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        configure_logging("json", "INFO")
        logging.getLogger("uvicorn.error").info("started")
        err = capsys.readouterr().err.strip().splitlines()
        assert json.loads(err[-1])["logger"] == "uvicorn.error"
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
