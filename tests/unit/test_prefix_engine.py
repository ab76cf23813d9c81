"""Automatic prefix caching in the Transformers engine, on the tiny random model (float32).

Every request's tokens must be those the same engine gives without a prefix cache: shared prefixes in one group
prefill (rows with and without a cached prefix side by side), chunked prompts, preemption, ``n`` samples, prompt
logprobs and cancellation. ``cached_tokens`` comes with each request's first delta.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from server.engine import scheduler
from server.engine.base import EngineDelta, EngineRequest, SamplingParams
from server.engine.batch import PrefillJob
from server.engine.hf import HFEngine
from tests.unit.conftest import sched

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

SYSTEM = [random.Random(7).randrange(3, 1500) for _ in range(70)]  # 4 whole blocks of 16, and 6 tokens more


@dataclasses.dataclass
class Run:
    tokens: list[int]
    cached: int | None
    prompt_logprobs: Any = None


def suffix(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 1500) for _ in range(n)]


def req(rid: str, prompt: list[int], scope: str = "", **params: Any) -> EngineRequest:
    params = {"max_tokens": 10, "temperature": 0.0, "ignore_eos": True} | params
    return EngineRequest(rid, prompt, SamplingParams(**params), cache_scope=scope)


async def run(engine: HFEngine, request: EngineRequest) -> Run:
    return (await gather_group(engine, [request]))[0]


async def drain(stream: AsyncIterator[EngineDelta]) -> Run:
    out = Run([], None)
    async for delta in stream:
        out.tokens += delta.token_ids
        if delta.cached_tokens is not None:
            assert out.cached is None, "cached_tokens is reported once, with the first delta"
            out.cached = delta.cached_tokens
        if delta.prompt_logprobs is not None:
            out.prompt_logprobs = delta.prompt_logprobs
    return out


async def gather_group(engine: HFEngine, group: list[EngineRequest]) -> list[Run]:
    return list(await asyncio.gather(*(drain(s) for s in engine.generate_group(group))))


async def idle(engine: HFEngine) -> None:
    with anyio.fail_after(5):
        while engine.num_running or engine.num_waiting:  # noqa: ASYNC110 - the worker thread has no event to await
            await asyncio.sleep(0.002)


@pytest.fixture
async def pair(tiny_model_dir: Path, tmp_path: Path) -> AsyncIterator[tuple[HFEngine, HFEngine]]:
    """The same model with a prefix cache and without, both with 32-token prefill chunks."""
    common: dict[str, Any] = {"served_model_name": "tiny", "data_dir": tmp_path, "dtype": "float32"}
    on = HFEngine(str(tiny_model_dir), prefill_chunk_tokens=32, prefix_cache_mb=64, **common)
    off = HFEngine(str(tiny_model_dir), prefill_chunk_tokens=32, prefix_cache_mb=0, **common)
    await on.start()
    await off.start()
    yield on, off
    await on.stop()
    await off.stop()


async def test_shared_prefixes_give_the_tokens_computed_without_a_cache(
    pair: tuple[HFEngine, HFEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    on, off = pair
    jobs: list[list[int]] = []

    class Recorded(PrefillJob):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            jobs.append(self.cached)

    monkeypatch.setattr(scheduler, "PrefillJob", Recorded)
    requests = [req("first", [*SYSTEM, *suffix(0, 5)])]
    for i in range(1, 9):  # short and long tails, greedy and seeded sampling, in one group prefill or chunked
        params = {"temperature": 0.9, "seed": i} if i % 3 == 0 else {}
        requests.append(req(f"r{i}", [*SYSTEM, *suffix(i, [1, 3, 9, 17, 40, 2, 6, 90][i - 1])], **params))
    requests.append(req("partial", [*SYSTEM[:20], *suffix(50, 3)]))  # shares one block only
    requests.append(req("short", suffix(98, 4)))
    requests.append(req("unrelated", suffix(99, 50)))
    expected = [await run(off, r) for r in requests]
    first = await run(on, requests[0])
    assert first.cached == 0 and first.tokens == expected[0].tokens
    got = await asyncio.gather(*(run(on, r) for r in requests[1:]))
    assert [g.tokens for g in got] == [e.tokens for e in expected[1:]]
    assert [g.cached for g in got] == [64] * 8 + [16, 0, 0]  # the system prompt's 4 whole blocks, or 1
    # Rows with different cached prefixes shared a prefill: padding between a row's cached part and the rest.
    assert any(len({k for k in job if k}) > 1 or (max(job) and 0 in job) for job in jobs if len(job) > 1)
    again = await run(on, requests[0])  # the whole prompt is cached now, save its last (partial) block
    assert again.tokens == expected[0].tokens and again.cached == 64
    stats = on.stats()
    assert stats.prefix_cache_hits == 64 * 9 + 16
    assert stats.prefix_cache_queries == sum(len(r.prompt_token_ids) for r in requests) + len(SYSTEM) + 5
    assert 0 < stats.prefix_cache_bytes <= 64 * 2**20
    assert off.stats().prefix_cache_queries == 0 and off.stats().prefix_cache_bytes == 0
    # Only what was not cached was computed (``on`` also ran the first prompt a second time).
    assert sched(on).prefilled_tokens == sched(off).prefilled_tokens + len(SYSTEM) + 5 - stats.prefix_cache_hits


async def test_preempted_rows_are_recomputed_from_the_cache_exactly(tiny_model_dir: Path, tmp_path: Path) -> None:
    common: dict[str, Any] = {"served_model_name": "tiny", "data_dir": tmp_path, "dtype": "float32"}
    on = HFEngine(str(tiny_model_dir), max_batch_tokens=400, prefix_cache_mb=64, **common)
    off = HFEngine(str(tiny_model_dir), max_batch_tokens=400, prefix_cache_mb=0, **common)
    await on.start()
    await off.start()
    try:
        requests = [
            req(f"p{i}", [*SYSTEM[:20], *suffix(i, 10 + 3 * i)], max_tokens=48, temperature=0.7 * (i % 2), seed=i)
            for i in range(6)
        ]
        expected = [await run(off, r) for r in requests]
        got = await asyncio.gather(*(run(on, r) for r in requests))
        assert [g.tokens for g in got] == [e.tokens for e in expected]
        assert on.stats().preemptions > 0
        # A recomputed row finds what it had generated: more tokens come from the cache than the prompts share.
        first_prefills = sum(g.cached or 0 for g in got)
        assert on.stats().prefix_cache_hits > first_prefills
    finally:
        await on.stop()
        await off.stop()


async def test_n_samples_fork_one_cached_prefill(pair: tuple[HFEngine, HFEngine]) -> None:
    on, off = pair
    prompt = [*SYSTEM, *suffix(5, 12)]
    await run(on, req("warm", [*SYSTEM, 1, 2, 3]))
    group = [req(f"n{s}", prompt, temperature=1.0, seed=100 + s, max_tokens=8) for s in range(3)]
    expected = await gather_group(off, group)
    got = await gather_group(on, group)
    assert [g.tokens for g in got] == [e.tokens for e in expected]
    assert [g.cached for g in got] == [64, 64, 64]


async def test_prompt_logprobs_are_computed_whole(pair: tuple[HFEngine, HFEngine]) -> None:
    on, off = pair
    prompt = [*SYSTEM, *suffix(6, 4)]
    await run(on, req("warm", prompt))
    expected = await run(off, req("lp", prompt, prompt_logprobs=2))
    got = await run(on, req("lp", prompt, prompt_logprobs=2))
    assert got.cached == 0  # every prompt position's logits are needed
    assert got.tokens == expected.tokens
    assert len(got.prompt_logprobs) == len(prompt) - 1
    for mine, theirs in zip(got.prompt_logprobs, expected.prompt_logprobs, strict=True):
        assert mine.token_id == theirs.token_id
        assert mine.logprob == pytest.approx(theirs.logprob, abs=1e-4)
    again = await run(on, req("plain", prompt))
    assert again.cached == 64 and again.tokens == expected.tokens


async def test_scopes_do_not_share_cached_prefixes(pair: tuple[HFEngine, HFEngine]) -> None:
    on, _ = pair
    prompt = [*SYSTEM, 9, 9]
    assert (await run(on, req("a1", prompt, scope="key:a"))).cached == 0
    assert (await run(on, req("b1", prompt, scope="key:b"))).cached == 0
    assert (await run(on, req("a2", prompt, scope="key:a"))).cached == 64


async def test_a_cancelled_chunked_prefill_leaves_a_consistent_cache(pair: tuple[HFEngine, HFEngine]) -> None:
    on, off = pair
    long = [*SYSTEM, *suffix(8, 150)]  # several 32-token chunks
    stream = on.generate(req("gone", long, max_tokens=50))
    with anyio.fail_after(10):
        while stream.started_at is None:  # noqa: ASYNC110 - the worker thread has no event to await
            await asyncio.sleep(0.001)
    await stream.aclose()
    await idle(on)
    s = sched(on)
    assert s._job is None and not s._rows and s.kv_tokens == 0
    expected = await run(off, req("back", long))
    got = await run(on, req("back", long))
    assert got.tokens == expected.tokens


async def test_memory_stays_within_the_budget_and_the_kv_gauge_returns_to_zero(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    eng = HFEngine(str(tiny_model_dir), served_model_name="tiny", data_dir=tmp_path, dtype="float32", prefix_cache_mb=1)
    await eng.start()
    try:
        seen: list[float] = []

        async def watch() -> None:
            while True:
                seen.append(eng.stats().kv_usage)
                await asyncio.sleep(0.001)

        watcher = asyncio.create_task(watch())
        await asyncio.gather(*(run(eng, req(f"m{i}", suffix(1000 + i, 300))) for i in range(12)))
        watcher.cancel()
        await idle(eng)
        stats = eng.stats()
        assert 0 < stats.prefix_cache_bytes <= 2**20
        assert stats.prefix_cache_bytes == sum(b.nbytes for b in sched(eng).prefix_cache._blocks.values())  # type: ignore[union-attr]
        assert max(seen) > 0
        assert stats.kv_usage == 0.0
    finally:
        await eng.stop()


async def test_one_row_at_a_time_still_reuses_prefixes(tiny_model_dir: Path, tmp_path: Path) -> None:
    common: dict[str, Any] = {"served_model_name": "tiny", "data_dir": tmp_path, "dtype": "float32"}
    eng = HFEngine(str(tiny_model_dir), max_batch_size=1, prefix_cache_mb=64, **common)
    await eng.start()
    try:
        prompt = [*SYSTEM, 5, 6]
        assert (await run(eng, req("once", prompt))).cached == 0
        assert (await run(eng, req("twice", prompt))).cached == 64
    finally:
        await eng.stop()
