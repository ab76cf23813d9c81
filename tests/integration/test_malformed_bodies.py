"""Malformed request bodies are 400s in the OpenAI envelope on every route that reads a body, never 500s.

Deep nesting (even in an unknown field), invalid UTF-8, lone UTF-16 surrogate escapes and numbers out of range are
refused when the body is decoded, once, before any handler (or Litestar, or the remote path) reads it again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from litestar import Litestar
from litestar.testing import TestClient

from server.api.common import BODY_TYPE, MAX_JSON_DEPTH, decode_body, nesting_exceeds
from server.app import create_app
from server.engine.fake import FakeEngine
from server.errors import OpenAIError
from server.models.file import RemoteModel
from server.providers.upstream import Upstream
from server.settings import Settings
from server.wiring.models import ServedModels

MSGS = [{"role": "user", "content": "hi"}]
# A valid body per route that reads one; {key_id} and {name} need not exist: bodies are decoded before the handler.
BASE: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/v1/chat/completions"): {"model": "local", "messages": MSGS},
    ("POST", "/v1/completions"): {"model": "local", "prompt": "hi"},
    ("POST", "/v1/generate"): {"prompt": "hi"},
    ("POST", "/v1/stream"): {"prompt": "hi"},
    ("POST", "/v1/responses"): {"model": "local", "input": "hi"},
    ("POST", "/v1/embeddings"): {"model": "local", "input": "hi"},
    ("POST", "/tokenize"): {"model": "local", "prompt": "hi"},
    ("POST", "/detokenize"): {"model": "local", "tokens": [1]},
    ("POST", "/admin/keys"): {"name": "n"},
    ("POST", "/admin/keys/{key_id:str}/rotate"): {},
    ("POST", "/admin/roles"): {"name": "r"},
    ("PATCH", "/admin/roles/{name:str}"): {},
}
# A known string field per route, where the bad string goes too.
STRING_FIELD = {
    "/v1/chat/completions": "user",
    "/v1/completions": "prompt",
    "/v1/generate": "prompt",
    "/v1/stream": "prompt",
    "/v1/responses": "instructions",
    "/v1/embeddings": "input",
    "/tokenize": "prompt",
    "/detokenize": "model",
    "/admin/keys": "name",
    "/admin/keys/{key_id:str}/rotate": None,
    "/admin/roles": "name",
    "/admin/roles/{name:str}": None,
}
DEEP = 1200


def nested(depth: int, kind: str = "[") -> bytes:
    if kind == "[":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * (depth - 1) + b"{}" + b"}" * (depth - 1)


# name -> JSON value bytes placed in an unknown field (and, for strings, in a known string field)
BAD_VALUES: dict[str, bytes] = {
    "deep array": nested(DEEP),
    "deep object": nested(DEEP, "{"),
    "one level too deep": nested(MAX_JSON_DEPTH),  # inside the body object: MAX_JSON_DEPTH + 1 levels
    "utf-8 of a surrogate": b'"\xed\xa0\x80"',
    "invalid utf-8 byte": b'"\xff"',
    "truncated utf-8": b'"abc\xc3"',
    "lone high surrogate escape": b'"\\ud800"',
    "lone high surrogate escape then text": b'"\\ud800x"',
    "lone low surrogate escape": b'"\\udc00"',
    "5,000-digit integer": b"9" * 5000,
    "1e400": b"1e400",
    "-1e400": b"-1e400",
}
STRING_VALUES = {k for k, v in BAD_VALUES.items() if v.startswith(b'"')}


def routes(app: Litestar) -> list[tuple[str, str]]:
    """Every POST and PATCH route under /v1 and /admin (and the tokenizer routes) that declares a body."""
    found = []
    for route in app.routes:
        for method, handler in getattr(route, "route_handler_map", {}).items():
            if method in ("POST", "PATCH") and route.path.startswith(("/v1", "/admin", "/tokenize", "/detokenize")):
                handler = handler[0] if isinstance(handler, tuple) else handler
                if BODY_TYPE in handler.opt:
                    found.append((method, route.path))
    return sorted(found)


def url(path: str) -> str:
    return path.replace("{key_id:str}", "key_0000000000000000").replace("{name:str}", "default")


def with_unknown(base: dict[str, Any], value: bytes) -> bytes:
    head = json.dumps(base).encode()[:-1]
    return head + (b", " if base else b"") + b'"zz_unknown": ' + value + b"}"


def with_string(path: str, base: dict[str, Any], value: bytes) -> bytes | None:
    field = STRING_FIELD[path]
    if field is None:
        return None
    marker = "@@BAD@@"
    body = dict(base)
    if field == "user":  # chat: the message content
        body["messages"] = [{"role": "user", "content": marker}]
    else:
        body[field] = marker
    return json.dumps(body).encode().replace(f'"{marker}"'.encode(), value)


def upstream_answer(request: httpx.Request) -> httpx.Response:
    return httpx.Response(
        200,
        json={
            "id": "chatcmpl-up",
            "object": "chat.completion",
            "created": 1,
            "model": "upstream-model",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "up"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        },
    )


@pytest.fixture
def app(settings: Settings) -> Litestar:
    served = ServedModels()
    served.add("local", FakeEngine(["ok"], served_model_name="local"))
    entry = RemoteModel(
        name="remote", base_url="http://upstream.test/v1", upstream_model="upstream-model", health_interval_s=3600.0
    )
    served.add("remote", Upstream(entry, None, transport=httpx.MockTransport(upstream_answer)))
    return create_app(settings, models=served)


@pytest.fixture
def http(app: Litestar, authed: Callable[[Any], Any]) -> Iterator[TestClient[Litestar]]:
    with authed(TestClient(app)) as client:
        client.headers["content-type"] = "application/json"
        yield client


def assert_400(r: httpx.Response, label: str) -> dict[str, Any]:
    assert r.status_code == 400, f"{label}: {r.status_code} {r.text[:300]}"
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, label
    err: dict[str, Any] = body["error"]
    assert err["type"] == "invalid_request_error" and err["message"], label
    return err


def test_the_matrix_covers_every_route_with_a_body(app: Litestar) -> None:
    assert routes(app) == sorted(BASE)


@pytest.mark.parametrize("bad", sorted(BAD_VALUES))
def test_malformed_bodies_are_400_on_every_route(http: TestClient[Litestar], bad: str) -> None:
    value = BAD_VALUES[bad]
    for (method, path), base in BASE.items():
        bodies = [("unknown field", with_unknown(base, value))]
        if bad in STRING_VALUES and (in_field := with_string(path, base, value)) is not None:
            bodies.append(("known field", in_field))
        for where, content in bodies:
            label = f"{method} {path} {bad} in {where}"
            err = assert_400(http.request(method, url(path), content=content), label)
            words = {
                "deep": "nested too deeply",
                "too deep": "nested too deeply",
                "utf-8": "not valid UTF-8",
                "surrogate escape": "lone UTF-16 surrogate escape",
                "digit": "out of range",
                "e400": "out of range",
            }
            expected = next(text for key, text in words.items() if key in bad)
            assert expected in err["message"], (label, err)
    # The remote model's path decodes the same body again: refused before it too.
    err = assert_400(http.post("/v1/chat/completions", content=with_unknown(BASE_REMOTE, value)), f"remote {bad}")
    assert err["code"] == "invalid_json", err


BASE_REMOTE = {"model": "remote", "messages": MSGS}


@pytest.mark.parametrize(
    ("field", "value"),
    [(f, v) for f in ("max_tokens", "seed", "n") for v in (b"9" * 5000, b"1e400", b"-" + b"9" * 5000)],
)
def test_huge_numbers_in_known_fields_are_400_naming_the_field(
    http: TestClient[Litestar], field: str, value: bytes
) -> None:
    for path, model in (
        ("/v1/chat/completions", "local"),
        ("/v1/completions", "local"),
        ("/v1/chat/completions", "remote"),
    ):
        base = {"model": model, "messages": MSGS} if "chat" in path else {"model": model, "prompt": "hi"}
        content = json.dumps(base).encode()[:-1] + b', "' + field.encode() + b'": ' + value + b"}"
        err = assert_400(http.post(path, content=content), f"{path} {model} {field}={value[:6]!r}")
        assert err["param"] == field and "out of range" in err["message"], err
    for path, field2 in (("/v1/generate", "max_new_tokens"), ("/v1/stream", "seed")):
        err = assert_400(http.post(path, content=b'{"prompt": "hi", "' + field2.encode() + b'": ' + value + b"}"), path)
        assert err["param"] == field2
    for method, path, field3 in (
        ("PATCH", "/admin/roles/default", "rpm"),
        ("POST", "/admin/keys", "expires_in_days"),
        ("POST", "/admin/keys/key_x/rotate", "grace_hours"),
    ):
        content = b'{"name": "n", "' + field3.encode() + b'": ' + value + b"}"
        assert assert_400(http.request(method, path, content=content), path)["param"] == field3


def test_what_is_valid_stays_accepted(http: TestClient[Litestar]) -> None:
    accepted = {
        "128 levels in an unknown field": with_unknown(BASE[("POST", "/v1/chat/completions")], nested(127)),
        "a surrogate pair and non-ASCII text": json.dumps(
            {"model": "local", "messages": [{"role": "user", "content": "\U0001f600 naïve 中文"}]}, ensure_ascii=True
        ).encode(),
        "brackets and quotes inside strings": json.dumps(
            {"model": "local", "messages": [{"role": "user", "content": '[{"' * 300 + '\\"]'}]}
        ).encode(),
        "a 300-digit integer in an unknown field": with_unknown({"model": "local", "messages": MSGS}, b"9" * 300),
        "1e-400 in an unknown field": with_unknown({"model": "local", "messages": MSGS}, b"1e-400"),
        "1e308 in an unknown field": with_unknown({"model": "local", "messages": MSGS}, b"1e308"),
    }
    for label, content in accepted.items():
        for model in ("local", "remote"):
            r = http.post("/v1/chat/completions", content=content.replace(b'"local"', f'"{model}"'.encode(), 1))
            assert r.status_code == 200, (label, model, r.text[:300])
    r = http.post("/admin/roles", content=with_unknown({"name": "deep-ok"}, nested(127)))
    assert r.status_code == 201, r.text


def test_nesting_is_measured_without_recursion() -> None:
    assert not nesting_exceeds(b"[]", 1)
    assert nesting_exceeds(b"[[]]", 1)
    assert not nesting_exceeds(nested(MAX_JSON_DEPTH))
    assert nesting_exceeds(nested(MAX_JSON_DEPTH + 1))
    assert nesting_exceeds(nested(MAX_JSON_DEPTH + 1, "{"))
    assert not nesting_exceeds(b"[" + b"[]," * 10_000 + b"[]]")  # many brackets, little depth
    sawtooth = (b"[" * 128 + b"]" * 128) * 100
    assert not nesting_exceeds(b"[" + sawtooth + b"]", 129) and nesting_exceeds(b"[" + sawtooth + b"]", 128)
    in_strings = json.dumps({"s": "[" * 1000, "t": '\\"[[[[', "u": [["x"]]}).encode()
    assert not nesting_exceeds(in_strings, 3) and nesting_exceeds(in_strings, 2)
    # 10 MB of brackets (the body limit) is judged in well under a second, and a 100,000-deep body never recurses.
    started = time.perf_counter()
    assert not nesting_exceeds(b"[" + (b"[" * 100 + b"]" * 100) * 50_000 + b"]")
    assert nesting_exceeds(nested(100_000))
    assert time.perf_counter() - started < 5.0


def test_decode_body_messages() -> None:
    from schemas.openai.chat import ChatCompletionRequest

    with pytest.raises(OpenAIError) as exc:
        decode_body(b'{"model": "m", "messages": [], "x": "\\udfff"}', ChatCompletionRequest)
    assert "'\\udfff'" in exc.value.message and exc.value.code == "invalid_json"
    with pytest.raises(OpenAIError) as exc:
        decode_body(b'{"model": "\xc3\x28"}', ChatCompletionRequest)
    assert "byte 0xC3 at offset 11" in exc.value.message
    ok = decode_body(
        b'{"model": "m", "messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}', ChatCompletionRequest
    )
    assert ok.messages[0].content == "\U0001f600"


def test_nesting_hidden_in_a_json_string_is_400_too(http: TestClient[Litestar]) -> None:
    """A tool call's ``arguments`` is JSON text parsed later: its depth is not the body's; a 400 naming the field."""
    arguments = '{"a":' + "[" * 5000 + "]" * 5000 + "}"
    body = {
        "model": "local",
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "r"},
        ],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    }  # fmt: skip
    err = assert_400(http.post("/v1/chat/completions", json=body), "deep tool arguments")
    assert "nested too deeply" in err["message"] and err["param"] == "messages[1].tool_calls[0].function.arguments"
