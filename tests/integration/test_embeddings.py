"""``/v1/embeddings`` on the FakeEmbedder through the official SDK: the input forms, ``encoding_format``,
``dimensions``, the checks (400 naming ``input``), the wrong task both ways, batching across requests, overload and
model failure, and the gateway (keys, allowlists, RPM, TPM, quotas, request log, metrics) on the route."""

from __future__ import annotations

import base64
import math
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import msgspec
import openai
import pytest
from litestar import Litestar
from litestar.testing import TestClient

from server.app import create_app
from server.engine.fake import FakeEngine
from server.settings import Settings
from server.wiring.models import ServedModels
from tests.checks import assert_error, log_rows, usage_of
from tests.conftest import bearer, role_key, sdk
from tests.fakes.embedders import BracketingTokenizer, FakeEmbedder, fake_vector
from tests.fakes.templates import PLAIN, templated_engine
from tests.fakes.upstream import MockUpstream, serving
from tests.live import live_server

MODEL = "fake-embed"
DIMENSIONS = 8
MAX_LEN = 512
TOKENIZER = BracketingTokenizer()


def ids(text: str) -> list[int]:
    """What the fake embedding model's tokenizer makes of ``text`` ([CLS] ... [SEP])."""
    return TOKENIZER.encode(text)


def vector(token_ids: list[int], dimensions: int = DIMENSIONS) -> list[float]:
    return fake_vector(token_ids, dimensions).tolist()


def unpacked(encoded: str) -> list[float]:
    raw = base64.b64decode(encoded)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def served_vectors(out: Any) -> list[list[float]]:
    assert [d.index for d in out.data] == list(range(len(out.data)))
    assert all(d.object == "embedding" for d in out.data)
    return [d.embedding if isinstance(d.embedding, str) else list(d.embedding) for d in out.data]


@pytest.fixture
def embedder() -> FakeEmbedder:
    return FakeEmbedder()


@pytest.fixture
def http(settings: Settings, embedder: FakeEmbedder, authed: Callable[[Any], Any]) -> Iterator[TestClient[Litestar]]:
    with authed(TestClient(create_app(settings, engine=embedder))) as client:
        yield client


@pytest.fixture
def client(http: TestClient[Litestar], api_key: str) -> openai.OpenAI:
    return sdk(http, api_key)


def embed(http: httpx.Client, **body: Any) -> httpx.Response:
    return http.post("/v1/embeddings", json={"model": MODEL, **body})


# ---- the input forms and encodings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected_ids"),
    [
        ("hello", [ids("hello")]),
        (["hello", "a longer text", "é ✓ 🙂"], [ids("hello"), ids("a longer text"), ids("é ✓ 🙂")]),
        ([104, 105], [[104, 105]]),
        ([[104], [105, 106, 107], [ord("🙂")]], [[104], [105, 106, 107], [ord("🙂")]]),
    ],
    ids=["string", "strings", "token ids", "token-id lists"],
)
def test_every_input_form_embeds_its_tokens_in_order(
    client: openai.OpenAI, given: Any, expected_ids: list[list[int]]
) -> None:
    out = client.embeddings.create(model=MODEL, input=given, encoding_format="float")
    assert out.object == "list" and out.model == MODEL
    assert served_vectors(out) == [vector(i) for i in expected_ids]
    tokens = sum(len(i) for i in expected_ids)
    assert (out.usage.prompt_tokens, out.usage.total_tokens) == (tokens, tokens)


def test_the_most_inputs_user_and_unknown_fields_are_accepted(http: TestClient[Litestar]) -> None:
    most = embed(http, input=[[104 + k % 50] for k in range(2048)])
    assert most.status_code == 200 and len(most.json()["data"]) == 2048
    assert [d["index"] for d in most.json()["data"]] == list(range(2048))
    assert most.json()["data"][2047]["embedding"] == vector([104 + 2047 % 50])
    other = embed(http, input="hi", user="user-1", encoding_format="float", dimensions=None, extra_field={"a": 1})
    assert other.status_code == 200 and other.json()["data"][0]["embedding"] == vector(ids("hi"))


def test_base64_is_little_endian_float32_of_the_same_vectors(http: TestClient[Litestar]) -> None:
    texts = ["one", "two", "three"]
    floats = embed(http, input=texts).json()
    encoded = embed(http, input=texts, encoding_format="base64").json()
    assert all(isinstance(d["embedding"], str) for d in encoded["data"])
    assert [unpacked(d["embedding"]) for d in encoded["data"]] == [d["embedding"] for d in floats["data"]]
    assert [d["embedding"] for d in floats["data"]] == [vector(ids(t)) for t in texts]
    assert encoded["usage"] == floats["usage"]


def test_the_sdk_default_asks_for_base64_and_decodes_it(client: openai.OpenAI, http: TestClient[Litestar]) -> None:
    sent: list[dict[str, Any]] = []
    http.event_hooks["request"].append(lambda request: sent.append(msgspec.json.decode(request.read())))
    default = client.embeddings.create(model=MODEL, input=["alpha", "beta"])
    floats = client.embeddings.create(model=MODEL, input=["alpha", "beta"], encoding_format="float")
    assert sent[0]["encoding_format"] == "base64"
    assert served_vectors(default) == served_vectors(floats) == [vector(ids("alpha")), vector(ids("beta"))]


def test_dimensions_shortens_and_renormalizes_a_truncatable_model(settings: Settings, api_key: str) -> None:
    with TestClient(create_app(settings, engine=FakeEmbedder(truncatable=True))) as http:
        client = sdk(http, api_key)
        short = client.embeddings.create(model=MODEL, input=["hello", "world"], dimensions=3, encoding_format="float")
        base = client.embeddings.create(model=MODEL, input=["hello", "world"], dimensions=3, encoding_format="base64")
        full = client.embeddings.create(model=MODEL, input="hello", dimensions=DIMENSIONS, encoding_format="float")
        with pytest.raises(openai.BadRequestError) as err:
            client.embeddings.create(model=MODEL, input="hello", dimensions=DIMENSIONS + 1)
    assert err.value.param == "dimensions"
    assert full.data[0].embedding == vector(ids("hello"))
    for text, got, encoded in zip(["hello", "world"], served_vectors(short), served_vectors(base), strict=True):
        head = vector(ids(text))[:3]
        norm = math.sqrt(sum(x * x for x in head))
        assert len(got) == 3 and got == pytest.approx([x / norm for x in head], rel=1e-6)
        assert math.sqrt(sum(x * x for x in got)) == pytest.approx(1.0, abs=1e-6)
        assert unpacked(str(encoded)) == got  # given explicitly, base64 is left to the caller to decode


def test_dimensions_only_cuts_vectors_that_are_not_normalized(settings: Settings, api_key: str) -> None:
    with TestClient(create_app(settings, engine=FakeEmbedder(truncatable=True, normalized=False))) as http:
        client = sdk(http, api_key)
        full = client.embeddings.create(model=MODEL, input="hello", encoding_format="float")
        short = client.embeddings.create(model=MODEL, input="hello", dimensions=3, encoding_format="float")
    doubled = [2 * x for x in vector(ids("hello"))]
    assert full.data[0].embedding == doubled and short.data[0].embedding == doubled[:3]


def test_dimensions_is_refused_by_a_model_not_trained_for_it(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=MODEL, input="hello", dimensions=4)
    assert err.value.param == "dimensions" and err.value.code == "unsupported_parameter"
    same = client.embeddings.create(model=MODEL, input="hello", dimensions=DIMENSIONS, encoding_format="float")
    assert same.data[0].embedding == vector(ids("hello"))


# ---- checks -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": ""}, "input"),
        ({"input": ["a", ""]}, "input[1]"),
        ({"input": []}, "input"),
        ({"input": [[]]}, "input"),
        ({"input": [[104], []]}, "input[1]"),
        ({"input": ["a"] * 2049}, "input"),
        ({"input": [[104]] * 2049}, "input"),
        ({"input": ["a", [104]]}, "input"),
        ({"input": [104, "a"]}, "input"),
        ({"input": [[104], 105]}, "input"),
        ({"input": [True, False]}, "input"),
        ({"input": [[104, True]]}, "input"),
        ({"input": [-1]}, "input"),
        ({"input": [[104], [10**9]]}, "input"),
        ({"input": 5}, "input"),
        ({"input": None}, "input"),
        ({}, "input"),
        ({"input": "a", "encoding_format": "binary"}, "encoding_format"),
        ({"input": "a", "dimensions": 0}, "dimensions"),
        ({"input": "a", "dimensions": -1}, "dimensions"),
        ({"input": "a", "dimensions": 10**30}, "dimensions"),
        ({"input": "a", "dimensions": DIMENSIONS + 1}, "dimensions"),
        ({"input": [[10**30]]}, "input"),
    ],
    ids=lambda v: repr(v)[:40] if isinstance(v, dict) else v,
)
def test_bad_inputs_are_400_naming_the_parameter(http: TestClient[Litestar], body: dict[str, Any], param: str) -> None:
    r = embed(http, **body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error


def test_inputs_up_to_the_window_pass_and_longer_ones_name_their_index(http: TestClient[Litestar]) -> None:
    fits = "x" * (MAX_LEN - 2)  # with [CLS] and [SEP]: exactly the window
    for given, tokens in [([fits, "a"], MAX_LEN + 3), ([[104] * MAX_LEN, [105]], MAX_LEN + 1)]:
        r = embed(http, input=given)
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == tokens, r.text
    for body, param in [
        ({"input": fits + "x"}, "input"),
        ({"input": ["a", fits + "x"]}, "input[1]"),
        ({"input": [[104], [104] * (MAX_LEN + 1), [105]]}, "input[1]"),
    ]:
        error = assert_error(embed(http, **body), 400, "invalid_request_error", "context_length_exceeded")
        assert error["param"] == param and str(MAX_LEN) in error["message"] and str(MAX_LEN + 1) in error["message"]


# ---- the wrong task ---------------------------------------------------------------------------------------------


@pytest.fixture
def both(settings: Settings, authed: Callable[[Any], Any]) -> Iterator[TestClient[Litestar]]:
    """An app serving the generation model ``fake`` and the embedding model ``fake-embed``."""
    models = ServedModels()
    models.add("fake", FakeEngine(["Hel", "lo"]))
    models.add(MODEL, FakeEmbedder(), embeds=True)
    with authed(TestClient(create_app(settings, models=models))) as client:
        yield client


def test_generation_routes_refuse_an_embedding_model(both: TestClient[Litestar], api_key: str) -> None:
    client = sdk(both, api_key)
    calls: list[Callable[[str], Any]] = [
        lambda model: client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}]),
        lambda model: client.completions.create(model=model, prompt="hi", max_tokens=2),
        lambda model: client.responses.create(model=model, input="hi"),
    ]
    for call in calls:
        with pytest.raises(openai.BadRequestError) as err:
            call(MODEL)
        assert (err.value.param, err.value.code) == ("model", "model_task_mismatch")
        assert "/v1/embeddings" in err.value.message
        assert call("fake") is not None  # the generation model beside it answers
    listed = {m.id for m in client.models.list()}
    assert listed == {"fake", MODEL}


def test_embeddings_refuse_a_generation_model(both: TestClient[Litestar], api_key: str) -> None:
    client = sdk(both, api_key)
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="fake", input="hi")
    assert (err.value.param, err.value.code) == ("model", "model_task_mismatch")
    out = client.embeddings.create(model=MODEL, input="hi", encoding_format="float")
    assert out.data[0].embedding == vector(ids("hi"))
    with pytest.raises(openai.NotFoundError) as missing:
        client.embeddings.create(model="nope", input="hi")
    assert missing.value.code == "model_not_found"


def test_embeddings_refuse_a_remote_model(settings: Settings, api_key: str) -> None:
    mock = MockUpstream(lambda request, body: httpx.Response(500))
    with serving(settings, mock, api_key) as (http, _):
        r = http.post("/v1/embeddings", json={"model": "remote", "input": "hi"})
    error = assert_error(r, 400, "invalid_request_error", "model_task_mismatch")
    assert error["param"] == "model" and "remote" in error["message"] and mock.calls == 0


def test_tokenize_on_an_embedding_model(both: TestClient[Litestar]) -> None:
    counted = both.post("/tokenize", json={"model": MODEL, "prompt": "hi"}).json()
    billed = embed(both, input="hi").json()
    assert counted == {"count": 4, "max_model_len": MAX_LEN, "tokens": ids("hi")}
    assert billed["usage"]["prompt_tokens"] == counted["count"]
    assert both.post("/detokenize", json={"model": MODEL, "tokens": counted["tokens"]}).json() == {"prompt": "hi"}
    r = both.post("/tokenize", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


# ---- batching, overload, failure --------------------------------------------------------------------------------


def test_concurrent_requests_share_a_batch(settings: Settings, api_key: str) -> None:
    embedder = FakeEmbedder(delay_s=0.2)
    texts = [[f"request {k} input {j}" for j in range(k % 3 + 1)] for k in range(8)]
    with TestClient(create_app(settings, engine=embedder)) as http:
        client = sdk(http, api_key)
        with ThreadPoolExecutor(len(texts)) as pool:
            outs = list(pool.map(lambda t: client.embeddings.create(model=MODEL, input=t), texts))
    for given, out in zip(texts, outs, strict=True):
        assert served_vectors(out) == [vector(ids(t)) for t in given]
    owner = {tuple(ids(t)): k for k, given in enumerate(texts) for t in given}
    requests_per_batch = [len({owner[tuple(i)] for i in batch}) for batch in embedder.batches]
    assert sum(len(b) for b in embedder.batches) == sum(len(t) for t in texts)
    assert max(requests_per_batch) >= 2, embedder.batches


def wait_until(check: Callable[[], bool], timeout_s: float = 5) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_a_full_queue_is_503_overloaded(settings: Settings, api_key: str) -> None:
    embedder = FakeEmbedder(delay_s=0.5, max_queue_size=4)
    with TestClient(create_app(settings, engine=embedder)) as http:
        http.headers.update(bearer(api_key))
        results: dict[str, httpx.Response] = {}

        def send(name: str, inputs: list[str]) -> None:
            results[name] = embed(http, input=inputs)

        running = threading.Thread(target=send, args=("running", ["a"]))
        running.start()
        wait_until(lambda: embedder.num_running == 1)
        queued = threading.Thread(target=send, args=("queued", ["b", "c", "d"]))
        queued.start()
        wait_until(lambda: embedder.num_waiting == 3)
        refused = embed(http, input=["e", "f"])
        running.join()
        queued.join()
    error = assert_error(refused, 503, "server_error", "overloaded")
    assert int(refused.headers["retry-after"]) >= 1 and error["message"]
    assert [r.status_code for r in results.values()] == [200, 200]
    assert all(ids("e") not in batch for batch in embedder.batches)


def test_a_failing_model_is_500_and_charges_nothing(settings: Settings, api_key: str) -> None:
    embedder = FakeEmbedder(fail=True)
    key = role_key(settings, "failing")
    with TestClient(create_app(settings, engine=embedder)) as http:
        failed = http.post("/v1/embeddings", json={"model": MODEL, "input": ["hello", "world"]}, headers=bearer(key))
        error = assert_error(failed, 500, "server_error", "model_error")
        assert error["param"] is None
        assert usage_of(http, api_key, "failing-key")["tokens"] == 0
        embedder.fail = False
        ok = http.post("/v1/embeddings", json={"model": MODEL, "input": ["hello", "world"]}, headers=bearer(key))
        assert ok.status_code == 200
        assert usage_of(http, api_key, "failing-key")["tokens"] == ok.json()["usage"]["prompt_tokens"] == 14


def test_a_client_that_leaves_cancels_its_wait_and_is_charged_nothing(settings: Settings, api_key: str) -> None:
    embedder = FakeEmbedder(delay_s=1.0)
    key = role_key(settings, "leaving")
    with (
        live_server(create_app(settings, engine=embedder)) as base,
        httpx.Client(base_url=base, headers=bearer(api_key), timeout=10) as http,
    ):
        busy = threading.Thread(target=lambda: embed(http, input="first"))
        busy.start()
        wait_until(lambda: embedder.num_running == 1)
        timed_out: list[bool] = []

        def leave_early() -> None:
            with httpx.Client(base_url=base, headers=bearer(key), timeout=0.3) as impatient:
                try:
                    embed(impatient, input=["left", "early"])
                except httpx.ReadTimeout:
                    timed_out.append(True)

        impatient = threading.Thread(target=leave_early)
        impatient.start()
        wait_until(lambda: embedder.num_waiting == 2)
        impatient.join()
        assert timed_out
        wait_until(lambda: embedder.num_waiting == 0)  # its inputs left the queue while the first ran
        assert embedder.num_running == 1
        busy.join()
        assert usage_of(http, api_key, "leaving-key")["tokens"] == 0
    assert embedder.batches == [[ids("first")]]  # never embedded
    rows = [r for r in log_rows(settings) if r["route"] == "/v1/embeddings"]
    left = next(r for r in rows if r["status"] != 200)
    assert (left["status"], left["error_type"], left["model"]) == (499, "client_closed_request", MODEL)


# ---- the gateway ------------------------------------------------------------------------------------------------


def test_keys_and_allowlists_apply(http: TestClient[Litestar], settings: Settings) -> None:
    r = http.post("/v1/embeddings", json={"model": MODEL, "input": "hi"}, headers={"Authorization": ""})
    assert_error(r, 401, "invalid_request_error", "invalid_api_key")
    elsewhere = sdk(http, role_key(settings, "elsewhere", allowed_models=["other"]))
    with pytest.raises(openai.PermissionDeniedError) as err:
        elsewhere.embeddings.create(model=MODEL, input="hi")
    assert err.value.code == "model_not_allowed"
    allowed = sdk(http, role_key(settings, "embedding", allowed_models=[MODEL]))
    assert len(allowed.embeddings.create(model=MODEL, input=["a", "b"]).data) == 2


def test_rpm_limit_with_headers(http: TestClient[Litestar], settings: Settings) -> None:
    client = sdk(http, role_key(settings, "rpm2", rpm=2))
    first = client.embeddings.with_raw_response.create(model=MODEL, input="hi")
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert len(first.parse().data) == 1
    client.embeddings.create(model=MODEL, input="hi")
    with pytest.raises(openai.RateLimitError) as err:
        client.embeddings.create(model=MODEL, input="hi")
    assert err.value.code == "rate_limit_exceeded"
    assert err.value.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert int(err.value.response.headers["retry-after"]) >= 1


def test_tpm_counts_the_input_tokens(http: TestClient[Litestar], settings: Settings, embedder: FakeEmbedder) -> None:
    tokens = len(ids("hello")) + len(ids("world"))  # 14
    key = role_key(settings, "tpm", tpm=tokens + 2)
    first = http.post("/v1/embeddings", json={"model": MODEL, "input": ["hello", "world"]}, headers=bearer(key))
    assert first.status_code == 200 and first.json()["usage"]["prompt_tokens"] == tokens
    assert first.headers["x-ratelimit-remaining-tokens"] == "2"
    passes = len(embedder.batches)
    second = http.post("/v1/embeddings", json={"model": MODEL, "input": ["hello", "world"]}, headers=bearer(key))
    assert second.status_code == 429 and second.json()["error"]["type"] == "tokens", second.text
    most = http.post("/v1/embeddings", json={"model": MODEL, "input": [[104] * MAX_LEN] * 2048}, headers=bearer(key))
    assert most.status_code == 429 and str(MAX_LEN * 2048) in most.json()["error"]["message"], most.text
    assert len(embedder.batches) == passes  # refused before any forward pass
    small = http.post("/v1/embeddings", json={"model": MODEL, "input": [104, 105]}, headers=bearer(key))
    assert small.status_code == 200, small.text  # two tokens still fit the window


def test_monthly_token_quota(http: TestClient[Litestar], settings: Settings, api_key: str) -> None:
    client = sdk(http, role_key(settings, "metered", monthly_tokens=20))
    assert client.embeddings.create(model=MODEL, input=["hello", "world"]).usage.prompt_tokens == 14
    with pytest.raises(openai.RateLimitError) as err:  # 14 used + 7 > 20
        client.embeddings.create(model=MODEL, input="hello")
    assert err.value.code == "insufficient_quota"
    assert client.embeddings.create(model=MODEL, input=[104] * 6).usage.prompt_tokens == 6  # 20 exactly
    assert usage_of(http, api_key, "metered-key") == {"tokens": 20, "requests": 2}


@pytest.mark.parametrize("store_prompts", [False, True])
def test_request_log_rows(settings: Settings, api_key: str, store_prompts: bool) -> None:
    s = msgspec.structs.replace(settings, store_prompts=store_prompts)
    with TestClient(create_app(s, engine=FakeEmbedder())) as http:
        client = sdk(http, api_key)
        client.embeddings.create(model=MODEL, input=["secret one", "secret two"])
        client.embeddings.create(model=MODEL, input=[[104, 105]])
        with pytest.raises(openai.BadRequestError):
            client.embeddings.create(model=MODEL, input="")
    rows = [r for r in log_rows(s) if r["route"] == "/v1/embeddings"]
    assert [(r["status"], r["model"], r["prompt_tokens"], r["completion_tokens"]) for r in rows] == [
        (200, MODEL, 24, 0),
        (200, MODEL, 2, 0),
        (400, None, 0, 0),  # refused before the exchange, like any request refused by its checks
    ]
    assert [r["error_type"] for r in rows] == [None, None, "empty_input"]
    assert all(r["method"] == "POST" and r["key_id"].startswith("key_") and r["latency_ms"] > 0 for r in rows)
    if store_prompts:
        assert rows[0]["prompt_text"] == "secret one\nsecret two" and rows[1]["prompt_text"] == "hi"
        assert rows[0]["output_text"] is None  # vectors are not text
    else:
        assert all(r["prompt_text"] is None and r["output_text"] is None for r in rows)


def test_metrics(http: TestClient[Litestar], client: openai.OpenAI) -> None:
    client.embeddings.create(model=MODEL, input=["hello", "world"])
    client.embeddings.create(model=MODEL, input=[104, 105, 106])
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=MODEL, input=[])
    metrics = http.get("/metrics").text
    assert 'llm_server_requests_total{method="POST",route="/v1/embeddings",status="2xx"} 2.0' in metrics
    assert 'llm_server_requests_total{method="POST",route="/v1/embeddings",status="4xx"} 1.0' in metrics
    assert 'llm_server_prompt_tokens_total{model_name="fake-embed"} 17.0' in metrics
    assert 'llm_server_generation_tokens_total{model_name="fake-embed"} 0.0' in metrics
    assert 'llm_server_request_duration_seconds_count{route="/v1/embeddings"} 3.0' in metrics
    assert 'llm_server_e2e_request_latency_seconds_count{model_name="fake-embed"} 2.0' in metrics


# ---- /tokenize follows the server's settings as chat does -------------------------------------------------------


def test_tokenize_renders_tools_with_the_configured_tool_call_parser(settings: Settings, api_key: str) -> None:
    """A template that shows no tool-call format takes ``tools`` once ``TOOL_CALL_PARSER`` names one: ``/tokenize``
    must count what that chat request bills, not refuse the tools."""
    s = msgspec.structs.replace(settings, tool_call_parser="hermes")
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    body = {"model": "fake", "messages": [{"role": "user", "content": "Weather?"}], "tools": [tool]}
    with TestClient(create_app(s, engine=templated_engine(PLAIN, ["Sunny."]))) as http:
        http.headers.update(bearer(api_key))
        billed = http.post("/v1/chat/completions", json=body)
        counted = http.post("/tokenize", json=body)
    assert billed.status_code == 200, billed.text
    assert counted.status_code == 200, counted.text
    assert counted.json()["count"] == billed.json()["usage"]["prompt_tokens"]
