"""A torch-free :class:`~server.engine.base.Embedder` for gateway tests: deterministic vectors, batching on record.

Its batches form the way the real embedder's do: every input queued while the previous batch ran (or before the
batcher woke up) joins the next one, up to ``max_batch_size``, so concurrent calls can be shown to share a batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import random
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

from server.engine.base import EngineError, EngineOverloaded, ModelInfo
from server.engine.chartok import EOS_ID, CharTokenizer

CLS, SEP = "[CLS]", "[SEP]"


class BracketingTokenizer(CharTokenizer):
    """A character tokenizer whose ``encode`` wraps text in ``[CLS]`` ... ``[SEP]`` (ids above every code point)."""

    def __init__(self) -> None:
        super().__init__([CLS, SEP])
        self.cls_id, self.sep_id = self.piece_id(CLS), self.piece_id(SEP)

    def encode(self, text: str) -> list[int]:
        return [self.cls_id, *super().encode(text), self.sep_id]

    def decode(self, token_ids: Sequence[int]) -> str:
        return super().decode([t for t in token_ids if t < EOS_ID])


def fake_vector(token_ids: Sequence[int], dimensions: int) -> array[float]:
    """A unit-length float32 vector that depends only on ``token_ids`` (the same ids always give the same vector)."""
    seed = hashlib.blake2b(array("q", token_ids).tobytes(), digest_size=8).digest()
    rng = random.Random(int.from_bytes(seed, "little"))
    values = [rng.gauss(0.0, 1.0) for _ in range(dimensions)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return array("f", (v / norm for v in values))


@dataclass(slots=True)
class _Waiting:
    token_ids: list[int]
    future: asyncio.Future[array[float]]


class FakeEmbedder:
    """An :class:`~server.engine.base.Embedder` with no model.

    Args:
        served_model_name: The name clients use.
        dimensions: Length of each vector.
        max_model_len: Most tokens per input (``[CLS]`` and ``[SEP]`` included).
        truncatable: Whether it claims Matryoshka-trained vectors.
        normalized: Whether its vectors are unit length; when false each is :func:`fake_vector` doubled.
        max_queue_size: Inputs allowed to wait; beyond it ``embed`` raises :class:`EngineOverloaded`.
        max_batch_size: Most inputs per batch.
        delay_s: How long each batch "runs" (lets concurrent calls queue behind it).
        fail: When true, every batch fails with :class:`EngineError` (set it any time).

    ``batches`` records the token ids of every batch run, in order.
    """

    def __init__(
        self,
        *,
        served_model_name: str = "fake-embed",
        dimensions: int = 8,
        max_model_len: int = 512,
        truncatable: bool = False,
        normalized: bool = True,
        max_queue_size: int = 64,
        max_batch_size: int = 32,
        delay_s: float = 0.0,
        fail: bool = False,
    ) -> None:
        self._name = served_model_name
        self._dimensions = dimensions
        self._truncatable = truncatable
        self._normalized = normalized
        self._max_queue_size = max_queue_size
        self._max_batch_size = max_batch_size
        self._info = ModelInfo(
            name=served_model_name, source="fake", max_model_len=max_model_len, created=int(time.time())
        )
        self._tokenizer = BracketingTokenizer()
        self.delay_s = delay_s
        self.fail = fail
        self.batches: list[list[list[int]]] = []
        self._queue: list[_Waiting] = []
        self._current: list[_Waiting] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def name(self) -> str:
        return self._name

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def tokenizer(self) -> BracketingTokenizer:
        return self._tokenizer

    @property
    def dimensions(self) -> int:
        return self._dimensions

    @property
    def normalized(self) -> bool:
        return self._normalized

    @property
    def truncatable(self) -> bool:
        return self._truncatable

    @property
    def ready(self) -> bool:
        return self._task is not None and not self._task.done() and not self._stopping

    @property
    def failure(self) -> str | None:
        return None

    @property
    def num_running(self) -> int:
        return len(self._current)

    @property
    def num_waiting(self) -> int:
        return len(self._queue)

    async def start(self) -> None:
        if self._task is None:
            self._stopping = False
            self._wake = asyncio.Event()
            self._task = asyncio.create_task(self._batcher())

    async def stop(self) -> None:
        """Fail queued and running calls with :class:`EngineOverloaded` and end the batcher."""
        self._stopping = True
        for waiting in [*self._current, *self._queue]:
            if not waiting.future.done():
                waiting.future.set_exception(EngineOverloaded("the embedder is shutting down"))
        self._queue.clear()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def embed(self, inputs: Sequence[Sequence[int]]) -> list[array[float]]:
        """One vector per input (see :func:`fake_vector`), computed in batches shared with concurrent calls.

        Raises:
            EngineOverloaded: not started, stopping, or the queue cannot take the inputs (nothing queued).
            ValueError: an input is empty or longer than ``max_model_len``.
            EngineError: ``fail`` is set.
        """
        if not self.ready or self._wake is None:
            raise EngineOverloaded("the embedder is not running")
        if self._queue and len(self._queue) + len(inputs) > self._max_queue_size:
            raise EngineOverloaded(f"the embedding queue is full ({len(self._queue)} inputs waiting)")
        for ids in inputs:
            if not ids or len(ids) > self._info.max_model_len:
                raise ValueError(f"an input must have 1 to {self._info.max_model_len} tokens, not {len(ids)}")
        loop = asyncio.get_running_loop()
        waiting = [_Waiting(list(ids), loop.create_future()) for ids in inputs]
        self._queue.extend(waiting)
        self._wake.set()
        try:
            return list(await asyncio.gather(*(w.future for w in waiting)))
        except asyncio.CancelledError:  # as the real embedder: a cancelled call's inputs leave the queue
            mine = {id(w) for w in waiting}
            self._queue = [w for w in self._queue if id(w) not in mine]
            raise

    async def _batcher(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(0)  # calls made in the same loop iteration join this batch
            while self._queue:
                batch = self._queue[: self._max_batch_size]
                del self._queue[: len(batch)]
                await self._run(batch)

    async def _run(self, batch: list[_Waiting]) -> None:
        self._current = batch
        try:
            self.batches.append([w.token_ids for w in batch])
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            for w in batch:
                if w.future.done():
                    continue
                if self.fail:
                    w.future.set_exception(EngineError("injected embedding failure"))
                else:
                    w.future.set_result(self._vector(w.token_ids))
        finally:
            self._current = []

    def _vector(self, token_ids: list[int]) -> array[float]:
        vector = fake_vector(token_ids, self._dimensions)
        return vector if self._normalized else array("f", (2 * x for x in vector))
