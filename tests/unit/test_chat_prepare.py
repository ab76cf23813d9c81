"""``server.serving.chat.prepare`` on the FakeEngine (one token per character, a ChatML template): no HTTP.

What a validated chat request becomes before admission: the rendered prompt, the max-tokens value (explicit under
either name, the room the context leaves, the role's cap), stops, ``n``, logprobs, and the 400 envelopes
(status, code, param) of what it refuses.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from schemas.openai.chat import ChatCompletionRequest
from server.engine.chartok import CharTokenizer
from server.engine.fake import FakeEngine
from server.errors import OpenAIError
from server.serving.chat import prepare
from tests.fakes.engines import without_chat_template

HI = [{"role": "user", "content": "hi"}]
TURN = "<|im_start|>user\nhi<|im_end|>\n"
PROMPT = TURN + "<|im_start|>assistant\n"  # one token per character


def request(**fields: Any) -> ChatCompletionRequest:
    body = {"model": "fake", "messages": HI, **fields}
    return msgspec.json.decode(msgspec.json.encode(body), type=ChatCompletionRequest, strict=True)


def refusal(
    engine: FakeEngine, *, max_messages: int | None = None, **fields: Any
) -> tuple[int, str | None, str | None]:
    with pytest.raises(OpenAIError) as err:
        prepare(engine, request(**fields), max_messages=max_messages)
    return err.value.status, err.value.code, err.value.param


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(["Hel", "lo"], max_model_len=64)


def test_the_prompt_is_the_rendered_chat_template(engine: FakeEngine) -> None:
    plan = prepare(engine, request())
    assert plan.kind == "chat" and plan.id.startswith("chatcmpl-") and plan.model == "fake"
    (prompt,) = plan.prompts
    assert engine.tokenizer.decode(prompt) == PROMPT and plan.prompt_tokens == len(PROMPT)
    assert plan.tools is None and plan.params.constraint is None and plan.choices == []


def test_system_developer_and_continued_messages_render() -> None:
    engine = FakeEngine()
    messages = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "par"},
    ]
    plan = prepare(engine, request(messages=messages, continue_final_message=True, add_generation_prompt=False))
    text = engine.tokenizer.decode(plan.prompts[0])
    # developer renders as system, content parts join with a newline, the last turn stays open
    assert (
        text == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\na\nb<|im_end|>\n<|im_start|>assistant\npar"
    )


def test_max_tokens_unset_is_the_room_the_context_leaves(engine: FakeEngine) -> None:
    plan = prepare(engine, request())
    assert plan.params.max_tokens == 64 - len(PROMPT) and not plan.explicit_max_tokens


def test_max_tokens_unset_within_the_role_cap(engine: FakeEngine) -> None:
    assert prepare(engine, request(), max_tokens_cap=7).params.max_tokens == 7
    assert prepare(engine, request(), max_tokens_cap=1000).params.max_tokens == 64 - len(PROMPT)


def test_max_tokens_explicit_under_either_name(engine: FakeEngine) -> None:
    old = prepare(engine, request(max_tokens=5))
    assert old.params.max_tokens == 5 and old.explicit_max_tokens
    new = prepare(engine, request(max_completion_tokens=6, max_tokens=3))
    assert new.params.max_tokens == 6 and new.explicit_max_tokens  # max_completion_tokens wins


@pytest.mark.parametrize("name", ["max_tokens", "max_completion_tokens"])
def test_context_length_exceeded_names_the_field_the_client_used(engine: FakeEngine, name: str) -> None:
    room = 64 - len(PROMPT)
    assert prepare(engine, request(**{name: room})).params.max_tokens == room  # exactly fits
    assert refusal(engine, **{name: room + 1}) == (400, "context_length_exceeded", name)


def test_context_length_exceeded_by_the_messages() -> None:
    small = FakeEngine(max_model_len=len(PROMPT))
    assert refusal(small) == (400, "context_length_exceeded", "messages")  # no room for one token
    with pytest.raises(OpenAIError) as err:  # certainly too long from the bytes alone, before the template
        prepare(small, request(messages=[{"role": "user", "content": "x" * 400}]))
    assert (err.value.code, err.value.param) == ("context_length_exceeded", "messages")
    assert "400 bytes long, which is at least 100 tokens" in err.value.message


def test_n_stops_and_usage_options(engine: FakeEngine) -> None:
    plan = prepare(engine, request(n=3, stop="\n", stream=True, stream_options={"include_usage": True}))
    assert plan.n == 3 and plan.stops == ["\n"] and plan.stream and plan.include_usage
    assert plan.max_new_tokens == 3 * plan.params.max_tokens
    assert refusal(engine, stop=["a", "b", "c", "d", "e"]) == (400, "invalid_value", "stop")
    assert refusal(engine, stream_options={"include_usage": True}) == (400, "invalid_value", "stream_options")


def test_logprobs(engine: FakeEngine) -> None:
    assert prepare(engine, request()).params.logprobs is None
    assert prepare(engine, request(logprobs=True)).params.logprobs == 0
    top = prepare(engine, request(logprobs=True, top_logprobs=3))
    assert top.params.logprobs == 3 and not top.cacheable
    assert refusal(engine, top_logprobs=2) == (400, "invalid_value", "top_logprobs")
    assert refusal(engine, logprobs=False, top_logprobs=2) == (400, "invalid_value", "top_logprobs")


def test_messages_are_bounded_and_checked(engine: FakeEngine) -> None:
    assert refusal(engine, max_messages=1, messages=HI * 2) == (400, "array_above_max_length", "messages")
    assert prepare(FakeEngine(), request(messages=HI * 2), max_messages=2).prompt_tokens == len(TURN + PROMPT)
    assert refusal(engine, messages=[]) == (400, "empty_array", "messages")
    assert refusal(engine, continue_final_message=True) == (400, "invalid_value", "continue_final_message")


def test_unsupported_parameters_are_refused(engine: FakeEngine) -> None:
    assert refusal(engine, prediction={"type": "content", "content": "x"})[2] == "prediction"
    assert refusal(engine, reasoning_effort="low")[2] == "reasoning_effort"
    assert refusal(engine, modalities=["text", "audio"])[2] == "modalities"


def test_structured_output_needs_a_model_that_constrains(engine: FakeEngine) -> None:
    status, code, param = refusal(engine, response_format={"type": "json_object"})
    assert (status, code, param) == (400, "unsupported_parameter", "response_format")
    assert prepare(engine, request(response_format={"type": "text"})).params.constraint is None


def test_a_model_without_a_chat_template_is_refused() -> None:
    assert refusal(without_chat_template()) == (400, "chat_template_missing", "messages")


def test_a_template_that_rejects_the_messages_is_a_400() -> None:
    class Rejecting(CharTokenizer):
        def render_chat(self, *args: Any, **kwargs: Any) -> list[int]:
            raise ValueError("roles must alternate")

    engine = FakeEngine()
    engine._tokenizer = Rejecting()
    with pytest.raises(OpenAIError) as err:
        prepare(engine, request())
    assert (err.value.status, err.value.code, err.value.param) == (400, "chat_template_error", "messages")
    assert "roles must alternate" in err.value.message
