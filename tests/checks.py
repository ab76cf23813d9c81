"""Checks of what the app answers and records, shared by test modules: SSE framing, the error envelope, usage
through the admin API and the request-log rows in the SQLite file."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import httpx
from litestar import Litestar
from litestar.testing import TestClient

from server.settings import Settings


def frames(raw: str) -> tuple[list[dict[str, Any]], bool]:
    """The JSON frames of an SSE body and whether it ended with ``[DONE]``; asserts the exact framing."""
    assert raw.endswith("\n\n"), raw[-200:]
    parts = raw[: -len("\n\n")].split("\n\n")
    assert all(p.startswith("data: ") and "\n" not in p for p in parts), parts
    done = parts[-1] == "data: [DONE]"
    assert "data: [DONE]" not in parts[:-1]
    return [json.loads(p[len("data: ") :]) for p in (parts[:-1] if done else parts)], done


def assert_error(r: httpx.Response, status: int, type_: str, code: str | None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == (type_, code), error
    assert r.headers["x-request-id"]
    return dict(error)


def usage_of(http: TestClient[Litestar], admin_key: str, key_name: str) -> dict[str, int]:
    admin = {"Authorization": f"Bearer {admin_key}"}
    keys = http.get("/admin/keys", headers=admin).json()["data"]
    key_id = next(k["id"] for k in keys if k["name"] == key_name)
    rows = http.get("/admin/usage", params={"key": key_id}, headers=admin).json()["data"]
    return {"tokens": rows[0]["tokens"], "requests": rows[0]["requests"]} if rows else {"tokens": 0, "requests": 0}


def log_rows(settings: Settings) -> list[dict[str, Any]]:
    """Every request-log row in the settings' SQLite file, oldest first."""
    con = sqlite3.connect(settings.data_dir / "llm_server.db")
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM request_logs ORDER BY id")]
    finally:
        con.close()
