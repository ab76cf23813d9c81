"""What a remote request reserves and sends: the one max-tokens value, the prompt's upper bound, the role's cap."""

from __future__ import annotations

import time
from typing import Any

import msgspec
import pytest

from schemas.native.generate import GenerateRequest
from schemas.openai.chat import ChatCompletionRequest
from schemas.openai.completions import CompletionRequest
from server.errors import OpenAIError
from server.models.file import RemoteModel
from server.serving.common import parse_logit_bias
from server.serving.remote import (
    CHAT_TEMPLATE_TOKENS,
    DEFAULT_RESERVE_TOKENS,
    per_choice_max_tokens,
    prepare_chat,
    prepare_completion,
    prepare_generate,
)

ENTRY = RemoteModel(name="remote", base_url="http://upstream.test/v1", upstream_model="up")


def chat(**fields: Any) -> ChatCompletionRequest:
    body = {"model": "remote", "messages": [{"role": "user", "content": "hi"}], **fields}
    return msgspec.json.decode(msgspec.json.encode(body), type=ChatCompletionRequest, strict=True)


def completion(**fields: Any) -> CompletionRequest:
    body = {"model": "remote", "prompt": "ab", **fields}
    return msgspec.json.decode(msgspec.json.encode(body), type=CompletionRequest, strict=True)


@pytest.mark.parametrize(
    ("requested", "cap", "window", "bound", "estimate", "expected"),
    [
        (50, None, None, 10, 3, 50),  # the client's value
        (50, 20, None, 10, 3, 20),  # within the cap (a larger one was refused before; never sent above it)
        (None, 20, None, 10, 3, 20),  # the role's cap
        (None, None, None, 10, 3, DEFAULT_RESERVE_TOKENS),  # nothing bounds it: the default reserve
        (None, None, 1000, 10, 3, 990),  # the room the upper bound leaves
        (None, 500, 1000, 10, 3, 500),  # that room within the cap
        (None, None, 1000, 900, 200, 400),  # little room left by the bound: half the estimate's room
        (None, None, 1000, 1500, 300, 350),  # the bound does not fit: half the estimate's room
        (None, None, 1000, 5000, 1200, 1),  # nothing fits: 1 (the upstream refuses the prompt or answers in it)
    ],
)
def test_one_max_tokens_value(
    requested: int | None, cap: int | None, window: int | None, bound: int, estimate: int, expected: int
) -> None:
    assert per_choice_max_tokens(requested, cap, window, bound, estimate) == expected


def test_chat_sends_and_reserves_the_same_value_for_every_choice() -> None:
    call = prepare_chat(chat(n=3), ENTRY, max_tokens_cap=40, max_messages=None)
    assert call.payload["max_tokens"] == call.payload["max_completion_tokens"] == 40
    assert call.max_new_tokens == 3 * 40 and not call.explicit_max_tokens
    call = prepare_chat(chat(max_tokens=7, max_completion_tokens=5), ENTRY, max_tokens_cap=None, max_messages=None)
    assert call.payload["max_tokens"] == call.payload["max_completion_tokens"] == 5 and call.explicit_max_tokens


def test_completions_reserve_per_prompt_and_choice() -> None:
    call = prepare_completion(completion(prompt=["a", "bb", "ccc"], n=2, max_tokens=10), ENTRY, max_tokens_cap=None)
    assert call.payload["max_tokens"] == 10 and "max_completion_tokens" not in call.payload
    assert call.max_new_tokens == 3 * 2 * 10
    ids = prepare_completion(completion(prompt=[[1] * 500], max_tokens=None), ENTRY, max_tokens_cap=None)
    assert ids.prompt_bound >= 500  # token ids count one each
    assert ids.payload["max_tokens"] == DEFAULT_RESERVE_TOKENS


def test_native_generate_stays_within_the_roles_cap() -> None:
    default = GenerateRequest(prompt="ab")  # max_new_tokens defaults to 256
    call = prepare_generate(default, ENTRY, stream=False, max_tokens_cap=16)
    assert call.payload["max_tokens"] == 16 and call.max_new_tokens == 16
    assert (
        prepare_generate(GenerateRequest(prompt="ab", max_new_tokens=9), ENTRY, stream=True, max_tokens_cap=16).payload[
            "max_tokens"
        ]
        == 9
    )
    assert prepare_generate(default, ENTRY, stream=False, max_tokens_cap=None).payload["max_tokens"] == 256


def test_the_prompt_bound_covers_everything_forwarded_that_becomes_prompt() -> None:
    """Every byte of the forwarded messages and tools is in the bound (plus room for a template's own text); a client
    field the bound would not see (a vLLM ``chat_template``, ``documents``…) is not forwarded at all."""
    tools = [{"type": "function", "function": {"name": f"f{i}", "description": "d" * 1000}} for i in range(20)]
    req = chat(
        messages=[{"role": "user", "content": "é" * 3000}, {"role": "assistant", "content": "ok"}] * 10,
        tools=tools,
    )
    call = prepare_chat(req, ENTRY, max_tokens_cap=None, max_messages=None)
    forwarded = msgspec.json.encode([call.payload["messages"], call.payload["tools"]])
    assert call.prompt_bound == len(forwarded) + CHAT_TEMPLATE_TOKENS
    assert len(forwarded) >= 20 * 1000 + 10 * 6000  # tools' descriptions and the two-byte characters, as bytes
    assert call.prompt_estimate * 4 >= len(forwarded)  # TPM counts the tools too
    assert call.max_new_tokens == DEFAULT_RESERVE_TOKENS
    assert set(call.payload) <= {f.name for f in msgspec.structs.fields(ChatCompletionRequest)}


def test_a_remote_chat_is_checked_like_a_local_one_before_anything_is_built() -> None:
    with pytest.raises(OpenAIError) as err:
        prepare_chat(chat(messages=[{"role": "user", "content": "x"}] * 3), ENTRY, max_tokens_cap=None, max_messages=2)
    assert (err.value.status, err.value.param, err.value.code) == (400, "messages", "array_above_max_length")


@pytest.mark.parametrize("vocab_size", [None, 1000])
def test_a_logit_bias_key_too_long_for_int_is_a_400(vocab_size: int | None) -> None:
    for key in ("9" * 5000, "1" * 11):
        with pytest.raises(OpenAIError) as err:
            parse_logit_bias({key: 1.0}, vocab_size)
        assert (err.value.status, err.value.param) == (400, "logit_bias")
        assert len(err.value.message) < 200
    assert parse_logit_bias({"0000000007": 1.0}, vocab_size) == ((7, 1.0),)


def test_validating_a_9_mb_remote_chat_costs_milliseconds_not_seconds() -> None:
    """The worst body the default 10 MB limit lets through: checked, measured and built in well under a second."""
    req = chat(messages=[{"role": "user", "content": "word " * 1000}] * 1800)  # ~9 MB, 1,800 messages
    began = time.perf_counter()
    call = prepare_chat(req, ENTRY, max_tokens_cap=None, max_messages=2048)
    elapsed = time.perf_counter() - began
    assert call.prompt_bound > 9_000_000
    assert elapsed < 1.0, elapsed
