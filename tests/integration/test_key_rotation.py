"""Key rotation: a key is rotated once, so a retired key never comes back and its grace deadline never moves."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from advanced_alchemy.config import SQLAlchemyAsyncConfig
from litestar import Litestar
from litestar.testing import TestClient

from persistence import store
from persistence.keys import AlreadyRotated
from server.cli import main
from server.engine.fake import FakeEngine
from server.settings import Settings
from tests.conftest import bearer

T0 = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def test_http_rotate_twice_is_refused_and_the_retired_key_stays_retired(
    make_app: Callable[..., Litestar], authed: Callable[[Any], Any]
) -> None:
    with authed(TestClient(make_app(FakeEngine(["ok"])))) as http:
        old = http.post("/admin/keys", json={"name": "victim"}).json()
        first = http.post(f"/admin/keys/{old['id']}/rotate", json={"grace_hours": 0})
        assert first.status_code == 201, first.text
        assert http.get("/v1/models", headers=bearer(old["key"])).status_code == 401  # grace 0: retired at once

        again = http.post(f"/admin/keys/{old['id']}/rotate", json={"grace_hours": 24})
        assert again.status_code == 400, again.text
        err = again.json()["error"]
        assert err["type"] == "invalid_request_error" and err["code"] == "key_already_rotated"
        assert err["param"] == "key_id" and first.json()["id"] in err["message"]
        assert http.get("/v1/models", headers=bearer(old["key"])).status_code == 401  # still retired
        assert http.get("/v1/models", headers=bearer(first.json()["key"])).status_code == 200

        listed = {k["id"]: k for k in http.get("/admin/keys").json()["data"]}
        assert listed[old["id"]]["replaced_by_id"] == first.json()["id"]
        assert len(listed) == 3  # the test key, the old key, its one replacement: the refused rotation made none


def test_http_rotate_during_the_grace_period_cannot_extend_it(
    make_app: Callable[..., Litestar], authed: Callable[[Any], Any]
) -> None:
    with authed(TestClient(make_app(FakeEngine(["ok"])))) as http:
        old = http.post("/admin/keys", json={"name": "victim"}).json()
        first = http.post(f"/admin/keys/{old['id']}/rotate", json={"grace_hours": 1}).json()
        grace = {k["id"]: k for k in http.get("/admin/keys").json()["data"]}[old["id"]]["grace_until"]
        for hours in (1000, 0.5):  # neither longer nor shorter: the deadline is set once
            r = http.post(f"/admin/keys/{old['id']}/rotate", json={"grace_hours": hours})
            assert r.status_code == 400 and r.json()["error"]["code"] == "key_already_rotated"
        assert {k["id"]: k for k in http.get("/admin/keys").json()["data"]}[old["id"]]["grace_until"] == grace
        assert http.get("/v1/models", headers=bearer(old["key"])).status_code == 200  # within its grace
        # The replacement itself can be rotated (once).
        assert http.post(f"/admin/keys/{first['id']}/rotate", json={"grace_hours": 0}).status_code == 201


@pytest.fixture
def env(cli_env: dict[str, str]) -> dict[str, str]:
    return cli_env


def test_cli_rotate_twice_fails_in_one_line_and_the_retired_key_stays_retired(
    env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    main(["keys", "create", "--name", "victim", "--json"])
    old = json.loads(capsys.readouterr().out)
    main(["keys", "rotate", old["id"], "--grace-hours", "0", "--json"])
    new = json.loads(capsys.readouterr().out)
    with pytest.raises(SystemExit) as exc:
        main(["keys", "rotate", old["id"], "--grace-hours", "24"])
    assert exc.value.code == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert captured.out == "" and err.count("\n") == 0 and "Traceback" not in err
    assert "already rotated" in err and new["id"] in err
    main(["keys", "list", "--json"])
    keys = {k["id"]: k for k in json.loads(capsys.readouterr().out)}
    assert len(keys) == 2 and keys[old["id"]]["replaced_by_id"] == new["id"]

    from server.app import create_app

    settings = Settings(data_dir=Path(env["LLM_SERVER_DATA_DIR"]), key_pepper=env["LLM_SERVER_KEY_PEPPER"])
    with TestClient(create_app(settings, engine=FakeEngine(["ok"]))) as http:
        assert http.get("/v1/models", headers=bearer(old["key"])).status_code == 401
        assert http.get("/v1/models", headers=bearer(new["key"])).status_code == 200


async def _key(config: SQLAlchemyAsyncConfig, key_id: str) -> None:
    async with config.get_session() as session:
        await store.insert_key(
            session,
            id=key_id,
            name="k",
            prefix="sk-test",
            last4="abcd",
            digest=key_id.ljust(64, "0"),
            role_name="default",
            expires_at=None,
        )
        await session.commit()


@pytest.mark.anyio
async def test_mark_rotated_is_once_even_when_two_rotations_race(db_config: SQLAlchemyAsyncConfig) -> None:
    for key_id in ("key_old0000000000000", "key_new1000000000000", "key_new2000000000000"):
        await _key(db_config, key_id)
    async with db_config.get_session() as late, db_config.get_session() as early:
        stale = await late.get(store_model(), "key_old0000000000000")  # read before the other rotation commits
        assert stale is not None and stale.replaced_by_id is None
        await store.mark_rotated(early, "key_old0000000000000", "key_new1000000000000", T0)
        await early.commit()
        with pytest.raises(AlreadyRotated, match="key_new1000000000000"):
            await store.mark_rotated(late, "key_old0000000000000", "key_new2000000000000", T0 + timedelta(days=1))
        await late.rollback()
    async with db_config.get_session() as session:
        final = await store.get_key(session, "key_old0000000000000")
        assert final is not None and final.replaced_by_id == "key_new1000000000000" and final.grace_until == T0
        assert final.state(T0 + timedelta(seconds=1)) == "rotated"


def store_model() -> Any:
    from persistence.models import ApiKey

    return ApiKey
