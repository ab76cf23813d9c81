"""``server.serving.completions.prepare`` on the FakeEngine (one token per character): no HTTP, no Litestar.

What a validated ``/v1/completions`` request becomes before admission: its prompts as token ids, the max-tokens
value (explicit, the room the context leaves, the role's cap), stops, ``n``, echo and logprobs, and the 400
envelopes (status, code, param) of what it refuses.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from schemas.openai.completions import CompletionRequest
from server.engine.fake import FakeEngine
from server.errors import OpenAIError
from server.serving.completions import prepare, prompt_count


def request(**fields: Any) -> CompletionRequest:
    body = {"model": "fake", "prompt": "abc", **fields}
    return msgspec.json.decode(msgspec.json.encode(body), type=CompletionRequest, strict=True)


def refusal(engine: FakeEngine, **fields: Any) -> tuple[int, str | None, str | None]:
    with pytest.raises(OpenAIError) as err:
        prepare(engine, request(**fields))
    return err.value.status, err.value.code, err.value.param


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(["Hel", "lo"], max_model_len=64)


def test_a_text_prompt_becomes_its_token_ids(engine: FakeEngine) -> None:
    plan = prepare(engine, request())
    assert plan.kind == "completion" and plan.id.startswith("cmpl-") and plan.model == "fake"
    assert plan.prompts == [[ord("a"), ord("b"), ord("c")]]
    assert plan.prompt_tokens == 3 and plan.n == 1 and plan.stops == [] and not plan.echo
    assert plan.choices == [] and not plan.cached  # nothing is admitted by prepare


def test_several_prompts_and_token_id_prompts_are_kept_apart(engine: FakeEngine) -> None:
    texts = prepare(engine, request(prompt=["ab", "xyz"]))
    assert texts.prompts == [[97, 98], [120, 121, 122]] and texts.prompt_tokens == 5
    ids = prepare(engine, request(prompt=[[1, 2, 3], [4]]))
    assert ids.prompts == [[1, 2, 3], [4]]
    single = prepare(engine, request(prompt=[7, 8]))
    assert single.prompts == [[7, 8]]
    assert [prompt_count(p) for p in ("ab", [1, 2], [[1], [2], [3]], ["a", "b"], [])] == [1, 1, 3, 2, 1]


def test_max_tokens_the_schema_default_is_explicit(engine: FakeEngine) -> None:
    plan = prepare(engine, request())
    assert plan.params.max_tokens == 16 and plan.explicit_max_tokens  # OpenAI's default for completions


def test_max_tokens_explicit_is_kept(engine: FakeEngine) -> None:
    plan = prepare(engine, request(max_tokens=5))
    assert plan.params.max_tokens == 5 and plan.explicit_max_tokens
    assert plan.max_new_tokens == 5


def test_max_tokens_null_is_the_room_the_context_leaves(engine: FakeEngine) -> None:
    plan = prepare(engine, request(max_tokens=None))
    assert plan.params.max_tokens == 64 - 3 and not plan.explicit_max_tokens


def test_max_tokens_null_within_the_role_cap(engine: FakeEngine) -> None:
    assert prepare(engine, request(max_tokens=None), max_tokens_cap=10).params.max_tokens == 10
    assert prepare(engine, request(max_tokens=None), max_tokens_cap=1000).params.max_tokens == 61  # the room wins
    # An explicit value is the client's (the gateway refuses one above the cap before prepare runs).
    assert prepare(engine, request(max_tokens=12), max_tokens_cap=10).params.max_tokens == 12


def test_several_prompts_are_sized_by_the_longest(engine: FakeEngine) -> None:
    plan = prepare(engine, request(prompt=["a", "a" * 10], max_tokens=None, n=2))
    assert plan.params.max_tokens == 64 - 10
    assert plan.max_new_tokens == 2 * 2 * (64 - 10)  # prompts x n x max tokens: what the gateway reserves


def test_n_and_prompts_bound_the_choices(engine: FakeEngine) -> None:
    assert prepare(engine, request(n=3)).n == 3
    assert refusal(engine, prompt=["a"] * 2, n=65) == (400, "invalid_value", "n")  # 130 choices > 128


def test_stops_are_validated(engine: FakeEngine) -> None:
    assert prepare(engine, request(stop="\n")).stops == ["\n"]
    assert prepare(engine, request(stop=["a", "b"])).stops == ["a", "b"]
    assert refusal(engine, stop=["a", "b", "c", "d", "e"]) == (400, "invalid_value", "stop")
    assert refusal(engine, stop=[""]) == (400, "invalid_value", "stop")


def test_echo_asks_for_prompt_logprobs_only_with_logprobs(engine: FakeEngine) -> None:
    echo = prepare(engine, request(echo=True))
    assert echo.echo and echo.params.prompt_logprobs is None and echo.params.logprobs is None
    both = prepare(engine, request(echo=True, logprobs=2))
    assert both.params.logprobs == 2 and both.params.prompt_logprobs == 2
    plain = prepare(engine, request(logprobs=0))
    assert plain.params.logprobs == 0 and plain.params.prompt_logprobs is None and not plain.cacheable


def test_sampling_fields_and_determinism(engine: FakeEngine) -> None:
    greedy = prepare(engine, request(temperature=0))
    assert greedy.deterministic and greedy.cacheable
    seeded = prepare(engine, request(temperature=0.7, seed=-1))
    assert seeded.params.seed == 2**64 - 1 and seeded.deterministic
    sampled = prepare(engine, request(temperature=0.7, top_p=0.5, top_k=-1))
    assert not sampled.deterministic
    assert (sampled.params.temperature, sampled.params.top_p, sampled.params.top_k) == (0.7, 0.5, 0)


def test_include_usage_only_when_streaming(engine: FakeEngine) -> None:
    assert prepare(engine, request(stream=True, stream_options={"include_usage": True})).include_usage
    assert not prepare(engine, request(stream=True)).include_usage
    assert refusal(engine, stream_options={"include_usage": True}) == (400, "invalid_value", "stream_options")


def test_prompt_shapes_that_are_refused(engine: FakeEngine) -> None:
    assert refusal(engine, prompt=[]) == (400, "empty_array", "prompt")
    assert refusal(engine, prompt=["a", [1]]) == (400, "invalid_value", "prompt")  # mixed
    assert refusal(engine, prompt=[[1], []]) == (400, "invalid_value", "prompt[1]")  # an empty token-id prompt
    assert refusal(engine, prompt=[-1]) == (400, "invalid_value", "prompt")  # outside the vocabulary
    assert refusal(engine, prompt="") == (400, "invalid_value", "prompt")  # empty after tokenization


def test_unsupported_parameters_are_refused(engine: FakeEngine) -> None:
    assert refusal(engine, suffix="x")[2] == "suffix"
    assert refusal(engine, best_of=2)[2] == "best_of"
    assert prepare(engine, request(best_of=2, n=2)).n == 2  # best_of == n draws nothing extra


def test_logit_bias_keys_are_token_ids_of_the_vocabulary(engine: FakeEngine) -> None:
    assert prepare(engine, request(logit_bias={"98": 5, "97": -5})).params.logit_bias == ((97, -5.0), (98, 5.0))
    assert refusal(engine, logit_bias={"a": 1}) == (400, "invalid_value", "logit_bias")
    assert refusal(engine, logit_bias={str(10**9): 1}) == (400, "invalid_value", "logit_bias")


def test_context_length_exceeded_by_the_requested_tokens() -> None:
    engine = FakeEngine(max_model_len=16)
    status, code, param = refusal(engine, prompt="a" * 10, max_tokens=7)
    assert (status, code, param) == (400, "context_length_exceeded", "max_tokens")
    assert prepare(engine, request(prompt="a" * 10, max_tokens=6)).params.max_tokens == 6  # exactly fits


def test_context_length_exceeded_by_the_prompt_alone() -> None:
    engine = FakeEngine(max_model_len=16)
    assert refusal(engine, prompt="a" * 16, max_tokens=None)[:2] == (400, "context_length_exceeded")
    with pytest.raises(OpenAIError) as err:
        prepare(engine, request(prompt="a" * 100, max_tokens=None))  # refused from its byte length, untokenized
    assert (err.value.code, err.value.param) == ("context_length_exceeded", "prompt")
    assert "100 bytes long, which is at least 25 tokens" in err.value.message
