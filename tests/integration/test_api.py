"""HTTP behaviour of the app over the fake engine: wire format, errors, headers."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import TestClient

from server.engine.fake import FakeEngine
from tests.fakes.engines import without_chat_template

USER = [{"role": "user", "content": "hi"}]


def chat(client: TestClient[Litestar], **body: Any) -> Any:
    return client.post("/v1/chat/completions", json={"model": "fake", "messages": USER, **body})


def normalise(raw: str) -> str:
    raw = re.sub(r'"id":"chatcmpl-[0-9a-f]+"', '"id":"chatcmpl-X"', raw)
    return re.sub(r'"created":\d+', '"created":0', raw)


def test_sse_bytes_are_frozen(make_app: Callable[..., Litestar], authed: Callable[[Any], Any]) -> None:
    with authed(TestClient(make_app(script=["Hi", " there"]))) as client:
        r = chat(client, stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache"
    head = '{"id":"chatcmpl-X","object":"chat.completion.chunk","created":0,"model":"fake","system_fingerprint":null,'
    expected = (
        f'data: {head}"choices":[{{"index":0,"delta":{{"role":"assistant","content":""}},"logprobs":null,'
        '"finish_reason":null}],"usage":null}\n\n'
        f'data: {head}"choices":[{{"index":0,"delta":{{"content":"Hi"}},"logprobs":null,"finish_reason":null}}],'
        '"usage":null}\n\n'
        f'data: {head}"choices":[{{"index":0,"delta":{{"content":" there"}},"logprobs":null,"finish_reason":null}}],'
        '"usage":null}\n\n'
        f'data: {head}"choices":[{{"index":0,"delta":{{}},"logprobs":null,"finish_reason":"stop"}}],"usage":null}}\n\n'
        f'data: {head}"choices":[],"usage":{{"prompt_tokens":52,"completion_tokens":3,"total_tokens":55,'
        '"prompt_tokens_details":{"cached_tokens":0}}}\n\n'
        "data: [DONE]\n\n"
    )
    assert normalise(r.text) == expected


def test_stream_without_usage_has_no_usage_field(client: TestClient[Litestar]) -> None:
    r = chat(client, stream=True)
    frames = [f for f in r.text.split("\n\n") if f]
    assert frames[-1] == "data: [DONE]"
    chunks = [json.loads(f.removeprefix("data: ")) for f in frames[:-1]]
    assert all("usage" not in c for c in chunks)
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    assert [c["choices"][0]["finish_reason"] for c in chunks].count("stop") == 1
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "Hello, world!"


def test_non_stream_chat_shape(client: TestClient[Litestar]) -> None:
    r = chat(client)
    body = r.json()
    assert r.status_code == 200
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello, world!", "refusal": None}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 7  # six pieces + EOS
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 7


def test_stop_string_spanning_tokens_is_cut_in_both_modes(client: TestClient[Litestar]) -> None:
    body = chat(client, stop=["o, w"]).json()
    assert body["choices"][0]["message"]["content"] == "Hell"
    assert body["choices"][0]["finish_reason"] == "stop"
    r = chat(client, stop=["o, w"], stream=True)
    text = "".join(
        json.loads(f.removeprefix("data: "))["choices"][0]["delta"].get("content", "")
        for f in r.text.split("\n\n")
        if f.startswith("data: {")
    )
    assert text == "Hell"


def test_max_tokens_gives_length(client: TestClient[Litestar]) -> None:
    body = chat(client, max_tokens=2).json()
    assert body["choices"][0]["message"]["content"] == "Hello"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 2


def test_completions_with_every_prompt_form(client: TestClient[Litestar]) -> None:
    for prompt, n in (("ab", 1), (["ab", "cd"], 2), ([97, 98], 1), ([[97], [98, 99]], 2)):
        r = client.post("/v1/completions", json={"model": "fake", "prompt": prompt, "max_tokens": 50})
        body = r.json()
        assert r.status_code == 200, body
        assert body["object"] == "text_completion"
        assert [c["index"] for c in body["choices"]] == list(range(n))
        assert all(c["text"] == "Hello, world!" for c in body["choices"])


def test_completions_default_max_tokens_is_16(make_app: Callable[..., Litestar], authed: Callable[[Any], Any]) -> None:
    with authed(TestClient(make_app(script=["x"] * 40))) as client:
        body = client.post("/v1/completions", json={"model": "fake", "prompt": "a"}).json()
    assert body["usage"]["completion_tokens"] == 16
    assert body["choices"][0]["finish_reason"] == "length"


def test_generate_and_native_stream(client: TestClient[Litestar]) -> None:
    body = client.post("/v1/generate", json={"prompt": "ab", "max_new_tokens": 3}).json()
    assert body == {
        "model": "fake",
        "output": "Hello,",
        "finish_reason": "length",
        "usage": {
            "prompt_tokens": 2,
            "completion_tokens": 3,
            "total_tokens": 5,
            "prompt_tokens_details": {"cached_tokens": 0},
        },
        "cached": False,
    }
    r = client.post("/v1/stream", json={"prompt": "ab", "stop": " wor"})
    frames = [f.removeprefix("data: ") for f in r.text.split("\n\n") if f]
    assert frames[-1] == "[DONE]"
    events = [json.loads(f) for f in frames[:-1]]
    assert "".join(e["output"] for e in events) == "Hello,"
    assert events[-1]["finish_reason"] == "stop" and "usage" in events[-1]


def test_models_routes(client: TestClient[Litestar]) -> None:
    assert client.get("/v1/models").json()["data"][0]["id"] == "fake"
    assert client.get("/v1/models/fake").json()["object"] == "model"
    r = client.get("/v1/models/other")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


BAD_INPUTS: list[tuple[str, dict[str, Any], str | None]] = [
    ("temperature", {"temperature": 2.5}, "temperature"),
    ("temperature type", {"temperature": "hot"}, "temperature"),
    ("temperature as string number", {"temperature": "0.5"}, "temperature"),
    ("negative temperature", {"temperature": -0.1}, "temperature"),
    ("top_p", {"top_p": 1.5}, "top_p"),
    ("top_k", {"top_k": -2}, "top_k"),
    ("min_p", {"min_p": 2}, "min_p"),
    ("max_tokens zero", {"max_tokens": 0}, "max_tokens"),
    ("max_tokens type", {"max_tokens": "5"}, "max_tokens"),
    ("max_completion_tokens", {"max_completion_tokens": -1}, "max_completion_tokens"),
    ("stream int", {"stream": 0}, "stream"),
    ("stop type", {"stop": 5}, "stop"),
    ("too many stops", {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("empty stop", {"stop": [""]}, "stop"),
    ("seed type", {"seed": 1.5}, "seed"),
    ("seed too large", {"seed": 2**70}, "seed"),
    ("empty messages", {"messages": []}, "messages"),
    ("bad role", {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ("content type", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("missing content", {"messages": [{"role": "user"}]}, "messages[0].content"),
    (
        "image part",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages[0].content[0].type",
    ),
    ("n out of range", {"n": 0}, "n"),
    ("n too large", {"n": 129}, "n"),
    ("top_logprobs without logprobs", {"top_logprobs": 3}, "top_logprobs"),
    ("top_logprobs range", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("logit_bias key", {"logit_bias": {"abc": 5}}, "logit_bias"),
    ("logit_bias out of vocab", {"logit_bias": {"99999999": 5}}, "logit_bias"),
    ("logit_bias range", {"logit_bias": {"1": 101}}, "logit_bias"),
    ("presence_penalty range", {"presence_penalty": 3}, "presence_penalty"),
    ("frequency_penalty range", {"frequency_penalty": -2.5}, "frequency_penalty"),
    ("repetition_penalty range", {"repetition_penalty": 0}, "repetition_penalty"),
    # The fake engine cannot constrain its output: a clear 400, not a silently unconstrained answer.
    ("response_format on a scripted engine", {"response_format": {"type": "json_object"}}, "response_format"),
    ("response_format type", {"response_format": {"type": "yaml"}}, "response_format.type"),
    ("tool_choice without tools", {"tool_choice": "required"}, "tool_choice"),
    ("functions", {"functions": [{"name": "f"}]}, "functions"),
    (
        "tool message without call",
        {"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]},
        "messages[0].tool_call_id",
    ),
    ("stream_options without stream", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("continue without assistant", {"continue_final_message": True}, "continue_final_message"),
    ("missing model", {"model": None}, "model"),
]


@pytest.mark.parametrize(("case", "patch", "param"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_chat_inputs_are_400_naming_the_param(
    client: TestClient[Litestar], case: str, patch: dict[str, Any], param: str | None
) -> None:
    body: dict[str, Any] = {"model": "fake", "messages": USER, **patch}
    body = {k: v for k, v in body.items() if v is not None}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param, err
    assert set(err) == {"message", "type", "param", "code"}
    assert "x-request-id" in r.headers


BAD_COMPLETIONS: list[tuple[str, dict[str, Any], str]] = [
    ("mixed prompt", {"prompt": ["a", 1]}, "prompt"),
    ("empty prompt list", {"prompt": []}, "prompt"),
    ("token out of vocab", {"prompt": [-1]}, "prompt"),
    ("empty prompt", {"prompt": ""}, "prompt"),
    ("suffix", {"prompt": "a", "suffix": "b"}, "suffix"),
    ("best_of", {"prompt": "a", "best_of": 2}, "best_of"),
    ("best_of below n", {"prompt": "a", "best_of": 2, "n": 3}, "best_of"),
    ("logprobs range", {"prompt": "a", "logprobs": 6}, "logprobs"),
    ("too many choices", {"prompt": ["a", "b"], "n": 65}, "n"),
    ("logit_bias out of vocab", {"prompt": "a", "logit_bias": {"99999999": 1}}, "logit_bias"),
    ("prompt type", {"prompt": {"a": 1}}, "prompt"),
]


@pytest.mark.parametrize(("case", "body", "param"), BAD_COMPLETIONS, ids=[c[0] for c in BAD_COMPLETIONS])
def test_bad_completion_inputs(client: TestClient[Litestar], case: str, body: dict[str, Any], param: str) -> None:
    r = client.post("/v1/completions", json={"model": "fake", **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_malformed_json_is_400(client: TestClient[Litestar]) -> None:
    r = client.post(
        "/v1/chat/completions", content=b'{"model": "fake", "messages": [', headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_json"


def test_unknown_fields_are_ignored(client: TestClient[Litestar]) -> None:
    assert chat(client, something_new={"x": 1}, user="u1", store=False, metadata={"a": "b"}).status_code == 200


def test_unknown_model_is_404(client: TestClient[Litestar]) -> None:
    r = client.post("/v1/chat/completions", json={"model": "gpt-9", "messages": USER})
    assert r.status_code == 404
    assert r.json()["error"] == {
        "message": "The model 'gpt-9' does not exist or you do not have access to it.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }


def test_context_length_exceeded_before_any_stream_byte(
    make_app: Callable[..., Litestar], authed: Callable[[Any], Any]
) -> None:
    with authed(TestClient(make_app(max_model_len=64))) as client:
        for stream in (False, True):
            r = chat(client, max_tokens=60, stream=stream)
            assert r.status_code == 400
            assert r.headers["content-type"].startswith("application/json")
            assert r.json()["error"]["code"] == "context_length_exceeded"
            assert r.json()["error"]["param"] == "max_tokens"
        long = [{"role": "user", "content": "x" * 100}]
        r = client.post("/v1/chat/completions", json={"model": "fake", "messages": long, "stream": True})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        r = client.post("/v1/completions", json={"model": "fake", "prompt": "abc", "max_tokens": 62})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_body_too_large_is_413(make_app: Callable[..., Litestar], settings: Any, authed: Callable[[Any], Any]) -> None:
    import msgspec

    from server.app import create_app

    app = create_app(msgspec.structs.replace(settings, request_max_body_size=2048), engine=FakeEngine())
    with authed(TestClient(app)) as client:
        r = client.post(
            "/v1/chat/completions", json={"model": "fake", "messages": [{"role": "user", "content": "x" * 5000}]}
        )
    assert r.status_code == 413
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_unknown_route_and_method_use_the_envelope(client: TestClient[Litestar]) -> None:
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    assert r.headers["x-request-id"]
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405 and "POST" in r.headers["allow"]
    assert r.json()["error"]["code"] == "method_not_allowed"


def test_request_id_is_kept_when_sane_and_replaced_when_not(client: TestClient[Litestar]) -> None:
    assert client.get("/health", headers={"x-request-id": "abc-123"}).headers["x-request-id"] == "abc-123"
    rid = client.get("/health", headers={"x-request-id": "bad id <script>"}).headers["x-request-id"]
    assert rid.startswith("req_")


def test_queue_full_is_503_overloaded_with_retry_after(
    make_app: Callable[..., Litestar], authed: Callable[[Any], Any]
) -> None:
    engine = FakeEngine(max_queue_size=1)
    with authed(TestClient(make_app(engine))) as client:
        held = engine.generate(
            __import__("server.engine.base", fromlist=["EngineRequest"]).EngineRequest(
                "held", [1], __import__("server.engine.base", fromlist=["SamplingParams"]).SamplingParams(max_tokens=1)
            )
        )
        for stream in (False, True):
            r = chat(client, stream=stream)
            assert r.status_code == 503
            assert r.json()["error"]["code"] == "overloaded"
            assert r.headers["retry-after"]
        __import__("asyncio").run(held.aclose())
        assert chat(client).status_code == 200


def test_engine_failure_mid_stream_is_an_error_frame(
    make_app: Callable[..., Litestar], authed: Callable[[Any], Any]
) -> None:
    with authed(TestClient(make_app(script=["a", "b", "c"], fail_after=2))) as client:
        r = chat(client, stream=True)
        assert r.status_code == 200
        frames = [f for f in r.text.split("\n\n") if f]
        assert json.loads(frames[-1].removeprefix("data: "))["error"]["type"] == "server_error"
        assert "[DONE]" not in r.text
        r = chat(client)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"


def test_not_ready_is_503_and_readyz_says_loading(
    make_app: Callable[..., Litestar], authed: Callable[[Any], Any]
) -> None:
    class Slow(FakeEngine):
        async def start(self) -> None:  # never becomes ready
            return None

    with authed(TestClient(make_app(Slow()))) as client:
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = chat(client)
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
        assert client.get("/health").status_code == 200


def test_metrics_and_openapi(client: TestClient[Litestar]) -> None:
    chat(client)
    text = client.get("/metrics").text
    assert 'llm_server_requests_total{method="POST",route="/v1/chat/completions",status="2xx"} 1.0' in text
    schema = client.get("/schema/openapi.json").json()
    assert "/v1/chat/completions" in schema["paths"]


def test_model_without_chat_template_is_a_clear_400(
    make_app: Callable[..., Litestar], authed: Callable[[Any], Any]
) -> None:
    with authed(TestClient(make_app(without_chat_template()))) as client:
        r = chat(client)
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "chat_template_missing"
        assert "/v1/completions" in r.json()["error"]["message"]
        assert client.post("/v1/completions", json={"model": "fake", "prompt": "a"}).status_code == 200
