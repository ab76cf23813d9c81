"""The Transformers engine, its tokenizer adapter, the sampler and the demo model, on the tiny random model."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import pytest
import torch
from transformers import AutoTokenizer

from server.engine.base import Engine, EngineError, EngineOverloaded, EngineRequest, SamplingParams
from server.engine.demo_model import is_complete, resolve_builtin, write_demo_model
from server.engine.draw import _nucleus_candidates
from server.engine.hf import HFEngine
from server.engine.hf_tokenizer import HFTokenizer
from server.engine.sampling import RowSampler, Sampler

pytestmark = pytest.mark.slow

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a tuple?"}]


@pytest.fixture
async def engine(tiny_model_dir: Path, tmp_path: Path) -> AsyncIterator[HFEngine]:
    eng = HFEngine(str(tiny_model_dir), served_model_name="tiny", data_dir=tmp_path)
    await eng.start()
    yield eng
    await eng.stop()


def req(engine: HFEngine, rid: str = "r", **params: object) -> EngineRequest:
    prompt = engine.tokenizer.render_chat(CHAT, add_generation_prompt=True, continue_final_message=False)
    return EngineRequest(rid, prompt, SamplingParams(**params))  # type: ignore[arg-type]


async def run(engine: HFEngine, request: EngineRequest) -> tuple[list[int], str, str | None]:
    ids: list[int] = []
    text, finish = "", None
    stream = engine.generate(request)
    try:
        async for delta in stream:
            ids += delta.token_ids
            text += delta.text
            finish = delta.finish_reason
    finally:
        await stream.aclose()
    return ids, text, finish


async def until(predicate: Callable[[], bool]) -> None:
    """Poll state the worker thread changes (callers bound the wait with ``anyio.fail_after``)."""
    while not predicate():  # noqa: ASYNC110 - the worker thread has no event to await
        await asyncio.sleep(0.005)


# -- demo model ---------------------------------------------------------------------------------------------


def test_demo_model_is_deterministic_and_fast(tiny_model_dir: Path, tmp_path: Path) -> None:
    started = time.perf_counter()
    again = write_demo_model(tmp_path / "again")
    elapsed = time.perf_counter() - started
    assert elapsed < 5.0, f"tiny build took {elapsed:.2f}s"  # ~0.3 s here; slack for loaded CI machines
    names = sorted(p.name for p in tiny_model_dir.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (tiny_model_dir / name).read_bytes() == (again / name).read_bytes(), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary build folders left behind"


def test_resolve_builtin_builds_once_and_rejects_unknown(tmp_path: Path) -> None:
    stale = tmp_path / "models" / "tiny-chat"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")  # an interrupted copy is replaced, not trusted
    path = resolve_builtin("builtin:tiny-chat", tmp_path)
    assert path == stale
    assert is_complete(path, "tiny")
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert resolve_builtin("builtin:tiny-chat", tmp_path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="unknown built-in model"):
        resolve_builtin("builtin:nope", tmp_path)


def test_racing_builds_leave_one_complete_model(tmp_path: Path) -> None:
    dest = tmp_path / "m"
    errors: list[BaseException] = []

    def build() -> None:
        try:
            write_demo_model(dest)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert is_complete(dest, "tiny")
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


# -- tokenizer ----------------------------------------------------------------------------------------------


def test_tokenizer_adapter(tiny_model_dir: Path) -> None:
    hf = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok = HFTokenizer(hf, extra_eos_token_ids=[hf.convert_tokens_to_ids("<|endoftext|>")])
    assert tok.vocab_size == len(hf)
    assert tok.eos_token_ids == {hf.convert_tokens_to_ids("<|im_end|>"), hf.convert_tokens_to_ids("<|endoftext|>")}
    assert tok.has_chat_template
    assert tok.decode(tok.encode("def f(x): return x")) == "def f(x): return x"

    text_parts = [{"type": "text", "text": "What is "}, {"type": "text", "text": "a tuple?"}]
    parts = [CHAT[0], {"role": "user", "content": text_parts}]
    for messages in (CHAT, parts):
        expected = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
        assert tok.render_chat(messages, add_generation_prompt=True, continue_final_message=False) == expected
    assert tok.decode(expected).endswith("What is a tuple?\nassistant\n")  # special tokens skipped

    prefill = [*CHAT, {"role": "assistant", "content": "A tuple is"}]
    ids = tok.render_chat(prefill, add_generation_prompt=False, continue_final_message=True)
    assert hf.decode(ids).endswith("<|im_start|>assistant\nA tuple is")

    image = [{"role": "user", "content": [{"type": "image_url"}]}]
    with pytest.raises(ValueError, match="chat template rejected"):
        tok.render_chat(image, add_generation_prompt=True, continue_final_message=False)
    hf.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        tok.render_chat(CHAT, add_generation_prompt=True, continue_final_message=False)


# -- engine -------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_greedy_is_deterministic_and_text_matches_decode(engine: HFEngine) -> None:
    assert engine.ready
    assert isinstance(engine, Engine)
    assert engine.info.max_model_len == 2048
    assert engine.tokenizer.eos_token_ids == {0, 2}
    first = await run(engine, req(engine, temperature=0.0, max_tokens=24))
    second = await run(engine, req(engine, temperature=0.0, max_tokens=24))
    assert first == second
    ids, text, finish = first
    assert (len(ids), finish) == (24, "length")
    assert text == engine.tokenizer.decode(ids)


@pytest.mark.anyio
async def test_seeded_sampling_reproduces_and_leaves_global_rng_alone(engine: HFEngine) -> None:
    state = torch.random.get_rng_state()
    a = await run(engine, req(engine, temperature=1.0, seed=7, max_tokens=16, ignore_eos=True))
    b = await run(engine, req(engine, temperature=1.0, seed=7, max_tokens=16, ignore_eos=True))
    c = await run(engine, req(engine, temperature=1.0, seed=8, max_tokens=16, ignore_eos=True))
    unseeded = await run(engine, req(engine, temperature=1.0, top_p=0.9, top_k=50, min_p=0.01, max_tokens=16))
    assert a == b
    assert a[0] != c[0]
    assert unseeded[2] in {"stop", "length"}
    assert all(t < engine.tokenizer.vocab_size for t in a[0] + c[0] + unseeded[0])
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.anyio
async def test_eos_stops_and_is_counted_but_not_text(engine: HFEngine) -> None:
    greedy, _, _ = await run(engine, req(engine, temperature=0.0, max_tokens=12))
    cut = next(i for i, t in enumerate(greedy) if t not in greedy[:i] and i >= 2)
    # Make the cut token an EOS: the same greedy run must stop there.
    engine._tokenizer = HFTokenizer(engine.tokenizer.hf, extra_eos_token_ids=[greedy[cut]])
    ids, text, finish = await run(engine, req(engine, temperature=0.0, max_tokens=12))
    assert (ids, finish) == (greedy[: cut + 1], "stop")
    assert text == engine.tokenizer.decode(greedy[:cut])
    ids, _, finish = await run(engine, req(engine, temperature=0.0, max_tokens=12, ignore_eos=True))
    assert (ids, finish) == (greedy, "length")


@pytest.mark.anyio
async def test_context_end_finishes_with_length(tiny_model_dir: Path, tmp_path: Path) -> None:
    eng = HFEngine(str(tiny_model_dir), served_model_name="tiny", data_dir=tmp_path, max_model_len=40)
    await eng.start()
    try:
        request = req(eng, temperature=0.0, max_tokens=100, ignore_eos=True)
        ids, _, finish = await run(eng, request)
        assert (len(ids), finish) == (40 - len(request.prompt_token_ids), "length")
        long_prompt = EngineRequest("x", [5] * 40, SamplingParams(max_tokens=5))
        assert await run(eng, long_prompt) == ([], "", "length")
    finally:
        await eng.stop()


@pytest.mark.anyio
async def test_closing_aborts_and_next_request_is_served(engine: HFEngine) -> None:
    long = {"temperature": 0.0, "max_tokens": 5000, "ignore_eos": True}  # ~2000 steps if never aborted
    stream = engine.generate(req(engine, "a", **long))
    await anext(stream)
    await anext(stream)
    await stream.aclose()
    with anyio.fail_after(2.0):
        await until(lambda: engine.num_running == 0)

    started = asyncio.Event()

    async def consume() -> None:  # a cancelled consumer closes its stream in `finally`, as serving code does
        stream = engine.generate(req(engine, "b", **long))
        try:
            async for _ in stream:
                started.set()
        finally:
            await stream.aclose()

    task = asyncio.create_task(consume())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with anyio.fail_after(2.0):
        await until(lambda: engine.num_running == 0)

    ids, _, finish = await run(engine, req(engine, "c", temperature=0.0, max_tokens=3))
    assert (len(ids), finish) == (3, "length")


@pytest.mark.anyio
async def test_full_queue_overloads_and_queued_requests_can_leave(tiny_model_dir: Path, tmp_path: Path) -> None:
    # One row at a time, so that a second request has to wait in the queue behind the first.
    eng = HFEngine(str(tiny_model_dir), served_model_name="tiny", data_dir=tmp_path, max_queue_size=1, max_batch_size=1)
    await eng.start()
    try:
        running = eng.generate(req(eng, "a", temperature=0.0, max_tokens=5000, ignore_eos=True))
        await anext(running)  # the worker took it: the queue is empty again
        queued = eng.generate(req(eng, "b", max_tokens=2))
        assert eng.num_waiting == 1
        with pytest.raises(EngineOverloaded, match="queue is full"):
            eng.generate(req(eng, "c", max_tokens=2))
        await queued.aclose()  # a queued request leaves the queue at once
        assert eng.num_waiting == 0

        waiting = asyncio.create_task(run(eng, req(eng, "d", temperature=0.0, max_tokens=2)))
        with anyio.fail_after(5.0):
            await until(lambda: eng.num_waiting == 1)
        await running.aclose()
        ids, _, finish = await waiting
        assert (len(ids), finish) == (2, "length")
    finally:
        await eng.stop()


@pytest.mark.anyio
async def test_errors_reach_the_request_and_the_worker_survives(engine: HFEngine) -> None:
    bad = EngineRequest("bad", [engine.tokenizer.vocab_size + 5], SamplingParams(max_tokens=2))
    with pytest.raises(EngineError, match="prompt token ids"):
        await run(engine, bad)
    ids, _, _ = await run(engine, req(engine, temperature=0.0, max_tokens=2))
    assert len(ids) == 2


@pytest.mark.anyio
async def test_stop_fails_running_requests_and_refuses_new_ones(engine: HFEngine) -> None:
    running = engine.generate(req(engine, "a", temperature=0.0, max_tokens=5000, ignore_eos=True))
    await anext(running)
    queued = engine.generate(req(engine, "b", max_tokens=1))
    await engine.stop()
    for stream in (running, queued):
        with pytest.raises(EngineOverloaded, match="shutting down"):
            async for _ in stream:
                pass
        await stream.aclose()
    assert not engine.ready
    with pytest.raises(EngineOverloaded):
        engine.generate(req(engine, max_tokens=1))


# -- sampler ------------------------------------------------------------------------------------------------


def rows(n: int = 1, **params: object) -> list[RowSampler]:
    return [RowSampler.create(SamplingParams(max_tokens=1, seed=i, **params)) for i in range(n)]  # type: ignore[arg-type]


def draws(logits: torch.Tensor, n: int = 300, **params: object) -> set[int]:
    row = rows(**params)
    return {Sampler(logits.shape[-1]).sample(logits[None], row)[0] for _ in range(n)}


def test_sampler_top_k_1_is_greedy_and_rows_are_independent() -> None:
    logits = torch.randn(4, 500, generator=torch.Generator().manual_seed(0))
    sampler = Sampler(500)
    greedy = logits.argmax(-1).tolist()
    assert sampler.sample(logits, rows(4, temperature=0.0)) == greedy
    assert sampler.sample(logits, rows(4, temperature=1.5, top_k=1)) == greedy
    mixed = rows(2, temperature=0.0) + rows(2, temperature=1.0)
    assert sampler.sample(logits, mixed)[:2] == greedy[:2]


def test_sampler_filters() -> None:
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    assert draws(logits) == {0, 1, 2, 3}
    assert draws(logits, top_p=0.7) == {0, 1}  # mass before token 2 is 0.8
    assert draws(logits, min_p=0.4) == {0, 1}  # threshold 0.2
    assert draws(logits, min_p=0.25) == {0, 1, 2}  # threshold 0.125
    assert draws(logits, top_k=3, top_p=0.99) == {0, 1, 2}
    assert draws(logits, top_p=0.0) == draws(logits, min_p=1.0) == {0}  # degenerate values keep the top token


def test_sampler_never_emits_ids_past_the_tokenizer() -> None:
    logits = torch.zeros(1, 10)
    logits[0, 8:] = 100.0  # padding rows of an embedding matrix larger than the tokenizer
    sampler = Sampler(vocab_limit=8)
    assert sampler.sample(logits, rows(temperature=0.0)) == [int(torch.zeros(8).argmax())]
    assert all(sampler.sample(logits, rows(temperature=2.0))[0] < 8 for _ in range(50))


def test_nucleus_candidates_fall_back_to_a_full_sort_for_flat_distributions() -> None:
    probs = torch.softmax(torch.randn(2000, generator=torch.Generator().manual_seed(1)) * 0.1, -1)
    values, ids = _nucleus_candidates(probs, 0.9)
    assert float(values.sum()) >= 0.9
    assert torch.equal(values, probs[ids])
    assert bool((values[:-1] >= values[1:]).all())
    peaked = torch.softmax(torch.arange(2000.0), -1)
    assert len(_nucleus_candidates(peaked, 0.9)[0]) == 256
