"""Fixtures shared by every test: the anyio backend and in-process apps over the fake engine."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import TestClient

from server.app import create_app
from server.engine.fake import FakeEngine
from server.settings import Settings


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data")


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
def client(make_app: Callable[..., Litestar], fake_engine: FakeEngine) -> Iterator[TestClient[Litestar]]:
    with TestClient(make_app(fake_engine)) as c:
        yield c


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``builtin:tiny-chat`` model folder (random 2-layer Llama + trained BPE tokenizer), built offline once."""
    from server.engine.demo_model import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("models") / "tiny-chat", "tiny")
