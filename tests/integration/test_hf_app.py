"""The real Transformers engine on the tiny model, through the app, the SDK and real sockets."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from litestar import Litestar
from litestar.testing import TestClient

from server.app import create_app
from server.engine.hf import HFEngine
from server.engine.scheduler import MAX_FAILED_STEPS
from server.serving.choices import derived_seed
from tests.conftest import migrated_settings, ready_client
from tests.live import live_server

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Tell me about the for statement."}]


@pytest.fixture(scope="module")
def http(engine_app: tuple[HFEngine, Litestar, str]) -> Iterator[TestClient[Litestar]]:
    with ready_client(engine_app) as client:
        yield client


@pytest.fixture(scope="module")
def sdk(http: TestClient[Litestar], engine_app: tuple[HFEngine, Litestar, str]) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver.local/v1", api_key=engine_app[2], http_client=http, max_retries=0)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.mark.parametrize(
    "grammar",
    [{"response_format": {"type": "json_object"}}, {"tools": [WEATHER], "tool_choice": "required"}],
    ids=["json_object", "tool_choice_required"],
)
def test_a_vanishing_temperature_under_a_grammar_is_greedy_and_the_engine_stays_ready(
    http: TestClient[Litestar], engine_app: tuple[HFEngine, Litestar, str], grammar: dict[str, Any]
) -> None:
    # Dividing logits by 1e-40 overflowed them to inf/NaN, a forbidden token was sampled, and three such requests
    # marked the engine failed for everyone. A temperature that small is greedy decoding.
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 12, **grammar}
    greedy = http.post("/v1/chat/completions", json={**body, "temperature": 0})
    assert greedy.status_code == 200, greedy.text
    for _ in range(MAX_FAILED_STEPS + 1):
        r = http.post("/v1/chat/completions", json={**body, "temperature": 1e-40})
        assert r.status_code == 200, r.text
        assert _without_ids(r) == _without_ids(greedy)
    assert http.get("/readyz").status_code == 200
    assert engine_app[0].failure is None


def _without_ids(r: httpx.Response) -> dict[str, Any]:
    """The response's message without its tool call ids (fresh per response)."""
    message: dict[str, Any] = r.json()["choices"][0]["message"]
    for call in message.get("tool_calls") or ():
        call.pop("id")
    return message


def test_a_vanishing_repetition_penalty_is_refused(http: TestClient[Litestar]) -> None:
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 4, "repetition_penalty": 1e-40}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "repetition_penalty"


def test_streamed_text_equals_non_streamed_at_temperature_0(sdk: openai.OpenAI) -> None:
    full = sdk.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=40)  # type: ignore[arg-type]
    text = full.choices[0].message.content or ""
    assert full.usage is not None and full.usage.completion_tokens >= 1
    chunks = list(
        sdk.chat.completions.create(
            model="tiny",
            messages=MESSAGES,  # type: ignore[arg-type]
            temperature=0,
            max_tokens=40,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].usage == full.usage
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [full.choices[0].finish_reason]


def test_completions_stream_equals_non_stream_and_usage_uses_the_tokenizer(
    sdk: openai.OpenAI, engine_app: tuple[HFEngine, Litestar, str]
) -> None:
    engine = engine_app[0]
    prompt = "The while statement is used for"
    full = sdk.completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=30)
    streamed = "".join(
        c.choices[0].text
        for c in sdk.completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=30, stream=True)
        if c.choices
    )
    assert streamed == full.choices[0].text
    assert full.usage is not None
    assert full.usage.prompt_tokens == len(engine.tokenizer.encode(prompt))


def test_seed_reproduces_and_differs(sdk: openai.OpenAI) -> None:
    def run(seed: int) -> str:
        out = sdk.completions.create(model="tiny", prompt="x = ", temperature=1.0, max_tokens=24, seed=seed)
        return out.choices[0].text

    assert run(7) == run(7)
    assert len({run(s) for s in range(4)}) > 1


def test_stop_string_cut_from_real_tokens(sdk: openai.OpenAI) -> None:
    base = sdk.completions.create(
        model="tiny", prompt="if x:", temperature=0, max_tokens=30, extra_body={"ignore_eos": True}
    )
    text = base.choices[0].text
    assert len(text) > 6
    stop = text[3:6]  # three characters from the middle, usually spanning token boundaries
    cut = sdk.completions.create(
        model="tiny", prompt="if x:", temperature=0, max_tokens=30, stop=[stop], extra_body={"ignore_eos": True}
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].text
        for c in sdk.completions.create(
            model="tiny",
            prompt="if x:",
            temperature=0,
            max_tokens=30,
            stop=[stop],
            stream=True,
            extra_body={"ignore_eos": True},
        )
        if c.choices
    )
    assert streamed == cut.choices[0].text


def test_continue_final_message(sdk: openai.OpenAI) -> None:
    out = sdk.chat.completions.create(
        model="tiny",
        messages=[*MESSAGES, {"role": "assistant", "content": "The for"}],  # type: ignore[list-item]
        temperature=0,
        max_tokens=5,
        extra_body={"continue_final_message": True},
    )
    assert out.choices[0].finish_reason in {"stop", "length"}


def test_disconnect_frees_the_real_engine(tiny_model_dir: Path, tmp_path: Path) -> None:
    engine = HFEngine(str(tiny_model_dir), served_model_name="tiny", data_dir=tmp_path, device="cpu", dtype="float32")
    settings, key = migrated_settings(tmp_path, model=str(tiny_model_dir))
    app = create_app(settings, engine=engine)
    auth = {"Authorization": f"Bearer {key}"}
    with live_server(app) as base:
        deadline = time.monotonic() + 60
        while httpx.get(f"{base}/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        body = {"model": "tiny", "prompt": "x", "max_tokens": 2000, "stream": True, "ignore_eos": True}
        with (
            httpx.Client(base_url=base, timeout=30, headers=auth) as http,
            http.stream("POST", "/v1/completions", json=body) as r,
        ):
            lines = r.iter_lines()
            for _ in range(6):
                next(lines)
            assert engine.num_running == 1
        freed = time.monotonic()
        while engine.num_running or engine.num_waiting:
            assert time.monotonic() - freed < 2.0, "the engine kept decoding after the client left"
            time.sleep(0.005)
        r2 = httpx.post(
            f"{base}/v1/completions", json={**body, "stream": False, "max_tokens": 3}, timeout=30, headers=auth
        )
        assert r2.status_code == 200
        assert r2.json()["usage"]["completion_tokens"] == 3


def test_n_samples_share_one_prefill_and_equal_the_same_samples_alone(
    http: TestClient[Litestar], engine_app: tuple[HFEngine, Litestar, str]
) -> None:
    scheduler = engine_app[0]._scheduler
    assert scheduler is not None
    body = {"model": "tiny", "prompt": "The for statement", "max_tokens": 10, "temperature": 0.9, "seed": 42}
    before = scheduler.prefilled_tokens
    r = http.post("/v1/completions", json={**body, "n": 4})
    assert r.status_code == 200, r.text
    prompt_tokens = r.json()["usage"]["prompt_tokens"]
    assert scheduler.prefilled_tokens - before == prompt_tokens  # one prefill for four samples
    texts = [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
    # Sample s runs with seed derived_seed(42, s): the same request with that seed and n=1 gives the same text.
    for s, text in enumerate(texts):
        seed = derived_seed(42, s)
        assert seed is not None
        alone = http.post("/v1/completions", json={**body, "seed": seed - 2**64 if seed >= 2**63 else seed})
        assert alone.json()["choices"][0]["text"] == text, s
    assert len(set(texts)) > 1


def test_echo_with_logprobs_reaches_every_forked_choice(http: TestClient[Litestar]) -> None:
    body = {"model": "tiny", "prompt": "x = [1, 2]", "max_tokens": 3, "temperature": 0, "echo": True, "logprobs": 2}
    one = http.post("/v1/completions", json=body).json()["choices"][0]
    two = http.post("/v1/completions", json={**body, "n": 2}).json()["choices"]
    assert len(two) == 2
    expected = one["logprobs"]
    for choice in two:
        assert choice["text"] == one["text"] and choice["text"].startswith("x = [1, 2]")
        got = choice["logprobs"]
        assert got["tokens"] == expected["tokens"] and got["text_offset"] == expected["text_offset"]
        # Every fork has the prompt's entries; a batch of two may differ from one in the last float bits.
        assert got["token_logprobs"][0] is None
        assert got["token_logprobs"][1:] == pytest.approx(expected["token_logprobs"][1:], abs=1e-5)
        for mine, theirs in zip(got["top_logprobs"][1:], expected["top_logprobs"][1:], strict=True):
            assert mine == pytest.approx(theirs, abs=1e-5)
