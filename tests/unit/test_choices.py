"""``server.serving.choices`` against the FakeEngine: admission of ``n`` samples per prompt, running and
interleaving choices, finish reasons, stop strings split across pieces, logprob entries that join to the text,
failures, and the usage a plan reports. No HTTP."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import msgspec
import pytest

from schemas.openai.completions import CompletionRequest
from server.engine.base import EngineDelta, SamplingParams
from server.engine.fake import FakeEngine
from server.errors import OpenAIError
from server.serving.choices import (
    Choice,
    ChoiceEvent,
    admit,
    collect,
    derived_seed,
    engine_failure,
    run_choice,
    run_choices,
)
from server.serving.completions import prepare

PARAMS = SamplingParams(max_tokens=50)


async def events(choices: list[Choice]) -> list[ChoiceEvent]:
    return [ev async for ev in run_choices(choices)]


async def settle() -> None:
    """Let streams closed with ``abort_soon`` (a task on the next loop turns) close."""
    for _ in range(3):
        await asyncio.sleep(0)


@pytest.mark.anyio
async def test_admit_submits_n_samples_per_prompt_in_order() -> None:
    engine = FakeEngine(["ok"])
    choices = admit(engine, "req", [[1, 2, 3], [4]], replace(PARAMS, seed=7), [], n=2)
    assert [c.index for c in choices] == [0, 1, 2, 3]
    assert [c.prompt_tokens for c in choices] == [3, 3, 1, 1]
    assert [r.request_id for r in engine.requests] == ["req-0", "req-1", "req-2", "req-3"]
    assert [r.prompt_token_ids for r in engine.requests] == [[1, 2, 3], [1, 2, 3], [4], [4]]
    # sample 0 of each prompt keeps the seed; the others get a distinct, reproducible one
    seeds = [r.params.seed for r in engine.requests]
    assert seeds == [7, derived_seed(7, 1), 7, derived_seed(7, 1)] and seeds[1] != 7
    assert derived_seed(None, 3) is None
    assert all(c.logprobs is None for c in choices)  # not asked for
    await collect(choices)
    assert engine.completed == ["req-0", "req-1", "req-2", "req-3"]


@pytest.mark.anyio
async def test_admit_is_all_or_nothing_when_the_queue_is_full() -> None:
    engine = FakeEngine(["ok"], max_queue_size=3)
    with pytest.raises(OpenAIError) as err:
        admit(engine, "req", [[1], [2]], PARAMS, [], n=2)  # the second prompt's group does not fit
    assert (err.value.status, err.value.code, err.value.headers) == (503, "overloaded", {"retry-after": "1"})
    await settle()
    assert engine.active_requests == 0 and engine.aborted == ["req-0", "req-1"]  # the first group is given back


@pytest.mark.anyio
async def test_finish_reasons_and_token_counts() -> None:
    engine = FakeEngine(["Hel", "lo"])
    (stopped,) = admit(engine, "a", [[1]], PARAMS, [])
    (cut,) = admit(engine, "b", [[1]], replace(PARAMS, max_tokens=1), [])
    await collect([stopped, cut])
    assert (stopped.text, stopped.finish_reason, stopped.completion_tokens) == ("Hello", "stop", 3)  # EOS counts
    assert (cut.text, cut.finish_reason, cut.completion_tokens) == ("Hel", "length", 1)
    assert stopped.first_token_at is not None and stopped.last_token_at is not None
    assert len(stopped.token_gaps) == 2


@pytest.mark.anyio
async def test_several_choices_interleave_and_each_finishes_once() -> None:
    engine = FakeEngine(["a", "b", "c"], delay_s=0.001)
    choices = admit(engine, "r", [[1]], PARAMS, [], n=3)
    seen = await events(choices)
    for i in range(3):
        mine = [ev for ev in seen if ev.index == i]
        assert "".join(ev.text for ev in mine) == "abc"
        assert [ev.finish_reason for ev in mine] == [None, None, None, "stop"]
    assert [c.finish_reason for c in choices] == ["stop"] * 3


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("stops", "text"),
    [
        (["o, w"], "Hell"),  # the stop spans three pieces: nothing of it is sent
        (["ld", "lo,"], "Hel"),  # the earliest match in the text wins, whatever the order of the stops
        (["!"], "Hello, world"),
        (["xyz"], "Hello, world!"),  # never matched: the text held back for it is flushed at the end
        (["d!x"], "Hello, world!"),  # a partial match at the end is flushed too
    ],
)
async def test_stop_strings_across_pieces(stops: list[str], text: str) -> None:
    engine = FakeEngine(["Hel", "lo", ",", " wor", "ld", "!"])
    (choice,) = admit(engine, "r", [[1]], PARAMS, stops)
    seen = await events([choice])
    assert "".join(ev.text for ev in seen) == choice.text == text
    assert seen[-1].finish_reason == "stop" and all(ev.finish_reason is None for ev in seen[:-1])
    assert all(ev.text for ev in seen[:-1])  # no empty events before the last one


@pytest.mark.anyio
async def test_a_stop_string_ends_the_engine_request_early() -> None:
    engine = FakeEngine(["a", "STOP", "b", "c"])
    (choice,) = admit(engine, "r", [[1]], PARAMS, ["STOP"])
    await collect([choice])
    assert choice.text == "a" and choice.finish_reason == "stop" and choice.completion_tokens == 2
    assert engine.aborted == ["r-0"]  # closed before the engine finished it


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("stops", "texts"),
    [([], ["ab", "cd"]), (["c"], ["ab"]), (["d"], ["ab", "c"])],
    ids=["no-stop", "stop-at-token-start", "stop-inside-a-token"],
)
async def test_logprob_entries_join_to_exactly_the_text(stops: list[str], texts: list[str]) -> None:
    engine = FakeEngine(["ab", "cd"])
    (choice,) = admit(engine, "r", [[1]], replace(PARAMS, logprobs=1), stops)
    seen = await events([choice])
    assert choice.logprobs is not None
    assert [e.text for e in choice.logprobs] == texts and "".join(texts) == choice.text
    assert [e.text for ev in seen for e in ev.logprobs or ()] == texts  # released in step with the text
    assert all(e.logprob.logprob == 0.0 for e in choice.logprobs)


@pytest.mark.anyio
async def test_prompt_logprobs_are_kept_on_the_choice() -> None:
    engine = FakeEngine(["x"])
    (choice,) = admit(engine, "r", [[5, 6, 7]], replace(PARAMS, prompt_logprobs=0), [])
    await collect([choice])
    assert choice.prompt_logprobs is not None and [t.token_id for t in choice.prompt_logprobs] == [6, 7]


@pytest.mark.anyio
async def test_an_engine_failure_is_raised_and_every_stream_closed() -> None:
    engine = FakeEngine(["a", "b", "c"], fail_after=1)
    choices = admit(engine, "r", [[1]], PARAMS, [], n=2)
    with pytest.raises(Exception, match="injected engine failure") as err:
        await collect(choices)
    await settle()
    assert engine.active_requests == 0
    error = engine_failure(err.value)
    assert (error.status, error.type, error.code) == (500, "server_error", None)
    assert "injected" not in error.message  # the client sees no internals


class EndsWithoutFinish:
    """A stream that ends without a finish reason (an engine bug the serving layer must not pass on as success)."""

    def __init__(self) -> None:
        self.closed = False
        self._sent = False

    def __aiter__(self) -> EndsWithoutFinish:
        return self

    async def __anext__(self) -> EngineDelta:
        if self._sent:
            raise StopAsyncIteration
        self._sent = True
        return EngineDelta(token_ids=[65], text="A")

    async def aclose(self) -> None:
        self.closed = True


@pytest.mark.anyio
async def test_a_stream_that_ends_without_a_finish_reason_is_an_engine_error() -> None:
    stream = EndsWithoutFinish()
    choice = Choice(index=0, prompt_tokens=1, stream=stream, stops=[])
    with pytest.raises(Exception, match="without a finish reason"):
        await collect([choice])
    assert stream.closed and choice.text == "A"


@pytest.mark.anyio
async def test_a_cached_choice_replays_as_one_event() -> None:
    cached = Choice(index=2, prompt_tokens=1, stream=None, stops=[], finish_reason="length", text_parts=["Hi", "!"])
    assert [ev async for ev in run_choice(cached)] == [ChoiceEvent(2, "Hi!", "length")]


@pytest.mark.anyio
async def test_usage_counts_each_prompt_once_and_every_choice() -> None:
    engine = FakeEngine(["Hel", "lo"])
    body: dict[str, Any] = {"model": "fake", "prompt": ["ab", "cde"], "n": 2, "max_tokens": 10}
    plan = prepare(engine, msgspec.convert(body, CompletionRequest))
    plan.open()
    assert len(plan.choices) == 4 and not plan.finished
    await collect(plan.choices)
    assert plan.finished
    usage = plan.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (5, 4 * 3, 5 + 12)
