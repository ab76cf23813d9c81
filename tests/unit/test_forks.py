"""``n`` samples of one prompt share one prefill: the prompt row is forked into one batch row per sample.

Each fork keeps its own sampler and seed, so its tokens must equal those of the same request run alone; the
scheduler's ``prefilled_tokens`` counter shows the prompt went through the model once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Sequence
from pathlib import Path

import anyio
import pytest

from server.engine.base import EngineOverloaded, EngineRequest, RequestStream, SamplingParams
from server.engine.hf import HFEngine
from server.serving.choices import derived_seed
from tests.unit.conftest import sched

pytestmark = pytest.mark.slow

Result = tuple[list[int], str | None]
PROMPT = [random.Random(4).randrange(3, 1500) for _ in range(70)]  # longer than the 32-token prefill chunk


@pytest.fixture
def engine(chunked_engine: HFEngine) -> HFEngine:
    return chunked_engine


def samples(params: SamplingParams, n: int, prompt: Sequence[int] = PROMPT, rid: str = "r") -> list[EngineRequest]:
    """The ``n`` engine requests serving makes of one prompt (sample s > 0 gets a derived seed)."""
    return [
        EngineRequest(
            f"{rid}-{s}", prompt, params if s == 0 else dataclasses.replace(params, seed=derived_seed(params.seed, s))
        )
        for s in range(n)
    ]


async def drain(stream: RequestStream) -> Result:
    ids: list[int] = []
    finish = None
    try:
        async for delta in stream:
            ids += delta.token_ids
            finish = delta.finish_reason
    finally:
        await stream.aclose()
    return ids, finish


async def alone(engine: HFEngine, requests: list[EngineRequest]) -> list[Result]:
    out = []
    for req in requests:
        out.append(await drain(engine.generate(req)))
        with anyio.fail_after(5):
            while engine.num_running:  # noqa: ASYNC110 - the worker thread has no event to await
                await asyncio.sleep(0.002)
    return out


async def forked(engine: HFEngine, requests: list[EngineRequest]) -> list[Result]:
    return list(await asyncio.gather(*(drain(s) for s in engine.generate_group(requests))))


@pytest.mark.anyio
async def test_greedy_n8_prefills_the_prompt_once_and_equals_n1(engine: HFEngine) -> None:
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    s = sched(engine)
    before = s.prefilled_tokens
    (one,) = await alone(engine, samples(params, 1))
    assert s.prefilled_tokens - before == len(PROMPT)
    before = s.prefilled_tokens
    got = await forked(engine, samples(params, 8))
    assert got == [one] * 8
    assert s.prefilled_tokens - before == len(PROMPT)  # once, in three 32-token chunks, for eight rows
    assert s.peak_rows >= 8


@pytest.mark.anyio
async def test_seeded_forks_equal_the_same_samples_run_alone(engine: HFEngine) -> None:
    params = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    requests = samples(params, 4)
    expected = await alone(engine, requests)
    assert len({tuple(ids) for ids, _ in expected}) == 4  # derived seeds: four different samples
    s = sched(engine)
    before = s.prefilled_tokens
    assert await forked(engine, requests) == expected
    assert s.prefilled_tokens - before == len(PROMPT)


@pytest.mark.anyio
async def test_forks_beyond_the_batch_bound_wait_for_a_later_prefill(tiny_model_dir: Path, tmp_path: Path) -> None:
    eng = HFEngine(str(tiny_model_dir), served_model_name="tiny", data_dir=tmp_path, dtype="float32", max_batch_size=3)
    await eng.start()
    try:
        params = SamplingParams(max_tokens=6, temperature=0.7, seed=5, ignore_eos=True)
        requests = samples(params, 8, PROMPT[:12])
        expected = await alone(eng, requests)
        before = sched(eng).prefilled_tokens
        assert await forked(eng, requests) == expected
        prefills = (sched(eng).prefilled_tokens - before) // 12
        assert 3 <= prefills < 8  # at most three rows at a time: at least ceil(8 / 3) prefills, fewer than eight
        assert sched(eng).peak_rows == 3
    finally:
        await eng.stop()


@pytest.mark.anyio
async def test_preempted_forks_are_recomputed_alone_and_exactly(tiny_model_dir: Path, tmp_path: Path) -> None:
    budget = 240
    eng = HFEngine(
        str(tiny_model_dir), served_model_name="tiny", data_dir=tmp_path, dtype="float32", max_batch_tokens=budget
    )
    await eng.start()
    try:
        params = SamplingParams(max_tokens=40, temperature=0.8, seed=77, ignore_eos=True)
        requests = samples(params, 6, PROMPT[:10])
        expected = await alone(eng, requests)
        s = sched(eng)
        before = s.prefilled_tokens
        assert await forked(eng, requests) == expected
        assert s.preemptions > 0
        assert s.peak_footprint <= budget
        # One shared prefill of the prompt, then each preempted fork's prompt and tokens again, alone.
        assert s.prefilled_tokens - before > 10
    finally:
        await eng.stop()


@pytest.mark.anyio
async def test_closing_one_fork_leaves_the_others_untouched(engine: HFEngine) -> None:
    params = SamplingParams(max_tokens=30, temperature=0.8, seed=9, ignore_eos=True)
    requests = samples(params, 4)
    expected = await alone(engine, requests)
    # Closed while queued: it leaves the queue; the other samples still share one prefill.
    streams = engine.generate_group(requests)
    await streams[1].aclose()
    before = sched(engine).prefilled_tokens
    got = await asyncio.gather(*(drain(s) for i, s in enumerate(streams) if i != 1))
    assert got == [expected[0], expected[2], expected[3]]
    assert sched(engine).prefilled_tokens - before == len(PROMPT)
    # Closed while running, after its first token.
    streams = engine.generate_group(requests)
    await anext(streams[2])
    await streams[2].aclose()
    got = await asyncio.gather(*(drain(s) for i, s in enumerate(streams) if i != 2))
    assert got == [expected[0], expected[1], expected[3]]
    with anyio.fail_after(5):
        while engine.num_running or engine.num_waiting:  # noqa: ASYNC110 - the worker thread has no event to await
            await asyncio.sleep(0.002)


@pytest.mark.anyio
async def test_running_and_waiting_count_every_fork_and_the_queue_takes_all_or_none(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    eng = HFEngine(str(tiny_model_dir), served_model_name="tiny", data_dir=tmp_path, max_queue_size=3)
    await eng.start()
    try:
        long = SamplingParams(max_tokens=5000, temperature=0.0, ignore_eos=True)
        with pytest.raises(EngineOverloaded, match="4 samples do not fit"):
            eng.generate_group(samples(long, 4))
        assert eng.num_waiting == 0
        streams = eng.generate_group(samples(long, 3))
        for stream in streams:
            await anext(stream)
        assert (eng.num_running, eng.num_waiting) == (3, 0)
        queued = eng.generate_group(samples(long, 2, rid="q"))
        assert eng.num_waiting == 2
        with pytest.raises(EngineOverloaded, match="queue is full"):
            eng.generate_group(samples(long, 2, rid="x"))  # one would fit, two do not: neither is queued
        assert eng.num_waiting == 2
        for stream in [*streams, *queued]:
            await stream.aclose()
        with anyio.fail_after(5):
            while eng.num_running or eng.num_waiting:  # noqa: ASYNC110 - the worker thread has no event to await
                await asyncio.sleep(0.002)
    finally:
        await eng.stop()


@pytest.mark.anyio
async def test_every_fork_gets_the_prompt_logprobs(engine: HFEngine) -> None:
    params = SamplingParams(max_tokens=3, temperature=0.0, logprobs=2, prompt_logprobs=2)
    streams = engine.generate_group(samples(params, 2, PROMPT[:9]))
    firsts = [await anext(s) for s in streams]
    for s in streams:
        await s.aclose()
    solo_stream = engine.generate(samples(params, 1, PROMPT[:9])[0])
    solo = await anext(solo_stream)
    await solo_stream.aclose()
    assert solo.prompt_logprobs is not None and len(solo.prompt_logprobs) == 8
    for first in firsts:
        assert first.prompt_logprobs == solo.prompt_logprobs
        assert first.logprobs == solo.logprobs
    assert firsts[0].prompt_logprobs is not firsts[1].prompt_logprobs


def test_group_members_must_share_one_prompt(tiny_model_dir: Path, tmp_path: Path) -> None:
    async def go() -> None:
        eng = HFEngine(str(tiny_model_dir), served_model_name="tiny", data_dir=tmp_path)
        await eng.start()
        try:
            params = SamplingParams(max_tokens=1)
            with pytest.raises(ValueError, match="share one prompt"):
                eng.generate_group([EngineRequest("a", [5, 6], params), EngineRequest("b", [5, 7], params)])
            with pytest.raises(ValueError, match="share one prompt"):
                eng.generate_group(
                    [
                        EngineRequest("a", [5, 6], params),
                        EngineRequest("b", [5, 6], dataclasses.replace(params, prompt_logprobs=1)),
                    ]
                )
            assert eng.generate_group([]) == []
        finally:
            await eng.stop()

    asyncio.run(go())
