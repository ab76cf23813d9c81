"""Faults: an exception inside the engine thread (a failed step, a persistent failure, the worker's death).

The harnesses are in ``tests/fakes/faults.py``. Time bounds are generous (shared, slow machines); the measured
values are printed (``-s``) for the reliability notes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from litestar.testing import TestClient

from server.app import create_app
from server.engine.hf import HFEngine
from server.engine.scheduler import MAX_FAILED_STEPS
from server.settings import Settings
from tests.conftest import bearer
from tests.fakes.faults import MARGIN_S, MSGS, FlakyModel, Killed, report

# ---- an exception inside the engine thread -----------------------------------------------------------------


@pytest.fixture
def hf_app(tiny_model_dir: Path, settings: Settings, api_key: str) -> Iterator[tuple[TestClient[Any], FlakyModel, str]]:
    s = msgspec.structs.replace(settings, model=str(tiny_model_dir), cache_enabled=False)
    engine = HFEngine(str(tiny_model_dir), served_model_name="tiny", data_dir=s.data_dir, device="cpu", dtype="float32")
    with TestClient(create_app(s, engine=engine)) as http:
        deadline = time.monotonic() + 60
        while http.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "tiny model did not load"
            time.sleep(0.05)
        scheduler: Any = engine._scheduler  # the test reaches into the engine to break its model
        flaky = FlakyModel(scheduler._model)
        scheduler._model = flaky
        yield http, flaky, api_key


def tiny_chat(http: TestClient[Any], key: str, *, stream: bool = False, max_tokens: int = 8) -> httpx.Response:
    body = {"model": "tiny", "messages": MSGS, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    return http.post("/v1/chat/completions", json=body, headers=bearer(key))


def last_frame(r: httpx.Response) -> dict[str, Any]:
    frames = [f for f in r.text.split("\n\n") if f.strip()]
    decoded: dict[str, Any] = msgspec.json.decode(frames[-1].removeprefix("data: "))
    return decoded


@pytest.mark.slow
def test_engine_step_failure_fails_the_affected_requests_and_serving_goes_on(
    hf_app: tuple[TestClient[Any], FlakyModel, str],
) -> None:
    http, flaky, key = hf_app
    flaky.arm(1)  # the next forward (a prefill) raises
    started = time.monotonic()
    r = tiny_chat(http, key)
    report("engine: failed prefill -> 500", time.monotonic() - started)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert flaky.failures == 0  # the fault hit this request
    flaky.arm(1, after=3)  # a decode step, mid-stream
    r = tiny_chat(http, key, stream=True, max_tokens=40)
    assert r.status_code == 200 and flaky.failures == 0
    assert r.text.count("data: ") >= 3  # the role chunk, tokens, then the error
    assert last_frame(r)["error"]["type"] == "server_error" and "[DONE]" not in r.text
    # Two failed steps in a row, then the fault is gone: serving goes on and the engine stays ready.
    for _ in range(3):
        assert tiny_chat(http, key).status_code == 200
    assert http.get("/readyz").status_code == 200


@pytest.mark.slow
def test_persistent_engine_failure_marks_the_engine_failed(hf_app: tuple[TestClient[Any], FlakyModel, str]) -> None:
    http, flaky, key = hf_app
    flaky.arm(10**9)
    for _ in range(MAX_FAILED_STEPS):
        started = time.monotonic()
        assert tiny_chat(http, key).status_code == 500
        assert time.monotonic() - started < 30
    deadline = time.monotonic() + 5  # the worker gives up right after failing the last request
    while (r := http.get("/readyz")).status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert r.status_code == 503 and r.json()["status"] == "failed"
    assert f"{MAX_FAILED_STEPS} engine steps in a row failed" in r.json()["reason"]
    started = time.monotonic()
    r = tiny_chat(http, key)
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_failed"
    assert "injected forward failure" in r.json()["error"]["message"]
    assert time.monotonic() - started < MARGIN_S


@pytest.mark.slow
def test_engine_worker_death_fails_in_flight_requests_and_readiness(
    hf_app: tuple[TestClient[Any], FlakyModel, str],
) -> None:
    http, flaky, key = hf_app
    flaky.arm(1, after=5, error=Killed("worker killed"))
    started = time.monotonic()
    r = tiny_chat(http, key, stream=True, max_tokens=60)  # in flight when the worker dies
    report("engine: worker death -> in-flight stream ends with an error frame", time.monotonic() - started)
    assert r.status_code == 200 and flaky.failures == 0
    assert r.text.count("data: ") >= 3  # the role chunk, tokens, then the error
    assert last_frame(r)["error"]["type"] == "server_error"
    assert time.monotonic() - started < 30
    r = http.get("/readyz")
    assert r.status_code == 503 and r.json()["status"] == "failed"
    assert "the engine worker stopped: Killed: worker killed" in r.json()["reason"]
    r = tiny_chat(http, key)
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_failed"
