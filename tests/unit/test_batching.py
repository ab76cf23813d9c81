"""Continuous batching in the Transformers engine on the tiny random model (float32).

Rows join a running batch between decode steps and leave when they finish or are cancelled; a request's tokens
must not depend on who it shares the batch with.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

from server.engine.base import EngineOverloaded, EngineRequest, SamplingParams
from server.engine.hf import HFEngine
from server.engine.hf_tokenizer import HFTokenizer
from server.engine.sampling import RowSampler, Sampler
from tests.unit.conftest import sched

pytestmark = pytest.mark.slow

Result = tuple[list[int], str, str | None]


@pytest.fixture
def engine(chunked_engine: HFEngine) -> HFEngine:
    return chunked_engine


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 1500) for _ in range(n)]


def request(rid: str, n: int, **params: Any) -> EngineRequest:
    # crc32, not hash(): str hashes are salted per process, and the prompts must be the same in every run.
    return EngineRequest(rid, prompt(n, zlib.crc32(rid.encode()) % 1000), SamplingParams(**params))


async def collect(engine: HFEngine, req: EngineRequest, progress: dict[str, int] | None = None) -> Result:
    ids: list[int] = []
    text, finish = "", None
    stream = engine.generate(req)
    try:
        async for delta in stream:
            ids += delta.token_ids
            text += delta.text
            finish = delta.finish_reason
            if progress is not None:
                progress[req.request_id] = len(ids)
    finally:
        await stream.aclose()
    return ids, text, finish


async def until(predicate: Callable[[], bool]) -> None:
    while not predicate():  # noqa: ASYNC110 - the worker thread has no event to await
        await asyncio.sleep(0.002)


async def alone(engine: HFEngine, requests: list[EngineRequest]) -> dict[str, Result]:
    out = {}
    for req in requests:
        out[req.request_id] = await collect(engine, req)
        with anyio.fail_after(5):  # the last delta arrives before the worker drops the row
            await until(lambda: engine.num_running == 0)
    return out


async def staggered(engine: HFEngine, requests: list[EngineRequest], after: int = 2) -> dict[str, Result]:
    """Start request i once request i-1 has produced ``after`` tokens (or finished): rows join a running batch."""
    progress: dict[str, int] = {}
    tasks: dict[str, asyncio.Task[Result]] = {}
    for i, req in enumerate(requests):
        if i:
            prev = requests[i - 1].request_id
            await until(lambda p=prev: progress.get(p, 0) >= after or tasks[p].done())  # type: ignore[misc]
        tasks[req.request_id] = asyncio.create_task(collect(engine, req, progress))
    return {rid: await task for rid, task in tasks.items()}


MIXED = [
    ("g-short", 5, {"temperature": 0.0, "max_tokens": 3}),
    ("g-long", 70, {"temperature": 0.0, "max_tokens": 40, "ignore_eos": True}),
    ("s-seeded", 12, {"temperature": 0.9, "top_p": 0.9, "seed": 11, "max_tokens": 25, "ignore_eos": True}),
    ("g-mid", 23, {"temperature": 0.0, "max_tokens": 30}),
    ("s-topk", 9, {"temperature": 1.3, "top_k": 20, "seed": 5, "max_tokens": 12, "ignore_eos": True}),
    ("g-one", 3, {"temperature": 0.0, "max_tokens": 1}),
    ("g-40", 40, {"temperature": 0.0, "max_tokens": 22, "ignore_eos": True}),
    ("s-minp", 17, {"temperature": 0.7, "min_p": 0.05, "seed": 3, "max_tokens": 18, "ignore_eos": True}),
    ("g-tail", 8, {"temperature": 0.0, "max_tokens": 35, "ignore_eos": True}),
]


@pytest.mark.anyio
async def test_batched_output_equals_alone_with_staggered_arrivals(engine: HFEngine) -> None:
    requests = [request(rid, n, **params) for rid, n, params in MIXED]
    expected = await alone(engine, requests)
    got = await staggered(engine, requests)
    assert got == expected
    assert sched(engine).peak_rows >= 4, "the requests never shared a batch"
    for rid, _, params in MIXED:
        assert len(got[rid][0]) == params["max_tokens"] or got[rid][2] == "stop", rid
    # And once more in the reverse arrival order: other neighbours, other padding, same tokens.
    assert await staggered(engine, requests[::-1], after=1) == expected


@pytest.mark.anyio
async def test_per_row_parameters_in_one_batch(engine: HFEngine) -> None:
    # A prompt whose greedy continuation has a token first seen at position >= 2: it becomes EOS below.
    for attempt in range(20):
        base = request(f"base{attempt}", 11, temperature=0.0, max_tokens=12, ignore_eos=True)
        greedy, _, _ = await collect(engine, base)
        cut = next((i for i, t in enumerate(greedy) if i >= 2 and t not in greedy[:i]), None)
        if cut is not None:
            break
    assert cut is not None, "the tiny model repeats itself after every prompt tried"
    # New requests read the EOS ids when admitted: the cut token is EOS for every request below.
    engine._tokenizer = HFTokenizer(engine.tokenizer.hf, extra_eos_token_ids=[greedy[cut]])
    like = base.prompt_token_ids
    rows = {
        "eos": EngineRequest("eos", like, SamplingParams(temperature=0.0, max_tokens=12)),
        "ignore": EngineRequest("ignore", like, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)),
        "topk1": EngineRequest("topk1", like, SamplingParams(temperature=5.0, top_k=1, max_tokens=12, ignore_eos=True)),
        "short": EngineRequest("short", like, SamplingParams(temperature=0.0, max_tokens=2)),
        "hot": EngineRequest("hot", like, SamplingParams(temperature=5.0, seed=1, max_tokens=12, ignore_eos=True)),
        "cool": EngineRequest("cool", like, SamplingParams(temperature=0.2, seed=1, max_tokens=12, ignore_eos=True)),
    }
    results = await asyncio.gather(*(collect(engine, r) for r in rows.values()))
    got = dict(zip(rows, results, strict=True))
    assert sched(engine).peak_rows >= 4  # prefilled two at a time (32-token chunks), so they overlap
    assert (got["eos"][0], got["eos"][2]) == (greedy[: cut + 1], "stop")
    assert (got["ignore"][0], got["ignore"][2]) == (greedy, "length")
    assert got["topk1"][0] == greedy
    assert (got["short"][0], got["short"][2]) == (greedy[:2], "length")
    assert got["hot"][0] != got["cool"][0]  # same seed, different temperature: per-row parameters
    assert got["hot"] == await collect(engine, rows["hot"])  # and the same tokens alone


@pytest.mark.anyio
async def test_closing_one_stream_frees_its_row_within_a_step(engine: HFEngine) -> None:
    params = {"temperature": 0.0, "max_tokens": 30, "ignore_eos": True}
    requests = [request(f"c{i}", 6 + 5 * i, **params) for i in range(4)]
    expected = await alone(engine, requests)
    progress: dict[str, int] = {}
    keep = [asyncio.create_task(collect(engine, r, progress)) for r in requests[1:]]
    victim = engine.generate(request("victim", 9, temperature=0.0, max_tokens=5000, ignore_eos=True))
    await anext(victim)
    with anyio.fail_after(10):
        await until(lambda: sched(engine).num_running == 4 and all(progress.values()) and len(progress) == 3)
    # The victim's own row counts its tokens: they grow by one per step while it is in the batch, whatever the
    # event loop's polling speed (counting engine steps while polling failed once on a loaded machine).
    row = next(p for p in sched(engine)._rows if p.request.request_id == "victim")
    at_close = len(row.tokens)
    await victim.aclose()
    with anyio.fail_after(5):
        await until(lambda: engine.num_running <= 3)
    # The step in progress may still give it a token (plus one racing the read above); the next one drops it.
    assert len(row.tokens) - at_close <= 2
    assert row not in sched(engine)._rows
    results = await asyncio.gather(*keep)
    assert {r.request_id: res for r, res in zip(requests[1:], results, strict=True)} == {
        k: v for k, v in expected.items() if k != "c0"
    }


@pytest.mark.anyio
async def test_queue_bounds_batch_size_and_queued_requests_leave(tiny_model_dir: Path, tmp_path: Path) -> None:
    eng = HFEngine(str(tiny_model_dir), served_model_name="tiny", data_dir=tmp_path, max_batch_size=3, max_queue_size=2)
    await eng.start()
    try:
        long = {"temperature": 0.0, "max_tokens": 5000, "ignore_eos": True}
        running = []
        for i in range(3):
            running.append(eng.generate(request(f"r{i}", 5, **long)))
            await anext(running[-1])
        assert eng.num_running == 3
        queued = [eng.generate(request(f"q{i}", 5, max_tokens=2)) for i in range(2)]
        assert eng.num_waiting == 2
        with pytest.raises(EngineOverloaded, match="queue is full"):
            eng.generate(request("x", 5, max_tokens=2))
        await queued[0].aclose()  # a queued request leaves the queue at once
        assert eng.num_waiting == 1
        await running[0].aclose()  # frees a row: the other queued request joins
        with anyio.fail_after(5):
            ids = [d.token_ids async for d in queued[1]]
        assert len(ids) == 2
        for stream in running[1:]:
            await stream.aclose()
        await queued[1].aclose()
        assert sched(eng).peak_rows == 3
    finally:
        await eng.stop()


@pytest.mark.anyio
async def test_kv_budget_preempts_and_recomputes_exactly(tiny_model_dir: Path, tmp_path: Path) -> None:
    budget = 240
    eng = HFEngine(
        str(tiny_model_dir), served_model_name="tiny", data_dir=tmp_path, dtype="float32", max_batch_tokens=budget
    )
    await eng.start()
    try:
        requests = [
            request(f"b{i}", 10 + 3 * i, temperature=0.0 if i % 2 else 0.8, seed=i, max_tokens=40, ignore_eos=True)
            for i in range(6)
        ]
        expected = await alone(eng, requests)  # a lone row always runs
        got = dict(zip(expected, await asyncio.gather(*(collect(eng, r) for r in requests)), strict=True))
        assert got == expected
        s = sched(eng)
        assert s.peak_footprint <= budget
        assert s.preemptions > 0
        assert 1 < s.peak_rows < len(requests)
    finally:
        await eng.stop()


@pytest.mark.anyio
async def test_nothing_leaks_after_many_requests(engine: HFEngine) -> None:
    rng = random.Random(0)

    async def one(i: int) -> None:
        req = request(f"n{i}", rng.randrange(1, 12), temperature=rng.choice([0.0, 1.0]), max_tokens=rng.randrange(1, 5))
        stream = engine.generate(req)
        try:
            if i % 5 == 0:
                await stream.aclose()  # cancelled while queued or running
            elif i % 7 == 0:
                await anext(stream)
            else:
                async for _ in stream:
                    pass
        finally:
            await stream.aclose()

    limit = asyncio.Semaphore(24)

    async def bounded(i: int) -> None:
        async with limit:
            await one(i)

    await asyncio.gather(*(bounded(i) for i in range(300)))
    s = sched(engine)
    with anyio.fail_after(5):
        await until(lambda: engine.num_running == 0 and engine.num_waiting == 0)
    assert s._rows == [] and s._job is None and s._job_rows == [] and not s._requeued and not s._waiting
    assert s._batch.size == 0 and s._batch.cache is None
    assert s.peak_rows >= 4


# -- the batched sampler ------------------------------------------------------------------------------------


def test_batched_sampler_keeps_each_rows_filters_and_randomness() -> None:
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().repeat(5, 1)
    params = [
        SamplingParams(max_tokens=1, temperature=0.0),
        SamplingParams(max_tokens=1, top_p=0.7),
        SamplingParams(max_tokens=1, min_p=0.25),
        SamplingParams(max_tokens=1, top_k=3, top_p=0.99),
        SamplingParams(max_tokens=1),
    ]
    allowed = [{0}, {0, 1}, {0, 1, 2}, {0, 1, 2}, {0, 1, 2, 3}]
    sampler = Sampler(4)
    seen: list[set[int]] = [set() for _ in params]
    rows = [RowSampler.create(dataclasses.replace(p, seed=i)) for i, p in enumerate(params)]
    for _ in range(300):
        for i, token in enumerate(sampler.sample(logits, rows)):
            seen[i].add(token)
    assert seen == allowed
    # A seeded row draws the same tokens alone as beside others.
    solo = [RowSampler.create(SamplingParams(max_tokens=1, top_p=0.7, seed=1))]
    pair = [RowSampler.create(SamplingParams(max_tokens=1, seed=9)), RowSampler.create(solo[0].params)]
    alone_draws = [sampler.sample(logits[:1], solo)[0] for _ in range(50)]
    batched_draws = [sampler.sample(logits[:2], pair)[1] for _ in range(50)]
    assert alone_draws == batched_draws


def test_batched_sampler_falls_back_to_a_full_sort_for_a_flat_nucleus() -> None:
    flat = torch.randn(1, 2000, generator=torch.Generator().manual_seed(1)) * 0.01
    sampler = Sampler(2000)
    row = [RowSampler.create(SamplingParams(max_tokens=1, top_p=0.9, seed=0))]
    draws = {sampler.sample(flat, row)[0] for _ in range(400)}
    assert len(draws) > 300  # the nucleus of a flat distribution is far wider than the 256 first candidates


@pytest.mark.anyio
async def test_sliding_window_models_fall_back_to_one_row(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from transformers import MistralConfig, MistralForCausalLM

    folder = tmp_path / "swa"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny_model_dir / name, folder / name)
    config = MistralConfig(
        vocab_size=1536,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        sliding_window=8,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = MistralForCausalLM(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2, generator=generator)
    model.save_pretrained(folder)

    eng = HFEngine(str(folder), served_model_name="swa", data_dir=tmp_path, dtype="float32", prefill_chunk_tokens=16)
    with caplog.at_level(logging.WARNING, logger="server.engine"):
        await eng.start()
    try:
        assert "serving one request at a time" in caplog.text
        assert sched(eng).prefix_cache is None  # a sliding window's cache cannot be cut into blocks either
        requests = [request(f"w{i}", n, temperature=0.0, max_tokens=12, ignore_eos=True) for i, n in enumerate((5, 40))]
        expected = await alone(eng, requests)
        together = await asyncio.gather(*(collect(eng, r) for r in requests))
        assert dict(zip(expected, together, strict=True)) == expected
        assert sched(eng).peak_rows == 1
    finally:
        await eng.stop()
