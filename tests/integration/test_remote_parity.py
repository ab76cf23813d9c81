"""Remote = local: a remote model answers a bad body exactly as a local one, and what goes upstream is bounded.

The same bodies go to ``local`` (a FakeEngine that says it can enforce grammars, so structured-output checks run
as on a Transformers model) and to ``remote`` (the fake upstream): every one gets the same 400 envelope and the
upstream receives nothing. Then: the forwarded body holds only validated fields and one max-tokens value, a capped
role with a quota cannot overshoot whichever max-tokens name the upstream honours, and usage the upstream does not
report properly is estimated and marked so.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from litestar import Litestar
from litestar.testing import TestClient

from schemas.openai.chat import ChatCompletionRequest
from schemas.openai.completions import CompletionRequest
from server.engine.fake import FakeEngine
from server.settings import Settings
from tests.checks import assert_error, frames, log_rows, usage_of
from tests.conftest import DB_NAME, TEST_PEPPER, role_key
from tests.fakes.replies import answers, chat_chunk, chat_json, sse
from tests.fakes.upstream import MSGS, TARGET, MockUpstream, serving


class GrammarFake(FakeEngine):
    """A scripted engine that reports grammar support, so ``response_format`` and ``tool_choice`` are checked
    (and compiled) as on a Transformers model; the bodies sent to it here never reach a step."""

    @property
    def supports_constraints(self) -> bool:
        return True


def local_engine() -> GrammarFake:
    return GrammarFake(["Loc", "al"], served_model_name="local")


@pytest.fixture(scope="module")
def module_settings(tmp_path_factory: pytest.TempPathFactory, template_db: tuple[Path, str]) -> Settings:
    data = tmp_path_factory.mktemp("parity") / "data"
    data.mkdir()
    shutil.copy(template_db[0], data / DB_NAME)
    return Settings(data_dir=data, key_pepper=TEST_PEPPER)


@pytest.fixture(scope="module")
def both(
    module_settings: Settings, template_db: tuple[Path, str]
) -> Iterator[tuple[TestClient[Litestar], MockUpstream]]:
    """One app serving ``local`` and ``remote`` for the whole table (an app per case would triple its time)."""
    mock = MockUpstream(answers)
    with serving(module_settings, mock, template_db[1], local_engine()) as (http, _):
        yield http, mock


# ---- the same 400 for the same body ----------------------------------------------------------------------------

CHAT, TEXT, NATIVE = "/v1/chat/completions", "/v1/completions", "/v1/generate"
BASE: dict[str, dict[str, Any]] = {CHAT: {"messages": MSGS}, TEXT: {"prompt": "ab"}, NATIVE: {"prompt": "ab"}}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
U = "unsupported_parameter"
V = "invalid_value"


def schema_format(schema: Any, **extra: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, **extra}}


# (id, route, patch of the base body, param, code, same message): messages differ only where the local check
# names what a remote model cannot know (its vocabulary).
BAD_BODIES: list[tuple[str, str, dict[str, Any], str | None, str | None, bool]] = [
    # unsupported OpenAI parameters
    ("best_of", TEXT, {"best_of": 3}, "best_of", U, True),
    ("suffix", TEXT, {"suffix": "tail"}, "suffix", U, True),
    ("functions", CHAT, {"functions": [{"name": "f"}]}, "functions", U, True),
    ("function_call", CHAT, {"function_call": "auto"}, "function_call", U, True),
    ("audio output", CHAT, {"modalities": ["text", "audio"]}, "modalities", U, True),
    ("prediction", CHAT, {"prediction": {"type": "content", "content": "x"}}, "prediction", U, True),
    ("web_search_options", CHAT, {"web_search_options": {}}, "web_search_options", U, True),
    ("reasoning_effort", CHAT, {"reasoning_effort": "high"}, "reasoning_effort", U, True),
    ("verbosity", CHAT, {"verbosity": "low"}, "verbosity", U, True),
    ("moderation", CHAT, {"moderation": True}, "moderation", U, True),
    # messages and content parts
    ("5,000 messages", CHAT, {"messages": MSGS * 5000}, "messages", "array_above_max_length", True),
    ("no messages", CHAT, {"messages": []}, "messages", "empty_array", True),
    (
        "image part",
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
        "messages[0].content[0].type",
        U,
        True,
    ),
    (
        "audio part",
        CHAT,
        {
            "messages": [
                {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}
            ]
        },
        "messages[0].content[0].type",
        U,
        True,
    ),
    (
        "file part",
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "file", "file": {}}]}]},
        "messages[0].content[1].type",
        U,
        True,
    ),
    (
        "function role",
        CHAT,
        {"messages": [{"role": "function", "name": "f", "content": "x"}]},
        "messages[0].role",
        U,
        True,
    ),
    (
        "assistant function_call",
        CHAT,
        {"messages": [*MSGS, {"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}}]},
        "messages[1].function_call",
        U,
        True,
    ),
    (
        "tool result without a call",
        CHAT,
        {"messages": [*MSGS, {"role": "tool", "content": "x", "tool_call_id": "nope"}]},
        "messages[1].tool_call_id",
        V,
        True,
    ),
    (
        "tool call arguments not JSON",
        CHAT,
        {
            "messages": [
                *MSGS,
                {"role": "assistant", "tool_calls": [CALL | {"function": {"name": "f", "arguments": "{x"}}]},
            ]
        },
        "messages[1].tool_calls[0].function.arguments",
        V,
        True,
    ),
    (
        "tool call without id",
        CHAT,
        {"messages": [*MSGS, {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f"}}]}]},
        "messages[1].tool_calls[0].id",
        V,
        True,
    ),
    ("continue without assistant", CHAT, {"continue_final_message": True}, "continue_final_message", V, True),
    # stops and streaming
    ("five stops", CHAT, {"stop": ["a", "b", "c", "d", "e"]}, "stop", V, True),
    ("empty stop", TEXT, {"stop": [""]}, "stop", V, True),
    ("native five stops", NATIVE, {"stop": ["a", "b", "c", "d", "e"]}, "stop", V, True),
    ("stream_options without stream", CHAT, {"stream_options": {"include_usage": True}}, "stream_options", V, True),
    ("completions stream_options", TEXT, {"stream_options": {"include_usage": True}}, "stream_options", V, True),
    # tools
    ("empty tools", CHAT, {"tools": []}, "tools", "empty_array", True),
    (
        "129 tools",
        CHAT,
        {"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]},
        "tools",
        V,
        True,
    ),
    ("custom tool", CHAT, {"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0].type", U, True),
    (
        "tool name",
        CHAT,
        {"tools": [{"type": "function", "function": {"name": "bad name"}}]},
        "tools[0].function.name",
        V,
        True,
    ),
    ("duplicate tools", CHAT, {"tools": [TOOL, TOOL]}, "tools[1].function.name", V, True),
    (
        "array parameters",
        CHAT,
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
        "tools[0].function.parameters",
        V,
        True,
    ),
    ("tool_choice without tools", CHAT, {"tool_choice": "required"}, "tool_choice", V, True),
    ("parallel_tool_calls without tools", CHAT, {"parallel_tool_calls": False}, "parallel_tool_calls", V, True),
    (
        "tool_choice unknown function",
        CHAT,
        {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "other"}}},
        "tool_choice",
        V,
        True,
    ),
    ("allowed_tools", CHAT, {"tools": [TOOL], "tool_choice": {"type": "allowed_tools"}}, "tool_choice", U, True),
    # structured outputs (the grammar is compiled for a remote model too: it needs no tokenizer)
    ("json_schema missing", CHAT, {"response_format": {"type": "json_schema"}}, "response_format", V, True),
    (
        "json_schema name",
        CHAT,
        {"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}},
        "response_format.json_schema.name",
        V,
        True,
    ),
    (
        "schema not an object",
        CHAT,
        {"response_format": schema_format([1])},
        "response_format.json_schema.schema",
        V,
        True,
    ),
    (
        "strict not a boolean",
        CHAT,
        {"response_format": schema_format({"type": "object"}, strict="yes")},
        "response_format.json_schema.strict",
        V,
        True,
    ),
    (
        "schema the grammar rejects",
        CHAT,
        {"response_format": schema_format({"type": "objec"})},
        "response_format.json_schema.schema",
        "invalid_json_schema",
        True,
    ),
    (
        "strict schema it cannot enforce",
        CHAT,
        {"response_format": schema_format({"type": "array", "uniqueItems": True}, strict=True)},
        "response_format.json_schema.schema",
        "invalid_json_schema",
        True,
    ),
    (
        "response_format with a forced tool",
        CHAT,
        {"response_format": {"type": "json_object"}, "tools": [TOOL], "tool_choice": "required"},
        "response_format",
        V,
        True,
    ),
    # sampling
    ("top_logprobs without logprobs", CHAT, {"top_logprobs": 2}, "top_logprobs", V, True),
    ("5,000 logit_bias entries", CHAT, {"logit_bias": {str(i): 1 for i in range(5000)}}, "logit_bias", V, True),
    ("logit_bias key of 5,000 digits", CHAT, {"logit_bias": {"9" * 5000: 1}}, "logit_bias", V, False),
    ("completions logit_bias key of 5,000 digits", TEXT, {"logit_bias": {"1" * 5000: 1}}, "logit_bias", V, False),
    ("logit_bias key not a number", CHAT, {"logit_bias": {"abc": 1}}, "logit_bias", V, False),
    ("logit_bias negative key", TEXT, {"logit_bias": {"-1": 1}}, "logit_bias", V, False),
    ("logit_bias value", CHAT, {"logit_bias": {"1": 101}}, "logit_bias", V, True),
    ("temperature above 2 (schema)", CHAT, {"temperature": 2.5}, "temperature", V, True),
    # prompts
    ("empty prompt list", TEXT, {"prompt": []}, "prompt", "empty_array", True),
    ("mixed prompt", TEXT, {"prompt": ["a", 1]}, "prompt", V, True),
    ("129 prompts", TEXT, {"prompt": ["a"] * 129}, "prompt", V, True),
    ("empty token list", TEXT, {"prompt": [[1], []]}, "prompt[1]", V, True),
    ("negative token id", TEXT, {"prompt": [1, -5]}, "prompt", V, False),
    ("empty text prompt", TEXT, {"prompt": ""}, "prompt", V, True),
    ("empty second prompt", TEXT, {"prompt": ["a", ""]}, "prompt[1]", V, True),
    ("prompts x n", TEXT, {"prompt": ["a", "b"], "n": 65}, "n", V, True),
    ("empty native prompt", NATIVE, {"prompt": ""}, "prompt", V, True),
]


def envelope(r: httpx.Response) -> tuple[int, str, str | None, str | None]:
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return r.status_code, error["type"], error["param"], error["code"]


@pytest.mark.parametrize(
    ("route", "patch", "param", "code", "same_message"),
    [case[1:] for case in BAD_BODIES],
    ids=[case[0] for case in BAD_BODIES],
)
def test_a_bad_body_gets_the_same_error_from_a_local_and_a_remote_model(
    both: tuple[TestClient[Litestar], MockUpstream],
    route: str,
    patch: dict[str, Any],
    param: str | None,
    code: str | None,
    same_message: bool,
) -> None:
    http, mock = both
    body = BASE[route] | patch
    before = mock.calls
    local = http.post(route, json=body | {"model": "local"})
    remote = http.post(route, json=body | {"model": "remote"})
    assert local.status_code == 400, local.text
    assert envelope(remote) == envelope(local) == (400, "invalid_request_error", param, code)
    if same_message:
        assert remote.json()["error"]["message"] == local.json()["error"]["message"]
    assert len(remote.json()["error"]["message"]) < 300  # a 5,000-digit key is not echoed back whole
    assert mock.calls == before  # nothing of it reached the upstream


def test_the_logit_bias_vocabulary_is_checked_locally_and_left_to_the_upstream_remotely(
    both: tuple[TestClient[Litestar], MockUpstream],
) -> None:
    """The one check that needs the tokenizer: an id beyond the vocabulary is a 400 locally; a remote model's
    vocabulary is unknown here, so the (well-formed) id goes upstream, which judges it."""
    http, mock = both
    body = {"messages": MSGS, "logit_bias": {"99999999": 5}}
    local = http.post(CHAT, json=body | {"model": "local"})
    remote = http.post(CHAT, json=body | {"model": "remote"})
    assert envelope(local) == (400, "invalid_request_error", "logit_bias", V)
    assert remote.status_code == 200, remote.text
    assert mock.posts[-1].body["logit_bias"] == {"99999999": 5.0}


# ---- only validated fields go upstream -------------------------------------------------------------------------

HOSTILE_EXTRAS = {
    "chat_template": "{% for i in range(100000) %}{{ messages }}{% endfor %}",  # vLLM would render this
    "chat_template_kwargs": {"x": 1},
    "guided_json": {"type": "object"},
    "min_tokens": 100000,
    "prompt_logprobs": 20,
    "whatever": {"nested": [1, 2, 3]},
}


def test_the_forwarded_chat_body_holds_only_validated_fields_and_one_max_tokens(
    settings: Settings, api_key: str
) -> None:
    mock = MockUpstream(answers)
    tool = {
        "type": "function",
        "function": {"name": "f", "description": "d", "parameters": {"type": "object"}, "strict": True, "x": 1},
        "extra": True,
    }
    body = {
        "model": "remote",
        "messages": [
            {"role": "developer", "content": "be brief", "name": "dev"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}], "name": None},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": ""}, "x": 2}],
                "function_call": None,
            },
            {"role": "tool", "content": "42", "tool_call_id": "c1"},
        ],
        "tools": [tool],
        "tool_choice": {"type": "function", "function": {"name": "f", "extra": 1}},
        "response_format": {"type": "text"},
        "logit_bias": {"007": 3},
        "max_tokens": 90000,
        "max_completion_tokens": 20,
        "temperature": 0.5,
        "top_k": 5,
        "n": 2,
        "user": "u1",
        "stream": True,
        "stream_options": {"include_usage": False, "include_obfuscation": True},
        **HOSTILE_EXTRAS,
    }
    with serving(settings, mock, api_key) as (http, _):
        r = http.post(CHAT, json=body)
    assert r.status_code == 200, r.text
    (seen,) = mock.posts
    assert seen.body == {
        "model": TARGET,
        "messages": [
            {"role": "system", "content": "be brief", "name": "dev"},  # as a local model renders a developer message
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            {
                "role": "assistant",
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
            },
            {"role": "tool", "content": "42", "tool_call_id": "c1"},
        ],
        "tools": [
            {
                "type": "function",
                "function": {"name": "f", "description": "d", "parameters": {"type": "object"}, "strict": True},
            }
        ],
        "tool_choice": {"type": "function", "function": {"name": "f"}},
        "response_format": {"type": "text"},
        "logit_bias": {"7": 3.0},
        "n": 2,
        "temperature": 0.5,
        "top_k": 5,
        "user": "u1",
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 20,
        "max_completion_tokens": 20,
        "chat_template_kwargs": {"x": 1},  # the template's variables: a known field, forwarded as is
    }
    known = {f.name for f in msgspec.structs.fields(ChatCompletionRequest)}
    assert set(seen.body) <= known


def test_the_forwarded_completions_and_native_bodies_hold_only_validated_fields(
    settings: Settings, api_key: str
) -> None:
    mock = MockUpstream(answers)
    capped = role_key(settings, "cap16", max_tokens=16)
    text = {"model": "remote", "prompt": [[1, 2], [3]], "n": 2, "best_of": 2, "echo": True, "seed": 7, **HOSTILE_EXTRAS}
    with serving(settings, mock, capped) as (http, _):
        plain = http.post(TEXT, json=text)
        unbounded = http.post(TEXT, json={"model": "remote", "prompt": "ab", "max_tokens": None})
        native = http.post(NATIVE, json={"model": "remote", "prompt": "ab", "max_new_tokens": 9, "whatever": 1})
        above = http.post(NATIVE, json={"model": "remote", "prompt": "ab", "max_new_tokens": 17})
        above_local = http.post(NATIVE, json={"model": "local", "prompt": "ab", "max_new_tokens": 17})
        # max_new_tokens left at its default (256, above the cap): whatever the gateway answers, local and remote agree,
        # and an answered one is generated within the cap
        default_local = http.post(NATIVE, json={"model": "local", "prompt": "ab"})
        default_remote = http.post(NATIVE, json={"model": "remote", "prompt": "ab"})
    assert plain.status_code == unbounded.status_code == native.status_code == 200, plain.text
    assert envelope(above) == envelope(above_local) == (400, "invalid_request_error", "max_new_tokens", V)
    assert default_remote.status_code == default_local.status_code
    if default_remote.status_code == 200:
        assert mock.posts.pop().body["max_tokens"] == 16
    else:
        assert envelope(default_remote) == envelope(default_local)
    first, second, third = mock.posts
    assert first.body == {
        "model": TARGET,
        "prompt": [[1, 2], [3]],
        "echo": True,
        "n": 2,
        "seed": 7,
        "max_tokens": 16,  # the completions default, as OpenAI's
    }
    assert set(first.body) <= {f.name for f in msgspec.structs.fields(CompletionRequest)}
    assert second.body["max_tokens"] == 16  # no max tokens: the role's cap, sent
    assert third.body == {
        "model": TARGET,
        "prompt": "ab",
        "temperature": 1.0,
        "top_p": 1.0,
        "stream": False,
        "max_tokens": 9,
    }


# ---- one max-tokens value: a capped role with a quota never overshoots --------------------------------------------


def generous(honours: str | None, completion_if_none: int = 100_000):
    """An upstream that generates as many tokens as the field it ``honours`` says (its whole window without it)."""

    def reply(request: httpx.Request, body: dict[str, Any]) -> httpx.Response:
        asked = body.get(honours) if honours else None
        made = completion_if_none if asked is None else int(asked)
        usage = {"prompt_tokens": 10, "completion_tokens": made, "total_tokens": 10 + made}
        return httpx.Response(200, json=chat_json("x", "length") | {"usage": usage})

    return reply


@pytest.mark.parametrize("honours", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("cap", [None, 30_000], ids=["no-cap", "cap"])
def test_a_role_with_a_quota_never_overshoots_whichever_name_the_upstream_honours(
    settings: Settings, api_key: str, honours: str, cap: int | None
) -> None:
    key = role_key(settings, "metered", monthly_tokens=100_000, max_tokens=cap)
    mock = MockUpstream(generous(honours))
    hostile = [
        {"max_completion_tokens": 5, "max_tokens": 90_000},  # reserved on one name, the other one huge
        {},  # nothing: the cap, else the default reserve, is sent
        {"max_tokens": 5, "max_completion_tokens": 9},
        {"max_tokens": 25_000},  # within the cap: fills the quota until it refuses
    ]
    statuses, expected = [], []
    with serving(settings, mock, key) as (http, _):
        for i in range(16):
            extra = hostile[i % len(hostile)]
            r = http.post(CHAT, json={"model": "remote", "messages": MSGS, **extra})
            statuses.append(r.status_code)
            if r.status_code == 200:
                asked = extra.get("max_completion_tokens", extra.get("max_tokens"))
                expected.append(asked if asked is not None else cap or 4096)
        used = usage_of(http, api_key, "metered-key")["tokens"]
    assert used <= 100_000, (used, statuses)
    assert set(statuses) == {200, 429}
    # one value under both names: the one the request was admitted (and reserved) for
    assert [(p.body["max_tokens"], p.body["max_completion_tokens"]) for p in mock.posts] == [(e, e) for e in expected]


def test_no_max_tokens_on_an_entry_with_a_window_sends_the_room_the_prompt_leaves(
    settings: Settings, api_key: str
) -> None:
    mock = MockUpstream(generous("max_tokens"))
    long_prompt = [{"role": "user", "content": "word " * 2000}]
    estimate = -(-len(msgspec.json.encode([long_prompt, None])) // 4)  # about four bytes per token
    with serving(settings, mock, api_key, max_model_len=8192) as (http, _):
        short = http.post(CHAT, json={"model": "remote", "messages": MSGS})
        # the upper bound (bytes + the template's room) no longer fits: half the room the estimate leaves
        huge = http.post(CHAT, json={"model": "remote", "messages": long_prompt})
    assert short.status_code == huge.status_code == 200
    first, second = (p.body["max_tokens"] for p in mock.posts)
    assert 7500 < first < 8192 - 256
    assert second == (8192 - estimate) // 2


@pytest.mark.parametrize("configured", [None, 4096], ids=["learned", "configured"])
def test_an_entry_without_a_window_takes_the_one_the_upstream_lists(
    settings: Settings, api_key: str, configured: int | None
) -> None:
    """vLLM lists ``max_model_len``: a request without max tokens then gets the room its prompt leaves in that
    window (not the default reserve, which a small window would refuse); the entry's own value wins."""
    mock = MockUpstream(generous("max_tokens"), windows={TARGET: 2048})
    with serving(settings, mock, api_key, max_model_len=configured) as (http, up):
        with http.portal() as portal:
            portal.call(up.check)
        r = http.post(CHAT, json={"model": "remote", "messages": MSGS})
    assert r.status_code == 200, r.text
    window = configured or 2048
    assert up.entry.max_model_len == window
    assert window - 512 < mock.posts[0].body["max_tokens"] < window - 256


# ---- usage the upstream does not report properly ---------------------------------------------------------------

BAD_USAGE: list[tuple[str, Any]] = [
    ("empty", {}),
    ("null", None),
    ("missing", "absent"),
    ("no completion count", {"prompt_tokens": 5}),
    ("text counts", {"prompt_tokens": "5", "completion_tokens": "2"}),
    ("fractions", {"prompt_tokens": 5.5, "completion_tokens": 2}),
    ("negative", {"prompt_tokens": 5, "completion_tokens": -2}),
    ("booleans", {"prompt_tokens": True, "completion_tokens": True}),
    ("not an object", [5, 2]),
]


@pytest.mark.parametrize("usage", [u for _, u in BAD_USAGE], ids=[name for name, _ in BAD_USAGE])
def test_usage_the_upstream_does_not_report_properly_is_estimated_and_marked(
    settings: Settings, api_key: str, usage: Any
) -> None:
    def reply(request: httpx.Request, body: dict[str, Any]) -> httpx.Response:
        extra = {} if usage == "absent" else {"usage": usage}
        if body.get("stream"):
            chunks = [chat_chunk({"content": "Hello"}), chat_chunk({"content": " there"}, "stop")]
            return sse(*chunks, {**chat_chunk({}), "choices": [], **extra})
        out = chat_json("Hello there", usage=False)
        return httpx.Response(200, json=out | extra)

    key = role_key(settings, "metered", monthly_tokens=1_000_000)
    mock = MockUpstream(reply)
    with serving(settings, mock, key) as (http, _):
        plain = http.post(CHAT, json={"model": "remote", "messages": MSGS})
        streamed = http.post(
            CHAT, json={"model": "remote", "messages": MSGS, "stream": True, "stream_options": {"include_usage": True}}
        )
        billed = usage_of(http, api_key, "metered-key")["tokens"]
    assert plain.status_code == streamed.status_code == 200, plain.text
    assert plain.headers["x-usage-estimated"] == "true"
    counted = plain.json()["usage"]
    assert counted["prompt_tokens"] > 0 and counted["completion_tokens"] > 0
    chunks, done = frames(streamed.text)
    assert done and chunks[-1]["choices"] == []
    s_counted = chunks[-1]["usage"]
    assert s_counted["prompt_tokens"] > 0 and s_counted["completion_tokens"] >= 2  # two pieces
    assert billed == counted["total_tokens"] + s_counted["total_tokens"]  # billed as estimated, never 0
    rows = [r for r in log_rows(settings) if r["route"] == CHAT]
    assert [(r["usage_estimated"], r["completion_tokens"] > 0) for r in rows] == [(1, True), (1, True)]


def test_a_later_proper_usage_wins_over_nulls_before_it(settings: Settings, api_key: str) -> None:
    """vLLM sends ``"usage": null`` on every chunk before the last: those never erase a proper count."""
    usage = {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}
    chunks = [chat_chunk({"content": "Hi"}, usage=None), chat_chunk({}, "stop", usage=usage), chat_chunk({}, usage={})]
    mock = MockUpstream(lambda request, body: sse(*chunks))
    with serving(settings, mock, api_key) as (http, _):
        r = http.post(
            CHAT, json={"model": "remote", "messages": MSGS, "stream": True, "stream_options": {"include_usage": True}}
        )
    out, done = frames(r.text)
    assert done and out[-1]["usage"] == usage
    assert [row["usage_estimated"] for row in log_rows(settings) if row["route"] == CHAT] == [0]


# ---- what the worst body costs -----------------------------------------------------------------------------------


def test_a_huge_prompt_reserves_its_upper_bound_and_is_refused_before_the_upstream(settings: Settings) -> None:
    """A 5 MB message from a role with a 1M-token quota: its bound (5M) cannot be reserved, so it is refused with
    429 and the upstream never sees it; no field can add prompt the bound does not see (unknown ones are dropped)."""
    key = role_key(settings, "small", monthly_tokens=1_000_000)
    mock = MockUpstream(answers)
    big = "x" * 5_000_000
    with serving(settings, mock, key) as (http, _):
        r = http.post(CHAT, json={"model": "remote", "messages": [{"role": "user", "content": big}]})
    assert_error(r, 429, "insufficient_quota", "insufficient_quota")
    assert mock.calls == 0
