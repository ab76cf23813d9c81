"""Admission before work: a refused request costs microseconds, and one tenant cannot fill the shared queue.

Order: authenticate -> model allowed (403) -> requests-per-minute (429) -> cheap bounds (role caps, sequences,
a byte-length bound on prompts that certainly cannot fit) -> tokenization (off the event loop for large bodies) ->
token windows, sequences in flight, concurrency, quotas -> engine.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import httpx
import msgspec
import pytest
from litestar.testing import TestClient

from server.app import create_app
from server.engine.chartok import CharTokenizer
from server.engine.fake import FakeEngine
from server.settings import Settings
from tests.conftest import add_role_key, role_key
from tests.live import live_server

BIG = "x" * 9_000_000  # a 9 MB prompt


class CountingTokenizer(CharTokenizer):
    """Records every text it is asked to encode, and the thread that asked."""

    def __init__(self) -> None:
        super().__init__()
        self.encoded: list[int] = []
        self.threads: list[int] = []

    def encode(self, text: str) -> list[int]:
        self.encoded.append(len(text))
        self.threads.append(threading.get_ident())
        return super().encode(text)


def counting_engine(**kwargs: Any) -> tuple[FakeEngine, CountingTokenizer]:
    engine = FakeEngine(["ok"], **kwargs)
    tokenizer = CountingTokenizer()
    engine._tokenizer = tokenizer
    return engine, tokenizer


def chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "fake", "messages": [{"role": "user", "content": content}], **extra}


def error_of(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text[:500]
    error: dict[str, Any] = r.json()["error"]
    return error


def test_a_huge_prompt_from_a_role_without_the_model_is_403_and_never_tokenized(settings: Settings) -> None:
    engine, tokenizer = counting_engine()
    key = role_key(settings, "other-models", allowed_models=["another"])
    with TestClient(create_app(settings, engine=engine)) as http:
        auth = {"Authorization": f"Bearer {key}"}
        for path, body in (
            ("/v1/chat/completions", chat(BIG)),
            ("/v1/completions", {"model": "fake", "prompt": BIG}),
            ("/v1/generate", {"model": "fake", "prompt": BIG}),
        ):
            error = error_of(http.post(path, json=body, headers=auth), 403)
            assert error["code"] == "model_not_allowed", path
        # Refused before the body is decoded in full: only its model is read (a body the schema rejects, too).
        invalid = {"model": "fake", "messages": "not a list", "padding": BIG}
        assert error_of(http.post("/v1/chat/completions", json=invalid, headers=auth), 403)
        # The native routes' default model is screened the same way.
        assert error_of(http.post("/v1/generate", json={"prompt": 7, "padding": BIG}, headers=auth), 403)
    assert tokenizer.encoded == []


def test_a_huge_prompt_over_the_rpm_window_is_429_and_never_tokenized(settings: Settings) -> None:
    engine, tokenizer = counting_engine()
    key = role_key(settings, "rpm-one", rpm=1)
    with TestClient(create_app(settings, engine=engine)) as http:
        auth = {"Authorization": f"Bearer {key}"}
        assert http.post("/v1/chat/completions", json=chat("hi"), headers=auth).status_code == 200
        tokenizer.encoded.clear()
        error = error_of(http.post("/v1/chat/completions", json=chat(BIG), headers=auth), 429)
        assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
        invalid = {"model": "fake", "messages": "not a list", "padding": BIG}
        assert error_of(http.post("/v1/chat/completions", json=invalid, headers=auth), 429)
    assert tokenizer.encoded == []


def test_on_redis_a_window_known_full_refuses_before_the_prompt_and_another_replica_learns_it(
    settings: Settings, redis_url: str
) -> None:
    """On a shared storage the early check answers from what this replica learnt (no round trip per request): the
    request that took the window's last place, or a refusal, tells it; a replica that has not learnt it yet refuses
    at admission (after the prompt is prepared, consuming nothing) and then early."""
    s = msgspec.structs.replace(settings, ratelimit_storage_uri="async+" + redis_url, cache_enabled=False)
    key = role_key(s, "rpm-two-redis", rpm=2)
    auth = {"Authorization": f"Bearer {key}"}
    engine, tokenizer = counting_engine()
    other_engine, other_tokenizer = counting_engine()
    with TestClient(create_app(s, engine=engine)) as http, TestClient(create_app(s, engine=other_engine)) as other:
        assert http.post("/v1/chat/completions", json=chat("hi"), headers=auth).status_code == 200
        assert other.post("/v1/chat/completions", json=chat("hi"), headers=auth).status_code == 200  # the last place
        tokenizer.encoded.clear()
        other_tokenizer.encoded.clear()
        error = error_of(other.post("/v1/chat/completions", json=chat(BIG), headers=auth), 429)
        assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
        # The replica that has not learnt it yet refuses at admission: its prompt was prepared, nothing consumed.
        refused = http.post("/v1/chat/completions", json=chat("small"), headers=auth)
        assert refused.status_code == 429 and refused.headers["x-ratelimit-remaining-requests"] == "0"
        assert tokenizer.encoded != []
        tokenizer.encoded.clear()
        again = http.post("/v1/chat/completions", json=chat(BIG), headers=auth)
        assert again.status_code == 429 and again.json()["error"]["type"] == "requests"
        assert 1 <= int(again.headers["retry-after"]) <= 60 and again.headers["x-ratelimit-limit-requests"] == "2"
    assert tokenizer.encoded == [] and other_tokenizer.encoded == []


def test_a_prompt_that_certainly_cannot_fit_is_refused_from_its_length_alone(
    settings: Settings, authed: Callable[[Any], Any]
) -> None:
    engine, tokenizer = counting_engine(max_model_len=4096)
    with authed(TestClient(create_app(settings, engine=engine))) as http:
        for path, body, param in (
            ("/v1/chat/completions", chat(BIG), "messages"),
            ("/v1/completions", {"model": "fake", "prompt": ["short", BIG]}, "prompt"),
            ("/v1/generate", {"model": "fake", "prompt": BIG}, "prompt"),
        ):
            error = error_of(http.post(path, json=body), 400)
            assert error["code"] == "context_length_exceeded" and error["param"] == param, path
            assert "4096 tokens" in error["message"] and "9000000 bytes" in error["message"]
        # The byte bound is a lower bound: 4 bytes per token at most here, so 16,000 bytes may still fit 4,096 tokens
        # and are tokenized (and then refused on their real count).
        error = error_of(http.post("/v1/completions", json={"model": "fake", "prompt": "y" * 16_000}), 400)
        assert error["code"] == "context_length_exceeded"
    assert tokenizer.encoded == [5, 16_000]


def test_large_prompts_are_tokenized_in_a_worker_thread_small_ones_inline(
    settings: Settings, authed: Callable[[Any], Any]
) -> None:
    engine, tokenizer = counting_engine(max_model_len=100_000)
    with authed(TestClient(create_app(settings, engine=engine))) as http:
        assert http.post("/v1/completions", json={"model": "fake", "prompt": "small"}).status_code == 200
        assert http.post("/v1/completions", json={"model": "fake", "prompt": "z" * 50_000}).status_code == 200
    small, large = tokenizer.threads
    loop_thread = small
    assert large != loop_thread


def test_admission_order_403_then_429_then_400(settings: Settings) -> None:
    key = role_key(settings, "capped-rpm", rpm=1, max_tokens=8, allowed_models=["fake"])
    stranger = role_key(settings, "nothing", allowed_models=[])
    with TestClient(create_app(settings, engine=FakeEngine(["ok"]))) as http:
        auth = {"Authorization": f"Bearer {key}"}
        # Over the cap: 400 while the window has room, and a refused request consumes nothing.
        assert error_of(http.post("/v1/chat/completions", json=chat("hi", max_tokens=9), headers=auth), 400)
        assert http.post("/v1/chat/completions", json=chat("hi", max_tokens=8), headers=auth).status_code == 200
        # The window is full: 429 comes before the cap's 400.
        error = error_of(http.post("/v1/chat/completions", json=chat("hi", max_tokens=9), headers=auth), 429)
        assert error["type"] == "requests"
        # A role that may not use the model: 403 before anything else.
        bad = chat("hi", max_tokens=10**6)
        error = error_of(
            http.post("/v1/chat/completions", json=bad, headers={"Authorization": f"Bearer {stranger}"}), 403
        )
        assert error["code"] == "model_not_allowed"
        # An unknown model is 404 for everyone.
        unknown = {**chat("hi"), "model": "nope"}
        assert error_of(http.post("/v1/chat/completions", json=unknown, headers=auth), 404)["code"] == "model_not_found"


def test_generate_defaults_stay_within_the_roles_cap(settings: Settings) -> None:
    key = role_key(settings, "cap16", max_tokens=16)
    with TestClient(create_app(settings, engine=FakeEngine(["t"] * 300))) as http:
        auth = {"Authorization": f"Bearer {key}"}
        r = http.post("/v1/generate", json={"prompt": "hi"}, headers=auth)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 16 and r.json()["finish_reason"] == "length"
        with http.stream("POST", "/v1/stream", json={"prompt": "hi"}, headers=auth) as s:
            assert s.status_code == 200
            last = [line for line in s.iter_lines() if line.startswith("data: {")][-1]
        assert msgspec.json.decode(last[6:])["usage"]["completion_tokens"] == 16
        error = error_of(http.post("/v1/generate", json={"prompt": "hi", "max_new_tokens": 17}, headers=auth), 400)
        assert error["param"] == "max_new_tokens"
    # Without a cap the default is 256 tokens.
    with TestClient(create_app(settings, engine=FakeEngine(["t"] * 300))) as http:
        r = http.post("/v1/generate", json={"prompt": "hi"}, headers={"Authorization": f"Bearer {key_of(settings)}"})
        assert r.json()["usage"]["completion_tokens"] == 256


def key_of(settings: Settings) -> str:
    return role_key(settings, "uncapped")


@pytest.mark.anyio
async def test_one_key_cannot_fill_the_queue_n_counts_each_sequence(settings: Settings) -> None:
    tight = msgspec.structs.replace(settings, max_sequences_per_key=48, max_queue_size=256)
    hog = await add_role_key(settings, "hog")
    other = await add_role_key(settings, "neighbour")
    engine = FakeEngine(["t"] * 200, delay_s=0.02, max_queue_size=256)
    with live_server(create_app(tight, engine=engine)) as base:
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:

            def post(key: str, n: int, max_tokens: int = 2) -> Any:
                body = chat("hi", n=n, max_tokens=max_tokens)
                return http.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})

            first = asyncio.create_task(post(hog, 40, max_tokens=200))  # ~4 s
            for _ in range(500):
                if engine.active_requests >= 40:
                    break
                await asyncio.sleep(0.01)
            assert engine.active_requests == 40
            second = await post(hog, 9)  # 40 + 9 > 48
            error = error_of(second, 429)
            assert error["type"] == "requests" and error["code"] == "rate_limit_exceeded"
            assert "n counts each" in error["message"] and second.headers["retry-after"] == "1"
            assert (await post(hog, 8)).status_code == 200  # 40 + 8 fits
            assert (await post(other, 40)).status_code == 200  # another key has its own share
            assert not first.done()
            assert (await first).status_code == 200
            assert (await post(hog, 48)).status_code == 200  # all given back once the first ended
            # More than a key may ever have in flight can never run: 400, not a 429 to retry forever.
            error = error_of(await post(hog, 49), 400)
            assert error["param"] == "n"
            metrics = (await http.get("/metrics")).text
            assert 'llm_server_rate_limited_total{limit="sequences",role="hog"} 1.0' in metrics
    assert tight.sequences_per_key == 48
    assert msgspec.structs.replace(settings, max_queue_size=100).sequences_per_key == 25


def test_a_roles_max_n_bounds_choices_per_request(settings: Settings) -> None:
    key = role_key(settings, "two-choices", max_n=2)
    engine = FakeEngine(["ok"])
    with TestClient(create_app(settings, engine=engine)) as http:
        auth = {"Authorization": f"Bearer {key}"}
        assert http.post("/v1/chat/completions", json=chat("hi", n=2), headers=auth).status_code == 200
        error = error_of(http.post("/v1/chat/completions", json=chat("hi", n=3), headers=auth), 400)
        assert error["param"] == "n" and "limit of 2" in error["message"]
        prompts = {"model": "fake", "prompt": ["a", "b", "c"]}
        assert error_of(http.post("/v1/completions", json=prompts, headers=auth), 400)["param"] == "prompt"
        both = {"model": "fake", "prompt": ["a", "b"], "n": 2}
        assert error_of(http.post("/v1/completions", json=both, headers=auth), 400)["param"] == "n"
    assert len(engine.requests) == 2  # only the allowed request reached the engine
