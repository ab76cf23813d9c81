"""The start-up heap is frozen once, after the models have loaded, and only then (``server.cli.runner``)."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from litestar.testing import TestClient

from server.app import create_app
from server.cli import runner
from server.engine.echo import EchoEngine
from server.engine.fake import FakeEngine
from server.exchange.shutdown import Lifecycle
from server.settings import Settings
from server.wiring.state import app_state


@pytest.fixture
def unfrozen() -> Iterator[None]:
    """Leave the test process's collector as it was: nothing frozen."""
    gc.unfreeze()
    try:
        yield
    finally:
        gc.unfreeze()


def test_freeze_heap_moves_the_live_objects_out_of_the_collectors_sight(unfrozen: None) -> None:
    assert gc.get_freeze_count() == 0
    runner.freeze_heap()
    frozen = gc.get_freeze_count()
    assert frozen > 1000  # modules, classes, functions: everything this process has loaded
    # A full collection now walks only what was allocated since, not the frozen start-up heap.
    assert sum(len(gc.get_objects(generation)) for generation in range(3)) < frozen


def test_the_server_freezes_once_after_the_models_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[None] = []
    monkeypatch.setattr(runner, "freeze_heap", lambda: calls.append(None))
    lifecycle = Lifecycle()
    server = runner.DrainingServer(uvicorn.Config(app=lambda *a: None), lifecycle, grace_s=1.0)

    async def ticks(n: int) -> None:
        for counter in range(1, n + 1):
            await server.on_tick(counter)

    asyncio.run(ticks(3))
    assert calls == []  # still loading: the model's objects are not allocated yet
    lifecycle.loaded = True
    asyncio.run(ticks(5))
    assert calls == [None]


def test_loaded_is_set_when_every_model_started(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path, key_pepper="p" * 32), engine=EchoEngine())
    with TestClient(app) as client:
        assert client.get("/readyz").status_code == 200
        assert app_state(app).lifecycle.loaded


def test_loaded_stays_unset_when_a_model_fails(tmp_path: Path) -> None:
    engine = FakeEngine()

    async def fail() -> None:
        raise RuntimeError("no weights")

    engine.start = fail  # type: ignore[method-assign]
    app = create_app(Settings(data_dir=tmp_path, key_pepper="p" * 32), engine=engine)
    with TestClient(app) as client:
        assert client.get("/readyz").status_code == 503
        state = app_state(app).lifecycle
        assert state.failure is not None and not state.loaded
