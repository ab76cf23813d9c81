"""`llm-server keys|roles|usage|db` against a real database, as an operator runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from server.cli import main


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    values = {"LLM_SERVER_DATA_DIR": str(tmp_path / "data"), "LLM_SERVER_KEY_PEPPER": "cli-test-pepper-0123456789"}
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)  # no stray .env
    return values


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    main(list(argv))
    return capsys.readouterr().out


def test_keys_roles_usage_db_round_trip(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    made = json.loads(run(capsys, "keys", "create", "--name", "ci", "--json"))
    assert {"id", "name", "role", "key", "prefix", "created_at", "expires_at"} <= set(made)
    assert made["role"] == "default" and made["key"].startswith(made["prefix"]) and made["expires_at"] is None
    human = run(capsys, "keys", "create", "--name", "temp", "--expires-in-days", "3")
    assert human.splitlines()[0].startswith("sk-llm-") and "shown once" in human
    listing = run(capsys, "keys", "list", "--json")
    assert made["key"] not in listing and len(json.loads(listing)) == 2
    assert "active" in run(capsys, "keys", "list")
    role = json.loads(run(capsys, "roles", "create", "team", "--rpm", "5", "--models", "a,b", "--json"))
    assert role["rpm"] == 5 and role["models"] == ["a", "b"] and role["tpm"] is None
    role = json.loads(run(capsys, "roles", "update", "team", "--rpm", "0", "--monthly-tokens", "1000", "--json"))
    assert role["rpm"] is None and role["monthly_tokens"] == 1000 and role["models"] == ["a", "b"]
    names = {r["name"] for r in json.loads(run(capsys, "roles", "list", "--json"))}
    assert names == {"admin", "default", "team"}
    rotated = json.loads(run(capsys, "keys", "rotate", made["id"], "--grace-hours", "2", "--json"))
    assert rotated["key"] != made["key"] and rotated["name"] == "ci"
    revoked = json.loads(run(capsys, "keys", "revoke", rotated["id"], "--json"))
    assert revoked["revoked_at"] is not None
    assert json.loads(run(capsys, "usage", "--json")) == []
    assert "no usage" in run(capsys, "usage", "--month", "2026-01")
    head = run(capsys, "db", "current").strip()
    assert head and head in run(capsys, "db", "history")
    assert "base" in run(capsys, "db", "downgrade", "base")
    assert head in run(capsys, "db", "upgrade")


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["keys", "create", "--name", "x", "--role", "ghost"], "no role named 'ghost'"),
        (["keys", "revoke", "key_nope"], "key_nope"),
        (["roles", "update", "ghost", "--rpm", "1"], "ghost"),
        (["roles", "create", "default"], "already exists"),
        (["roles", "create", "neg", "--rpm", "-1"], "--rpm"),
    ],
)
def test_expected_failures_are_one_line(
    env: dict[str, str], capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and needle in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"LLM_SERVER_DATABASE_URL": "postgresql+asyncpg://postgres@127.0.0.1:1/x"}, "KEY_PEPPER"),
        (
            {
                "LLM_SERVER_DATABASE_URL": "postgresql+asyncpg://postgres:pw@127.0.0.1:1/x",
                "LLM_SERVER_KEY_PEPPER": "p" * 20,
            },
            "unreachable",
        ),
    ],
)
def test_database_problems_are_one_line(tmp_path: Path, extra: dict[str, str], needle: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "server", "keys", "create", "--name", "n"],
        env={"PATH": "/usr/bin:/bin", "LLM_SERVER_DATA_DIR": str(tmp_path), **extra},
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
        timeout=60,
    )
    assert out.returncode != 0
    err = out.stderr.strip()
    assert err.count("\n") == 0, err
    assert needle in err and "Traceback" not in err
    assert ":pw@" not in err  # never print the database password
