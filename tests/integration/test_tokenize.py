"""``/tokenize`` and ``/detokenize`` (vLLM-compatible): counts equal what chat and completions bill, ids round-trip,
the same key, allowlist and model checks as ``/v1``, and each call counts against the key's requests per minute and
concurrency (never its tokens or monthly quota)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import msgspec
import pytest
from litestar import Litestar
from litestar.testing import TestClient

from server.app import create_app
from server.settings import Settings
from tests.checks import usage_of
from tests.conftest import bearer, role_key
from tests.fakes.templated import HERMES_TEMPLATE, templated_engine
from tests.fakes.upstream import MockUpstream, serving

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}


@pytest.fixture
def http(settings: Settings, authed: Callable[[Any], Any]) -> Iterator[TestClient[Litestar]]:
    with authed(TestClient(create_app(settings, engine=templated_engine(HERMES_TEMPLATE, ["Sunny."])))) as client:
        yield client


def test_the_message_form_counts_what_chat_bills(http: TestClient[Litestar]) -> None:
    for extra in ({}, {"tools": [WEATHER]}):
        counted = http.post("/tokenize", json={"model": "fake", "messages": MESSAGES, **extra}).json()
        billed = http.post("/v1/chat/completions", json={"model": "fake", "messages": MESSAGES, **extra}).json()
        assert counted["count"] == billed["usage"]["prompt_tokens"] == len(counted["tokens"])
    with_tools = http.post("/tokenize", json={"model": "fake", "messages": MESSAGES, "tools": [WEATHER]}).json()
    plain = http.post("/tokenize", json={"model": "fake", "messages": MESSAGES}).json()
    assert with_tools["count"] > plain["count"] and plain["max_model_len"] > 0
    bare = http.post("/tokenize", json={"model": "fake", "messages": MESSAGES, "add_generation_prompt": False}).json()
    assert bare["count"] < plain["count"]


def test_the_prompt_form_counts_what_completions_bill_and_round_trips(http: TestClient[Litestar]) -> None:
    counted = http.post("/tokenize", json={"model": "fake", "prompt": "Once upon a time"}).json()
    billed = http.post("/v1/completions", json={"model": "fake", "prompt": "Once upon a time", "max_tokens": 1}).json()
    assert counted["count"] == billed["usage"]["prompt_tokens"]
    back = http.post("/detokenize", json={"model": "fake", "tokens": counted["tokens"]}).json()
    assert back == {"prompt": "Once upon a time"}
    default = http.post("/tokenize", json={"prompt": "Once upon a time"}).json()  # the first model by default
    assert default["tokens"] == counted["tokens"]


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/tokenize", {"model": "fake"}, 400, "prompt"),
        ("/tokenize", {"model": "fake", "prompt": "a", "messages": MESSAGES}, 400, "prompt"),
        ("/tokenize", {"model": "fake", "prompt": "a", "add_special_tokens": False}, 400, "add_special_tokens"),
        ("/tokenize", {"model": "fake", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0]"),
        ("/tokenize", {"model": "nope", "prompt": "a"}, 404, "model"),
        ("/detokenize", {"model": "fake", "tokens": [-1]}, 400, "tokens"),
        ("/detokenize", {"model": "fake", "tokens": [10**9]}, 400, "tokens"),
        ("/detokenize", {"model": "fake", "tokens": [10**30]}, 400, "tokens"),
        ("/detokenize", {"model": "fake"}, 400, "tokens"),
        ("/detokenize", {"model": "fake", "tokens": [100] * (4096 + 1)}, 400, "tokens"),
    ],
)
def test_bad_requests_name_the_parameter(
    http: TestClient[Litestar], path: str, body: dict[str, Any], status: int, param: str
) -> None:
    r = http.post(path, json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"].startswith(param), r.json()


def test_keys_and_allowlists_apply(http: TestClient[Litestar], settings: Settings) -> None:
    r = http.post("/tokenize", json={"model": "fake", "prompt": "a"}, headers={"Authorization": ""})
    assert r.status_code == 401
    other = role_key(settings, "others", allowed_models=["other-model"])
    r = http.post("/tokenize", json={"model": "fake", "prompt": "a"}, headers=bearer(other))
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"


def test_a_remote_model_has_no_tokenizer_here(settings: Settings, api_key: str) -> None:
    mock = MockUpstream(lambda request, body: httpx.Response(500))
    with serving(settings, mock, api_key) as (http, _):
        r = http.post("/tokenize", json={"model": "remote", "prompt": "a"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model" and mock.calls == 0


def test_detokenize_takes_at_most_the_models_window(http: TestClient[Litestar]) -> None:
    window = http.post("/tokenize", json={"model": "fake", "prompt": "a"}).json()["max_model_len"]
    assert window == 4096  # the bound the parametrized case above goes one past
    fits = http.post("/detokenize", json={"model": "fake", "tokens": [97] * window})
    assert fits.status_code == 200 and fits.json() == {"prompt": "a" * window}, fits.text
    over = http.post("/detokenize", json={"model": "fake", "tokens": [97] * (window + 1)})
    assert over.status_code == 400 and str(window) in over.json()["error"]["message"]


@pytest.mark.parametrize("storage", ["memory", "redis"])
def test_each_call_counts_against_the_requests_per_minute(
    settings: Settings, storage: str, request: pytest.FixtureRequest
) -> None:
    """A free tokenizer would let a key burn the server's CPU past its limits: each call is one request of its
    window, shared with ``/v1``, and refused with 429 once the window is full."""
    uri = "async+memory://" if storage == "memory" else "async+" + request.getfixturevalue("redis_url")
    s = msgspec.structs.replace(settings, ratelimit_storage_uri=uri, cache_enabled=False)
    key = role_key(s, "rpm3", rpm=3)
    with TestClient(create_app(s, engine=templated_engine(HERMES_TEMPLATE, ["Sunny."]))) as http:
        http.headers.update(bearer(key))
        assert http.post("/tokenize", json={"model": "fake", "prompt": "a"}).status_code == 200
        assert http.post("/detokenize", json={"model": "fake", "tokens": [97]}).status_code == 200
        body = {"model": "fake", "messages": MESSAGES, "max_tokens": 5}
        chat = http.post("/v1/chat/completions", json=body)
        assert chat.status_code == 200, chat.text
        for path, body in [
            ("/tokenize", {"model": "fake", "prompt": "a"}),
            ("/tokenize", {"model": "fake", "messages": MESSAGES}),
            ("/detokenize", {"model": "fake", "tokens": [97]}),
        ]:
            r = http.post(path, json=body)
            assert r.status_code == 429, (path, r.text)
            assert r.json()["error"]["code"] == "rate_limit_exceeded" and int(r.headers["retry-after"]) >= 1


def test_calls_count_no_tokens_and_no_quota_and_release_their_slot(settings: Settings, api_key: str) -> None:
    """A key with one concurrency slot, 1,000 tokens a minute and one request of 1,000 tokens a month tokenizes
    900-token prompts over and over: its slot comes back each time, and its tokens per minute and monthly quota
    stay whole for its one chat request."""
    key = role_key(settings, "metered", max_concurrency=1, tpm=1000, monthly_requests=1, monthly_tokens=1000)
    with TestClient(create_app(settings, engine=templated_engine(HERMES_TEMPLATE, ["Sunny."]))) as http:
        http.headers.update(bearer(key))
        for _ in range(5):
            counted = http.post("/tokenize", json={"model": "fake", "prompt": "x" * 900})
            assert counted.status_code == 200 and counted.json()["count"] >= 900, counted.text
            back = http.post("/detokenize", json={"model": "fake", "tokens": counted.json()["tokens"]})
            assert back.status_code == 200, back.text
        body = {"model": "fake", "messages": MESSAGES, "max_tokens": 5}
        chat = http.post("/v1/chat/completions", json=body)
        assert chat.status_code == 200, chat.text
        billed = chat.json()["usage"]["total_tokens"]
        assert usage_of(http, api_key, "metered-key") == {"tokens": billed, "requests": 1}
        again = http.post("/v1/chat/completions", json=body)
        assert again.status_code == 429 and again.json()["error"]["code"] == "insufficient_quota"
        assert http.post("/tokenize", json={"model": "fake", "prompt": "a"}).status_code == 200  # over its quota
