"""Property: no combination of sampling parameters hurts the engine.

Hypothesis draws chat requests over the whole sampling surface (temperature including 0 and vanishing values,
top_p, top_k, min_p, the three penalties, logit_bias, seeds, n, logprobs, streaming, and the grammars of
``response_format`` and forced tool calls), sometimes out of range, and sends them to the real Transformers engine
on the tiny model through the app. Every request in range must end with a 200 (every choice finished, no error
frame), every request with a value out of range with a 400 in the OpenAI envelope, and the engine must stay ready.

Bounded for the suite (``LLM_SERVER_HYPOTHESIS_EXAMPLES``, default 40, derandomized so CI is reproducible); set it
higher for a long run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from litestar import Litestar
from litestar.testing import TestClient

from server.engine.hf import HFEngine
from tests.conftest import ready_client

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("LLM_SERVER_HYPOTHESIS_EXAMPLES", "40"))
VOCAB = 1536  # the tiny model's tokenizer
ENVELOPE = {"message", "type", "param", "code"}
INVALID = "x-test-out-of-range"  # marks a drawn body holding one out-of-range value (removed before sending)

TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "parameters": {
            "type": "object",
            "properties": {"q": {"type": "string", "maxLength": 8}, "n": {"type": "integer"}},
            "required": ["q", "n"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}
SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "answer",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {"ok": {"type": "boolean"}, "tags": {"type": "array", "items": {"enum": ["a", "b"]}}},
            "required": ["ok", "tags"],
            "additionalProperties": False,
        },
    },
}
GRAMMARS: list[dict[str, Any]] = [
    {},
    {"response_format": {"type": "json_object"}},
    {"response_format": SCHEMA},
    {"tools": [TOOL], "tool_choice": "required"},
    {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "lookup"}}},
]


def maybe(values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """The field left out (``None``) or one of ``values``."""
    return st.none() | values


temperature = st.sampled_from([0.0, 1e-300, 1e-40, 1e-6, 1e-5, 0.7, 2.0]) | st.floats(0.0, 2.0)
unit = st.sampled_from([0.0, 1e-12, 1.0]) | st.floats(0.0, 1.0)
penalty = st.sampled_from([-2.0, 0.0, 2.0]) | st.floats(-2.0, 2.0)
repetition = st.sampled_from([0.01, 1.0, 10.0]) | st.floats(0.01, 10.0)
bias = st.dictionaries(
    st.integers(0, VOCAB - 1).map(str), st.sampled_from([-100.0, 100.0]) | st.floats(-100.0, 100.0), max_size=6
)
# Values a client may send that are out of range: each must be a 400, never a 5xx.
out_of_range = st.sampled_from(
    [
        {"temperature": 2.5},
        {"temperature": -1e-40},
        {"top_p": 1.5},
        {"top_k": -2},
        {"min_p": 1.01},
        {"repetition_penalty": 0.0},
        {"repetition_penalty": 1e-40},
        {"presence_penalty": 2.1},
        {"frequency_penalty": -1e9},
        {"logit_bias": {"1": 1e300}},
        {"logit_bias": {str(VOCAB): 5}},
        {"seed": 2**63},
        {"n": 0},
    ]
)


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "temperature": draw(maybe(temperature)),
        "top_p": draw(maybe(unit)),
        "top_k": draw(maybe(st.sampled_from([-1, 0, 1, 2, 50, VOCAB, 2**40]))),
        "min_p": draw(maybe(unit)),
        "presence_penalty": draw(maybe(penalty)),
        "frequency_penalty": draw(maybe(penalty)),
        "repetition_penalty": draw(maybe(repetition)),
        "logit_bias": draw(maybe(bias)),
        "seed": draw(maybe(st.integers(-(2**63), 2**63 - 1))),
        "n": draw(maybe(st.integers(1, 3))),
        "max_tokens": draw(st.integers(1, 8)),
        "stream": draw(st.booleans()),
    }
    if draw(st.booleans()):
        fields["logprobs"] = True
        fields["top_logprobs"] = draw(st.integers(0, 5))
    body = {k: v for k, v in fields.items() if v is not None}
    body.update(draw(st.sampled_from(GRAMMARS)))
    invalid = draw(st.integers(0, 9)) == 0
    if invalid:
        body.update(draw(out_of_range))
    return {"model": "tiny", "messages": [{"role": "user", "content": "List two things."}], **body, INVALID: invalid}


@pytest.fixture(scope="module")
def http(engine_app: tuple[HFEngine, Litestar, str]) -> Iterator[TestClient[Litestar]]:
    with ready_client(engine_app) as client:
        yield client


def check_answer(body: dict[str, Any], invalid: bool, status: int, text: str) -> None:
    if invalid:
        assert status == 400, f"{status}: {text[:500]}"
        error = json.loads(text)["error"]
        assert set(error) == ENVELOPE and error["type"] == "invalid_request_error", text
        return
    assert status == 200, f"{status}: {text[:500]}"
    n = body.get("n", 1)
    if not body["stream"]:
        choices = json.loads(text)["choices"]
        assert len(choices) == n
        assert all(c["finish_reason"] in {"stop", "length", "tool_calls"} for c in choices), choices
        return
    frames = [f.removeprefix("data: ") for f in text.split("\n\n") if f.strip()]
    assert frames[-1] == "[DONE]", frames[-3:]
    chunks = [json.loads(f) for f in frames[:-1]]
    assert not [c for c in chunks if "error" in c], chunks[-1]
    finished = {ch["index"] for c in chunks for ch in c["choices"] if ch.get("finish_reason")}
    assert finished == set(range(n))


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=requests())
def test_every_request_ends_in_200_or_400_and_the_engine_stays_ready(
    http: TestClient[Litestar], engine_app: tuple[HFEngine, Litestar, str], body: dict[str, Any]
) -> None:
    invalid = body.pop(INVALID)
    r = http.post("/v1/chat/completions", json=body)
    check_answer(body, invalid, r.status_code, r.text)
    engine = engine_app[0]
    assert engine.failure is None
    assert engine._scheduler is not None and engine._scheduler._failed_steps == 0
    assert http.get("/readyz").status_code == 200
