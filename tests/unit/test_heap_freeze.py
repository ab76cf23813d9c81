"""``serve`` freezes its start-up heap once, when the models have loaded, and only then (``server.cli.runner``)."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest
from litestar.testing import TestClient

from server.app import create_app
from server.cli import runner
from server.engine.echo import EchoEngine
from server.engine.fake import FakeEngine
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


def test_serve_freezes_when_the_models_have_loaded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``run`` hands ``freeze_heap`` to the lifecycle; nothing is frozen before the models have loaded."""
    calls: list[None] = []
    monkeypatch.setattr(runner, "freeze_heap", lambda: calls.append(None))
    seen: list[object] = []

    class Recorder(runner.DrainingServer):
        def run(self, sockets: object = None) -> None:
            seen.append(self.lifecycle.on_loaded)
            assert calls == []
            self.started = True

    monkeypatch.setattr(runner, "DrainingServer", Recorder)
    app = create_app(Settings(data_dir=tmp_path, key_pepper="p" * 32), engine=EchoEngine())
    runner.run(app, Settings(data_dir=tmp_path, key_pepper="p" * 32))
    lifecycle = app_state(app).lifecycle
    assert seen == [lifecycle.on_loaded] and lifecycle.on_loaded is not None
    lifecycle.models_loaded()
    assert calls == [None] and lifecycle.loaded


def test_loaded_is_set_when_every_model_started(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path, key_pepper="p" * 32), engine=EchoEngine())
    calls: list[None] = []
    app_state(app).lifecycle.on_loaded = lambda: calls.append(None)
    with TestClient(app) as client:
        assert client.get("/readyz").status_code == 200
        assert app_state(app).lifecycle.loaded
        assert calls == [None]


def test_loaded_stays_unset_when_a_model_fails(tmp_path: Path) -> None:
    engine = FakeEngine()

    async def fail() -> None:
        raise RuntimeError("no weights")

    engine.start = fail  # type: ignore[method-assign]
    app = create_app(Settings(data_dir=tmp_path, key_pepper="p" * 32), engine=engine)
    calls: list[None] = []
    app_state(app).lifecycle.on_loaded = lambda: calls.append(None)
    with TestClient(app) as client:
        assert client.get("/readyz").status_code == 503
        state = app_state(app).lifecycle
        assert state.failure is not None and not state.loaded and calls == []
