"""Database fixtures (register with ``pytest_plugins = ["tests.db_fixtures"]`` in ``tests/conftest.py``).

* ``sqlite_url``: a fresh SQLite file database (not migrated);
* ``postgres_url``: a fresh PostgreSQL database on ``LLM_SERVER_TEST_POSTGRES_URL``'s server, dropped afterwards;
  skips when the variable is unset;
* ``db_url``: both of the above, parametrized ``[sqlite]`` / ``[postgres]``;
* ``db_config`` (async, for ``@pytest.mark.anyio`` tests): ``db_url`` migrated to head, as an engine config.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from advanced_alchemy.config import SQLAlchemyAsyncConfig

from tests.db import (
    POSTGRES_ENV,
    create_postgres_database,
    drop_postgres_database,
    migrated_config,
    postgres_server_url,
    run_sync,
    sqlite_url_for,
)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """URL of a fresh SQLite database file under ``tmp_path``."""
    return sqlite_url_for(tmp_path / "db" / "llm_server.db")


def skip_or_fail(reason: str) -> None:
    """Skip a test that needs a missing service, or fail it where the services are required (CI)."""
    if os.environ.get("LLM_SERVER_REQUIRE_SERVICES"):
        pytest.fail(f"{reason} (LLM_SERVER_REQUIRE_SERVICES is set: these tests must run)")
    pytest.skip(reason)


@pytest.fixture
def redis_url() -> str:
    """The Redis URL for tests (``LLM_SERVER_TEST_REDIS_URL``); each test uses its own key prefix."""
    url = os.environ.get("LLM_SERVER_TEST_REDIS_URL")
    if not url:
        skip_or_fail("Redis tests need LLM_SERVER_TEST_REDIS_URL, e.g. redis://127.0.0.1:6379/0")
    assert url is not None
    return url


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """URL of a fresh, empty PostgreSQL database, dropped (``WITH (FORCE)``) after the test."""
    server = postgres_server_url()
    if server is None:
        skip_or_fail(f"PostgreSQL tests need {POSTGRES_ENV}, e.g. postgresql+asyncpg://postgres@127.0.0.1:5432/test")
    url: str = run_sync(create_postgres_database(server))
    try:
        yield url
    finally:
        run_sync(drop_postgres_database(url))


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> str:
    """A fresh database URL on each backend (the PostgreSQL case skips without a server)."""
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


@pytest.fixture
async def db_config(db_url: str) -> AsyncIterator[SQLAlchemyAsyncConfig]:
    """``db_url`` upgraded to head, as a standalone engine config (engine disposed afterwards)."""
    async with migrated_config(db_url) as config:
        yield config
