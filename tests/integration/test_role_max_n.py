"""A role's maximum ``n`` (choices per request): stored, shown and changed by the CLI and ``/admin``, and checked."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from advanced_alchemy.config import SQLAlchemyAsyncConfig
from litestar import Litestar
from litestar.testing import TestClient

from persistence import store
from persistence.records import RoleRecord
from server.admission.gateway import Gateway
from server.auth.principal import Principal
from server.cli import main
from server.engine.fake import FakeEngine
from server.errors import OpenAIError


def principal(max_n: int | None) -> Principal:
    now = datetime(2026, 12, 1, tzinfo=UTC)
    role = RoleRecord(
        name="team",
        rpm=None,
        tpm=None,
        max_concurrency=None,
        monthly_tokens=None,
        monthly_requests=None,
        max_tokens=None,
        max_n=max_n,
        allowed_models=None,
        is_admin=False,
        created_at=now,
        updated_at=now,
    )
    return Principal(key_id="key_0000000000000000", key_name="k", role=role)


def test_check_n_refuses_more_choices_than_the_role_allows() -> None:
    Gateway.check_n(principal(4), 4)
    Gateway.check_n(principal(4), 1)
    with pytest.raises(OpenAIError) as exc:
        Gateway.check_n(principal(4), 5)
    err = exc.value
    assert (err.status, err.type, err.param) == (400, "invalid_request_error", "n")
    assert "5 choices" in err.message and "limit of 4" in err.message
    with pytest.raises(OpenAIError) as exc:
        Gateway.check_n(principal(2), 3, "best_of")
    assert exc.value.param == "best_of" and "'best_of'" in exc.value.message
    Gateway.check_n(principal(None), 10_000)  # no role bound: only the server's own bound applies (elsewhere)


@pytest.mark.anyio
async def test_store_keeps_max_n(db_config: SQLAlchemyAsyncConfig) -> None:
    assert "max_n" in store.LIMIT_FIELDS
    async with db_config.get_session() as session:
        made = await store.create_role(session, "team", max_n=3)
        assert made.max_n == 3
        assert (await store.update_role(session, "team", rpm=5)).max_n == 3  # untouched when not given
        assert (await store.update_role(session, "team", max_n=None)).max_n is None
        assert (await store.update_role(session, "team", max_n=7)).max_n == 7
        with pytest.raises(ValueError, match="max_n"):
            await store.update_role(session, "team", max_n=-1)
        await session.commit()
    async with db_config.get_session() as session:
        got = await store.get_role(session, "team")
        assert got is not None and got.max_n == 7
        assert [r.max_n for r in await store.list_roles(session) if r.name == "default"] == [None]


def test_admin_routes_create_update_and_bound_max_n(
    make_app: Callable[..., Litestar], authed: Callable[[Any], Any]
) -> None:
    with authed(TestClient(make_app(FakeEngine(["ok"])))) as http:
        r = http.post("/admin/roles", json={"name": "team", "max_n": 8})
        assert r.status_code == 201 and r.json()["max_n"] == 8
        assert http.patch("/admin/roles/team", json={"rpm": 3}).json()["max_n"] == 8
        assert http.patch("/admin/roles/team", json={"max_n": None}).json()["max_n"] is None
        for bad in (0, 129, 2**70, "4"):
            r = http.patch("/admin/roles/team", json={"max_n": bad})
            assert r.status_code == 400 and r.json()["error"]["param"] == "max_n", (bad, r.text)
        assert http.patch("/admin/roles/team", json={"max_n": 128}).json()["max_n"] == 128
        listed = {r["name"]: r for r in http.get("/admin/roles").json()["data"]}
        assert listed["team"]["max_n"] == 128 and listed["default"]["max_n"] is None


@pytest.fixture
def env(cli_env: dict[str, str]) -> dict[str, str]:
    return cli_env


def test_cli_roles_max_n(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    main(["roles", "create", "team", "--max-n", "4", "--json"])
    assert json.loads(capsys.readouterr().out)["max_n"] == 4
    main(["roles", "list"])
    lines = {line.split(":")[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "max_n=4" in lines["team"] and "max_n=unlimited" in lines["default"]
    main(["roles", "update", "team", "--max-n", "0", "--json"])  # 0: back to the server's own bound
    assert json.loads(capsys.readouterr().out)["max_n"] is None
    main(["roles", "list", "--json"])
    assert {r["name"]: r["max_n"] for r in json.loads(capsys.readouterr().out)}["team"] is None
    for value, needle in (("129", "--max-n: Expected `int` <= 128"), ("-1", "--max-n must be >= 0")):
        with pytest.raises(SystemExit) as exc:
            main(["roles", "update", "team", "--max-n", value])
        assert exc.value.code == 1
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and needle in err and "Traceback" not in err
