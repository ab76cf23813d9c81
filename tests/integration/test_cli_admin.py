"""`llm-server keys|roles|usage|db` against a real database, as an operator runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from litestar.testing import TestClient

from server.app import create_app
from server.auth.keys import generate_key, is_well_formed
from server.cli import main
from server.engine.fake import FakeEngine
from server.settings import Settings
from tests.process import run_cli


@pytest.fixture
def env(cli_env: dict[str, str]) -> dict[str, str]:
    return cli_env


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
    out = run_cli(tmp_path, "keys", "create", "--name", "n", LLM_SERVER_DATA_DIR=str(tmp_path), **extra)
    assert out.returncode != 0
    err = out.stderr.strip()
    assert err.count("\n") == 0, err
    assert needle in err and "Traceback" not in err
    assert ":pw@" not in err  # never print the database password


def test_generate_then_create_from_env_authenticates(
    env: dict[str, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    key = run(capsys, "keys", "generate").strip()
    assert is_well_formed(key) and key != run(capsys, "keys", "generate").strip()
    assert not (Path(env["LLM_SERVER_DATA_DIR"]) / "llm_server.db").exists()  # generate stores nothing
    monkeypatch.setenv("UPSTREAM_KEY", key)
    made = json.loads(
        run(capsys, "keys", "create", "--name", "gateway", "--role", "admin", "--key-env", "UPSTREAM_KEY", "--json")
    )
    assert made["name"] == "gateway" and made["role"] == "admin" and "key" not in made
    assert key.startswith(made["prefix"]) and key.endswith(made["last4"])
    human = run(capsys, "keys", "create", "--name", "gw", "--key-env", "UPSTREAM_KEY", "--if-missing")
    assert "nothing changed" in human and made["id"] in human and key not in human
    again = run(capsys, "keys", "create", "--name", "gw", "--key-env", "UPSTREAM_KEY", "--if-missing", "--json")
    assert json.loads(again)["id"] == made["id"] and "key" not in json.loads(again)
    assert [k["id"] for k in json.loads(run(capsys, "keys", "list", "--json"))] == [made["id"]]
    settings = Settings(data_dir=Path(env["LLM_SERVER_DATA_DIR"]), key_pepper=env["LLM_SERVER_KEY_PEPPER"])
    with TestClient(create_app(settings, engine=FakeEngine(["ok"]))) as http:
        assert http.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert http.get("/admin/keys", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        other = generate_key()
        assert http.get("/v1/models", headers={"Authorization": f"Bearer {other}"}).status_code == 401


def test_create_from_env_prints_no_secret(
    env: dict[str, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    key = generate_key()
    monkeypatch.setenv("MY_KEY", key)
    out = run(capsys, "keys", "create", "--name", "n", "--key-env", "MY_KEY", "--expires-in-days", "2")
    assert out.startswith("created ") and "role=default" in out and "$MY_KEY" in out and key not in out
    assert key not in run(capsys, "keys", "list", "--json")


def _one_line_failure(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        (None, "is not set or empty"),
        ("", "is not set or empty"),
        ("sk-llm-tooshort", "not hold a well-formed llm-server key"),
        ("checksum", "valid checksum"),
        ("whitespace", "whitespace"),
    ],
)
def test_create_from_env_refuses_unset_or_malformed_keys(
    env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    value: str | None,
    needle: str,
) -> None:
    good = generate_key()
    if value == "checksum":  # one character of the body changed: the checksum no longer matches
        value = good[:10] + ("A" if good[10] != "A" else "B") + good[11:]
    elif value == "whitespace":
        value = good + "\n"
    if value is None:
        monkeypatch.delenv("UPSTREAM_KEY", raising=False)
    else:
        monkeypatch.setenv("UPSTREAM_KEY", value)
    err = _one_line_failure(capsys, ["keys", "create", "--name", "gw", "--key-env", "UPSTREAM_KEY", "--if-missing"])
    assert needle in err and "UPSTREAM_KEY" in err
    if value:
        assert value.strip() not in err  # the (almost) secret is never echoed
    assert not (Path(env["LLM_SERVER_DATA_DIR"]) / "llm_server.db").exists()  # refused before any database work


def test_create_from_env_twice_fails_without_if_missing(
    env: dict[str, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    key = generate_key()
    monkeypatch.setenv("UPSTREAM_KEY", key)
    made = json.loads(run(capsys, "keys", "create", "--name", "gw", "--key-env", "UPSTREAM_KEY", "--json"))
    err = _one_line_failure(capsys, ["keys", "create", "--name", "again", "--key-env", "UPSTREAM_KEY"])
    assert "already exists" in err and made["id"] in err and "--if-missing" in err and key not in err
    err = _one_line_failure(capsys, ["keys", "create", "--name", "x", "--if-missing"])
    assert "--key-env" in err
    assert len(json.loads(run(capsys, "keys", "list", "--json"))) == 1


def test_generate_needs_no_database_or_pepper(tmp_path: Path) -> None:
    out = run_cli(
        tmp_path,
        *("keys", "generate"),
        LLM_SERVER_DATA_DIR=str(tmp_path / "data"),
        LLM_SERVER_DATABASE_URL="postgresql+asyncpg://postgres@127.0.0.1:1/x",
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr == "" and out.stdout.count("\n") == 1 and is_well_formed(out.stdout.strip())
    assert not (tmp_path / "data").exists()
