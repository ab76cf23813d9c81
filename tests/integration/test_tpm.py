"""TPM overrun: tokens generated beyond what admission counted are always added to the window, even past the limit,
on the memory storage and on Redis (``LLM_SERVER_TEST_REDIS_URL``)."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from litestar.testing import TestClient

from server.admission.ratelimit import StorageUnavailable
from server.app import create_app
from server.engine.fake import FakeEngine
from server.settings import Settings
from server.wiring.state import app_state
from tests.conftest import add_role_key


def chat(**extra: object) -> dict[str, object]:
    return {"model": "fake", "messages": [{"role": "user", "content": "hi"}], **extra}


@pytest.mark.parametrize("storage", ["memory", "redis"])
def test_tpm_overrun_is_recorded_past_the_limit(
    settings: Settings, storage: str, request: pytest.FixtureRequest
) -> None:
    """3 requests without max_tokens use ~12,000 tokens against TPM 10,000: all of it is counted, the window
    shows 0 left and the next request waits."""
    uri = "async+memory://" if storage == "memory" else "async+" + request.getfixturevalue("redis_url")
    s = msgspec.structs.replace(settings, ratelimit_storage_uri=uri, cache_enabled=False)
    key = asyncio.run(add_role_key(s, "tpm", tpm=10_000))
    engine = FakeEngine(["x"] * 4000, max_model_len=8192)
    with TestClient(create_app(s, engine=engine)) as http:
        used = 0
        for _ in range(3):
            r = http.post("/v1/chat/completions", json=chat(), headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, r.text
            used += r.json()["usage"]["total_tokens"]
        assert used > 12_000
        r = http.post("/v1/chat/completions", json=chat(max_tokens=5), headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 429 and r.json()["error"]["type"] == "tokens", r.text
        assert r.headers["x-ratelimit-remaining-tokens"] == "0" and int(r.headers["retry-after"]) > 0


def test_a_request_admitted_without_the_storage_counts_all_its_tokens(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fail-open: the TPM window could not be hit at admission; when the request ends, all its tokens are added."""
    s = msgspec.structs.replace(settings, ratelimit_fail_open=True, cache_enabled=False)
    key = asyncio.run(add_role_key(s, "tpm", tpm=10_000))
    auth = {"Authorization": f"Bearer {key}"}
    app = create_app(s, engine=FakeEngine(["x"] * 4000, max_model_len=8192))
    with TestClient(app) as http:
        limiter = app_state(app).services.limiter

        async def unreachable(*_: object, **__: object) -> bool:
            raise StorageUnavailable("injected")

        monkeypatch.setattr(limiter, "hit", unreachable)
        first = http.post("/v1/chat/completions", json=chat(), headers=auth)
        assert first.status_code == 200, first.text
        monkeypatch.undo()
        second = http.post("/v1/chat/completions", json=chat(max_tokens=5), headers=auth)
        assert second.status_code == 200, second.text
        counted = first.json()["usage"]["total_tokens"] + second.json()["usage"]["prompt_tokens"] + 5
        assert second.headers["x-ratelimit-remaining-tokens"] == str(10_000 - counted)
