"""Local state is private to the service user: DATA_DIR 0700, the SQLite files and the pepper 0600, the demo model
folder 0700; existing shared folders and files are left as they are, with a warning."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from litestar.testing import TestClient

from persistence.private import private_dir, private_file, shared_mode
from server.app import create_app
from server.cli import main
from server.engine.fake import FakeEngine
from server.settings import Settings
from server.wiring.datadir import prepare_data_dir
from tests.conftest import TEST_PEPPER


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The most permissive umask: what is private must not rely on the operator's umask."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.usefixtures("open_umask")
def test_a_new_data_dir_and_its_files_are_private(tmp_path: Path) -> None:
    data = tmp_path / "state" / "data"
    settings = Settings(data_dir=data, model="builtin:tiny-chat")  # SQLite, generated pepper
    app = create_app(settings, engine=FakeEngine(["ok"]))
    with TestClient(app) as http:
        assert http.get("/readyz").status_code == 200  # pings the database: a pooled connection stays open
        db = data / "llm_server.db"
        side = [db.with_name(db.name + s) for s in ("-wal", "-shm")]
        assert all(p.exists() for p in side)  # WAL mode: they exist while the database is open
        assert {p.name: mode(p) for p in [db, *side]} == {p.name: 0o600 for p in [db, *side]}
    assert mode(data) == 0o700
    assert mode(data / "key_pepper") == 0o600
    assert mode(data / "models") == 0o700
    assert mode(data / "llm_server.db") == 0o600
    assert not [p for p in data.rglob("*") if shared_mode(p) is not None]


@pytest.mark.usefixtures("open_umask")
def test_the_demo_model_folder_is_private(tmp_path: Path) -> None:
    from server.engine.demo_model import resolve_builtin

    data = prepare_data_dir(Settings(data_dir=tmp_path / "data", key_pepper=TEST_PEPPER))
    folder = resolve_builtin("builtin:tiny-chat", data)
    # The model's own files keep the modes its writer gives them; no other user can reach them through models/.
    assert folder.parent == data / "models" and (folder / "config.json").is_file()
    assert (mode(data), mode(data / "models")) == (0o700, 0o700)


@pytest.mark.usefixtures("open_umask")
def test_the_admin_cli_creates_private_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "cli-data"
    monkeypatch.setenv("LLM_SERVER_DATA_DIR", str(data))
    monkeypatch.delenv("LLM_SERVER_KEY_PEPPER", raising=False)
    monkeypatch.chdir(tmp_path)
    main(["keys", "create", "--name", "n"])
    assert capsys.readouterr().out.startswith("sk-llm-")
    assert mode(data) == 0o700 and mode(data / "key_pepper") == 0o600 and mode(data / "llm_server.db") == 0o600


def test_existing_shared_state_is_reported_not_changed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "operator-dir"
    data.mkdir()
    os.chmod(data, 0o750)  # e.g. shared with a backup group on purpose
    db = data / "llm_server.db"
    db.touch()
    os.chmod(db, 0o640)
    caplog.set_level(logging.WARNING)
    settings = Settings(data_dir=data, key_pepper=TEST_PEPPER)
    for _ in range(2):  # once per path and process, however often the app is built
        with TestClient(create_app(settings, engine=FakeEngine(["ok"]))) as http:
            assert http.get("/health").status_code == 200
    assert (mode(data), mode(db)) == (0o750, 0o640)
    warnings = [r.getMessage() for r in caplog.records if r.name == "persistence.private"]
    assert len(warnings) == 2, warnings
    assert any(str(data) in w and "mode 750" in w and f"chmod 700 {data}" in w for w in warnings)
    assert any(str(db) in w and "mode 640" in w and f"chmod 600 {db}" in w for w in warnings)


def test_private_helpers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    made = private_dir(tmp_path / "a" / "b")  # a missing parent is created too; only the leaf is made private
    assert mode(made) == 0o700 and made.parent.is_dir()
    assert private_file(made / "f") is True and mode(made / "f") == 0o600
    (made / "f").write_text("kept")
    assert private_file(made / "f") is False and (made / "f").read_text() == "kept"  # never truncated
    assert not caplog.records
    os.chmod(made / "f", 0o604)
    assert private_file(made / "f") is False and shared_mode(made / "f") == 0o604
    assert len(caplog.records) == 1 and "chmod 600" in caplog.records[0].getMessage()
    assert shared_mode(tmp_path / "missing") is None


@pytest.mark.usefixtures("open_umask")
def test_the_database_file_is_created_private_on_first_connect_only(tmp_path: Path) -> None:
    import asyncio

    from server.records.database import Database

    path = tmp_path / "fresh" / "llm_server.db"
    db = Database(f"sqlite+aiosqlite:///{path}")
    try:
        assert mode(path.parent) == 0o700 and not path.exists()  # an engine alone creates no database file
        assert asyncio.run(db.ping())
        assert mode(path) == 0o600
    finally:
        asyncio.run(db.close())
